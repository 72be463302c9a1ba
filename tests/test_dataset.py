"""cryosvi.dataset's data -> physics adapters: optics groups, per-particle CTF, shifts,
working box. References: the hand-written particle files of tests/particle_files.py
(the values are read off their text), closed forms (a band-limited cosine under Fourier
cropping, white noise's std), and cryosvi.physics.ctf.ctf_rfft evaluated per group."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch

from cryosvi import dataset
from cryosvi.config import Optics
from cryosvi.physics.ctf import ctf_rfft, particle_ctf_rfft
from cryosvi.errors import CryosviError
from cryosvi.io.particles import read_particles
from particle_files import quiet, write_cs, write_relion30, write_relion31

STAR32 = """
data_optics

loop_
_rlnOpticsGroup
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnImagePixelSize
_rlnImageSize
1 300.0 2.7 0.1 1.25 {box} 
data_particles

loop_
_rlnImageName
_rlnDefocusU
_rlnOpticsGroup
{rows}
"""


def write_box(directory, images: np.ndarray):
    """A RELION 3.1 file over one stack of ``images`` (k, L, L) at 1.25 Å."""
    with mrcfile.new(directory / "s.mrcs", overwrite=True) as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.set_image_stack()
    rows = "".join(f"{i + 1}@s.mrcs {10000 + 100 * i} 1\n" for i in range(len(images)))
    path = directory / "box.star"
    path.write_text(STAR32.format(box=images.shape[-1], rows=rows))
    return path


# ------------------------------------------------------------------ optics groups
def test_optics_groups_follow_the_file_and_index_the_particles(tmp_path):
    ps = read_particles(write_relion31(tmp_path, voltage2=200.0))
    groups = dataset.optics_groups(ps)
    # data_optics of the file: group 1 at 300 kV, group 2 at 200 kV; particles 1, 2, 1
    assert groups.voltage == (300.0, 200.0)
    assert groups.spherical_aberration == (2.7, 2.7)
    assert groups.amplitude_contrast == (0.1, 0.1)
    assert groups.pixel_size == (1.5, 1.5)
    assert dataset.group_index(ps).tolist() == [0, 1, 0]
    assert dataset.group_index(ps).dtype == torch.int64
    assert dataset.optics_groups(ps, pixel_size=3.0).pixel_size == (3.0, 3.0)


def test_sparse_group_labels_become_dense_indices(tmp_path):
    ps = read_particles(write_relion31(tmp_path, voltage2=200.0))
    ps.metadata["rlnOpticsGroup"] = [7, 3, 7]  # rows 0 and 2 keep 300 kV
    ps.metadata["rlnVoltage"] = [300.0, 200.0, 300.0]
    assert dataset.group_index(ps).tolist() == [1, 0, 1]
    assert dataset.optics_groups(ps).voltage == (200.0, 300.0)


def test_groups_may_differ_in_voltage_but_not_in_pixel_or_box(tmp_path):
    ps = read_particles(write_relion31(tmp_path, voltage2=200.0))
    optics = dataset.model_optics(ps)  # accepted: per-group voltage is modelled
    assert (optics.box, optics.pixel_size, optics.voltage) == (8, 1.5, 300.0)
    ps = read_particles(write_relion31(tmp_path, pixel2=1.2))
    assert dataset.optics_groups(ps).pixel_size == (1.5, 1.2)
    for call in (dataset.model_optics, lambda p: dataset.optics_groups(p, pixel_size=3.0),
                 lambda p: dataset.working_pixel_size(p, 8)):
        with pytest.raises(CryosviError, match="different pixel sizes.*1.2, 1.5"):
            call(ps)
    ps.metadata["rlnImagePixelSize"] = 1.5
    ps.metadata["rlnImageSize"] = [8, 10, 8]
    with pytest.raises(CryosviError, match="different image sizes"):
        dataset.model_optics(ps)


def test_model_optics_reads_the_box_from_the_stacks(tmp_path):
    # RELION 3.0: no rlnImageSize (8 px stack), 5 Å pixels; read_particles numbers the
    # distinct optics in sorted order, so group 1 (index 0) is the 200 kV one
    ps = quiet(read_particles, write_relion30(tmp_path, n=3))
    optics = dataset.model_optics(ps)
    assert (optics.box, optics.pixel_size, optics.voltage) == (8, 5.0, 200.0)
    assert dataset.group_index(ps).tolist() == [1, 1, 0]
    assert dataset.optics_groups(ps).voltage == (200.0, 300.0)


# ------------------------------------------------------------------ per-particle CTF
def test_particle_ctf_reads_the_columns(tmp_path):
    ps = read_particles(write_relion31(tmp_path, voltage2=200.0))
    ctf = dataset.particle_ctf(ps)
    # values of the file's text (particle rows 1-3)
    np.testing.assert_array_equal(ctf.defocus_u, [10000.0, 11000.0, 12000.0])
    np.testing.assert_array_equal(ctf.defocus_v, [9000.0, 10500.0, 12000.0])
    np.testing.assert_array_equal(ctf.angle, [30.0, 40.0, 0.0])
    np.testing.assert_array_equal(ctf.phase_shift, [0.0] * 3)  # absent -> 0
    np.testing.assert_array_equal(ctf.bfactor, [0.0] * 3)
    assert ctf.group.tolist() == [0, 1, 0]
    assert all(t.dtype == torch.float32 for t in ctf[:5])
    subset = dataset.particle_ctf(ps, [2, 1])
    np.testing.assert_array_equal(subset.defocus_u, [12000.0, 11000.0])
    assert subset.group.tolist() == [0, 1]
    with pytest.raises(IndexError):
        dataset.particle_ctf(ps, [3])


def test_particle_ctf_of_a_cs_file_in_relion_units(tmp_path):
    path, array, _ = write_cs(tmp_path)
    ctf = dataset.particle_ctf(quiet(read_particles, path))
    np.testing.assert_allclose(ctf.defocus_u, array["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_allclose(ctf.angle, np.degrees(array["ctf/df_angle_rad"]), rtol=1e-5)
    np.testing.assert_allclose(ctf.phase_shift, math.degrees(0.5), rtol=1e-5)
    np.testing.assert_allclose(ctf.bfactor, 20.0)


def test_particle_ctf_and_groups_give_each_groups_ctf(tmp_path):
    """The adapters into ctf.particle_ctf_rfft equal ctf_rfft with each particle's own
    group Optics (300 or 200 kV), U, V and angle."""
    ps = read_particles(write_relion31(tmp_path, voltage2=200.0))
    ctf = dataset.particle_ctf(ps)
    got = particle_ctf_rfft(ctf._replace(bfactor=None), dataset.optics_groups(ps), 16)
    for i, voltage in enumerate((300.0, 200.0, 300.0)):
        optics = Optics(voltage=voltage, spherical_aberration=2.7, amplitude_contrast=0.1,
                        pixel_size=1.5, box=8)
        expected = ctf_rfft(ctf.defocus_u[i], ctf.defocus_v[i], ctf.angle[i], optics, 16)
        torch.testing.assert_close(got[i], expected, atol=2e-5, rtol=0)


def test_has_ctf_estimates(tmp_path):
    ps = read_particles(write_relion31(tmp_path))
    assert dataset.has_ctf_estimates(ps)
    ps.metadata["rlnDefocusU"] = 10000.0  # one value for all: a placeholder
    assert not dataset.has_ctf_estimates(ps)
    del ps.metadata["rlnDefocusU"]
    assert not dataset.has_ctf_estimates(ps)
    with pytest.raises(CryosviError, match="missing STAR column.*rlnDefocusU"):
        dataset.particle_ctf(ps)


# ------------------------------------------------------------------ shifts
def test_known_shifts_in_angstrom(tmp_path):
    # RELION 3.0 origins in pixels (i - 1.5, 2 i) at 5 Å per pixel
    ps = quiet(read_particles, write_relion30(tmp_path, n=4))
    shifts = dataset.known_shifts(ps)
    expected = np.array([[(i - 1.5) * 5, 2 * i * 5] for i in range(4)])
    assert shifts.dtype == torch.float32 and shifts.shape == (4, 2)
    np.testing.assert_allclose(shifts, expected)
    np.testing.assert_allclose(dataset.known_shifts(ps, [3, 0]), expected[[3, 0]])
    assert ps.has_shifts
    zero = read_particles(write_relion31(tmp_path))
    assert not zero.has_shifts
    np.testing.assert_array_equal(dataset.known_shifts(zero), np.zeros((3, 2)))


# ------------------------------------------------------------------ working box
@pytest.mark.parametrize("box, expected", [(8, 8), (48, 48), (63, 62), (64, 64), (65, 64),
                                           (256, 64), (400, 64)])
def test_default_working_box(tmp_path, box, expected):
    ps = read_particles(write_relion31(tmp_path))
    ps.metadata["rlnImageSize"] = box
    assert dataset.working_box(ps) == expected


@pytest.mark.parametrize("requested", [15, 33, 14, 130, 0, -2, 32.5])
def test_a_working_box_must_be_even_and_within_the_data(tmp_path, requested):
    ps = read_particles(write_relion31(tmp_path))
    ps.metadata["rlnImageSize"] = 128
    with pytest.raises(CryosviError, match=f"--box {requested}: .*even.*16 to .* 128"):
        dataset.working_box(ps, requested)


def test_working_box_accepts_even_boxes_up_to_the_data(tmp_path):
    ps = read_particles(write_relion31(tmp_path))
    ps.metadata["rlnImageSize"] = 128
    assert [dataset.working_box(ps, n) for n in (16, 64, 128)] == [16, 64, 128]
    assert dataset.working_pixel_size(ps, 64) == pytest.approx(3.0)  # 1.5 x 128 / 64


def test_working_images_resample_a_band_limited_image(tmp_path):
    """A cosine of 3 cycles per box about the centre pixel L//2, plus a constant, comes
    back as the same cosine on the coarser grid about n//2 (closed form); invert
    negates it."""
    box, new = 40, 16
    x = np.arange(box) - box // 2
    image = 0.7 + np.cos(2 * np.pi * 3 * x / box)[None, :] * np.cos(2 * np.pi * 2 * x / box)[:, None]
    path = write_box(tmp_path, np.stack([image, 2 * image]))
    ps = read_particles(path)
    got = dataset.working_images(ps, [1, 0], new)
    u = np.arange(new) - new // 2
    expected = 0.7 + np.cos(2 * np.pi * 3 * u / new)[None, :] * np.cos(2 * np.pi * 2 * u / new)[:, None]
    assert got.dtype == torch.float32 and got.shape == (2, new, new)
    np.testing.assert_allclose(got[1].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(got[0].numpy(), 2 * expected, atol=1e-5)
    inverted = read_particles(path, invert=True)
    np.testing.assert_allclose(dataset.working_images(inverted, [0], new)[0].numpy(),
                               -expected, atol=1e-5)
    assert dataset.working_pixel_size(ps, new) == pytest.approx(1.25 * box / new)


def test_working_images_scale_white_noise_by_n_minus_1_over_l(tmp_path):
    """White noise keeps (n - 1)^2 of its L^2 Fourier coefficients (the even n's Nyquist
    row and column are zeroed), each of unchanged variance times (n / L)^2 per pixel:
    std s (n - 1) / L; s n / L = 1.0 here would be 3 % off."""
    noise = np.random.default_rng(0).normal(0.0, 2.0, size=(40, 64, 64))
    ps = read_particles(write_box(tmp_path, noise))
    got = dataset.working_images(ps, np.arange(40), 32).double()
    assert float(got.std()) == pytest.approx(2.0 * 31 / 64, rel=0.01)
