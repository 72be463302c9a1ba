"""Projection of Gaussian pseudo-atoms along z onto a pixel grid.

Each pseudo-atom k is an isotropic 3D Gaussian of std ``sigma`` Å. Its integral along z
is a 2D Gaussian; normalised to unit peak, the projected image is the paper's

    V2D(x, y) = sum_k exp(-((x - x_k)^2 + (y - y_k)^2) / (2 sigma^2)),

sampled at pixel centres and truncated, per atom, to the ``window`` x ``window`` pixels
nearest its centre. The 2D Gaussian factorises, exp(-dx^2/2s^2) exp(-dy^2/2s^2), so each
atom is described by two 1D profiles of ``window`` values (gy along rows, gx along
columns) and its patch is their outer product.

Conventions
-----------
* Image axes are ``[y, x]``. Pixel (i, j) has its centre at
  y = (i - box//2) * pixel_size, x = (j - box//2) * pixel_size (Å): the origin lands on
  pixel (box//2, box//2).
* The ``window`` pixels nearest a centre at continuous pixel coordinate u are
  start .. start + window - 1 with start = floor(u + 1 - window/2) (odd windows are
  centred on round(u); even windows take the extra pixel on the side nearer to u).
  Every excluded pixel is at least window/2 pixels from the centre along that axis, so
  the truncation error of one atom is at most exp(-(window pixel_size / 2)^2 / (2 sigma^2))
  at any pixel.
* Pixels of a patch that fall outside the box are dropped (never wrapped).

Kernels
-------
Both kernels compute the same sum from the same 1D profiles:

* ``"scatter"``: the w^2 patch values gy ⊗ gx of every atom are added into the image
  with ``scatter_add_``. Work O(B N w^2).
* ``"matmul"``: the profiles are spread into dense (L, N) matrices Gy, Gx and
  image = Gy Gx^T (one batched GEMM). Work O(B N L^2), but at BLAS speed: it only wins
  when the box is small compared with the window.

Both run inside one autograd Function that walks the batch (and, for many atoms, the
atoms) in cache-sized chunks, computes the profiles of a chunk, splats them and writes
the chunk straight into the output. Nothing of size O(B N w^2) or O(B N L) is ever
held, no large temporary is allocated (on CPU a fresh large allocation costs more in
page faults than the arithmetic), and only ``coords`` is saved for backward, which
recomputes the profiles chunk by chunk and applies the chain rule by hand:
d gx[j] / d u = gx[j] (j - u) (pixel / sigma)^2 for a centre at pixel coordinate u.

Each image of a chunk is splatted on a canvas with a margin of ``window`` pixels on
every side: any window start is first clamped to [-window, box], so every patch pixel
has a valid canvas index base + offset (no per-pixel clamping or masking), pixels
outside the box land in the margin, and the box is cropped out at the end. Atoms far
outside (or with non-finite coordinates) are clamped to the margin and contribute
nothing to the image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cryosvi.config import default_window

METHODS = ("scatter", "matmul")

# Patch values (scatter) or dense profile entries (matmul) per chunk (on CPU, per thread).
# On CPU a chunk's temporaries (values, int64 indices, canvas) should stay in L2/L3 cache
# (2^18 was best on one core of the 2-core EPYC: 2^16 pays Python overhead per chunk,
# 2^22 cache misses); on CUDA the chunks only bound the memory (a few hundred MiB).
_CPU_CHUNK_ELEMENTS = 1 << 18
_CUDA_CHUNK_ELEMENTS = 1 << 24

# Relative cost of one scattered add (with its index and value) to one GEMM
# multiply-add; see ``choose_method``.
_SCATTER_COST = {"cpu": 10.0, "cuda": 100.0}


def project(coords: Tensor, box: int, pixel_size: float, sigma: float,
            window: int | None = None, *, method: str = "auto") -> Tensor:
    """Project Gaussian pseudo-atoms along z: the truncated V2D image.

    coords: (*batch, N, 3) atom positions in Å (x, y, z), already rotated; float32 or
        float64, CPU or CUDA. Differentiable (once).
    box: image side L in pixels. pixel_size: Å per pixel. sigma: Gaussian std in Å.
    window: patch side in pixels (default ``config.default_window(sigma, pixel_size)``,
        which covers at least +-3 sigma).
    method: ``"auto"`` (default: ``choose_method``), ``"scatter"`` or ``"matmul"`` (see
        the module notes; every method gives the same result to rounding).

    Returns (*batch, L, L) images, axes [y, x], dtype and device of ``coords``,
    unit peak height per isolated atom (dimensionless).
    """
    if coords.dim() < 2 or coords.shape[-1] != 3:
        raise ValueError(f"coords must be (*batch, N, 3), got {tuple(coords.shape)}")
    if not coords.is_floating_point():
        raise TypeError(f"coords must be a floating-point tensor, got {coords.dtype}")
    box = int(box)
    window = default_window(sigma, pixel_size) if window is None else int(window)
    if window < 1 or box < 1:
        raise ValueError(f"window and box must be >= 1, got {window} and {box}")
    if not (pixel_size > 0 and sigma > 0):
        raise ValueError(f"pixel_size and sigma must be > 0, got {pixel_size} and {sigma}")
    if method == "auto":
        method = choose_method(coords.shape[-2], box, window, coords.device)
    elif method not in METHODS:
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    batch_shape = coords.shape[:-2]
    flat = coords.reshape(math.prod(batch_shape), coords.shape[-2], 3)
    image = _Project.apply(flat, box, float(pixel_size), float(sigma), window, method)
    return image.reshape(*batch_shape, box, box)


def choose_method(n_atoms: int, box: int, window: int, device) -> str:
    """The kernel ``project`` uses for N atoms, an L-pixel box and a w-pixel window.

    Scatter does N w^2 scattered adds per image, matmul N L^2 multiply-adds at BLAS
    speed (the atom count cancels). On a CPU core, forward + backward, one scattered add
    with its index and value costs about as much as 10 GEMM multiply-adds (measured,
    N = 133: at L/w = 2.7 the two are even, matmul ~20% faster forward only; at
    L/w = 5.3 matmul is ~30% slower, at L/w = 10.7 2.3x slower), so matmul is chosen for
    L <= ~3 w only. On GPUs GEMM is relatively
    faster still (tensor cores vs atomics), hence a larger factor there (an estimate: no
    GPU was available to measure it).
    """
    kind = torch.device(device).type
    factor = _SCATTER_COST.get(kind, _SCATTER_COST["cuda"])
    return "matmul" if box * box <= factor * window * window else "scatter"


class _Geometry:
    """Constants of one (box, pixel, sigma, window, device, dtype) splat."""

    def __init__(self, box, pixel_size, sigma, window, device, dtype):
        self.box, self.window = box, window
        self.margin = window
        self.side = box + 2 * window  # canvas side
        self.inverse_pixel = 1.0 / pixel_size
        self.scale_sq = (pixel_size / sigma) ** 2  # (pixel / sigma)^2
        self.ramp = torch.arange(window, device=device, dtype=dtype).view(1, 1, window, 1)
        steps = torch.arange(window, device=device)
        # Canvas offset of patch pixel (t, s) from its corner: t * side + s, as (1, w, w, 1).
        self.offsets = (steps.view(window, 1) * self.side + steps).view(1, window, window, 1)
        self.row_ramp = steps.view(1, window, 1)


def _profiles(xy: Tensor, geo: _Geometry):
    """Window starts and 1D Gaussian profiles of a chunk of atoms.

    xy: (c, n, 2) Å (x, y). Returns ``u`` (c, 2, n) continuous pixel coordinates (x
    then y), ``start`` (c, 2, n) int64 first window pixel clamped to [-w, L], ``offset``
    (c, 2, w, n) pixel - u, and ``profile`` (c, 2, w, n) = exp(-offset^2 (pixel/sigma)^2 / 2).
    """
    # Pixel j has its centre at (j - box//2) * pixel_size. Atoms innermost (contiguous):
    # every later elementwise loop then runs along the atoms.
    u = torch.mul(xy.transpose(1, 2), geo.inverse_pixel,
                  out=xy.new_empty(xy.shape[0], 2, xy.shape[1])).add_(geo.box // 2)
    first = torch.floor(u + (1 - geo.window / 2))
    # Clamped into the canvas; NaN goes to the margin too (nan_to_num after clamp).
    first = first.clamp_(-geo.window, geo.box).nan_to_num_(nan=geo.box)
    offset = (first - u).unsqueeze(2) + geo.ramp
    profile = torch.exp(offset.square().mul_(-0.5 * geo.scale_sq))
    return u, first.long(), offset, profile


def _corner(start: Tensor, geo: _Geometry) -> Tensor:
    """Flat canvas index (c, n) of every patch's first pixel."""
    return (start[:, 1] + geo.margin) * geo.side + (start[:, 0] + geo.margin)


def _chunks(n_images: int, n_atoms: int, per_atom: int, device: torch.device):
    """(image slice, [atom slices]) tiles of about the chunk budget, images first."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    # On CPU each thread's share of a chunk should be cache-sized: the budget is per thread
    # (more threads, fewer and larger chunks: fewer parallel regions to synchronise).
    budget = _CPU_CHUNK_ELEMENTS * threads if device.type == "cpu" else _CUDA_CHUNK_ELEMENTS
    per_image = max(1, n_atoms * per_atom)
    if per_image <= budget:
        step = max(1, budget // per_image)
        # At least one image per thread and chunk: the scatter parallelises over images.
        step = max(1, min(step, math.ceil(n_images / threads)))
        atoms = [slice(0, n_atoms)]
    else:
        step = min(n_images, threads)
        per_chunk = max(1, budget // (per_atom * step))
        atoms = [slice(a, min(a + per_chunk, n_atoms)) for a in range(0, n_atoms, per_chunk)]
    for start in range(0, n_images, step):
        yield slice(start, min(start + step, n_images)), atoms


def _dense(start: Tensor, profile: Tensor, geo: _Geometry) -> Tensor:
    """Spread profiles (c, w, n) starting at canvas rows start (c, n) into (c, side, n)."""
    dense = profile.new_zeros(profile.shape[0], geo.side, profile.shape[-1])
    rows = (start + geo.margin).unsqueeze(1) + geo.row_ramp
    return dense.scatter_(1, rows, profile)  # rows of one atom are distinct: no adds


class _Project(torch.autograd.Function):
    """coords (B, N, 3) -> images (B, L, L); see the module notes."""

    @staticmethod
    def forward(ctx, coords, box, pixel_size, sigma, window, method):
        n_images, n_atoms, _ = coords.shape
        geo = _Geometry(box, pixel_size, sigma, window, coords.device, coords.dtype)
        out = coords.new_empty(n_images, box, box)
        per_atom = window * window if method == "scatter" else 2 * geo.side
        m, end = geo.margin, geo.margin + box
        for images, atom_chunks in _chunks(n_images, n_atoms, per_atom, coords.device):
            count = images.stop - images.start
            if method == "scatter":
                canvas = coords.new_zeros(count, geo.side * geo.side)
            else:
                canvas = out[images]
                canvas.zero_()
            for atoms in atom_chunks:
                _, start, _, profile = _profiles(coords[images, atoms, :2], geo)
                if method == "scatter":
                    # patch[c, t, s, k] = gy[c, t, k] gx[c, s, k]; atoms innermost keeps
                    # every elementwise loop long and contiguous.
                    n = profile.shape[-1]
                    patch = torch.mul(profile[:, 1].unsqueeze(2), profile[:, 0].unsqueeze(1),
                                      out=profile.new_empty(count, window, window, n))
                    index = torch.add(_corner(start, geo)[:, None, None, :], geo.offsets,
                                      out=start.new_empty(count, window, window, n))
                    canvas.scatter_add_(1, index.view(count, -1), patch.view(count, -1))
                else:
                    dense_y = _dense(start[:, 1], profile[:, 1], geo)[:, m:end]
                    dense_x = _dense(start[:, 0], profile[:, 0], geo)[:, m:end]
                    canvas.baddbmm_(dense_y, dense_x.transpose(1, 2))
            if method == "scatter":
                out[images] = canvas.view(count, geo.side, geo.side)[:, m:end, m:end]
        ctx.save_for_backward(coords)
        ctx.settings = (box, pixel_size, sigma, window, method)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (coords,) = ctx.saved_tensors
        box, pixel_size, sigma, window, method = ctx.settings
        n_images, n_atoms, _ = coords.shape
        geo = _Geometry(box, pixel_size, sigma, window, coords.device, coords.dtype)
        grad_coords = torch.zeros_like(coords)
        per_atom = window * window if method == "scatter" else 2 * geo.side
        m, end = geo.margin, geo.margin + box
        for images, atom_chunks in _chunks(n_images, n_atoms, per_atom, coords.device):
            count = images.stop - images.start
            grad = grad_out[images]
            if method == "scatter":
                # The adjoint of the crop is a zero-padded canvas, that of scatter_add_
                # a gather.
                canvas = grad.new_zeros(count, geo.side, geo.side)
                canvas[:, m:end, m:end] = grad
                canvas = canvas.view(count, -1)
            for atoms in atom_chunks:
                u, start, offset, profile = _profiles(coords[images, atoms, :2], geo)
                n = u.shape[-1]
                if method == "scatter":
                    index = torch.add(_corner(start, geo)[:, None, None, :], geo.offsets,
                                      out=start.new_empty(count, window, window, n))
                    patch = canvas.gather(1, index.view(count, -1)).view(count, window, window, n)
                    grad_profile = torch.stack([
                        (patch * profile[:, 1].unsqueeze(2)).sum(1),   # d/d gx[s]
                        (patch * profile[:, 0].unsqueeze(1)).sum(2),   # d/d gy[t]
                    ], dim=1)
                else:
                    dense_y = _dense(start[:, 1], profile[:, 1], geo)[:, m:end]
                    dense_x = _dense(start[:, 0], profile[:, 0], geo)[:, m:end]
                    # image = Gy Gx^T: d/dGx = grad^T Gy, d/dGy = grad Gx, padded back to
                    # the canvas rows to read the windows (outside rows get zero).
                    padded = grad.new_zeros(count, 2, geo.side, n)
                    padded[:, 0, m:end] = grad.transpose(1, 2) @ dense_y
                    padded[:, 1, m:end] = grad @ dense_x
                    rows = (start + m).unsqueeze(2) + geo.row_ramp.unsqueeze(1)
                    grad_profile = padded.gather(2, rows)
                # d profile / d u = profile * offset * (pixel/sigma)^2; d u / d xy = 1/pixel.
                grad_u = (grad_profile * profile * offset).sum(2)
                grad_coords[images, atoms, :2] = grad_u.transpose(1, 2) * (
                    geo.scale_sq * geo.inverse_pixel)
        return grad_coords, None, None, None, None, None
