"""Contrast transfer function, in RELION's convention (src/ctf.h, ``CTF::getCTF``).

With s the spatial frequency (1/Å) at azimuth alpha (from the x axis towards y, image
axes [y, x]) and defocus U, V (Å, positive = underfocus) at astigmatism angle theta
(RELION's rlnDefocusAngle, degrees from the x axis):

    defocus(alpha) = (U + V)/2 + (U - V)/2 cos(2 (alpha - theta))
    gamma          = 2 pi (-defocus lambda s^2 / 2 + Cs lambda^3 s^4 / 4) - phase_shift
    CTF            = -sin(gamma - atan(w / sqrt(1 - w^2)))
                   = w cos(gamma) - sqrt(1 - w^2) sin(gamma)
    envelope       = exp(-B s^2 / 4)

so CTF(0) = +w and, under underfocus, the first lobe is positive: RELION's sign
(cryoDRGN and cryojax use the opposite overall sign, CTF(0) = -w). Cs is given in mm
(x 1e7 -> Å), the phase shift in degrees, w = amplitude contrast, B in Å^2.

Because the defocus enters gamma linearly, gamma - atan(...) for a batch is one small
GEMM: [mean, half cos 2theta, half sin 2theta, 1] (B, 4) times a cached basis
(4, P*Q) = [-pi lambda s^2, -pi lambda s^2 cos 2alpha, -pi lambda s^2 sin 2alpha,
pi/2 Cs lambda^3 s^4 - phase - atan(...)], followed by one sine.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cryosvi.config import Optics

# CODATA 2018 (h and e exact since the 2019 SI redefinition).
PLANCK = 6.62607015e-34          # J s
ELECTRON_MASS = 9.1093837015e-31  # kg
ELEMENTARY_CHARGE = 1.602176634e-19  # C
SPEED_OF_LIGHT = 299792458.0     # m / s

# Bytes of padded spectrum (P x (P/2 + 1) complex per image) per chunk in apply_ctf (on
# CPU, per thread). On CPU a chunk should stay in cache, and below glibc's mmap threshold
# so its memory is reused instead of page-faulted in afresh each call (2 MiB was best on
# one core at 128 px: 1 MiB pays per-chunk overhead, 8 MiB and more cache misses); on
# GPUs it only bounds the memory.
_CPU_CHUNK_BYTES = 1 << 21
_CUDA_CHUNK_BYTES = 1 << 28


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength (Å) at accelerating voltage ``voltage_kv`` (kV).

    lambda = h / sqrt(2 m e V (1 + e V / (2 m c^2))) (e.g. Mindell & Grigorieff 2003;
    RELION's 12.2643247 / sqrt(V (1 + 0.978466e-6 V))). 300 kV -> 0.019687 Å.
    Accepts a float or a tensor (returned in kind).
    """
    volts = voltage_kv * 1e3
    energy = ELEMENTARY_CHARGE * volts
    correction = 1 + energy / (2 * ELECTRON_MASS * SPEED_OF_LIGHT**2)
    momentum_sq = 2 * ELECTRON_MASS * energy * correction
    sqrt = torch.sqrt if isinstance(momentum_sq, Tensor) else math.sqrt
    return PLANCK / sqrt(momentum_sq) * 1e10


@functools.lru_cache(maxsize=64)
def _frequency_grid(size: int, pixel_size: float, device: torch.device, dtype: torch.dtype):
    """s^2 (1/Å^2), cos 2alpha, sin 2alpha on the rfft2 grid of a size x size image.

    Each (size, size//2 + 1): rows are fftfreq (y), columns rfftfreq (x), so alpha is
    measured from the x axis towards y. Built in float64, then cast.
    """
    with torch.inference_mode(False), torch.no_grad():
        fy = torch.fft.fftfreq(size, d=pixel_size, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(size, d=pixel_size, dtype=torch.float64)[None, :]
        s2 = fy**2 + fx**2
        # cos 2a = (x^2 - y^2)/s^2, sin 2a = 2xy/s^2; at s = 0 the azimuth is irrelevant.
        safe = torch.where(s2 > 0, s2, 1.0)
        cos2 = torch.where(s2 > 0, (fx**2 - fy**2) / safe, 1.0)
        sin2 = torch.where(s2 > 0, 2 * fx * fy / safe, 0.0)
        return tuple(t.to(device=device, dtype=dtype) for t in (s2, cos2, sin2))


@functools.lru_cache(maxsize=64)
def _ctf_basis(optics: Optics, size: int, device: torch.device, dtype: torch.dtype):
    """Cached (-basis (4, size*(size//2+1)), envelope or None) for ``ctf_rfft``.

    Built in float64 (the constant term reaches hundreds of radians at high frequency)
    and cast once. Made outside inference mode so that the cached tensors can be saved
    for backward by later autograd calls.
    """
    with torch.inference_mode(False), torch.no_grad():
        s2, cos2, sin2 = _frequency_grid(size, optics.pixel_size, torch.device("cpu"),
                                         torch.float64)
        wavelength = electron_wavelength(optics.voltage)
        cs = optics.spherical_aberration * 1e7  # mm -> Å
        w = optics.amplitude_contrast
        # RELION's K3 = atan(Q0 / sqrt(1 - Q0^2)): the amplitude-contrast phase.
        amplitude_phase = math.atan(w / math.sqrt(1 - w * w))
        defocus_term = -math.pi * wavelength * s2
        constant = (0.5 * math.pi * cs * wavelength**3 * s2 * s2
                    - math.radians(optics.phase_shift) - amplitude_phase)
        # Negated, so that CTF = -sin(coefficients @ basis) = sin(coefficients @ -basis)
        # costs one pass over the grid fewer.
        basis = -torch.stack([defocus_term, defocus_term * cos2, defocus_term * sin2, constant])
        basis = basis.reshape(4, -1).to(device=device, dtype=dtype)
        envelope = None
        if optics.bfactor != 0:
            envelope = torch.exp(-optics.bfactor / 4 * s2).to(device=device, dtype=dtype)
        return basis, envelope


def _as_batch(value, like: Tensor | None = None) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if like is not None:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return torch.as_tensor(value, dtype=torch.get_default_dtype())


def _coefficients(defocus_u: Tensor, defocus_v: Tensor, astigmatism_angle: Tensor) -> Tensor:
    """(*batch, 4) = [mean, half cos 2theta, half sin 2theta, 1] (see the module notes)."""
    angle = torch.deg2rad(astigmatism_angle)
    mean = (defocus_u + defocus_v) / 2
    half = (defocus_u - defocus_v) / 2
    mean, half, angle = torch.broadcast_tensors(mean, half, angle)
    return torch.stack(
        [mean, half * torch.cos(2 * angle), half * torch.sin(2 * angle), torch.ones_like(mean)],
        dim=-1)


def ctf_rfft(defocus_u: Tensor, defocus_v: Tensor, astigmatism_angle: Tensor,
             optics: Optics, size: int) -> Tensor:
    """The CTF on the ``torch.fft.rfft2`` grid of a size x size image of pixel
    ``optics.pixel_size`` Å.

    defocus_u, defocus_v: (*batch) Å, positive = underfocus. astigmatism_angle:
    (*batch) degrees from the x axis (rlnDefocusAngle). Broadcastable to each other;
    dtype and device follow ``defocus_u``. Returns (*batch, size, size//2 + 1), unitless,
    differentiable w.r.t. all three.
    """
    defocus_u = _as_batch(defocus_u)
    defocus_v = _as_batch(defocus_v, defocus_u)
    angle = _as_batch(astigmatism_angle, defocus_u)
    basis, envelope = _ctf_basis(optics, size, defocus_u.device, defocus_u.dtype)
    coefficients = _coefficients(defocus_u, defocus_v, angle)
    # gamma - atan(w / sqrt(1 - w^2)) = -(coefficients @ basis); CTF = -sin of it.
    ctf = torch.sin(coefficients @ basis)
    ctf = ctf.reshape(*coefficients.shape[:-1], size, size // 2 + 1)
    return ctf if envelope is None else ctf * envelope


def apply_ctf(images: Tensor, defocus_u: Tensor, defocus_v: Tensor,
              astigmatism_angle: Tensor, optics: Optics, pad_factor: int = 2) -> Tensor:
    """Convolve images with the CTF's point spread function (zero-padded FFT).

    images: (B, L, L), axes [y, x], pixel ``optics.pixel_size``. defocus_u, defocus_v:
    (B,) Å; astigmatism_angle: (B,) degrees (see ``ctf_rfft``); scalars broadcast.
    pad_factor: the images are zero-padded to P = pad_factor * L before the FFT, which
    limits the wrap-around of the point spread function; the CTF is sampled on the P x P
    rfft2 grid.

    Returns (B, L, L), same dtype and device, differentiable w.r.t. images and the three
    CTF parameters.

    The CTF is real and even, so multiplying the spectrum is a circular convolution
    with a kernel centred on index 0: it commutes with translations, and an image
    padded anywhere and cropped from the same place comes back centred. We pad at the
    end (implicitly, via ``n=``) and crop the first L rows / columns, which gives the
    same result as centred padding with less work: the forward x transform runs only on
    the L non-zero rows, and the inverse y transform's output is cropped to L rows before
    the inverse x transform. See ``_ConvolveCTF`` for the chunking and the backward pass.
    """
    size = images.shape[-1]
    if images.dim() < 2 or images.shape[-2] != size:
        raise ValueError(f"images must be square (..., L, L), got {tuple(images.shape)}")
    padded = int(round(pad_factor * size))
    if padded < size:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    coefficients = _coefficients(_as_batch(defocus_u, images), _as_batch(defocus_v, images),
                                 _as_batch(astigmatism_angle, images))
    batch_shape = torch.broadcast_shapes(images.shape[:-2], coefficients.shape[:-1])
    flat_images = images.expand(*batch_shape, size, size).reshape(-1, size, size)
    flat_coefficients = coefficients.to(images.dtype).expand(*batch_shape, 4).reshape(-1, 4)
    out = _ConvolveCTF.apply(flat_images, flat_coefficients, optics, padded)
    return out.reshape(*batch_shape, size, size)


def _chunk_size(images: Tensor, padded: int) -> int:
    """Images per chunk: a cache-sized piece on CPU, a memory-bounded one on GPUs."""
    if images.device.type == "cpu":
        budget = _CPU_CHUNK_BYTES * torch.get_num_threads()  # cache-sized share per thread
    else:
        budget = _CUDA_CHUNK_BYTES
    spectrum_bytes = padded * (padded // 2 + 1) * 2 * images.element_size()
    return max(1, budget // spectrum_bytes)


@functools.lru_cache(maxsize=64)
def _half_plane_weights(padded: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """m_kx / P^2 for the columns of an rfft2 half plane: m = 1 for kx = 0 (and for the
    Nyquist column of an even P), 2 for the columns that stand for a +-kx pair."""
    with torch.inference_mode(False), torch.no_grad():
        weights = torch.full((padded // 2 + 1,), 2.0, dtype=torch.float64)
        weights[0] = 1.0
        if padded % 2 == 0:
            weights[-1] = 1.0
        return (weights / padded**2).to(device=device, dtype=dtype)


def _spectrum(images: Tensor, padded: int) -> Tensor:
    """rfft2 of the images zero-padded (at the end) to P x P: (c, P, P//2 + 1).

    rfft along x of the L non-zero rows only, then a full FFT along y (padded by n=)."""
    return torch.fft.fft(torch.fft.rfft(images, n=padded, dim=-1), n=padded, dim=-2)


def _crop_inverse(spectrum: Tensor, size: int, padded: int) -> Tensor:
    """The first L x L pixels of irfft2 of a (c, P, P//2 + 1) spectrum: inverse along y,
    keep L rows, then the inverse along x on those only."""
    rows = torch.fft.ifft(spectrum, dim=-2)[..., :size, :]
    return torch.fft.irfft(rows, n=padded, dim=-1)[..., :size]


def _ctf_chunk(coefficients: Tensor, basis: Tensor, envelope, padded: int):
    """(CTF, argument) of a chunk, both (c, P, P//2 + 1); CTF = sin(argument) envelope."""
    argument = (coefficients @ basis).view(-1, padded, padded // 2 + 1)
    ctf = torch.sin(argument)
    return (ctf if envelope is None else ctf.mul_(envelope)), argument


class _ConvolveCTF(torch.autograd.Function):
    """images (B, L, L), CTF coefficients (B, 4) -> CTF-convolved images (B, L, L).

    The batch is walked in chunks (cache-sized on CPU), and each chunk's output is
    written straight into the result, so nothing of size B x P x P is held: backward
    recomputes what it needs from the saved inputs.

    Backward. The operator A_H(x) = crop(irfft2(H rfft2(pad(x)))) is a convolution with
    the real, even kernel irfft2(H), hence self-adjoint: dL/dx = A_H(g) for the incoming
    gradient g. For H, write G = rfft2(pad(g)) and X = rfft2(pad(x)); irfft2's adjoint
    gives <g, irfft2(Z)> = sum_k m_kx Re(Z_k conj(G_k)) / P^2 (``_half_plane_weights``),
    so dL/dH_k = m_kx Re(X_k conj(G_k)) / P^2, and through H = sin(c @ basis) envelope,
    dL/dc = (dL/dH envelope cos(c @ basis)) @ basis^T. G serves both gradients.
    """

    @staticmethod
    def forward(ctx, images, coefficients, optics, padded):
        n_images, size, _ = images.shape
        basis, envelope = _ctf_basis(optics, padded, images.device, images.dtype)
        out = torch.empty_like(images, memory_format=torch.contiguous_format)
        chunk = _chunk_size(images, padded)
        for start in range(0, n_images, chunk):
            rows = slice(start, start + chunk)
            spectrum = _spectrum(images[rows], padded)
            ctf, _ = _ctf_chunk(coefficients[rows], basis, envelope, padded)
            out[rows] = _crop_inverse(spectrum.mul_(ctf), size, padded)
        ctx.save_for_backward(images, coefficients)
        ctx.optics, ctx.padded = optics, padded
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        images, coefficients = ctx.saved_tensors
        optics, padded = ctx.optics, ctx.padded
        n_images, size, _ = images.shape
        basis, envelope = _ctf_basis(optics, padded, images.device, images.dtype)
        want_images, want_coefficients = ctx.needs_input_grad[:2]
        grad_images = torch.empty_like(images) if want_images else None
        grad_coefficients = torch.empty_like(coefficients) if want_coefficients else None
        weights = _half_plane_weights(padded, images.device, images.dtype)
        chunk = _chunk_size(images, padded)
        for start in range(0, n_images, chunk):
            rows = slice(start, start + chunk)
            grad_spectrum = _spectrum(grad_out[rows], padded)
            ctf, argument = _ctf_chunk(coefficients[rows], basis, envelope, padded)
            if want_coefficients:
                spectrum = _spectrum(images[rows], padded)
                grad_ctf = (spectrum * grad_spectrum.conj()).real * weights
                grad_argument = grad_ctf * torch.cos(argument)
                if envelope is not None:
                    grad_argument *= envelope
                grad_coefficients[rows] = grad_argument.reshape(-1, basis.shape[1]) @ basis.T
            if want_images:
                grad_images[rows] = _crop_inverse(grad_spectrum.mul_(ctf), size, padded)
        return grad_images, grad_coefficients, None, None
