"""Gauss-Newton to the posterior mode and a Laplace proposal for importance sampling, for a
batch of independent problems at once. Nothing here knows about cryo-EM.

The problems are nonlinear least squares with a prior: for each problem b, a point z
(any object the caller can move, e.g. a dict of tensors holding a rotation), whitened
residuals r(z) (P numbers: (model - data) / noise std) and a log prior, so that

    log p(x, z) = -|r(z)|^2 / 2 + log prior(z) + const.

The caller moves points along d local coordinates (a chart): ``retract(z, delta)`` with
delta (..., B, d), and ``retract(z, 0) = z``. Each iteration centres the chart on the
current point, so only small moves are ever taken in it.

``gauss_newton``: Levenberg-Marquardt iterations (Nocedal & Wright 2006, ch. 10.3) with
the Jacobian of r by forward differences (d residual evaluations; Gauss-Newton needs only
first derivatives, and forward differences halve the cost of central ones), and the
prior's gradient and diagonal curvature by central differences of the (cheap) log
prior. The Gauss-Newton precision H = J^T J - diag(d^2 log prior) at the end is the
Laplace approximation's (Tierney & Kadane 1986): the posterior ~ N(0, H^-1) in the chart
at the mode.

``laplace_proposal``: S draws from that Gaussian (the covariance optionally inflated),
with their log density per unit of the chart's volume. The caller turns it into a density
of its own measure (``log_volume``), weighs the draws by p(x, z) / q(z) and so corrects
whatever the Gaussian gets wrong (``cryosvi.inference.smc.importance_weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

Point = Any
"""Whatever the caller's ``retract``, ``residuals`` and ``log_prior`` take: (n, B) points."""


@dataclass
class GaussNewtonResult:
    """point: the B modes found; objective (B,): -log p(x, z) + const there (|r|^2 / 2 -
    log prior); precision (B, d, d) float64: the Gauss-Newton precision at the mode
    (None when not asked for: ``gauss_newton``'s ``final_precision``);
    accepted (B,): the number of iterations that lowered the objective; misfit (B,)
    float64: |r|^2 / 2 there, the objective's likelihood part (for whitened residuals of
    a correct model, chi^2_P / 2: mean P / 2, std sqrt(P / 2), for P residuals)."""

    point: Point
    objective: Tensor
    precision: Tensor | None
    accepted: Tensor
    misfit: Tensor


def _objective(residual: Tensor, log_prior: Tensor) -> Tensor:
    return 0.5 * residual.double().square().sum(-1) - log_prior.double()


def _linearise(point: Point, residual: Tensor, prior: Tensor, residuals, log_prior,
               retract, steps: Tensor):
    """(objective (B,), gradient (B, d), precision (B, d, d)) at ``point``, whose
    residuals (B, P) and log prior (B,) are given: the Jacobian of the residuals by
    forward differences (d evaluations), the log prior's gradient and diagonal curvature
    by central ones (2 d cheap evaluations)."""
    dim = steps.shape[0]
    batch = residual.shape[0]
    axes = torch.eye(dim, dtype=steps.dtype, device=steps.device) * steps  # (d, d)
    forward = axes[:, None, :].expand(dim, batch, dim)
    moved = residuals(retract(point, forward))  # (d, B, P)
    moved_prior = log_prior(retract(point, torch.cat([forward, -forward])))  # (2d, B)
    h = steps.double()[:, None]
    jacobian = ((moved.double() - residual.double()) / h[..., None]).permute(1, 2, 0)
    prior_gradient = (moved_prior[:dim].double() - moved_prior[dim:].double()) / (2 * h)
    prior_curvature = (moved_prior[:dim].double() + moved_prior[dim:].double()
                       - 2 * prior.double()) / h.square()
    gradient = (jacobian.transpose(1, 2) @ residual.double()[..., None])[..., 0] \
        - prior_gradient.T
    precision = jacobian.transpose(1, 2) @ jacobian \
        + torch.diag_embed((-prior_curvature.T).clamp_min(0.0))
    return _objective(residual, prior), gradient, precision


def gauss_newton(point: Point, residuals: Callable[[Point], Tensor],
                 log_prior: Callable[[Point], Tensor],
                 retract: Callable[[Point, Tensor], Point], select: Callable,
                 steps: Tensor, iterations: int = 6, damping: float = 1e-3,
                 final_precision: bool = True) -> GaussNewtonResult:
    """Levenberg-Marquardt from ``point`` (B problems) towards each posterior mode.

    Points carry a leading dimension: ``point`` is (1, B) points. residuals(points) ->
    (n, B, P) and log_prior(points) -> (n, B) for (n, B) points; retract(point, delta
    (n, B, d)) -> (n, B) points; select(mask (B,), a, b) -> the point taking a where
    mask else b. steps (d,): the finite-difference step along each chart axis (small
    against the posterior's width, large against rounding). Each iteration solves
    (H + damping diag H) delta = -g and keeps the move where it lowers the objective
    (then damping / 3, else damping * 10, per problem). Residual evaluations: d + 1
    per iteration, d + 1 at the start. ``final_precision`` False: no linearisation after
    the last iteration (d evaluations fewer; the result's precision is then None).
    """
    residual, prior = residuals(point)[0], log_prior(point)[0]
    objective, gradient, precision = _linearise(point, residual, prior, residuals,
                                                log_prior, retract, steps)
    batch = objective.shape[0]
    lam = torch.full((batch,), damping, dtype=torch.float64, device=objective.device)
    accepted = torch.zeros(batch, dtype=torch.long, device=objective.device)
    for step in range(iterations):
        diagonal = torch.diagonal(precision, dim1=-2, dim2=-1).clamp_min(1e-12)
        system = precision + torch.diag_embed(lam[:, None] * diagonal + 1e-12)
        delta = -torch.linalg.solve(system, gradient[..., None])[..., 0]
        candidate = retract(point, delta.to(steps.dtype)[None])
        new_residual, new_prior = residuals(candidate)[0], log_prior(candidate)[0]
        better = torch.nan_to_num(_objective(new_residual, new_prior), nan=math.inf) \
            < objective
        point = select(better, candidate, point)
        residual = torch.where(better[:, None], new_residual, residual)
        prior = torch.where(better, new_prior, prior)
        accepted += better.long()
        lam = torch.where(better, lam / 3, lam * 10)
        if step == iterations - 1 and not final_precision:
            objective, precision = _objective(residual, prior), None
        else:
            objective, gradient, precision = _linearise(point, residual, prior, residuals,
                                                        log_prior, retract, steps)
    misfit = 0.5 * residual.double().square().sum(-1)
    return GaussNewtonResult(point, objective, precision, accepted, misfit)


def laplace_proposal(precision: Tensor, n_samples: int, inflate: float = 1.0,
                     noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """S draws delta (S, B, d) from N(0, inflate^2 H^-1) for precisions H (B, d, d), and
    their log densities (S, B) (per unit volume of the chart, float64). ``noise``: the
    standard normals eps (S, B, d) they are made of (drawn here when None)."""
    batch, dim = precision.shape[0], precision.shape[-1]
    # H = L L^T; delta = inflate * L^-T eps has covariance inflate^2 H^-1.
    jitter = 1e-9 * torch.diagonal(precision, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    cholesky = torch.linalg.cholesky(precision + jitter[:, None, None]
                                     * torch.eye(dim, dtype=precision.dtype,
                                                 device=precision.device))
    eps = (torch.randn(n_samples, batch, dim, dtype=precision.dtype, device=precision.device)
           if noise is None else noise.to(precision.dtype))
    delta = inflate * torch.linalg.solve_triangular(
        cholesky.transpose(-1, -2).expand(n_samples, batch, dim, dim), eps[..., None],
        upper=True)[..., 0]
    log_det = 2 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(-1)  # log |H|
    log_q = (-0.5 * eps.square().sum(-1) + 0.5 * log_det
             - dim * math.log(inflate) - 0.5 * dim * math.log(2 * math.pi))
    return delta, log_q


def laplace_log_evidence(objective: Tensor, precision: Tensor) -> Tensor:
    """log of the Laplace approximation to the evidence of each mode, up to a constant
    common to all: -objective - log|H| / 2 (B,)."""
    return -objective - 0.5 * torch.linalg.slogdet(precision)[1]
