"""The B envelope of a run's noise model in the forward model: exp(-B s^2 / 4) on top of
each particle's CTF B-factor (RELION's convention, src/ctf.h), checked against the closed
form on numpy's FFT grid; a model without it unchanged bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosvi.config import Imaging, Optics
from cryosvi.physics.ctf import apply_ctf, apply_particle_ctf
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.noise import NoiseModel
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.physics.rotations import random_quaternions
from test_guide import tiny_reference

BOX, PIXEL = 24, 3.0


def closed_form_envelope(box: int, pixel: float, bfactor: float) -> np.ndarray:
    """(L, L//2 + 1) exp(-B s^2 / 4) on the rfft2 grid, s = |k| / (L pixel) in 1/Å."""
    ky = np.fft.fftfreq(box) / pixel
    kx = np.fft.rfftfreq(box) / pixel
    return np.exp(-bfactor * (ky[:, None] ** 2 + kx[None, :] ** 2) / 4)


def forward_model(envelope_bfactor: float = 0.0) -> ForwardModel:
    """Pad factor 1: the CTF (and its envelope) multiplies the image's own rfft2, so the
    envelope's effect is the closed form exactly."""
    generator = torch.Generator().manual_seed(3)
    coords = 10 * torch.randn(25, 3, generator=generator)
    modes = torch.linalg.qr(torch.randn(75, 1, generator=generator))[0].T.reshape(1, 25, 3)
    return ForwardModel(coords, modes, Optics(box=BOX, pixel_size=PIXEL),
                        Imaging(sigma=3.0, pad_factor=1), envelope_bfactor=envelope_bfactor)


def latents(batch: int = 3):
    generator = torch.Generator().manual_seed(5)
    return (0.5 * torch.randn(batch, 1, generator=generator),
            random_quaternions(batch, generator=generator),
            torch.full((batch,), 12000.0))


def particle_ctf(batch: int, bfactor) -> ParticleCTF:
    return ParticleCTF(torch.linspace(9000, 15000, batch), torch.linspace(8500, 14000, batch),
                       torch.linspace(0, 90, batch), None, bfactor,
                       torch.zeros(batch, dtype=torch.long))


@pytest.mark.parametrize("per_particle, own_bfactor", [(False, None), (True, None),
                                                        (True, 40.0)])
def test_envelope_is_the_closed_form_on_top_of_the_ctf(per_particle, own_bfactor):
    bfactor = 85.0
    alpha, rotation, defocus = latents()
    ctf = None
    if per_particle:
        own = None if own_bfactor is None else torch.full((3,), own_bfactor)
        ctf = particle_ctf(3, own)
        defocus = torch.zeros(3)
    with torch.no_grad():
        bare = forward_model()(alpha.double(), rotation.double(), defocus.double(),
                               ctf=None if ctf is None else ctf.to(torch.float64))
        enveloped = forward_model(bfactor)(alpha.double(), rotation.double(),
                                           defocus.double(),
                                           ctf=None if ctf is None else ctf.to(torch.float64))
    expected = np.fft.rfft2(bare.numpy()) * closed_form_envelope(BOX, PIXEL, bfactor)
    got = np.fft.rfft2(enveloped.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-9 * np.abs(expected).max())
    assert not np.allclose(got, np.fft.rfft2(bare.numpy()))  # the envelope does something


def test_no_envelope_is_the_bare_model_bit_for_bit():
    """envelope_bfactor 0, and a reference with no noise model or one with B = 0, give the
    projection and CTF composed directly, bit for bit."""
    alpha, rotation, defocus = latents()
    forward = forward_model()
    image = forward.project(alpha, rotation)
    with torch.no_grad():
        direct = apply_ctf(image, defocus, defocus, torch.zeros_like(defocus), forward.optics,
                           1)
        ctf = particle_ctf(3, torch.full((3,), 30.0))
        groups = OpticsGroups.from_optics([forward.optics])
        direct_particle = apply_particle_ctf(image, ctf, groups, 1)
        assert torch.equal(forward(alpha, rotation, defocus), direct)
        assert torch.equal(forward(alpha, rotation, None, ctf=ctf), direct_particle)

    reference = tiny_reference()
    white = NoiseModel.white(1.0, reference.optics.box, reference.optics.pixel_size)
    with torch.no_grad():
        plain = reference.forward_model()(alpha, rotation, defocus)
        zero_b = reference.with_settings(noise_model=white).forward_model()(
            alpha, rotation, defocus)
        with_b = reference.with_settings(noise_model=white.replace(bfactor=60.0))
        on = with_b.forward_model()(alpha, rotation, defocus)
        off = with_b.forward_model(envelope=False)(alpha, rotation, defocus)
    assert torch.equal(plain, zero_b) and torch.equal(plain, off)
    assert not torch.allclose(plain, on)


def test_reference_envelope_adds_to_each_particles_ctf_bfactor():
    """A reference whose noise model has B gives the same images as the bare model with B
    added to every particle's rlnCtfBfactor (the same code path: equal to rounding)."""
    reference = tiny_reference()
    noise = NoiseModel.white(1.0, reference.optics.box, reference.optics.pixel_size,
                             bfactor=70.0)
    alpha, rotation, _ = latents()
    ctf = particle_ctf(3, torch.tensor([0.0, 20.0, 150.0]))
    groups = OpticsGroups.from_optics([reference.optics])
    with torch.no_grad():
        got = reference.with_settings(noise_model=noise).forward_model(groups)(
            alpha, rotation, None, ctf=ctf)
        expected = reference.forward_model(groups)(
            alpha, rotation, None, ctf=ctf._replace(bfactor=ctf.bfactor + 70.0))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
