"""STAR files (RELION): a vectorised reader of the blocks of any dialect, and the writer of
RELION 3.1 files (``data_optics`` + ``data_particles``).

The reader follows the STAR layout RELION writes (``src/metadata_table.cpp``): ``data_NAME``
starts a block; a block is either ``loop_`` + ``_label [#n]`` lines + one row per line, or
``_label value`` pairs. Blank lines and ``#`` comments (``# version 30001``) are skipped.
Every row must have exactly one value per label; a row with fewer or more (a file cut
mid-row, a damaged line) is an error naming the line, never silently dropped. The rows of
a loop are parsed by pandas' C reader and their token counts checked by numpy, so a
10^6-row file needs no Python loop over rows. ``scan_star`` finds the blocks and where
each loop's rows are in one pass without holding the file; ``loop_pieces`` reads the rows
LOOP_BLOCK_BYTES of whole lines at a time, so memory never holds a long loop's text.

What the blocks mean (optics groups, RELION 3.0 per-particle optics) is decided in
:mod:`cryosvi.io.particles`.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cryosvi.config import Optics
from cryosvi.errors import CryosviError
from cryosvi.io.atomic import write_atomically

OPTICS_COLUMNS = {
    "rlnVoltage": "voltage", "rlnSphericalAberration": "spherical_aberration",
    "rlnAmplitudeContrast": "amplitude_contrast", "rlnImagePixelSize": "pixel_size",
    "rlnImageSize": "box",
}

# The end of a loop body: the next line that starts a block, a loop or a label.
_BODY_END = re.compile(rb"\n[ \t]*(?:data_|loop_|_)")


@dataclass
class StarBlock:
    """One table of a STAR file: its rows, and the file line of each row (1-based).

    A block from ``scan_star`` holds the rows of a key-value block, but of a loop only
    its ``labels`` (``table`` is None) and where its rows are: ``body`` (first byte, end
    byte, first line) in the file, read a piece at a time by ``loop_pieces`` (``load``:
    all of them)."""

    name: str
    table: pd.DataFrame | None
    lines: np.ndarray
    labels: list[str] = field(default_factory=list)
    body: tuple[int, int, int] | None = None
    path: Path | None = None

    @property
    def has_rows(self) -> bool:
        return (self.body is not None and self.body[1] > self.body[0]) or (
            self.table is not None and len(self.table) > 0)

    def load(self) -> "StarBlock":
        """This block with every row parsed (itself when they are)."""
        if self.table is not None:
            return self
        parts = [p for p in loop_pieces(self) if len(p.table)]
        if not parts:
            return replace(self, table=pd.DataFrame(columns=self.labels),
                           lines=np.zeros(0, int))
        table = pd.concat([p.table for p in parts], ignore_index=True) if len(parts) > 1 \
            else parts[0].table
        return replace(self, table=table, lines=np.concatenate([p.lines for p in parts]))


def read_star_blocks(path: Path) -> dict[str, StarBlock]:
    """Every block of the STAR file ``path``, by name (``data_optics`` -> 'optics'), with
    every row parsed.

    Raises CryosviError naming the line for a truncated or malformed file.
    """
    return {name: block.load() for name, block in scan_star(path).items()}


def scan_star(path: Path) -> dict[str, StarBlock]:
    """Every block of the STAR file ``path``, by name, the rows of loops left in the
    file (``StarBlock.body``): one pass over the file, memory a block of lines at a
    time however long the loops are. Raises CryosviError naming the line for a
    malformed header; the rows are checked when they are read."""
    path = Path(path)
    blocks: dict[str, StarBlock] = {}
    name = None
    labels: list[str] = []
    pairs: dict[str, str] = {}
    pair_lines: list[int] = []
    in_loop = False

    def close_pairs():
        if name is not None and pairs and not in_loop:
            frame = _typed(pd.DataFrame({k: [v] for k, v in pairs.items()}))
            blocks[name] = StarBlock(name, frame, np.asarray(pair_lines[:1]), list(pairs),
                                     path=path)

    with open(path, "rb") as handle:
        if b"\x00" in handle.read(4096):
            raise CryosviError(f"{path} is neither a STAR file nor a cryoSPARC .cs file "
                               "(binary data)")
        handle.seek(0)
        position, line_number = 0, 1
        while True:
            raw = handle.readline()
            if not raw:
                break
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise CryosviError(f"{path}, line {line_number}: not UTF-8 text") from None
            if not line or line.startswith("#"):
                pass
            elif line.startswith("data_"):
                close_pairs()
                name, labels, pairs, pair_lines, in_loop = line[5:], [], {}, [], False
                if name in blocks:
                    raise CryosviError(f"{path}, line {line_number}: a second block "
                                       f"data_{name}")
            elif name is None:
                raise CryosviError(f"{path}, line {line_number}: expected a 'data_' block, "
                                   f"found {line[:40]!r}")
            elif line == "loop_" or line.startswith("loop_ "):
                if labels or pairs:
                    raise CryosviError(f"{path}, line {line_number}: a second table in "
                                       f"block data_{name}")
                in_loop = True
            elif line.startswith("_"):
                words = line.split()
                label = words[0][1:]
                if not label:
                    raise CryosviError(f"{path}, line {line_number}: empty label")
                if in_loop:
                    if label in labels:
                        raise CryosviError(f"{path}, line {line_number}: label _{label} "
                                           "twice")
                    labels.append(label)
                else:
                    if len(words) < 2 or words[1].startswith("#"):
                        raise CryosviError(f"{path}, line {line_number}: label _{label} "
                                           "has no value")
                    pairs[label] = words[1]
                    pair_lines.append(line_number)
            elif in_loop and labels:
                # The rows: every line up to the next block, loop or label line.
                end, lines = _body_end(handle, position)
                blocks[name] = StarBlock(name, None, np.zeros(0, int), labels,
                                         (position, end, line_number), path)
                handle.seek(end)
                position, line_number = end, line_number + lines
                name, labels, in_loop = None, [], False
                continue
            else:
                raise CryosviError(f"{path}, line {line_number}: unexpected {line[:40]!r} "
                                   f"in block data_{name}")
            position += len(raw)
            line_number += 1
    if in_loop and name is not None:
        if not labels:
            raise CryosviError(f"{path}: the file ends inside the labels of block data_{name}")
        blocks[name] = StarBlock(name, pd.DataFrame(columns=labels), np.zeros(0, int),
                                 labels, path=path)
    close_pairs()
    return blocks


LOOP_BLOCK_BYTES = 1 << 23
"""The rows of a loop are read and parsed this many bytes (whole lines) at a time, so
that neither the file's text nor the parser's temporaries grow with the file."""


def _whole_lines(handle, start: int, stop: int | None) -> bytes:
    """The bytes from ``start``: LOOP_BLOCK_BYTES, cut after their last newline (all of
    them at ``stop`` or the end of the file, or when one line is longer)."""
    handle.seek(start)
    limit = LOOP_BLOCK_BYTES if stop is None else min(LOOP_BLOCK_BYTES, stop - start)
    data = handle.read(limit)
    if len(data) < limit or (stop is not None and start + len(data) >= stop):
        return data
    cut = data.rfind(b"\n")
    if cut >= 0:
        return data[:cut + 1]
    return data + handle.readline()  # one line longer than a block


def _body_end(handle, start: int) -> tuple[int, int]:
    """(end byte, lines) of the loop body from ``start``: up to the next line that
    starts a block, a loop or a label (``_BODY_END``), or the end of the file."""
    position, lines = start, 0
    while True:
        data = _whole_lines(handle, position, None)
        if not data:
            return position, lines
        # from the newline before ``position`` on, so that a body's own first line
        # is never taken for its end
        match = _BODY_END.search(b"\n" + data)
        if match is not None:
            end = position + match.start()
            return end, lines + data.count(b"\n", 0, match.start())
        position += len(data)
        lines += data.count(b"\n")


def loop_pieces(block: StarBlock, start: int | None = None, stop: int | None = None,
                first_line: int | None = None):
    """The rows of the loop ``block`` (from ``scan_star``) as StarBlocks of whole lines,
    LOOP_BLOCK_BYTES of text at a time, each with ``body`` its own (first byte, end
    byte, first line); ``start``, ``stop``, ``first_line``: a piece of an earlier pass
    (default: the whole body). Every non-blank line must hold exactly one value per
    label."""
    if block.body is None:
        yield block.load() if block.table is None else block
        return
    body_start, body_stop, body_line = block.body
    start = body_start if start is None else start
    stop = body_stop if stop is None else stop
    line = body_line if first_line is None else first_line
    with open(block.path, "rb") as handle:
        while start < stop:
            data = _whole_lines(handle, start, stop)
            piece = _read_rows(block.path, block.name, block.labels, data, line)
            piece.body = (start, start + len(data), line)
            yield piece
            line += data.count(b"\n")
            start += len(data)


def _read_rows(path: Path, name: str, labels: list[str], body: bytes,
               first_line: int) -> StarBlock:
    """The rows of one loop in ``body``, whole lines, the first being file line
    ``first_line``: every non-blank line must hold exactly len(labels) values."""
    counts, starts = _tokens_per_line(body)
    comment = np.frombuffer(body, np.uint8)[starts[counts > 0]] == ord("#") \
        if len(body) else np.zeros(0, bool)
    rows = np.flatnonzero(counts > 0)
    if comment.any():  # rare: comment lines between rows
        keep = rows[~comment]
        lines = body.split(b"\n")
        body = b"\n".join(lines[i] for i in keep)
        rows = keep
        counts_rows = counts[keep]
    else:
        counts_rows = counts[rows]
    bad = np.flatnonzero(counts_rows != len(labels))
    if bad.size:
        line = first_line + int(rows[bad[0]])
        what = "cut short" if counts_rows[bad[0]] < len(labels) else "too long"
        raise CryosviError(f"{path}, line {line}: row {what}: {counts_rows[bad[0]]} values "
                           f"for the {len(labels)} labels of data_{name} (truncated or "
                           "damaged file)")
    if rows.size == 0:
        return StarBlock(name, pd.DataFrame(columns=labels), np.zeros(0, int), labels,
                         path=path)
    try:
        table = pd.read_csv(io.BytesIO(body), sep=r"\s+", header=None, names=labels,
                            engine="c", quoting=csv.QUOTE_NONE, skip_blank_lines=True,
                            low_memory=False,
                            keep_default_na=False, na_values=["nan", "NaN", "NAN", "<NA>"])
    except (ValueError, pd.errors.ParserError) as error:
        raise CryosviError(f"{path}: cannot parse the rows of data_{name}: "
                           f"{str(error).splitlines()[0]}") from None
    if len(table) != rows.size:
        raise CryosviError(f"{path}: data_{name} has {rows.size} rows but {len(table)} were "
                           "parsed (quoted values with spaces are not supported)")
    return StarBlock(name, table, first_line + rows, labels, path=path)


def _tokens_per_line(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(number of whitespace-separated values on each line, offset of each line's first
    byte) of ``body``, vectorised over its bytes."""
    raw = np.frombuffer(body, np.uint8)
    if raw.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    newline = np.flatnonzero(raw == 10)
    line_starts = np.concatenate([[0], newline + 1])
    line_starts = line_starts[line_starts < raw.size]
    space = raw <= 32
    token_start = ~space
    token_start[1:] &= space[:-1]
    positions = np.flatnonzero(token_start)
    bounds = np.searchsorted(positions, np.append(line_starts, raw.size))
    counts = np.diff(bounds)
    # The first value of each line (to spot comment lines): its offset.
    first = line_starts.copy()
    has = counts > 0
    first[has] = positions[bounds[:-1][has]]
    return counts, first


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers as numbers in a table of strings (key-value blocks)."""
    for column in frame.columns:
        converted = pd.to_numeric(frame[column], errors="coerce")
        if converted.notna().all():
            frame[column] = converted
    return frame


WRITE_ROWS = 1 << 15
"""Particle rows formatted at a time."""


def write_star(path: str | Path, particles: pd.DataFrame, optics: pd.DataFrame,
               columns: list[str] | None = None) -> None:
    """Write ``data_optics`` + ``data_particles`` (RELION 3.1 layout; the particles'
    ``columns``, default all) to ``path`` atomically (``write_star_pieces``)."""
    columns = list(particles.columns) if columns is None else list(columns)
    write_star_pieces(path, (particles.iloc[start:start + WRITE_ROWS] for start in
                             range(0, max(len(particles), 1), WRITE_ROWS)), optics, columns)


def write_star_pieces(path: str | Path, pieces, optics: pd.DataFrame,
                      columns: list[str]) -> None:
    """Write ``data_optics`` + ``data_particles`` (RELION 3.1 layout) to ``path``
    atomically, the particle rows given as tables of consecutive rows (``pieces``, an
    iterable: each formatted when it comes, so the rows need never be in memory at
    once) with the ``columns``: what ``starfile.write`` writes of the rows as one
    table, formatted WRITE_ROWS rows at a time (starfile formats a whole table at once,
    through a Python object per value: gigabytes for 10^6 particles)."""
    from starfile.writer import StarWriter, loop_block

    columns = list(columns)
    head = len(columns) + 3  # data_particles, '', loop_, the labels

    def write(temporary: Path) -> None:
        with open(temporary, "w") as handle:
            for line in StarWriter({"optics": optics}).lines():
                handle.write(line + "\n")
            labels = None
            for piece in pieces:
                if labels is None:
                    labels = list(loop_block("particles", piece.iloc[:0][columns]))[:head]
                    handle.write("".join(line + "\n" for line in labels))
                for start in range(0, len(piece), WRITE_ROWS):
                    block = piece.iloc[start:start + WRITE_ROWS][columns]
                    for line in list(loop_block("particles", block))[head:-2]:
                        handle.write(line + "\n")
            if labels is None:
                raise ValueError("write_star_pieces needs at least one piece (it gives "
                                 "the columns' types)")
            handle.write("\n\n")

    write_atomically(path, write)


def optics_table(optics: Optics) -> pd.DataFrame:
    """One RELION optics group from :class:`Optics`."""
    return pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnVoltage": [optics.voltage], "rlnSphericalAberration": [optics.spherical_aberration],
        "rlnAmplitudeContrast": [optics.amplitude_contrast],
        "rlnImagePixelSize": [optics.pixel_size], "rlnImageSize": [optics.box],
        "rlnImageDimensionality": [2],
    })
