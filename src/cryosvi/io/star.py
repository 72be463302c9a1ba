"""RELION 3.1 STAR files: ``data_optics`` + ``data_particles`` (read with starfile)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import starfile

from cryosvi.config import Optics
from cryosvi.errors import CryosviError
from cryosvi.io.atomic import write_atomically

OPTICS_COLUMNS = {
    "rlnVoltage": "voltage", "rlnSphericalAberration": "spherical_aberration",
    "rlnAmplitudeContrast": "amplitude_contrast", "rlnImagePixelSize": "pixel_size",
    "rlnImageSize": "box",
}
MODE_COLUMN = "cryosviModeAmplitude{}"


@dataclass
class ParticleTable:
    """particles: one row per particle; optics: one row per optics group; path: the file."""

    particles: pd.DataFrame
    optics: pd.DataFrame
    path: Path

    def __len__(self) -> int:
        return len(self.particles)

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.particles.columns]
        if missing:
            raise CryosviError(f"{self.path}: missing STAR column(s) {', '.join(missing)}")

    def mode_columns(self) -> list[str]:
        columns, k = [], 1
        while MODE_COLUMN.format(k) in self.particles.columns:
            columns.append(MODE_COLUMN.format(k))
            k += 1
        return columns

    def single_optics(self) -> Optics:
        """The optics group of this table as :class:`Optics` (exactly one group allowed)."""
        if len(self.optics) != 1:
            raise CryosviError(f"{self.path}: {len(self.optics)} optics groups; cryosvi "
                               "handles one optics group per STAR file")
        row = self.optics.iloc[0]
        missing = [c for c in OPTICS_COLUMNS if c not in row.index]
        if missing:
            raise CryosviError(f"{self.path}: missing optics column(s) {', '.join(missing)}")
        values = {name: float(row[column]) for column, name in OPTICS_COLUMNS.items()}
        values["box"] = int(values["box"])
        return Optics(**values)


def read_star(path: str | Path) -> ParticleTable:
    """Read a RELION 3.1 particle STAR file (optics block required)."""
    path = Path(path)
    if not path.is_file():
        raise CryosviError(f"STAR file not found: {path}")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as error:  # starfile raises assorted parser errors
        raise CryosviError(f"cannot read {path} as a STAR file: {error}") from None
    particles = blocks.get("particles")
    optics = blocks.get("optics")
    if not isinstance(particles, pd.DataFrame) or particles.empty:
        raise CryosviError(f"{path}: no data_particles block with particles")
    if not isinstance(optics, pd.DataFrame):
        raise CryosviError(f"{path}: no data_optics block (RELION 3.1 format expected)")
    return ParticleTable(particles.reset_index(drop=True), optics, path)


def write_star(path: str | Path, particles: pd.DataFrame, optics: pd.DataFrame) -> None:
    """Write ``data_optics`` + ``data_particles`` to ``path`` atomically."""
    write_atomically(path, lambda temporary: starfile.write(
        {"optics": optics, "particles": particles}, temporary, overwrite=True))


def optics_table(optics: Optics) -> pd.DataFrame:
    """One RELION optics group from :class:`Optics`."""
    return pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnVoltage": [optics.voltage], "rlnSphericalAberration": [optics.spherical_aberration],
        "rlnAmplitudeContrast": [optics.amplitude_contrast],
        "rlnImagePixelSize": [optics.pixel_size], "rlnImageSize": [optics.box],
        "rlnImageDimensionality": [2],
    })
