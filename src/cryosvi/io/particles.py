"""One data layer for particle files: ``read_particles(path) -> ParticleSet``.

Whatever the source (RELION 3.1/4/5 STAR, RELION 3.0 and older single-table STAR,
cryoSPARC ``.cs``), the metadata comes out in RELION 3.1 terms, one row per particle:
``rlnImageName``, ``rlnOpticsGroup``, ``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm),
``rlnAmplitudeContrast``, ``rlnImagePixelSize`` (Å), ``rlnImageSize`` (px),
``rlnDefocusU/V`` (Å), ``rlnDefocusAngle`` (deg), ``rlnPhaseShift`` (deg),
``rlnCtfBfactor`` (Å^2), ``rlnOriginXAngst/YAngst`` (Å), ``rlnAngleRot/Tilt/Psi`` (deg)
when the source has poses, and every other source column as it is
(``cryosvi.io.relion``). ``optics`` has one row per optics group. Images are read
lazily from the stacks, in the file's own box; the metadata never needs the stacks.

Memory does not grow with a STAR file beyond a few numbers per particle: the file is
read a piece of its rows at a time (``cryosvi.io.star.loop_pieces``), each piece
checked and converted, and what is kept of it is each particle's image (stack and
index), optics group and known numeric columns (``ParticleSet.column``). The whole
table (``ParticleSet.metadata``, strings included) is read again from the file when a
caller asks for it, and ``ParticleSet.pieces`` gives it a piece at a time (what
``write_particles`` streams).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from cryosvi.errors import CryosviError, CryosviWarning  # noqa: F401 (re-exported)
from cryosvi.io.mrc import Stack, open_stack
from cryosvi.io.relion import (ANGLES, ORIGINS, is_numeric, per_row_optics,
                               relion30_rows, relion31_rows, warn)
from cryosvi.io.rows import ImageNames, StarRows

MODE_COLUMN = "cryosviModeAmplitude{}"
DATADIR_HINT = "give --datadir DIR with the folder that holds the stacks"


@dataclass(eq=False)
class ParticleSet:
    """Particles of one metadata file.

    metadata: one row per particle (RELION 3.1 terms, see the module doc; of a STAR file
    read again from the file on first use, see ``column`` for what is at hand without);
    optics: one row per optics group; path: the metadata file; source: 'relion3.1',
    'relion3.0' or 'cryosparc'; output_columns: the particle columns a written STAR keeps
    (the source's, in RELION 3.1 terms, in their order); cs: the source ``.cs`` array.
    """

    metadata: pd.DataFrame = field(repr=False)
    optics: pd.DataFrame
    path: Path
    source: str
    output_columns: list[str]
    datadir: Path | None = None
    invert: bool = False
    cs: np.ndarray | None = None
    _stacks: dict = field(default_factory=dict, repr=False)
    _names: tuple | None = field(default=None, repr=False)
    _rows: StarRows | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.__dict__.get("_frame") is not None:
            self._rows = None  # a table given (e.g. a subset) is the set's own
        elif self._rows is None:
            raise ValueError("a ParticleSet needs its metadata or the rows of a file")

    def __len__(self) -> int:
        frame = self.__dict__.get("_frame")
        return len(frame) if frame is not None else self._rows.count

    def subset(self, rows, metadata: pd.DataFrame | None = None,
               cs: np.ndarray | None = None) -> "ParticleSet":
        """The particles ``rows`` (indices) as a set of their own, in memory: their rows
        of ``metadata`` (default: this set's table) and of ``cs`` (default: this set's
        .cs array), the optics and source as they are."""
        frame = (self.metadata if metadata is None else metadata).iloc[rows]
        cs = self.cs if cs is None else cs
        return replace(self, metadata=frame.reset_index(drop=True),
                       cs=None if cs is None else cs[rows], _stacks={}, _names=None)

    # ------------------------------------------------------------------- columns
    @property
    def columns(self) -> list[str]:
        """The metadata's columns, in order."""
        frame = self.__dict__.get("_frame")
        return list(frame.columns) if frame is not None else list(self._rows.columns)

    def column(self, name: str, rows=None) -> np.ndarray:
        """(N,) one metadata column, or (k,) its values at ``rows`` (indices). Without
        the whole table at hand: the optics columns from each particle's group, the
        known numeric ones (``relion.is_numeric``) as kept when the file was read;
        any other (strings, e.g. rlnImageName) read from the file, a piece at a time.
        KeyError if absent."""
        frame = self.__dict__.get("_frame")
        if frame is not None:
            values = frame[name].to_numpy()
        else:
            values = self._rows.column(name, self.optics, self.path, rows)
            rows = None
        return values if rows is None else values[np.asarray(rows, dtype=np.int64)]

    def numbers(self, rows) -> pd.DataFrame:
        """The numeric columns at hand without the whole table (``column``) of the
        particles ``rows`` (indices), e.g. the input values a posterior summary keeps."""
        rows = np.asarray(rows, dtype=np.int64)
        frame = self.__dict__.get("_frame")
        if frame is not None:
            names = [c for c in frame.columns if frame[c].dtype.kind in "biuf"
                     and is_numeric(c)]
        else:
            names = [c for c in self._rows.columns if self._rows.at_hand(c)]
        return pd.DataFrame({c: self.column(c, rows) for c in names})

    def pieces(self) -> Iterator[pd.DataFrame]:
        """The metadata a piece of rows at a time (each indexed by the rows' numbers):
        slices of the table when it is at hand, else read from the file."""
        frame = self.__dict__.get("_frame")
        if frame is None:
            yield from self._rows.frames(self.optics, self.path)
            return
        for start in range(0, len(frame), WRITE_ROWS):
            yield frame.iloc[start:start + WRITE_ROWS]

    def forget(self) -> None:
        """Let go of the whole table when the file can give it again (``metadata``
        reads it anew on the next use)."""
        if self._rows is not None:
            self.__dict__["_frame"] = None

    def require(self, *columns: str) -> None:
        present = set(self.columns)
        missing = [c for c in columns if c not in present]
        if missing:
            raise CryosviError(f"{self.path}: missing STAR column(s) {', '.join(missing)}")

    def mode_columns(self) -> list[str]:
        return mode_columns(self.columns)

    def has(self, *columns: str) -> bool:
        present = set(self.columns)
        return all(c in present for c in columns)

    @property
    def has_poses(self) -> bool:
        return self.has(*ANGLES)

    @property
    def has_shifts(self) -> bool:
        """Whether the source gives in-plane shifts that are not all zero."""
        return self.has(*ORIGINS) and any(
            bool((self.column(c).astype(float) != 0).any()) for c in ORIGINS)

    # ------------------------------------------------------------------- stacks
    def _image_names(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(0-based index, stack id, stack names) of every row, parsed once."""
        if self._names is None:
            self.require("rlnImageName")
            names = ImageNames(self.path)
            names.add(self.column("rlnImageName"))
            self._names = names.result()
        return self._names

    def stack_names(self) -> list[str]:
        """The distinct stack files the rows name, as written in the metadata."""
        return list(self._image_names()[2])

    def resolve(self, name: str) -> Path | None:
        """Where the stack ``name`` is: the name itself when absolute, else under
        ``datadir`` (as written, then its file name alone) or the metadata file's
        folder; None if nowhere."""
        written = Path(name)
        if written.is_absolute():
            candidates = [written]
        else:
            candidates = []
            if self.datadir is not None:
                candidates += [self.datadir / written, self.datadir / written.name]
            candidates.append(self.path.parent / written)
        if self.datadir is not None and written.is_absolute():
            candidates.append(self.datadir / written.name)
        return next((c for c in candidates if c.is_file()), None)

    def stack(self, k: int) -> Stack:
        """The stack of id ``k``, opened and checked against the rows that use it."""
        if k in self._stacks:
            return self._stacks[k]
        index, codes, names = self._image_names()
        rows = np.flatnonzero(codes == k)
        where = self.resolve(names[k])
        if where is None:
            looked = [str(self.path.parent)] + ([str(self.datadir)] if self.datadir else [])
            raise CryosviError(f"particle stack {names[k]} (particle {rows[0] + 1} of "
                               f"{self.path.name}) not found in {' or '.join(looked)}; "
                               f"{DATADIR_HINT}")
        stack = open_stack(where)
        largest = int(index[rows].max())
        if stack.count != 1 and (index[rows] < 0).any():
            row = rows[int(np.argmin(index[rows]))]
            raise CryosviError(f"particle {row + 1} of {self.path.name} names {names[k]} "
                               f"without an image number, but it holds {stack.count} "
                               f"images; write NNNNNN@{names[k]}")
        if largest >= stack.count:
            row = rows[int(np.argmax(index[rows]))]
            raise CryosviError(f"{where} has {stack.count} image(s) but particle {row + 1} "
                               f"of {self.path.name} asks for image {largest + 1}")
        if self.has("rlnImageSize"):
            sizes = self.column("rlnImageSize", rows)
            wrong = np.flatnonzero(sizes != stack.box)
            if wrong.size:
                row = rows[wrong[0]]
                group = self.column("rlnOpticsGroup", [row])[0]
                raise CryosviError(f"{where} holds {stack.box} px images but optics group "
                                   f"{group} says {int(sizes[wrong[0]])} px "
                                   f"(particle {row + 1})")
        pixel = self.column("rlnImagePixelSize", rows).astype(float)
        if stack.pixel_size > 0 and np.any(np.abs(stack.pixel_size - pixel) > 0.01 * pixel):
            warn(f"{where.name}: the MRC header's pixel size {stack.pixel_size:.4g} Å "
                 f"differs from the metadata's {pixel[0]:.4g} Å; using the metadata's")
        self._stacks[k] = stack
        return stack

    def check_stacks(self) -> list[str]:
        """Open every stack; the names of those that are missing (other problems raise)."""
        missing = []
        for k, name in enumerate(self.stack_names()):
            if self.resolve(name) is None:
                missing.append(name)
            else:
                self.stack(k)
        return missing

    def ensure_image_size(self) -> None:
        """Fill rlnImageSize (metadata and optics) from the stacks where the source has
        none (RELION 3.0 files may lack it)."""
        if self.has("rlnImageSize"):
            return
        _, codes, _ = self._image_names()
        groups = self.column("rlnOpticsGroup")
        labels, first = np.unique(groups, return_index=True)
        sizes = {group: self.stack(int(codes[row])).box for group, row in zip(labels, first)}
        self.optics["rlnImageSize"] = self.optics["rlnOpticsGroup"].map(sizes).astype(np.int64)
        frame = self.__dict__.get("_frame")
        if frame is not None:
            frame["rlnImageSize"] = pd.Series(groups).map(sizes).to_numpy(np.int64)
        if self._rows is not None:
            self._rows.add_optics_column("rlnImageSize", np.dtype(np.int64))
        self._stacks.clear()  # re-opened with the size check

    def images(self, indices) -> np.ndarray:
        """float32 (k, L, L) images of the rows ``indices`` (in that order), read from
        the stacks; multiplied by -1 when ``invert``."""
        self.ensure_image_size()
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        index, codes, _ = self._image_names()
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"particle index out of range 0..{len(self) - 1}")
        sizes = self.column("rlnImageSize", indices)
        if np.unique(sizes).size > 1:
            raise CryosviError(f"{self.path}: the particles asked for have different image "
                               f"sizes ({', '.join(map(str, np.unique(sizes)))} px)")
        box = int(sizes[0]) if sizes.size else 0
        out = np.empty((indices.size, box, box), dtype=np.float32)
        chosen = codes[indices]
        for k in np.unique(chosen):
            where = np.flatnonzero(chosen == k)
            part = out[where] if where.size < indices.size else out
            self.stack(int(k)).read(np.maximum(index[indices[where]], 0), part)
            if part is not out:
                out[where] = part
        bad = ~np.isfinite(out).all(axis=(1, 2))
        if bad.any():
            row = int(indices[np.flatnonzero(bad)[0]])
            name = self.column("rlnImageName", [row])[0]
            raise CryosviError(f"particle {row + 1} contains NaN or Inf pixels ({name})")
        if self.invert:
            np.negative(out, out=out)
        return out

    def close(self) -> None:
        self._stacks.clear()


def _metadata(self: ParticleSet) -> pd.DataFrame:
    frame = self.__dict__.get("_frame")
    if frame is None:
        frame = self._rows.table(self.optics, self.path)
        self.__dict__["_frame"] = frame
    return frame


def _set_metadata(self: ParticleSet, frame: pd.DataFrame | None) -> None:
    self.__dict__["_frame"] = frame


# After the dataclass is made: its __init__ (and dataclasses.replace) set the table
# through the property.
ParticleSet.metadata = property(_metadata, _set_metadata)


# --------------------------------------------------------------------------- reading
def read_particles(path: str | Path, datadir: str | Path | None = None,
                   invert: bool = False) -> ParticleSet:
    """Read the particle metadata of ``path`` (RELION STAR of any version, or a
    cryoSPARC ``.cs``). Stacks are looked up relative to ``datadir`` (when given) or
    the file's folder, and opened only when images are asked for. ``invert``: images
    come out multiplied by -1."""
    from cryosvi.io import star

    path = Path(path)
    if not path.is_file():
        raise CryosviError(f"particle file not found: {path}" if not path.exists()
                           else f"{path} is not a file")
    if datadir is not None:
        datadir = Path(datadir)
        if not datadir.is_dir():
            raise CryosviError(f"--datadir {datadir} is not a directory")
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"\x93NUMPY") or path.suffix == ".cs":
        from cryosvi.io import cryosparc  # torch and roma, for the poses

        frame, array, columns = cryosparc.read_cs(path)
        rows = per_row_optics(frame, path, columns, lambda i: f"particle {i + 1}")
        particles = ParticleSet(rows.frame, rows.optics, path, "cryosparc", rows.columns,
                                cs=array)
    elif b"data_" in head or path.suffix == ".star":
        particles = _from_star(star.scan_star(path), path)
    else:
        raise CryosviError(f"{path} is neither a STAR file nor a cryoSPARC .cs file")
    particles.datadir, particles.invert = datadir, invert
    return particles


def _from_star(blocks: dict, path: Path) -> ParticleSet:
    """RELION 3.1+ (optics + particles blocks) or 3.0 (one table) in RELION 3.1 terms,
    the particle rows read a piece at a time (``StarRows``)."""
    if "particles" in blocks and "optics" in blocks:
        block = blocks["particles"]
        others = {name: b.load() for name, b in blocks.items() if name != "particles"}
        if not block.has_rows:
            raise CryosviError(f"{path}: the data_particles block has no particles")
        optics = others["optics"]
        return _lazy(StarRows.read(block, lambda piece, notes: relion31_rows(
            piece, optics, path, notes), path, "relion3.1"), path, "relion3.1")
    tables = [b for b in blocks.values() if b.labels and "rlnImageName" in b.labels]
    tables = tables or [b for b in blocks.values() if b.has_rows and b.name != "optics"]
    if not tables:
        raise CryosviError(f"{path}: no table of particles (no data_particles block, no "
                           "table with rlnImageName)")
    block = tables[0]
    for name, other in blocks.items():  # checked as the whole file always was
        if other is not block:
            other.load()
    if not block.has_rows:
        raise CryosviError(f"{path}: the data_{block.name} block has no particles")
    return _lazy(StarRows.read(block, lambda piece, notes: relion30_rows(piece, path, notes),
                               path, "relion3.0"), path, "relion3.0")


def _lazy(read: tuple, path: Path, source: str) -> ParticleSet:
    """The ParticleSet of ``StarRows.read``'s (rows, optics, columns, image names)."""
    rows, optics, columns, names = read
    return ParticleSet(None, optics, path, source, columns, _names=names, _rows=rows)


def mode_columns(frame) -> list[str]:
    """``cryosviModeAmplitude1..K`` present in ``frame`` (a table or column names), in
    order."""
    present = set(frame.columns if hasattr(frame, "columns") else frame)
    columns, k = [], 1
    while MODE_COLUMN.format(k) in present:
        columns.append(MODE_COLUMN.format(k))
        k += 1
    return columns


def numeric_column(table: ParticleSet, column: str) -> np.ndarray:
    """One numeric, finite (N,) column, or a CryosviError naming file and column."""
    values = pd.to_numeric(pd.Series(table.column(column)), errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CryosviError(f"{table.path}: column {column} has {int(bad.sum())} non-numeric "
                           f"or non-finite value(s) (first at particle {row + 1})")
    return values


def origins(table: ParticleSet, rows=None) -> np.ndarray:
    """(k, 2) float32 Å: RELION's (rlnOriginXAngst, rlnOriginYAngst) of the particles
    ``rows`` (indices; None = all; 0 where the file has none). The forward model
    translates the centred projection by -origin (``cryosvi.physics.shifts``), as
    relion_project does."""
    values = np.stack([table.column(c).astype(np.float32) for c in ORIGINS], -1)
    return np.ascontiguousarray(values if rows is None else values[np.asarray(rows)])


def mean_defocus(table: ParticleSet) -> np.ndarray:
    """(N,) float64 Å: each particle's mean defocus (U + V) / 2 (U alone without
    rlnDefocusV)."""
    u = numeric_column(table, "rlnDefocusU")
    if not table.has("rlnDefocusV"):
        return u
    return (u + numeric_column(table, "rlnDefocusV")) / 2


# --------------------------------------------------------------------------- writing
WRITE_ROWS = 1 << 15
"""Rows of a table held whole written at a time."""


def write_particles(path: str | Path, particles: ParticleSet,
                    frame: pd.DataFrame | None = None, added: list[str] = (),
                    values: Callable[[int, int], dict] | None = None,
                    keep: np.ndarray | None = None) -> list[Path]:
    """Write the metadata of ``particles`` with some columns updated as a RELION 3.1
    STAR file: the source's optics table, its particle columns in their order (RELION
    3.1 terms) and row order, then the ``added`` columns. The rows: ``frame`` (the
    metadata with the columns updated, held whole), or the source's rows a piece at a
    time (``ParticleSet.pieces``) with ``values(start, stop)`` -> {column: (stop -
    start,) values} of the rows start..stop-1 set, those of ``keep`` (N,) bool alone
    (None: all). From a cryoSPARC source, also a ``.cs`` beside it (same stem) with the
    fields updated. Returns the paths written."""
    from cryosvi.io.star import write_star_pieces

    path = Path(path)
    particles.ensure_image_size()
    columns = [*particles.output_columns,
               *(c for c in added if c not in particles.output_columns)]

    def updated(piece: pd.DataFrame) -> pd.DataFrame:
        start, stop = piece.index[0], piece.index[-1] + 1
        piece = piece.copy()
        for name, value in values(start, stop).items():
            piece[name] = value
        return piece if keep is None else piece[keep[start:stop]]

    if frame is None:
        pieces = (updated(piece) for piece in particles.pieces())
    else:
        pieces = (frame.iloc[start:start + WRITE_ROWS]
                  for start in range(0, max(len(frame), 1), WRITE_ROWS))
    write_star_pieces(path, pieces, particles.optics, columns)
    written = [path]
    if particles.cs is not None:
        from cryosvi.io.cryosparc import write_cs

        cs = particles.cs
        if frame is None:  # a .cs is held whole: so is its table
            frame = updated(particles.metadata)
            cs = cs if keep is None else cs[keep]
        target = path.with_suffix(".cs")
        write_cs(target, cs, frame)
        written.append(target)
    return written
