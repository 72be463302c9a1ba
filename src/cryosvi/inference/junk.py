"""Junk: images that hold no particle (empty ice, aggregates, contamination), told from
particles by their evidence under three models of an image x of optics group g:

* particle: the physics model, its evidence Z_0 = p(x | particle) with every inferred
  latent integrated out and those the particle file gives (consensus poses, CTF
  defocus) held at their values, their priors not counted (``refine.log_joint``): a
  Laplace, grid or SMC estimate, the caller's;
* noise (empty ice): x ~ N(0, T_g), the noise alone;
* structureless (aggregates, contamination, phase-scrambled particles): x ~ N(0, T_g +
  P_g), a stationary Gaussian with the noise's spectrum plus the particles' mean signal
  power P_g (``NoiseModel.signal_power``): the particles' power without their structure.

Both nulls are closed form (``physics.noise.gaussian_log_likelihood``) with the offset
integrated out as in the physics model (the DC term left out, and the Nyquist row and
column of cropped images), so the three evidences are densities on the same space. An
image is then a draw from the mixture

    p(x) = w_0 Z_0 + w_1 Z_1 + w_2 Z_2,    w_0 + w_1 + w_2 = 1,

the junk fraction pi = w_1 + w_2, and Bayes' rule gives each image's junk probability
(``junk_probability``). The weights are fitted by EM over a data set's (N, 3) log
evidences (``fit_junk_mixture``, Dempster, Laird & Rubin 1977), which is all it needs:
the evidences can be computed batch by batch and the EM run once at the end.

Calibration needs the physics model's contrast prior to say that particles have a
contrast well above 0 (``NoiseModel.contrast_floor``, a truncated prior; ``dataset.
refine_noise_model`` sets it): with a Gaussian prior reaching 0, an empty image is
explained by the physics model at a contrast near 0 at an Occam cost of only a few nats,
and the junk probability ranks the images but is too low (a research prototype on
RELION-projected data, 2 000 particles at SNR 0.1 with 11 % junk: AUC 0.999, but a junk
fraction of 0.07 fitted; on a toy with a known posterior, benchmarks/noise/
junk_calibration.py, the floor brings the fitted fraction within 0.005 of the truth,
median over 27 settings, against 0.047 without it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from cryosvi.physics.noise import NoiseModel, gaussian_log_likelihood

MODELS = ("particle", "noise", "structureless")
"""The columns of the (N, 3) log evidences and the mixture weights."""


def null_log_evidence(images: Tensor, noise: NoiseModel, group: Tensor | None = None,
                      white: tuple[float, float] | None = None) -> Tensor:
    """(..., 2) float64: log p(x | noise) and log p(x | structureless) of images (..., L,
    L) of optics groups ``group`` (...) (None: group 0). ``white`` (std, offset): the
    particle model's likelihood is white noise of that std about that offset, which
    counts the images' DC coordinate (``distributions.WhiteNoise``): the nulls then count
    it too (``offset_log_density``), so that the three evidences are densities on the
    same space."""
    x = images.double()
    total = noise.spectra(group, x)
    power = noise.signal_power.to(x.device)
    power = power[0] if group is None else power[group.to(x.device).long()]
    out = torch.stack([gaussian_log_likelihood(x, total, True, noise.cropped, noise.level_std),
                       gaussian_log_likelihood(x, total + power, True, noise.cropped,
                                               noise.level_std)], -1)
    if white is not None:
        out = out + offset_log_density(images, *white)[..., None]
    return out


def offset_log_density(images: Tensor, std: float, offset: float) -> Tensor:
    """(...,) float64: the log density of the images' (..., L, L) DC coordinate (the pixel
    mean times L, the image's component along the unit constant image) when the image
    is ``offset`` plus white noise of ``std``: N(L offset, std^2)."""
    side = math.sqrt(images.shape[-2] * images.shape[-1])
    coordinate = (images.double().mean((-2, -1)) - float(offset)) * side
    return -0.5 * (coordinate / std).square() - 0.5 * math.log(2 * math.pi * std**2)


ROW_BLOCK = 1 << 16
"""Images whose models' posteriors are computed at a time: the temporaries of a
million images' (N, K) float64 evidences would otherwise be a few hundred MB."""


def _blocks(count: int) -> Iterator[slice]:
    return (slice(start, start + ROW_BLOCK) for start in range(0, count, ROW_BLOCK))


def _log_posteriors(log_evidence: Tensor, weights: Tensor) -> Tensor:
    """(N, K) log posterior probabilities of the K models."""
    joint = log_evidence.double() + weights.double().log().to(log_evidence.device)
    return joint - torch.logsumexp(joint, -1, keepdim=True)


def junk_probability(log_evidence: Tensor, weights) -> Tensor:
    """(N,) the posterior probability that each image is junk, 1 - p(particle | x), from
    its log evidences (N, K) (``MODELS`` order) and the mixture weights (K,)."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    log_evidence = torch.as_tensor(log_evidence)
    out = torch.empty(len(log_evidence), dtype=torch.float64, device=log_evidence.device)
    for rows in _blocks(len(log_evidence)):
        # 0 - expm1, not -expm1: a certain particle is written 0, not -0
        out[rows] = 0.0 - torch.expm1(_log_posteriors(log_evidence[rows], weights)[:, 0])
    return out


def log_bayes_factor(log_evidence: Tensor, weights) -> Tensor:
    """(N,) log of p(x | junk) / p(x | particle), p(x | junk) the nulls' mixture with
    their relative weights w_1 / pi, w_2 / pi: the evidence for junk, independent of the
    junk fraction (a user may threshold it)."""
    log_evidence = torch.as_tensor(log_evidence).double()
    weights = torch.as_tensor(weights, dtype=torch.float64)
    nulls = weights[1:] / weights[1:].sum()
    junk = torch.logsumexp(log_evidence[:, 1:] + nulls.log(), -1)
    return junk - log_evidence[:, 0]


class JunkMixture(NamedTuple):
    """weights (K,): the mixture weights (``MODELS`` order, or the caller's K models with
    the particle first); junk_fraction: the nulls' weights summed;
    p_junk (N,): each image's junk probability; iterations: EM steps taken;
    log_likelihood: the mixture's log-likelihood of the data set at the weights."""

    weights: Tensor
    junk_fraction: float
    p_junk: Tensor
    iterations: int
    log_likelihood: float


def fit_junk_mixture(log_evidence: Tensor, initial: float = 0.9,
                     iterations: int = 1000, tol: float = 1e-9,
                     min_weight: float = 1e-8) -> JunkMixture:
    """The mixture weights of the models by EM from the images' log evidences (N, K)
    (the particle first, then K - 1 >= 1 nulls: ``MODELS`` for an inference; float64 in
    the computation), from the particle's weight ``initial`` and the nulls' sharing the
    rest: the E-step's responsibilities are the models' posterior probabilities, the
    M-step's weights their means over the images (Dempster, Laird & Rubin 1977), until
    no weight moves by more than ``tol``. The likelihood never decreases. Weights are
    kept >= ``min_weight`` so that a model can come back."""
    log_evidence = torch.as_tensor(log_evidence).double()
    if log_evidence.dim() != 2 or log_evidence.shape[1] < 2 or \
            not torch.isfinite(log_evidence).all():
        raise ValueError(f"log evidences must be finite (N, K >= 2), got "
                         f"{tuple(log_evidence.shape)}")
    nulls = log_evidence.shape[1] - 1
    weights = torch.tensor([initial] + [(1 - initial) / nulls] * nulls, dtype=torch.float64,
                           device=log_evidence.device)
    step = 0
    for step in range(1, iterations + 1):
        new = sum(_log_posteriors(log_evidence[rows], weights).exp().sum(0)
                  for rows in _blocks(len(log_evidence)))
        new = (new / len(log_evidence)).clamp_min(min_weight)
        new = new / new.sum()
        done = bool((new - weights).abs().max() < tol)
        weights = new
        if done:
            break
    total = sum(float(torch.logsumexp(log_evidence[rows] + weights.log(), -1).sum())
                for rows in _blocks(len(log_evidence)))
    return JunkMixture(weights, float(weights[1:].sum()),
                       junk_probability(log_evidence, weights), step, total)


def assess_junk(log_evidence) -> JunkMixture:
    """``fit_junk_mixture`` over a data set's log evidences (N, 3), whatever their values:
    a physics evidence that is NaN or -inf (no draw with a finite likelihood) counts as
    -inf (the image is junk to the physics model), the mixture is fitted on the rows
    that are all finite, and every row gets its junk probability (NaN where a null's
    evidence is not finite: a broken image). ``iterations`` 0 and the default weights
    when no row is finite."""
    log_evidence = torch.as_tensor(log_evidence).double().clone()
    log_evidence[:, 0] = torch.nan_to_num(log_evidence[:, 0], nan=-torch.inf,
                                          posinf=-torch.inf)
    finite = torch.isfinite(log_evidence).all(1)
    if bool(finite.any()):
        fit = fit_junk_mixture(log_evidence if bool(finite.all()) else log_evidence[finite])
        weights, iterations, total = fit.weights, fit.iterations, fit.log_likelihood
    else:
        weights = torch.tensor((0.9, 0.05, 0.05), dtype=torch.float64)  # fit's start
        iterations, total = 0, float("nan")
    p_junk = junk_probability(log_evidence, weights)
    p_junk[~torch.isfinite(log_evidence[:, 1:]).all(1)] = torch.nan  # a broken image
    return JunkMixture(weights, float(weights[1:].sum()), p_junk, iterations, total)


def junk_weights(log_bayes: Tensor) -> tuple[Tensor, float]:
    """Each particle's weight 1 - p(junk) (n,) float64 and the fitted junk fraction,
    from the log Bayes factors (n,) of the particle model against an empty image (e.g.
    ``learnt_modes.AmplitudeFit.log_bayes``): the two-model mixture (particle, empty
    image) fitted by EM over the particles (``fit_junk_mixture``). Empty images and
    images without the molecule's structure at its pose (phase-scrambled particles,
    aggregates) are explained no better by the molecule than by an empty image and get
    weight ~0."""
    log_bayes = log_bayes.double()
    mixture = fit_junk_mixture(torch.stack([log_bayes, torch.zeros_like(log_bayes)], -1))
    return 1.0 - mixture.p_junk, mixture.junk_fraction
