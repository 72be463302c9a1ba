"""The pose latent: the particle's rotation as a unit quaternion."""

from __future__ import annotations

import math

import numpy as np
import roma
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor

from cryosvi.distributions import ProjectedNormal, ProjectedNormalMixture, RandomWalk
from cryosvi.io.particles import ANGLES, numeric_column
from cryosvi.latents.base import (CREDIBLE_LEVELS, ErrorScore, Latent,
                                  categorical_from_uniform)
from cryosvi.physics.rotations import (euler_geodesic_error, euler_to_matrix, heaviest_component_mean, matrix_to_euler, matrix_to_quaternion, pose_credible_radii_deg, pose_std_deg, quarter_turn_quaternion, quaternion_geodesic_angle, quaternion_product, quaternion_to_matrix, rotation_vector_to_quaternion, weighted_pose)

MAX_LOG_CONCENTRATION = 12.0
MIN_CONCENTRATION = 1.0
"""Floor of each pose component's concentration. The antipodal density is even in the
concentration vector, so c = 0 is a stationary point where the direction gets no
gradient; measured: without a floor the simulation-trained pose encoder collapsed to
c = 0 (uniform) within the first epoch."""
POSE_STD_COLUMN = "cryosviPoseStdDeg"
POSE_RADIUS_COLUMN = "cryosviPoseRadius{}Deg"
"""STAR column of the pose's credible-ball radius at a level, by its percentage."""


def pose_radius(level: float) -> float:
    """r with P(|w| <= r) = level for w ~ N(0, I_3): chi_3 quantile (1.872 for 0.68)."""
    return float(stats.chi(3).ppf(level))


def pose_coverage(error_deg: np.ndarray, std_deg: np.ndarray, level: float) -> float:
    """Fraction of (N,) geodesic errors within ``chi_3^-1(level) * std`` (both degrees)."""
    inside = np.asarray(error_deg, float) <= pose_radius(level) * np.asarray(std_deg, float)
    return float(np.mean(inside))


def _angles(posterior, truth, order) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) RELION angles (degrees) of truth rows ``order[i]`` and of the posterior's
    rows."""
    return tuple(np.stack([numeric_column(table, c)[rows] for c in ANGLES], -1)
                 for table, rows in ((truth, order), (posterior, slice(None))))


def pose_error(posterior, truth, order) -> np.ndarray:
    """(N,) degrees: the geodesic angle between each posterior row's rotation and that of
    truth row ``order[i]`` (RELION angles of both ParticleSets)."""
    return euler_geodesic_error(*_angles(posterior, truth, order))


FRAME_OUTLIER_FACTOR = 3.0
"""Particles whose error, once aligned, exceeds this many times the median are left out
of the frame's fit (a flipped pose or a wrong view says nothing about the frame)."""
FRAME_PARTICLES_PER_PARAMETER = 10
"""The frame's fit needs at least this many particles per fitted rotation vector."""


def frame_alignment(truth_deg: np.ndarray, predicted_deg: np.ndarray,
                    covariates: np.ndarray, iterations: int = 8):
    """The rotation between the molecule frames of the truth and of a posterior, and each
    particle's pose error once it is taken out.

    A flexible molecule has no single frame. A reference turned a little against the
    truth's, or a conformational mode with a rigid-body part (learnt modes have one:
    ``cryosvi.inference.learnt_modes``), holds the molecule turned by a rotation that
    depends on the conformation; the images cannot tell that rotation from the poses', so
    a posterior is right up to it. Modelled as G(c) = exp([g_0 + sum_k c_k g_k]_x) in the
    molecule frame, with c the truth's conformation coordinates: with RELION's matrices A
    (``physics.rotations``: the atoms seen at A r), a posterior in the frame turned by G
    sees A_truth G^T, so A_post^T A_truth = G. The rotation vectors g (degrees; g_k per
    unit of c_k) are fitted by Gauss-Newton steps, least squares on the residual rotation
    vectors log(G(c)^T A_post^T A_truth), over the particles whose residual angle is
    within ``FRAME_OUTLIER_FACTOR`` times the median.

    truth_deg, predicted_deg: (N, 3) RELION (rot, tilt, psi), degrees; covariates:
    (N, K) (K may be 0). Returns (coefficients (1 + K, 3) degrees, errors (N,) degrees
    after alignment, fitted (N,) bool), or None with fewer than
    ``FRAME_PARTICLES_PER_PARAMETER`` (1 + K) particles to fit.
    """
    count = len(truth_deg)
    design = torch.cat([torch.ones(count, 1, dtype=torch.float64),
                        torch.tensor(np.asarray(covariates, float),
                                     dtype=torch.float64).reshape(count, -1)], 1)
    needed = FRAME_PARTICLES_PER_PARAMETER * design.shape[1]
    if count < needed:
        return None
    truth, predicted = (torch.as_tensor(np.asarray(a, float), dtype=torch.float64)
                        for a in (truth_deg, predicted_deg))
    discrepancy = (euler_to_matrix(*predicted.unbind(-1)).transpose(-1, -2)
                   @ euler_to_matrix(*truth.unbind(-1)))
    coefficients = torch.zeros(design.shape[1], 3, dtype=torch.float64)

    def residual() -> Tensor:
        frame = roma.rotvec_to_rotmat(design @ coefficients)
        return roma.rotmat_to_rotvec(frame.transpose(-1, -2) @ discrepancy)

    for _ in range(iterations):
        vectors = residual()
        angle = vectors.norm(dim=-1)
        fitted = angle <= FRAME_OUTLIER_FACTOR * angle.median()
        if int(fitted.sum()) < needed:
            return None
        step = torch.linalg.lstsq(design[fitted], vectors[fitted]).solution
        coefficients = coefficients + step
    errors = torch.rad2deg(residual().norm(dim=-1))
    return torch.rad2deg(coefficients).numpy(), errors.numpy(), fitted.numpy()


def aligned_pose_error(posterior, truth, order, covariates: np.ndarray):
    """``frame_alignment`` of the rows of ``posterior`` against truth rows ``order``:
    (errors (N,) degrees, {"rotation_deg": g_0, "per_unit_deg": [g_k, ...],
    "particles_fitted": count}), or None."""
    found = frame_alignment(*_angles(posterior, truth, order), covariates)
    if found is None:
        return None
    coefficients, errors, fitted = found
    return errors, {"rotation_deg": coefficients[0].tolist(),
                    "per_unit_deg": coefficients[1:].tolist(),
                    "particles_fitted": int(fitted.sum())}


def pose_radius_column(level: float) -> str:
    """The STAR column of the pose's credible radius at ``level`` (0.95 ->
    cryosviPoseRadius95Deg)."""
    return POSE_RADIUS_COLUMN.format(round(100 * level))


class Pose(Latent):
    """The rotation (B, 4), a unit quaternion w x y z (q and -q the same rotation).
    Prior: ProjectedNormal(rotation_concentration * rotation_mean) (0: uniform on SO(3)).
    Guide: a mixture of antipodal ProjectedNormals (``n_components``): per component 4
    direction outputs, a log concentration (1 + exp, floored) and a logit."""

    site, name = "rotation", "pose"
    model_rank, walk_rank = 1, 0
    mean_key, std_key = "rotation_mean", "pose_std_deg"
    radius_key = "pose_radius_deg"
    headline = ("val_pose_median_deg", "pose median")
    truth_label = "rlnAngleRot/Tilt/Psi"
    scored_by_error = True

    def prior(self, priors, conditions, like):
        mean = torch.tensor(priors.rotation_mean, dtype=like.dtype, device=like.device)
        return ProjectedNormal(priors.rotation_concentration * mean / mean.norm())

    def head_size(self, config) -> int:
        return 6 * config.n_components  # 4 direction + 1 log concentration + 1 logit each

    def head(self, out, guide, conditions):
        c = guide.config.n_components
        direction = F.normalize(out[..., : 4 * c].unflatten(-1, (c, 4)), dim=-1, eps=1e-6)
        log_concentration = out[..., 4 * c: 5 * c].clamp(max=MAX_LOG_CONCENTRATION)
        logits = out[..., 5 * c: 6 * c]
        kappa = MIN_CONCENTRATION + log_concentration.exp()
        concentration = direction * kappa.unsqueeze(-1)
        return ProjectedNormalMixture(logits, concentration, antipodal=True)

    def initialise_head(self, last_layer, config) -> None:
        """Spread-out component directions and a low concentration (1 + e^0 = 2)."""
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            c = config.n_components
            last_layer.bias[: 4 * c] = torch.randn(4 * c, generator=generator)
            last_layer.bias[4 * c: 5 * c] = 0.0

    def turned(self, value, turns):
        return quaternion_product(quarter_turn_quaternion(turns, value), value)

    def turned_back(self, q, turns):
        """Each component's concentration left-multiplied by the inverse turn: if v ~
        PN(c) then r v ~ PN(r c) for a unit quaternion r (an orthogonal map of R^4)."""
        if not turns % 4:
            return q
        concentration = q.component_distribution.concentration
        back = quaternion_product(quarter_turn_quaternion(-turns, concentration),
                                  concentration)
        return ProjectedNormalMixture(q.logits, back, antipodal=q.antipodal)

    def mixture(self, parts):
        """One mixture of every part's components, each part weighing 1 / len(parts);
        its components stay grouped by part (``guide_summary`` relies on it)."""
        logits = torch.cat([q.logits.log_softmax(-1) for q in parts], -1)
        logits = logits - math.log(len(parts))
        concentration = torch.cat([q.component_distribution.concentration for q in parts], -2)
        return ProjectedNormalMixture(logits, concentration, antipodal=parts[0].antipodal)

    def draw(self, q, noise):
        """A component (``categorical_from_uniform``), then normalise(c + eps), eps ~ N(0,
        I_4), which is PN(c) by definition, and for the antipodal family the sign
        flipped with probability 1/2 (``ProjectedNormal.rsample``'s sampler)."""
        shape = tuple(q.batch_shape)
        pick = categorical_from_uniform(q.logits, noise.child(0).uniform(shape, axis=1))
        concentration = q.concentration.expand(*shape, *q.concentration.shape[-2:])
        chosen = concentration.gather(-2, pick[..., None, None].expand(*shape, 1, 4)) \
            .squeeze(-2)
        x = chosen + noise.child(1).normal(chosen.shape, axis=1, dtype=chosen.dtype)
        value = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(
            torch.finfo(x.dtype).tiny)
        if q.antipodal:
            flip = noise.child(2).uniform(shape, axis=1) < 0.5
            value = torch.where(flip.unsqueeze(-1), -value, value)
        return value

    def feature_width(self, config) -> int:
        return 9

    def features(self, value, guide, conditions):
        return quaternion_to_matrix(value).flatten(-2)  # the same for q and -q

    def random_walk(self, config) -> RandomWalk:
        """An isotropic rotation step of the population's per-axis RMS angle, 0.01 to 30
        degrees."""
        return RandomWalk(dim=3, step=rotate_randomly, noise_dim=3, spread=pose_spread,
                          floor=math.radians(0.01), cap=math.radians(30))

    difference_step = 1e-3  # radians, 0.06 degrees

    def chart_dim(self, config) -> int:
        return 3

    def retract(self, value, delta):
        """q exp(delta): the rotation ``delta`` (rotation vector, radians, in the
        particle's frame) followed by q."""
        step = rotation_vector_to_quaternion(delta)
        value, step = torch.broadcast_tensors(value, step)
        q = quaternion_product(value, step)
        return q / q.norm(dim=-1, keepdim=True)

    def log_volume(self, delta):
        """S^3's surface measure per unit of rotation-vector volume: with psi = |delta| /
        2 the quaternion's polar angle, dA = sin^2(psi) dpsi dOmega_2 and d^3 delta =
        8 psi^2 dpsi dOmega_2, so dA / d^3 delta = (sin psi / psi)^2 / 8."""
        psi = delta.norm(dim=-1) / 2
        return 2 * torch.log(torch.sinc(psi / math.pi).abs()) - math.log(8.0)

    def guide_summary(self, guide, q, samples, features, point, conditions):
        """The mean direction of the heaviest component of q(pose | x, mean earlier
        latents), and the samples' isotropic angular std (degrees)."""
        at_point = guide.distribution(self.site, features[self.site], point, conditions)
        mean = heaviest_component_mean(at_point, groups=guide.turns)
        return mean, pose_std_deg(samples, mean)

    def weighted_summary(self, samples, weights):
        return weighted_pose(samples, weights)

    def interval_summary(self, samples, weights, mean):
        """The radii (B, L) of the credible balls about the mean at ``CREDIBLE_LEVELS``
        (``rotations.pose_credible_radii_deg``). Measured on 2 000 held-out particles
        of the paper preset (64 samples): at SNR 0.1 after the SMC the 95 % ball
        covered 0.916 of the true poses where chi_3^-1(0.95) std covered 0.888 (the
        posteriors of low SNR have several modes and heavy tails); at SNR 20 0.945-0.953
        against 0.933-0.939 (benchmarks/results/ablations.md)."""
        return {self.radius_key: pose_credible_radii_deg(samples, mean, CREDIBLE_LEVELS,
                                                         weights)}

    def output_columns(self, summary, frame, config):
        columns = super().output_columns(summary, frame, config)
        if self.radius_key in summary:
            radii = summary[self.radius_key].cpu().numpy()
            for i, level in enumerate(CREDIBLE_LEVELS):
                columns[pose_radius_column(level)] = radii[:, i]
        return columns

    def validation(self, summary, truth):
        error = quaternion_geodesic_angle(summary[self.mean_key], truth)
        return {"val_pose_median_deg": float(error.median())}

    def known(self, particles, config):
        particles.require(*ANGLES)
        angles = [torch.tensor(particles.column(c).astype(float), dtype=torch.float64)
                  for c in ANGLES]
        return matrix_to_quaternion(euler_to_matrix(*angles)).float()

    def value_columns(self, value, frame, config):
        rot, tilt, psi = matrix_to_euler(quaternion_to_matrix(
            torch.as_tensor(value).double().cpu()))
        return {"rlnAngleRot": rot.numpy(), "rlnAngleTilt": tilt.numpy(),
                "rlnAnglePsi": psi.numpy()}

    def std_columns(self, std):
        return {POSE_STD_COLUMN: std.cpu().numpy()}

    def truth_error(self, posterior, truth):
        """The geodesic error (degrees); its coverage on the credible balls'
        radius columns, else on chi_3 x the isotropic std."""
        if not all(all(c in t.metadata.columns for c in ANGLES) for t in (posterior, truth)):
            return None
        return ErrorScore("pose", "deg", pose_error, POSE_STD_COLUMN,
                          {level: pose_radius_column(level) for level in CREDIBLE_LEVELS},
                          pose_coverage, f"chi3 x {POSE_STD_COLUMN}", aligned_pose_error)


def pose_spread(rotation: Tensor, weights: Tensor) -> Tensor:
    """The per-axis RMS angle (B,) in radians of weighted rotations (S, B, 4) about their
    mean (``weighted_pose``), computed in float64: a float32 arccos can round a
    particle's value differently at another place in the batch (torch's vectorised and
    scalar loops), and the random walk's width would then depend on the batch."""
    return torch.deg2rad(weighted_pose(rotation.double(), weights.double())[1]).to(
        rotation.dtype)


def rotate_randomly(rotation: Tensor, width: Tensor, noise: Tensor | None = None) -> Tensor:
    """Random-walk step on SO(3): q (S, B, 4) times exp(omega), omega ~ N(0, width^2 I_3)
    with width (B,) in radians (symmetric: the inverse step is as likely); ``noise``
    (S, B, 3) standard normals, drawn here when None."""
    if noise is None:
        noise = torch.randn(*rotation.shape[:-1], 3, device=rotation.device)
    # In float64: a float32 sin or cos can round differently in torch's vectorised and
    # scalar loops, i.e. with the particle's place in the batch; in float64 that
    # difference vanishes when the result is rounded back.
    omega = noise.double() * width.double()[None, :, None]
    q = quaternion_product(rotation.double(), rotation_vector_to_quaternion(omega))
    return (q / q.norm(dim=-1, keepdim=True)).to(rotation.dtype)
