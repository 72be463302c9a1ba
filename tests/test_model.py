"""The forward model and the Pyro model: conventions, shapes, site names."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from cryosvi.config import Imaging, Optics, Priors
from cryosvi.physics.forward import ForwardModel, deform
from cryosvi.model import SITES, model
from cryosvi.physics.rotations import euler_to_matrix, matrix_to_quaternion


def one_atom_model(position, box=32, pixel_size=2.5):
    coords = torch.tensor([position], dtype=torch.float32)
    modes = torch.zeros(1, 1, 3)
    return ForwardModel(coords, modes, Optics(pixel_size=pixel_size, box=box),
                        Imaging(sigma=2.0, window=7))


@pytest.mark.parametrize("angles, expected_yx_angstrom", [
    ((0.0, 0.0, 0.0), (0.0, 10.0)),     # identity: the atom at +x stays at +x
    ((90.0, 0.0, 0.0), (-10.0, 0.0)),   # rot 90: A = Rz(90) maps +x to -y
    ((0.0, 90.0, 0.0), (0.0, 0.0)),     # tilt 90: +x goes along +z, projects to the centre
    ((0.0, 0.0, -90.0), (10.0, 0.0)),   # psi -90 maps +x to +y
])
def test_relion_angles_put_the_atom_at_the_expected_pixel(angles, expected_yx_angstrom):
    forward = one_atom_model([10.0, 0.0, 0.0])
    matrix = euler_to_matrix(*(torch.tensor([a], dtype=torch.float64) for a in angles))
    quaternion = matrix_to_quaternion(matrix).float()
    image = forward.project(torch.zeros(1, 1), quaternion)[0]
    peak = np.unravel_index(int(image.argmax()), image.shape)
    expected = tuple(32 // 2 + round(v / 2.5) for v in expected_yx_angstrom)
    assert peak == expected
    assert image.max().item() == pytest.approx(1.0, abs=1e-5)  # unit-peak Gaussians


def test_deform_amplitude_is_rms_displacement_in_angstrom():
    generator = torch.Generator().manual_seed(0)
    coords = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    modes = torch.randn(2, 50, 3, generator=generator, dtype=torch.float64)
    modes = torch.linalg.qr(modes.reshape(2, -1).T)[0].T.reshape(2, 50, 3)
    amplitudes = torch.tensor([[1.5, 0.0], [0.0, -2.0]], dtype=torch.float64)
    moved = deform(coords, modes, amplitudes)
    rms = ((moved - coords) ** 2).sum(-1).mean(-1).sqrt()
    np.testing.assert_allclose(rms.numpy(), [1.5, 2.0], rtol=1e-12)


@pytest.fixture(scope="module")
def small_forward():
    generator = torch.Generator().manual_seed(1)
    coords = 8 * torch.randn(20, 3, generator=generator)
    modes = torch.linalg.qr(torch.randn(60, 2, generator=generator))[0].T.reshape(2, 20, 3)
    return ForwardModel(coords, modes, Optics(box=32, pixel_size=2.5), Imaging(sigma=2.0))


def test_model_sites_and_shapes(small_forward):
    priors = Priors(mode_std=(1.0, 2.0))
    pyro.set_rng_seed(0)
    images = torch.randn(6, 32, 32)
    trace = poutine.trace(model).get_trace(small_forward, priors, 0.5, images=images)
    shapes = {name: tuple(site["value"].shape) for name, site in trace.nodes.items()
              if site["type"] == "sample"}
    assert shapes == {"particles": (6,), "enm_scale": (6, 2), "rotation": (6, 4),
                      "defocus": (6,), "measurement": (6, 32, 32)}
    assert trace.nodes["measurement"]["is_observed"]
    assert set(SITES) <= set(shapes)
    assert torch.allclose(trace.nodes["rotation"]["value"].norm(dim=-1), torch.ones(6))
    trace.compute_log_prob()
    assert torch.isfinite(trace.nodes["measurement"]["log_prob_sum"])


def test_model_scales_a_minibatch_to_the_data_set(small_forward):
    priors = Priors(mode_std=(1.0, 2.0))
    images = torch.randn(4, 32, 32)
    trace = poutine.trace(model).get_trace(small_forward, priors, 0.5, images=images,
                                           n_particles=100)
    assert trace.nodes["measurement"]["scale"] == pytest.approx(25.0)


def test_model_prior_draws_match_priors(small_forward):
    priors = Priors(mode_std=(1.0, 2.0), defocus_mean=15000.0, defocus_std=1000.0)
    pyro.set_rng_seed(2)
    trace = poutine.trace(model).get_trace(small_forward, priors, 0.0, batch_size=4000)
    defocus = trace.nodes["defocus"]["value"]
    assert defocus.mean().item() == pytest.approx(15000, abs=4 * 1000 / math.sqrt(4000))
    np.testing.assert_allclose(trace.nodes["enm_scale"]["value"].std(0).numpy(), [1, 2],
                               rtol=0.06)
    # uniform poses: E[q q^T] = I / 4 on the 3-sphere
    q = trace.nodes["rotation"]["value"]
    np.testing.assert_allclose((q.T @ q / len(q)).numpy(), np.eye(4) / 4, atol=0.02)
    assert "measurement" not in trace.nodes
