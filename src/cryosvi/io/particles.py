"""One data layer for particle files: ``read_particles(path) -> ParticleSet``.

Whatever the source (RELION 3.1/4/5 STAR, RELION 3.0 and older single-table STAR,
cryoSPARC ``.cs``), the metadata comes out in RELION 3.1 terms, one row per particle:
``rlnImageName``, ``rlnOpticsGroup``, ``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm),
``rlnAmplitudeContrast``, ``rlnImagePixelSize`` (Å), ``rlnImageSize`` (px),
``rlnDefocusU/V`` (Å), ``rlnDefocusAngle`` (deg), ``rlnPhaseShift`` (deg),
``rlnCtfBfactor`` (Å^2), ``rlnOriginXAngst/YAngst`` (Å), ``rlnAngleRot/Tilt/Psi`` (deg)
when the source has poses, and every other source column as it is. ``optics`` has one
row per optics group. Images are read lazily from memory-mapped stacks, in the file's
own box; the metadata never needs the stacks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryosvi.errors import CryosviError, CryosviWarning
from cryosvi.io.mrc import Stack, open_stack, parse_image_names

OPTICS_VALUES = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                 "rlnImagePixelSize", "rlnImageSize")
"""The optics quantities every row gets from its group."""
PER_ROW_OPTICS = (*OPTICS_VALUES, "rlnMagnification", "rlnDetectorPixelSize")
"""RELION 3.0 per-particle optics columns (moved to the optics table on output)."""
DEFAULTS = {"rlnPhaseShift": 0.0, "rlnCtfBfactor": 0.0, "rlnOriginXAngst": 0.0,
            "rlnOriginYAngst": 0.0}
DEFAULT_AMPLITUDE_CONTRAST = 0.1
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst")
PIXEL_ORIGINS = ("rlnOriginX", "rlnOriginY")
"""RELION 3.0's origins in pixels (read as ``ORIGINS``, Å)."""
NUMERIC = (*PER_ROW_OPTICS, "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV",
           "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor",
           *ORIGINS, *PIXEL_ORIGINS, *ANGLES)
"""Columns that must hold finite numbers (with every ``cryosvi*`` column)."""
MODE_COLUMN = "cryosviModeAmplitude{}"
DATADIR_HINT = "give --datadir DIR with the folder that holds the stacks"
NAME_BLOCK = 1 << 16
"""Image names parsed at a time."""


def warn(message: str) -> None:
    warnings.warn(message, CryosviWarning, stacklevel=3)


@dataclass
class ParticleSet:
    """Particles of one metadata file.

    metadata: one row per particle (RELION 3.1 terms, see the module doc); optics: one
    row per optics group; path: the metadata file; source: 'relion3.1', 'relion3.0' or
    'cryosparc'; output_columns: the particle columns a written STAR keeps (the
    source's, in RELION 3.1 terms, in their order); cs: the source ``.cs`` array.
    """

    metadata: pd.DataFrame
    optics: pd.DataFrame
    path: Path
    source: str
    output_columns: list[str]
    datadir: Path | None = None
    invert: bool = False
    cs: np.ndarray | None = None
    _stacks: dict = field(default_factory=dict, repr=False)
    _names: tuple | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.metadata)

    # ------------------------------------------------------------------- columns
    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.metadata.columns]
        if missing:
            raise CryosviError(f"{self.path}: missing STAR column(s) {', '.join(missing)}")

    def mode_columns(self) -> list[str]:
        return mode_columns(self.metadata)

    def has(self, *columns: str) -> bool:
        return all(c in self.metadata.columns for c in columns)

    @property
    def has_poses(self) -> bool:
        return self.has(*ANGLES)

    @property
    def has_shifts(self) -> bool:
        """Whether the source gives in-plane shifts that are not all zero."""
        return self.has(*ORIGINS) and bool(
            (self.metadata[list(ORIGINS)].to_numpy(float) != 0).any())

    # ------------------------------------------------------------------- stacks
    def _image_names(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(0-based index, stack id, stack names) of every row, parsed once."""
        if self._names is None:
            self.require("rlnImageName")
            column = self.metadata["rlnImageName"].to_numpy()
            index = np.empty(len(column), np.int64)
            codes = np.empty(len(column), np.int64)
            known: dict[str, int] = {}
            # In blocks: string operations on 10^6 names at once would hold several
            # hundred bytes per particle.
            for start in range(0, len(column), NAME_BLOCK):
                part = slice(start, start + NAME_BLOCK)
                try:
                    index[part], files = parse_image_names(column[part])
                except CryosviError as error:
                    raise CryosviError(f"{self.path}: {error}") from None
                block_codes, names = pd.factorize(files)
                ids = np.array([known.setdefault(str(n), len(known)) for n in names],
                               dtype=np.int64)
                codes[part] = ids[block_codes]
            self._names = (index, codes, np.asarray(list(known), dtype=str))
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
        if largest >= stack.count:
            row = rows[int(np.argmax(index[rows]))]
            raise CryosviError(f"{where} has {stack.count} image(s) but particle {row + 1} "
                               f"of {self.path.name} asks for image {largest + 1}")
        if "rlnImageSize" in self.metadata:
            sizes = self.metadata["rlnImageSize"].to_numpy()[rows]
            wrong = np.flatnonzero(sizes != stack.box)
            if wrong.size:
                row = rows[wrong[0]]
                group = self.metadata["rlnOpticsGroup"].iloc[row]
                raise CryosviError(f"{where} holds {stack.box} px images but optics group "
                                   f"{group} says {int(sizes[wrong[0]])} px "
                                   f"(particle {row + 1})")
        pixel = self.metadata["rlnImagePixelSize"].to_numpy(float)[rows]
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
        if "rlnImageSize" in self.metadata:
            return
        _, codes, _ = self._image_names()
        groups = self.metadata["rlnOpticsGroup"].to_numpy()
        labels, first = np.unique(groups, return_index=True)
        sizes = {group: self.stack(int(codes[row])).box for group, row in zip(labels, first)}
        self.metadata["rlnImageSize"] = pd.Series(groups).map(sizes).to_numpy(np.int64)
        self.optics["rlnImageSize"] = self.optics["rlnOpticsGroup"].map(sizes).astype(np.int64)
        self._stacks.clear()  # re-opened with the size check

    def images(self, indices) -> np.ndarray:
        """float32 (k, L, L) images of the rows ``indices`` (in that order), read from
        the memory-mapped stacks; multiplied by -1 when ``invert``."""
        self.ensure_image_size()
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        index, codes, _ = self._image_names()
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"particle index out of range 0..{len(self) - 1}")
        sizes = self.metadata["rlnImageSize"].to_numpy()[indices]
        if np.unique(sizes).size > 1:
            raise CryosviError(f"{self.path}: the particles asked for have different image "
                               f"sizes ({', '.join(map(str, np.unique(sizes)))} px)")
        box = int(sizes[0]) if sizes.size else 0
        out = np.empty((indices.size, box, box), dtype=np.float32)
        chosen = codes[indices]
        for k in np.unique(chosen):
            where = np.flatnonzero(chosen == k)
            part = out[where] if where.size < indices.size else out
            self.stack(int(k)).read(index[indices[where]], part)
            if part is not out:
                out[where] = part
        bad = ~np.isfinite(out).all(axis=(1, 2))
        if bad.any():
            row = int(indices[np.flatnonzero(bad)[0]])
            name = self.metadata["rlnImageName"].iloc[row]
            raise CryosviError(f"particle {row + 1} contains NaN or Inf pixels ({name})")
        if self.invert:
            np.negative(out, out=out)
        return out

    def close(self) -> None:
        self._stacks.clear()


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
        particles = _per_row_optics(frame, path, "cryosparc", columns, lambda i: f"particle {i + 1}")
        particles.cs = array
    elif b"data_" in head or path.suffix == ".star":
        blocks = star.read_star_blocks(path)
        particles = _from_star(blocks, path)
    else:
        raise CryosviError(f"{path} is neither a STAR file nor a cryoSPARC .cs file")
    particles.datadir, particles.invert = datadir, invert
    return particles


def _from_star(blocks: dict, path: Path) -> ParticleSet:
    """RELION 3.1+ (optics + particles blocks) or 3.0 (one table) in RELION 3.1 terms."""
    if "particles" in blocks and "optics" in blocks:
        block, optics = blocks["particles"], blocks["optics"]
        if block.table.empty:
            raise CryosviError(f"{path}: the data_particles block has no particles")
        return _with_optics_table(block, optics, path)
    tables = [b for b in blocks.values() if len(b.table.columns) and "rlnImageName" in b.table]
    tables = tables or [b for b in blocks.values() if len(b.table) and b.name != "optics"]
    if not tables:
        raise CryosviError(f"{path}: no table of particles (no data_particles block, no "
                           "table with rlnImageName)")
    block = tables[0]
    if block.table.empty:
        raise CryosviError(f"{path}: the data_{block.name} block has no particles")
    frame = block.table.copy()
    where = _line_of(block, path)
    _check_numeric(frame, where)
    if "rlnImagePixelSize" not in frame:
        if "rlnDetectorPixelSize" in frame and "rlnMagnification" in frame:
            # RELION 3.0: pixel size (Å) = detector pixel (µm) * 1e4 / magnification.
            frame["rlnImagePixelSize"] = (frame["rlnDetectorPixelSize"].to_numpy(float) * 1e4
                                          / frame["rlnMagnification"].to_numpy(float))
        else:
            raise CryosviError(f"{path}: no pixel size: rlnImagePixelSize, or "
                               "rlnDetectorPixelSize and rlnMagnification, are needed")
    columns = [c for c in block.table.columns if c not in PER_ROW_OPTICS]
    _origins_in_angstrom(frame, columns, path)
    return _per_row_optics(frame, path, "relion3.0", columns, where, checked=True)


def _origins_in_angstrom(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Origins in pixels (``rlnOriginX/Y``: RELION 3.0, and RELION 3.1+ files some
    programs write, e.g. ASPIRE's) as RELION 3.1's Å (``rlnOriginXAngst/YAngst``), in
    place: times each particle's pixel size (``rlnImagePixelSize``, its optics group's;
    RELION 3.0: detector pixel / magnification), as RELION converts them on reading
    (``ObservationModel::loadSafely``). An axis that has both keeps its Å column, with a
    warning. The pixel columns leave ``frame`` and ``columns`` (the columns written
    back), so a written file holds Å origins only."""
    pixel = frame["rlnImagePixelSize"].to_numpy(float)
    both, converted = [], []
    for pixels, angst in zip(PIXEL_ORIGINS, ORIGINS):
        if pixels not in frame:
            continue
        shift = frame.pop(pixels).to_numpy(float) * pixel
        if angst in frame:
            both.append((pixels, angst, float(np.abs(shift - frame[angst]).max())))
            columns.remove(pixels)
        else:
            frame[angst] = shift
            columns[columns.index(pixels)] = angst
            converted.append(pixels)
    if both:
        pairs = ", ".join(f"{pixels} and {angst} (which differ by up to {gap:.3g} Å)"
                          for pixels, angst, gap in both)
        rest = (f"; {', '.join(converted)} converted with each particle's pixel size"
                if converted else "")
        warn(f"{path.name} gives origins both in pixels and in Å: {pairs}; the Å "
             f"column{'s' * (len(both) > 1)} {'are' if len(both) > 1 else 'is'} used"
             f"{rest}")


def _line_of(block, path: Path):
    return lambda row: f"line {int(block.lines[row])}"


def _with_optics_table(block, optics_block, path: Path) -> ParticleSet:
    """RELION 3.1+: every row gets its optics group's values."""
    frame = block.table.copy()
    optics = optics_block.table.copy()
    where = _line_of(block, path)
    _check_numeric(frame, where)
    _check_numeric(optics, _line_of(optics_block, path))
    if optics.empty:
        raise CryosviError(f"{path}: the data_optics block has no optics group")
    if "rlnOpticsGroup" not in optics:
        if len(optics) != 1:
            raise CryosviError(f"{path}: data_optics has {len(optics)} rows but no "
                               "rlnOpticsGroup column")
        optics["rlnOpticsGroup"] = 1
    if optics["rlnOpticsGroup"].duplicated().any():
        raise CryosviError(f"{path}: data_optics lists an optics group twice")
    columns = list(frame.columns)
    if "rlnOpticsGroup" not in frame:
        if len(optics) != 1:
            raise CryosviError(f"{path}: {len(optics)} optics groups but the particles have "
                               "no rlnOpticsGroup column")
        frame["rlnOpticsGroup"] = optics["rlnOpticsGroup"].iloc[0]
        columns.append("rlnOpticsGroup")
    missing = [c for c in ("rlnVoltage", "rlnSphericalAberration", "rlnImagePixelSize")
               if c not in optics and c not in frame]
    if missing:
        raise CryosviError(f"{path}: missing optics column(s) {', '.join(missing)}")
    row_of = pd.Index(optics["rlnOpticsGroup"].to_numpy()).get_indexer(
        frame["rlnOpticsGroup"].to_numpy())
    if (row_of < 0).any():
        bad = int(np.flatnonzero(row_of < 0)[0])
        raise CryosviError(f"{path}, {where(bad)}: optics group "
                           f"{frame['rlnOpticsGroup'].iloc[bad]} is not in data_optics")
    for column in OPTICS_VALUES:
        if column in optics and column not in frame:
            frame[column] = optics[column].to_numpy()[row_of]
    _origins_in_angstrom(frame, columns, path)
    if "rlnAmplitudeContrast" not in optics:
        optics["rlnAmplitudeContrast"] = frame["rlnAmplitudeContrast"].iloc[0] \
            if "rlnAmplitudeContrast" in frame else DEFAULT_AMPLITUDE_CONTRAST
    particles = ParticleSet(frame, optics, path, "relion3.1", columns)
    _finish(particles, where)
    return particles


def _per_row_optics(frame: pd.DataFrame, path: Path, source: str, columns: list[str],
                    where, checked: bool = False) -> ParticleSet:
    """RELION 3.0 and cryoSPARC: one optics group per distinct set of optics values."""
    if not checked:
        _check_numeric(frame, where)
    missing = [c for c in ("rlnVoltage", "rlnSphericalAberration") if c not in frame]
    if missing:
        raise CryosviError(f"{path}: missing optics column(s) {', '.join(missing)}")
    if "rlnAmplitudeContrast" not in frame:
        warn(f"{path.name}: no amplitude contrast given; using "
             f"{DEFAULT_AMPLITUDE_CONTRAST}")
        frame["rlnAmplitudeContrast"] = DEFAULT_AMPLITUDE_CONTRAST
    values = [c for c in OPTICS_VALUES if c in frame]
    table = frame[values].to_numpy(float)
    unique, group = np.unique(table, axis=0, return_inverse=True)
    frame["rlnOpticsGroup"] = group.reshape(-1).astype(np.int64) + 1
    optics = pd.DataFrame(unique, columns=values)
    if "rlnImageSize" in optics:
        optics["rlnImageSize"] = optics["rlnImageSize"].astype(np.int64)
        frame["rlnImageSize"] = frame["rlnImageSize"].astype(np.int64)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]])
    optics["rlnImageDimensionality"] = 2
    if "rlnOpticsGroup" not in columns:
        columns = [*columns, "rlnOpticsGroup"]
    particles = ParticleSet(frame, optics, path, source, columns)
    _finish(particles, where, amplitude_defaulted=True)
    return particles


def numeric_column(table: "ParticleSet", column: str) -> np.ndarray:
    """One numeric, finite (N,) column, or a CryosviError naming file and column."""
    values = pd.to_numeric(table.metadata[column], errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CryosviError(f"{table.path}: column {column} has {int(bad.sum())} non-numeric "
                           f"or non-finite value(s) (first at particle {row + 1})")
    return values


def origins(table: "ParticleSet", rows=None) -> np.ndarray:
    """(k, 2) float32 Å: RELION's (rlnOriginXAngst, rlnOriginYAngst) of the particles
    ``rows`` (indices; None = all; 0 where the file has none). The forward model
    translates the centred projection by -origin (``cryosvi.physics.shifts``), as
    relion_project does."""
    values = table.metadata[list(ORIGINS)].to_numpy(np.float32)
    return np.ascontiguousarray(values if rows is None else values[np.asarray(rows)])


def mean_defocus(table: "ParticleSet") -> np.ndarray:
    """(N,) float64 Å: each particle's mean defocus (U + V) / 2 (U alone without
    rlnDefocusV)."""
    u = numeric_column(table, "rlnDefocusU")
    if "rlnDefocusV" not in table.metadata:
        return u
    return (u + numeric_column(table, "rlnDefocusV")) / 2


def _check_numeric(frame: pd.DataFrame, where) -> None:
    """Known numeric columns as float/int, every value finite; else one error naming
    the column and the first bad row."""
    for column in frame.columns:
        if column not in NUMERIC and not column.startswith("cryosvi"):
            continue
        values = pd.to_numeric(frame[column], errors="coerce")
        finite = np.isfinite(values.to_numpy(float))
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise CryosviError(f"{where(row)}: {column} is {frame[column].iloc[row]!r}, "
                               "not a finite number")
        frame[column] = values


def _finish(particles: ParticleSet, where, amplitude_defaulted: bool = False) -> None:
    """Defaults, physical checks of every optics group, mode columns."""
    frame, optics, path = particles.metadata, particles.optics, particles.path
    if "rlnAmplitudeContrast" not in frame:
        if not amplitude_defaulted:
            warn(f"{path.name}: no amplitude contrast given; using "
                 f"{DEFAULT_AMPLITUDE_CONTRAST}")
        frame["rlnAmplitudeContrast"] = DEFAULT_AMPLITUDE_CONTRAST
        optics["rlnAmplitudeContrast"] = DEFAULT_AMPLITUDE_CONTRAST
    for column, value in DEFAULTS.items():
        if column not in frame:
            frame[column] = value
    if "rlnDefocusU" in frame:
        if "rlnDefocusV" not in frame:
            frame["rlnDefocusV"] = frame["rlnDefocusU"]
        if "rlnDefocusAngle" not in frame:
            frame["rlnDefocusAngle"] = 0.0
    checks = (("rlnVoltage", lambda v: v > 0, "must be > 0 kV"),
              ("rlnSphericalAberration", lambda v: v >= 0, "must be >= 0 mm"),
              ("rlnAmplitudeContrast", lambda v: (v >= 0) & (v < 1), "must be in [0, 1)"),
              ("rlnImagePixelSize", lambda v: v > 0, "must be > 0 Å"),
              ("rlnImageSize", lambda v: (v >= 1) & (v == np.round(v)),
               "must be a whole number of pixels >= 1"))
    for column, ok, rule in checks:
        if column not in frame:
            continue
        values = frame[column].to_numpy(float)
        bad = ~ok(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            group = frame["rlnOpticsGroup"].iloc[row]
            raise CryosviError(f"{path}: optics group {group}: {column} {values[row]:g} "
                               f"{rule} ({where(row)})")
    if "rlnImageSize" in frame:
        frame["rlnImageSize"] = frame["rlnImageSize"].astype(np.int64)
    particles.metadata = frame.reset_index(drop=True)


def mode_columns(frame: pd.DataFrame) -> list[str]:
    """``cryosviModeAmplitude1..K`` present in ``frame``, in order."""
    columns, k = [], 1
    while MODE_COLUMN.format(k) in frame.columns:
        columns.append(MODE_COLUMN.format(k))
        k += 1
    return columns


# --------------------------------------------------------------------------- writing
def write_particles(path: str | Path, particles: ParticleSet, frame: pd.DataFrame,
                    added: list[str]) -> list[Path]:
    """Write ``frame`` (the metadata of ``particles`` with some columns updated) as a
    RELION 3.1 STAR file: the source's optics table, its particle columns in their order
    (RELION 3.1 terms) and row order, then the ``added`` columns. From a cryoSPARC
    source, also a ``.cs`` beside it (same stem) with the fields updated. Returns the
    paths written."""
    from cryosvi.io.star import write_star

    path = Path(path)
    particles.ensure_image_size()
    columns = [*particles.output_columns, *(c for c in added if c not in particles.output_columns)]
    write_star(path, frame, particles.optics, columns)
    written = [path]
    if particles.cs is not None:
        from cryosvi.io.cryosparc import write_cs

        target = path.with_suffix(".cs")
        write_cs(target, particles.cs, frame)
        written.append(target)
    return written
