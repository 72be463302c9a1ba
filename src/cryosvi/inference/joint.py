"""'joint': the posterior of pose, CTF, shifts and conformation inferred together, with
the conformational amplitudes (K <= ``MAX_DIM``) integrated on a grid.

The conformation's likelihood is rough (an ANM mode of a C-alpha model has peaks 0.3-0.5
A wide: ``cryosvi.inference.grid``) and coupled to the pose (a hinge motion resembles a
small rotation), so a Gauss-Newton fit from the guide's draws often stops in a wrong
conformation with a pose a few degrees off that suits it: on cryosvi's own SNR 1
simulations, 10-30 nats below the basin the tempered SMC finds. The other latents z
(pose, defocus, shifts) are smooth where the conformation is fixed. So, per particle:

1. the Laplace fit (``laplace_fit.laplace_fit``, 2 starts from the guide's best draws);
2. the profile of the conformation: at ``PROFILE_NODES`` values a_g over the prior's mean
   +- ``PROFILE_SPAN`` stds, ``PROFILE_ITERATIONS`` Levenberg-Marquardt steps in z alone
   from the fit's, and the Laplace approximation of the marginal there, log p(x, a_g) ~
   log p(x, z_g, a_g) - log|H_g| / 2 (H_g: z's Gauss-Newton precision; the approach of
   INLA, Rue, Martino & Chopin, J. R. Stat. Soc. B 71, 2009); the best node starts a
   Levenberg-Marquardt in every latent, kept where its Laplace evidence beats the fit's.
   The nodes and that mode are the anchors (z_g, H_g) of step 3;
3. the conformation's marginal on the grid of ``grid.GRIDS`` (1 mode: the adaptive
   lattice; 2: the split cells; ``cryosvi.inference.quadrature``): at a grid point a, z
   is that of the nearest anchor and the density log p(x, z_g, a) - log|H_g| / 2;
4. importance sampling: S draws, a by the grid's cells (uniform inside the cell), z ~
   N(z_g, H_g^-1) in its chart about a's nearest anchor; weights p(x, z, a) / q(z, a)
   (``importance.importance_weights``) correct whatever steps 1-3 approximate.

No step looks at another particle, and the draws come from the particle's own streams,
so a particle's result is the same alone or in any batch. ``refine.joint_path`` hands
the particles where this fails (``refine._stuck``: a misfit far above the noise's, an ESS
below S / 4) to the tempered SMC.

Evaluations of the forward model per particle (d = dz + K chart dimensions, 1 mode:
d = 5 with pose and defocus): the fit's pool + starts (coarse + iterations + 2) (d + 1)
= 152; the profile's G ((dz + 1) (iterations + 1) - dz + d + 1) = 272 (Gauss-Newton in
z, then the precision in every latent for the slopes); the mode's 5 (d + 1) = 30; the
grid's 56; the draws' S = 64: about 570, against about 6 400 for the SMC with 12 moves
(64 (1 + 8.2 steps x 12)). Measured: benchmarks/results/fast_inference/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryosvi.inference.grid import GRIDS, MAX_DIM, WIDTH, refusal
from cryosvi.inference.importance import importance_log_evidence, importance_weights
from cryosvi.inference.laplace import gauss_newton, laplace_log_evidence, laplace_proposal
from cryosvi.inference.laplace_fit import LaplaceFit, LeastSquares, laplace_fit
from cryosvi.inference.quadrature import (adaptive_grid_posterior, split_grid_posterior,
                                          unit_nodes)
from cryosvi.latents import REGISTRY
from cryosvi.posterior import weighted_summary

PROFILE_NODES = {1: 16, 2: 6}
"""Profile nodes per conformational axis, by the number of axes K (G = nodes^K). Measured
with a prototype of this code (the profile's anchors without slopes) on the first 256
held-out particles of cryosvi's own SNR 1 simulations (1 mode; CPU time of the path
before its fallback, and the particles it then flags): 8 nodes and 1 iteration 4.3 s /
7.8 %, 12 nodes 5.6 s / 4.7 %, 16 nodes 6.5 s / 2.7 % (95 % coverage of the mode
0.90-0.91 in every case); a particle handed to the SMC costs about as much as 12-40
refined here, so 16 is the fastest in all. 2 modes: not measured (36 nodes)."""
PROFILE_SPAN = 3.5
"""The profile's nodes cover the prior's mean +- this many prior stds per axis."""
PROFILE_ITERATIONS = 2
"""Levenberg-Marquardt steps in the other latents at each node (1: 2.5 % more particles
handed to the SMC, measured as ``PROFILE_NODES``'s)."""
MODE_ITERATIONS = 4
"""Levenberg-Marquardt steps in every latent from the profile's best node."""
RETRY_STARTS, RETRY_POOL = 16, 64
"""``refine.joint_path`` runs 'joint' again with this many Gauss-Newton starts from this
many guide draws for the particles that ``refine._stuck`` flags, before it hands those
still flagged to the SMC. Measured on the first 64 particles of the realistic
ctf-shifts-given set: 8 of 64 flagged after 2 starts; 8 starts from 64 draws left 2 of
them flagged (1.0 s of CPU), 16 starts 1 (1.6 s), where the SMC with 12 moves took
9.5 s for the 8."""


def joint_dimension(latents, config) -> int | None:
    """K, the conformational dimensions of a run that infers them with other latents (a
    pose, a defocus), or None where 'joint' does not apply: no conformational latent,
    nothing else inferred, or more than ``grid.MAX_DIM`` dimensions."""
    chosen = [REGISTRY[s] for s in latents]
    dim = sum(latent.chart_dim(config) for latent in chosen if latent.conformational)
    others = [latent for latent in chosen if not latent.conformational]
    return dim if 0 < dim <= MAX_DIM and others else None


def check_joint(config) -> None:
    """CryosviError unless 'joint' can refine a run with guide settings ``config``."""
    if joint_dimension(config.latents, config) is None:
        raise refusal("joint", "inferred with other latents (train --latents "
                      f"pose,defocus,modes, at most {MAX_DIM} modes)", config)


class _Axes:
    """The chart's coordinates split into the conformational ones (K) and the others
    (dz), and the conformational latents' prior means and stds (B, K)."""

    def __init__(self, chart, batch):
        self.chart = chart
        conf, rest, at = [], [], 0
        origins, scales = [], []
        size, device = len(batch), batch.images.device
        for latent, dim in zip(chart.latents, chart.dims):
            (conf if latent.conformational else rest).extend(range(at, at + dim))
            at += dim
            if latent.conformational:
                prior = latent.prior(batch.priors, batch.conditions, batch.images)
                mean = prior.mean.expand(size, *prior.event_shape) \
                    if prior.mean.dim() <= len(prior.event_shape) else prior.mean
                origins.append(mean.reshape(size, dim))
                scales.append(prior.stddev.expand_as(mean).reshape(size, dim))
        self.a = torch.tensor(conf, device=device)
        self.z = torch.tensor(rest, device=device)
        self.origin, self.scale = torch.cat(origins, -1), torch.cat(scales, -1)
        self.conformational = [lat for lat in chart.latents if lat.conformational]

    def alpha(self, point: dict) -> Tensor:
        """(n, B, K): the conformational values of points site -> (n, B, ...)."""
        return torch.cat([point[lat.site].reshape(*point[lat.site].shape[:2], -1)
                          for lat in self.conformational], -1)

    def with_alpha(self, point: dict, alpha: Tensor) -> dict:
        """Points site -> (n, B', ...) with the conformational values alpha (n, B', K)."""
        out, at = dict(point), 0
        for latent in self.conformational:
            dim = math.prod(point[latent.site].shape[2:])
            out[latent.site] = alpha[..., at:at + dim].reshape(point[latent.site].shape)
            at += dim
        return out

    def conditional(self, precision: Tensor) -> tuple[Tensor, Tensor]:
        """(H_zz (n, dz, dz), -H_zz^-1 H_za (n, dz, K)) of a chart precision (n, d, d): the
        other latents' block and how their conditional mean moves with the
        conformation."""
        z_block = precision[:, self.z][:, :, self.z]
        return z_block, -torch.linalg.solve(z_block, precision[:, self.z][:, :, self.a])

    def embed(self, dz: Tensor) -> Tensor:
        """Chart deltas (..., d) that move the other latents by dz (..., dz) alone."""
        out = dz.new_zeros(*dz.shape[:-1], self.chart.dim)
        out[..., self.z] = dz
        return out


@dataclass
class Anchors:
    """A anchors per particle: ``alpha`` (A, B, K) their conformations, ``points`` site ->
    (1, A B, ...) in (A, B) order, ``precision`` (A B, dz, dz) float64 the other latents'
    Gauss-Newton precision there, ``log_det`` (A, B) its log determinant, ``slope`` (A B,
    dz, K): how the other latents' conditional mean moves with the conformation,
    -H_zz^-1 H_za (the Gaussian conditional of the Laplace approximation there)."""

    alpha: Tensor
    points: dict
    precision: Tensor
    log_det: Tensor
    slope: Tensor


@torch.no_grad()
def profile(batch, fit: LaplaceFit, axes: _Axes) -> tuple[LaplaceFit, Anchors]:
    """Step 2 of the module notes: the profile of the conformation from ``fit``'s other
    latents, and the fit moved to the profile's best node where that is better. Returns
    (the fit, the anchors: the nodes, then the fit's mode)."""
    chart, images = fit.chart, batch.images
    size, k = len(batch), len(axes.a)
    per_axis = PROFILE_NODES[k]
    unit = unit_nodes(per_axis, k, images.dtype, images.device) * (
        PROFILE_SPAN * per_axis / (per_axis - 1))  # first and last node at +- the span
    count = unit.shape[0]
    alpha = axes.origin[None] + unit[:, None] * axes.scale[None]  # (G, B, K)
    point = {s: v.repeat(1, count, *([1] * (v.dim() - 2))) for s, v in fit.mode.items()}
    point = axes.with_alpha(point, alpha.reshape(1, count * size, k))
    nodes = LeastSquares(batch, count)

    def retract(values, dz):
        return chart.retract(values, axes.embed(dz))

    result = gauss_newton(point, nodes.residuals, nodes.log_prior, retract, nodes.select,
                          chart.steps(images)[axes.z], iterations=PROFILE_ITERATIONS,
                          final_precision=False)
    # the precision in every latent at the nodes (d + 1 evaluations each): the others'
    # block and their conditional mean's slope in the conformation
    full = gauss_newton(result.point, nodes.residuals, nodes.log_prior, chart.retract,
                        nodes.select, chart.steps(images), iterations=0).precision
    z_block, node_slope = axes.conditional(full)
    log_det = torch.linalg.slogdet(z_block)[1].view(count, size)
    marginal = -result.objective.view(count, size) - 0.5 * log_det
    best = marginal.argmax(0) * size + torch.arange(size, device=images.device)
    one = LeastSquares(batch, 1)
    mode = gauss_newton({s: v[:, best] for s, v in result.point.items()}, one.residuals,
                        one.log_prior, chart.retract, one.select, chart.steps(images),
                        iterations=MODE_ITERATIONS)
    moved = laplace_log_evidence(mode.objective, mode.precision) \
        > laplace_log_evidence(fit.objective, fit.precision)

    def pick(new, old):
        return torch.where(moved.view(-1, *([1] * (new.dim() - 1))), new, old)

    fit = LaplaceFit(one.select(moved, mode.point, fit.mode),
                     pick(mode.precision, fit.precision),
                     pick(mode.objective, fit.objective), pick(mode.misfit, fit.misfit),
                     chart)
    z_precision, slope = axes.conditional(fit.precision)
    anchors = Anchors(torch.cat([alpha, axes.alpha(fit.mode)]),
                      {s: torch.cat([v, fit.mode[s]], 1) for s, v in result.point.items()},
                      torch.cat([z_block, z_precision]),
                      torch.cat([log_det, torch.linalg.slogdet(z_precision)[1][None]]),
                      torch.cat([node_slope, slope]))
    return fit, anchors


@torch.no_grad()
def joint_refine(batch, settings, pool: int = 32) -> dict:
    """'joint' for ``batch`` (``cryosvi.inference.refine.Batch``; a run that
    ``joint_dimension`` takes): the module notes' steps 1-4 with ``settings.starts``
    Gauss-Newton starts and ``settings.n_samples`` S draws per particle.

    Returns the summary keys of ``weighted_summary`` plus 'samples', 'weights' (S, B),
    'ess' (B,): the effective sample size of the importance weights, 'log_evidence' (B,)
    float64: log p(x) estimated by them, and 'misfit' (B,): |r|^2 / 2 at the posterior
    mode found (``refine._stuck``)."""
    images = batch.images
    size, dtype, device = len(batch), images.dtype, images.device
    n_samples = settings.n_samples
    check_joint(batch.guide.config)
    fit = laplace_fit(batch, starts=settings.starts, pool=max(pool, settings.starts))
    chart = fit.chart
    axes = _Axes(chart, batch)
    k = len(axes.a)
    fit, anchors = profile(batch, fit, axes)

    def nearest(alpha: Tensor, columns: Tensor) -> Tensor:
        """(G, B') the index into A B of the anchor nearest (in prior stds) to each point
        alpha (G, B', K) of the particles ``columns`` (B',)."""
        gap = (alpha[:, None] - anchors.alpha[None, :, columns]) / axes.scale[columns]
        return gap.square().sum(-1).argmin(1) * size + columns

    def anchored(alpha: Tensor, index: Tensor, dz: Tensor | None = None):
        """(points, the others' chart delta (G, B', dz) from their anchor): points with
        conformation alpha (G, B', K) and the other latents of the anchors ``index``
        (G, B') moved along the anchor's slope, and by dz (G, B', dz), in their chart."""
        base = axes.with_alpha({s: v[0, index] for s, v in anchors.points.items()}, alpha)
        shift = alpha - anchors.alpha.reshape(-1, k)[index]
        delta = torch.einsum("gbzk,gbk->gbz", anchors.slope[index].to(alpha.dtype), shift)
        if dz is not None:
            delta = delta + dz
        return chart.retract(base, axes.embed(delta)), delta

    def log_density(u: Tensor, rows: Tensor | None) -> Tensor:
        columns = torch.arange(size, device=device) if rows is None else rows
        part = batch if rows is None else batch.take(rows)
        alpha = axes.origin[columns] + u
        index = nearest(alpha, columns)
        return part.log_target(anchored(alpha, index)[0]) \
            - 0.5 * anchors.log_det.view(-1)[index]

    rule = GRIDS[k]
    centre = images.new_zeros(size, k)
    half_width = WIDTH * axes.scale.to(dtype)
    if rule.split is None:
        post = adaptive_grid_posterior(log_density, centre, half_width, rule.sizes)
    else:
        post = split_grid_posterior(log_density, centre, half_width, rule.sizes[0],
                                    *rule.split)
    dz_dim = len(axes.z)
    pick, inside, eps = _draws(batch, n_samples, k, dz_dim)
    # a cell by its mass (inverse CDF of the uniform ``pick``), a point uniform inside it
    cell = post.cells(pick)
    columns = torch.arange(size, device=device)
    h = post.half_extents()[cell, columns]  # (S, B, K)
    alpha = axes.origin + post.nodes[cell, columns] + h * (2 * inside.to(dtype) - 1)
    log_q = torch.log(post.weights.double()[cell, columns]) \
        - torch.log(2 * h.double()).sum(-1)
    # the other latents ~ N(anchor, H^-1) in their chart about the nearest anchor
    index = nearest(alpha, columns)
    dz, log_qz = laplace_proposal(anchors.precision[index.reshape(-1)], 1,
                                  noise=eps.reshape(1, -1, dz_dim))
    dz = dz.view(n_samples, size, dz_dim).to(dtype)
    values, delta = anchored(alpha, index, dz)
    log_q = log_q + log_qz.view(n_samples, size) \
        - chart.log_volume(axes.embed(delta)).double()
    log_p = batch.log_target(values).double()
    weights, ess = importance_weights(log_p, log_q)
    weights = weights.to(dtype)
    return {**weighted_summary(values, weights), "samples": values, "weights": weights,
            "ess": ess.to(dtype), "log_evidence": importance_log_evidence(log_p, log_q),
            "misfit": fit.misfit}


def _draws(batch, n_samples: int, k: int, dz_dim: int):
    """(pick (S, B), inside (S, B, K), eps (S, B, dz)) float64: uniforms for the cell and
    the place in it, standard normals for the other latents, from the particles'
    streams (``batch.stream('joint')``; torch's global generator without streams)."""
    size = len(batch)
    if batch.noise is None:
        device = batch.images.device
        return (torch.rand(n_samples, size, dtype=torch.float64, device=device),
                torch.rand(n_samples, size, k, dtype=torch.float64, device=device),
                torch.randn(n_samples, size, dz_dim, dtype=torch.float64, device=device))
    stream = batch.stream("joint")
    return (stream.child(0).uniform((n_samples, size), axis=1, dtype=torch.float64),
            stream.child(1).uniform((n_samples, size, k), axis=1, dtype=torch.float64),
            stream.child(2).normal((n_samples, size, dz_dim), axis=1, dtype=torch.float64))
