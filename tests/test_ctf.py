"""CTF in RELION's convention (src/ctf.h, CTF::getCTF): wavelength, sign, zeros,
astigmatism direction, phase shift, envelope, an independent numpy evaluation, and the
zero-padded FFT application against numpy (FFT and direct real-space convolution).
Per-particle CTFs over optics groups: equal to separate per-group calls and to the numpy
evaluation, gradients by gradcheck, and the ForwardModel's ctf= path."""

import math

import numpy as np
import pytest
import torch

import cryosvi.physics.ctf as ctf_module
from cryosvi.config import Optics
from cryosvi.config import Imaging
from cryosvi.physics.optics import OpticsGroups, ParticleCTF, electron_wavelength
from cryosvi.physics.ctf import apply_ctf, apply_particle_ctf, ctf_rfft, particle_ctf_rfft
from cryosvi.physics.forward import ForwardModel

F64 = dict(dtype=torch.float64)


def numpy_ctf(u, v, angle_deg, optics, size, wavelength, full=False):
    """RELION's getCTF written out in numpy, on the rfft2 (or full fft2) grid.

    RELION stores defocus negated (deltaf_u = -U) and evaluates
    -sin(K1 deltaf u^2 + K2 u^4 - K5 - K3) exp(K4 u^2) with K1 = pi lambda,
    K2 = pi/2 Cs lambda^3, K3 = atan(Q0/sqrt(1 - Q0^2)), K4 = -B/4, K5 = phase shift."""
    pixel = optics.pixel_size
    fx = (np.fft.fftfreq if full else np.fft.rfftfreq)(size, d=pixel)[None, :]
    fy = np.fft.fftfreq(size, d=pixel)[:, None]
    u2 = fx**2 + fy**2
    ellipse = np.arctan2(fy, fx) - np.deg2rad(angle_deg)
    deltaf = -((u + v) / 2 + (u - v) / 2 * np.cos(2 * ellipse))
    k1 = np.pi * wavelength
    k2 = np.pi / 2 * optics.spherical_aberration * 1e7 * wavelength**3
    q0 = optics.amplitude_contrast
    k3 = np.arctan(q0 / np.sqrt(1 - q0**2))
    k5 = np.deg2rad(optics.phase_shift)
    return -np.sin(k1 * deltaf * u2 + k2 * u2**2 - k5 - k3) * np.exp(-optics.bfactor / 4 * u2)


def numpy_ctf_full(u, v, angle_deg, optics, size, wavelength):
    """The CTF on the full fft2 grid as an rfft-based code sees it.

    For odd sizes, the plain full-grid evaluation. For even sizes, frequency +-f_Nyquist
    alias on one sample and the full-grid evaluation is ambiguous there, so, as with
    RELION (which evaluates getCTF on FFTW's half grid), the values are taken on the
    half plane kx >= 0 and extended by Hermitian symmetry H(-k) = H(k).
    """
    if size % 2:
        return numpy_ctf(u, v, angle_deg, optics, size, wavelength, full=True)
    half = numpy_ctf(u, v, angle_deg, optics, size, wavelength)
    full = np.empty((size, size))
    full[:, : size // 2 + 1] = half
    columns = np.arange(size // 2 + 1, size)
    rows = np.arange(size)
    full[:, columns] = half[np.ix_(-rows % size, size - columns)]
    return full


def t(*values):
    return torch.tensor(values, **F64)


@pytest.mark.parametrize("kv, expected", [(100, 0.037014), (200, 0.025079), (300, 0.019687)])
def test_wavelength(kv, expected):
    assert electron_wavelength(kv) == pytest.approx(expected, abs=1e-6)
    # RELION's fitted constant form agrees to its own precision (~1e-5).
    relion = 12.2643247 / math.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))
    assert electron_wavelength(kv) == pytest.approx(relion, rel=2e-5)
    # Tensor in, tensor out.
    assert torch.allclose(electron_wavelength(torch.tensor(float(kv), **F64)),
                          torch.tensor(electron_wavelength(kv), **F64))


def test_sign_is_relions():
    optics = Optics(pixel_size=1.0, amplitude_contrast=0.1)
    ctf = ctf_rfft(t(10000.0), t(10000.0), t(0.0), optics, 256)[0]
    assert ctf[0, 0].item() == pytest.approx(0.1, abs=1e-14)  # CTF(0) = +w
    along_x = ctf[0].numpy()
    first_zero = np.argmax(along_x < 0)
    assert first_zero > 3
    assert (along_x[:first_zero] > 0).all() and along_x[:first_zero].max() > 0.99


@pytest.mark.parametrize("size, pixel", [(256, 1.0), (200, 1.3), (255, 2.0)])
def test_first_zero_without_cs_or_amplitude_contrast(size, pixel):
    # Cs = 0, w = 0: CTF = sin(pi lambda defocus s^2), first zero at s = (lambda defocus)^-1/2.
    # Choose the defocus so that this zero falls exactly on grid index m along each axis.
    optics = Optics(pixel_size=pixel, spherical_aberration=0.0, amplitude_contrast=0.0)
    wavelength = electron_wavelength(optics.voltage)
    m = 17
    s_zero = m / (size * pixel)
    defocus = 1 / (wavelength * s_zero**2)
    ctf = ctf_rfft(t(defocus), t(defocus), t(0.0), optics, size)[0].numpy()
    for line in (ctf[0, :], ctf[:, 0]):  # along x (columns) and along y (rows)
        assert abs(line[m]) < 1e-10
        assert line[m - 1] > 0.01 and line[m + 1] < -0.01
        assert (line[1:m] > 0).all()
    # The zero is a ring: the same radius along -y (wrapped rows).
    assert abs(ctf[size - m, 0]) < 1e-10


@pytest.mark.parametrize("angle, zero_x, zero_y", [(0.0, "u", "v"), (90.0, "v", "u"),
                                                   (180.0, "u", "v")])
def test_astigmatism_angle_direction(angle, zero_x, zero_y):
    # U along the astigmatism angle from the x axis: with angle 0 the x axis sees U,
    # the y axis V; with angle 90 the other way round.
    size, pixel = 512, 1.0
    optics = Optics(pixel_size=pixel, spherical_aberration=0.0, amplitude_contrast=0.0)
    wavelength = electron_wavelength(optics.voltage)
    u, v = 20000.0, 10000.0
    ctf = ctf_rfft(t(u), t(v), t(angle), optics, size)[0].numpy()

    def first_zero(line):
        k = int(np.argmax(line[1:] < 0))  # last positive index, from 1
        k += 1
        # Linear interpolation between k - 1 (> 0) and k (< 0), in 1/Å.
        return (k - 1 + line[k - 1] / (line[k - 1] - line[k])) / (size * pixel)

    expected = {"u": (wavelength * u) ** -0.5, "v": (wavelength * v) ** -0.5}
    assert first_zero(ctf[0, :]) == pytest.approx(expected[zero_x], rel=2e-3)
    assert first_zero(ctf[:, 0]) == pytest.approx(expected[zero_y], rel=2e-3)


def test_astigmatism_angle_is_counterclockwise_from_x_towards_y():
    # At 45 degrees, the direction (+x, +y) sees U and (+x, -y) sees V.
    size, pixel = 512, 1.0
    optics = Optics(pixel_size=pixel, spherical_aberration=0.0, amplitude_contrast=0.0)
    wavelength = electron_wavelength(optics.voltage)
    u, v = 20000.0, 10000.0
    ctf = ctf_rfft(t(u), t(v), t(45.0), optics, size)[0].numpy()
    k = np.arange(1, 60)
    plus = ctf[k, k]           # fy = +k, fx = +k
    minus = ctf[size - k, k]   # fy = -k, fx = +k
    s = np.sqrt(2) * k / (size * pixel)
    np.testing.assert_allclose(plus, np.sin(np.pi * wavelength * u * s**2), atol=1e-10)
    np.testing.assert_allclose(minus, np.sin(np.pi * wavelength * v * s**2), atol=1e-10)


def test_phase_shift_and_bfactor():
    size, pixel = 128, 1.5
    base = Optics(pixel_size=pixel, spherical_aberration=0.0, amplitude_contrast=0.0)
    wavelength = electron_wavelength(base.voltage)
    s2 = (np.fft.fftfreq(size, d=pixel)[:, None] ** 2 + np.fft.rfftfreq(size, d=pixel) ** 2)
    defocus = 8000.0
    shifted = Optics(pixel_size=pixel, spherical_aberration=0.0, amplitude_contrast=0.0,
                     phase_shift=90.0)
    # A 90 degree phase plate turns -sin(gamma) into cos(pi lambda defocus s^2): CTF(0) = 1.
    ctf = ctf_rfft(t(defocus), t(defocus), t(0.0), shifted, size)[0].numpy()
    assert ctf[0, 0] == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_allclose(ctf, np.cos(np.pi * wavelength * defocus * s2), atol=1e-12)
    # B-factor: the same CTF times exp(-B s^2 / 4).
    plain = ctf_rfft(t(defocus), t(defocus), t(0.0), base, size)[0].numpy()
    damped = Optics(pixel_size=pixel, spherical_aberration=0.0, amplitude_contrast=0.0,
                    bfactor=120.0)
    damped_ctf = ctf_rfft(t(defocus), t(defocus), t(0.0), damped, size)[0].numpy()
    np.testing.assert_allclose(damped_ctf, plain * np.exp(-120.0 / 4 * s2), atol=1e-14)
    assert damped_ctf[0, size // 4] < 0.5 * abs(plain[0, size // 4]) + 1e-3


@pytest.mark.parametrize("size", [64, 65])
def test_matches_independent_numpy_evaluation(size):
    optics = Optics(voltage=200.0, spherical_aberration=2.0, amplitude_contrast=0.07,
                    pixel_size=1.7, phase_shift=25.0, bfactor=60.0)
    generator = torch.Generator().manual_seed(0)
    u = 5000 + 20000 * torch.rand(4, generator=generator, **F64)
    v = u - 3000 * torch.rand(4, generator=generator, **F64)
    angle = 360 * torch.rand(4, generator=generator, **F64) - 180
    ctf = ctf_rfft(u, v, angle, optics, size)
    assert ctf.shape == (4, size, size // 2 + 1) and ctf.dtype == torch.float64
    wavelength = electron_wavelength(optics.voltage)
    for i in range(4):
        expected = numpy_ctf(u[i].item(), v[i].item(), angle[i].item(), optics, size, wavelength)
        np.testing.assert_allclose(ctf[i].numpy(), expected, atol=1e-11)
    # float32 follows the same numbers to float32 accuracy.
    ctf32 = ctf_rfft(u.float(), v.float(), angle.float(), optics, size)
    assert ctf32.dtype == torch.float32
    np.testing.assert_allclose(ctf32.double().numpy(), ctf.numpy(), atol=5e-5)


def finite_difference_check(function, inputs, eps=1e-6, rtol=1e-6, atol=1e-9):
    """Gradient of sum(weights * function(*inputs)) against central differences."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = function(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), **F64)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    with torch.no_grad():
        for x, grad in zip(inputs, grads):
            numeric = torch.zeros_like(x)
            for index in np.ndindex(*x.shape):
                for sign in (1, -1):
                    original = x[index].item()
                    x[index] = original + sign * eps
                    numeric[index] += sign * (function(*inputs) * weights).sum() / (2 * eps)
                    x[index] = original
            torch.testing.assert_close(grad, numeric, rtol=rtol, atol=atol)
            assert grad.abs().max() > 0


def test_ctf_gradient_by_finite_differences():
    optics = Optics(pixel_size=2.0, bfactor=30.0, phase_shift=10.0)
    # Defocus in Å moves gamma by ~1e-3 rad per Å: eps = 1e-3 Å keeps the
    # central-difference error ~1e-9 relative; the angle in degrees likewise.
    finite_difference_check(lambda u, v, a: ctf_rfft(u, v, a, optics, 24),
                            (t(12000.0, 9000.0), t(10000.0, 9500.0), t(30.0, -70.0)),
                            eps=1e-3, rtol=1e-6, atol=1e-8)


def random_images(batch, size, seed=0, dtype=torch.float64):
    return torch.randn(batch, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)


@pytest.mark.parametrize("size, pad_factor", [(16, 2), (15, 2), (12, 3), (15, 3), (16, 1)])
def test_apply_ctf_matches_numpy_centred_padding(size, pad_factor):
    # Independent pipeline: centred np.pad, full complex fft2 with the full-grid CTF,
    # ifft2, crop the same centred window.
    optics = Optics(pixel_size=2.0, amplitude_contrast=0.1, bfactor=20.0)
    images = random_images(3, size)
    u, v, angle = t(9000.0, 15000.0, 12000.0), t(8000.0, 15000.0, 6000.0), t(20.0, 0.0, 100.0)
    result = apply_ctf(images, u, v, angle, optics, pad_factor)
    assert result.shape == images.shape
    padded = pad_factor * size
    before = (padded - size) // 2
    wavelength = electron_wavelength(optics.voltage)
    for i in range(3):
        canvas = np.pad(images[i].numpy(), ((before, padded - size - before),) * 2)
        ctf = numpy_ctf_full(u[i].item(), v[i].item(), angle[i].item(), optics, padded,
                             wavelength)
        out = np.fft.ifft2(np.fft.fft2(canvas) * ctf)
        if padded % 2:
            assert np.abs(out.imag).max() < 1e-12  # real, even CTF: real result
        expected = out.real[before:before + size, before:before + size]
        np.testing.assert_allclose(result[i].numpy(), expected, atol=1e-12)


def test_apply_ctf_is_direct_real_space_convolution():
    # out[n] = sum_m image[m] h[(n - m) mod P], h = inverse FFT of the CTF on the P grid.
    # Odd P = 21: no Nyquist sample, so the full-grid CTF is unambiguous and even.
    size, padded = 7, 21
    optics = Optics(pixel_size=3.0, amplitude_contrast=0.2)
    wavelength = electron_wavelength(optics.voltage)
    image = random_images(1, size, seed=3)[0].numpy()
    h = np.fft.ifft2(numpy_ctf(7000.0, 5000.0, 30.0, optics, padded, wavelength, full=True))
    assert np.abs(h.imag).max() < 1e-15
    h = h.real
    expected = np.zeros((size, size))
    for n in np.ndindex(size, size):
        for m in np.ndindex(size, size):
            expected[n] += image[m] * h[(n[0] - m[0]) % padded, (n[1] - m[1]) % padded]
    result = apply_ctf(torch.from_numpy(image)[None], t(7000.0), t(5000.0), t(30.0), optics, 3)
    np.testing.assert_allclose(result[0].numpy(), expected, atol=1e-13)


@pytest.mark.parametrize("size", [32, 33])
def test_delta_at_centre_gives_centred_point_spread_function(size):
    optics = Optics(pixel_size=2.5)
    c = size // 2
    delta = torch.zeros(1, size, size, **F64)
    delta[0, c, c] = 1.0
    # Astigmatic at 30 degrees: point-symmetric about the centre, not mirror-symmetric.
    u, v, angle = t(12000.0), t(8000.0), t(30.0)
    psf = apply_ctf(delta, u, v, angle, optics, 2)[0].numpy()
    padded = 2 * size
    h = np.fft.irfft2(ctf_rfft(u, v, angle, optics, padded)[0].numpy(), s=(padded, padded))
    rows = (np.arange(size) - c) % padded
    np.testing.assert_allclose(psf, h[np.ix_(rows, rows)], atol=1e-14)
    # Centred: psf(c + a) = psf(c - a) (on the part of the box where c - a exists).
    inner = psf[1:, 1:] if size % 2 == 0 else psf
    np.testing.assert_allclose(inner, inner[::-1, ::-1], atol=1e-14)
    assert np.abs(inner - inner[::-1, :]).max() > 1e-3  # (the check above can fail)


@pytest.mark.parametrize("size, pad_factor", [(6, 2), (5, 3)])
def test_apply_ctf_gradients_by_finite_differences(size, pad_factor):
    optics = Optics(pixel_size=2.0, amplitude_contrast=0.1, bfactor=30.0)
    inputs = (random_images(2, size, seed=1), t(9000.0, 11000.0), t(8000.0, 11500.0),
              t(10.0, 50.0))
    finite_difference_check(lambda x, u, v, a: apply_ctf(x, u, v, a, optics, pad_factor),
                            inputs, eps=1e-4, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("size, pad_factor", [(8, 2), (7, 2), (5, 3), (8, 1)])
def test_apply_ctf_gradients_match_autograd_reference(size, pad_factor, monkeypatch):
    """The hand-written backward against torch autograd through rfft2 / irfft2 (even and
    odd padded sizes: with and without a Nyquist column), one image per chunk."""
    optics = Optics(pixel_size=2.0, amplitude_contrast=0.1, bfactor=50.0, phase_shift=20.0)
    padded = pad_factor * size

    def reference(x, u, v, a):
        spectrum = torch.fft.rfft2(x, s=(padded, padded))
        out = torch.fft.irfft2(spectrum * ctf_rfft(u, v, a, optics, padded), s=(padded, padded))
        return out[..., :size, :size]

    generator = torch.Generator().manual_seed(6)
    inputs = [random_images(3, size, seed=4), t(9000.0, 12000.0, 7000.0),
              t(8000.0, 12500.0, 7000.0), t(35.0, -60.0, 0.0)]
    weights = torch.randn(3, size, size, generator=generator, **F64)
    monkeypatch.setattr(ctf_module, "_CPU_CHUNK_BYTES", 1)
    grads = []
    for function in (lambda *z: apply_ctf(*z, optics, pad_factor), reference):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = function(*leaves)
        grads.append(torch.autograd.grad((out * weights).sum(), leaves))
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_apply_ctf_chunks_and_dtypes(monkeypatch):
    optics = Optics(pixel_size=2.0)
    images = random_images(7, 20, seed=2)
    u = 8000 + 4000 * torch.rand(7, **F64, generator=torch.Generator().manual_seed(5))
    whole = apply_ctf(images, u, u, torch.zeros_like(u), optics)
    monkeypatch.setattr(ctf_module, "_CPU_CHUNK_BYTES", 1)  # one image per chunk
    with torch.no_grad():
        torch.testing.assert_close(apply_ctf(images, u, u, torch.zeros_like(u), optics), whole,
                                   rtol=0, atol=1e-13)
    x = images.clone().requires_grad_(True)
    uu = u.clone().requires_grad_(True)
    chunked = apply_ctf(x, uu, uu, torch.zeros_like(u), optics)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
    chunked.square().sum().backward()
    monkeypatch.setattr(ctf_module, "_CPU_CHUNK_BYTES", 1 << 30)
    x2 = images.clone().requires_grad_(True)
    uu2 = u.clone().requires_grad_(True)
    apply_ctf(x2, uu2, uu2, torch.zeros_like(u), optics).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(uu.grad, uu2.grad)
    single = apply_ctf(images.float(), u.float(), u.float(), torch.zeros(7), optics)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), whole, rtol=0, atol=1e-4)


def test_cache_built_in_inference_mode_still_supports_autograd():
    ctf_module._ctf_basis.cache_clear()
    ctf_module._frequency_grid.cache_clear()
    optics = Optics(pixel_size=2.1)
    with torch.inference_mode():
        apply_ctf(random_images(2, 10), t(9000.0, 9000.0), t(9000.0, 9000.0), t(0.0, 0.0), optics)
    u = t(9000.0, 9500.0).requires_grad_(True)
    apply_ctf(random_images(2, 10), u, u, t(0.0, 0.0), optics).sum().backward()
    assert torch.isfinite(u.grad).all() and (u.grad != 0).all()


# ---------------------------------------------------------------- per particle, per group
GROUPS = OpticsGroups(voltage=(300.0, 200.0, 120.0), spherical_aberration=(2.7, 2.0, 0.01),
                      amplitude_contrast=(0.1, 0.07, 0.2), pixel_size=(1.2, 1.2, 2.0))


def particle_batch(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = 5000 + 20000 * torch.rand(n, generator=generator, **F64)
    return ParticleCTF(u, u - 3000 * torch.rand(n, generator=generator, **F64),
                       360 * torch.rand(n, generator=generator, **F64) - 180,
                       40 * torch.rand(n, generator=generator, **F64),
                       100 * torch.rand(n, generator=generator, **F64),
                       torch.arange(n) % 3)


def group_optics(groups, g, phase_shift=0.0, bfactor=0.0):
    return Optics(voltage=groups.voltage[g], spherical_aberration=groups.spherical_aberration[g],
                  amplitude_contrast=groups.amplitude_contrast[g],
                  pixel_size=groups.pixel_size[g], phase_shift=phase_shift, bfactor=bfactor)


@pytest.mark.parametrize("size", [32, 33])
def test_particle_ctf_matches_numpy_and_per_group_calls(size):
    ctf = particle_batch()
    out = particle_ctf_rfft(ctf, GROUPS, size)
    assert out.shape == (6, size, size // 2 + 1) and out.dtype == torch.float64
    for i in range(6):
        optics = group_optics(GROUPS, ctf.group[i].item(), ctf.phase_shift[i].item(),
                              ctf.bfactor[i].item())
        expected = numpy_ctf(ctf.defocus_u[i].item(), ctf.defocus_v[i].item(),
                             ctf.angle[i].item(), optics, size,
                             electron_wavelength(optics.voltage))
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-11)
        single = ctf_rfft(ctf.defocus_u[i], ctf.defocus_v[i], ctf.angle[i], optics, size)
        np.testing.assert_allclose(out[i].numpy(), single.numpy(), atol=1e-11)


@pytest.mark.parametrize("size, pad_factor", [(16, 2), (15, 2), (12, 1)])
def test_apply_particle_ctf_equals_per_group_apply_ctf(size, pad_factor):
    ctf = particle_batch(seed=1)
    images = random_images(6, size, seed=7)
    out = apply_particle_ctf(images, ctf, GROUPS, pad_factor)
    for g in range(3):
        rows = (ctf.group == g).nonzero()[:, 0]
        for i in rows.tolist():
            optics = group_optics(GROUPS, g, ctf.phase_shift[i].item(), ctf.bfactor[i].item())
            one = apply_ctf(images[i:i + 1], ctf.defocus_u[i], ctf.defocus_v[i], ctf.angle[i],
                            optics, pad_factor)
            torch.testing.assert_close(out[i:i + 1], one, rtol=0, atol=1e-12)
    # Optional fields: None = phase 0, no envelope; one group needs no index.
    one_group = OpticsGroups.from_optics([group_optics(GROUPS, 0)])
    plain = ParticleCTF(ctf.defocus_u, ctf.defocus_v, ctf.angle)
    torch.testing.assert_close(
        apply_particle_ctf(images, plain, one_group, pad_factor),
        apply_ctf(images, ctf.defocus_u, ctf.defocus_v, ctf.angle, group_optics(GROUPS, 0),
                  pad_factor), rtol=0, atol=1e-12)


def test_gradcheck_particle_ctf():
    # Finite differences (torch.autograd.gradcheck, float64) w.r.t. images, U, V, angle,
    # phase shift and B-factor, with a batch that mixes three groups, and shifts.
    size = 5
    ctf = particle_batch(n=3, seed=2)
    groups = OpticsGroups((300.0, 200.0, 120.0), (2.7, 2.0, 0.01), (0.1, 0.07, 0.2),
                          (6.0, 6.0, 8.0))  # coarse pixels: gamma varies slowly, eps fits

    def function(x, u, v, angle, phase, bfactor, shifts):
        return apply_particle_ctf(x, ParticleCTF(u, v, angle, phase, bfactor, ctf.group),
                                  groups, 2, shifts=shifts)

    inputs = [random_images(3, size, seed=3), ctf.defocus_u, ctf.defocus_v, ctf.angle,
              ctf.phase_shift, ctf.bfactor, torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.5]],
                                                         **F64)]
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


def test_particle_ctf_gradient_by_finite_differences():
    ctf = particle_batch(n=3, seed=4)
    finite_difference_check(
        lambda u, v, a: particle_ctf_rfft(ParticleCTF(u, v, a, ctf.phase_shift, ctf.bfactor,
                                                      ctf.group), GROUPS, 12),
        (ctf.defocus_u, ctf.defocus_v, ctf.angle), eps=1e-3, rtol=1e-6, atol=1e-8)


def test_particle_ctf_helpers_and_errors():
    ctf = particle_batch(n=4)
    dz = t(100.0, -50.0, 0.0, 10.0)
    moved = ctf.offset(dz)
    torch.testing.assert_close(moved.defocus_u, ctf.defocus_u + dz)
    torch.testing.assert_close(moved.defocus_v, ctf.defocus_v + dz)
    assert moved.angle is ctf.angle and moved.group is ctf.group
    taken = ctf.take(torch.tensor([2, 0]))
    assert taken.group.tolist() == [2, 0] and taken.bfactor[1] == ctf.bfactor[0]
    single = ctf.to(torch.float32)
    assert single.defocus_u.dtype == torch.float32 and single.group.dtype == torch.int64
    assert GROUPS.n_groups == 3
    assert GROUPS.pixel_sizes(torch.tensor([2, 0]), ctf.defocus_u).tolist() == [2.0, 1.2]
    with pytest.raises(ValueError, match="group"):
        particle_ctf_rfft(ParticleCTF(ctf.defocus_u, ctf.defocus_v, ctf.angle), GROUPS, 8)
    with pytest.raises(ValueError, match="CTF parameter rows"):
        apply_particle_ctf(random_images(3, 8), ctf, GROUPS)
    with pytest.raises(ValueError):
        OpticsGroups.from_optics([])


def forward_model(groups=None, pad_factor=2):
    generator = torch.Generator().manual_seed(11)
    coords = 5 * torch.randn(15, 3, generator=generator, **F64)
    modes = torch.randn(2, 15, 3, generator=generator, **F64)
    modes /= modes.flatten(1).norm(dim=1)[:, None, None]
    optics = Optics(pixel_size=1.2, box=20)
    model = ForwardModel(coords, modes, optics, Imaging(sigma=2.0, pad_factor=pad_factor),
                         groups=groups)
    return model.double(), generator


def test_forward_model_ctf_path():
    model, generator = forward_model(GROUPS)
    ctf = particle_batch(n=6, seed=5)
    amplitudes = torch.randn(6, 2, generator=generator, **F64)
    rotation = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator, **F64),
                                           dim=-1)
    dz = 300 * torch.randn(6, generator=generator, **F64)
    out = model(amplitudes, rotation, dz, ctf=ctf)
    assert out.abs().amax(dim=(1, 2)).min() > 0.1  # every image has signal
    # Each particle projected at its group's pixel size, CTF at U + dz, V + dz.
    for i in range(6):
        g = ctf.group[i].item()
        image = model.project(amplitudes[i:i + 1], rotation[i:i + 1], GROUPS.pixel_size[g])
        optics = group_optics(GROUPS, g, ctf.phase_shift[i].item(), ctf.bfactor[i].item())
        one = apply_ctf(image, ctf.defocus_u[i] + dz[i], ctf.defocus_v[i] + dz[i], ctf.angle[i],
                        optics, 2)
        torch.testing.assert_close(out[i:i + 1], one, rtol=0, atol=1e-12)
    # No offset: the file's estimates as they are.
    torch.testing.assert_close(model(amplitudes, rotation, None, ctf=ctf),
                               model(amplitudes, rotation, torch.zeros_like(dz), ctf=ctf))
    # With U = V = 0 and angle 0, the offset is the old data-set defocus: same images.
    zero = ParticleCTF(torch.zeros_like(dz), torch.zeros_like(dz), torch.zeros_like(dz))
    plain, _ = forward_model()
    torch.testing.assert_close(plain(amplitudes, rotation, 9000 + dz, ctf=zero),
                               plain(amplitudes, rotation, 9000 + dz), rtol=0, atol=1e-12)
    # Gradients reach dz and the amplitudes.
    dz = dz.clone().requires_grad_(True)
    amplitudes = amplitudes.clone().requires_grad_(True)
    model(amplitudes, rotation, dz, ctf=ctf).square().sum().backward()
    assert (dz.grad != 0).all() and (amplitudes.grad != 0).all()


@pytest.mark.parametrize("size, pad_factor", [(8, 2), (5, 3)])
def test_ctf_even_in_ky_mirrored_half_equals_full_evaluation(size, pad_factor, monkeypatch):
    """Without a 2 kx ky term (U = V, or astigmatism along x: angle 0) the CTF is
    evaluated on ky >= 0 and mirrored; the result equals the full-grid evaluation, for
    even and odd padded sizes, with a per-particle envelope and phase shift."""
    groups = OpticsGroups((300.0, 200.0), (2.7, 2.0), (0.1, 0.07), (2.0, 2.0))
    ctf = ParticleCTF(t(9000.0, 12000.0, 7000.0), t(9000.0, 11000.0, 7000.0),
                      t(0.0, 0.0, 90.0), t(0.0, 10.0, 0.0), t(40.0, 0.0, 80.0),
                      torch.tensor([0, 1, 1]))
    images = random_images(3, size, seed=8)
    assert ctf_module._is_even(ctf_module._group_coefficients(ctf, groups, images)[0],
                               ctf_module._groups_layout(groups, pad_factor * size,
                                                         images.device, images.dtype))
    mirrored = apply_particle_ctf(images, ctf, groups, pad_factor)
    monkeypatch.setattr(ctf_module, "_is_even", lambda *args: False)
    full = apply_particle_ctf(images, ctf, groups, pad_factor)
    torch.testing.assert_close(mirrored, full, rtol=0, atol=1e-14)
    # An oblique astigmatism has the 2 kx ky term: the full grid is used.
    oblique = ctf._replace(angle=t(0.0, 30.0, 90.0))
    assert not ctf_module._is_even(
        ctf_module._group_coefficients(oblique, groups, images)[0],
        ctf_module._groups_layout(groups, pad_factor * size, images.device, images.dtype))


@pytest.mark.parametrize("shifted", [False, True])
def test_repeated_particles_share_their_transfer_and_equal_one_call_each(shifted):
    """Samples of the same particles (their CTF rows repeated, S x B in (S, B) order, as
    the refinement of a conformation with pose and CTF given makes them) take the
    transfer functions computed once per particle; each row equals the particle's own
    call with distinct rows only (which computes every CTF), with astigmatism, phase
    shifts, envelopes, several groups and shifts, and the repeated call has gradients."""
    ctf, n, repeats, size = particle_batch(seed=3), 6, 5, 16
    shifts = 7 * torch.randn(n, 2, generator=torch.Generator().manual_seed(2), **F64) \
        if shifted else None
    tiled = type(ctf)(*(v.repeat(repeats) for v in ctf))
    images = random_images(n * repeats, size, seed=9)
    with torch.no_grad():
        out = apply_particle_ctf(images, tiled, GROUPS, 2,
                                 shifts=None if shifts is None else shifts.repeat(repeats, 1))
    keys = ctf_module._group_coefficients(tiled, GROUPS, images)
    assert ctf_module._shared_transfers(
        keys[0], keys[1], None if shifts is None else shifts.repeat(repeats, 1),
        ctf_module._groups_layout(GROUPS, 2 * size, images.device, images.dtype),
        2 * size, False)[0].shape[0] == n
    for s in range(repeats):
        rows = slice(s * n, (s + 1) * n)
        alone = apply_particle_ctf(images[rows], ctf, GROUPS, 2, shifts=shifts)
        torch.testing.assert_close(out[rows], alone, rtol=0, atol=1e-12)
    # Rows that repeat nothing, or an autograd call, take the per-row path unchanged.
    grad_images = images.clone().requires_grad_()
    apply_particle_ctf(grad_images, tiled, GROUPS, 2).sum().backward()
    assert torch.isfinite(grad_images.grad).all()
