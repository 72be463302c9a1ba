"""cryosvi.physics.graylevels: the scale, offset and noise of particle images, without poses
(``estimate_gray_levels``) and with them (``fit_scale_with_poses``).

References: synthetic particles made here with known gray levels (cryosvi's forward
model with astigmatic CTFs in two optics groups and shifts, then image = a x clean + b +
noise), and a RELION-projected all-atom data set (benchmarks/realistic/make_dataset.py)
whose noise std after normalisation is recorded per particle (skipped without RELION).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cryosvi import dataset
from cryosvi.config import Imaging, Noise, Optics, Priors
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.errors import CryosviError
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.graylevels import (circular_mask, estimate_gray_levels, fit_scale_with_poses,
                                mask_radius, prior_model_images)
from cryosvi.reference import build_reference

BOX, PIXEL = 32, 2.5
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "realistic" / "make_dataset.py"


@pytest.fixture(scope="module")
def physics():
    """A 1OL5 pseudo-atom model (stride 3) with two optics groups, and the CTFs (U, V,
    angle, phase shift, B, group) and shifts (+-6 Å) of 600 'data' particles."""
    optics = Optics(pixel_size=PIXEL, box=BOX)
    reference = build_reference(None, None, 3, optics, Imaging(sigma=2.0),
                                Priors(mode_std=(2.0,)), Noise())
    groups = OpticsGroups(voltage=(300.0, 200.0), spherical_aberration=(2.7, 2.0),
                          amplitude_contrast=(0.1, 0.07), pixel_size=(PIXEL, PIXEL))
    forward = ForwardModel(reference.coords, reference.modes, optics, reference.imaging,
                           groups=groups)
    g = torch.Generator().manual_seed(1)
    n = 600
    u = 8000 + 17000 * torch.rand(n, generator=g)
    ctf = ParticleCTF(u, u - 1000 * torch.rand(n, generator=g),
                      180 * torch.rand(n, generator=g), torch.zeros(n),
                      40 * torch.rand(n, generator=g), torch.randint(2, (n,), generator=g))
    shifts = 12 * torch.rand(n, 2, generator=g) - 6
    return reference, forward, ctf, shifts


def draw(physics, count: int, seed: int) -> torch.Tensor:
    reference, forward, ctf, shifts = physics
    return prior_model_images(forward, ctf, shifts, count, (2.0,),
                              torch.Generator().manual_seed(seed))


def noisy(clean: torch.Tensor, scale: float, offset: float, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    return scale * clean + offset + noise * torch.randn(clean.shape, generator=g)


@pytest.fixture(scope="module")
def clean(physics):
    """(data particles' clean images, independent model images from the same prior)."""
    return draw(physics, 600, 10), draw(physics, 600, 11)


@pytest.mark.parametrize("snr", [0.05, 1.0, 5.0])
def test_gray_levels_without_poses(physics, clean, snr):
    """Known a, b and sigma at SNR 0.05-5 (SNR = a^2 var(clean) / sigma^2) come back
    within a few % (a, sigma) and a few % of sigma (b)."""
    data_clean, model = clean
    a, b = 3.7, -0.4
    sigma = a * float(data_clean.std()) / math.sqrt(snr)
    images = noisy(data_clean, a, b, sigma, seed=5)
    radius = mask_radius(physics[0].coords, PIXEL, BOX)
    got = estimate_gray_levels(images, model, radius)
    # worst over 4 data draws: sigma 1.7 %, a 3.5 % (at SNR 0.05), b 0.5 % of sigma
    assert got.noise_std == pytest.approx(sigma, rel=0.03)
    assert got.scale == pytest.approx(a, rel=0.06)
    assert got.offset == pytest.approx(b, abs=0.02 * sigma)


def test_the_model_signal_outside_the_mask_is_not_counted_as_noise(physics, clean):
    """At SNR 20 the CTF's fringes and the shifts put signal outside the mask: the
    background's variance alone overstates the noise by far more than the estimate's
    error."""
    data_clean, model = clean
    sigma = float(data_clean.std()) / math.sqrt(20)
    images = noisy(data_clean, 1.0, 0.0, sigma, seed=6)
    radius = mask_radius(physics[0].coords, PIXEL, BOX)
    outside = ~circular_mask(BOX, radius)
    naive = float((images - images[:, outside].mean(1)[:, None, None])[:, outside].std())
    got = estimate_gray_levels(images, model, radius)
    assert naive > 2 * sigma
    # the model's v_O from 600 other particles: sigma within 6 % over 4 draws
    assert got.noise_std == pytest.approx(sigma, rel=0.08)
    assert got.scale == pytest.approx(1.0, rel=0.02)


def test_per_image_offsets_do_not_enter_the_noise(physics, clean):
    data_clean, model = clean
    sigma = 2.0 * float(data_clean.std())
    images = noisy(data_clean, 2.0, 0.0, sigma, seed=7)
    offsets = torch.randn(len(images), 1, 1, generator=torch.Generator().manual_seed(8))
    got = estimate_gray_levels(images + 5 * sigma * offsets, model,
                               mask_radius(physics[0].coords, PIXEL, BOX))
    assert got.noise_std == pytest.approx(sigma, rel=0.02)
    assert got.scale == pytest.approx(2.0, rel=0.05)


def test_no_signal_is_refused(physics, clean):
    data_clean, model = clean
    pure_noise = noisy(data_clean, 0.0, 0.3, 1.0, seed=9)
    with pytest.raises(CryosviError, match="signal is not measurable"):
        estimate_gray_levels(pure_noise, model, mask_radius(physics[0].coords, PIXEL, BOX))
    with pytest.raises(CryosviError, match="leaves only 0 background pixels"):
        estimate_gray_levels(pure_noise, model, BOX)
    with pytest.raises(CryosviError, match="no more signal inside"):
        estimate_gray_levels(pure_noise, torch.randn(50, BOX, BOX), 10.0)


def test_mask_radius_leaves_a_background():
    coords = np.array([[30.0, 0.0, 0.0], [0.0, -10.0, 0.0]])
    assert mask_radius(coords, 2.0, 64, margin=6.0) == pytest.approx(18.0)
    capped = mask_radius(coords, 2.0, 32, margin=6.0)
    assert 1 - math.pi * capped**2 / 32**2 == pytest.approx(0.1)
    assert int(circular_mask(5, 1.0).sum()) == 5  # the centre and its 4 neighbours


@pytest.mark.parametrize("a", [2.5, -0.8])
def test_fit_with_poses(clean, a):
    data_clean, _ = clean
    sigma = 1.5 * abs(a) * float(data_clean.std())
    images = noisy(data_clean, a, 0.25, sigma, seed=12)
    got = fit_scale_with_poses(images, data_clean)
    # least squares over 600 x 32^2 pixels: a to ~0.2 %, sigma to ~0.1 %
    assert got.scale == pytest.approx(a, rel=0.01)
    assert got.noise_std == pytest.approx(sigma, rel=0.01)
    assert got.offset == pytest.approx(0.25, abs=0.01 * sigma)


def test_fit_with_poses_refuses_no_signal(clean):
    data_clean, _ = clean
    with pytest.raises(CryosviError, match="constant"):
        fit_scale_with_poses(data_clean, torch.ones_like(data_clean))
    with pytest.raises(CryosviError, match="scale is not measurable"):
        fit_scale_with_poses(noisy(data_clean, 0.0, 0.0, 1.0, seed=13), data_clean)


@pytest.mark.skipif(shutil.which("relion_project") is None,
                    reason="RELION's relion_project is not installed")
def test_noise_of_relion_normalised_particles(tmp_path):
    """200 RELION-projected all-atom particles (two optics groups, astigmatism, shifts,
    SNR 1, background normalised to std 1): the noise std estimated with a C-alpha model
    of the same protein is within 10 % of the recorded one (RMS of cryosviNoiseStd)."""
    from cryosvi.io.particles import read_particles

    spec = importlib.util.spec_from_file_location("make_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["-o", str(tmp_path), "--n", "200", "--bins", "4", "--snr", "1",
                 "--oracle", "0", "--seed", "4"])
    particles = read_particles(tmp_path / "particles.star")
    box = dataset.working_box(particles)
    pixel = dataset.working_pixel_size(particles, box)
    optics = Optics(pixel_size=pixel, box=box)
    reference = build_reference(None, None, 2, optics, Imaging(sigma=2.0),
                                Priors(mode_std=(2.0,)), Noise())
    forward = ForwardModel(reference.coords, reference.modes, optics, reference.imaging,
                           groups=dataset.optics_groups(particles, pixel))
    model = prior_model_images(forward, dataset.particle_ctf(particles),
                               dataset.known_shifts(particles), 400, (2.0,),
                               torch.Generator().manual_seed(0))
    images = dataset.working_images(particles, np.arange(len(particles)), box)
    got = estimate_gray_levels(images, model, mask_radius(reference.coords, pixel, box))
    recorded = math.sqrt(float(np.mean(particles.metadata["cryosviNoiseStd"] ** 2)))
    assert got.noise_std == pytest.approx(recorded, rel=0.10)
    assert got.offset == pytest.approx(0.0, abs=0.05)
