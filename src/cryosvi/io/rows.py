"""The particle rows of a long STAR loop, read a piece at a time: what
``cryosvi.io.read_particles`` keeps of each particle (its image, optics group and
known numeric columns), and the rows again, a piece at a time, when they are asked for.

The rows are not held: each piece (``cryosvi.io.star.loop_pieces``: LOOP_BLOCK_BYTES of
whole lines) is checked and converted to RELION 3.1 terms (``cryosvi.io.relion``) when
the file is read, and converted again, to the same table, when it is read again
(``StarRows.frames``), with each column's type over the whole file, so that a piece
written comes out as it would from the whole table.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from cryosvi.errors import CryosviError
from cryosvi.io.mrc import parse_image_names
from cryosvi.io.relion import (DEFAULTS, OPTICS_VALUES, ORIGINS, PIXEL_ORIGINS,
                               is_numeric, optics_of, warn_origins)

NAME_BLOCK = 1 << 16
"""Image names parsed at a time."""


class ImageNames:
    """(0-based index, stack id, stack names) of rlnImageName values added a block at
    a time (string operations on 10^6 names at once would hold several hundred bytes
    per particle)."""

    def __init__(self, path: Path):
        self.path, self.parts, self.known = path, [], {}

    def add(self, column) -> None:
        column = np.asarray(column, dtype=object)
        for start in range(0, len(column), NAME_BLOCK):
            try:
                index, files = parse_image_names(column[start:start + NAME_BLOCK])
            except CryosviError as error:
                raise CryosviError(f"{self.path}: {error}") from None
            block_codes, names = pd.factorize(files)
            ids = np.array([self.known.setdefault(str(n), len(self.known)) for n in names],
                           dtype=np.int64)
            # 4 bytes each: a stack of 2^31 images would be 8 TB at the smallest box
            self.parts.append((index.astype(np.int32 if index.max(initial=0) < 2**31
                                            else np.int64), ids[block_codes].astype(np.int32)))

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index (N,), stack id (N,), stack names) of every name added."""
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, str)
        return (np.concatenate([p[0] for p in self.parts]),
                np.concatenate([p[1] for p in self.parts]),
                np.asarray(list(self.known), dtype=str))


@dataclass
class StarRows:
    """The particle rows of a STAR loop left in the file, with what was kept of them.

    block: the loop (``cryosvi.io.star.scan_star``); convert(piece, notes) -> ``Rows``:
    a piece in RELION 3.1 terms; pieces: (first byte, end byte, first line, first row)
    of each piece; columns, dtypes: the table's (over every piece); kept: the numeric
    columns (N,) held; constant: columns with one value; derived: the columns each
    particle takes from its optics group (``group`` (N,): its row of the optics
    table); regroup: the groups are cryosvi's own (RELION 3.0: one per distinct set of
    optics values, numbered over the whole file)."""

    block: object
    convert: Callable
    pieces: list[tuple[int, int, int, int]]
    columns: list[str]
    dtypes: dict
    kept: dict[str, np.ndarray]
    constant: dict
    derived: set
    group: np.ndarray
    regroup: bool

    @property
    def count(self) -> int:
        return len(self.group)

    def at_hand(self, name: str) -> bool:
        return name in self.kept or name in self.constant or name in self.derived

    def column(self, name: str, optics: pd.DataFrame, path: Path,
               rows=None) -> np.ndarray:
        """``ParticleSet.column`` of a set read from a file."""
        rows = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
        if name in self.kept:
            return self.kept[name][rows]
        if name in self.constant:
            return np.full(len(self.group[rows]), self.constant[name])
        if name in self.derived:
            return optics[name].to_numpy()[self.group[rows]]
        if name not in self.columns:
            raise KeyError(name)
        return np.concatenate([f[name].to_numpy() for f in self.frames(optics, path)])[rows]

    def add_optics_column(self, name: str, dtype) -> None:
        self.columns.append(name)
        self.derived.add(name)
        self.dtypes[name] = dtype

    def frames(self, optics: pd.DataFrame, path: Path) -> Iterator[pd.DataFrame]:
        """Each piece's rows as the whole table holds them (indexed by row number)."""
        from cryosvi.io.star import loop_pieces

        for start, stop, line, first in self.pieces:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # said when the file was read
                parts = [self.convert(piece, {}).frame for piece in
                         loop_pieces(self.block, start, stop, line) if len(piece.table)]
            frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
            group = self.group[first:first + len(frame)]
            for name in self.columns:
                if name not in frame or (self.regroup and name == "rlnOpticsGroup"):
                    frame[name] = optics[name].to_numpy()[group]
                if frame[name].dtype != self.dtypes[name]:
                    frame[name] = frame[name].astype(self.dtypes[name])
            frame = frame[self.columns]
            frame.index = pd.RangeIndex(first, first + len(frame))
            yield frame

    def table(self, optics: pd.DataFrame, path: Path) -> pd.DataFrame:
        return pd.concat(list(self.frames(optics, path)), ignore_index=True)

    @classmethod
    def read(cls, block, convert: Callable, path: Path, source: str) -> tuple:
        """(StarRows, optics table, the columns a written STAR keeps, (image index,
        stack id, stack names) or None) of the loop ``block`` (``source`` 'relion3.1' or
        'relion3.0'): every piece read, checked and converted once (errors name the file
        line), its warnings said once."""
        from cryosvi.io.star import loop_pieces

        notes, said = {}, {}
        pieces, parts, dtypes, groups, optics_parts = [], {}, {}, [], []
        names = ImageNames(path)
        first, rows = 0, None
        for piece in loop_pieces(block):
            if not len(piece.table):
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rows = convert(piece, notes)
            for warning in caught:
                said.setdefault(str(warning.message), warning.category)
            if not pieces:
                head = rows
                derived = {"rlnOpticsGroup", *(c for c in OPTICS_VALUES if c in rows.frame
                                               and (source != "relion3.1"
                                                    or c not in block.labels))}
                pixels = dict(zip(ORIGINS, PIXEL_ORIGINS))  # converted, not filled
                constant = {c: rows.frame[c].iloc[0] for c in (*DEFAULTS, "rlnDefocusAngle")
                            if c in rows.frame and c not in block.labels
                            and pixels.get(c) not in block.labels}
            frame = rows.frame
            pieces.append((*piece.body, first))
            if "rlnImageName" in frame:
                names.add(frame["rlnImageName"].to_numpy())
            if source == "relion3.1":
                groups.append(pd.Index(head.optics["rlnOpticsGroup"].to_numpy()).get_indexer(
                    frame["rlnOpticsGroup"].to_numpy()))
            else:
                groups.append(frame["rlnOpticsGroup"].to_numpy() - 1 + sum(
                    len(o) for o in optics_parts))
                optics_parts.append(rows.optics)
            for name in frame.columns:
                dtype = frame[name].dtype
                known = dtypes.get(name, dtype)
                dtypes[name] = (np.result_type(known, dtype) if known.kind in "biuf"
                                and dtype.kind in "biuf" else known if known == dtype
                                else np.dtype(object))
                if is_numeric(name) and dtype.kind in "biuf" \
                        and name not in derived and name not in constant:
                    parts.setdefault(name, []).append(frame[name].to_numpy())
            first += len(frame)
        if rows is None:
            raise CryosviError(f"{path}: the data_{block.name} block has no particles")
        group = np.concatenate(groups)
        optics = head.optics
        if source != "relion3.1":  # the groups of the whole file
            values = [c for c in OPTICS_VALUES if c in optics]
            unique, inverse = np.unique(
                np.concatenate([o[values].to_numpy(float) for o in optics_parts]), axis=0,
                return_inverse=True)
            optics = optics_of(unique, values)
            group = inverse.reshape(-1)[group]
        for message, category in said.items():
            warnings.warn(message, category, stacklevel=3)
        warn_origins(path, notes)
        kept = {}
        for name in list(parts):
            kept[name] = np.concatenate(parts.pop(name))
        found = cls(block, convert, pieces, list(head.frame.columns), dtypes, kept, constant,
                    derived, group.astype(np.int32),
                    source != "relion3.1")
        names = names.result() if "rlnImageName" in head.frame else None
        return found, optics, head.columns, names
