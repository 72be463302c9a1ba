"""cryosvi.inference.junk: the null models' evidences and the junk posterior against
scipy's dense Gaussian densities (a known template with a Gaussian contrast: every
evidence is Gaussian in closed form), EM against the mixture that made the evidences,
and the junk probability's calibration on a toy whose true posterior is computed by
quadrature over the true (lognormal) contrast distribution."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from cryosvi.inference import junk as junk_module
from cryosvi.inference.junk import (fit_junk_mixture, junk_probability, log_bayes_factor,
                                    null_log_evidence)
from cryosvi.physics import spectrum as sp
from cryosvi.physics.contrast import contrast_floor, contrast_marginal, contrast_prior
from cryosvi.physics.noise import NoiseModel, coloured_noise, log_det, whitened_products

pytestmark = pytest.mark.usefixtures("one_thread")



def toy_spectrum(box: int) -> torch.Tensor:
    nu = torch.arange(sp.n_shells(box), dtype=torch.float64) / box
    return (1 + 3 * torch.exp(-nu**2 / (2 * 0.06**2))) * 0.4 ** ((nu / 0.5) ** 2)


def dense(shells: torch.Tensor, box: int) -> np.ndarray:
    k = np.fft.fftfreq(box, 1 / box)
    c = np.fft.ifft2(shells.numpy()[np.round(np.hypot(k[:, None], k[None, :])).astype(int)]).real
    ys, xs = (a.ravel() for a in np.meshgrid(np.arange(box), np.arange(box), indexing="ij"))
    return c[(ys[:, None] - ys[None, :]) % box, (xs[:, None] - xs[None, :]) % box]


def test_evidences_and_posterior_equal_dense_gaussians():
    """Box 6: particle x ~ N(mu m, C + tau^2 m m^T), noise N(0, C), structureless
    N(0, C + P), all on the complement of constant images; p_junk by Bayes' rule."""
    box, mu, tau = 6, 1.0, 0.3
    generator = torch.Generator().manual_seed(0)
    spectrum = 0.5 * toy_spectrum(box)
    power = 0.3 * torch.exp(-torch.arange(sp.n_shells(box), dtype=torch.float64))
    noise = NoiseModel(box, 2.0, spectrum[None], signal_power=power[None],
                       contrast_mean=mu, contrast_std=tau, contrast_floor=-math.inf)
    template = torch.randn(box, box, generator=generator, dtype=torch.float64)
    images = torch.stack([noise.sample(template, generator=generator),
                          coloured_noise(spectrum, box, generator),
                          coloured_noise(spectrum + power, box, generator)]) + 2.0
    n = box * box
    q, _ = np.linalg.qr(np.concatenate([np.ones((n, 1)), np.random.default_rng(0).normal(
        size=(n, n - 1))], 1))
    basis = q[:, 1:]
    m = template.numpy().ravel()
    flat = images.reshape(3, -1).numpy() @ basis

    def logpdf(mean, cov):
        return scipy.stats.multivariate_normal(basis.T @ mean, basis.T @ cov @ basis).logpdf(flat)

    expected = np.stack([logpdf(mu * m, dense(spectrum, box) + tau**2 * np.outer(m, m)),
                         logpdf(0 * m, dense(spectrum, box)),
                         logpdf(0 * m, dense(spectrum + power, box))], 1)
    ours = torch.cat([noise.log_likelihood(images, template.expand(3, box, box))[:, None],
                      null_log_evidence(images, noise)], 1)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10)
    weights = np.array([0.7, 0.2, 0.1])
    joint = np.exp(expected - expected.max(1, keepdims=True)) * weights
    np.testing.assert_allclose(junk_probability(ours, weights).numpy(),
                               1 - joint[:, 0] / joint.sum(1), rtol=1e-9, atol=1e-15)
    # the log Bayes factor and the prior odds give the same posterior
    lbf = log_bayes_factor(ours, weights)
    np.testing.assert_allclose(torch.sigmoid(lbf + math.log(0.3 / 0.7)).numpy(),
                               junk_probability(ours, weights).numpy(), rtol=1e-9, atol=1e-15)


def test_em_recovers_the_mixture_weights(monkeypatch):
    """Evidences from the closed forms of a 16 px toy (known template, fixed contrast)
    for 6 000 images drawn from the mixture (0.75, 0.15, 0.10): every weight within 0.015,
    the likelihood never decreasing along the iterations; the fit a block of 999 rows at
    a time (the last block partial) equal to the fit in one block."""
    box, n = 16, 6000
    generator = torch.Generator().manual_seed(1)
    spectrum = toy_spectrum(box)
    template = 0.2 * coloured_noise(spectrum, box, generator)
    power = sp.shell_average(sp.power_spectrum(template))
    noise = NoiseModel(box, 2.0, spectrum[None], signal_power=power[None])
    kind = torch.multinomial(torch.tensor([0.75, 0.15, 0.10]), n, replacement=True,
                             generator=generator)
    images = (coloured_noise(spectrum.expand(n, -1), box, generator)
              + (kind == 0)[:, None, None] * template
              + (kind == 2)[:, None, None] * coloured_noise(power.expand(n, -1), box, generator))
    log_evidence = torch.cat([noise.log_likelihood(images, template.expand(n, box, box))[:, None],
                              null_log_evidence(images, noise)], 1)
    fit = fit_junk_mixture(log_evidence)
    truth = torch.bincount(kind, minlength=3).double() / n
    assert float((fit.weights - truth).abs().max()) < 0.015, (fit.weights, truth)
    assert abs(fit.junk_fraction - float(truth[1:].sum())) < 0.015
    likelihoods = [fit_junk_mixture(log_evidence, iterations=k).log_likelihood
                   for k in (1, 2, 4, 8, 16)]
    assert all(b >= a - 1e-9 for a, b in zip(likelihoods, likelihoods[1:]))
    assert torch.allclose(fit.p_junk, junk_probability(log_evidence, fit.weights))
    monkeypatch.setattr(junk_module, "ROW_BLOCK", 999)
    blocked = fit_junk_mixture(log_evidence)
    assert blocked.iterations == fit.iterations
    torch.testing.assert_close(blocked.weights, fit.weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(blocked.p_junk, fit.p_junk, rtol=0, atol=1e-12)
    assert blocked.log_likelihood == pytest.approx(fit.log_likelihood, rel=1e-12)


def _calibration_benchmark():
    """benchmarks/noise/junk_calibration.py, whose toy (a known template under coloured
    noise, with empty and structureless junk) and scores this test shares."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "noise" / "junk_calibration.py"
    spec = importlib.util.spec_from_file_location("junk_calibration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _calibration_toy(seed: int):
    """3 000 images of 20 px: 20 % junk (half empty, half structureless), particles of
    whitened norm 3 at contrast 1 with a lognormal contrast of log-std 0.3."""
    return _calibration_benchmark().toy(seed, 3000, pi=0.2, snr_u=3.0, spread=0.3, box=20)


def _expected_calibration_error(p: np.ndarray, junk: np.ndarray) -> float:
    return float(_calibration_benchmark().scores(p, junk)["ece"])


def test_junk_probability_is_calibrated_with_the_contrast_floor():
    """The loop a data set runs (contrast prior from the least-squares contrasts weighted
    by 1 - p_junk, closed-form evidences, EM; six passes) with the floor mu - 2 tau: the
    junk fraction within 0.02 of the truth (0.2), calibration error < 0.025, each
    image's p_junk within 0.03 (mean) of the true posterior (quadrature over the true
    lognormal contrast). Without a floor (a Gaussian prior reaching 0) the fraction
    comes out low by more than 0.05: the reason for the floor."""
    images, template, kind, noise = _calibration_toy(0)
    box = images.shape[-1]
    spectrum = noise.noise[0]
    nulls = null_log_evidence(images, noise)
    _, xm, mm = whitened_products(images, template, spectrum)
    estimates, stds = xm / mm, mm.rsqrt()

    def loop(floor_rule):
        weights = None
        for _ in range(6):
            mu, tau = contrast_prior(estimates, stds, weights)
            rr, ur, uu = whitened_products(images - mu * template, template, spectrum)
            particle = contrast_marginal(rr, ur, uu, log_det(spectrum, box), box * box - 1,
                                         mu, tau, floor_rule(mu, tau)).log_likelihood
            fit = fit_junk_mixture(torch.cat([particle[:, None], nulls], 1))
            weights = 1 - fit.p_junk
        return fit

    with_floor, without = loop(contrast_floor), loop(lambda mu, tau: -math.inf)
    junk = (kind > 0).numpy().astype(float)
    # the true posterior: the lognormal contrast integrated on a fine grid
    rr, ur, uu = whitened_products(images, template, spectrum)
    grid = torch.linspace(1e-4, 5, 5000, dtype=torch.float64)
    log_like = (-0.5 * (box * box - 1) * math.log(2 * math.pi) - 0.5 * log_det(spectrum, box)
                - 0.5 * (rr[:, None] - 2 * grid * ur[:, None] + grid**2 * uu[:, None]))
    log_prior = torch.distributions.LogNormal(-0.045, 0.3).log_prob(grid)
    particle = torch.logsumexp(log_like + log_prior, 1) + math.log(float(grid[1] - grid[0]))
    true_p = junk_probability(torch.cat([particle[:, None], nulls], 1), [0.8, 0.1, 0.1])
    assert abs(with_floor.junk_fraction - junk.mean()) < 0.02
    assert _expected_calibration_error(with_floor.p_junk.numpy(), junk) < 0.025
    assert float((with_floor.p_junk - true_p).abs().mean()) < 0.03
    assert junk.mean() - without.junk_fraction > 0.05
