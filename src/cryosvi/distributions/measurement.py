"""The measurement of an image as a Pyro distribution: clean images seen through
stationary coloured Gaussian noise with a random contrast and an unknown offset
(``cryosvi.physics.noise.NoiseModel``), or through white Gaussian noise of a known std
(``WhiteNoise``)."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints

from cryosvi.physics.noise import NoiseModel


class Measurement(TorchDistribution):
    """Images (B, L, L) given their clean images ``clean`` (B, L, L), each image's noise
    group ``group`` (B,) int64 (None: group 0 for all) and a ``NoiseModel``.

    ``log_prob`` is the noise model's exact likelihood with the per-image offset and the
    contrast integrated out (``NoiseModel.log_likelihood``; a density on the images'
    component orthogonal to constants, so it does not depend on their offset);
    ``sample`` draws a contrast from the prior and coloured noise (``NoiseModel.sample``)
    from the global random stream, as Pyro samples. batch_shape: clean.shape[:-2];
    event_shape: (L, L).
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = False

    def __init__(self, clean: Tensor, group: Tensor | None, noise: NoiseModel,
                 validate_args=None):
        if clean.dim() < 2 or clean.shape[-2:] != (noise.box, noise.box):
            raise ValueError(f"clean images must be (..., {noise.box}, {noise.box}), got "
                             f"{tuple(clean.shape)}")
        batch_shape = clean.shape[:-2]
        if group is not None:
            group = torch.as_tensor(group, device=clean.device).long().expand(batch_shape)
        self.clean, self.group, self.noise = clean, group, noise
        super().__init__(batch_shape, clean.shape[-2:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        clean = self.clean.expand(*batch_shape, *self.event_shape)
        group = None if self.group is None else self.group.expand(batch_shape)
        return type(self)(clean, group, self.noise, validate_args=False)

    @property
    def mean(self) -> Tensor:
        """The contrast prior's mean times the clean images (the truncation ignored)."""
        return self.noise.contrast_mean * self.clean

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        clean = self.clean.expand(*shape, *self.event_shape)
        group = None if self.group is None else self.group.expand(shape)
        with torch.no_grad():
            return self.noise.sample(clean, group)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.noise.log_likelihood(value, self.clean, self.group)


class WhiteNoise(TorchDistribution):
    """Images (..., L, L) = clean (..., L, L) + white Gaussian noise of pixel std ``std``:
    ``Normal(clean, std).to_event(2)``, whose log density

        log p(x) = -|x - clean|^2 / (2 std^2) - L^2 (log std + 1/2 log 2 pi)

    is summed here from one squared norm per image instead of a log density per pixel
    (Normal with a scalar std broadcasts it to every pixel and takes its log and square
    there): the same numbers to float rounding, ~10x less work, which the refinement's
    thousands of evaluations per particle notice. batch_shape: clean.shape[:-2];
    event_shape: (L, L)."""

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, clean: Tensor, std: float, validate_args=None):
        if clean.dim() < 2:
            raise ValueError(f"clean images must be (..., L, L), got {tuple(clean.shape)}")
        if not std > 0:
            raise ValueError(f"the noise std must be > 0, got {std}")
        self.clean, self.std = clean, float(std)
        super().__init__(clean.shape[:-2], clean.shape[-2:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return type(self)(self.clean.expand(*batch_shape, *self.event_shape), self.std,
                          validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self.clean

    @property
    def variance(self) -> Tensor:
        return torch.full_like(self.clean, self.std ** 2)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        return self.clean.expand(shape) + self.std * torch.randn(
            shape, dtype=self.clean.dtype, device=self.clean.device)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        residual = (value - self.clean).flatten(-2)
        pixels = residual.shape[-1]
        squares = torch.einsum("...i,...i->...", residual, residual)
        return (-0.5 / self.std ** 2) * squares - pixels * (
            math.log(self.std) + 0.5 * math.log(2 * math.pi))
