"""cryosvi's image formation against RELION 3.1's relion_project (the oracle; skipped
without it): a map of Gaussian blobs (box 48, 2 Å voxels) projected at identity angles.

* Shifts: relion_project translates each projection by -(rlnOriginXAngst,
  rlnOriginYAngst) (src/apps/project.cpp); cryosvi's ``shifts`` take the origin with the
  same sign: the images agree (correlation 0.99997), the opposite sign does not.
* CTF: relion_project --ctf with per-particle astigmatic defocus, phase shift and
  B-factor, and two optics groups of different voltage / Cs / amplitude contrast, against
  ``ForwardModel(..., ctf=ParticleCTF, shifts=)``: same sign (positive least-squares scale,
  the same for every particle and group), correlation > 0.999 with pad_factor 1.

Padding: relion_project pads only the 3D map (--pad, default 2, for its Fourier-slice
interpolation); the 2D CTF and shift are applied on the unpadded L x L grid, so the
CTF's point spread function wraps around the box. cryosvi's pad_factor 1 is that same
circular operator; the default pad_factor 2 zero-pads instead (less wrap-around), which
differs from relion_project at high defocus (correlation 0.98 at 20000 Å here).
"""

import math
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryosvi.config import Imaging, Optics
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.shifts import shift_images

pytestmark = pytest.mark.skipif(shutil.which("relion_project") is None,
                                reason="RELION's relion_project is not installed")

BOX, PIXEL, SIGMA = 48, 2.0, 3.0
# Blob centres (x, y, z) Å from the box centre; no symmetry, so axis or sign mix-ups show.
ATOMS = np.array([[10.0, 4.0, 2.0], [-8.0, 12.0, -6.0], [2.0, -14.0, 8.0], [-12.0, -4.0, 0.0]])
F64 = dict(dtype=torch.float64)


@pytest.fixture(scope="module")
def blob_map(tmp_path_factory):
    """The blobs as a 3D map, voxel (z, y, x) at ((i - L//2) pixel, ...) Å."""
    directory = tmp_path_factory.mktemp("relion")
    axis = (np.arange(BOX) - BOX // 2) * PIXEL
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    volume = sum(np.exp(-((x - a[0]) ** 2 + (y - a[1]) ** 2 + (z - a[2]) ** 2) / (2 * SIGMA**2))
                 for a in ATOMS)
    with mrcfile.new(directory / "blobs.mrc") as mrc:
        mrc.set_data(volume.astype(np.float32))
        mrc.voxel_size = PIXEL
    return directory


def relion_project(directory, name, optics: pd.DataFrame, particles: pd.DataFrame, ctf: bool):
    """Run relion_project --ang on a RELION 3.1 STAR file; the projections (B, L, L)."""
    star = directory / f"{name}.star"
    starfile.write({"optics": optics, "particles": particles}, star, overwrite=True)
    command = ["relion_project", "--i", str(directory / "blobs.mrc"), "--ang", str(star),
               "--o", str(directory / f"{name}_proj")] + (["--ctf"] if ctf else [])
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return mrcfile.read(directory / f"{name}_proj.mrcs").astype(np.float64)


def optics_table(voltage, cs, amplitude_contrast):
    groups = len(voltage)
    return pd.DataFrame({"rlnOpticsGroupName": [f"group{g + 1}" for g in range(groups)],
                         "rlnOpticsGroup": np.arange(1, groups + 1),
                         "rlnVoltage": voltage, "rlnSphericalAberration": cs,
                         "rlnAmplitudeContrast": amplitude_contrast,
                         "rlnImagePixelSize": [PIXEL] * groups, "rlnImageSize": [BOX] * groups,
                         "rlnImageDimensionality": [2] * groups})


def blobs_model(pad_factor, groups=None):
    """cryosvi's ForwardModel of the same blobs (one zero mode, a wide window: no truncation)."""
    coords = torch.tensor(ATOMS, **F64)
    return ForwardModel(coords, torch.zeros(1, len(ATOMS), 3, **F64),
                        Optics(pixel_size=PIXEL, box=BOX),
                        Imaging(sigma=SIGMA, window=41, pad_factor=pad_factor), groups).double()


def identity(n):
    return torch.tensor([[1.0, 0.0, 0.0, 0.0]], **F64).expand(n, 4), torch.zeros(n, 1, **F64)


def correlation(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def scale(ours, theirs):
    """Least-squares s with theirs ~ s ours."""
    return float(np.sum(ours * theirs) / np.sum(ours * ours))


def test_shift_sign_matches_relion_project(blob_map):
    origins = np.array([[4.0, 0.0], [0.0, -6.0], [3.3, 2.1], [-5.0, 4.6]])  # Å, sub-pixel too
    particles = pd.DataFrame({"rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0,
                              "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1],
                              "rlnDefocusU": 10000.0, "rlnDefocusV": 10000.0,
                              "rlnDefocusAngle": 0.0, "rlnOpticsGroup": 1})
    theirs = relion_project(blob_map, "shifts", optics_table([300.0], [2.7], [0.1]), particles,
                            ctf=False)
    rotation, amplitudes = identity(len(origins))
    projection = blobs_model(1).project(amplitudes, rotation).detach()
    shifts = torch.tensor(origins, **F64)
    ours = shift_images(projection, shifts, PIXEL).numpy()
    flipped = shift_images(projection, -shifts, PIXEL).numpy()
    for i in range(len(origins)):
        assert correlation(ours[i], theirs[i]) > 0.9999
        assert correlation(flipped[i], theirs[i]) < 0.5
    # Gray levels: one scale for every shift, near the z-integral of a unit 3D Gaussian in
    # voxels, sqrt(2 pi) sigma / pixel (relion_project's Fourier-slice projection with
    # its gridding correction comes out 1.9% above it).
    scales = [scale(ours[i], theirs[i]) for i in range(len(origins))]
    np.testing.assert_allclose(scales, scales[0], rtol=1e-4)
    assert scales[0] == pytest.approx(math.sqrt(2 * math.pi) * SIGMA / PIXEL, rel=0.03)


def test_per_particle_ctf_and_optics_groups_match_relion_project(blob_map):
    # Two optics groups (different voltage, Cs, amplitude contrast; relion_project takes
    # one pixel size), astigmatic defocus at several angles, shifts; one particle with a
    # phase shift and one with a B-factor.
    u = np.array([15000.0, 9000.0, 20000.0, 12000.0, 11000.0])
    v = np.array([9000.0, 12000.0, 14000.0, 11000.0, 8000.0])
    angle = np.array([30.0, -50.0, 100.0, 0.0, 65.0])
    phase = np.array([0.0, 0.0, 0.0, 0.0, 30.0])
    bfactor = np.array([0.0, 80.0, 0.0, 0.0, 0.0])
    group = np.array([1, 2, 2, 1, 1])
    origins = np.array([[4.0, 0.0], [0.0, -6.0], [3.3, 2.1], [-5.0, 5.0], [1.0, 1.0]])
    particles = pd.DataFrame({"rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0,
                              "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1],
                              "rlnDefocusU": u, "rlnDefocusV": v, "rlnDefocusAngle": angle,
                              "rlnPhaseShift": phase, "rlnCtfBfactor": bfactor,
                              "rlnOpticsGroup": group})
    voltage, cs, amplitude_contrast = [300.0, 200.0], [2.7, 0.01], [0.1, 0.07]
    theirs = relion_project(blob_map, "ctf", optics_table(voltage, cs, amplitude_contrast),
                            particles, ctf=True)
    groups = OpticsGroups(tuple(voltage), tuple(cs), tuple(amplitude_contrast), (PIXEL, PIXEL))
    rotation, amplitudes = identity(len(u))
    t = lambda a: torch.tensor(a, **F64)  # noqa: E731

    def ours(pad_factor, angle_sign=1.0):
        ctf = ParticleCTF(t(u), t(v), t(angle_sign * angle), t(phase), t(bfactor),
                          torch.tensor(group - 1))
        model = blobs_model(pad_factor, groups)
        return model(amplitudes, rotation, None, ctf=ctf, shifts=t(origins)).detach().numpy()

    same = ours(1)
    scales = [scale(same[i], theirs[i]) for i in range(len(u))]
    for i in range(len(u)):
        assert correlation(same[i], theirs[i]) > 0.999, i
    # RELION's sign: a positive scale, the same for every particle and both groups (so the
    # amplitude contrast and envelope agree too); cryoDRGN's sign would give -1.
    assert min(scales) > 0
    np.testing.assert_allclose(scales, scales[0], rtol=2e-3)
    # The astigmatism angle's direction: mirrored angles disagree.
    mirrored = ours(1, angle_sign=-1.0)
    assert correlation(mirrored[0], theirs[0]) < 0.9
    # The default zero-padding differs from relion_project's circular CTF only by the
    # wrapped-around tail of the point spread function (largest at 20000 Å).
    padded = ours(2)
    for i in range(len(u)):
        assert correlation(padded[i], theirs[i]) > 0.98, i
