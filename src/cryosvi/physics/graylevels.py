"""Gray levels of the particles: the scale and offset of the model images, and the noise.

Particle images come in arbitrary gray levels (RELION-normalised particles have a
background of mean 0 and std 1, whatever the dose). The model is

    image = scale * model_image + offset + noise,   noise white Gaussian of std noise_std,

with one scale, offset and noise std for the data set. ``estimate_gray_levels`` measures
them from the particles alone, without their poses, by comparing second moments of the
images with those of model images drawn from the prior (poses, modes) with the data's
CTFs and shifts (``prior_model_images``): the two sets are different particles, but the
same distribution of images up to the gray levels. ``fit_scale_with_poses`` is the
least-squares fit for when each particle's model image is known (poses given).

The estimate (``estimate_gray_levels``), with I the pixels inside a circular mask of the
molecule's radius plus a margin (``mask_radius``) and O those outside it:

* Each image j (data x and model y alike) has its own background mean m_j (mean over O)
  subtracted, which removes any per-image offset (RELION normalises image by image).
* Second moments, pooled over images and pixels: V_I, V_O of the data, v_I, v_O of the
  model. The noise (white, independent of the signal) adds sigma^2 (1 + 1/N_O) inside
  and sigma^2 (1 - 1/N_O) outside (the background mean took part of it away; N_O pixels
  outside), so
      V_I = a^2 v_I + sigma^2 (1 + 1/N_O)
      V_O = a^2 v_O + sigma^2 (1 - 1/N_O),
  two linear equations in a^2 and sigma^2. v_O is the model's own signal outside the
  mask (the CTF delocalises it, shifts move it): the noise from the background alone,
  V_O, would count a^2 v_O as noise. The solution is the fixed point of "noise from the
  background corrected by a^2 v_O, scale from the variance inside" iterated.
* offset b = (pooled background mean of the data) - a (that of the model).

Precision: the model's v_I, v_O come from a finite number of other particles, and at
high SNR the noise is a small difference V_O - a^2 v_O. With 600 particles of a 32 px box
(tests/test_graylevels.py) sigma came within 2 % up to SNR 5 and 6 % at SNR 20 (where the
background's variance alone is 2.2 sigma^2), the scale within 3.5 % down to SNR 0.05.

The scale's sign is not measured (second moments): the images must have the model's
contrast (protein bright, RELION's CTF sign; ``--invert`` otherwise). When V_I - V_O is
not clearly above its standard error over the images, the signal is not measurable and a
CryosviError says so.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from cryosvi.errors import CryosviError

MIN_BACKGROUND_FRACTION = 0.1
"""The mask leaves at least this fraction of the box outside it (the background)."""
MEASURABLE_Z = 4.0
"""The signal variance must exceed this many standard errors to be called measurable."""


class GrayLevels(NamedTuple):
    """image = scale * model_image + offset + white noise of std noise_std (gray levels
    of the images; scale per unit of the model image)."""

    scale: float
    offset: float
    noise_std: float


def mask_radius(coords: np.ndarray, pixel_size: float, box: int,
                margin: float = 6.0) -> float:
    """Radius (px of ``pixel_size`` Å) of the circular mask around the molecule: the
    largest distance of the pseudo-atoms ``coords`` (N, 3) Å from the centre, plus
    ``margin`` Å (for in-plane shifts and the atoms' own width), capped so that at least
    MIN_BACKGROUND_FRACTION of the ``box`` x ``box`` pixels stay outside."""
    radius = (float(np.linalg.norm(np.asarray(coords), axis=1).max()) + margin) / pixel_size
    return min(radius, box * math.sqrt((1 - MIN_BACKGROUND_FRACTION) / math.pi))


def circular_mask(box: int, radius: float, device=None) -> Tensor:
    """(box, box) bool: pixels within ``radius`` px of the centre (box//2, box//2)."""
    index = torch.arange(box, device=device, dtype=torch.float64) - box // 2
    return index[:, None] ** 2 + index[None, :] ** 2 <= radius**2


def _moments(images: Tensor, inside: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per image (k,): background mean, second moment about it inside and outside."""
    images = images.double()
    background = images[:, ~inside]
    mean = background.mean(dim=1)
    centred = images - mean[:, None, None]
    return mean, centred[:, inside].square().mean(dim=1), centred[:, ~inside].square().mean(dim=1)


def _check_stack(name: str, images: Tensor, box: int | None = None) -> None:
    if images.dim() != 3 or images.shape[-1] != images.shape[-2] or images.shape[0] < 2:
        raise ValueError(f"{name} must be (k, n, n) with k >= 2, got {tuple(images.shape)}")
    if box is not None and images.shape[-1] != box:
        raise ValueError(f"{name} are {images.shape[-1]} px, the images {box} px")


def estimate_gray_levels(images: Tensor, model_images: Tensor,
                         mask_radius_px: float) -> GrayLevels:
    """Scale, offset and noise std of ``images`` (k, n, n) relative to ``model_images``
    (m, n, n), clean model images of other particles drawn from the same distribution
    (prior poses and modes, the data's CTFs and shifts; ``prior_model_images``), without
    the particles' poses. ``mask_radius_px``: the molecule's radius plus a margin, in
    pixels of these images (``mask_radius``). See the module notes for the method;
    the scale comes out >= 0. A CryosviError when the mask leaves no background or the
    particles' signal is not measurable above the noise."""
    _check_stack("images", images)
    _check_stack("model_images", model_images, images.shape[-1])
    box = images.shape[-1]
    inside = circular_mask(box, mask_radius_px, images.device)
    n_out = int((~inside).sum())
    if n_out < MIN_BACKGROUND_FRACTION * box * box / 2:
        raise CryosviError(f"a mask of radius {mask_radius_px:.1f} px leaves only {n_out} "
                           f"background pixels in the {box} px box; use a larger box")
    c_in, c_out = 1 + 1 / n_out, 1 - 1 / n_out
    data_mean, data_in, data_out = _moments(images, inside)
    model_mean, model_in, model_out = (t.to(images.device) for t in
                                       _moments(model_images, inside.to(model_images.device)))
    v_in, v_out = float(model_in.mean()), float(model_out.mean())
    det = v_in * c_out - v_out * c_in
    if not det > 0.05 * v_in:
        raise CryosviError(f"the model images have no more signal inside the {mask_radius_px:.1f}"
                           " px mask than outside it; the gray levels cannot be estimated")
    # a^2 det = c_out V_I - c_in V_O, per image, then its mean and standard error.
    excess = c_out * data_in - c_in * data_out
    k = excess.shape[0]
    mean_excess, error = float(excess.mean()), float(excess.std() / math.sqrt(k))
    if not mean_excess > MEASURABLE_Z * error:
        raise CryosviError(
            f"the particles' signal is not measurable: their variance inside the "
            f"{mask_radius_px:.1f} px mask exceeds the background's by {mean_excess:.3g} "
            f"+- {error:.3g} over {k} images; use more particles or check the box and "
            "the images")
    scale_sq = mean_excess / det
    noise_var = (float(data_out.mean()) - scale_sq * v_out) / c_out
    if not noise_var > 0:
        raise CryosviError("the noise level cannot be estimated: the model's signal "
                           "outside the mask explains all the background's variance")
    scale = math.sqrt(scale_sq)
    offset = float(data_mean.mean()) - scale * float(model_mean.mean())
    return GrayLevels(scale, offset, math.sqrt(noise_var))


def fit_scale_with_poses(images: Tensor, model_images: Tensor) -> GrayLevels:
    """Least-squares gray levels when each particle's model image is known: ``images``
    and ``model_images`` (k, n, n), image i against model image i (its pose, CTF, shift).
    Fits images = scale * model + offset over every pixel of every image; noise_std is
    the residuals' std (k n^2 - 2 degrees of freedom). The scale keeps its sign (negative:
    the images have the opposite contrast). A CryosviError when the model images are
    constant or the scale is within MEASURABLE_Z standard errors of 0."""
    _check_stack("images", images)
    if model_images.shape != images.shape:
        raise ValueError(f"model_images {tuple(model_images.shape)} must match images "
                         f"{tuple(images.shape)}")
    x = images.double().reshape(-1)
    y = model_images.double().to(images.device).reshape(-1)
    y_centred = y - y.mean()
    spread = float(y_centred.square().sum())
    if not spread > 0:
        raise CryosviError("the model images are constant; no scale can be fitted")
    scale = float((y_centred * (x - x.mean())).sum()) / spread
    offset = float(x.mean()) - scale * float(y.mean())
    residual = x - scale * y - offset
    noise_var = float(residual.square().sum()) / (x.numel() - 2)
    if not abs(scale) > MEASURABLE_Z * math.sqrt(noise_var / spread):
        raise CryosviError(f"the particles' scale is not measurable: {scale:.3g} +- "
                           f"{math.sqrt(noise_var / spread):.3g}")
    return GrayLevels(scale, offset, math.sqrt(noise_var))


def prior_model_images(forward, ctf, shifts: Tensor | None, count: int,
                       mode_std, generator: torch.Generator | None = None) -> Tensor:
    """(count, n, n) clean model images drawn from the prior: poses uniform on SO(3),
    mode amplitudes N(0, mode_std) Å (one std per mode), each with the CTF (and shifts,
    Å, or None) of a particle of the data: every particle's as often as ``count``
    allows (random order).

    forward: a ``cryosvi.physics.forward.ForwardModel`` whose ``groups`` serve ``ctf.group``;
    ctf: a ``ParticleCTF`` of the data's particles (N,); shifts: (N, 2) Å or None.
    No gradient; the draws come from ``generator`` (no global seed is touched).
    """
    from cryosvi.physics.rotations import random_quaternions

    device = forward.coords.device
    n_data = ctf.defocus_u.shape[0]
    # Each data particle's CTF and shift count // N or count // N + 1 times (a random
    # permutation, cycled): the model images' CTF distribution is the data's, without the
    # sampling spread of draws with replacement.
    pick = torch.cat([torch.randperm(n_data, generator=generator)
                      for _ in range(-(-count // n_data))])[:count]
    std = torch.as_tensor(mode_std, dtype=torch.float32).reshape(1, -1)
    with torch.no_grad():
        rotation = random_quaternions(count, generator).to(device)
        modes = (torch.randn(count, std.shape[1], generator=generator) * std).to(device)
        chosen = ctf.take(pick).to(device)
        moved = None if shifts is None else shifts[pick].to(device)
        return forward(modes, rotation, None, ctf=chosen, shifts=moved)
