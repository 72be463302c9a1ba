"""Rotations: unit quaternions, RELION ZYZ Euler angles and matrices.

Conventions
-----------
* Quaternions are scalar-first, ``(w, x, y, z)``, as in the paper (identity = (1, 0, 0, 0)).
  roma stores them scalar-last; the conversion happens here and nowhere else.
* A particle whose RELION Euler matrix is ``A`` shows the atoms at ``A @ r``, projected
  along z. ``A`` is RELION's ``Euler_angles2matrix(rot, tilt, psi)`` (src/euler.cpp):
  ``A = Rz(psi) Ry(tilt) Rz(rot)`` with ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and
  ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``. The model's quaternion q gives
  ``A = quaternion_to_matrix(q)`` directly, so ``matrix_to_euler`` of it is what goes to
  rlnAngleRot/Tilt/Psi.
"""

from __future__ import annotations

import math

import numpy as np
import roma
import torch
from torch import Tensor


def quaternion_to_matrix(quaternion: Tensor) -> Tensor:
    """(..., 4) unit quaternion (w, x, y, z) -> (..., 3, 3) rotation matrix."""
    return roma.unitquat_to_rotmat(roma.quat_wxyz_to_xyzw(quaternion))


def matrix_to_quaternion(matrix: Tensor) -> Tensor:
    """(..., 3, 3) rotation matrix -> (..., 4) unit quaternion (w, x, y, z) with w >= 0."""
    return canonical_quaternion(roma.quat_xyzw_to_wxyz(roma.rotmat_to_unitquat(matrix)))


def canonical_quaternion(quaternion: Tensor) -> Tensor:
    """The representative with w >= 0 of q and -q (the same rotation); (..., 4)."""
    return quaternion * torch.where(quaternion[..., :1] < 0, -1.0, 1.0).to(quaternion)


def quaternion_product(first: Tensor, second: Tensor) -> Tensor:
    """Hamilton product of (..., 4) quaternions (w, x, y, z): the rotation ``second``
    followed by ``first``."""
    return roma.quat_xyzw_to_wxyz(roma.quat_product(roma.quat_wxyz_to_xyzw(first),
                                                    roma.quat_wxyz_to_xyzw(second)))


def rotation_vector_to_quaternion(rotation_vector: Tensor) -> Tensor:
    """(..., 3) rotation vectors (axis times angle, radians) -> (..., 4) unit quaternions
    (w, x, y, z)."""
    return roma.quat_xyzw_to_wxyz(roma.rotvec_to_unitquat(rotation_vector))


def euler_to_matrix(rot: Tensor, tilt: Tensor, psi: Tensor) -> Tensor:
    """RELION ZYZ Euler angles (..., degrees) -> (..., 3, 3) matrix, as ``Euler_angles2matrix``."""
    a, b, g = (torch.deg2rad(torch.as_tensor(angle)) for angle in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def matrix_to_euler(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(..., 3, 3) matrix -> RELION (rot, tilt, psi) in degrees, tilt in [0, 180].

    As RELION's ``Euler_matrix2angles``: at tilt 0 or 180 (gimbal lock) rot is set to 0
    and the whole in-plane angle goes to psi.
    """
    a02, a12, a22 = matrix[..., 0, 2], matrix[..., 1, 2], matrix[..., 2, 2]
    sin_tilt = torch.sqrt(a02**2 + a12**2)
    regular = sin_tilt > 16 * torch.finfo(matrix.dtype).eps
    tilt = torch.atan2(sin_tilt, a22)
    rot = torch.where(regular, torch.atan2(matrix[..., 2, 1], matrix[..., 2, 0]), 0.0)
    psi_lock = torch.where(
        a22 > 0,
        torch.atan2(-matrix[..., 1, 0], matrix[..., 0, 0]),
        torch.atan2(matrix[..., 1, 0], -matrix[..., 0, 0]),
    )
    psi = torch.where(regular, torch.atan2(a12, -a02), psi_lock)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def geodesic_angle(first: Tensor, second: Tensor) -> Tensor:
    """Angle (degrees) of the rotation taking one matrix to the other; (..., 3, 3) -> (...)."""
    return torch.rad2deg(roma.rotmat_geodesic_distance(first, second))


def quaternion_geodesic_angle(first: Tensor, second: Tensor) -> Tensor:
    """Rotation angle (degrees) between unit quaternions (..., 4); q and -q are the same.

    2 acos|<q1, q2>|, computed as 4 atan2(|q1 - q2|, |q1 + q2|) after aligning signs,
    which stays accurate for tiny angles where acos loses precision.
    """
    sign = torch.where((first * second).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(second)
    second = second * sign
    half = torch.atan2((first - second).norm(dim=-1), (first + second).norm(dim=-1))
    return torch.rad2deg(4 * half)


def random_quaternions(n: int, generator: torch.Generator | None = None,
                       dtype=torch.float32, device=None) -> Tensor:
    """(n, 4) quaternions uniform on SO(3) (Haar measure), w >= 0."""
    quaternion = torch.randn(n, 4, generator=generator, dtype=dtype, device=device)
    quaternion = quaternion / quaternion.norm(dim=-1, keepdim=True)
    return quaternion * torch.where(quaternion[:, :1] < 0, -1.0, 1.0).to(quaternion)


def rotate(coords: Tensor, matrix: Tensor) -> Tensor:
    """Apply rotations to point sets: coords (B, N, 3), matrix (B, 3, 3) -> (B, N, 3)."""
    return coords @ matrix.transpose(-1, -2)


DEGREE = math.pi / 180.0


# ------------------------------------------------------- quarter turns of the image
def quarter_turn_images(images: Tensor, turns: int) -> Tensor:
    """Images (..., L, L) turned by ``turns`` quarter turns about the centre pixel
    (L//2, L//2): the image of the pose ``quarter_turn_quaternion(turns) * q`` (and of
    shifts ``quarter_turn_shifts``) when the image was that of q. Exact but for the first
    row and column, whose partners lie outside the box and wrap around (tested against
    the forward model: ~4 % of the image norm of a 32 px particle)."""
    for _ in range(turns % 4):
        images = torch.roll(torch.rot90(images, -1, dims=(-2, -1)), (0, 1), dims=(-2, -1))
    return images


def quarter_turn_quaternion(turns: int, like: Tensor) -> Tensor:
    """(4,) the rotation by ``turns`` x 90 degrees about the viewing axis (see
    ``quarter_turn_images``), with ``like``'s dtype and device."""
    half = turns * math.pi / 4
    return torch.tensor([math.cos(half), 0.0, 0.0, math.sin(half)], dtype=like.dtype,
                        device=like.device)


def quarter_turn_shifts(shifts: Tensor, turns: int) -> Tensor:
    """Shifts (..., 2) Å (x, y) of a particle after ``quarter_turn_images``: each
    quarter turn maps (x, y) to (-y, x)."""
    for _ in range(turns % 4):
        shifts = torch.stack([-shifts[..., 1], shifts[..., 0]], -1)
    return shifts


# ------------------------------------------------- statistics of rotation samples
def heaviest_component_mean(mixture, groups: int = 1) -> Tensor:
    """Unit mean direction (w >= 0) of the heaviest component, batch shape (...,). With
    ``groups`` > 1 the components form that many equal consecutive groups (the quarter
    turns of ``Guide.turns``): the mean of each group's heaviest component, aligned with
    the first group's, averaged."""
    logits = mixture.mixture_distribution.logits
    concentration = mixture.component_distribution.concentration
    logits = logits.unflatten(-1, (groups, -1))
    concentration = concentration.unflatten(-2, (groups, -1))
    best = logits.argmax(-1)
    chosen = torch.gather(concentration, -2,
                          best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    chosen = chosen / chosen.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (..., G, 4)
    sign = torch.where((chosen * chosen[..., :1, :]).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    mean = (chosen * sign).sum(-2)
    return canonical_quaternion(mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def _sum_over_samples(values: Tensor) -> Tensor:
    """(S, B, ...) -> (B, ...): each problem's sum along a contiguous axis, so that it
    does not depend on the batch at rounding level (as
    ``cryosvi.distributions.sum_over_samples``)."""
    return values.movedim(0, -1).contiguous().sum(-1)


def pose_std_deg(samples: Tensor, mean: Tensor,
                 weights: Tensor | None = None) -> Tensor:
    """Isotropic angular std (deg): sqrt(E[geodesic(sample, mean)^2] / 3).
    samples (S, B, 4), mean (B, 4), weights (S, B) normalised or None."""
    angle = quaternion_geodesic_angle(samples, mean.expand_as(samples))
    if weights is None:
        return (_sum_over_samples(angle.square()) / angle.shape[0] / 3).sqrt()
    return (_sum_over_samples(weights * angle.square()) / 3).sqrt()


def pose_credible_radii_deg(samples: Tensor, mean: Tensor, levels,
                            weights: Tensor | None = None) -> Tensor:
    """Radii (deg) of credible balls about ``mean``: for each level p the smallest
    geodesic distance d of a sample such that the samples within d weigh at least
    p (1 + 1 / n), n = 1 / sum w^2 (Kish's effective sample size; S with equal weights).

    With S equal weights that is the order statistic d_(k), k = ceil(p (S + 1)): a further
    draw exchangeable with the samples falls within it with probability k / (S + 1) >= p
    (the distribution-free property of order statistics; Wilks 1941, Ann. Math. Stat.
    12, 91), where the empirical p-quantile of 64 draws falls short (0.95 -> 0.94). A
    ball is a credible region whatever the posterior's shape (several modes, a heavy
    tail), unlike ``chi_3^-1(p)`` times ``pose_std_deg``, which assumes a small Gaussian
    error. Capped at the farthest sample.
    samples (S, B, 4), mean (B, 4), weights (S, B) normalised or None, levels (L,) ->
    (B, L)."""
    angle = quaternion_geodesic_angle(samples, mean.expand_as(samples))
    if weights is None:
        weights = torch.full_like(angle, 1.0 / angle.shape[0])
    angle, order = angle.sort(0)
    cumulative = weights.gather(0, order).T.contiguous().cumsum(-1).T
    effective = 1.0 / _sum_over_samples(weights.square())
    radii = []
    for level in levels:
        needed = (level * (1 + 1 / effective)).clamp(max=1.0)
        # rounding slack: k / S summed in float must reach k / S exactly
        index = (cumulative < needed - 1e-6).sum(0).clamp(max=angle.shape[0] - 1)
        radii.append(angle.gather(0, index[None])[0])
    return torch.stack(radii, -1)


def weighted_mean_direction(samples: Tensor, weights: Tensor,
                            reference: Tensor) -> Tensor:
    """Weighted mean of antipodal quaternion samples (S, B, 4) after aligning each with
    ``reference`` (B, 4); a unit vector with w >= 0."""
    sign = torch.where((samples * reference).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    mean = _sum_over_samples(weights[..., None] * samples * sign)
    return canonical_quaternion(mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def weighted_pose(rotation: Tensor, weights: Tensor):
    """Mean direction (B, 4) of weighted quaternion samples (S, B, 4), aligned with the
    heaviest sample, and their isotropic angular std (B,) in degrees."""
    batch = torch.arange(rotation.shape[1], device=rotation.device)
    mean = weighted_mean_direction(rotation, weights, rotation[weights.argmax(0), batch])
    return mean, pose_std_deg(rotation, mean, weights)


def euler_geodesic_error(truth_deg: np.ndarray, predicted_deg: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees, in [0, 180]) between RELION ZYZ Euler triples.

    truth_deg, predicted_deg: (N, 3) (rot, tilt, psi) in degrees -> (N,). Computed on the
    rotation matrices, so equivalent Euler triples (e.g. rot + a, psi - a at tilt 0) give 0.
    """
    truth, predicted = (torch.as_tensor(np.asarray(a, float), dtype=torch.float64)
                        for a in (truth_deg, predicted_deg))
    # float64: roma's asin form loses ~sqrt(eps) near 180 deg; 1e-6 deg in float64.
    first = euler_to_matrix(truth[:, 0], truth[:, 1], truth[:, 2])
    second = euler_to_matrix(predicted[:, 0], predicted[:, 1], predicted[:, 2])
    return geodesic_angle(first, second).numpy()


def quaternion_geodesic_error(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees) between (N, 4) unit quaternions (w, x, y, z) -> (N,).

    q and -q are the same rotation and give 0. Inputs are renormalised.
    """
    first, second = (torch.as_tensor(np.asarray(q, float), dtype=torch.float64)
                     for q in (truth, predicted))
    first = first / first.norm(dim=-1, keepdim=True)
    second = second / second.norm(dim=-1, keepdim=True)
    return quaternion_geodesic_angle(first, second).numpy()
