"""'joint' (prototype): the Laplace fit in every latent, then the conformation integrated
on a grid along the conditional ridge of the other latents, and importance sampling."""

from __future__ import annotations

import torch

from cryosvi.inference.grid import GRIDS, WIDTH
from cryosvi.inference.importance import importance_log_evidence, importance_weights
from cryosvi.inference.laplace import gauss_newton, laplace_log_evidence, laplace_proposal
from cryosvi.inference.laplace_fit import LaplaceFit, LeastSquares, laplace_fit
from cryosvi.inference.quadrature import adaptive_grid_posterior, split_grid_posterior
from cryosvi.posterior import weighted_summary


def split_chart(chart):
    """(indices of the conformational coordinates, of the others) in the chart."""
    conf, rest, at = [], [], 0
    for latent, dim in zip(chart.latents, chart.dims):
        (conf if latent.conformational else rest).extend(range(at, at + dim))
        at += dim
    return conf, rest


def _embed(delta_z, dim, a_index, z_index):
    out = delta_z.new_zeros(*delta_z.shape[:-1], dim)
    out[..., z_index] = delta_z
    return out


@torch.no_grad()
def profile_search(batch, fit, nodes=16, coarse=0, iterations=2, span=3.5, final=4):
    """The profile of the conformation (K = 1): at each of ``nodes`` values over the
    prior's mean +- span stds, Gauss-Newton in the other latents from the fit's; the node
    of highest Laplace evidence (in the others) starts a Gauss-Newton in every latent,
    kept where its Laplace evidence beats the fit's."""
    chart = fit.chart
    conf, rest = split_chart(chart)
    size, dim = len(batch), chart.dim
    images = batch.images
    a_index, z_index = torch.tensor(conf), torch.tensor(rest)
    site = [lat.site for lat in chart.latents if lat.conformational][0]
    latent = [lat for lat in chart.latents if lat.conformational][0]
    prior = latent.prior(batch.priors, batch.conditions, images)
    std = prior.stddev.expand(size, 1).reshape(size)
    mean = prior.mean.expand(size, 1).reshape(size)
    line = torch.linspace(-span, span, nodes, dtype=images.dtype)
    alpha = mean[None] + line[:, None] * std[None]  # (G, B)
    point = {s: v.repeat(1, nodes, *([1] * (v.dim() - 2))) for s, v in fit.mode.items()}
    point[site] = alpha.reshape(1, nodes * size, 1)
    problem = LeastSquares(batch, nodes)
    steps = chart.steps(images)[z_index]

    def retract(p, delta_z):
        return chart.retract(p, _embed(delta_z, dim, a_index, z_index))

    if coarse:
        point = gauss_newton(point, problem.smoothed_residuals, problem.log_prior, retract,
                             problem.select, steps, iterations=coarse).point
    result = gauss_newton(point, problem.residuals, problem.log_prior, retract,
                          problem.select, steps, iterations=iterations)
    profile = laplace_log_evidence(result.objective, result.precision).view(nodes, size)
    best = profile.argmax(0) * size + torch.arange(size)
    start = {s: v[:, best] for s, v in result.point.items()}
    single = LeastSquares(batch, 1)
    full = gauss_newton(start, single.residuals, single.log_prior, chart.retract,
                        single.select, chart.steps(images), iterations=final)
    better = laplace_log_evidence(full.objective, full.precision) \
        > laplace_log_evidence(fit.objective, fit.precision)
    mode = single.select(better, full.point, fit.mode)
    pick = lambda a, b: torch.where(better.view(-1, *([1] * (a.dim() - 1))), a, b)
    return LaplaceFit(mode, pick(full.precision, fit.precision),
                      pick(full.objective, fit.objective), pick(full.misfit, fit.misfit),
                      chart), better, profile


@torch.no_grad()
def joint_refine(batch, settings, ridge=True, refit=0, rb=False, pool=32, keep_fit=False,
                 profile=None):
    n_samples = settings.n_samples
    fit = laplace_fit(batch, starts=settings.starts, pool=pool)
    if profile:
        fit, moved, _ = profile_search(batch, fit, **profile)
    chart, mode, precision = fit.chart, fit.mode, fit.precision
    conf, rest = split_chart(chart)
    images = batch.images
    size, dim, k = len(batch), chart.dim, len(conf)
    dtype = images.dtype
    # the conformational latents' prior mean and std, (B, K)
    origins, scales = [], []
    for latent, d in zip(chart.latents, chart.dims):
        if latent.conformational:
            prior = latent.prior(batch.priors, batch.conditions, images)
            mean = prior.mean.expand(size, *prior.event_shape) \
                if prior.mean.dim() <= len(prior.event_shape) else prior.mean
            origins.append(mean.reshape(size, d))
            scales.append(prior.stddev.expand_as(mean).reshape(size, d))
    origin, scale = torch.cat(origins, -1), torch.cat(scales, -1)
    a_index = torch.tensor(conf)
    z_index = torch.tensor(rest)

    def conformation(point):  # (1, B, ...) -> (B, K)
        return torch.cat([point[lat.site][0].reshape(size, -1) for lat in chart.latents
                          if lat.conformational], -1)

    def ridge_of(precision):
        h_zz = precision[:, z_index][:, :, z_index]
        h_za = precision[:, z_index][:, :, a_index]
        slope = -torch.linalg.solve(h_zz, h_za)  # (B, dz, K): dz = slope da
        return h_zz, slope

    h_zz, slope = ridge_of(precision)
    if not ridge:
        slope = torch.zeros_like(slope)
    alpha_star = conformation(mode)

    def deltas(u, rows, z_extra=None):
        """chart deltas (G, B', d) of grid points u (G, B', K) about the prior mean."""
        r = slice(None) if rows is None else rows
        da = (origin[r] + u) - alpha_star[r]
        dz = torch.einsum("bzk,gbk->gbz", slope[r].to(dtype), da)
        if z_extra is not None:
            dz = dz + z_extra
        delta = u.new_zeros(*u.shape[:-1], dim)
        delta[..., a_index] = da
        delta[..., z_index] = dz
        return delta

    def log_density(u, rows):
        part = batch if rows is None else batch.take(rows)
        point = mode if rows is None else {s: v[:, rows] for s, v in mode.items()}
        return part.log_target(chart.retract(point, deltas(u, rows)))

    rule = GRIDS[k]
    centre = images.new_zeros(size, k)
    half_width = WIDTH * scale.to(dtype)
    if rule.split is None:
        post = adaptive_grid_posterior(log_density, centre, half_width, rule.sizes)
        half = 0.5 * torch.diagonal(post.cell, dim1=-2, dim2=-1)[None].expand_as(post.nodes)
    else:
        post = split_grid_posterior(log_density, centre, half_width, rule.sizes[0],
                                    *rule.split)
        half = post.half_widths
    # draws: a cell by its mass, uniform inside it; z | a ~ N(ridge(a), H_zz^-1)
    stream = None if batch.noise is None else batch.noise.child(5)
    if stream is None:
        pick, inside = torch.rand(n_samples, size, dtype=torch.float64), \
            torch.rand(n_samples, size, k, dtype=torch.float64)
        eps = None
    else:
        pick = stream.child(0).uniform((n_samples, size), axis=1, dtype=torch.float64)
        inside = stream.child(1).uniform((n_samples, size, k), axis=1, dtype=torch.float64)
        eps = stream.child(2).normal((n_samples, size, len(rest)), axis=1,
                                     dtype=torch.float64)
    cumulative = post.weights.double().cumsum(0)
    cumulative = cumulative / cumulative[-1:]
    cell = torch.searchsorted(cumulative.T.contiguous(), pick.T.contiguous()).T
    cell = cell.clamp(max=post.nodes.shape[0] - 1)
    columns = torch.arange(size).expand(n_samples, -1)
    h = half[cell, columns]  # (S, B, K)
    u = post.nodes[cell, columns] + h * (2 * inside.to(dtype) - 1)
    log_qa = torch.log(post.weights.double()[cell, columns]) \
        - torch.log(2 * h.double()).sum(-1)
    dz, log_qz = laplace_proposal(h_zz, n_samples, noise=eps)
    delta = deltas(u, None, dz.to(dtype))
    values = chart.retract(mode, delta)
    log_q = log_qa + log_qz - chart.log_volume(delta).double()
    log_p = batch.log_target(values)
    weights, ess = importance_weights(log_p.double(), log_q)
    weights = weights.to(dtype)
    out = {**weighted_summary(values, weights), "samples": values, "weights": weights,
           "ess": ess.to(dtype), "log_evidence": importance_log_evidence(log_p.double(), log_q),
           "misfit": fit.misfit, "moved": moved if profile else torch.zeros(size, dtype=torch.bool)}
    if rb:
        out["modes_mean"] = post.mean + origin
        out["modes_std"] = post.std
    if keep_fit:
        out["fit"] = fit
        out["grid"] = post
        out["alpha_star"] = alpha_star
    return out
