"""cryosvi.physics.noise and cryosvi.physics.spectrum: the coloured-noise likelihood, its
contrast marginal, noise drawing, and the spectrum, B-factor and model-error estimates.

References, all independent of the code under test: scipy's dense multivariate normal
with the circulant covariance built in real space from the spectrum (tiny boxes, even
and odd), pyro's ``Normal`` for white noise, ``scipy.integrate.quad`` over the contrast
(with and without the truncation), Monte Carlo draws against their known spectrum and
closed-form moments, and synthetic data with a known spectrum, B-factor and model error.
"""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import pytest
import scipy.integrate
import scipy.stats
import torch

from cryosvi.errors import CryosviError
from cryosvi.physics import spectrum as sp
from cryosvi.physics.fourier import fourier_crop
from cryosvi.physics.contrast import contrast_marginal, contrast_prior, truncated_normal
from cryosvi.physics.noise import (NoiseModel, coloured_noise, gaussian_log_likelihood,
                                   log_det, whiten, whitened_products)

pytestmark = pytest.mark.usefixtures("one_thread")



def toy_spectrum(box: int, excess: float = 3.0, width: float = 0.06,
                 nyquist: float = 0.4) -> torch.Tensor:
    """(n_shells,) excess power at low frequency and a fall-off towards Nyquist."""
    nu = torch.arange(sp.n_shells(box), dtype=torch.float64) / box
    return (1 + excess * torch.exp(-nu**2 / (2 * width**2))) * nyquist ** ((nu / 0.5) ** 2)


def full_grid(shells: torch.Tensor, box: int) -> np.ndarray:
    """(L, L) the spectrum on numpy's full FFT grid, shell = round(|k|), built here."""
    k = np.fft.fftfreq(box, 1 / box)
    return shells.numpy()[np.round(np.hypot(k[:, None], k[None, :])).astype(int)]


def circulant_covariance(spectrum_full: np.ndarray) -> np.ndarray:
    """Dense (N, N) covariance C[p, q] = c(p - q), c = ifft2(S): the stationary noise."""
    box = spectrum_full.shape[0]
    c = np.fft.ifft2(spectrum_full).real
    ys, xs = (a.ravel() for a in np.meshgrid(np.arange(box), np.arange(box), indexing="ij"))
    return c[(ys[:, None] - ys[None, :]) % box, (xs[:, None] - xs[None, :]) % box]


def fourier_basis_rows(box: int, rows_cols) -> np.ndarray:
    """(N, m) orthonormal real basis of the images whose spectrum lives only on the
    given full-grid frequencies (closed under conjugation)."""
    vectors = []
    for ky, kx in rows_cols:
        e = np.zeros((box, box), complex)
        e[ky % box, kx % box] = 1
        image = np.fft.ifft2(e)
        for part in (image.real, image.imag):
            if np.abs(part).max() > 1e-12:
                vectors.append(part.ravel())
    u, singular, _ = np.linalg.svd(np.array(vectors).T, full_matrices=False)
    return u[:, singular > 1e-9 * singular[0]]


def complement_density(x: np.ndarray, cov: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """log density of x's component orthogonal to the columns of ``dropped`` (N, m)."""
    n = cov.shape[0]
    full = np.concatenate([dropped, np.random.default_rng(0).normal(size=(n, n))], 1)
    q, _ = np.linalg.qr(full)
    basis = q[:, dropped.shape[1]:]
    return scipy.stats.multivariate_normal(np.zeros(n - dropped.shape[1]),
                                           basis.T @ cov @ basis).logpdf(x @ basis)


@pytest.mark.parametrize("box", [6, 7])
def test_likelihood_equals_the_dense_multivariate_normal(box):
    generator = torch.Generator().manual_seed(0)
    spectrum = 0.7 * toy_spectrum(box, width=0.15)
    cov = circulant_covariance(full_grid(spectrum, box))
    x = coloured_noise(spectrum.expand(3, -1), box, generator) + 0.3
    flat = x.reshape(3, -1).numpy()
    ours = gaussian_log_likelihood(x, spectrum, drop_dc=False).numpy()
    np.testing.assert_allclose(ours, scipy.stats.multivariate_normal(
        np.zeros(box * box), cov).logpdf(flat), rtol=1e-10)
    # DC left out: the density of the component orthogonal to constant images.
    constant = np.full((box * box, 1), 1 / box)
    dense = complement_density(flat, cov, constant)
    np.testing.assert_allclose(gaussian_log_likelihood(x, spectrum).numpy(), dense,
                               rtol=1e-10)
    np.testing.assert_allclose(gaussian_log_likelihood(x + 5.0, spectrum).numpy(), dense,
                               rtol=1e-10)
    if box % 2 == 0:  # Nyquist row and column left out as well (Fourier-cropped images)
        half = box // 2
        frequencies = [(0, 0)] + [(half, k) for k in range(box)] + \
            [(k, half) for k in range(box) if k != half]
        dropped = fourier_basis_rows(box, frequencies)
        assert dropped.shape[1] == 2 * box
        np.testing.assert_allclose(
            gaussian_log_likelihood(x, spectrum, drop_nyquist=True).numpy(),
            complement_density(flat, cov, dropped), rtol=1e-10)


def test_white_noise_model_is_todays_normal_likelihood():
    """T = s^2 everywhere, contrast 1: Normal(clean, s).to_event(2).log_prob plus the DC
    term's own log density, N rbar^2 / (2 s^2) + 1/2 log(2 pi s^2)."""
    box, s = 16, 0.7
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(5, box, box, generator=generator, dtype=torch.float64)
    images = clean + s * torch.randn(5, box, box, generator=generator,
                                     dtype=torch.float64) + 0.2
    white = NoiseModel.white(s, box, 2.0)
    normal = dist.Normal(clean, s).to_event(2).log_prob(images)
    rbar = (images - clean).mean((-2, -1))
    dc = box * box * rbar**2 / (2 * s**2) + 0.5 * math.log(2 * math.pi * s**2)
    np.testing.assert_allclose(white.log_likelihood(images, clean).numpy(),
                               (normal + dc).numpy(), rtol=1e-12)
    # float32, as the Pyro model runs it: the same within float32 rounding
    ours32 = white.log_likelihood(images.float(), clean.float())
    assert ours32.dtype == torch.float32
    np.testing.assert_allclose(ours32.numpy(), (normal + dc).numpy(), rtol=1e-5)


def test_whitening_gives_unit_white_noise_and_the_quadratic_form():
    box = 32
    generator = torch.Generator().manual_seed(2)
    spectrum = toy_spectrum(box)
    x = coloured_noise(spectrum.expand(400, -1), box, generator)
    y = whiten(x, spectrum)
    per_shell = sp.shell_average(sp.power_spectrum(y)).mean(0)[1:]
    assert float((per_shell - 1).abs().max()) < 0.1
    assert abs(float(y.var()) - 1) < 0.01
    quadratic = -(gaussian_log_likelihood(x[:4], spectrum) + 0.5 * log_det(spectrum, box)
                  + 0.5 * (box * box - 1) * math.log(2 * math.pi))
    np.testing.assert_allclose(0.5 * y[:4].square().sum((-2, -1)).numpy(),
                               quadratic.numpy(), rtol=1e-10)


def test_coloured_noise_has_its_spectrum():
    """Periodogram means of 2 000 draws against the spectrum, per shell: within 4
    standard errors of the mean (|X|^2 / N is S times an exponential variable)."""
    box = 24
    spectrum = toy_spectrum(box, 2.0, 0.1, 0.3)
    x = coloured_noise(spectrum.expand(2000, -1), box, torch.Generator().manual_seed(3))
    shells = sp.shell_average(sp.power_spectrum(x), drop_dc=False).mean(0)
    counts = sp.shell_counts(box, drop_dc=False)
    se = spectrum / (2000 * counts / 2).sqrt()  # ~ independent coefficient pairs
    assert float(((shells - spectrum).abs() / se).max()) < 4.5
    # the white draws can come from outside; the same draws give the same noise
    white = torch.randn(3, box, box, generator=torch.Generator().manual_seed(4),
                        dtype=torch.float64)
    again = coloured_noise(spectrum, box, white=white)
    assert torch.allclose(again, coloured_noise(spectrum.expand(3, -1), box,
                                                torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("a_true, mu, tau, floor", [
    (0.8, 1.0, 0.3, -math.inf), (-0.2, 0.5, 1.0, -math.inf), (1.5, 1.4, 0.05, -math.inf),
    (0.1, 1.0, 0.3, 0.0), (0.05, 0.8, 0.4, 0.4), (1.0, 1.0, 0.25, 0.25)])
def test_contrast_marginal_equals_quadrature(a_true, mu, tau, floor):
    box = 8
    generator = torch.Generator().manual_seed(5)
    spectrum = 0.5 * toy_spectrum(box, width=0.12)
    model = torch.randn(box, box, generator=generator, dtype=torch.float64)
    x = a_true * model + coloured_noise(spectrum, box, generator)
    rr, ur, uu = whitened_products(x - mu * model, model, spectrum)
    out = contrast_marginal(rr, ur, uu, log_det(spectrum, box), box * box - 1, mu, tau,
                            floor)
    lower = max(floor, mu - 14 * tau)
    mass = scipy.stats.norm(mu, tau).sf(floor) if math.isfinite(floor) else 1.0

    # log p(x | a) is exactly quadratic in a: three evaluations of the Gaussian density
    # (checked against scipy's above) give it everywhere.
    at = [gaussian_log_likelihood(x - a * model, spectrum).item() for a in (-1.0, 0.0, 1.0)]
    c0, c1, c2 = at[1], (at[2] - at[0]) / 2, (at[2] + at[0]) / 2 - at[1]

    def integrand(a, power=0):
        like = c0 + c1 * a + c2 * a * a
        prior = scipy.stats.norm(mu, tau).logpdf(a) - math.log(mass)
        return a**power * math.exp(like + prior - float(out.log_likelihood))

    points = [float(out.mean)] if lower < float(out.mean) < mu + 14 * tau else None
    z, mean, second = (scipy.integrate.quad(integrand, lower, mu + 14 * tau, args=(p,),
                                            points=points, limit=400, epsabs=1e-13)[0]
                       for p in (0, 1, 2))
    assert abs(z - 1) < 1e-6
    assert abs(mean / z - float(out.mean)) < 1e-6
    assert abs(math.sqrt(second / z - (mean / z) ** 2) - float(out.std)) < 1e-6


def test_gauss_newton_residuals_give_the_quadratic_part():
    """|residuals|^2 / 2 + 1/2 log(1 + tau^2 |u|^2) = -log p + the normalising constant,
    for a noise model with two groups and tau > 0 (no truncation)."""
    box = 16
    generator = torch.Generator().manual_seed(6)
    noise = torch.stack([toy_spectrum(box), toy_spectrum(box, 1.0, 0.1, 0.6)])
    model = NoiseModel(box, 2.0, noise, error=0.1 * noise, contrast_mean=0.9,
                       contrast_std=0.3, contrast_floor=-math.inf)
    group = torch.tensor([0, 1, 1])
    clean = torch.randn(3, box, box, generator=generator, dtype=torch.float64)
    images = model.sample(clean, group, generator)
    residuals = model.residuals(images, clean, group)
    assert residuals.shape == (3, box * box + 1)
    uu = model.whiten(clean, group).square().sum((-2, -1))
    constant = -0.5 * model.log_det()[group] - 0.5 * model.dimensions * math.log(2 * math.pi)
    log_p = -0.5 * residuals.square().sum(-1) - 0.5 * torch.log(1 + 0.09 * uu) + constant
    np.testing.assert_allclose(log_p.numpy(), model.log_likelihood(images, clean, group)
                               .numpy(), rtol=1e-10)


def test_sampling_draws_the_prior_contrast_and_the_noise():
    box, n = 16, 4000
    noise = toy_spectrum(box)[None]
    model = NoiseModel(box, 2.0, noise, contrast_mean=1.0, contrast_std=0.5,
                       contrast_floor=0.2)
    draws = model.draw_contrast((n,), torch.Generator().manual_seed(7))
    truth = scipy.stats.truncnorm(-1.6, math.inf, loc=1.0, scale=0.5)
    assert float(draws.min()) >= 0.2
    assert scipy.stats.kstest(draws.numpy(), truth.cdf).pvalue > 1e-3
    clean = torch.zeros(n, box, box, dtype=torch.float64)
    images = model.sample(clean, None, torch.Generator().manual_seed(8))
    shells = sp.shell_average(sp.power_spectrum(images)).mean(0)
    assert float((shells[1:] / noise[0, 1:] - 1).abs().max()) < 0.1
    # cropped images: the Nyquist row and column of every sample are 0
    cropped = model.replace(cropped=True)
    spectrum = torch.fft.rfft2(cropped.sample(torch.ones(2, box, box, dtype=torch.float64)))
    assert float(spectrum[:, box // 2].abs().max() + spectrum[..., -1].abs().max()) < 1e-9


def test_truncated_normal_std_zero_is_the_mean():
    draws = truncated_normal((5,), 0.7, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(draws, torch.full((5,), 0.7, dtype=torch.float64))


def test_contrast_prior_method_of_moments():
    generator = torch.Generator().manual_seed(9)
    true = 1.0 + 0.3 * torch.randn(20000, generator=generator, dtype=torch.float64)
    stds = 0.2 + 0.2 * torch.rand(20000, generator=generator, dtype=torch.float64)
    estimates = true + stds * torch.randn(20000, generator=generator, dtype=torch.float64)
    mu, tau = contrast_prior(estimates, stds)
    assert abs(mu - 1) < 0.01 and abs(tau - 0.3) < 0.01
    junk = torch.cat([estimates, torch.zeros(5000, dtype=torch.float64)])
    weights = torch.cat([torch.ones(20000), torch.zeros(5000)]).double()
    assert contrast_prior(junk, torch.cat([stds, stds[:5000]]), weights) == (mu, tau)


# ---------------------------------------------------------------------- estimation


def test_spectrum_recovered_from_residuals_and_background():
    """Two groups of 1 000 particles, 48 px, a random offset per image: every shell up to
    Nyquist within 5 % of the truth, from residuals and from the background pixels beyond
    18 px; the corners from residuals within 4 standard errors (the last shell holds one
    coefficient per image), from the background within 35 % (they rest on few long
    lags)."""
    box, count = 48, 1000
    generator = torch.Generator().manual_seed(10)
    spectra = torch.stack([toy_spectrum(box), toy_spectrum(box, 1.5, 0.1, 0.25)])
    group = torch.arange(2 * count) % 2
    noise = coloured_noise(spectra[group], box, generator)
    noise = noise + torch.randn(2 * count, 1, 1, generator=generator, dtype=torch.float64)
    estimate = sp.spectrum_from_residuals(noise, group, 2)
    error = (estimate / spectra - 1).abs()
    assert float(error[:, 1:box // 2 + 1].max()) < 0.05
    se = (2 / (sp.shell_counts(box) * count)).sqrt()  # |X|^2 / (N S): variance <= 2
    assert float((error / se)[:, 1:].max()) < 4
    mask = sp.background_mask(box, 18)
    estimate = sp.spectrum_from_background(noise, mask, group, 2)
    error = (estimate / spectra - 1).abs()
    assert float(error[:, 1:box // 2 + 1].max()) < 0.05, error.max()
    assert float(error[:, box // 2 + 1:].max()) < 0.35
    # Junk weighted out: a third more images of another spectrum change nothing.
    other = coloured_noise(4 * spectra[group[:600]], box, generator)
    weights = torch.cat([torch.ones(2 * count), torch.zeros(600)])
    mixed = sp.spectrum_from_residuals(torch.cat([noise, other]),
                                       torch.cat([group, group[:600]]), 2, weights)
    assert torch.allclose(mixed, sp.spectrum_from_residuals(noise, group, 2))


def test_signal_correction_of_the_background_estimate():
    """Blobs (SNR ~ 1) whose CTF-like ringing reaches the background: uncorrected, the
    estimate is 21 % off; subtracting the same estimate of the signal images (here
    other draws of the same distribution, as prior model images are) takes it under 8 %."""
    box, count = 40, 800
    generator = torch.Generator().manual_seed(11)
    spectrum = toy_spectrum(box, 1.0, 0.08, 0.5)
    y, x = torch.meshgrid(*(torch.arange(box, dtype=torch.float64) - box // 2,) * 2,
                          indexing="ij")
    centres = 3 * torch.randn(2 * count, 2, 1, 1, generator=generator, dtype=torch.float64)
    blobs = torch.exp(-((x - centres[:, 0]) ** 2 + (y - centres[:, 1]) ** 2) / 18)
    ring = torch.cos(sp.frequency_radius(box) / 3)  # a CTF-like oscillation
    signal = 10 * torch.fft.irfft2(torch.fft.rfft2(blobs) * ring, s=(box, box))
    data = signal[:count] + coloured_noise(spectrum.expand(count, -1), box, generator)
    mask = sp.background_mask(box, 13)
    raw = sp.spectrum_from_background(data, mask)[0]
    corrected = sp.spectrum_from_background(data, mask, signal=signal[count:],
                                            signal_group=torch.zeros(count, dtype=torch.long))[0]
    error_raw = (raw / spectrum - 1)[1:box // 2].abs().max()
    error = (corrected / spectrum - 1)[1:box // 2].abs().max()
    assert error_raw > 0.2 and error < 0.08, (error_raw, error)


def test_bfactor_recovered_from_the_shell_gain():
    """Model images against data = 0.8 x the model under an envelope of B = 100 Å^2
    plus coloured noise: the per-shell gain's Guinier fit gives B within 10 Å^2 and the
    scale within 5 %; the standard errors describe the gain's scatter."""
    box, pixel, count = 48, 2.0, 600
    generator = torch.Generator().manual_seed(12)
    model = coloured_noise(torch.exp(-torch.arange(sp.n_shells(box)) / 6.0).expand(count, -1)
                           * 40, box, generator)
    signal = 0.8 * sp.apply_envelope(model, pixel, 100.0)
    spectrum = toy_spectrum(box)
    data = signal + coloured_noise(spectrum.expand(count, -1), box, generator)
    gain, se = sp.shell_gain(data, model, spectrum.expand(count, -1))
    frequency = sp.shell_frequency(box, pixel)
    b, scale, used = sp.bfactor_from_gain(gain, se, frequency, 1 / 20, 1 / (2 * pixel))
    assert used > 10 and abs(b - 100) < 10 and abs(scale / 0.8 - 1) < 0.05, (b, scale)
    expected = 0.8 * torch.exp(-100 * frequency**2 / 4)
    z = ((gain - expected) / se)[1:box // 2]
    assert 0.6 < float(z.std()) < 1.5


def test_model_error_spectrum_recovered():
    """Residuals = noise of S + an unmodelled signal of spectrum D: R - S gives D."""
    box, count = 32, 3000
    generator = torch.Generator().manual_seed(13)
    noise = toy_spectrum(box)[None]
    error = 0.3 * torch.exp(-torch.arange(sp.n_shells(box), dtype=torch.float64) / 4)[None]
    residuals = coloured_noise((noise + error).expand(count, -1), box, generator)
    found = sp.model_error_spectrum(sp.spectrum_from_residuals(residuals), noise, smooth=0)
    se = (noise + error) * (2 / (sp.shell_counts(box) * count)).sqrt()
    assert float(((found - error).abs() / se)[0, 1:].max()) < 4
    big = error[0] > 10 * se[0]
    assert big.sum() >= 6 and float((found[0, big] / error[0, big] - 1).abs().max()) < 0.1


def test_at_box_matches_fourier_cropped_noise():
    """A noise model cropped to 24 px against the spectrum of the same noise Fourier-
    cropped from 48 px: every shell of the small box within 6 %, the Nyquist row and
    column left out."""
    box, small, count = 48, 24, 1500
    noise = toy_spectrum(box)
    model = NoiseModel(box, 1.5, noise[None], contrast_std=0.2)
    draws = coloured_noise(noise.expand(count, -1), box, torch.Generator().manual_seed(14))
    cropped = fourier_crop(draws, small)
    resampled = model.at_box(small)
    assert resampled.cropped and resampled.pixel_size == pytest.approx(3.0)
    measured = sp.spectrum_from_residuals(cropped, drop_nyquist=True)
    assert float((measured / resampled.noise - 1)[0, 1:].abs().max()) < 0.06
    assert resampled.dimensions == small * small - 2 * small
    assert model.at_box(box) is model
    with pytest.raises(CryosviError):
        model.at_box(64)


def test_coloured_spectrum_has_unit_pixel_variance():
    box = 40
    shape = sp.coloured_spectrum(box, 3.0, 0.05, 0.4)
    x = coloured_noise(shape.expand(500, -1), box, torch.Generator().manual_seed(15))
    assert abs(float(x.var()) - 1) < 0.02
    assert shape[0] > 3.5 * shape[box // 4] and shape[box // 2] < 0.65 * shape[box // 4]


def test_noise_model_refuses_bad_values():
    box = 8
    with pytest.raises(CryosviError, match="noise spectrum must be"):
        NoiseModel(box, 1.0, torch.ones(1, 3))
    with pytest.raises(CryosviError, match="> 0"):
        NoiseModel(box, 1.0, torch.zeros(1, sp.n_shells(box)))
    with pytest.raises(CryosviError, match="error"):
        NoiseModel(box, 1.0, torch.ones(1, sp.n_shells(box)),
                   error=-torch.ones(1, sp.n_shells(box)))
    with pytest.raises(CryosviError, match="contrast std"):
        NoiseModel(box, 1.0, torch.ones(1, sp.n_shells(box)), contrast_std=-1)


# ------------------------------------------------------------- per-image noise level
def test_background_levels_and_their_spread_on_coloured_noise():
    """Coloured noise of lognormal levels (log lambda^2 std s): each image's measured
    log level is unbiased, its predicted sampling variance (``background_levels``:
    Isserlis on the mask's pair counts) matches the empirical one within 10 %, and
    ``level_spread`` recovers s (and ~0 without levels)."""
    from cryosvi.physics.contrast import level_spread
    from cryosvi.physics.spectrum import background_levels, background_mask, coloured_spectrum

    box, n, spread = 40, 3000, 0.3
    generator = torch.Generator().manual_seed(4)
    shape = coloured_spectrum(box, 3.0, 0.05, 0.4).expand(n, -1)
    mask = background_mask(box, 13)
    for s in (spread, 0.0):
        log_level = s * torch.randn(n, generator=generator, dtype=torch.float64) - s**2 / 2
        images = coloured_noise(shape * log_level.exp()[:, None], box, generator)
        measured, variance = background_levels(images, mask, shape)
        error = measured - log_level
        assert abs(float(error.mean())) < 0.005
        assert float(error.var()) == pytest.approx(float(variance.mean()), rel=0.1)
        assert level_spread(measured, variance) == pytest.approx(s, abs=0.02)


@pytest.mark.parametrize("level_std", [0.3, 0.05])
def test_level_marginal_against_quadrature(level_std):
    """The contrast and the noise level integrated out (``level_marginal``, Laplace in v
    = log lambda^2) against scipy's adaptive quadrature of the contrast marginal over v
    with its lognormal prior: within 1e-3 nats at 2 000 dimensions; the residuals of a
    NoiseModel with levels have half squared norm + 1/2 log D = -log p + const at the
    level's mode; level_std 0 is ``contrast_marginal``."""
    from cryosvi.physics.contrast import level_marginal

    rr = torch.tensor([2300.0, 1800.0, 2000.0], dtype=torch.float64)
    ur = torch.tensor([30.0, -5.0, 0.0], dtype=torch.float64)
    uu = torch.tensor([40.0, 10.0, 0.0], dtype=torch.float64)
    dims, log_det_c, mean, std, floor = 2000, 100.0, 1.0, 0.4, 0.2
    out = level_marginal(rr, ur, uu, log_det_c, dims, mean, std, floor, level_std)

    def joint(v: float, i: int) -> float:
        scale = math.exp(-v)
        marginal = contrast_marginal(rr[i:i + 1] * scale, ur[i:i + 1] * scale,
                                     uu[i:i + 1] * scale, log_det_c + dims * v, dims,
                                     mean, std, floor)
        z = (v + level_std**2 / 2) / level_std
        return float(marginal.log_likelihood) - z * z / 2 - math.log(
            level_std * math.sqrt(2 * math.pi))

    for i in range(3):
        peak = math.log(float(rr[i]) / dims)
        top = max(joint(peak + d, i) for d in np.linspace(-0.3, 0.3, 121))
        area, _ = scipy.integrate.quad(lambda v: math.exp(joint(v, i) - top), peak - 1.5,
                                       peak + 1.5, points=[peak], limit=200)
        assert float(out.log_likelihood[i]) == pytest.approx(top + math.log(area), abs=1e-3)
    plain = contrast_marginal(rr, ur, uu, log_det_c, dims, mean, std, floor)
    same = level_marginal(rr, ur, uu, log_det_c, dims, mean, std, floor, 0.0)
    assert torch.equal(same.log_likelihood, plain.log_likelihood)


def test_gauss_newton_residuals_with_levels_profile_the_level():
    """With level_std, half the residuals' squared norm + 1/2 log D is -log p(x, v) at
    the level's mode v up to one constant, for images from far too faint to far too
    bright a model: the profile min_v of -log p(x, v) written out here from the whitened
    products (the level's lognormal prior, the contrast's Gaussian prior integrated out)
    and minimised by scipy. Without the level's own residual the half squared norm
    stays near n / 2 (the level absorbs the misfit), and Gauss-Newton's steps, judged by
    it, would weigh the latents' priors too much."""
    import scipy.optimize

    box, level_std, mu, tau = 16, 0.2, 0.9, 0.3
    generator = torch.Generator().manual_seed(12)
    model = NoiseModel(box, 2.0, toy_spectrum(box)[None], contrast_mean=mu,
                       contrast_std=tau, contrast_floor=-math.inf, level_std=level_std)
    clean = torch.randn(1, box, box, generator=generator, dtype=torch.float64) * 0.3
    image = model.sample(clean, None, generator, contrast=torch.tensor([1.0]))
    scales = torch.tensor([0.0, 0.5, 1.0, 1.5, 3.0], dtype=torch.float64)
    models = scales[:, None, None] * clean
    residuals = model.residuals(image.expand(5, -1, -1), models)
    assert residuals.shape == (5, box * box + 2)
    y, n, m = model.whiten(image)[0], model.dimensions, -0.5 * level_std**2

    def minus_log_p(v: float, u: torch.Tensor) -> tuple[float, float]:
        r = y - mu * u
        rr, ur, uu = (math.exp(-v) * float((a * b).sum()) for a, b in ((r, r), (u, r), (u, u)))
        quadratic = rr - tau**2 * ur**2 / (1 + tau**2 * uu)
        log_d = math.log(1 + tau**2 * uu)
        return (0.5 * quadratic + 0.5 * log_d + 0.5 * n * v
                + 0.5 * (v - m) ** 2 / level_std**2), log_d

    gaps = []
    for k in range(5):
        u = model.whiten(models[k:k + 1])[0]
        best = scipy.optimize.minimize_scalar(lambda v, u=u: minus_log_p(v, u)[0],
                                              bounds=(-3.0, 5.0), method="bounded",
                                              options={"xatol": 1e-10})
        half = 0.5 * float(residuals[k].square().sum())
        gaps.append(half + 0.5 * minus_log_p(best.x, u)[1] - best.fun)
    assert max(gaps) - min(gaps) < 1e-5, gaps
    assert float(residuals[:, -1].min()) >= 0


@pytest.mark.parametrize("level_std", [0.0, 0.3])
def test_misfit_limit_passes_the_true_model_and_flags_a_wrong_one(level_std):
    """``misfit_limit(4)``: residuals at the true model images of 400 draws (contrast and
    noise level from the prior) stay below it; an image whose signal the model lacks
    entirely (5x the noise power) goes above it, with or without levels."""
    box, n = 24, 400
    generator = torch.Generator().manual_seed(13)
    model = NoiseModel(box, 2.0, toy_spectrum(box)[None], contrast_mean=1.0,
                       contrast_std=0.2, contrast_floor=0.3, level_std=level_std)
    clean = torch.randn(n, box, box, generator=generator, dtype=torch.float64)
    images = model.sample(clean, None, generator)
    limit = model.misfit_limit(4.0)
    half = 0.5 * model.residuals(images, clean).square().sum(-1)
    assert float(half.max()) < limit
    signal = model.whiten(clean[:1]).square().mean()
    loud = 2.0 * clean[:1] / signal.sqrt() + images[:1] - clean[:1]
    wrong = 0.5 * model.residuals(loud, torch.zeros_like(loud)).square().sum()
    assert float(wrong) > limit


def test_noise_model_levels_sample_and_score():
    """A NoiseModel with level_std: its draws have that spread of levels (measured on
    the background of empty images), its likelihood is differentiable and equals
    ``gaussian_log_likelihood`` with the level for an image that is noise alone (the
    contrast prior at 0 +- 0)."""
    from cryosvi.physics.contrast import level_spread
    from cryosvi.physics.spectrum import background_levels, background_mask

    box, n = 32, 2000
    noise = NoiseModel(box, 2.0, sp.coloured_spectrum(box, 2.0, 0.08, 0.25)[None],
                       contrast_mean=0.0, contrast_std=0.0, contrast_floor=0.0,
                       level_std=0.25)
    generator = torch.Generator().manual_seed(9)
    images = noise.sample(torch.zeros(n, box, box, dtype=torch.float64), None, generator)
    measured, variance = background_levels(images, background_mask(box, 0), noise.noise[[0] * n])
    assert level_spread(measured, variance) == pytest.approx(0.25, abs=0.03)
    clean = torch.zeros(3, box, box, dtype=torch.float64, requires_grad=True)
    score = noise.log_likelihood(images[:3], clean)
    score.sum().backward()
    assert torch.isfinite(clean.grad).all()
    expected = gaussian_log_likelihood(images[:3], noise.total[0], True, False, 0.25)
    torch.testing.assert_close(score.detach(), expected, rtol=0, atol=1e-6)
