"""In-plane shifts as Fourier phase ramps, in RELION's convention.

A particle's ``shifts`` (x, y) Å are RELION 3.1's (rlnOriginXAngst, rlnOriginYAngst).
RELION renders a particle by translating its centred projection by -origin
(src/apps/project.cpp calls ``shiftImageInFourierTransform(F2D, F2D, L, -xoff, -yoff)``,
which translates by its arguments), so the particle's centre lies at pixel
(L//2 - y/pixel, L//2 - x/pixel) of the [y, x] image; checked against relion_project in
tests/test_relion_projector.py. The translation by -s multiplies the spectrum by

    R(k) = exp(+i (ky s_y + kx s_x)),  ky, kx = 2 pi fftfreq (rad per pixel),

an outer product of one phase per row and one per column (P + Q complex exponentials
per image, not P x Q). ``ctf.apply_ctf`` and ``ctf.apply_particle_ctf`` multiply it into
the CTF's FFT; ``shift_images`` applies it alone.

Nyquist: for an even grid the Nyquist row / column of a sub-pixel ramp is complex, and
irfft keeps the real part (cos of the phase), the usual Hermitian reading; an integer
shift is exact (a circular shift of the grid).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def shift_frequencies(size: int, device: torch.device, dtype: torch.dtype):
    """(ky (P,), kx (P//2 + 1,)) = (2 pi fftfreq(P), 2 pi rfftfreq(P)): rad of phase per
    pixel of shift along the rows (y) and columns (x) of the rfft2 grid of a P x P image.
    Cached; made outside inference mode so that autograd may save them."""
    with torch.inference_mode(False), torch.no_grad():
        ky = 2 * math.pi * torch.fft.fftfreq(size, dtype=torch.float64)
        kx = 2 * math.pi * torch.fft.rfftfreq(size, dtype=torch.float64)
        return ky.to(device=device, dtype=dtype), kx.to(device=device, dtype=dtype)


def phase_ramp(shift_px: Tensor, size: int) -> Tensor:
    """The rfft2-grid spectrum of a translation by -shift: (B, P, P//2 + 1) complex.

    shift_px: (B, 2) pixels (x, y), RELION's origin divided by the pixel size; size: P,
    the side of the (padded) image the spectrum belongs to. Differentiable.
    """
    ky, kx = shift_frequencies(size, shift_px.device, shift_px.dtype)
    column = torch.polar(torch.ones_like(ky), ky * shift_px[:, 1:2])  # (B, P)
    row = torch.polar(torch.ones_like(kx), kx * shift_px[:, 0:1])     # (B, Q)
    return column[:, :, None] * row[:, None, :]


def shift_images(images: Tensor, shifts: Tensor, pixel_size: float | Tensor,
                 pad_factor: int = 1) -> Tensor:
    """Translate images by -shifts, as RELION renders a particle of origin ``shifts``.

    images: (B, L, L), axes [y, x]. shifts: (B, 2) Å, (rlnOriginXAngst, rlnOriginYAngst);
    to centre a particle of known origin, pass -origin. pixel_size: Å, a float or (B,).
    pad_factor: 1 shifts circularly on the L grid, as RELION's
    ``shiftImageInFourierTransform``; 2 zero-pads first, so content leaving the box is
    dropped instead of wrapped. Returns (B, L, L), differentiable w.r.t. both.
    """
    size = images.shape[-1]
    if images.dim() != 3 or images.shape[-2] != size:
        raise ValueError(f"images must be (B, L, L), got {tuple(images.shape)}")
    if shifts.shape != (images.shape[0], 2):
        raise ValueError(f"shifts must be (B, 2) = {(images.shape[0], 2)}, got "
                         f"{tuple(shifts.shape)}")
    padded = int(round(pad_factor * size))
    if padded < size:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    if isinstance(pixel_size, Tensor):
        pixel_size = pixel_size.to(images.dtype)[:, None]
    shift_px = shifts.to(images.dtype) / pixel_size
    spectrum = torch.fft.rfft2(images, s=(padded, padded)) * phase_ramp(shift_px, padded)
    return torch.fft.irfft2(spectrum, s=(padded, padded))[..., :size, :size]
