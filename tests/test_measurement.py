"""cryosvi.distributions.Measurement and the Pyro model's measurement site with a
NoiseModel: the contrast-marginal density against scipy's dense multivariate normal of
the marginal covariance C + tau^2 m m^T, the optics groups of the conditions against
pyro's Normal for white noise of one std per group, samples against the prior's moments,
and gradients against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro import poutine

from cryosvi.config import Imaging, Optics, Priors
from cryosvi.distributions import Measurement
from cryosvi.model import model
from cryosvi.physics import spectrum as sp
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.noise import NoiseModel
from cryosvi.physics.optics import OpticsGroups, ParticleCTF

pytestmark = pytest.mark.usefixtures("one_thread")



def toy_spectrum(box: int) -> torch.Tensor:
    nu = torch.arange(sp.n_shells(box), dtype=torch.float64) / box
    return 0.6 * (1 + 2 * torch.exp(-nu**2 / 0.02)) * 0.4 ** ((nu / 0.5) ** 2)


def dense_covariance(shells: torch.Tensor, box: int) -> np.ndarray:
    k = np.fft.fftfreq(box, 1 / box)
    full = shells.numpy()[np.round(np.hypot(k[:, None], k[None, :])).astype(int)]
    c = np.fft.ifft2(full).real
    ys, xs = (a.ravel() for a in np.meshgrid(np.arange(box), np.arange(box), indexing="ij"))
    return c[(ys[:, None] - ys[None, :]) % box, (xs[:, None] - xs[None, :]) % box]


def test_log_prob_is_the_dense_contrast_marginal():
    """x = a m + n, a ~ N(mu, tau^2): x ~ N(mu m, C + tau^2 m m^T), on the component of x
    orthogonal to constant images (the offset's flat prior)."""
    box, mu, tau = 6, 0.9, 0.4
    generator = torch.Generator().manual_seed(0)
    spectrum = toy_spectrum(box)
    noise = NoiseModel(box, 2.0, spectrum[None], contrast_mean=mu, contrast_std=tau,
                       contrast_floor=-math.inf)
    clean = torch.randn(4, box, box, generator=generator, dtype=torch.float64)
    images = Measurement(clean, None, noise).sample() + 3.0
    n = box * box
    q, _ = np.linalg.qr(np.concatenate([np.ones((n, 1)), np.random.default_rng(1).normal(
        size=(n, n - 1))], 1))
    basis = q[:, 1:]
    expected = []
    for x, m in zip(images.reshape(4, -1).numpy(), clean.reshape(4, -1).numpy()):
        cov = dense_covariance(spectrum, box) + tau**2 * np.outer(m, m)
        expected.append(scipy.stats.multivariate_normal(mu * basis.T @ m, basis.T @ cov @ basis)
                        .logpdf(x @ basis))
    ours = Measurement(clean, None, noise).log_prob(images)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10)


def test_log_prob_is_differentiable():
    box = 6
    noise = NoiseModel(box, 2.0, toy_spectrum(box)[None], contrast_std=0.3)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, box, box, generator=generator, dtype=torch.float64)
    clean = torch.randn(2, box, box, generator=generator, dtype=torch.float64,
                        requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: Measurement(c, None, noise).log_prob(images),
                                    (clean,))


def test_samples_have_the_prior_contrast_and_noise():
    """Whitened, a sample's least-squares contrast <y, u> / <u, u> is a + noise of
    variance 1 / <u, u>: mean mu, variance tau^2 + 1 / <u, u>; the residual power per
    shell is T."""
    box, n = 16, 3000
    spectrum = toy_spectrum(box)
    noise = NoiseModel(box, 2.0, spectrum[None], contrast_mean=1.2, contrast_std=0.3)
    generator = torch.Generator().manual_seed(3)
    clean = 0.2 * torch.randn(box, box, generator=generator, dtype=torch.float64).expand(
        n, box, box)
    pyro.set_rng_seed(4)
    images = Measurement(clean, None, noise).sample()
    a, std = noise.fit_contrast(images, clean)
    assert abs(float(a.mean()) - 1.2) < 4 * math.sqrt((0.09 + float(std[0]) ** 2) / n)
    assert abs(float(a.var()) / (0.09 + float(std[0]) ** 2) - 1) < 0.1
    drawn = sp.spectrum_from_residuals(images - a[:, None, None] * clean)[0]
    assert float((drawn[1:box // 2] / spectrum[1:box // 2] - 1).abs().max()) < 0.06
    # Pyro draws from its global stream: the same seed, the same images.
    pyro.set_rng_seed(4)
    assert torch.equal(Measurement(clean, None, noise).sample(), images)
    assert Measurement(clean[:3], None, noise).expand((2, 3)).sample().shape == (2, 3, box,
                                                                                  box)


@pytest.fixture(scope="module")
def forward():
    generator = torch.Generator().manual_seed(5)
    coords = 8 * torch.randn(20, 3, generator=generator)
    modes = torch.linalg.qr(torch.randn(60, 1, generator=generator))[0].T.reshape(1, 20, 3)
    groups = OpticsGroups((300.0, 200.0), (2.7, 2.0), (0.1, 0.07), (2.5, 2.5))
    return ForwardModel(coords, modes, Optics(box=16, pixel_size=2.5), Imaging(sigma=2.0),
                        groups)


def test_model_site_uses_each_particles_optics_group(forward):
    """A white NoiseModel with std 0.5 in group 0 and 1.5 in group 1: the measurement's
    log density of each particle is Normal(clean, std of its group) (pyro's own) plus the
    DC term's, N rbar^2 / (2 s^2) + 1/2 log(2 pi s^2)."""
    box = 16
    group = torch.tensor([0, 1, 1, 0, 1])
    stds = torch.tensor([0.5, 1.5], dtype=torch.float64)
    noise = NoiseModel(box, 2.5, stds[:, None].square().expand(2, sp.n_shells(box)))
    ctf = ParticleCTF(torch.full((5,), 1e4), torch.full((5,), 1e4), torch.zeros(5),
                      group=group)
    conditions = Conditions(ctf)
    images = torch.randn(5, box, box, generator=torch.Generator().manual_seed(6))
    pyro.set_rng_seed(7)
    trace = poutine.trace(model).get_trace(forward, Priors(mode_std=(1.0,)), noise,
                                           images=images, conditions=conditions)
    site = trace.nodes["measurement"]
    assert isinstance(site["fn"], Measurement) and site["is_observed"]
    clean = trace.nodes["_RETURN"]["value"].double()
    s = stds[group]
    normal = dist.Normal(clean, s[:, None, None]).to_event(2).log_prob(images.double())
    rbar = (images.double() - clean).mean((-2, -1))
    dc = box * box * rbar**2 / (2 * s**2) + 0.5 * torch.log(2 * math.pi * s**2)
    np.testing.assert_allclose(site["fn"].log_prob(images).double().numpy(),
                               (normal + dc).numpy(), rtol=1e-5)
    # without observed images the site draws them
    pyro.set_rng_seed(8)
    drawn = poutine.trace(model).get_trace(forward, Priors(mode_std=(1.0,)), noise,
                                           batch_size=5, conditions=conditions)
    assert drawn.nodes["measurement"]["value"].shape == (5, box, box)
    # a float noise std keeps the white Normal density
    trace = poutine.trace(model).get_trace(forward, Priors(mode_std=(1.0,)), 0.5,
                                           images=images, conditions=conditions)
    site = trace.nodes["measurement"]
    torch.testing.assert_close(
        site["fn"].log_prob(images),
        dist.Normal(trace.nodes["_RETURN"]["value"], 0.5).to_event(2).log_prob(images),
        rtol=1e-5, atol=0)


def test_white_noise_is_the_independent_normal():
    """``WhiteNoise`` (the model's measurement without a noise model) has torch's
    Normal(clean, std).to_event(2) log density, in float64 to 1e-9, and samples of its
    mean and variance."""
    from cryosvi.distributions import WhiteNoise

    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 5, 8, 8, generator=generator, dtype=torch.float64)
    value = clean + 0.7 * torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    expected = dist.Normal(clean, 0.7).to_event(2).log_prob(value)
    measured = WhiteNoise(clean, 0.7)
    assert measured.batch_shape == (3, 5) and measured.event_shape == (8, 8)
    torch.testing.assert_close(measured.log_prob(value), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(measured.expand((2, 3, 5)).log_prob(value),
                               expected.expand(2, 3, 5), rtol=0, atol=1e-9)
    torch.manual_seed(1)
    draws = measured.sample((4000,)) - clean
    assert abs(float(draws.mean())) < 0.01 and abs(float(draws.std()) - 0.7) < 0.01
    with pytest.raises(ValueError):
        WhiteNoise(clean, 0.0)
