"""Fourier cropping: particle images to a smaller working box (coarser pixels).

``fourier_crop(images (B, L, L), n)`` keeps the spatial frequencies |k| < n/2 cycles per
box of the image and resamples it on an n x n grid of pixel ``pixel * L / n``
(``cropped_pixel_size``): the same band-limited image on coarser pixels, as RELION's
particle extraction "rescale" and cryoDRGN's ``downsample`` do.

Conventions
-----------
* Centre: the origin of an image is pixel (L//2, L//2) (the rotation centre, see
  ``projection``), and it stays pixel (n//2, n//2) for even and odd L and n alike. The
  DFT's origin is index 0, so the image is rolled by -(L//2) before the transform and the
  result by +(n//2) after it (exact integer rolls). Without them an odd L would move the
  centre by a fraction of a pixel.
* Nyquist: an even n has a Nyquist row and column (k = n/2) where the frequencies +n/2
  and -n/2 of the original image alias onto one sample, and a sine there vanishes on the
  new grid. They are set to zero, so the output is exactly the original's ideal low-pass
  below the new Nyquist (|kx|, |ky| <= (n-1)//2) resampled: a signal band-limited below
  it comes back exactly. n = L returns the images unchanged.
* Gray levels: the spectrum is scaled by n^2 / L^2 (``norm="forward"`` in both
  transforms), so pixel values are samples of the same continuous image (a constant
  stays the same constant); white noise of std s becomes white noise of std s (n - 1) / L
  for an even n < L (the Nyquist row and column are zeroed: (n - 1)^2 of the n^2 Fourier
  samples are kept) and of std s n / L for an odd n.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cropped_pixel_size(pixel_size: float, box: int, new_box: int) -> float:
    """Å per pixel after Fourier cropping a ``box`` image to ``new_box``: pixel L / n."""
    return pixel_size * box / new_box


def fourier_crop(images: Tensor, new_box: int) -> Tensor:
    """Resample (B, L, L) images (axes [y, x]) to (B, n, n) by Fourier cropping.

    new_box: n, 1 <= n <= L. Real floating-point input, CPU or CUDA, any leading batch
    dims; returns the same dtype. Linear and differentiable. See the module notes for
    the centre, Nyquist and gray-level conventions.
    """
    size = images.shape[-1]
    if images.dim() < 2 or images.shape[-2] != size:
        raise ValueError(f"images must be square (..., L, L), got {tuple(images.shape)}")
    new_box = int(new_box)
    if not 1 <= new_box <= size:
        raise ValueError(f"new_box must be in [1, {size}], got {new_box}")
    if new_box == size:
        return images
    spectrum = torch.fft.rfft2(torch.roll(images, (-(size // 2), -(size // 2)), (-2, -1)),
                               norm="forward")
    keep = (new_box - 1) // 2  # highest |k| kept; an even n's Nyquist row/column stays 0
    cropped = spectrum.new_zeros(*spectrum.shape[:-2], new_box, new_box // 2 + 1)
    cropped[..., : keep + 1, : keep + 1] = spectrum[..., : keep + 1, : keep + 1]
    if keep:
        cropped[..., -keep:, : keep + 1] = spectrum[..., -keep:, : keep + 1]
    out = torch.fft.irfft2(cropped, s=(new_box, new_box), norm="forward")
    return torch.roll(out, (new_box // 2, new_box // 2), (-2, -1))
