"""Radial noise spectra of particle images: the shell grid, estimation from the
background and from residuals, the B-factor envelope and the model-error spectrum.

Conventions
-----------
Images are real (..., L, L), axes [y, x]. ``X = rfft2(x)`` is the unnormalised DFT on
the half plane (L, L//2 + 1); N = L^2. A stationary (circulant) Gaussian noise has
E|X_k|^2 = N S_k, with S_k >= 0 its *spectrum in pixel-variance units*: white noise of
std s has S_k = s^2 at every k, and the mean of S over the full L x L grid is the pixel
variance. RELION's ``sigma2_noise`` (Scheres 2012, J. Mol. Biol. 415:406, eq. 4 and the
M-step for sigma^2) is the variance of the real and of the imaginary part of a Fourier
coefficient under its 1/N-normalised FFT: sigma2_noise = S / (2 N) per shell.

Spectra are stored per radial *shell*: shell(k) = round(|k|), |k| in cycles per box
(RELION's ``ires = ROUND(sqrt(kx^2 + ky^2))``, ml_optimiser.cpp). ``n_shells(L)``
shells cover the corners beyond Nyquist too (RELION stops at L/2; here the corners are
shells of their own, they hold the fall-off towards the corner).

Each rfft2 coefficient stands for itself and its conjugate: ``coefficient_weights``
gives how many coefficients of the full grid it counts for (1 on the kx = 0 column and,
for an even L, the kx = L/2 column, else 2), 0 for coefficients left out of every sum:
the DC term (a per-image offset, marginalised) and, for images Fourier-cropped to an
even box (``cryosvi.physics.fourier``), the Nyquist row and column, which cropping sets
to 0. A shell none of whose coefficients is counted (shell 0 without DC, the corner
shells made only of Nyquist coefficients) takes the value of the nearest counted shell
below it (shell 0: above it); those values are never scored.

Every function takes a leading batch dimension and runs on the device of its inputs.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# --------------------------------------------------------------------------- the grid


@functools.lru_cache(maxsize=32)
def _radius(box: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        ky = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64)
        kx = torch.fft.rfftfreq(box, d=1.0 / box, dtype=torch.float64)
        return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).to(device)


def frequency_radius(box: int, device=None) -> Tensor:
    """(L, L//2 + 1) float64: |k| in cycles per box of each rfft2 coefficient."""
    return _radius(int(box), torch.device(device or "cpu"))


@functools.lru_cache(maxsize=32)
def _shell_index(box: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return torch.round(_radius(box, device)).long()


def shell_index(box: int, device=None) -> Tensor:
    """(L, L//2 + 1) int64: the shell round(|k|) of each rfft2 coefficient (cached: do
    not modify)."""
    return _shell_index(int(box), torch.device(device or "cpu"))


def n_shells(box: int) -> int:
    """Shells of an L box, the corners included: round(L / sqrt 2) + 1 (for even L,
    the corner (L/2, L/2) is at L / sqrt 2)."""
    return int(round(math.hypot(box // 2, box // 2))) + 1


@functools.lru_cache(maxsize=64)
def _weights(box: int, drop_dc: bool, drop_nyquist: bool, device: torch.device,
             dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        w = torch.full((box, box // 2 + 1), 2.0, dtype=dtype)
        w[:, 0] = 1.0
        if box % 2 == 0:
            w[:, -1] = 1.0
            if drop_nyquist:
                w[box // 2, :] = 0.0
                w[:, -1] = 0.0
        if drop_dc:
            w[0, 0] = 0.0
        return w.to(device)


def coefficient_weights(box: int, drop_dc: bool = True, drop_nyquist: bool = False,
                        device=None, dtype=torch.float64) -> Tensor:
    """(L, L//2 + 1): how many coefficients of the full L x L spectrum each rfft2
    coefficient stands for, 0 for those left out: the DC term with ``drop_dc``, and the
    Nyquist row and column of an even L with ``drop_nyquist`` (the 2L - 1 coefficients
    that Fourier cropping zeroes). Cached: do not modify."""
    return _weights(int(box), bool(drop_dc), bool(drop_nyquist) and box % 2 == 0,
                    torch.device(device or "cpu"), dtype)


def counted_dimensions(box: int, drop_dc: bool = True, drop_nyquist: bool = False) -> int:
    """The real dimensions the counted coefficients span: L^2 less the dropped ones."""
    return int(coefficient_weights(box, drop_dc, drop_nyquist).sum().round())


def shell_counts(box: int, drop_dc: bool = True, drop_nyquist: bool = False,
                 device=None) -> Tensor:
    """(n_shells,) float64: the counted coefficients of the full grid in each shell."""
    index = shell_index(box, device).reshape(-1)
    w = coefficient_weights(box, drop_dc, drop_nyquist, device).reshape(-1)
    return torch.zeros(n_shells(box), dtype=torch.float64, device=device).index_add_(
        0, index, w)


def shell_frequency(box: int, pixel_size: float, device=None) -> Tensor:
    """(n_shells,) float64: the mean spatial frequency (1/Å) of each shell's
    coefficients for pixels of ``pixel_size`` Å."""
    radius = frequency_radius(box, device)
    w = coefficient_weights(box, drop_dc=False, device=device)
    index = shell_index(box, device).reshape(-1)
    total = torch.zeros(n_shells(box), dtype=torch.float64, device=device).index_add_(
        0, index, (w * radius).reshape(-1))
    return total / shell_counts(box, drop_dc=False, device=device) / (box * pixel_size)


def fill_empty_shells(values: Tensor, counts: Tensor) -> Tensor:
    """(..., n_shells): every shell whose count is 0 takes the value of the nearest
    shell below it with a count (shells before the first counted one: of the first)."""
    counted = counts > 0
    if bool(counted.all()):
        return values
    index = torch.arange(counts.shape[-1], device=values.device)
    last = torch.where(counted, index, torch.full_like(index, -1)).cummax(0).values
    first = int(torch.nonzero(counted)[0])
    return values[..., torch.where(last < 0, torch.full_like(last, first), last)]


def shell_average(values: Tensor, drop_dc: bool = True, drop_nyquist: bool = False) -> Tensor:
    """(..., L, L//2 + 1) -> (..., n_shells): the mean of each shell over the counted
    coefficients of the full L x L grid (``coefficient_weights``); empty shells filled
    (``fill_empty_shells``)."""
    box = values.shape[-2]
    index = shell_index(box, values.device).reshape(-1)
    w = coefficient_weights(box, drop_dc, drop_nyquist, values.device, values.dtype)
    flat = (values * w).reshape(-1, index.numel())
    total = flat.new_zeros(flat.shape[0], n_shells(box)).index_add_(1, index, flat)
    counts = shell_counts(box, drop_dc, drop_nyquist, values.device).to(values.dtype)
    mean = total / counts.clamp_min(1)
    return fill_empty_shells(mean, counts).reshape(*values.shape[:-2], n_shells(box))


def expand_shells(spectrum: Tensor, box: int) -> Tensor:
    """(..., n_shells) -> (..., L, L//2 + 1): each coefficient gets its shell's value."""
    if spectrum.shape[-1] != n_shells(box):
        raise ValueError(f"a spectrum of a {box} px box has {n_shells(box)} shells, got "
                         f"{spectrum.shape[-1]}")
    return spectrum[..., shell_index(box, spectrum.device)]


def power_spectrum(images: Tensor) -> Tensor:
    """(..., L, L) -> (..., L, L//2 + 1): |X_k|^2 / N, in pixel-variance units (white
    noise of variance s^2 has expectation s^2 at every k)."""
    box = images.shape[-1]
    return torch.fft.rfft2(images).abs().square() / box**2


def group_sums(values: Tensor, group: Tensor | None, n_groups: int,
               weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum over the particles of each group of weights * values (G, ...), the weight
    sums (G,)), for values (B, ...), group (B,) int (None: all 0), weights (B,)."""
    batch = values.shape[0]
    group = torch.zeros(batch, dtype=torch.long, device=values.device) if group is None \
        else group.to(values.device).long()
    w = torch.ones(batch, dtype=values.dtype, device=values.device) if weights is None \
        else weights.to(values)
    flat = values.reshape(batch, -1) * w[:, None]
    total = flat.new_zeros(n_groups, flat.shape[1]).index_add_(0, group, flat)
    return total.reshape(n_groups, *values.shape[1:]), w.new_zeros(n_groups).index_add_(
        0, group, w)


# ------------------------------------------------------------------- estimation


def spectrum_from_residuals(residuals: Tensor, group: Tensor | None = None,
                            n_groups: int = 1, weights: Tensor | None = None,
                            drop_nyquist: bool = False) -> Tensor:
    """(G, n_shells): each group's noise spectrum from residual images (B, L, L), data
    minus the model at known or posterior latents: the weighted mean over the group's
    particles of |R_k|^2 / N over each shell. RELION's M-step for sigma2_noise (Scheres
    2012, the update of sigma^2 per resolution shell) at one latent per particle.
    weights (B,): e.g. 1 - p_junk. Residuals of a fitted model are low by the fitted
    degrees of freedom (a few per particle against ~N: negligible)."""
    shells = shell_average(power_spectrum(residuals.double()), True, drop_nyquist)
    total, count = group_sums(shells, group, n_groups, weights)
    return total / count.clamp_min(1e-300)[:, None]


def background_mask(box: int, radius: float, device=None) -> Tensor:
    """(L, L) bool: the pixels farther than ``radius`` px from the centre (L//2, L//2),
    as relion_preprocess --norm's background (--bg_radius)."""
    index = torch.arange(box, device=device, dtype=torch.float64) - box // 2
    return index[:, None] ** 2 + index[None, :] ** 2 > radius**2


def _lag_window(box: int, device) -> Tensor:
    """(2L, 2L) Bartlett window (1 - |dy|/L)(1 - |dx|/L) on the lag grid of a 2L FFT
    (lag j for j < L, j - 2L above; 0 at |d| = L)."""
    j = torch.arange(2 * box, device=device, dtype=torch.float64)
    lag = torch.where(j < box, j, j - 2 * box).abs()
    one = (1 - lag / box).clamp_min(0)
    return one[:, None] * one[None, :]


def _masked_correlation_sums(images: Tensor, mask: Tensor, group: Tensor | None,
                             n_groups: int, weights: Tensor | None,
                             chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per group, the weighted sum over images of their masked autocorrelation on the
    (2L, 2L) lag grid (zero-padded FFTs: linear, not wrapped), each image's mean over
    the mask subtracted first, and the weight sums."""
    box = images.shape[-1]
    total = torch.zeros(n_groups, 2 * box, 2 * box, dtype=torch.float64, device=mask.device)
    count = torch.zeros(n_groups, dtype=torch.float64, device=mask.device)
    inside = mask > 0
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].to(mask.device, torch.float64)
        part = (part - part[:, inside].mean(1)[:, None, None]) * mask
        spectrum = torch.fft.rfft2(part, s=(2 * box, 2 * box))
        correlation = torch.fft.irfft2(spectrum.abs().square(), s=(2 * box, 2 * box))
        rows = slice(start, start + part.shape[0])
        t, c = group_sums(correlation, None if group is None else group[rows], n_groups,
                          None if weights is None else weights[rows])
        total += t
        count += c
    return total, count


def spectrum_from_background(images: Tensor, background: Tensor,
                             group: Tensor | None = None, n_groups: int = 1,
                             weights: Tensor | None = None, signal: Tensor | None = None,
                             signal_group: Tensor | None = None,
                             signal_weights: Tensor | None = None,
                             min_pairs: int = 8, floor: float = 0.05) -> Tensor:
    """(G, n_shells): each group's noise spectrum from the pixels outside the molecule.

    images (B, L, L); background (L, L) bool, True for the pixels used (e.g. outside a
    circle, ``background_mask``). The stationary autocovariance c(d) is estimated from
    every pair of background pixels at lag d (a masked autocorrelation by zero-padded
    FFTs, the pair counts from the mask's own), and the spectrum that the periodogram of
    a whole L x L image of that noise has in expectation is

        S_k = sum_{|d| < L} c(d) (1 - |dx|/L)(1 - |dy|/L) exp(-2 pi i k.d / L)

    (the Bartlett/Fejer identity for E|X_k|^2 / N of a stationary process; for circulant
    noise it is the circulant's eigenvalues exactly, since c(d) and c(d - L) then merge
    with weights summing to 1), read off a 2L FFT at the even frequencies. Each image's
    background mean is subtracted first (as RELION's normalisation does), so per-image
    offsets do not leak into S through the lags left out: those with fewer than
    ``min_pairs`` pairs per image (c = 0; their window weight is small). The subtraction
    biases c(d) by about the variance of the background mean, nearly constant in d, whose
    windowed transform (a Fejer kernel) vanishes at every integer frequency but 0.

    signal (M, L, L), optional: clean model images (gray levels applied) of particles of
    the same groups (``signal_group`` (M,), default ``group``; ``signal_weights`` (M,),
    default ``weights``): the CTF spreads the molecule's signal into the background, and
    the same estimate made on these is subtracted (paired with the data or drawn from the
    prior alike: only each group's mean enters). The result is floored at ``floor``
    times each group's median (the correction can overshoot where the noise is weak).
    """
    box = images.shape[-1]
    mask = background.to(images.device, torch.float64)
    pairs = torch.fft.irfft2(torch.fft.rfft2(mask, s=(2 * box, 2 * box)).abs().square(),
                             s=(2 * box, 2 * box)).round()
    total, count = _masked_correlation_sums(images, mask, group, n_groups, weights)
    correlation = total / count.clamp_min(1e-300)[:, None, None]
    if signal is not None:
        if signal_group is None:  # paired with the data
            signal_group = group
            signal_weights = weights if signal_weights is None else signal_weights
        total, count = _masked_correlation_sums(signal, mask, signal_group, n_groups,
                                                signal_weights)
        correlation = correlation - total / count.clamp_min(1e-300)[:, None, None]
    valid = pairs >= min_pairs
    covariance = torch.where(valid, correlation / pairs.clamp_min(1), 0.0)
    full = torch.fft.rfft2(covariance * _lag_window(box, mask.device)).real  # (G, 2L, L+1)
    spectrum = shell_average(full[:, ::2, ::2], drop_dc=True)  # the L grid's frequencies
    low = floor * spectrum[:, 1:].median(1).values
    return torch.maximum(spectrum, low[:, None])


def background_levels(images: Tensor, background: Tensor, spectra: Tensor) -> tuple[Tensor, Tensor]:
    """(v (B,), var (B,)): each image's log noise level v = log lambda^2, its background
    power over what noise of its spectrum gives there, and the variance that v has from
    sampling alone (noise of exactly that spectrum).

    images (B, L, L); background (L, L) bool (``background_mask``); spectra (B, n_shells)
    each image's noise spectrum S (pixel-variance units, the model's circulant noise).
    With each image's background mean subtracted, P = sum_p (x_p - xbar)^2 over the n
    background pixels has E P = n c(0) - (1/n) sum_pq c(p - q) and, Gaussian, var P =
    2 sum_pq c(p - q)^2 (Isserlis; the mean's share left out), c the autocovariance
    (the inverse DFT of S), the pair sums over the lags d weighted by the mask's own
    pair counts A(d) (its linear autocorrelation); var v = var P / (E P)^2 (the delta
    method). Images of noise lambda^2 S have v = log lambda^2 plus that sampling error,
    whatever S's colour."""
    box = images.shape[-1]
    mask = background.to(images.device, torch.float64)
    count = mask.sum()
    pairs = torch.fft.irfft2(torch.fft.rfft2(mask, s=(2 * box, 2 * box)).abs().square(),
                             s=(2 * box, 2 * box)).clamp_min(0)  # A(d), lags on 2L
    full = expand_shells(spectra.to(images.device, torch.float64), box)
    covariance = torch.fft.irfft2(full, s=(box, box))  # c(d) on the circular L grid
    j = torch.arange(2 * box, device=images.device)
    lag = torch.where(j < box, j, j - 2 * box) % box  # lag index on 2L -> L
    covariance = covariance[..., lag[:, None], lag[None, :]]
    summed = (pairs * covariance).sum((-2, -1))
    expected = count * covariance[..., 0, 0] - summed / count
    variance = 2 * (pairs * covariance.square()).sum((-2, -1))
    x = images.double()
    inside = background.to(images.device)
    centred = x[:, inside] - x[:, inside].mean(1, keepdim=True)
    power = centred.square().sum(1)
    return torch.log(power / expected), variance / expected.square()


def model_error_spectrum(residual_spectrum: Tensor, noise: Tensor, smooth: int = 1) -> Tensor:
    """(G, n_shells): the model-error spectrum D = max(R - S, 0), the residual power at
    the fitted latents (``spectrum_from_residuals``) beyond the noise spectrum S, which
    the physics model's noise does not explain. Added to the noise, S + k D, in the
    likelihood, the misfit counts as one more Gaussian, stationary error per shell (as
    RELION's sigma2_noise from residuals absorbs it), which widens the posterior along
    the directions it affects. ``smooth``: a running mean over 2 smooth + 1 shells
    (the excess is noisy where it is small)."""
    excess = (residual_spectrum - noise).clamp_min(0)
    if smooth:
        kernel = torch.ones(1, 1, 2 * smooth + 1, dtype=excess.dtype,
                            device=excess.device) / (2 * smooth + 1)
        padded = torch.nn.functional.pad(excess[:, None], (smooth, smooth), mode="replicate")
        excess = torch.nn.functional.conv1d(padded, kernel)[:, 0]
    return excess


# --------------------------------------------------------------- B-factor envelope


def envelope(box: int, pixel_size: float, bfactor: float, device=None,
             dtype=torch.float64) -> Tensor:
    """(L, L//2 + 1): the amplitude envelope exp(-B s^2 / 4), s = |k| / (L pixel) in
    1/Å, B in Å^2 (RELION's CTF B-factor convention, CTF::getCTF)."""
    s = frequency_radius(box, device) / (box * pixel_size)
    return torch.exp(-bfactor * s.square() / 4).to(dtype)


def apply_envelope(images: Tensor, pixel_size: float, bfactor: float) -> Tensor:
    """(..., L, L) images times the envelope exp(-B s^2 / 4) in Fourier space (on the
    L grid: a Gaussian blur of std sqrt(B / 8) / pi Å, e.g. 1.1 Å for B = 100 Å^2, so
    the wrap-around is negligible). B = 0 returns the images themselves."""
    if not bfactor:
        return images
    box = images.shape[-1]
    filt = envelope(box, pixel_size, bfactor, images.device, images.dtype)
    return torch.fft.irfft2(torch.fft.rfft2(images) * filt, s=(box, box))


def shell_gain(data: Tensor, model: Tensor, spectrum: Tensor,
               weights: Tensor | None = None,
               drop_nyquist: bool = False) -> tuple[Tensor, Tensor]:
    """(gain (n_shells,), standard error (n_shells,)): per shell, the least-squares
    scale g of the model images that best explains the data, over every particle.

    data, model (B, L, L), image i against model image i (its latents); spectrum (B,
    n_shells), each particle's noise spectrum; weights (B,). With the metric of the noise,

        g = sum_i sum_k w_k Re(conj(X_ik) M_ik) / S_ik / sum_i sum_k w_k |M_ik|^2 / S_ik

    over the shell's coefficients, and var(numerator) = denominator for Gaussian noise of
    that spectrum, so the standard error is 1 / sqrt(denominator). Linear in the data:
    the noise averages out without being subtracted (unlike P_data - S, which needs S
    better than the per-shell SNR). g(s) = a exp(-B s^2 / 4) rho(s), with a the mean
    contrast and rho the agreement of model and data (1 for a perfect model)."""
    cross, power = shell_gain_sums(data, model, spectrum, weights, drop_nyquist)
    power = power.clamp_min(1e-300)
    return cross / power, power.rsqrt()


def shell_gain_sums(data: Tensor, model: Tensor, spectrum: Tensor,
                    weights: Tensor | None = None,
                    drop_nyquist: bool = False) -> tuple[Tensor, Tensor]:
    """(numerator, denominator) (n_shells,) float64 of ``shell_gain``: sums over the
    particles, so that batches of them add up to the gain of all."""
    box = data.shape[-1]
    full = expand_shells(spectrum.to(data.device, torch.float64), box)
    w = coefficient_weights(box, True, drop_nyquist, data.device)
    particle = torch.ones(data.shape[0], dtype=torch.float64, device=data.device) \
        if weights is None else weights.to(data.device, torch.float64)
    fx = torch.fft.rfft2(data.double())
    fm = torch.fft.rfft2(model.to(data.device).double())
    metric = particle[:, None, None] * w / (box * box * full)
    index = shell_index(box, data.device).reshape(-1)
    cross = torch.zeros(n_shells(box), dtype=torch.float64, device=data.device).index_add_(
        0, index, (metric * (fx.conj() * fm).real).sum(0).reshape(-1))
    power = torch.zeros_like(cross).index_add_(
        0, index, (metric * fm.abs().square()).sum(0).reshape(-1))
    return cross, power


def bfactor_from_gain(gain: Tensor, se: Tensor, frequency: Tensor, low: float,
                      high: float, min_z: float = 3.0) -> tuple[float, float, int]:
    """(B Å^2, a, shells used): the weighted least-squares line log g = log a - B s^2 / 4
    over the shells with low <= s <= high (1/Å) whose gain exceeds ``min_z`` standard
    errors, weights (g / se)^2 (the inverse variance of log g): the Guinier-plot fit of
    Rosenthal & Henderson 2003 (J. Mol. Biol. 333:721) on the amplitude gain. Fewer
    than 3 usable shells give (nan, nan, count)."""
    use = (frequency >= low) & (frequency <= high) & (gain > min_z * se)
    used = int(use.sum())
    if used < 3:
        return math.nan, math.nan, used
    y = torch.log(gain[use])
    x = frequency[use].square()
    w = gain[use] / se[use]  # the square root of the weights
    design = torch.stack([torch.ones_like(x), x], 1)
    coef = torch.linalg.lstsq(design * w[:, None], (y * w)[:, None]).solution[:, 0]
    return float(-4 * coef[1]), float(coef[0].exp()), used


BFACTOR_LOW = 1 / 20
"""1/Å: the B-factor's Guinier fit uses the shells from here to Nyquist. From 1/50 Å
the fit gave 116-126 Å^2 for 100 added; from 1/20 Å 102.5 and 103.5 (RELION-projected
data, 2 000 particles, SNR 0.1 and 1)."""


def bfactor_from_gain_sums(cross: Tensor, power: Tensor, box: int,
                           pixel_size: float) -> tuple[float, int]:
    """(B Å^2, shells used): the envelope exp(-B s^2 / 4) the particles show beyond their
    model images, from the sums of ``shell_gain_sums`` (n_shells,) over them: the
    Guinier line of the gain cross / power from BFACTOR_LOW to Nyquist
    (``bfactor_from_gain``) of an L = ``box`` image of ``pixel_size`` Å; B is nan when
    fewer than 3 shells are measurable."""
    power = power.clamp_min(1e-300)
    fitted, _, used = bfactor_from_gain(cross / power, power.rsqrt(),
                                        shell_frequency(box, pixel_size), BFACTOR_LOW,
                                        1 / (2 * pixel_size))
    return fitted, used


# --------------------------------------------------------------- a coloured shape


def coloured_spectrum(box: int, excess: float, width: float, nyquist: float) -> Tensor:
    """(n_shells,) float64: a detector-like noise spectrum per shell, scaled to a pixel
    variance of 1 (its mean over the full L x L grid):

        S(nu) = (1 + A exp(-nu^2 / (2 w^2))) r^((nu / 0.5)^2),   nu = |k| / L cycles/px,

    excess power A at zero frequency over the flat part (ice, beam-induced motion) of
    width w, and r at Nyquist relative to the flat part (a detector's MTF^2 / DQE),
    r^2 in the corners. Each shell holds the mean of S over its coefficients."""
    nu = frequency_radius(box) / box
    shape = (1 + excess * torch.exp(-nu**2 / (2 * width**2))) * nyquist ** ((nu / 0.5) ** 2)
    shells = shell_average(shape, drop_dc=False)
    w = coefficient_weights(box, drop_dc=False)
    return shells / ((w * shape).sum() / box**2)
