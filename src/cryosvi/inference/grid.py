"""'grid': the posterior of the conformational amplitudes of particles whose pose, CTF
and shifts are given (``train --latents modes``), by deterministic quadrature.

With every other latent fixed, the posterior of the K <= 2 amplitudes is a density in K
dimensions that a grid integrates exactly (``cryosvi.inference.quadrature``): the
model's log p(x, z) (``Batch.log_target``: the likelihood of the model with the known
latents, and the prior) at the cells' centres, the midpoint rule for every posterior
expectation. Settings (``GRIDS``), measured on the realistic poses-given set and on
cryosvi's own SNR 0.1 simulations against a dense reference grid (the roughest
likelihood measured: an ANM mode of a C-alpha model, several peaks 0.3-0.5 A wide):

* 1 mode: the adaptive lattice (32, 24): 32 cells over the prior's mean +- 4 stds, then
  24 over the window that holds all but 1e-4 of the mass (widened by a coarse cell on
  each side), then further 24-cell levels for a particle whose posterior is still
  narrower than a cell: 56 evaluations per particle; posterior means within 0.003
  posterior stds (median; p99 0.06) of a 400-cell reference;
* 2 modes: 6 x 6 cells, then 2 rounds in which each particle's 4 heaviest cells are cut
  into 3 x 3 (``split_grid_posterior``): 100 evaluations; means within 0.045 stds
  (median; p99 0.25) of an 80 x 80 reference (8 x 8 cells, 128 evaluations: 0.042,
  p99 0.23; |Spearman| on all 2 000 realistic particles 0.8963 against 0.8962 and 95 %
  coverage on cryosvi's own SNR 0.1 simulations 0.945 with both, so the cheaper one).

For scale: the SMC's 64 draws estimate a mean to ~0.13-0.2 posterior stds, with
~1 500 evaluations per particle (12 moves). (Settings measured on 2026-12-06 with a
prototype of this code at commit a4f6cbc; this code's speed and calibration against
the SMC: benchmarks/results/fast_inference/.)

Limits: the lattice's extra levels look at a particle's posterior std, so a posterior
made of peaks much narrower than a level-1 cell (its mass window / 24) and far apart
is under-resolved (peaks 0.15-0.2 prior stds wide, like an ANM mode's at SNR 0.1, are
resolved: tests/test_grid.py).
The split grid is built for rough likelihoods; on smooth posteriors much narrower than
the prior its mean is off by median 0.02, p99 0.5 posterior stds (400 random 2-D
Gaussians of 0.1-1 prior std per axis, correlation up to 0.8, means within 1.5 prior
stds; 8 x 8 cells: 0.014, p99 0.42; an 8 x 8 lattice with levels would be ~10x more
accurate there but 3x less on the rough likelihood).

The grid integrates the inferred latents in their charts about the prior's mean
(``Latent.retract``; the amplitudes' charts are the amplitudes less the mean), over
+- ``WIDTH`` prior stds; which latents it may take is the registry's word
(``Latent.conformational``), not their names. No random number is drawn and every
decision (extra levels, which cells to split) is taken per particle, so a particle's
result is the same alone or in any batch (to the rounding of batched FFTs and GEMMs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosvi.errors import CryosviError
from cryosvi.inference.quadrature import (GridPosterior, adaptive_grid_posterior,
                                          split_grid_posterior)
from cryosvi.latents import CREDIBLE_LEVELS, REGISTRY, ORDER
from cryosvi.posterior import weighted_summary


@dataclass(frozen=True)
class GridRule:
    """How to lay the grid for a number of dimensions: ``sizes`` cells per axis of each
    level of ``adaptive_grid_posterior``, or with ``split`` = (rounds, splits),
    ``split_grid_posterior`` on sizes[0] cells per axis."""

    sizes: tuple[int, ...]
    split: tuple[int, int] | None = None


GRIDS = {1: GridRule((32, 24)), 2: GridRule((6,), (2, 4))}
"""The grid per number of dimensions (module notes for the measurements)."""
MAX_DIM = max(GRIDS)
"""The most dimensions the grid takes: the cost grows as n^K."""
WIDTH = 4.0
"""Level 0 covers the prior's mean +- this many prior stds per axis (all but 6e-5 of a
Normal prior's mass)."""


def grid_dimension(latents, config) -> int | None:
    """The dimensions K of the grid over the inferred ``latents`` (sites) of a run with
    guide settings ``config``, or None where the grid cannot take them: a latent that is
    not ``conformational`` (a pose, a defocus: inferred jointly they need a sampler), or
    more than ``MAX_DIM`` dimensions."""
    if not latents or not all(REGISTRY[s].conformational for s in latents):
        return None
    dim = sum(REGISTRY[s].chart_dim(config) for s in latents)
    return dim if dim <= MAX_DIM else None


def refusal(method: str, needs: str, config) -> CryosviError:
    """The error of ``--refine METHOD``, which integrates the amplitudes on the grid, for
    a run (guide settings ``config``) it cannot take; ``needs``: what it takes."""
    from cryosvi.latents import names
    return CryosviError(
        f"--refine {method} integrates up to {MAX_DIM} conformational amplitudes {needs}; "
        f"this run infers {', '.join(names(config.latents))} ({config.n_modes} mode(s)): "
        "use --refine auto, laplace or smc")


def check_grid(config) -> None:
    """CryosviError unless the grid can refine a run with guide settings ``config``."""
    if grid_dimension(config.latents, config) is None:
        raise refusal("grid", "with everything else given (a run trained with --latents "
                      f"modes and at most {MAX_DIM} modes)", config)


class _Coordinates:
    """The inferred latents of a batch in the grid's coordinates: u (..., B, K), the
    concatenated charts about each latent's prior mean."""

    def __init__(self, batch):
        config = batch.guide.config
        self.latents = [REGISTRY[s] for s in ORDER if s in config.latents]
        self.dims = [latent.chart_dim(config) for latent in self.latents]
        self.origin, scales = {}, []
        size = len(batch)
        for latent, dim in zip(self.latents, self.dims):
            prior = latent.prior(batch.priors, batch.conditions, batch.images)
            mean = prior.mean.expand(size, *prior.event_shape) \
                if prior.mean.dim() <= len(prior.event_shape) else prior.mean
            self.origin[latent.site] = mean
            scales.append(prior.stddev.expand_as(mean).reshape(size, dim))
        self.scale = torch.cat(scales, -1)  # (B, K) prior stds along the axes

    def values(self, u: Tensor, rows: Tensor | None = None) -> dict:
        """site -> (..., B', ...) of points u (..., B', K) of the particles ``rows``."""
        out = {}
        for latent, part in zip(self.latents, u.split(self.dims, dim=-1)):
            origin = self.origin[latent.site]
            out[latent.site] = latent.retract(origin if rows is None else origin[rows], part)
        return out


@torch.no_grad()
def grid_refine(batch, settings) -> dict:
    """'grid': the posterior of the conformational amplitudes of ``batch``
    (``cryosvi.inference.refine.Batch``: every other latent known) by the grid of
    ``GRIDS`` for its dimension K; ``settings.n_samples`` S equally weighted draws.

    Returns the summary keys of ``weighted_summary`` (the nodes with their cells'
    masses: the midpoint rule's mean and std), 'samples' (site -> (S, B, ...): the
    nodes by systematic resampling with a fixed offset, no randomness) and 'weights'
    (S, B) = 1 / S, 'ess' (B,): the effective number of cells carrying the posterior
    mass, 1 / sum w_g^2 (a resolved 1-D Gaussian of std s on cells of width h has
    ~3.5 s / h; a posterior narrower than the level-0 cells gets further levels, so
    this stays about 5-15 for a resolved posterior: it reports how the mass is spread
    on the grid, not a Monte Carlo error, which the grid has none of), on a lattice (1
    mode) 'intervals' (site -> (B, ..., 2 levels, 2)): the equal-tailed credible
    intervals at ``CREDIBLE_LEVELS`` of each amplitude (the log marginal interpolated by
    parabolas: exact for a Gaussian; the split grid's cells of many sizes would give
    them only to a cell's width, so it has none), 'log_evidence' (B,) float64: log p(x) of the
    model given the known latents, and 'evaluations' (B,): the likelihood's evaluations
    per particle.
    """
    config = batch.guide.config
    dim = grid_dimension(config.latents, config)
    if dim is None:
        check_grid(config)
    coordinates = _Coordinates(batch)

    def log_density(u: Tensor, rows: Tensor | None) -> Tensor:
        part = batch if rows is None else batch.take(rows)
        return part.log_target(coordinates.values(u, rows))

    rule = GRIDS[dim]
    centre = batch.images.new_zeros(len(batch), dim)
    half_width = WIDTH * coordinates.scale.to(batch.images.dtype)
    if rule.split is None:
        post = adaptive_grid_posterior(log_density, centre, half_width, rule.sizes)
    else:
        post = split_grid_posterior(log_density, centre, half_width, rule.sizes[0],
                                    *rule.split)
    return _summary(post, coordinates, settings.n_samples)


def _summary(post: GridPosterior, coordinates: _Coordinates, n_samples: int) -> dict:
    """``grid_refine``'s keys from the grid posterior in the grid's coordinates."""
    out = weighted_summary(coordinates.values(post.nodes), post.weights)
    draws = coordinates.values(post.draws(n_samples))
    if post.half_widths is None:  # a lattice: intervals exact for a Gaussian
        intervals = post.intervals(CREDIBLE_LEVELS)  # (B, K, L, 2), grid coordinates
        ends = {}
        for level in range(len(CREDIBLE_LEVELS)):
            for side in range(2):
                for site, value in coordinates.values(intervals[..., level, side]).items():
                    ends.setdefault(site, []).append(value)
        levels = len(CREDIBLE_LEVELS)
        out["intervals"] = {site: torch.stack(v, -1).unflatten(-1, (levels, 2))
                            for site, v in ends.items()}
    like = post.nodes
    out.update(samples=draws,
               weights=torch.full((n_samples, like.shape[1]), 1.0 / n_samples,
                                  dtype=like.dtype, device=like.device),
               ess=post.effective_cells().to(like.dtype),
               log_evidence=post.log_evidence, evaluations=post.evaluations)
    return out
