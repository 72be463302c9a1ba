"""Posterior of every particle from a trained guide (one batched network pass), refined by
the physics likelihood.

Summaries per particle: ``cryosvi.posterior``. Refinement with the physics likelihood
(``refine``), by the generic samplers of ``cryosvi.inference.laplace`` and
``cryosvi.inference.smc``; the methods (``REFINERS``):

* 'laplace': Gauss-Newton from the guide's best draws to the posterior mode, importance
  sampling from the Laplace approximation there, and tempered SMC for the particles
  where that fails. Measured on the demo's 2 000 held-out particles (SNR 20, 2-core
  CPU): the same accuracy and coverage as 'smc' at about 5x its speed (README,
  "Inference"); at SNR 10 and below it under-covers;
* 'grid' (``cryosvi.inference.grid``): for a run that infers the conformational
  amplitudes alone (``train --latents modes``: pose, CTF and shifts given), at most 2
  of them: the exact posterior by deterministic quadrature (1 mode: an adaptive
  lattice, 56 evaluations per particle; 2 modes: 6 x 6 cells, the heaviest split, 100),
  no guide and no random number. Against 'smc' with 12 moves on the same particles
  (one thread; benchmarks/fast_inference.py, benchmarks/results/fast_inference/): 1
  mode 27-29x its CPU speed, 2 modes 21-22x (32-39x and 22-29x that of commit 391a5bb's
  SMC, the previous default), at its accuracy (|Spearman| with the true conformation
  on the realistic poses-given set 0.886 against 0.885 on 256 particles, 0.9016 on all
  2 000) and calibration (95 % coverage on cryosvi's own SNR 0.1 simulations 0.938
  with 1 mode, 0.945 with 2, on 2 000 particles);
* 'joint' (``cryosvi.inference.joint``): for a run that infers 1-2 conformational
  amplitudes with the pose, CTF or shifts: the Laplace fit, the amplitudes' profile
  (the other latents refitted at each node), the amplitudes on the grid with the
  others at their Laplace approximations, importance sampling from that; a retry from
  more starts, then 'smc', for the particles where it fails. At SNR ~1 (one mode):
  5.6-6.5x the speed of 'smc' with 12 moves at its accuracy and calibration
  (``JOINT_MIN_SNR``);
* 'auto' (the default): 'grid' where it applies (every inferred latent
  ``conformational``, at most ``grid.MAX_DIM`` dimensions), else 'laplace' for data
  sets of SNR >= 15 (``dataset_snr``), else 'joint' for one amplitude inferred with
  other latents at SNR >= 0.75 (``JOINT_MIN_SNR``), else 'smc' with 12 moves;
* 'is': importance sampling with the guide as proposal (weights p(x | z) p(z) / q(z |
  x), self-normalised; the effective sample size (sum w)^2 / sum w^2 per particle);
* 'smc': adaptive tempered SMC from the guide to the posterior (resample-move with
  random-walk Metropolis moves).

A particle's result depends only on the particle, the run, the settings and the seed:
every random number comes from the particle's own stream (``Batch.noise``, a
``cryosvi.randomness.Streams``; the grid draws none), 'auto' decides by the run's
latents and the data set's SNR, the grid's extra levels are decided per particle, the
Laplace and joint paths hand a particle on by a test of that particle alone
(``_stuck``), and the SMC stops each particle's chain when it reaches the posterior.

Adding a method: a function ``(batch: Batch, settings: Settings) -> dict`` (the summary
keys of ``weighted_summary`` plus 'samples', 'weights' and 'ess', and 'log_evidence'
for the junk probability, see ``refine``) in a module of its own, and its entry in
``REFINERS``; the command line offers every name there (``METHODS``). Its random
numbers come from ``batch.noise`` under a key of its own (``KEYS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from pyro import poutine

from cryosvi.errors import CryosviError
from cryosvi.guide import Guide
from cryosvi.inference.laplace import laplace_proposal
from cryosvi.inference.laplace_fit import LAPLACE_STARTS, laplace_fit
from cryosvi.latents import PAPER_SITES, random_walks
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.noise import NoiseModel, chi2_misfit_limit
from cryosvi.model import model
from cryosvi.posterior import posterior_summary, weighted_summary
from cryosvi.inference.grid import check_grid, grid_dimension, grid_refine
from cryosvi.inference.importance import importance_log_evidence, importance_weights
from cryosvi.inference.joint import (RETRY_POOL, RETRY_STARTS, check_joint,
                                     joint_dimension, joint_refine)
from cryosvi.inference.smc import tempered_smc

KEYS = {"guide": 1, "smc": 2, "laplace_pool": 3, "laplace_proposal": 4, "joint": 5}
"""The first part of the key of each stage's draws in a particle's stream: the guide's
samples (the guide alone, 'is', 'smc' and the fallbacks of the Laplace and joint paths,
which so give a particle the result 'smc' would), the SMC's moves, the pool of guide
draws of the Laplace and joint paths' fit, the Laplace proposal and the joint path's
draws. A new method takes a number of its own."""


@torch.no_grad()
def log_joint(forward, priors, noise_std: float | NoiseModel, images: torch.Tensor,
              values: dict, conditions: Conditions | None = None,
              latents=PAPER_SITES, given=()) -> torch.Tensor:
    """log p(x, z | given) of the model for samples ``values`` (site -> (S, B, ...)) of
    images (B, L, L) with the batch's ``conditions``; returns (S, B). ``noise_std``: the
    white noise's std, or the run's ``NoiseModel`` (coloured noise per optics group,
    offset and contrast integrated out: ``cryosvi.model``). The sites ``given`` (values
    the particle file fixes, e.g. consensus poses) are conditioned on: their priors are
    not counted, so that what integrates this over z is the evidence p(x | given), on the
    same footing as the junk nulls' p(x) (``cryosvi.inference.junk``). Counting them
    would add a per-particle log density of the given values (about -12 nats for a pose
    and a defocus) that the nulls lack."""
    n_samples, batch = next(iter(values.values())).shape[:2]
    flat = {s: v.reshape(n_samples * batch, *v.shape[2:]) for s, v in values.items()}
    tiled = images.unsqueeze(0).expand(n_samples, *images.shape).reshape(
        n_samples * batch, *images.shape[1:])
    tiled_conditions = (conditions or Conditions()).expand(n_samples)
    trace = poutine.trace(poutine.condition(model, data=flat)).get_trace(
        forward, priors, noise_std, images=tiled, conditions=tiled_conditions,
        latents=latents)
    trace.compute_log_prob()
    total = sum(node["log_prob"] for name, node in trace.nodes.items()
                if node["type"] == "sample" and name not in given)
    return total.reshape(n_samples, batch)


@dataclass
class Batch:
    """A batch of particles to refine and what their posterior needs: the trained
    ``guide``, the ``forward`` model, the ``priors`` and white-noise std of the model,
    images (B, L, L), the values (B, ...) of the latents fixed to ``known`` ones, the
    particles' ``conditions`` (``Conditions``), their random streams ``noise``
    (``cryosvi.randomness.Streams`` over the B particles; None: torch's global
    generator), how many samples per particle the likelihood evaluates at once
    (``chunk``), and the run's ``noise_model`` (``cryosvi.physics.noise.NoiseModel`` at
    the images' box), which replaces the white noise of ``noise_std`` in the likelihood
    when given (None: white noise, the numbers of a run without one)."""

    guide: Guide
    forward: object
    priors: object
    noise_std: float
    images: torch.Tensor
    known: dict
    conditions: Conditions
    noise: object = None
    chunk: int = 16
    noise_model: NoiseModel | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def likelihood(self) -> float | NoiseModel:
        """What the model's measurement site takes: the noise model, else the std."""
        return self.noise_std if self.noise_model is None else self.noise_model

    @property
    def pixels(self) -> int:
        """P: the whitened residuals' degrees of freedom per image: its pixels for white
        noise; for a noise model, the coefficients it counts (``NoiseModel.dimensions``:
        DC, and for a cropped box the Nyquist row and column, left out)."""
        if self.noise_model is not None:
            return self.noise_model.dimensions
        return self.images[0].numel()

    def take(self, rows: torch.Tensor) -> "Batch":
        """The particles ``rows`` of the batch (with their own random streams)."""
        return replace(self, images=self.images[rows],
                       known={s: v[rows] for s, v in self.known.items()},
                       conditions=self.conditions.take(rows),
                       noise=None if self.noise is None else self.noise.take(rows))

    def stream(self, stage: str):
        """The particles' streams for the draws of ``stage`` (``KEYS``), or None."""
        return None if self.noise is None else self.noise.child(KEYS[stage])

    def log_target(self, values: dict) -> torch.Tensor:
        """log p(x, z | known) (S, B) of values site -> (S, B, ...) given the known sites,
        ``chunk`` samples at a time; NaN (a broken image) becomes -inf."""
        return _log_target(self.forward, self.priors, self.likelihood, self.images, values,
                           self.known, self.conditions, self.guide.config.latents,
                           self.chunk)


@dataclass(frozen=True)
class Settings:
    """How to refine: ``n_samples`` S per particle; for the SMC ``moves`` Metropolis
    moves per tempering step, at most ``max_steps`` steps, each keeping the ESS at
    ``ess_target`` S; ``snr``: the data set's SNR (``dataset_snr``), which 'auto' needs;
    ``starts``: the Laplace path's Gauss-Newton starts (``laplace_refine``)."""

    n_samples: int
    moves: int = 2
    max_steps: int = 40
    ess_target: float = 0.5
    snr: float | None = None
    starts: int = LAPLACE_STARTS


@torch.no_grad()
def laplace_refine(guide: Guide, forward, priors, noise_std: float | NoiseModel,
                   images: torch.Tensor,
                   known: dict | None, n_samples: int, starts: int = LAPLACE_STARTS,
                   pool: int = 32, coarse: int = 4, iterations: int = 4, blur: float = 0.1,
                   chunk: int = 16, conditions: Conditions | None = None,
                   noise=None) -> dict:
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
    (d: the chart's dimension). ``noise``: the particles' random streams (the pool takes
    the child ``KEYS['laplace_pool']``, the proposal ``KEYS['laplace_proposal']``).

    Returns the summary keys of ``weighted_summary`` plus 'samples', 'weights' (S, B),
    'ess' (B,): the effective sample size of these weights (how Gaussian the posterior
    is around the mode), 'objective' (B,): -log p(x, z) + const at the mode, and
    'misfit' (B,): its likelihood part |r|^2 / 2 over the P whitened pixels, and
    'log_evidence' (B,) float64: log p(x) estimated by the importance sampling.
    ``noise_std``: the white noise's std or the run's ``NoiseModel`` (``log_joint``).
    """
    conditions = conditions or Conditions()
    batch = images.shape[0]
    problem = Batch(guide, forward, priors, noise_std, images, dict(known or {}),
                    conditions, noise, chunk)
    fit = laplace_fit(problem, starts=starts, pool=pool, coarse=coarse,
                      iterations=iterations, blur=blur)
    chart, mode = fit.chart, fit.mode
    eps = None if noise is None else noise.child(KEYS["laplace_proposal"]).normal(
        (n_samples, batch, chart.dim), axis=1, dtype=fit.precision.dtype)
    delta, log_q = laplace_proposal(fit.precision, n_samples, noise=eps)
    values = chart.retract(mode, delta.to(images.dtype))
    log_q = log_q - chart.log_volume(delta).double()
    log_p = problem.log_target(values)
    weights, ess = importance_weights(log_p.double(), log_q)
    weights = weights.to(images.dtype)
    return {**weighted_summary(values, weights), "samples": values, "weights": weights,
            "ess": ess.to(images.dtype), "objective": fit.objective, "misfit": fit.misfit,
            "log_evidence": importance_log_evidence(log_p.double(), log_q)}


LAPLACE_MIN_SNR = 15.0
"""'auto' refines a data set by 'laplace' when its SNR (``dataset_snr``) is at least
this. Measured on held-out simulations of the paper preset (256 particles, same guide
and seeds for both methods; README, "Inference"): at SNR 20 it and the SMC reach 95 %
coverage 0.93-0.94 (Laplace ~5x faster); at SNR 10 the Laplace path covers the mode
0.89 (SMC 0.95), at SNR 5 0.84 (0.93), at SNR 1 0.69 (0.90): with broader posteriors
its starts stop in wrong conformations (an ANM mode's likelihood has narrow peaks, and
a pose a few degrees off suits a wrong one; with 8 starts on cryosvi's own SNR 1
simulations |Spearman| of the mode 0.78 against the SMC's 0.96, 95 % coverage 0.75
against 0.91: benchmarks/results/fast_inference/joint_sim_snr1_128.json). Below it,
'auto' takes 'joint' (``JOINT_MIN_SNR``), which searches the conformation's profile."""

JOINT_MIN_SNR = 0.75
"""'auto' refines a run that infers one conformational amplitude with the pose or the
CTF (``joint.joint_dimension`` 1) by 'joint' for data sets of SNR in [this,
``LAPLACE_MIN_SNR``), else by 'smc' with ``LOW_SNR_MOVES`` moves. Measured against the
SMC with 12 moves in the same process (benchmarks/fast_inference.py, one thread, 2-core
AMD EPYC; benchmarks/results/fast_inference/joint_path_*.json), with its fallback's 12
moves: on cryosvi's own SNR 1 simulations (256 particles) 6.5x the SMC's CPU speed
(6.2x wall), |Spearman| of the mode with the truth 0.954 (SMC 0.946), 95 % / 68 %
coverage of the mode 0.926 / 0.723 (0.922 / 0.727), pose median / p90 1.02 / 1.81 deg
(1.03 / 1.82), 2.7 % of the particles handed to the SMC; on the first 64 of them 5.6x,
0.971 (0.954), 0.922 / 0.719 (0.859 / 0.688); on the realistic ctf-shifts-given set
(SNR 0.76, 64 particles) 6.1x (5.8x wall), |Spearman| 0.953 (0.953), pose 4.08 / 6.29
deg (4.03 / 6.25). Not measured below SNR 0.76 (no joint run at SNR 0.1 to hand): such
data sets keep the SMC."""


LOW_SNR_MOVES = 12
"""Metropolis moves per tempering step when 'auto' hands a data set (SNR < 15) to the
SMC. Measured (256 held-out particles of the paper preset, own guide per SNR): at SNR 0.1
3 moves gave 95 % coverage 0.84 / 0.72 / 0.76 (defocus / mode / pose) and pose median 7.5
deg, 6 moves 0.92 / 0.89 / 0.84 and 4.8 deg, 12 moves 0.91 / 0.89 / 0.91 and 4.4 deg; at
SNR 1 3 moves 0.95 / 0.90 / 0.88 (pose median 1.05 deg), 12 moves 0.94 / 0.91 / 0.91
(1.03 deg). About 4x the cost of 3 moves."""

SNR_IMAGES = 2000
"""Particles (a fixed random subset) the data set's SNR is estimated from."""


def dataset_snr(particles, noise_std: float, max_images: int = SNR_IMAGES) -> float:
    """The SNR of a data set with white noise of ``noise_std`` (the paper's definition,
    the variance of the clean images over that of the noise): var(images) / noise_std^2
    - 1 over every pixel of up to ``max_images`` particles (the fixed random subset of
    ``dataset.image_statistics``). ``particles``: anything with ``len`` and
    ``images(indices)`` at the run's working box (``dataset.ParticleData``). One number
    per file: every batch, shard and process of a run sees the same."""
    from cryosvi.dataset import image_statistics

    _, std = image_statistics(particles, max_images)
    return float(std ** 2 / noise_std ** 2 - 1.0)


STUCK_SIGMAS = 4.0
"""``_stuck``: how many standard deviations of noise alone a mode's misfit may lie
above its expected value."""


def _stuck(misfit: torch.Tensor, ess: torch.Tensor, n_samples: int, pixels: int,
           noise_model: NoiseModel | None = None, outlier: float = STUCK_SIGMAS,
           min_ess: float = 0.25) -> torch.Tensor:
    """(B,) bool: the particles whose Laplace refinement is not to be trusted, each
    judged alone: a mode whose misfit |r|^2 / 2 over the P whitened pixels lies more
    than ``outlier`` standard deviations above what the noise expects at the true one
    (``chi2_misfit_limit``; with a ``noise_model``, its ``misfit_limit``, which allows
    for per-particle noise levels; a local mode fits the image worse), or an ESS below
    ``min_ess`` S (a posterior far from Gaussian)."""
    limit = chi2_misfit_limit(pixels, outlier) if noise_model is None \
        else noise_model.misfit_limit(outlier)
    return (misfit > limit) | (ess < min_ess * n_samples)


def _log_target(forward, priors, noise_std, images, values, known, conditions, latents,
                chunk):
    """log p(x, z | known) (S, B) of values site -> (S, B, ...) with the fixed sites
    ``known`` (B, ...), ``chunk`` samples at a time; NaN (a broken image) becomes -inf."""
    n = next(iter(values.values())).shape[0]
    values = {**{s: v.unsqueeze(0).expand(n, *v.shape) for s, v in known.items()},
              **values}
    parts = [log_joint(forward, priors, noise_std, images,
                       {s: v[i:i + chunk] for s, v in values.items()}, conditions, latents,
                       given=tuple(known))
             for i in range(0, n, chunk)]
    return torch.nan_to_num(torch.cat(parts), nan=-math.inf)


# -------------------------------------------------------------------- the methods
def guide_alone(batch: Batch, n_samples: int) -> dict:
    """The guide's posterior summary from ``n_samples`` draws per particle (no
    likelihood): ``posterior_summary`` with the particles' streams."""
    return posterior_summary(batch.guide, batch.images, batch.known, n_samples,
                             conditions=batch.conditions, noise=batch.stream("guide"))


def _from_guide(batch: Batch, settings: Settings, method: str) -> dict:
    """'is' or 'smc': the guide's S draws, importance-weighted or tempered to the
    posterior."""
    n_samples = settings.n_samples
    base = guide_alone(batch, n_samples)
    features = base["features"]
    guide = batch.guide

    def densities(part: Batch, part_features: dict):
        known_values = {s: v.unsqueeze(0).expand(n_samples, *v.shape)
                        for s, v in part.known.items()}

        def log_proposal(samples):
            return guide.log_prob_at(part_features, {**known_values, **samples},
                                     part.conditions)
        return part.log_target, log_proposal

    def subset(rows):
        return densities(batch.take(rows), {s: f[:, rows] for s, f in features.items()})

    log_target, log_proposal = densities(batch, features)
    values, log_q = base["samples"], base["log_q"]
    log_p = log_target(values)
    weights, ess = importance_weights(log_p, log_q)
    out = dict(base)
    out["ess"] = ess
    out["log_evidence"] = importance_log_evidence(log_p, log_q)
    if method == "smc":
        result = tempered_smc(values, log_target, log_proposal,
                              random_walks(guide.config.latents, guide.config),
                              log_p=log_p, log_q=log_q, moves=settings.moves,
                              max_steps=settings.max_steps,
                              ess_target=settings.ess_target, noise=batch.stream("smc"),
                              subset=subset)
        values = result.values
        weights = torch.full_like(log_p, 1.0 / n_samples)
        out["steps"], out["acceptance"] = result.steps, result.acceptance
        out["log_evidence"] = result.log_evidence
    out["samples"] = values
    out["weights"] = weights
    out.update(weighted_summary(values, weights))
    return out


def importance_refine(batch: Batch, settings: Settings) -> dict:
    """'is': self-normalised importance sampling, S proposals per particle from the
    guide, weights p(x, z) / q(z | x)."""
    return _from_guide(batch, settings, "is")


def smc_refine(batch: Batch, settings: Settings) -> dict:
    """'smc': adaptive tempered SMC from the guide to the posterior along pi_b(z) ~
    q(z | x)^(1 - b) p(x, z)^b (``tempered_smc`` with each latent's random walk,
    ``cryosvi.latents.random_walks``)."""
    return _from_guide(batch, settings, "smc")


def laplace_path(batch: Batch, settings: Settings) -> dict:
    """'laplace': ``laplace_refine``, and 'smc' for the particles where that is not to
    be trusted (``_stuck``: a local mode, or an ESS below S / 4; 'smc_fallback' (B,)
    says which); they get the result 'smc' would give them alone."""
    out = laplace_refine(batch.guide, batch.forward, batch.priors, batch.likelihood,
                         batch.images, batch.known, settings.n_samples,
                         starts=settings.starts, chunk=batch.chunk,
                         conditions=batch.conditions, noise=batch.noise)
    out.pop("objective")
    return _with_fallback(batch, settings, out)


def joint_path(batch: Batch, settings: Settings) -> dict:
    """'joint': ``cryosvi.inference.joint.joint_refine`` (the conformation on a grid,
    the other latents by their profile's Laplace approximations, importance sampling);
    for the particles where that is not to be trusted (``_stuck``, as 'laplace') the same
    again from more starts (``joint.RETRY_STARTS``), and 'smc' for those still flagged
    ('smc_fallback' (B,) says which)."""
    out = joint_refine(batch, settings)
    rows = _stuck(out["misfit"], out["ess"], settings.n_samples, batch.pixels,
                  batch.noise_model).nonzero()[:, 0]
    if len(rows):
        again = joint_refine(batch.take(rows), replace(settings, starts=RETRY_STARTS),
                             pool=RETRY_POOL)
        _put_rows(out, again, rows)
        out["ess"][rows] = again["ess"]
    return _with_fallback(batch, settings, out)


def _with_fallback(batch: Batch, settings: Settings, out: dict) -> dict:
    """``out`` with the result of 'smc' for the particles that ``_stuck`` flags by their
    'misfit' (popped) and 'ess'; 'smc_fallback' (B,) says which. The few particles
    handed over evaluate up to chunk x B samples at once, the batch's budget (the SMC's
    cost on a handful of particles is the number of its likelihood calls: measured, one
    particle with 64 samples took 1.5-2.5 s in chunks of 16, 1.0-1.6 s in one; the
    result differs only by the rounding of batched kernels)."""
    stuck = _stuck(out.pop("misfit"), out["ess"], settings.n_samples, batch.pixels,
                   batch.noise_model)
    rows = stuck.nonzero()[:, 0]
    if len(rows):
        part = batch.take(rows)
        part.chunk = max(batch.chunk, min(settings.n_samples,
                                          batch.chunk * len(batch) // len(rows)))
        _put_rows(out, smc_refine(part, settings), rows)
    out["smc_fallback"] = stuck
    return out


def needs_snr(method: str, config) -> bool:
    """Whether refinement ``method`` of a run with guide settings ``config`` needs the
    data set's SNR (``Settings.snr``): 'auto' where the grid cannot take the run."""
    return method == "auto" and grid_dimension(config.latents, config) is None


def auto_refine(batch: Batch, settings: Settings) -> dict:
    """'auto': 'grid' where every inferred latent is a conformational amplitude and
    there are at most ``grid.MAX_DIM`` of them (``grid.grid_dimension``); else 'laplace'
    where the data set's SNR (``settings.snr``) is at least ``LAPLACE_MIN_SNR``; else
    'joint' for one conformational amplitude inferred with the pose or the CTF
    (``joint.joint_dimension`` 1) at an SNR of at least ``JOINT_MIN_SNR``; else 'smc'
    (then 'smc_fallback' is True for every particle). The SMC, whole or as the
    fallback of 'joint', gets at least ``LOW_SNR_MOVES`` moves."""
    config = batch.guide.config
    if not needs_snr("auto", config):
        return grid_refine(batch, settings)
    if settings.snr is None:
        raise ValueError("refinement 'auto' needs the data set's SNR (dataset_snr)")
    if settings.snr >= LAPLACE_MIN_SNR:
        return laplace_path(batch, settings)
    settings = replace(settings, moves=max(settings.moves, LOW_SNR_MOVES))
    if joint_dimension(config.latents, config) == 1 and settings.snr >= JOINT_MIN_SNR:
        return joint_path(batch, settings)
    out = smc_refine(batch, settings)
    out["smc_fallback"] = torch.ones(len(batch), dtype=torch.bool,
                                     device=batch.images.device)
    return out


REFINERS: dict[str, Callable[[Batch, Settings], dict]] = {
    "auto": auto_refine, "joint": joint_path, "laplace": laplace_path,
    "smc": smc_refine, "is": importance_refine, "grid": grid_refine}
"""The refinements by name (``refine``'s ``method``, ``cryosvi infer --refine``)."""
METHODS = tuple(REFINERS)


def check_refinement(method: str, config) -> None:
    """CryosviError unless ``method`` can refine a run with guide settings ``config``
    (before any work): a known name, and 'grid' only for the conformational amplitudes
    alone (``grid.check_grid``)."""
    if method not in REFINERS:
        raise CryosviError(f"unknown refinement {method!r} ({', '.join(METHODS)})")
    if method == "grid":
        check_grid(config)
    if method == "joint":
        check_joint(config)


@torch.no_grad()
def refine(guide: Guide, forward, priors, noise_std: float, images: torch.Tensor,
           known: dict | None, n_samples: int, method: str = "smc", moves: int = 2,
           max_steps: int = 40, ess_target: float = 0.5, chunk: int = 16,
           conditions: Conditions | None = None, noise=None,
           snr: float | None = None, noise_model: NoiseModel | None = None) -> dict:
    """Refine the guide's posterior of images (B, L, L) with the physics likelihood by
    ``method`` (``REFINERS``: 'auto', 'joint', 'laplace', 'smc', 'is', 'grid'); ``moves``,
    ``max_steps``, ``ess_target``: the SMC's (``Settings``); ``chunk``: samples per likelihood
    evaluation; ``noise``: the particles' random streams (``cryosvi.randomness.Streams``;
    None: torch's global generator); ``snr``: the data set's SNR ('auto' needs it);
    ``noise_model``: the run's, in the likelihood instead of white noise (``Batch``).

    Returns the summary (each inferred latent's mean and std keys) plus 'ess' (B,): the
    ESS of importance sampling with the guide as proposal (the guide's quality; for
    'laplace' with the Laplace proposal, also where the SMC then ran), 'weights' (S, B),
    'samples', 'log_evidence' (B,) float64: the estimate of log p(x) (the junk
    probability's, ``cryosvi.inference.junk``) and, for smc, 'steps' (B,) and
    'acceptance' (B,); 'laplace', 'joint' and 'auto' add 'smc_fallback' (B,) bool.
    """
    if method not in REFINERS:
        raise ValueError(f"unknown refinement {method!r} ({', '.join(METHODS)})")
    batch = Batch(guide, forward, priors, noise_std, images, dict(known or {}),
                  conditions or Conditions(), noise, chunk, noise_model)
    settings = Settings(n_samples, moves, max_steps, ess_target, snr)
    return REFINERS[method](batch, settings)


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
