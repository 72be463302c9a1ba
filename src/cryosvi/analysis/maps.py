"""Each bin's particles reconstructed by RELION, and how alike the bins' maps are.

``relion_reconstruct --ctf`` (RELION 3.1 or later) inserts every particle image of a bin
into Fourier space at its posterior-mean pose and shift with its CTF, and divides by the
sum of the squared CTFs (Scheres 2012, J. Struct. Biol. 180: 519); the map is at the
particles' box and pixel size, the rotation centre on voxel L/2. Maps are compared by
their Pearson correlation within the sphere of radius L/2 about that voxel.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np

from cryosvi.errors import CryosviError

RECONSTRUCT = "relion_reconstruct"
INSTALL = "install RELION 3.1 or later so that relion_reconstruct is on PATH " \
          "(Debian/Ubuntu: apt-get install relion)"


def check_relion() -> str:
    """The path of ``relion_reconstruct``; CryosviError saying what to install without
    it."""
    found = shutil.which(RECONSTRUCT)
    if found is None:
        raise CryosviError(f"--reconstruct needs RELION's {RECONSTRUCT}, which is not on "
                           f"PATH; {INSTALL}")
    return found


def reconstruct(star: Path, output: Path, pixel_size: float) -> None:
    """``relion_reconstruct --i star --o output --ctf --angpix pixel_size``, run in the
    STAR file's folder; CryosviError with RELION's last words when it fails."""
    command = [check_relion(), "--i", star.name, "--o", output.name, "--ctf",
               "--angpix", f"{pixel_size:.6g}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=star.parent)
    if done.returncode != 0 or not output.is_file():
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["-"]
        raise CryosviError(f"{RECONSTRUCT} --i {star} failed (exit {done.returncode}): "
                           f"{said[0][:300]}")


def read_map(path: str | Path) -> np.ndarray:
    """(L, L, L) float64 [z, y, x]."""
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, np.float64)


def map_correlations(paths: list[Path]) -> np.ndarray:
    """(M, M): the Pearson correlation of every pair of the maps ``paths`` (cubes of one
    size L) over the voxels within L/2 of voxel (L/2, L/2, L/2)."""
    maps = [read_map(path) for path in paths]
    box = maps[0].shape[0]
    if any(m.shape != (box,) * 3 for m in maps):
        raise CryosviError("the maps to compare are not cubes of one size: "
                           f"{sorted({m.shape for m in maps})}")
    grid = np.arange(box) - box // 2
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    inside = (x * x + y * y + z * z) <= (box / 2) ** 2
    values = np.stack([m[inside] for m in maps])
    return np.corrcoef(values)
