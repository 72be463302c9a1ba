"""Rotation conventions: RELION's ZYZ Euler matrices (src/euler.cpp), scalar-first
quaternions, geodesic angles and Haar-uniform sampling."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from cryosvi.physics.rotations import (canonical_quaternion, euler_to_matrix, geodesic_angle,
                               matrix_to_euler, matrix_to_quaternion, pose_credible_radii_deg,
                               quaternion_geodesic_angle,
                               quaternion_product, quaternion_to_matrix, random_quaternions,
                               rotate, rotation_vector_to_quaternion)

F64 = dict(dtype=torch.float64)


def relion_euler_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix written out element by element (src/euler.cpp)."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


@pytest.mark.parametrize("angles", [(0, 0, 0), (90, 0, 0), (0, 90, 0), (0, 0, 90),
                                    (30, 50, 70), (-120, 170, 45), (200, 10, -80)])
def test_euler_matrix_is_relions(angles):
    matrix = euler_to_matrix(*(torch.tensor(float(a), **F64) for a in angles))
    np.testing.assert_allclose(matrix.numpy(), relion_euler_matrix(*angles), atol=1e-14)


def test_rot_90_maps_x_to_minus_y():
    # A = Rz(90) in RELION's (transposed) convention: the atom at +x appears at -y.
    matrix = euler_to_matrix(torch.tensor(90.0, **F64), torch.tensor(0.0, **F64),
                             torch.tensor(0.0, **F64))
    atom = torch.tensor([[[10.0, 0.0, 0.0]]], **F64)
    np.testing.assert_allclose(rotate(atom, matrix[None]).numpy(), [[[0, -10, 0]]], atol=1e-12)


def test_euler_round_trip_and_range():
    torch.manual_seed(0)
    matrices = quaternion_to_matrix(random_quaternions(2000, dtype=torch.float64))
    rot, tilt, psi = matrix_to_euler(matrices)
    assert tilt.min() >= 0 and tilt.max() <= 180
    assert rot.abs().max() <= 180 and psi.abs().max() <= 180
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi).numpy(), matrices.numpy(),
                               atol=1e-12)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_gimbal_lock_puts_in_plane_angle_in_psi(tilt):
    matrix = euler_to_matrix(*(torch.tensor(a, **F64) for a in (25.0, tilt, 40.0)))
    rot, tilt_out, psi = matrix_to_euler(matrix)
    assert rot.item() == 0.0 and tilt_out.item() == pytest.approx(tilt)
    np.testing.assert_allclose(euler_to_matrix(rot, tilt_out, psi).numpy(), matrix.numpy(),
                               atol=1e-12)


def test_quaternion_is_scalar_first_active_rotation():
    theta = 0.7
    q = torch.tensor([math.cos(theta / 2), 0.0, 0.0, math.sin(theta / 2)], **F64)
    c, s = math.cos(theta), math.sin(theta)
    expected = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), expected, atol=1e-14)
    np.testing.assert_allclose(quaternion_to_matrix(-q).numpy(), expected, atol=1e-14)
    np.testing.assert_allclose(matrix_to_quaternion(torch.tensor(expected)).numpy(), q.numpy(),
                               atol=1e-14)


def test_geodesic_angles_agree_and_ignore_sign():
    torch.manual_seed(1)
    q1, q2 = random_quaternions(500, **F64), random_quaternions(500, **F64)
    from_quaternions = quaternion_geodesic_angle(q1, q2)
    from_matrices = geodesic_angle(quaternion_to_matrix(q1), quaternion_to_matrix(q2))
    np.testing.assert_allclose(from_quaternions.numpy(), from_matrices.numpy(), atol=1e-6)
    np.testing.assert_allclose(quaternion_geodesic_angle(q1, -q2).numpy(),
                               from_quaternions.numpy(), atol=1e-9)
    assert quaternion_geodesic_angle(q1, q1).abs().max() < 1e-6
    # a known small rotation about x: exact angle, even at 1e-4 degrees
    for degrees in (1e-4, 3.0, 179.0):
        half = math.radians(degrees) / 2
        turn = torch.tensor([[math.cos(half), math.sin(half), 0.0, 0.0]], **F64)
        identity = torch.tensor([[1.0, 0.0, 0.0, 0.0]], **F64)
        assert quaternion_geodesic_angle(identity, turn).item() == pytest.approx(degrees, rel=1e-9)


def test_random_quaternions_are_haar_uniform():
    # The rotation angle of a Haar-random rotation has density (1 - cos t) / pi on [0, pi].
    generator = torch.Generator().manual_seed(3)
    q = random_quaternions(20000, generator=generator, **F64)
    angle = np.deg2rad(quaternion_geodesic_angle(q, torch.tensor([1.0, 0, 0, 0], **F64)).numpy())
    cdf = lambda t: (t - np.sin(t)) / np.pi  # noqa: E731
    assert scipy.stats.kstest(angle, cdf).pvalue > 1e-3
    mean_matrix = quaternion_to_matrix(q).mean(0)
    assert mean_matrix.abs().max() < 0.03  # E[R] = 0 under the Haar measure


def test_quaternion_product_composes_rotations_and_rotation_vectors_match_the_axis_angle():
    torch.manual_seed(0)
    a, b = random_quaternions(50), random_quaternions(50)
    torch.testing.assert_close(quaternion_to_matrix(quaternion_product(a, b)),
                               quaternion_to_matrix(a) @ quaternion_to_matrix(b),
                               atol=1e-5, rtol=0)
    angle = torch.tensor([1e-9, 0.3, 2.0])
    axis = torch.nn.functional.normalize(torch.randn(3, 3), dim=-1)
    q = rotation_vector_to_quaternion(angle[:, None] * axis)
    expected = torch.cat([torch.cos(angle / 2)[:, None], torch.sin(angle / 2)[:, None] * axis], 1)
    torch.testing.assert_close(q, expected)
    assert torch.equal(canonical_quaternion(-q), q)


def test_pose_credible_balls_cover_a_further_draw_as_order_statistics_do():
    # For S exchangeable draws and one more, P(the further one lies within the k-th
    # smallest distance) = k / (S + 1) exactly, whatever the distribution (here Haar
    # rotations about the identity): k = ceil(p (S + 1)) = 45 and 62 of 65 for p = 0.68,
    # 0.95.
    generator = torch.Generator().manual_seed(5)
    problems, draws = 20000, 64
    q = random_quaternions(problems * (draws + 1), generator=generator, **F64)
    q = q.view(draws + 1, problems, 4)
    centre = torch.tensor([1.0, 0, 0, 0], **F64).expand(problems, 4)
    radii = pose_credible_radii_deg(q[:draws], centre, (0.68, 0.95))
    distance = quaternion_geodesic_angle(q[draws], centre)
    for i, k in enumerate((45, 62)):
        expected = k / (draws + 1)
        observed = float((distance <= radii[:, i]).double().mean())
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / problems)
    # Samples of zero weight change nothing: the weighted rule is the equal one on the rest.
    weights = torch.cat([torch.full((draws, problems), 1.0 / draws, **F64),
                         torch.zeros(draws, problems, **F64)])
    noise = random_quaternions(draws * problems, generator=generator, **F64)
    both = torch.cat([q[:draws], noise.view(draws, problems, 4)])
    torch.testing.assert_close(pose_credible_radii_deg(both, centre, (0.68, 0.95), weights),
                               radii)
