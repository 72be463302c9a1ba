"""The zero-padded FFTs of a convolution of L x L images by a real filter on the P x P
grid (P = pad_factor L; ``cryosvi.physics.ctf``'s CTF and shifts): the images' spectra
held as (c, Q, P) with Q = P//2 + 1, kx rows and ky columns (the transpose of rfft2's
(P, Q), so that both FFTs run along contiguous memory), the cropped inverse, the
reused chunk buffers and the half plane's weights. The padding is at the end and the
crop the first L rows and columns: a filter centred on index 0 commutes with that, so
the result equals centred padding (``ctf.apply_ctf``'s notes)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def half_plane_weights(padded: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """m_kx / P^2 for the columns of an rfft2 half plane: m = 1 for kx = 0 (and for the
    Nyquist column of an even P), 2 for the columns that stand for a +-kx pair."""
    with torch.inference_mode(False), torch.no_grad():
        weights = torch.full((padded // 2 + 1,), 2.0, dtype=torch.float64)
        weights[0] = 1.0
        if padded % 2 == 0:
            weights[-1] = 1.0
        return (weights / padded**2).to(device=device, dtype=dtype)


class SpectrumBuffers:
    """Reused per-chunk buffers of one chunked convolution (``cryosvi.physics.ctf``) (fresh multi-MiB buffers
    for every chunk would cost page faults). ``take(c)`` gives the first c images'.

    columns: (c, Q, P) complex, the zero-padded input of the ky FFT (only its first L
    columns are ever written); pitched: (c, Q, L + 1) complex, the ky-inverse's first L
    columns at a row pitch that is not a power of two (a transposing copy that reads at
    a stride of 2^k bytes thrashes the cache); rows: (c, L, Q) complex, the input of the
    x inverse; ctf: (c, Q, P) real, the CTF.
    """

    def __init__(self, images: Tensor, chunk: int, padded: int):
        count, size = min(chunk, images.shape[0]), images.shape[-1]
        complex_dtype = torch.complex128 if images.dtype == torch.float64 else torch.complex64
        options = {"dtype": complex_dtype, "device": images.device}
        half = padded // 2 + 1
        self.columns = torch.zeros(count, half, padded, **options)
        self.pitched = torch.empty(count, half, size + 1, **options)
        self.rows = torch.empty(count, size, half, **options)
        self.ctf = images.new_empty(count, half, padded)

    def take(self, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.columns[:count], self.pitched[:count], self.rows[:count], self.ctf[:count]


def padded_spectrum(images: Tensor, padded: int, buffers: SpectrumBuffers | None = None) -> Tensor:
    """rfft2 of the images zero-padded (at the end) to P x P, as (c, Q, P): kx rows,
    ky columns (the transpose of rfft2's (P, Q)), contiguous.

    rfft along x of the L non-zero rows only; the (c, Q, L) result is transposed into the
    first L columns of a zero (c, Q, P) buffer, and the ky FFT runs along contiguous
    memory (torch's FFT along a strided dimension makes the same copies, and slower)."""
    size = images.shape[-1]
    rows = torch.fft.rfft(images, n=padded, dim=-1)
    if buffers is None:
        columns = rows.new_zeros(rows.shape[0], rows.shape[-1], padded)
    else:
        columns = buffers.take(images.shape[0])[0]
    columns[..., :size] = rows.transpose(-1, -2)
    return torch.fft.fft(columns, dim=-1)


def crop_inverse(spectrum: Tensor, size: int, padded: int,
                  buffers: SpectrumBuffers | None = None) -> Tensor:
    """The first L x L pixels of irfft2 of a (c, Q, P) spectrum in ``padded_spectrum``'s layout:
    inverse along ky, keep L rows of y, then the inverse along x on those only."""
    columns = torch.fft.ifft(spectrum, dim=-1)[..., :size]  # (c, Q, L)
    if buffers is None:
        rows = columns.transpose(-1, -2)
    else:
        _, pitched, rows, _ = buffers.take(spectrum.shape[0])
        pitched = pitched[..., :size]
        pitched.copy_(columns)
        rows.copy_(pitched.transpose(-1, -2))
    return torch.fft.irfft(rows, n=padded, dim=-1)[..., :size]
