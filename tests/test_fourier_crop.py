"""Fourier cropping against closed forms: band-limited sums of sinusoids sampled on both
grids (even / odd boxes), the Nyquist rule, the centre pixel, gray levels and noise, and
the CTF commuting with the crop at the cropped pixel size."""

import math

import numpy as np
import pytest
import torch

from cryosvi.config import Optics
from cryosvi.physics.ctf import apply_ctf
from cryosvi.physics.fourier import cropped_pixel_size, fourier_crop

F64 = dict(dtype=torch.float64)


def sinusoids(size, pixel, waves, box_angstrom):
    """sum_j a_j cos(2 pi (kx_j x + ky_j y) / D + phi_j) on a size x size grid of pixel
    ``pixel`` Å whose pixel (size//2, size//2) is the origin; k in cycles per D Å.
    Returns (size, size) [y, x]."""
    coords = (np.arange(size) - size // 2) * pixel
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return sum(a * np.cos(2 * np.pi * (kx * x + ky * y) / box_angstrom + phi)
               for a, kx, ky, phi in waves)


def random_waves(limit, count, seed):
    rng = np.random.default_rng(seed)
    return [(rng.normal(), int(rng.integers(-limit, limit + 1)),
             int(rng.integers(-limit, limit + 1)), rng.uniform(0, 2 * np.pi))
            for _ in range(count)]


@pytest.mark.parametrize("size, new", [(48, 32), (48, 31), (45, 32), (45, 15), (33, 33),
                                       (64, 2), (20, 7)])
def test_band_limited_signal_is_reproduced_exactly(size, new):
    # Frequencies |k| <= (new - 1) // 2 cycles per box: below the new Nyquist, so the
    # sampled function on the coarse grid is known in closed form.
    pixel = 1.7
    box = size * pixel
    waves = random_waves((new - 1) // 2, 12, seed=size + new) + [(0.7, 0, 0, 0.0)]
    images = torch.stack([torch.from_numpy(sinusoids(size, pixel, waves, box)),
                          torch.from_numpy(2 * sinusoids(size, pixel, waves[::2], box))])
    out = fourier_crop(images, new)
    assert out.shape == (2, new, new) and out.dtype == torch.float64
    new_pixel = cropped_pixel_size(pixel, size, new)
    assert new_pixel == pytest.approx(box / new)
    expected = [sinusoids(new, new_pixel, waves, box),
                2 * sinusoids(new, new_pixel, waves[::2], box)]
    np.testing.assert_allclose(out.numpy(), np.stack(expected), atol=1e-11)


@pytest.mark.parametrize("size, new", [(48, 32), (45, 20), (45, 21)])
def test_frequencies_at_and_above_the_new_nyquist_are_removed(size, new):
    pixel = 2.0
    box = size * pixel
    low = random_waves((new - 1) // 2, 6, seed=1)
    # Everything from new/2 up to the old Nyquist along x, y and the diagonal; with an
    # even n that includes the aliased +-n/2 pair, set to zero.
    high = [(1.0, k, 0, 0.3) for k in range(math.ceil(new / 2), size // 2 + 1)]
    high += [(1.0, 0, k, 1.1) for k in range(math.ceil(new / 2), size // 2 + 1)]
    high += [(0.5, k, -k, 0.0) for k in range(math.ceil(new / 2), size // 2 + 1)]
    image = torch.from_numpy(sinusoids(size, pixel, low + high, box))[None]
    expected = sinusoids(new, box / new, low, box)
    np.testing.assert_allclose(fourier_crop(image, new)[0].numpy(), expected, atol=1e-11)


@pytest.mark.parametrize("size, new", [(48, 32), (45, 32), (48, 31), (45, 21)])
def test_centre_pixel_stays_the_centre(size, new):
    # A centred, well-sampled Gaussian stays centred: its crop peaks on (n//2, n//2) and
    # is point-symmetric about it (on the part of the box where the mirror exists), and
    # matches the Gaussian sampled on the coarse grid.
    pixel = 1.0
    sigma = 1.6 * cropped_pixel_size(pixel, size, new)
    coords = (np.arange(size) - size // 2) * pixel
    blob = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
    out = fourier_crop(torch.from_numpy(blob)[None], new)[0].numpy()
    c = new // 2
    assert np.unravel_index(out.argmax(), out.shape) == (c, c)
    inner = out[1:, 1:] if new % 2 == 0 else out
    np.testing.assert_allclose(inner, inner[::-1, ::-1], atol=1e-12)
    coarse = (np.arange(new) - c) * cropped_pixel_size(pixel, size, new)
    expected = np.exp(-(coarse[:, None] ** 2 + coarse[None, :] ** 2) / (2 * sigma**2))
    # The Gaussian's spectrum at the new Nyquist, exp(-2 pi^2 sigma^2 / (2 pixel')^2), is
    # 3e-6 of its peak at sigma = 1.6 pixel', and its tails at the box edge (>= 6 sigma)
    # are smaller: the sampled Gaussian is matched to that level.
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_same_box_is_identity_and_noise_std_scales_with_the_box():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 64, 64, generator=generator, **F64)
    assert fourier_crop(noise, 64) is noise
    cropped = fourier_crop(noise, 32)
    # Kept modes: 31 x 31 of 64 x 64, each with the variance it had: std s sqrt(31^2/64^2).
    assert cropped.std().item() == pytest.approx(31 / 64, rel=0.01)
    assert cropped.dtype == torch.float64
    assert fourier_crop(noise.float(), 31).dtype == torch.float32


def test_ctf_at_the_cropped_pixel_size_commutes_with_the_crop():
    # With circular CTF application (pad_factor 1), cropping the CTF-filtered image and
    # filtering the cropped image with the CTF at the cropped pixel size multiply the
    # same kept frequencies by the same CTF values: equal to rounding.
    size, new, pixel = 60, 24, 1.2
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, size, size, generator=generator, **F64)
    u = torch.tensor([9000.0, 14000.0, 20000.0], **F64)
    v, angle = u - 2000, torch.tensor([10.0, 70.0, -40.0], **F64)
    fine = Optics(pixel_size=pixel, amplitude_contrast=0.07, bfactor=50.0)
    coarse = Optics(pixel_size=cropped_pixel_size(pixel, size, new), amplitude_contrast=0.07,
                    bfactor=50.0)
    first = fourier_crop(apply_ctf(images, u, v, angle, fine, 1), new)
    second = apply_ctf(fourier_crop(images, new), u, v, angle, coarse, 1)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-12)


def test_gradient_is_the_adjoint():
    # Linear map: <crop(x), y> = <x, crop^T(y)>; autograd gives crop^T, checked against
    # the explicit matrix of the map built column by column.
    size, new = 7, 4
    eye = torch.eye(size * size, **F64).reshape(-1, size, size)
    matrix = fourier_crop(eye, new).reshape(size * size, -1).T  # (n^2, L^2)
    x = torch.randn(size, size, generator=torch.Generator().manual_seed(2), **F64)
    x.requires_grad_(True)
    weights = torch.randn(new, new, generator=torch.Generator().manual_seed(3), **F64)
    (fourier_crop(x[None], new)[0] * weights).sum().backward()
    torch.testing.assert_close(x.grad.reshape(-1), matrix.T @ weights.reshape(-1))


@pytest.mark.parametrize("shape, new", [((3, 8, 8), 9), ((3, 8, 8), 0), ((3, 8, 7), 4)])
def test_bad_sizes_are_refused(shape, new):
    with pytest.raises(ValueError):
        fourier_crop(torch.zeros(shape), new)
