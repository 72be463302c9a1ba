"""Particle rows of any dialect in RELION 3.1 terms: the checks and conversions
``cryosvi.io.read_particles`` applies to a table of rows (a whole table, or one piece
of a long STAR loop at a time: every step here is row by row, given the optics table).

RELION 3.1+ files (``data_optics`` + ``data_particles``) give each row its optics
group's values; RELION 3.0 files (one table, optics per row) and cryoSPARC's get one
optics group per distinct set of optics values (``per_row_optics``). Origins in pixels
become Å as RELION converts them on reading (``ObservationModel::loadSafely``). STAR
layout: RELION's ``src/metadata_table.cpp``; the labels: RELION's
``src/metadata_label.h``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cryosvi.errors import CryosviError, CryosviWarning

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


def is_numeric(column: str) -> bool:
    """Whether a particle column must hold finite numbers: ``NUMERIC`` or cryosvi's own
    (the numbers a particle set keeps of each row)."""
    return column in NUMERIC or column.startswith("cryosvi")


def warn(message: str) -> None:
    warnings.warn(message, CryosviWarning, stacklevel=3)


class Rows(NamedTuple):
    """A table of particle rows in RELION 3.1 terms: ``frame`` (one row per particle,
    index from 0), ``optics`` (one row per optics group), ``columns`` (the particle
    columns a written STAR keeps, in their order)."""

    frame: pd.DataFrame
    optics: pd.DataFrame
    columns: list[str]


def line_of(block, path: Path):
    """Where row i of a STAR block is, in words: its file and line."""
    return lambda row: f"{path}, line {int(block.lines[row])}"


def relion31_rows(block, optics_block, path: Path, notes: dict) -> Rows:
    """RELION 3.1+: every row gets its optics group's values. ``notes``: what to warn
    about once for the whole file (``origins_in_angstrom``)."""
    frame = block.table.copy()
    optics = optics_block.table.copy()
    where = line_of(block, path)
    check_numeric(frame, where)
    check_numeric(optics, line_of(optics_block, path))
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
    origins_in_angstrom(frame, columns, notes)
    if "rlnAmplitudeContrast" not in optics:
        # the first row's (of the file: every piece of a long file takes the first's)
        optics["rlnAmplitudeContrast"] = notes.setdefault(
            "amplitude_contrast", frame["rlnAmplitudeContrast"].iloc[0]
            if "rlnAmplitudeContrast" in frame else DEFAULT_AMPLITUDE_CONTRAST)
    frame = finish(frame, optics, path, where)
    return Rows(frame, optics, columns)


def relion30_rows(block, path: Path, notes: dict) -> Rows:
    """RELION 3.0 and older: one table, the optics of every row its own."""
    frame = block.table.copy()
    where = line_of(block, path)
    check_numeric(frame, where)
    if "rlnImagePixelSize" not in frame:
        if "rlnDetectorPixelSize" in frame and "rlnMagnification" in frame:
            # RELION 3.0: pixel size (Å) = detector pixel (µm) * 1e4 / magnification.
            frame["rlnImagePixelSize"] = (frame["rlnDetectorPixelSize"].to_numpy(float) * 1e4
                                          / frame["rlnMagnification"].to_numpy(float))
        else:
            raise CryosviError(f"{path}: no pixel size: rlnImagePixelSize, or "
                               "rlnDetectorPixelSize and rlnMagnification, are needed")
    columns = [c for c in block.table.columns if c not in PER_ROW_OPTICS]
    origins_in_angstrom(frame, columns, notes)
    return per_row_optics(frame, path, columns, where, checked=True)


def origins_in_angstrom(frame: pd.DataFrame, columns: list[str], notes: dict) -> None:
    """Origins in pixels (``rlnOriginX/Y``: RELION 3.0, and RELION 3.1+ files some
    programs write, e.g. ASPIRE's) as RELION 3.1's Å (``rlnOriginXAngst/YAngst``), in
    place: times each particle's pixel size (``rlnImagePixelSize``, its optics group's;
    RELION 3.0: detector pixel / magnification), as RELION converts them on reading
    (``ObservationModel::loadSafely``). An axis that has both keeps its Å column (the
    largest difference goes to ``notes['origins_both']`` for ``warn_origins``). The
    pixel columns leave ``frame`` and ``columns`` (the columns written back), so a
    written file holds Å origins only."""
    pixel = frame["rlnImagePixelSize"].to_numpy(float)
    both = notes.setdefault("origins_both", {})
    converted = notes.setdefault("origins_converted", [])
    for pixels, angst in zip(PIXEL_ORIGINS, ORIGINS):
        if pixels not in frame:
            continue
        shift = frame.pop(pixels).to_numpy(float) * pixel
        if angst in frame:
            gap = float(np.abs(shift - frame[angst]).max())
            both[pixels] = max(both.get(pixels, gap), gap)
            columns.remove(pixels)
        else:
            frame[angst] = shift
            columns[columns.index(pixels)] = angst
            if pixels not in converted:
                converted.append(pixels)


def warn_origins(path: Path, notes: dict) -> None:
    """The warning of ``origins_in_angstrom``'s notes about a file that gives origins
    both in pixels and in Å (none otherwise)."""
    both = notes.get("origins_both")
    if not both:
        return
    converted = [p for p in notes.get("origins_converted", []) if p not in both]
    pairs = ", ".join(f"{pixels} and {dict(zip(PIXEL_ORIGINS, ORIGINS))[pixels]} (which "
                      f"differ by up to {gap:.3g} Å)" for pixels, gap in both.items())
    rest = (f"; {', '.join(converted)} converted with each particle's pixel size"
            if converted else "")
    warn(f"{path.name} gives origins both in pixels and in Å: {pairs}; the Å "
         f"column{'s' * (len(both) > 1)} {'are' if len(both) > 1 else 'is'} used{rest}")


def per_row_optics(frame: pd.DataFrame, path: Path, columns: list[str], where,
                   checked: bool = False) -> Rows:
    """RELION 3.0 and cryoSPARC: one optics group per distinct set of optics values
    (``optics_of``)."""
    if not checked:
        check_numeric(frame, where)
    missing = [c for c in ("rlnVoltage", "rlnSphericalAberration") if c not in frame]
    if missing:
        raise CryosviError(f"{path}: missing optics column(s) {', '.join(missing)}")
    if "rlnAmplitudeContrast" not in frame:
        warn(f"{path.name}: no amplitude contrast given; using "
             f"{DEFAULT_AMPLITUDE_CONTRAST}")
        frame["rlnAmplitudeContrast"] = DEFAULT_AMPLITUDE_CONTRAST
    values = [c for c in OPTICS_VALUES if c in frame]
    unique, group = np.unique(frame[values].to_numpy(float), axis=0, return_inverse=True)
    frame["rlnOpticsGroup"] = group.reshape(-1).astype(np.int64) + 1
    if "rlnImageSize" in frame:
        frame["rlnImageSize"] = frame["rlnImageSize"].astype(np.int64)
    optics = optics_of(unique, values)
    if "rlnOpticsGroup" not in columns:
        columns = [*columns, "rlnOpticsGroup"]
    return Rows(finish(frame, optics, path, where), optics, columns)


def optics_of(unique: np.ndarray, values: list[str]) -> pd.DataFrame:
    """The optics table of the distinct rows ``unique`` (G, len(values)) of optics
    ``values`` (sorted, as np.unique gives them): groups 1..G in that order."""
    optics = pd.DataFrame(unique, columns=values)
    if "rlnImageSize" in optics:
        optics["rlnImageSize"] = optics["rlnImageSize"].astype(np.int64)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]])
    optics["rlnImageDimensionality"] = 2
    return optics


def check_numeric(frame: pd.DataFrame, where) -> None:
    """Known numeric columns as float/int, every value finite; else one error naming
    the column and the first bad row."""
    for column in frame.columns:
        if not is_numeric(column):
            continue
        values = pd.to_numeric(frame[column], errors="coerce")
        finite = np.isfinite(values.to_numpy(float))
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            value = frame[column].iloc[row]
            shown = repr(value) if isinstance(value, str) else str(value)
            raise CryosviError(f"{where(row)}: {column} is {shown}, not a finite number")
        frame[column] = values


def finish(frame: pd.DataFrame, optics: pd.DataFrame, path: Path, where) -> pd.DataFrame:
    """Defaults (in place, ``optics`` too), physical checks of every optics group; the
    rows indexed from 0."""
    if "rlnAmplitudeContrast" not in frame:
        warn(f"{path.name}: no amplitude contrast given; using {DEFAULT_AMPLITUDE_CONTRAST}")
        frame["rlnAmplitudeContrast"] = DEFAULT_AMPLITUDE_CONTRAST
        optics["rlnAmplitudeContrast"] = DEFAULT_AMPLITUDE_CONTRAST
    for column, value in DEFAULTS.items():
        if column not in frame:
            frame[column] = value
    if "rlnDefocusV" in frame and "rlnDefocusU" not in frame:
        warn(f"{path.name}: rlnDefocusV without rlnDefocusU; the file's CTF estimates are "
             "not used")
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
    return frame.reset_index(drop=True)
