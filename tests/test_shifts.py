"""In-plane shifts (Fourier phase ramps) in RELION's convention: integer shifts are
torch.roll, sub-pixel shifts of band-limited images match the translated closed form, the
shift rides in the CTF's FFT (alone or with per-particle CTFs), and the gradients match
finite differences (gradcheck) and autograd through a plain rfft2 / irfft2 reference.
The sign itself is checked against relion_project in test_relion_projector.py."""

import numpy as np
import pytest
import torch

import cryosvi.physics.ctf as ctf_module
from cryosvi.config import Imaging, Optics
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.physics.ctf import apply_ctf, apply_particle_ctf, ctf_rfft
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.shifts import phase_ramp, shift_images

F64 = dict(dtype=torch.float64)


def t(*values):
    return torch.tensor(values, **F64)


def random_images(batch, size, seed=0):
    return torch.randn(batch, size, size, generator=torch.Generator().manual_seed(seed), **F64)


def test_origin_moves_the_particle_the_other_way():
    # RELION's origin (x, y) puts the particle's centre at pixel (L//2 - y, L//2 - x).
    size, pixel = 16, 2.5
    delta = torch.zeros(1, size, size, **F64)
    delta[0, size // 2, size // 2] = 1.0
    out = shift_images(delta, torch.tensor([[3 * pixel, -2 * pixel]], **F64), pixel)[0]
    assert tuple(np.unravel_index(out.abs().argmax().item(), out.shape)) == (8 + 2, 8 - 3)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0, **F64))


@pytest.mark.parametrize("size", [12, 13])
def test_integer_shift_is_roll(size):
    # pad_factor 1: a circular shift on the L grid, any image.
    pixel = 1.5
    images = random_images(3, size)
    shifts_px = [(2, -3), (-5, 0), (1, 4)]
    shifts = torch.tensor(shifts_px, **F64) * pixel
    out = shift_images(images, shifts, pixel)
    for i, (dx, dy) in enumerate(shifts_px):
        torch.testing.assert_close(out[i], torch.roll(images[i], (-dy, -dx), (0, 1)),
                                   rtol=0, atol=1e-13)


def band_limited_blob(size, pixel, centre, sigma):
    """A Gaussian (band-limited to ~1e-9 at these sizes) at ``centre`` (x, y) Å, [y, x]."""
    coords = (np.arange(size) - size // 2) * pixel
    return np.exp(-((coords[None, :] - centre[0]) ** 2 + (coords[:, None] - centre[1]) ** 2)
                  / (2 * sigma**2))


@pytest.mark.parametrize("pad_factor", [1, 2, 3])
def test_integer_shift_in_the_ctf_fft_is_roll(pad_factor):
    # A centred band-limited blob, zero at the edges: shifting inside the CTF's FFT
    # equals rolling the CTF-filtered image (the CTF commutes with translations; with
    # zero-padding the shifted content stays inside the box, so nothing is dropped).
    size, pixel = 32, 2.0
    blob = torch.from_numpy(band_limited_blob(size, pixel, (0.0, 0.0), 3.0))[None]
    optics = Optics(pixel_size=pixel, amplitude_contrast=0.1)
    u, v, angle = t(9000.0), t(7000.0), t(30.0)
    # pad 1: the point spread function wraps; it is the same circular operator either way.
    plain = apply_ctf(blob, u, v, angle, optics, pad_factor)
    shifts = t(4 * pixel, -3 * pixel)[None]
    shifted = apply_ctf(blob, u, v, angle, optics, pad_factor, shifts=shifts)
    expected = torch.roll(plain, (3, -4), (1, 2))
    if pad_factor == 1:
        torch.testing.assert_close(shifted, expected, rtol=0, atol=1e-13)
    else:
        # The CTF's ringing reaches the edges (~1e-3 here); inside a margin it is exact.
        inner = (slice(None), slice(6, -6), slice(6, -6))
        torch.testing.assert_close(shifted[inner], expected[inner], rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [24, 25])
def test_subpixel_shift_of_band_limited_image(size):
    # Sum of sinusoids below Nyquist, periodic on the box: the translated closed form.
    pixel = 1.3
    box = size * pixel
    coords = (np.arange(size) - size // 2) * pixel
    y, x = np.meshgrid(coords, coords, indexing="ij")
    rng = np.random.default_rng(size)
    waves = [(rng.normal(), *rng.integers(-(size - 1) // 2, (size - 1) // 2 + 1, 2),
              rng.uniform(0, 6.3)) for _ in range(10)]

    def field(sx, sy):
        return sum(a * np.cos(2 * np.pi * (kx * (x + sx) + ky * (y + sy)) / box + phi)
                   for a, kx, ky, phi in waves)

    shift = (1.37, -2.71)  # Å; translation by -shift: f(x + sx, y + sy)
    image = torch.from_numpy(field(0.0, 0.0))[None]
    out = shift_images(image, torch.tensor([shift], **F64), pixel)
    np.testing.assert_allclose(out[0].numpy(), field(*shift), atol=1e-11)
    # Per-image pixel sizes as a tensor.
    out2 = shift_images(image.expand(2, -1, -1), torch.tensor([shift, shift], **F64),
                        torch.tensor([pixel, pixel], **F64))
    torch.testing.assert_close(out2, out.expand(2, -1, -1))


def test_shifts_with_per_particle_ctf_and_groups_of_other_pixel_sizes():
    # One call over two groups of different pixel sizes: the same shift in Å is a
    # different number of pixels in each; equal to separate apply_ctf calls.
    size = 16
    groups = OpticsGroups((300.0, 200.0), (2.7, 2.0), (0.1, 0.07), (1.0, 2.0))
    images = random_images(4, size, seed=3)
    group = torch.tensor([0, 1, 1, 0])
    ctf = ParticleCTF(t(9000.0, 8000.0, 12000.0, 15000.0), t(8000.0, 8000.0, 11000.0, 14000.0),
                      t(10.0, 0.0, -30.0, 80.0), t(0.0, 20.0, 0.0, 5.0), t(0.0, 30.0, 10.0, 0.0),
                      group)
    shifts = torch.tensor([[2.0, -1.0], [2.0, -1.0], [-3.3, 0.7], [0.0, 4.5]], **F64)
    out = apply_particle_ctf(images, ctf, groups, 2, shifts=shifts)
    for i in range(4):
        g = group[i].item()
        optics = Optics(voltage=groups.voltage[g],
                        spherical_aberration=groups.spherical_aberration[g],
                        amplitude_contrast=groups.amplitude_contrast[g],
                        pixel_size=groups.pixel_size[g], phase_shift=ctf.phase_shift[i].item(),
                        bfactor=ctf.bfactor[i].item())
        one = apply_ctf(images[i:i + 1], ctf.defocus_u[i], ctf.defocus_v[i], ctf.angle[i],
                        optics, 2, shifts=shifts[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size, pad_factor", [(6, 2), (5, 3), (5, 1)])
def test_gradcheck_apply_ctf_with_shifts(size, pad_factor):
    optics = Optics(pixel_size=2.0, amplitude_contrast=0.1, bfactor=30.0)
    inputs = (random_images(2, size, seed=1).requires_grad_(True),
              t(9000.0, 11000.0).requires_grad_(True),
              t(0.7, -1.9, 2.4, 0.3).reshape(2, 2).requires_grad_(True))
    assert torch.autograd.gradcheck(
        lambda x, u, s: apply_ctf(x, u, u - 500, t(20.0, -40.0), optics, pad_factor, shifts=s),
        inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_shift_images():
    inputs = (random_images(2, 7, seed=2).requires_grad_(True),
              t(0.7, -1.9, 2.4, 0.3).reshape(2, 2).requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, s: shift_images(x, s, 1.5, 2), inputs)


@pytest.mark.parametrize("size, pad_factor", [(8, 2), (7, 2), (5, 3), (8, 1)])
def test_shift_gradients_match_autograd_reference(size, pad_factor, monkeypatch):
    """The hand-written backward against torch autograd through rfft2 / ramp / irfft2, even
    and odd padded sizes (with and without Nyquist bins), one image per chunk."""
    optics = Optics(pixel_size=1.5, amplitude_contrast=0.1, bfactor=50.0, phase_shift=20.0)
    padded = pad_factor * size

    def reference(x, u, s):
        spectrum = torch.fft.rfft2(x, s=(padded, padded))
        transfer = ctf_rfft(u, u, torch.zeros_like(u), optics, padded) * phase_ramp(s / 1.5, padded)
        return torch.fft.irfft2(spectrum * transfer, s=(padded, padded))[..., :size, :size]

    inputs = [random_images(3, size, seed=4), t(9000.0, 12000.0, 7000.0),
              torch.tensor([[0.4, -1.3], [2.5, 0.0], [-0.6, 3.1]], **F64)]
    weights = random_images(3, size, seed=5)
    monkeypatch.setattr(ctf_module, "_CPU_CHUNK_BYTES", 1)
    grads = []
    for function in (lambda x, u, s: apply_ctf(x, u, u, torch.zeros_like(u), optics,
                                               pad_factor, shifts=s), reference):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        grads.append(torch.autograd.grad((function(*leaves) * weights).sum(), leaves))
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_forward_model_shifts_translate_the_clean_image():
    # ForwardModel(..., shifts=) with pad 1 equals shift_images of the unshifted image, on
    # the old (one Optics) path and the per-particle path.
    generator = torch.Generator().manual_seed(7)
    coords = 6 * torch.randn(20, 3, generator=generator, **F64)
    modes = torch.randn(1, 20, 3, generator=generator, **F64)
    modes /= modes.norm()
    optics = Optics(pixel_size=2.0, box=24)
    forward = ForwardModel(coords, modes, optics, Imaging(sigma=2.0, pad_factor=1)).double()
    amplitude = t(1.0, -0.5)[:, None]
    rotation = torch.nn.functional.normalize(torch.randn(2, 4, generator=generator, **F64), dim=-1)
    defocus = t(9000.0, 14000.0)
    shifts = torch.tensor([[3.1, -4.0], [-1.2, 0.5]], **F64)
    plain = forward(amplitude, rotation, defocus)
    torch.testing.assert_close(forward(amplitude, rotation, defocus, shifts=shifts),
                               shift_images(plain, shifts, 2.0), rtol=0, atol=1e-12)
    ctf = ParticleCTF(t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0))
    torch.testing.assert_close(forward(amplitude, rotation, defocus, ctf=ctf, shifts=shifts),
                               shift_images(plain, shifts, 2.0), rtol=0, atol=1e-10)


def test_bad_shift_shapes_are_refused():
    with pytest.raises(ValueError):
        shift_images(random_images(2, 6), torch.zeros(2, 3, **F64), 1.0)
    with pytest.raises(ValueError):
        apply_ctf(random_images(2, 6), t(9000.0, 9000.0), t(9000.0, 9000.0), t(0.0, 0.0),
                  Optics(), shifts=torch.zeros(2, 3, **F64))
