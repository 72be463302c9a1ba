"""Projection of Gaussian pseudo-atoms: against the untruncated analytic Gaussian (numpy),
the pixel convention, the analytic integral, finite-difference gradients, borders and
batch shapes. Every test runs every kernel."""

import math

import numpy as np
import pytest
import torch

from cryosvi.config import default_window
from cryosvi.physics.projection import METHODS, choose_method, project

F64 = dict(dtype=torch.float64)


def analytic_untruncated(coords: np.ndarray, box: int, pixel: float, sigma: float) -> np.ndarray:
    """sum_k exp(-|(x, y) - (x_k, y_k)|^2 / (2 sigma^2)) at every pixel centre, no window.

    coords (B, N, 3) Å -> (B, box, box), axes [y, x], pixel (i, j) at
    ((i - box//2) pixel, (j - box//2) pixel).
    """
    centres = (np.arange(box) - box // 2) * pixel
    dy = centres[None, None, :, None] - coords[:, :, 1, None, None]
    dx = centres[None, None, None, :] - coords[:, :, 0, None, None]
    return np.exp(-(dx**2 + dy**2) / (2 * sigma**2)).sum(axis=1)


def truncation_bound(window: int, pixel: float, sigma: float) -> float:
    """Largest value of one atom at a pixel outside its window: every such pixel is at
    least window/2 pixels from the centre along one axis."""
    return math.exp(-(window * pixel / 2) ** 2 / (2 * sigma**2))


def random_coords(batch, n_atoms, radius, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coords = (torch.rand(batch, n_atoms, 3, generator=generator, dtype=torch.float64) * 2 - 1)
    return (coords * radius).to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("box, pixel, sigma, window", [
    (32, 2.5, 2.0, 5),     # the paper's preset
    (48, 1.0, 2.0, 12),    # Table 1 in pixels: sigma 2 px, even window of 12 px
    (33, 1.5, 2.5, 11),    # odd box
    (40, 2.0, 3.0, None),  # default window
])
def test_matches_untruncated_gaussian_within_truncation_bound(method, dtype, tolerance, box,
                                                             pixel, sigma, window):
    coords = random_coords(3, 17, radius=0.4 * box * pixel, dtype=dtype)
    image = project(coords, box, pixel, sigma, window, method=method)
    assert image.shape == (3, box, box) and image.dtype == dtype
    reference = analytic_untruncated(coords.double().numpy(), box, pixel, sigma)
    window = window or default_window(sigma, pixel)
    # Each atom differs from its untruncated Gaussian by at most the bound at a pixel.
    bound = coords.shape[1] * truncation_bound(window, pixel, sigma)
    error = np.abs(image.double().numpy() - reference)
    assert error.max() <= bound + tolerance * coords.shape[1]
    # Inside every atom's window the values are the exact Gaussian: with one atom at a
    # time (no neighbours' tails), the patch agrees to rounding.
    single = project(coords[:, :1], box, pixel, sigma, window, method=method).double().numpy()
    one = analytic_untruncated(coords[:, :1].double().numpy(), box, pixel, sigma)
    inside = single > 0
    np.testing.assert_allclose(single[inside], one[inside], rtol=0, atol=tolerance)
    # ... and the window keeps exactly `window` pixels per axis for an interior atom.
    counts = inside.sum(axis=(1, 2))
    assert (counts <= window * window).all()


@pytest.mark.parametrize("method", METHODS)
def test_truncation_bound_is_reached_and_not_exceeded(method):
    # sigma large compared with the window: the truncated image must differ from the
    # full Gaussian by up to, never more than, the bound; a wider window must not.
    box, pixel, sigma = 32, 1.0, 1.5
    coords = torch.tensor([[[0.3, -0.2, 0.0]]], **F64)
    reference = analytic_untruncated(coords.numpy(), box, pixel, sigma)
    small = project(coords, box, pixel, sigma, 3, method=method).numpy()
    error = np.abs(small - reference).max()
    assert error <= truncation_bound(3, pixel, sigma)
    assert error > 0.3 * truncation_bound(3, pixel, sigma)
    wide = project(coords, box, pixel, sigma, 25, method=method).numpy()
    assert np.abs(wide - reference).max() < 1e-30 + truncation_bound(25, pixel, sigma)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("box", [32, 33])
def test_atom_at_known_position_lands_on_expected_pixel(method, box):
    pixel = 2.0
    # x = +3 px, y = -5 px from the origin, which sits at pixel (box//2, box//2).
    coords = torch.tensor([[[3 * pixel, -5 * pixel, 7.0]]], **F64)
    image = project(coords, box, pixel, 1.5, 7, method=method)[0]
    peak = np.unravel_index(int(image.argmax()), image.shape)
    assert peak == (box // 2 - 5, box // 2 + 3)
    assert image[peak].item() == pytest.approx(1.0, abs=1e-14)  # unit peak, z ignored
    # The origin itself.
    origin = project(torch.zeros(1, 1, 3, **F64), box, pixel, 1.5, 7, method=method)[0]
    assert np.unravel_index(int(origin.argmax()), origin.shape) == (box // 2, box // 2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("window", [4, 5])
def test_window_takes_the_nearest_pixels(method, window):
    # Centre at +0.3 px from pixel c along x: an even window of 4 takes c-1 .. c+2 (the
    # side nearer to the centre), an odd one of 5 takes c-2 .. c+2.
    box, pixel = 16, 1.0
    coords = torch.tensor([[[0.3, 0.0, 0.0]]], **F64)
    row = project(coords, box, pixel, 10.0, window, method=method)[0, box // 2]
    kept = torch.nonzero(row).flatten().tolist()
    c = box // 2
    assert kept == (list(range(c - 1, c + 3)) if window == 4 else list(range(c - 2, c + 3)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma, pixel", [(2.0, 1.0), (2.0, 2.0), (5.0, 2.5)])
def test_integral_of_contained_atom(method, sigma, pixel):
    # sum over pixels ~ integral / pixel^2 = 2 pi sigma^2 / pixel^2 (unit-peak Gaussian);
    # for sigma >= pixel the pixel sum equals the integral to ~exp(-2 pi^2 sigma^2/pixel^2)
    # (Poisson summation) and a +-4.5 sigma window loses < 1e-4 of it.
    window = 2 * math.ceil(4.5 * sigma / pixel) + 1
    coords = torch.tensor([[[1.3, -0.7, 0.0]]], **F64)
    total = project(coords, 64, pixel, sigma, window, method=method).sum().item()
    assert total == pytest.approx(2 * math.pi * sigma**2 / pixel**2, rel=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_border_atoms_are_cropped_not_wrapped(method):
    box, pixel, sigma, window = 24, 1.0, 1.5, 9
    centre = (box // 2) * pixel
    coords = torch.tensor([[
        [-centre - 1.2, 0.3, 0.0],               # just left of the box: only a sliver
        [0.1, box * pixel - centre + 0.4, 0.0],  # just below the bottom edge
        [100.0, -200.0, 0.0],                    # far outside: contributes nothing
        [float("nan"), 0.0, 0.0],                # non-finite: contributes nothing, no crash
    ]], **F64)
    image = project(coords, box, pixel, sigma, window, method=method)[0].numpy()
    reference = analytic_untruncated(coords[:, :3].numpy(), box, pixel, sigma)[0]
    assert np.abs(image - reference).max() <= 2 * truncation_bound(window, pixel, sigma)
    # Wrapping would put mass on the opposite edges.
    assert np.abs(image[:, -3:]).max() == 0 and np.abs(image[:3, :]).max() == 0
    assert image[:, 0].max() > 0.1 and image[-1, :].max() > 0.1


@pytest.mark.parametrize("method", METHODS)
def test_batch_shapes_and_empty(method):
    coords = random_coords(6, 5, radius=10.0)
    flat = project(coords, 20, 1.5, 2.0, 5, method=method)
    nested = project(coords.reshape(2, 3, 5, 3), 20, 1.5, 2.0, 5, method=method)
    assert nested.shape == (2, 3, 20, 20)
    torch.testing.assert_close(nested.reshape(6, 20, 20), flat, rtol=0, atol=0)
    # Each image depends only on its own atoms.
    torch.testing.assert_close(project(coords[2:3], 20, 1.5, 2.0, 5, method=method),
                               flat[2:3], rtol=0, atol=1e-15)
    assert project(coords[:0], 20, 1.5, 2.0, 5, method=method).shape == (0, 20, 20)
    assert project(coords[:, :0], 20, 1.5, 2.0, 5, method=method).abs().max() == 0


@pytest.mark.parametrize("method", METHODS)
def test_gradient_matches_finite_differences(method):
    box, pixel, sigma, window = 20, 1.5, 2.0, 7
    # Keep centres away from half-pixel boundaries, where the window jumps by one pixel.
    coords = random_coords(2, 6, radius=12.0, seed=3)
    coords = torch.round(coords / pixel * 4) / 4 * pixel + 0.1 * pixel
    coords.requires_grad_(True)
    weights = torch.randn(2, box, box, **F64, generator=torch.Generator().manual_seed(1))
    loss = (project(coords, box, pixel, sigma, window, method=method) * weights).sum()
    (grad,) = torch.autograd.grad(loss, coords)
    numeric = torch.zeros_like(coords)
    eps = 1e-6
    with torch.no_grad():
        for index in np.ndindex(*coords.shape):
            for sign in (1, -1):
                shifted = coords.detach().clone()
                shifted[index] += sign * eps
                value = (project(shifted, box, pixel, sigma, window, method=method) * weights).sum()
                numeric[index] += sign * value / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
    assert grad[..., 2].abs().max() == 0  # z does not enter a projection along z
    assert grad[..., :2].abs().min() > 0


@pytest.mark.parametrize("method", METHODS)
def test_float32_gradient_agrees_with_float64(method):
    coords = random_coords(4, 30, radius=15.0, seed=5)
    weights = torch.randn(4, 32, 32, **F64, generator=torch.Generator().manual_seed(2))
    grads = []
    for dtype in (torch.float64, torch.float32):
        c = coords.to(dtype).detach().clone().requires_grad_(True)
        (project(c, 32, 1.25, 2.0, 9, method=method) * weights.to(dtype)).sum().backward()
        grads.append(c.grad.double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


def test_methods_agree_through_chunking(monkeypatch):
    """Tiny chunks force the batch and the atoms to be split; results must not change."""
    import cryosvi.physics.projection as projection

    coords = random_coords(5, 40, radius=14.0, seed=7).requires_grad_(True)
    weights = torch.randn(5, 30, 30, **F64, generator=torch.Generator().manual_seed(4))
    results = []
    for budget in (1 << 20, 64):
        monkeypatch.setattr(projection, "_CPU_CHUNK_ELEMENTS", budget)
        for method in METHODS:
            image = project(coords, 30, 1.0, 2.0, 6, method=method)
            (grad,) = torch.autograd.grad((image * weights).sum(), coords)
            results.append((image.detach(), grad))
    for image, grad in results[1:]:
        torch.testing.assert_close(image, results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-10)


def test_non_contiguous_gradient_and_auto_method():
    coords = random_coords(3, 8, radius=10.0).requires_grad_(True)
    image = project(coords, 24, 1.0, 2.0)  # auto method, default window
    image.sum().backward()  # the incoming gradient is an expanded (stride-0) tensor
    expected = torch.autograd.grad(project(coords, 24, 1.0, 2.0, method="scatter").sum(), coords)[0]
    torch.testing.assert_close(coords.grad, expected)
    assert choose_method(133, 128, 12, torch.device("cpu")) == "scatter"
    assert choose_method(10_000, 512, 12, torch.device("cpu")) == "scatter"


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        project(torch.zeros(2, 4), 8, 1.0, 1.0)
    with pytest.raises(ValueError):
        project(torch.zeros(1, 2, 3), 8, 1.0, 1.0, method="fft")
