"""Moments of weighted samples and symmetric random-walk Metropolis proposals, for a
batch of independent problems: samples (S, B, ...) with weights (S, B)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def sum_over_samples(values: Tensor) -> Tensor:
    """values (S, B, ...) summed over the samples -> (B, ...), each problem's sum taken
    along a contiguous axis, in an order that depends only on S. (torch sums a leading
    axis in an order that depends on the sizes of the others, so a problem's sum would
    change at rounding level with the batch it is in.)"""
    return values.movedim(0, -1).contiguous().sum(-1)


def weighted_moments(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std over samples: values (S, B, ...), weights (S, B) normalised ->
    two tensors (B, ...); each problem's independent of the others in the batch
    (``sum_over_samples``)."""
    w = weights.view(*weights.shape, *([1] * (values.dim() - 2)))
    mean = sum_over_samples(w * values)
    return mean, sum_over_samples(w * (values - mean).square()).sqrt()


def gaussian_step(value: Tensor, width: Tensor, noise: Tensor | None = None) -> Tensor:
    """A Gaussian random-walk proposal: value (S, B, ...) + width (B, ...) * N(0, 1), the
    standard normals ``noise`` (value's shape) or, when None, drawn here."""
    return value + width[None] * (torch.randn_like(value) if noise is None else noise)


@dataclass(frozen=True)
class RandomWalk:
    """A symmetric random-walk Metropolis proposal for one latent.

    step(value (S, B, ...), width (B, ...), noise) -> proposal (S, B, ...), symmetric in
    (value, proposal), a function of the standard normals ``noise`` of
    ``noise_shape(value)`` (drawn by ``step`` itself when None). noise_dim: their last
    dimension (None: the value's shape). dim: the latent's degrees of freedom (they set
    the common scale 2.38 / sqrt(total dim)). spread(values (S, B, ...), weights (S, B)) -> (B, ...): the
    population's spread, in the units of ``width`` (default: the weighted std). The width
    used is scale * spread clamped to [floor, cap].
    """

    dim: int
    step: Callable[..., Tensor] = gaussian_step
    spread: Callable[[Tensor, Tensor], Tensor] | None = None
    floor: float = 0.0
    cap: float = math.inf
    noise_dim: int | None = None

    def noise_shape(self, value: Tensor) -> tuple[int, ...]:
        """The shape of the standard normals one ``step`` of ``value`` takes."""
        if self.noise_dim is None:
            return tuple(value.shape)
        return (*value.shape[:-1], self.noise_dim)

    def width(self, values: Tensor, weights: Tensor, scale: float) -> Tensor:
        spread = (weighted_moments(values, weights)[1] if self.spread is None
                  else self.spread(values, weights))
        return (scale * spread).clamp(min=self.floor, max=self.cap)
