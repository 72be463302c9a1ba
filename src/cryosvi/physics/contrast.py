"""The per-image factors of a measurement that the likelihood integrates out in closed
form or by Laplace's method: the contrast a (a truncated normal prior) and the noise
level lambda^2 (a lognormal prior), given the whitened inner products of an image and
its model image (``cryosvi.physics.noise.whitened_products``); their priors' estimates
from per-particle measurements (the method of moments), the contrast prior's floor and
its draws. Pure float64 arithmetic on (...,) tensors; ``cryosvi.physics.noise`` is
where images, spectra and the ``NoiseModel`` are."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor


class ContrastMarginal(NamedTuple):
    """log_likelihood (...,): log p(x | m) with the contrast integrated out; mean, std
    (...,): the contrast's posterior mean and std."""

    log_likelihood: Tensor
    mean: Tensor
    std: Tensor


def contrast_marginal(rr: Tensor, ur: Tensor, uu: Tensor, log_det_c: Tensor | float,
                      dims: int, mean: float, std: float,
                      floor: float = -math.inf) -> ContrastMarginal:
    """Closed-form marginal likelihood of x = a m + n, n ~ N(0, C), over the contrast
    a ~ N(mu, tau^2) truncated to [floor, inf), from the whitened products of
    r = x - mu m and m (``whitened_products`` with ``mean`` mu): with y and u the
    whitened x and m, y ~ N(mu u, I + tau^2 u u^T), and Sherman-Morrison,
    (I + b b^T)^-1 = I - b b^T / (1 + b^T b), with the matrix determinant lemma,
    det(I + b b^T) = 1 + b^T b (Sherman & Morrison 1950; Harville, Matrix Algebra From a
    Statistician's Perspective, 18.1), give, with D = 1 + tau^2 <u, u>,

        log p = -dims/2 log 2 pi - 1/2 log det C - 1/2 log D - <r, r>/2
                + tau^2 <u, r>^2 / (2 D).

    The contrast's posterior is N(mu + tau^2 <u, r> / D, tau^2 / D) before the
    truncation; the truncated prior multiplies p by Phi((m_post - floor) / s_post) /
    Phi((mu - floor) / tau) (the posterior's and the prior's mass above the floor) and
    makes the posterior a truncated normal (its mean and std returned). tau = 0 gives the
    fixed-contrast likelihood. The per-particle arithmetic is float64."""
    rr, ur, uu = rr.double(), ur.double(), uu.double()
    tau2 = float(std) ** 2
    d = 1 + tau2 * uu
    log_p = (-0.5 * dims * math.log(2 * math.pi) - 0.5 * log_det_c - 0.5 * torch.log(d)
             - 0.5 * rr + tau2 * ur.square() / (2 * d))
    post_mean = mean + tau2 * ur / d
    post_std = (tau2 / d).sqrt()
    if std > 0 and math.isfinite(floor):
        beta = (post_mean - floor) / post_std
        log_mass = torch.special.log_ndtr(beta)
        log_p = log_p + log_mass - float(torch.special.log_ndtr(
            torch.tensor((mean - floor) / std, dtype=torch.float64)))
        # The truncated normal's moments (Johnson, Kotz & Balakrishnan 1994, 10.1).
        mills = torch.exp(-0.5 * beta.square() - 0.5 * math.log(2 * math.pi) - log_mass)
        post_mean, post_std = (post_mean + post_std * mills,
                               post_std * (1 - mills * (mills + beta)).clamp_min(0).sqrt())
    return ContrastMarginal(log_p, post_mean, post_std)


def _level_terms(rr, ur, uu, log_det_c, dims, mean, std, floor, level_std, v):
    """(log p(x, v) (...,), ContrastMarginal): ``contrast_marginal`` with the noise
    covariance lambda^2 C, v = log lambda^2 (the whitened products over lambda^2, the log
    determinant plus dims v), plus the level prior's log density of v,
    N(-level_std^2 / 2, level_std^2) (E lambda^2 = 1: S stays the mean spectrum)."""
    scale = torch.exp(-v)
    marginal = contrast_marginal(rr * scale, ur * scale, uu * scale, log_det_c + dims * v,
                                 dims, mean, std, floor)
    z = (v + 0.5 * level_std**2) / level_std
    prior = -0.5 * z.square() - math.log(level_std) - 0.5 * math.log(2 * math.pi)
    return marginal.log_likelihood + prior, marginal


LEVEL_STEP = 1e-3
"""The step in v = log lambda^2 of the finite differences of ``level_marginal``."""


def _differences(joint, v: Tensor):
    """(f, f', f'', marginal) at v of f = joint(v)[0] by central differences of step
    ``LEVEL_STEP``, and joint's ContrastMarginal at v."""
    h = LEVEL_STEP
    (f0, marginal), (up, _), (down, _) = (joint(v + d) for d in (0.0, h, -h))
    return f0, (up - down) / (2 * h), (up - 2 * f0 + down) / h**2, marginal


def level_mode(rr: Tensor, ur: Tensor, uu: Tensor, log_det_c: Tensor | float, dims: int,
               mean: float, std: float, floor: float, level_std: float) -> Tensor:
    """(...,) float64, no gradient: the mode in v = log lambda^2 of p(x, v) (``_level_terms``),
    from the least-squares level log(q / dims), q the residual's whitened norm with the
    contrast at its posterior mean, then Newton steps on finite differences (p(x, v)
    is log-concave near its mode and as sharp as 1 / sqrt(dims) in v)."""
    with torch.no_grad():
        rr, ur, uu = rr.double(), ur.double(), uu.double()
        joint = functools.partial(_level_terms, rr, ur, uu, log_det_c, dims, mean, std,
                                  floor, level_std)
        tau2 = float(std) ** 2
        q = (rr - tau2 * ur.square() / (1 + tau2 * uu)).clamp_min(1e-300)
        v = torch.log(q / dims)
        for _ in range(4):
            _, slope, curvature, _ = _differences(joint, v)
            step = torch.where(curvature < 0, -slope / curvature, torch.sign(slope) * 0.5)
            v = v + step.nan_to_num(0.0).clamp(-1.0, 1.0)
        return v


def level_marginal(rr: Tensor, ur: Tensor, uu: Tensor, log_det_c: Tensor | float, dims: int,
                   mean: float, std: float, floor: float = -math.inf,
                   level_std: float = 0.0) -> ContrastMarginal:
    """``contrast_marginal`` with each image's noise level integrated out as well: the
    covariance lambda^2 C with v = log lambda^2 ~ N(-s^2 / 2, s^2), s = ``level_std``
    (ice thickness, dose; RELION's per-particle normalisation leaves s ~ 0). The
    likelihood is as sharp as 1 / sqrt(dims) in v, so Laplace's method at the mode v*
    (``level_mode``) is exact to O(1 / dims):

        log p(x) = log p(x, v*) + 1/2 log 2 pi - 1/2 log(-d^2/dv^2 log p(x, v*)),

    the curvature by central differences. The contrast's posterior is the one at v*.
    Differentiable in the products (v* is held fixed: its own derivative does not enter
    the first term, which is stationary in v there). s = 0 is ``contrast_marginal``."""
    if not level_std > 0:
        return contrast_marginal(rr, ur, uu, log_det_c, dims, mean, std, floor)
    v = level_mode(rr, ur, uu, log_det_c, dims, mean, std, floor, level_std)
    joint = functools.partial(_level_terms, rr, ur, uu, log_det_c, dims, mean, std, floor,
                              level_std)
    log_joint, _, curvature, marginal = _differences(joint, v)
    log_p = log_joint + 0.5 * math.log(2 * math.pi) - 0.5 * torch.log(-curvature)
    return ContrastMarginal(log_p, marginal.mean, marginal.std)


def contrast_prior(estimates: Tensor, stds: Tensor,
                   weights: Tensor | None = None) -> tuple[float, float]:
    """(mu, tau) of a Gaussian contrast prior from per-particle least-squares estimates
    and their standard errors (method of moments: tau^2 = var(estimates) - mean(std^2),
    >= 0); ``weights`` (e.g. 1 - p_junk) weigh the particles."""
    estimates, stds = estimates.double(), stds.double()
    w = torch.ones_like(estimates) if weights is None else weights.to(estimates)
    w = w / w.sum()
    mu = (w * estimates).sum()
    var = (w * (estimates - mu).square()).sum() - (w * stds.square()).sum()
    return float(mu), float(var.clamp_min(0).sqrt())


def level_spread(levels: Tensor, sampling_variance: Tensor,
                 weights: Tensor | None = None) -> float:
    """s of the noise levels' prior (``NoiseModel.level_std``) from each image's measured
    log level v_i and its sampling variance (``spectrum.background_levels``), by the
    method of moments: s^2 = var(v) - mean(sampling variance), >= 0 (as
    ``contrast_prior``); ``weights`` (e.g. 1 - p_junk) weigh the images."""
    levels, sampling_variance = levels.double(), sampling_variance.double()
    w = torch.ones_like(levels) if weights is None else weights.to(levels)
    w = w / w.sum()
    mean = (w * levels).sum()
    spread = (w * (levels - mean).square()).sum() - (w * sampling_variance).sum()
    return float(spread.clamp_min(0).sqrt())


CONTRAST_FLOOR_SIGMAS = 2.0
"""The contrast prior's lower bound sits this many prior stds below its mean (and at or
above 0): particles have a contrast, and a prior that reaches 0 lets the physics model
explain an empty image at a small Occam cost, so the junk probability ranks but is too
low. Measured on a toy whose true posterior is known (benchmarks/noise/
junk_calibration.py, 27 settings: junk fraction 0.05-0.35, whitened particle SNR 2-5,
lognormal contrast log-std 0.15-0.4; benchmarks/results/noise/junk_calibration.txt):
the fitted junk fraction's error median 0.005 (max 0.043) and the junk probability's
calibration error median 0.012 (max 0.046) with this floor, against 0.047 (0.20) and
0.047 (0.20) for a Gaussian reaching 0, 0.022 (0.074) and 0.024 (0.074) truncated at 0
or at 3 stds, and 0.001 (0.004) and 0.007 (0.015) for the true lognormal prior."""


def contrast_floor(mean: float, std: float) -> float:
    """The contrast prior's lower bound: max(0, mean - CONTRAST_FLOOR_SIGMAS std)."""
    return max(0.0, mean - CONTRAST_FLOOR_SIGMAS * std)


def truncated_normal(shape, mean: float, std: float, floor: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """float64 draws of N(mean, std^2) truncated to [floor, inf) by inverting the CDF
    (one uniform each, from ``generator`` or the global stream); std = 0 gives mean."""
    where = generator.device if generator is not None else None
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64, device=where)
    if not std > 0:
        return torch.full(shape, float(mean), dtype=torch.float64, device=where)
    low = torch.special.ndtr(torch.tensor((floor - mean) / std, dtype=torch.float64))
    u = (low + (1 - low) * uniform).clamp(1e-300, 1 - 1e-16)
    return mean + std * torch.special.ndtri(u)
