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

Per particle (``ParticleCTF``: U, V, angle, phase shift, B-factor, optics group) with
voltage, Cs, amplitude contrast and pixel size per optics group (``OpticsGroups``, RELION's
data_optics table), the same GEMM takes a block-sparse coefficient row: the basis of
every group stacked, (4G + 1, P*Q), the particle's [mean, half cos, half sin, 1] in its
group's block and zeros elsewhere, and a last column, the phase shift (rad), against a
row of ones. One GEMM serves a batch that mixes groups (G = 1 costs what one Optics
does); the envelope is exp(-B_i/4 s_g^2), one more (B, G) x (G, P*Q) GEMM.

In-plane shifts ride on the same FFT: ``shifts`` (B, 2) Å are RELION's
(rlnOriginXAngst, rlnOriginYAngst), and the spectrum is multiplied by the phase ramp of a
translation by -origin (``cryosvi.physics.shifts``: convention, cost, Nyquist). The ramp is
applied on the zero-padded P grid, so content shifted out of the L box is dropped, not
wrapped.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cryosvi.config import Optics
from cryosvi.physics.optics import OpticsGroups, ParticleCTF, electron_wavelength
from cryosvi.physics.padded_fft import (SpectrumBuffers, crop_inverse, half_plane_weights,
                                        padded_spectrum)
from cryosvi.physics.shifts import phase_ramp, shift_frequencies



# Bytes of padded spectrum (P x (P/2 + 1) complex per image) per chunk in apply_ctf (on
# CPU, per thread). On CPU a chunk should stay in cache, and below glibc's mmap threshold
# so its memory is reused instead of page-faulted in afresh each call (2 MiB was best on
# one core at 128 px: 1 MiB pays per-chunk overhead, 8 MiB and more cache misses); on
# GPUs it only bounds the memory.
_CPU_CHUNK_BYTES = 1 << 21
_CUDA_CHUNK_BYTES = 1 << 28
# Bytes the transfer functions of a batch's distinct particles may take when they are
# computed once for all their rows (``_shared_transfers``).
_SHARED_TRANSFER_BYTES = 1 << 26


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


class _Basis(NamedTuple):
    """What a CTF evaluation needs on the rfft2 grid of a P x P image (Q = P//2 + 1).

    argument: (K, P*Q), CTF = sin(coefficients (B, K) @ argument) x envelope.
    envelope: (P, Q) fixed envelope (one Optics with a B-factor) or None.
    envelope_rows: (G, P*Q) s^2 of each group, envelope = exp(e (B, G) @ rows), or None.
    """

    argument: Tensor
    envelope: Tensor | None = None
    envelope_rows: Tensor | None = None


def _group_rows(voltage: float, cs_mm: float, w: float, s2: Tensor, cos2: Tensor,
                sin2: Tensor, phase_deg: float = 0.0) -> Tensor:
    """(4, P, Q) float64: -[-pi lambda s^2 (1, cos 2a, sin 2a),
    pi/2 Cs lambda^3 s^4 - phase - atan(w / sqrt(1 - w^2))] (see the module notes)."""
    wavelength = electron_wavelength(voltage)
    cs = cs_mm * 1e7  # mm -> Å
    # RELION's K3 = atan(Q0 / sqrt(1 - Q0^2)): the amplitude-contrast phase.
    amplitude_phase = math.atan(w / math.sqrt(1 - w * w))
    defocus_term = -math.pi * wavelength * s2
    constant = (0.5 * math.pi * cs * wavelength**3 * s2 * s2
                - math.radians(phase_deg) - amplitude_phase)
    # Negated, so that CTF = -sin(coefficients @ basis) = sin(coefficients @ -basis)
    # costs one pass over the grid fewer.
    return -torch.stack([defocus_term, defocus_term * cos2, defocus_term * sin2, constant])


@functools.lru_cache(maxsize=64)
def _ctf_basis(optics: Optics, size: int, device: torch.device, dtype: torch.dtype) -> _Basis:
    """Cached basis (4, size*(size//2+1)) and fixed envelope of one Optics.

    Built in float64 (the constant term reaches hundreds of radians at high frequency)
    and cast once. Made outside inference mode so that the cached tensors can be saved
    for backward by later autograd calls.
    """
    with torch.inference_mode(False), torch.no_grad():
        s2, cos2, sin2 = _frequency_grid(size, optics.pixel_size, torch.device("cpu"),
                                         torch.float64)
        basis = _group_rows(optics.voltage, optics.spherical_aberration,
                            optics.amplitude_contrast, s2, cos2, sin2, optics.phase_shift)
        basis = basis.reshape(4, -1).to(device=device, dtype=dtype)
        envelope = None
        if optics.bfactor != 0:
            envelope = torch.exp(-optics.bfactor / 4 * s2).to(device=device, dtype=dtype)
        return _Basis(basis, envelope)


@functools.lru_cache(maxsize=64)
def _groups_basis(groups: OpticsGroups, size: int, device: torch.device,
                  dtype: torch.dtype) -> _Basis:
    """Cached stacked basis (4G + 1, P*Q) of every group plus the phase-shift row of
    ones, and the (G, P*Q) s^2 rows of the per-particle envelope (float64, then cast)."""
    with torch.inference_mode(False), torch.no_grad():
        blocks, s2_rows = [], []
        for voltage, cs, w, pixel in zip(*groups):
            s2, cos2, sin2 = _frequency_grid(size, pixel, torch.device("cpu"), torch.float64)
            blocks.append(_group_rows(voltage, cs, w, s2, cos2, sin2).reshape(4, -1))
            s2_rows.append(s2.reshape(-1))
        blocks.append(torch.ones_like(s2_rows[0])[None])  # + phase shift (rad)
        basis = torch.cat(blocks).to(device=device, dtype=dtype)
        return _Basis(basis, None, torch.stack(s2_rows).to(device=device, dtype=dtype))


class _Layout(NamedTuple):
    """A ``_Basis`` reordered for ``_ConvolveCTF``, whose spectra are (c, Q, P): kx rows,
    ky columns (``padded_spectrum``), and the same restricted to the H = P//2 + 1 columns
    ky >= 0 (``*_half``: a CTF even in ky is computed there and mirrored).

    argument: (K, Q*P); argument_half: (K, Q*H); envelope, envelope_half: (Q, P), (Q, H)
    or None; envelope_rows, envelope_rows_half: (G, Q*P), (G, Q*H) or None.
    odd: (K,) bool, the basis rows odd in ky (the 2 kx ky astigmatism rows): a batch
    whose coefficients vanish on them has a CTF even in ky.
    """

    argument: Tensor
    argument_half: Tensor
    envelope: Tensor | None
    envelope_half: Tensor | None
    envelope_rows: Tensor | None
    envelope_rows_half: Tensor | None
    odd: Tensor


def _reorder(rows: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(R, P*Q) rows of the rfft2 grid of a P = ``size`` image -> (R, Q*P) in the
    (kx, ky) order of ``padded_spectrum`` and (R, Q*H), its columns ky >= 0."""
    half = size // 2 + 1
    grid = rows.reshape(rows.shape[0], size, half).transpose(1, 2)  # (R, Q, P)
    return (grid.contiguous().reshape(rows.shape[0], -1),
            grid[..., :half].contiguous().reshape(rows.shape[0], -1))


def _layout(basis: _Basis, size: int) -> _Layout:
    """``basis`` of the P = ``size`` rfft2 grid reordered for ``_ConvolveCTF``."""
    half = size // 2 + 1
    envelope = envelope_half = rows = rows_half = None
    if basis.envelope is not None:
        envelope, envelope_half = (e.view(half, -1) for e in
                                   _reorder(basis.envelope.reshape(1, -1), size))
    if basis.envelope_rows is not None:
        rows, rows_half = _reorder(basis.envelope_rows, size)
    terms = basis.argument.shape[0]
    odd = torch.zeros(terms, dtype=torch.bool, device=basis.argument.device)
    odd[2:terms - terms % 4:4] = True  # the sin 2 alpha row of each [mean, cos, sin, 1] block
    return _Layout(*_reorder(basis.argument, size), envelope, envelope_half, rows, rows_half,
                   odd)


@functools.lru_cache(maxsize=64)
def _ctf_layout(optics: Optics, size: int, device: torch.device, dtype: torch.dtype) -> _Layout:
    """``_ctf_basis`` reordered for ``_ConvolveCTF`` (cached, built outside inference mode)."""
    with torch.inference_mode(False), torch.no_grad():
        return _layout(_ctf_basis(optics, size, device, dtype), size)


@functools.lru_cache(maxsize=64)
def _groups_layout(groups: OpticsGroups, size: int, device: torch.device,
                   dtype: torch.dtype) -> _Layout:
    """``_groups_basis`` reordered for ``_ConvolveCTF`` (cached, built outside inference mode)."""
    with torch.inference_mode(False), torch.no_grad():
        return _layout(_groups_basis(groups, size, device, dtype), size)


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
    basis, envelope, _ = _ctf_basis(optics, size, defocus_u.device, defocus_u.dtype)
    coefficients = _coefficients(defocus_u, defocus_v, angle)
    # gamma - atan(w / sqrt(1 - w^2)) = -(coefficients @ basis); CTF = -sin of it.
    ctf = torch.sin(coefficients @ basis)
    ctf = ctf.reshape(*coefficients.shape[:-1], size, size // 2 + 1)
    return ctf if envelope is None else ctf * envelope


def _group_coefficients(ctf: ParticleCTF, groups: OpticsGroups, like: Tensor):
    """(B, 4G + 1) GEMM coefficients and (B, G) envelope coefficients (-B/4, or None) of
    a batch: each particle's [mean, half cos, half sin, 1] in its group's block, then
    its phase shift in rad (see the module notes)."""
    coefficients = _coefficients(_as_batch(ctf.defocus_u, like), _as_batch(ctf.defocus_v, like),
                                 _as_batch(ctf.angle, like)).to(like.dtype)
    if coefficients.dim() != 2:
        raise ValueError(f"ParticleCTF fields must be (B,), got {tuple(coefficients.shape[:-1])}")
    batch = coefficients.shape[0]
    if ctf.group is None:
        if groups.n_groups != 1:
            raise ValueError(f"ParticleCTF.group is needed with {groups.n_groups} optics groups")
        one_hot = coefficients.new_ones(batch, 1)
    else:
        one_hot = torch.nn.functional.one_hot(ctf.group.to(like.device).long().expand(batch),
                                              groups.n_groups).to(like.dtype)
    phase = (coefficients.new_zeros(batch) if ctf.phase_shift is None
             else torch.deg2rad(_as_batch(ctf.phase_shift, like)).expand(batch))
    block = (one_hot[:, :, None] * coefficients[:, None, :]).reshape(batch, -1)
    coefficients = torch.cat([block, phase[:, None]], dim=1)
    envelope = None
    if ctf.bfactor is not None:
        envelope = one_hot * (-_as_batch(ctf.bfactor, like).expand(batch) / 4)[:, None]
    return coefficients, envelope, one_hot


def particle_ctf_rfft(ctf: ParticleCTF, groups: OpticsGroups, size: int) -> Tensor:
    """Each particle's CTF on the ``rfft2`` grid of a size x size image at its optics
    group's pixel size: (B, size, size//2 + 1), unitless; dtype and device follow
    ``ctf.defocus_u``; differentiable w.r.t. U, V, angle, phase shift and B-factor.
    Equals ``ctf_rfft`` with the group's Optics (and the particle's phase shift and B)."""
    like = _as_batch(ctf.defocus_u)
    basis = _groups_basis(groups, size, like.device, like.dtype)
    coefficients, envelope, _ = _group_coefficients(ctf, groups, like)
    out = torch.sin(coefficients @ basis.argument)
    if envelope is not None:
        out = out * torch.exp(envelope @ basis.envelope_rows)
    return out.reshape(-1, size, size // 2 + 1)


def _check_images(images: Tensor, pad_factor) -> tuple[int, int]:
    """(L, P) of square (..., L, L) images zero-padded to P = pad_factor * L."""
    size = images.shape[-1]
    if images.dim() < 2 or images.shape[-2] != size:
        raise ValueError(f"images must be square (..., L, L), got {tuple(images.shape)}")
    padded = int(round(pad_factor * size))
    if padded < size:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    return size, padded


def _shift_pixels(shifts: Tensor | None, pixel_size, batch: int, like: Tensor):
    """(B, 2) Å (x, y) -> (B, 2) pixels, or None."""
    if shifts is None:
        return None
    shifts = _as_batch(shifts, like)
    if shifts.shape[-1] != 2:
        raise ValueError(f"shifts must be (B, 2) Å (x, y), got {tuple(shifts.shape)}")
    if isinstance(pixel_size, Tensor):
        pixel_size = pixel_size[:, None]
    return (shifts.to(like.dtype) / pixel_size).expand(batch, 2).contiguous()


def apply_ctf(images: Tensor, defocus_u: Tensor, defocus_v: Tensor,
              astigmatism_angle: Tensor, optics: Optics, pad_factor: int = 2, *,
              shifts: Tensor | None = None) -> Tensor:
    """Convolve images with the CTF's point spread function (zero-padded FFT).

    images: (B, L, L), axes [y, x], pixel ``optics.pixel_size``. defocus_u, defocus_v:
    (B,) Å; astigmatism_angle: (B,) degrees (see ``ctf_rfft``); scalars broadcast.
    pad_factor: the images are zero-padded to P = pad_factor * L before the FFT, which
    limits the wrap-around of the point spread function; the CTF is sampled on the P x P
    rfft2 grid. shifts: (B, 2) Å, RELION's (rlnOriginXAngst, rlnOriginYAngst): the
    result is also translated by -shifts (a phase ramp in the same FFT; module notes);
    None = no shift (the result is then bit-identical to a call without the argument).

    Returns (B, L, L), same dtype and device, differentiable w.r.t. images, the three
    CTF parameters and the shifts.

    The CTF is real and even, so multiplying the spectrum is a circular convolution
    with a kernel centred on index 0: it commutes with translations, and an image
    padded anywhere and cropped from the same place comes back centred. We pad at the
    end (implicitly, via ``n=``) and crop the first L rows / columns, which gives the
    same result as centred padding with less work: the forward x transform runs only on
    the L non-zero rows, and the inverse y transform's output is cropped to L rows before
    the inverse x transform. See ``_ConvolveCTF`` for the chunking and the backward pass.
    """
    size, padded = _check_images(images, pad_factor)
    coefficients = _coefficients(_as_batch(defocus_u, images), _as_batch(defocus_v, images),
                                 _as_batch(astigmatism_angle, images))
    batch_shape = torch.broadcast_shapes(images.shape[:-2], coefficients.shape[:-1])
    flat_images = images.expand(*batch_shape, size, size).reshape(-1, size, size)
    flat_coefficients = coefficients.to(images.dtype).expand(*batch_shape, 4).reshape(-1, 4)
    layout = _ctf_layout(optics, padded, images.device, images.dtype)
    shift_px = _shift_pixels(shifts, optics.pixel_size, flat_images.shape[0], images)
    out = _ConvolveCTF.apply(flat_images, flat_coefficients, None, shift_px, layout, padded)
    return out.reshape(*batch_shape, size, size)


def apply_particle_ctf(images: Tensor, ctf: ParticleCTF, groups: OpticsGroups,
                       pad_factor: int = 2, *, shifts: Tensor | None = None) -> Tensor:
    """``apply_ctf`` with per-particle CTF parameters and optics groups, in one call.

    images: (B, L, L), axes [y, x]; particle i at pixel ``groups.pixel_size[group_i]``.
    ctf: ``ParticleCTF`` of (B,) tensors (U, V Å, angle deg, phase shift deg, B-factor
    Å^2, group index). shifts: (B, 2) Å, RELION's (rlnOriginXAngst, rlnOriginYAngst),
    applied as in ``apply_ctf`` (translation by -shifts), or None.
    Returns (B, L, L), differentiable w.r.t. images, U, V, angle, phase shift, B-factor
    and shifts; a batch that mixes groups costs one GEMM with 4G + 1 terms per pixel.
    """
    size, padded = _check_images(images, pad_factor)
    if images.dim() != 3:
        raise ValueError(f"images must be (B, L, L), got {tuple(images.shape)}")
    layout = _groups_layout(groups, padded, images.device, images.dtype)
    coefficients, envelope, one_hot = _group_coefficients(ctf, groups, images)
    batch = images.shape[0]
    if coefficients.shape[0] != batch:
        raise ValueError(f"{batch} images but {coefficients.shape[0]} CTF parameter rows")
    pixel = one_hot @ torch.tensor(groups.pixel_size, dtype=images.dtype, device=images.device)
    shift_px = _shift_pixels(shifts, pixel, batch, images)
    return _ConvolveCTF.apply(images, coefficients, envelope, shift_px, layout, padded)


def _chunk_size(images: Tensor, padded: int) -> int:
    """Images per chunk: a cache-sized piece on CPU, a memory-bounded one on GPUs."""
    if images.device.type == "cpu":
        budget = _CPU_CHUNK_BYTES * torch.get_num_threads()  # cache-sized share per thread
    else:
        budget = _CUDA_CHUNK_BYTES
    spectrum_bytes = padded * (padded // 2 + 1) * 2 * images.element_size()
    return max(1, budget // spectrum_bytes)


def _ctf_chunk(coefficients: Tensor, envelope_coefficients, layout: _Layout, padded: int,
               even: bool = False, out: Tensor | None = None):
    """(CTF, argument, envelope) of a chunk in ``padded_spectrum``'s layout, each (c, Q, P).

    When ``even`` (the CTFs are even in ky, ``_is_even``), the argument and envelope are
    computed on the H = P//2 + 1 columns ky >= 0 only, (c, Q, H), and the CTF's other
    columns are their mirror image (column P - j = column j). The envelope may be None,
    or (Q, P) / (Q, H) when fixed; CTF = sin(argument) envelope, written into ``out``
    (c, Q, P) when given."""
    n, half = coefficients.shape[0], padded // 2 + 1
    argument = coefficients @ (layout.argument_half if even else layout.argument)
    argument = argument.view(n, half, -1)
    ctf = argument.new_empty(n, half, padded) if out is None else out
    head = ctf[..., :argument.shape[-1]]
    torch.sin(argument, out=head)
    envelope = layout.envelope_half if even else layout.envelope
    if envelope is None and envelope_coefficients is not None:
        rows = layout.envelope_rows_half if even else layout.envelope_rows
        envelope = torch.exp(envelope_coefficients @ rows).view_as(argument)
    if envelope is not None:
        head.mul_(envelope)
    if even:
        ctf[..., half:] = ctf[..., 1:padded - half + 1].flip(-1)
    return ctf, argument, envelope


def _is_even(coefficients: Tensor, layout: _Layout) -> bool:
    """Whether every CTF of the batch is even in ky (no 2 kx ky term: no astigmatism, or
    its axis along x or y), so that half of it can be computed and mirrored. On CPU only:
    on GPUs the test would cost a synchronisation, and the sine is cheap there."""
    if coefficients.device.type != "cpu":
        return False
    return not bool(coefficients[:, layout.odd].any())


def _shared_transfers(coefficients: Tensor, envelope_coefficients: Tensor | None,
                      shift_px: Tensor | None, layout: _Layout, padded: int,
                      even: bool) -> tuple[Tensor, Tensor] | None:
    """(transfers (U, Q, P), which (B,)): the transfer function (CTF, times the shift's
    phase ramp when shifted) of each of the U distinct rows of a batch in ``padded_spectrum``'s
    layout, and each row's index among them; None when fewer than half the rows repeat
    another or the U transfers would exceed ``_SHARED_TRANSFER_BYTES``.

    The samples of a posterior over latents that leave the CTF and shifts alone (the
    conformation of particles whose pose and CTF are given) repeat each particle's CTF
    in every sample: computing it once per particle instead of once per row saves the
    sine and the ramp of every other row (the same numbers to float rounding)."""
    keys = [coefficients] + [part for part in (envelope_coefficients, shift_px)
                             if part is not None]
    distinct, which = torch.unique(torch.cat(keys, 1), dim=0, return_inverse=True)
    count, rows = distinct.shape[0], coefficients.shape[0]
    complex_bytes = 2 if shift_px is not None else 1
    size = count * (padded // 2 + 1) * padded * coefficients.element_size() * complex_bytes
    if 2 * count > rows or size > _SHARED_TRANSFER_BYTES:
        return None
    # Distinct rows in the order of their first row, so that the rows of samples tiled
    # in (S, B) order read consecutive transfers (``_transfer_rows``: a view, no copy).
    first = torch.full((count,), rows, dtype=torch.long, device=which.device).scatter_reduce_(
        0, which, torch.arange(rows, device=which.device), "amin")
    order = torch.argsort(first)
    first = first[order]
    which = torch.argsort(order)[which]
    transfers, _, _ = _ctf_chunk(coefficients[first],
                                 None if envelope_coefficients is None
                                 else envelope_coefficients[first], layout, padded, even)
    if shift_px is not None:
        transfers = transfers * phase_ramp(shift_px[first], padded).transpose(-1, -2)
    return transfers, which


def _transfer_rows(transfers: Tensor, which: Tensor, rows: slice) -> Tensor:
    """The transfers of the rows ``rows`` (``_shared_transfers``): a slice of
    ``transfers`` where the rows read consecutive ones, else a gathered copy."""
    index = which[rows]
    begin = int(index[0])
    if bool((index == torch.arange(begin, begin + len(index), device=index.device)).all()):
        return transfers[begin:begin + len(index)]
    return transfers[index]


class _ConvolveCTF(torch.autograd.Function):
    """images (B, L, L), CTF coefficients (B, K), envelope coefficients (B, G) or None,
    shifts (B, 2) pixels or None -> CTF-convolved (and translated) images (B, L, L).

    The batch is walked in chunks (cache-sized on CPU), and each chunk's output is
    written straight into the result, so nothing of size B x P x P is held: backward
    recomputes what it needs from the saved inputs. Spectra are held as (c, Q, P), kx
    rows and ky columns (``padded_spectrum``), and the CTF basis is stored in that order
    (``_Layout``). When no CTF of the batch has a 2 kx ky term, the CTF is even in ky:
    its sine is evaluated on the ky >= 0 half and mirrored (``_ctf_chunk``).

    Backward. The operator A_H(x) = crop(irfft2(H rfft2(pad(x)))), with H = C R (C the
    real CTF, R the shift ramp, or 1), is a convolution with the real kernel irfft2(H),
    whose adjoint is the convolution with irfft2(conj H): dL/dx = A_{conj H}(g) for the
    incoming gradient g (C is even, so without shifts A_H is self-adjoint). For H, write
    G = rfft2(pad(g)) and X = rfft2(pad(x)); irfft2's adjoint gives
    <g, irfft2(Z)> = sum_k m_kx Re(Z_k conj(G_k)) / P^2 (``half_plane_weights``), exact for
    any complex Z (irfft reads only the real part of its self-conjugate bins, and so
    does Re), so with W_k = m_kx X_k conj(G_k) R_k / P^2:
    dL/dC_k = Re(W_k); through C = sin(c @ basis) E, dL/dc = (dL/dC E cos(c @ basis)) @
    basis^T and, for E = exp(e @ rows), dL/de = (dL/dC C) @ rows^T; and for the ramp
    R = exp(i (ky y + kx x)), dL/dx_shift = -sum_k kx Im(C_k W_k) (y likewise).
    G serves every gradient.
    """

    @staticmethod
    def forward(ctx, images, coefficients, envelope_coefficients, shift_px, layout, padded):
        n_images, size, _ = images.shape
        out = torch.empty_like(images, memory_format=torch.contiguous_format)
        chunk = _chunk_size(images, padded)
        even = _is_even(coefficients, layout)
        buffers = SpectrumBuffers(images, chunk, padded)
        shared = _shared_transfers(coefficients, envelope_coefficients, shift_px, layout,
                                   padded, even)
        for start in range(0, n_images, chunk):
            rows = slice(start, start + chunk)
            spectrum = padded_spectrum(images[rows], padded, buffers)
            if shared is not None:
                spectrum.mul_(_transfer_rows(*shared, rows))
            else:
                ctf, _, _ = _ctf_chunk(coefficients[rows],
                                       None if envelope_coefficients is None
                                       else envelope_coefficients[rows], layout, padded,
                                       even, buffers.take(spectrum.shape[0])[3])
                spectrum.mul_(ctf)
                if shift_px is not None:
                    spectrum.mul_(phase_ramp(shift_px[rows], padded).transpose(-1, -2))
            out[rows] = crop_inverse(spectrum, size, padded, buffers)
        ctx.save_for_backward(images, coefficients, envelope_coefficients, shift_px)
        ctx.layout, ctx.padded = layout, padded
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        images, coefficients, envelope_coefficients, shift_px = ctx.saved_tensors
        layout, padded = ctx.layout, ctx.padded
        n_images, size, _ = images.shape
        want_images, want_coefficients, want_envelope, want_shifts = ctx.needs_input_grad[:4]
        want_spectrum = want_coefficients or want_envelope or want_shifts
        grads = [torch.empty_like(x) if want else None for x, want in zip(
            (images, coefficients, envelope_coefficients, shift_px), ctx.needs_input_grad)]
        # m_kx / P^2 along the kx rows of the (c, Q, P) spectra.
        weights = half_plane_weights(padded, images.device, images.dtype)[:, None]
        chunk = _chunk_size(images, padded)
        for start in range(0, n_images, chunk):
            rows = slice(start, start + chunk)
            grad_spectrum = padded_spectrum(grad_out[rows], padded)
            ctf, argument, envelope = _ctf_chunk(coefficients[rows],
                                                 None if envelope_coefficients is None
                                                 else envelope_coefficients[rows], layout,
                                                 padded)
            ramp = (None if shift_px is None
                    else phase_ramp(shift_px[rows], padded).transpose(-1, -2))
            if want_spectrum:
                product = padded_spectrum(images[rows], padded) * grad_spectrum.conj()
                if ramp is not None:
                    product *= ramp
                grad_ctf = product.real * weights
                if want_coefficients:
                    grad_argument = grad_ctf * torch.cos(argument)
                    if envelope is not None:
                        grad_argument *= envelope
                    grads[1][rows] = grad_argument.reshape(-1, layout.argument.shape[1]) \
                        @ layout.argument.T
                if want_envelope:
                    grads[2][rows] = (grad_ctf * ctf).reshape(ctf.shape[0], -1) \
                        @ layout.envelope_rows.T
                if want_shifts:
                    phase_grad = (product.imag * weights).mul_(ctf).neg_()
                    ky, kx = shift_frequencies(padded, images.device, images.dtype)
                    grads[3][rows] = torch.stack([phase_grad.sum(-1) @ kx,
                                                  phase_grad.sum(-2) @ ky], dim=-1)
            if want_images:
                grad_spectrum.mul_(ctf)
                if ramp is not None:
                    grad_spectrum.mul_(ramp.conj())
                grads[0][rows] = crop_inverse(grad_spectrum, size, padded)
        return (*grads, None, None)
