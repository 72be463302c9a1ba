"""Posterior of every particle from a trained guide (one batched network pass), refined by
the physics likelihood, as STAR/npz.

Summaries per particle: ``cryosvi.posterior``. Refinement with the physics likelihood
(``refine``), by the generic samplers of ``cryosvi.inference.laplace`` and ``cryosvi.inference.smc``:

* 'laplace': Gauss-Newton from the guide's best draws to the posterior mode, importance
  sampling from the Laplace approximation there, and tempered SMC for the particles
  where that fails. Measured on the demo's 2 000 held-out particles (SNR 20, 2-core
  CPU): the same accuracy and coverage as 'smc' at about 5x its speed (README,
  "Inference"); at SNR 10 and below it under-covers;
* 'auto' (the default): 'laplace' for batches of SNR >= 15, else 'smc' with 12 moves;
* 'is': importance sampling with the guide as proposal (weights p(x | z) p(z) / q(z |
  x), self-normalised; the effective sample size (sum w)^2 / sum w^2 per particle);
* 'smc': adaptive tempered SMC from the guide to the posterior (resample-move with
  random-walk Metropolis moves).
"""

from __future__ import annotations

import math

import torch
from pyro import poutine

from cryosvi.guide import Guide
from cryosvi.inference.laplace import gauss_newton, laplace_log_evidence, laplace_proposal
from cryosvi.latents import PAPER_SITES, REGISTRY, Chart, forward_inputs, random_walks
from cryosvi.physics.conditions import Conditions
from cryosvi.model import model
from cryosvi.posterior import posterior_summary, weighted_summary
from cryosvi.inference.importance import importance_weights
from cryosvi.inference.smc import tempered_smc


@torch.no_grad()
def log_joint(forward, priors, noise_std: float, images: torch.Tensor, values: dict,
              conditions: Conditions | None = None, latents=PAPER_SITES) -> torch.Tensor:
    """log p(x, z) of the model for samples ``values`` (site -> (S, B, ...)) of images
    (B, L, L) with the batch's ``conditions``; returns (S, B)."""
    n_samples, batch = next(iter(values.values())).shape[:2]
    flat = {s: v.reshape(n_samples * batch, *v.shape[2:]) for s, v in values.items()}
    tiled = images.unsqueeze(0).expand(n_samples, *images.shape).reshape(
        n_samples * batch, *images.shape[1:])
    tiled_conditions = (conditions or Conditions()).expand(n_samples)
    trace = poutine.trace(poutine.condition(model, data=flat)).get_trace(
        forward, priors, noise_std, images=tiled, conditions=tiled_conditions,
        latents=latents)
    trace.compute_log_prob()
    total = sum(node["log_prob"] for node in trace.nodes.values()
                if node["type"] == "sample")
    return total.reshape(n_samples, batch)


def _tile(values: dict, n: int) -> dict:
    """Values site -> (B, ...) repeated n times along the batch, (n * B, ...)."""
    return {s: v.repeat(n, *([1] * (v.dim() - 1))) for s, v in values.items()}


@torch.no_grad()
def laplace_refine(guide: Guide, forward, priors, noise_std: float, images: torch.Tensor,
                   known: dict | None, n_samples: int, starts: int = 2, pool: int = 32,
                   coarse: int = 4, iterations: int = 4, blur: float = 0.1,
                   chunk: int = 16, conditions: Conditions | None = None) -> dict:
    """Gauss-Newton from the guide's best draws to the posterior mode, then importance
    sampling from the Laplace approximation there (``cryosvi.inference.laplace``).

    The guide draws ``pool`` samples per particle; the ``starts`` of highest p(x, z)
    take Levenberg-Marquardt steps in the latents' charts (``latents.Chart``: rotation
    vectors for the pose): ``coarse`` steps on residuals low-passed by a Gaussian of
    ``blur`` x box pixels (a wider basin: measured on the demo, 5.5 % of the particles
    ended in a wrong local mode with it against 8.6 % without), then ``iterations`` on
    the full residuals. The mode of highest Laplace evidence gives the proposal N(mode,
    H^-1); its ``n_samples`` draws are weighted by p(x, z) / q(z) (q per unit of each
    prior's base measure, e.g. S^3's surface for the pose). Evaluations of the forward
    model per particle: pool + starts (coarse + iterations + 2) (d + 1) + n_samples
    (d: the chart's dimension).

    Returns the summary keys of ``weighted_summary`` plus 'samples', 'weights' (S, B),
    'ess' (B,): the effective sample size of these weights (how Gaussian the posterior
    is around the mode) and 'objective' (B,): -log p(x, z) + const at the mode.
    """
    known = dict(known or {})
    conditions = conditions or Conditions()
    latents = guide.config.latents
    batch = images.shape[0]
    chart = Chart(latents, guide.config)
    guide_draws = posterior_summary(guide, images, known, max(pool, starts),
                                    conditions=conditions)["samples"]
    log_p = _log_target(forward, priors, noise_std, images, guide_draws, known, conditions,
                        latents, chunk)
    top = log_p.topk(starts, dim=0).indices  # (M, B)
    columns = torch.arange(batch, device=images.device).expand(starts, batch)
    # M starts of B particles are one batch of M B problems, in (M, B) order.
    point = {s: v[top, columns].reshape(1, starts * batch, *v.shape[2:])
             for s, v in guide_draws.items()}
    tiled_images = images.repeat(starts, 1, 1)
    tiled_known = _tile(known, starts)
    tiled_conditions = conditions.expand(starts)
    box = images.shape[-1]
    frequency = torch.fft.fftfreq(box, device=images.device)
    low_pass = torch.exp(-2 * (math.pi * blur * box) ** 2
                         * (frequency[:, None] ** 2 + frequency[None, :] ** 2))

    def residuals(values, smooth=False):
        """(n, M B, P) whitened residuals of values site -> (n, M B, ...)."""
        out = []
        for i in range(0, next(iter(values.values())).shape[0], chunk):
            part = {s: v[i:i + chunk] for s, v in values.items()}
            m = next(iter(part.values())).shape[0]
            flat = {s: v.reshape(m * starts * batch, *v.shape[2:]) for s, v in part.items()}
            clean = forward(**forward_inputs({**_tile(tiled_known, m), **flat},
                                             tiled_conditions.expand(m)))
            # (m, M B, L, L) against the images broadcast, not copied m times
            residual = (clean.view(m, *tiled_images.shape) - tiled_images) / noise_std
            if smooth:
                residual = torch.fft.ifft2(torch.fft.fft2(residual) * low_pass).real
            out.append(residual.reshape(m, starts * batch, -1))
        return torch.cat(out)

    def log_prior(values):
        """(n, M B) log prior of values site -> (n, M B, ...)."""
        n = next(iter(values.values())).shape[0]
        tiled = tiled_conditions.expand(n)
        return sum(REGISTRY[s].prior(priors, tiled, forward.coords)
                   .log_prob(values[s].reshape(n * starts * batch, *values[s].shape[2:]))
                   for s in latents).reshape(n, starts * batch)

    def select(mask, first, second):
        return {s: torch.where(mask.view(1, -1, *([1] * (first[s].dim() - 2))),
                               first[s], second[s]) for s in first}

    steps = chart.steps(images)
    if coarse:
        point = gauss_newton(point, lambda v: residuals(v, smooth=True), log_prior,
                             chart.retract, select, steps, iterations=coarse).point
    result = gauss_newton(point, residuals, log_prior, chart.retract, select, steps,
                          iterations=iterations)
    evidence = laplace_log_evidence(result.objective, result.precision).view(starts, batch)
    best = evidence.argmax(0) * batch + torch.arange(batch, device=images.device)
    mode = {s: v[:, best] for s, v in result.point.items()}  # (1, B, ...)
    delta, log_q = laplace_proposal(result.precision[best], n_samples)
    values = chart.retract(mode, delta.to(images.dtype))
    log_q = log_q - chart.log_volume(delta).double()
    log_p = _log_target(forward, priors, noise_std, images, values, known, conditions,
                        latents, chunk)
    weights, ess = importance_weights(log_p.double(), log_q)
    weights = weights.to(images.dtype)
    return {**weighted_summary(values, weights), "samples": values, "weights": weights,
            "ess": ess.to(images.dtype), "objective": result.objective[best]}


LAPLACE_MIN_SNR = 15.0
"""'auto' refines a batch by 'laplace' when its SNR is at least this, else by 'smc'.
Measured on held-out simulations of the paper preset (256 particles, same guide and
seeds for both methods; README, "Inference"): at SNR 20 both reach 95 % coverage
0.93-0.94 (Laplace ~5x faster); at SNR 10 the Laplace path covers the mode 0.89 (SMC
0.95), at SNR 5 0.84 (0.93), at SNR 1 0.69 (0.90): with broader posteriors its two
starts miss modes that the SMC's population finds."""


LOW_SNR_MOVES = 12
"""Metropolis moves per tempering step when 'auto' hands a whole batch (SNR < 15) to the
SMC. Measured (256 held-out particles of the paper preset, own guide per SNR): at SNR 0.1
3 moves gave 95 % coverage 0.84 / 0.72 / 0.76 (defocus / mode / pose) and pose median 7.5
deg, 6 moves 0.92 / 0.89 / 0.84 and 4.8 deg, 12 moves 0.91 / 0.89 / 0.91 and 4.4 deg; at
SNR 1 3 moves 0.95 / 0.90 / 0.88 (pose median 1.05 deg), 12 moves 0.94 / 0.91 / 0.91
(1.03 deg). About 4x the cost of 3 moves."""


def batch_snr(images: torch.Tensor, noise_std: float) -> float:
    """The SNR of a batch of images (B, L, L) with white noise of ``noise_std`` (the
    paper's definition, variance of the clean images over that of the noise):
    var(images) / noise_std^2 - 1 over all pixels of the batch."""
    return float(images.double().var() / noise_std ** 2 - 1.0)


def _stuck(objective: torch.Tensor, ess: torch.Tensor, n_samples: int, pixels: int,
           outlier: float = 4.0, min_ess: float = 0.25) -> torch.Tensor:
    """(B,) bool: the particles whose Laplace refinement is not to be trusted: a mode
    whose -log p(x, z) lies more than ``outlier`` robust standard deviations above the
    batch's median (a local mode: the true one fits the image better), or an ESS below
    ``min_ess`` S (a posterior far from Gaussian). The spread is the batch's (1.4826
    MAD) but at least that of noise alone: |r|^2 / 2 over P whitened pixels has std
    sqrt(P / 2)."""
    centre = objective.median()
    spread = torch.maximum(1.4826 * (objective - centre).abs().median(),
                           torch.tensor(math.sqrt(pixels / 2), dtype=objective.dtype,
                                        device=objective.device))
    return (objective > centre + outlier * spread) | (ess < min_ess * n_samples)


def _log_target(forward, priors, noise_std, images, values, known, conditions, latents,
                chunk):
    """log p(x, z) (S, B) of values site -> (S, B, ...) with the fixed sites ``known``
    (B, ...), ``chunk`` samples at a time; NaN (a broken image) becomes -inf."""
    n = next(iter(values.values())).shape[0]
    values = {**{s: v.unsqueeze(0).expand(n, *v.shape) for s, v in known.items()},
              **values}
    parts = [log_joint(forward, priors, noise_std, images,
                       {s: v[i:i + chunk] for s, v in values.items()}, conditions, latents)
             for i in range(0, n, chunk)]
    return torch.nan_to_num(torch.cat(parts), nan=-math.inf)


@torch.no_grad()
def refine(guide: Guide, forward, priors, noise_std: float, images: torch.Tensor,
           known: dict | None, n_samples: int, method: str = "smc", moves: int = 2,
           max_steps: int = 40, ess_target: float = 0.5, chunk: int = 16,
           conditions: Conditions | None = None) -> dict:
    """Refine the guide's posterior with the physics likelihood (``cryosvi.inference.smc``).

    method 'is': self-normalised importance sampling, S proposals per particle from the
    guide, weights p(x, z) / q(z | x).

    method 'smc': adaptive tempered SMC from the guide to the posterior along
    pi_b(z) ~ q(z | x)^(1 - b) p(x, z)^b (``tempered_smc`` with each latent's random
    walk, ``cryosvi.latents.random_walks``):
    ``moves`` Metropolis moves per step, at most ``max_steps`` steps, each keeping the
    ESS at ``ess_target`` * S. The likelihood is evaluated ``chunk`` samples at a time.

    method 'laplace' (``laplace_refine``): Gauss-Newton to the posterior mode and
    importance sampling from the Laplace approximation there; the particles where that
    is not to be trusted (``_stuck``: a local mode, or an ESS below S / 4) are refined
    by 'smc' instead ('smc_fallback' (B,) bool says which).

    method 'auto': 'laplace' if the batch's SNR (``batch_snr``) is at least
    ``LAPLACE_MIN_SNR``, else 'smc' with at least ``LOW_SNR_MOVES`` moves (then
    'smc_fallback' is True for the whole batch).

    Returns the summary (each inferred latent's mean and std keys) plus 'ess' (B,): the
    ESS of importance sampling with the guide as proposal (the guide's quality; for
    'laplace' with the Laplace proposal, also where the SMC then ran), 'weights' (S, B),
    'samples' and, for smc, 'steps' (B,) and 'acceptance' (B,).
    """
    if method not in ("is", "smc", "laplace", "auto"):
        raise ValueError(f"unknown refinement {method!r} (auto, laplace, smc or is)")
    known = dict(known or {})
    conditions = conditions or Conditions()
    whole_batch_smc = (method == "auto"
                       and batch_snr(images, noise_std) < LAPLACE_MIN_SNR)
    if method == "auto":
        method = "smc" if whole_batch_smc else "laplace"
        moves = max(moves, LOW_SNR_MOVES) if whole_batch_smc else moves
    sampler = dict(n_samples=n_samples, moves=moves, max_steps=max_steps,
                   ess_target=ess_target, chunk=chunk)
    if method != "laplace":
        out = _from_guide(guide, forward, priors, noise_std, images, known, conditions,
                          method, **sampler)
        if whole_batch_smc:
            out["smc_fallback"] = torch.ones(images.shape[0], dtype=torch.bool,
                                             device=images.device)
        return out
    out = laplace_refine(guide, forward, priors, noise_std, images, known, n_samples,
                         chunk=chunk, conditions=conditions)
    stuck = _stuck(out.pop("objective"), out["ess"], n_samples, images[0].numel())
    rows = stuck.nonzero()[:, 0]
    if len(rows):
        smc = _from_guide(guide, forward, priors, noise_std, images[rows],
                          {s: v[rows] for s, v in known.items()}, conditions.take(rows),
                          "smc", **sampler)
        _put_rows(out, smc, rows)
    out["smc_fallback"] = stuck
    return out


def _put_rows(out: dict, part: dict, rows: torch.Tensor) -> None:
    """Write the summary ``part`` of the particles ``rows`` into ``out`` in place:
    samples (S, B, ...) and weights (S, B) along B, the summary keys (B, ...); 'ess' is
    kept (the Laplace proposal's: why those particles were handed over)."""
    for key, value in out.items():
        if key == "samples":
            for site in value:
                value[site][:, rows] = part["samples"][site]
        elif key == "weights":
            value[:, rows] = part[key]
        elif key != "ess":
            value[rows] = part[key]


def _from_guide(guide: Guide, forward, priors, noise_std: float, images: torch.Tensor,
                known: dict, conditions: Conditions, method: str, n_samples: int,
                moves: int, max_steps: int, ess_target: float, chunk: int) -> dict:
    """'is' or 'smc' of ``refine``: the guide's S draws, importance-weighted or tempered
    to the posterior."""
    base = posterior_summary(guide, images, known, n_samples, conditions=conditions)
    features = base["features"]
    known_values = {s: v.unsqueeze(0).expand(n_samples, *v.shape) for s, v in known.items()}
    latents = guide.config.latents

    def log_target(samples):
        return _log_target(forward, priors, noise_std, images, samples, known, conditions,
                           latents, chunk)

    def log_proposal(samples):
        return guide.log_prob_at(features, {**known_values, **samples}, conditions)

    values, log_q = base["samples"], base["log_q"]
    log_p = log_target(values)
    weights, ess = importance_weights(log_p, log_q)
    out = dict(base)
    out["ess"] = ess
    if method == "smc":
        result = tempered_smc(values, log_target, log_proposal,
                              random_walks(latents, guide.config),
                              log_p=log_p, log_q=log_q, moves=moves, max_steps=max_steps,
                              ess_target=ess_target)
        values = result.values
        weights = torch.full_like(log_p, 1.0 / n_samples)
        out["steps"], out["acceptance"] = result.steps, result.acceptance
    out["samples"] = values
    out["weights"] = weights
    out.update(weighted_summary(values, weights))
    return out
