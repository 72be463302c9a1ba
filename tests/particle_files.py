"""Small particle files in each dialect, written from the formats' documentation with
independent writers (mrcfile, hand-written STAR text, numpy structured arrays)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np


def write_stack(path: Path, n: int = 4, box: int = 8, pixel_size: float = 1.5,
                seed: int = 0, single: bool = False) -> np.ndarray:
    """A float32 MRC stack (n, box, box) (or one 2-D image) with mrcfile; returns it."""
    images = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as mrc:
        if single:
            mrc.set_data(images[0])
        else:
            mrc.set_data(images)
            mrc.set_image_stack()
        mrc.voxel_size = pixel_size
    return images[:1] if single else images


RELION31 = """
# version 30001

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnAngleRot #5
_rlnAngleTilt #6
_rlnAnglePsi #7
_rlnOriginXAngst #8
_rlnOriginYAngst #9
_rlnOpticsGroup #10
_rlnMicrographName #11
000001@a.mrcs 10000.0 9000.0 30.0 10.0 20.0 30.0 0.0 0.0 1 mic1.mrc

2@a.mrcs 11000.0 10500.0 40.0 -10.0 90.0 -30.0 0.0 0.0 2 mic1.mrc
00003@b.mrcs 12000.0 12000.0 0.0 170.0 45.0 100.0 0.0 0.0 1 mic2.mrc

# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
opticsGroup1 1 300.0 2.7 0.1 1.5 8 2
opticsGroup2 2 {voltage2} 2.7 0.1 {pixel2} 8 2
"""


def write_relion31(directory: Path, voltage2: float = 300.0, pixel2: float = 1.5) -> Path:
    """RELION 3.1 file (particles block first, column numbers, blank lines, two optics
    groups) over stacks a.mrcs (2 images) and b.mrcs (3 images)."""
    write_stack(directory / "a.mrcs", n=2, seed=1)
    write_stack(directory / "b.mrcs", n=3, seed=2)
    path = directory / "particles.star"
    path.write_text(RELION31.format(voltage2=voltage2, pixel2=pixel2))
    return path


PIXEL_ORIGINS31 = """# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
opticsGroup1 1 300.0 2.7 0.1 1.5 8 2
opticsGroup2 2 300.0 2.7 0.1 2.0 8 2

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnOriginX #5
_rlnOriginY #6
_rlnOpticsGroup #7{angst_label}
000001@a.mrcs 10000.0 9000.0 30.0 1.0 -2.0 1{angst1}
000002@a.mrcs 11000.0 10500.0 40.0 3.0 4.0 2{angst2}
000003@b.mrcs 12000.0 12000.0 0.0 -0.5 0.25 2{angst3}
"""
PIXEL_ORIGINS31_ANGST_X = (7.0, -8.0, 9.5)
"""rlnOriginXAngst of the mixed file of ``write_pixel_origins31``."""


def write_pixel_origins31(directory: Path, mixed: bool = False) -> Path:
    """RELION 3.1 file (optics table) with origins in pixels, rlnOriginX/Y, as ASPIRE
    writes them, over stacks a.mrcs and b.mrcs; two optics groups of 1.5 and 2.0 Å
    pixels. ``mixed``: also an rlnOriginXAngst column (``PIXEL_ORIGINS31_ANGST_X``)."""
    write_stack(directory / "a.mrcs", n=2, seed=1)
    write_stack(directory / "b.mrcs", n=3, seed=2)
    values = {f"angst{i + 1}": f" {x}" if mixed else ""
              for i, x in enumerate(PIXEL_ORIGINS31_ANGST_X)}
    path = directory / "pixel_origins.star"
    path.write_text(PIXEL_ORIGINS31.format(
        angst_label="\n_rlnOriginXAngst #8" if mixed else "", **values))
    return path


RELION30 = """data_images

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnMagnification #7
_rlnDetectorPixelSize #8
_rlnOriginX #9
_rlnOriginY #10
_rlnAngleRot #11
_rlnAngleTilt #12
_rlnAnglePsi #13
{rows}"""


def write_relion30(directory: Path, n: int = 4, stack: str = "Extract/job1/s.mrcs",
                   magnification: float = 10000.0) -> Path:
    """RELION 3.0 single table: per-particle optics, rlnMagnification and
    rlnDetectorPixelSize (5 µm / 10000 = 5 Å), origins in pixels, no rlnImageSize and no
    rlnAmplitudeContrast; the last particle at 200 kV (a second optics group)."""
    (directory / Path(stack).parent).mkdir(parents=True, exist_ok=True)
    write_stack(directory / stack, n=n, pixel_size=5.0)
    rows = "".join(
        f"{i + 1:06d}@{stack} {9000 + 100 * i:.1f} {8800 + 100 * i:.1f} 15.0 "
        f"{300 if i < n - 1 else 200} 2.7 {magnification} 5.0 {i - 1.5} {2 * i} "
        f"{10.0 * i} {20.0 + i} {-5.0 * i}\n" for i in range(n))
    path = directory / "relion30.star"
    path.write_text(RELION30.format(rows=rows))
    return path


CS_DTYPE = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
            ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
            ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
            ("ctf/phase_shift_rad", "<f4"), ("ctf/bfactor", "<f4"),
            ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]
"""Fields of a cryoSPARC particle .cs (cryoSPARC's names, cryosparc-tools' dtypes)."""


def cs_array(n: int = 4, stack: str = ">J3/extract/s.mrcs", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = np.zeros(n, dtype=CS_DTYPE)
    array["uid"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    array["blob/path"] = stack.encode()
    array["blob/idx"] = np.arange(n)[::-1]  # 0-based, in reverse order
    array["blob/shape"] = 8
    array["blob/psize_A"] = 1.5
    array["blob/sign"] = -1
    array["ctf/accel_kv"] = 300
    array["ctf/cs_mm"] = 2.7
    array["ctf/amp_contrast"] = 0.07
    array["ctf/df1_A"] = rng.uniform(9000, 11000, n)
    array["ctf/df2_A"] = array["ctf/df1_A"] - 300
    array["ctf/df_angle_rad"] = rng.uniform(0, np.pi, n)
    array["ctf/phase_shift_rad"] = 0.5
    array["ctf/bfactor"] = 20.0
    array["alignments3D/pose"] = rng.normal(size=(n, 3))
    array["alignments3D/shift"] = rng.normal(size=(n, 2))
    return array


def write_cs(directory: Path, n: int = 4) -> tuple[Path, np.ndarray, np.ndarray]:
    """particles.cs over J3/extract/s.mrcs; returns (path, array, images)."""
    (directory / "J3" / "extract").mkdir(parents=True, exist_ok=True)
    images = write_stack(directory / "J3" / "extract" / "s.mrcs", n=n)
    array = cs_array(n)
    path = directory / "particles.cs"
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return path, array, images


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)
