"""Moments of weighted samples and symmetric random-walk Metropolis proposals, for a
batch of independent problems: samples (S, B, ...) with weights (S, B)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def weighted_moments(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std over samples: values (S, B, ...), weights (S, B) normalised ->
    two tensors (B, ...)."""
    w = weights.view(*weights.shape, *([1] * (values.dim() - 2)))
    mean = (w * values).sum(0)
    return mean, (w * (values - mean).square()).sum(0).sqrt()


def gaussian_step(value: Tensor, width: Tensor) -> Tensor:
    """A Gaussian random-walk proposal: value (S, B, ...) + width (B, ...) * N(0, 1)."""
    return value + width[None] * torch.randn_like(value)


@dataclass(frozen=True)
class RandomWalk:
    """A symmetric random-walk Metropolis proposal for one latent.

    step(value (S, B, ...), width (B, ...)) -> proposal (S, B, ...), symmetric in
    (value, proposal). dim: the latent's degrees of freedom (they set the common scale
    2.38 / sqrt(total dim)). spread(values (S, B, ...), weights (S, B)) -> (B, ...): the
    population's spread, in the units of ``width`` (default: the weighted std). The width
    used is scale * spread clamped to [floor, cap].
    """

    dim: int
    step: Callable[[Tensor, Tensor], Tensor] = gaussian_step
    spread: Callable[[Tensor, Tensor], Tensor] | None = None
    floor: float = 0.0
    cap: float = math.inf

    def width(self, values: Tensor, weights: Tensor, scale: float) -> Tensor:
        spread = (weighted_moments(values, weights)[1] if self.spread is None
                  else self.spread(values, weights))
        return (scale * spread).clamp(min=self.floor, max=self.cap)
