"""The Gauss-Newton fit of the Laplace refinements: from the guide's best draws to the
posterior mode of each particle, and the Gauss-Newton precision there
(``cryosvi.inference.laplace``). Used by 'laplace' (``refine.laplace_refine``: importance
sampling from N(mode, H^-1)) and 'joint' (``cryosvi.inference.joint``: the conformation
integrated on a grid along the mode's conditional ridge)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryosvi.inference.laplace import gauss_newton, laplace_log_evidence
from cryosvi.latents import REGISTRY, Chart, forward_inputs
from cryosvi.physics.noise import NoiseModel
from cryosvi.posterior import posterior_summary


@dataclass
class LaplaceFit:
    """The fit of B particles: ``mode`` site -> (1, B, ...) the inferred latents at the
    posterior mode found (the start of highest Laplace evidence); ``precision`` (B, d, d)
    float64: the Gauss-Newton precision there, in the ``chart``'s coordinates;
    ``objective`` (B,): -log p(x, z) + const at the mode; ``misfit`` (B,): its likelihood
    part |r|^2 / 2 over the whitened pixels."""

    mode: dict
    precision: Tensor
    objective: Tensor
    misfit: Tensor
    chart: Chart


def _tile(values: dict, n: int) -> dict:
    """Values site -> (B, ...) repeated n times along the batch, (n * B, ...)."""
    return {s: v.repeat(n, *([1] * (v.dim() - 1))) for s, v in values.items()}


class LeastSquares:
    """The fit's problem for ``copies`` M copies of each particle of ``batch`` (M B
    problems in (M, B) order; ``cryosvi.inference.laplace``): whitened residuals (with
    the images low-passed by a Gaussian of ``blur`` x box pixels where asked) and the log
    prior of points site -> (n, M B, ...)."""

    def __init__(self, batch, copies: int, blur: float = 0.1):
        self.batch, self.copies = batch, copies
        images = batch.images
        self.size = images.shape[0]
        self.images = images.repeat(copies, 1, 1)
        self.known = _tile(batch.known, copies)
        self.conditions = batch.conditions.expand(copies)
        self.noise_std = batch.likelihood
        box = images.shape[-1]
        frequency = torch.fft.fftfreq(box, device=images.device)
        self.low_pass = torch.exp(-2 * (math.pi * blur * box) ** 2
                                  * (frequency[:, None] ** 2 + frequency[None, :] ** 2))
        ctf = self.conditions.ctf
        self.group = None if ctf is None else ctf.group  # the measurement site's

    def _smoothed(self, residual: Tensor) -> Tensor:
        return torch.fft.ifft2(torch.fft.fft2(residual) * self.low_pass).real

    def residuals(self, values: dict, smooth: bool = False) -> Tensor:
        """(n, M B, P) whitened residuals of values site -> (n, M B, ...): (model - data)
        / noise std, or with a noise model its ``NoiseModel.residuals`` (P = L^2 + 1 or
        L^2 + 2)."""
        batch, noise_std, rows = self.batch, self.noise_std, self.copies * self.size
        box = self.images.shape[-1]
        out = []
        for i in range(0, next(iter(values.values())).shape[0], batch.chunk):
            part = {s: v[i:i + batch.chunk] for s, v in values.items()}
            m = next(iter(part.values())).shape[0]
            flat = {s: v.reshape(m * rows, *v.shape[2:]) for s, v in part.items()}
            clean = batch.forward(**forward_inputs({**_tile(self.known, m), **flat},
                                                   self.conditions.expand(m)))
            # (m, M B, L, L) against the images broadcast, not copied m times
            clean = clean.view(m, *self.images.shape)
            if isinstance(noise_std, NoiseModel):
                residual = noise_std.residuals(self.images, clean, self.group)
                if smooth:  # the image part; the prior's and level's terms as they are
                    pixels = box * box
                    image = self._smoothed(residual[..., :pixels].unflatten(-1, (box, box)))
                    residual = torch.cat([image.flatten(-2), residual[..., pixels:]], -1)
            else:
                residual = (clean - self.images) / noise_std
                if smooth:
                    residual = self._smoothed(residual)
            out.append(residual.reshape(m, rows, -1))
        return torch.cat(out)

    def smoothed_residuals(self, values: dict) -> Tensor:
        return self.residuals(values, smooth=True)

    def log_prior(self, values: dict) -> Tensor:
        """(n, M B) log prior of values site -> (n, M B, ...), in float64: its curvature
        comes from central differences, which float32 rounds away where the prior is
        wide against the step (a defocus prior of 2 500 A: 1.6e-7 per A^2 on a log
        density of ~10, below float32's resolution)."""
        batch = self.batch
        n = next(iter(values.values())).shape[0]
        tiled = self.conditions.expand(n)
        rows = self.copies * self.size
        like = batch.forward.coords.double()
        config = batch.guide.config
        total = 0.0
        for site, value in values.items():
            latent = REGISTRY[site]
            value = value.reshape(n * rows, *value.shape[2:]).double()
            # back on the latent's manifold to float64's precision (a unit quaternion)
            value = latent.retract(value, value.new_zeros(n * rows,
                                                          latent.chart_dim(config)))
            total = total + latent.prior(batch.priors, tiled, like).log_prob(value)
        return total.reshape(n, rows)

    @staticmethod
    def select(mask: Tensor, first: dict, second: dict) -> dict:
        """The points of ``first`` where mask (M B,), else of ``second``."""
        return {s: torch.where(mask.view(1, -1, *([1] * (first[s].dim() - 2))),
                               first[s], second[s]) for s in first}


LAPLACE_STARTS = 2
"""Gauss-Newton starts per particle of the Laplace and joint paths (``--starts``)."""


@torch.no_grad()
def laplace_fit(batch, starts: int = LAPLACE_STARTS, pool: int = 32, coarse: int = 4,
                iterations: int = 4, blur: float = 0.1) -> LaplaceFit:
    """Levenberg-Marquardt from the guide's best draws to the posterior mode of each
    particle of ``batch`` (``cryosvi.inference.refine.Batch``).

    The guide draws ``pool`` samples per particle (the stream ``batch.stream
    ('laplace_pool')``); the ``starts`` of highest p(x, z) take Levenberg-Marquardt steps
    in the latents' charts (``latents.Chart``: rotation vectors for the pose): ``coarse``
    steps on residuals low-passed by a Gaussian of ``blur`` x box pixels (a wider basin:
    measured on the demo, 5.5 % of the particles ended in a wrong local mode with it
    against 8.6 % without), then ``iterations`` on the full residuals. The mode of
    highest Laplace evidence is kept. Evaluations of the forward model per particle:
    pool + starts (coarse + iterations + 2) (d + 1) (d: the chart's dimension).
    """
    images = batch.images
    size = images.shape[0]
    chart = Chart(batch.guide.config.latents, batch.guide.config)
    guide_draws = posterior_summary(batch.guide, images, batch.known, max(pool, starts),
                                    conditions=batch.conditions,
                                    noise=batch.stream("laplace_pool"))["samples"]
    log_p = batch.log_target(guide_draws)
    top = log_p.topk(starts, dim=0).indices  # (M, B)
    columns = torch.arange(size, device=images.device).expand(starts, size)
    # M starts of B particles are one batch of M B problems, in (M, B) order.
    point = {s: v[top, columns].reshape(1, starts * size, *v.shape[2:])
             for s, v in guide_draws.items()}
    problem = LeastSquares(batch, starts, blur)
    steps = chart.steps(images)
    if coarse:
        point = gauss_newton(point, problem.smoothed_residuals, problem.log_prior,
                             chart.retract, problem.select, steps, iterations=coarse).point
    result = gauss_newton(point, problem.residuals, problem.log_prior, chart.retract,
                          problem.select, steps, iterations=iterations)
    evidence = laplace_log_evidence(result.objective, result.precision).view(starts, size)
    best = evidence.argmax(0) * size + torch.arange(size, device=images.device)
    return LaplaceFit({s: v[:, best] for s, v in result.point.items()},
                      result.precision[best], result.objective[best], result.misfit[best],
                      chart)
