"""Posterior summaries of a guide (one batched network pass) and of weighted samples.

* defocus: mean and std of q(defocus | x) (a Normal), or of weighted samples;
* modes: mean and std of the guide's marginal over the sampled earlier latents (law of
  total variance), or of weighted samples;
* pose: the mean direction of the heaviest mixture component (w >= 0), or the weighted
  mean direction of samples, and an isotropic angular std: the RMS geodesic distance of
  the samples to that mean over sqrt(3) (the per-axis std of a 3-D isotropic rotation
  error, so the error angle is ~ std * chi_3).

Used by training (validation metrics) and inference alike; imports neither.
"""

from __future__ import annotations

import torch

from cryosvi.guide import Guide
from cryosvi.rotations import canonical_quaternion, quaternion_geodesic_angle
from cryosvi.smc import weighted_moments


def heaviest_component_mean(mixture) -> torch.Tensor:
    """Unit mean direction (w >= 0) of the heaviest component, batch shape (...,)."""
    logits = mixture.mixture_distribution.logits
    concentration = mixture.component_distribution.concentration
    best = logits.argmax(-1)
    chosen = torch.gather(concentration, -2,
                          best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    return canonical_quaternion(chosen / chosen.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def pose_std_deg(samples: torch.Tensor, mean: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Isotropic angular std (deg): sqrt(E[geodesic(sample, mean)^2] / 3).
    samples (S, B, 4), mean (B, 4), weights (S, B) normalised or None."""
    angle = quaternion_geodesic_angle(samples, mean.expand_as(samples))
    if weights is None:
        return (angle.square().mean(0) / 3).sqrt()
    return ((weights * angle.square()).sum(0) / 3).sqrt()


def weighted_mean_direction(samples: torch.Tensor, weights: torch.Tensor,
                            reference: torch.Tensor) -> torch.Tensor:
    """Weighted mean of antipodal quaternion samples (S, B, 4) after aligning each with
    ``reference`` (B, 4); a unit vector with w >= 0."""
    sign = torch.where((samples * reference).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    mean = (weights[..., None] * samples * sign).sum(0)
    return canonical_quaternion(mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def weighted_pose(rotation: torch.Tensor, weights: torch.Tensor):
    """Mean direction (B, 4) of weighted quaternion samples (S, B, 4), aligned with the
    heaviest sample, and their isotropic angular std (B,) in degrees."""
    batch = torch.arange(rotation.shape[1], device=rotation.device)
    mean = weighted_mean_direction(rotation, weights, rotation[weights.argmax(0), batch])
    return mean, pose_std_deg(rotation, mean, weights)


def weighted_summary(values: dict, weights: torch.Tensor) -> dict:
    """Summary keys (defocus_mean/std, modes_mean/std, rotation_mean, pose_std_deg) of
    weighted samples: values site -> (S, B, ...), weights (S, B) normalised."""
    out = {}
    if "defocus" in values:
        out["defocus_mean"], out["defocus_std"] = weighted_moments(values["defocus"], weights)
    if "enm_scale" in values:
        out["modes_mean"], out["modes_std"] = weighted_moments(values["enm_scale"], weights)
    if "rotation" in values:
        out["rotation_mean"], out["pose_std_deg"] = weighted_pose(values["rotation"], weights)
    return out


@torch.no_grad()
def posterior_summary(guide: Guide, images: torch.Tensor, known: dict | None = None,
                      n_samples: int = 32) -> dict:
    """Means and stds of the guide's posterior for a batch of images (B, L, L).

    Returns tensors (B, ...) keyed defocus_mean/std, modes_mean/std, rotation_mean,
    pose_std_deg for the inferred sites, plus 'samples' (site -> (S, B, ...)), 'log_q'
    (S, B) and the image 'features' of each encoder (for ``Guide.log_prob_at``).
    """
    known = dict(known or {})
    latents = guide.config.latents
    out = {}
    values, log_q, dists, features = guide.sample(images, known, n_samples,
                                                  return_features=True)
    if "defocus" in latents:
        q = dists["defocus"]
        out["defocus_mean"], out["defocus_std"] = q.mean[0], q.stddev[0]
    if "rotation" in latents:
        # Pose mean: heaviest component of q(pose | x, mean defocus).
        point = dict(known)
        if "defocus" in latents:
            point["defocus"] = out["defocus_mean"]
        pose = guide.distribution("rotation", features["rotation"],
                                  guide.condition("rotation", point))
        out["rotation_mean"] = heaviest_component_mean(pose)
        out["pose_std_deg"] = pose_std_deg(values["rotation"], out["rotation_mean"])
    if "enm_scale" in latents:
        q = dists["enm_scale"]
        mean, var = q.mean, q.variance  # (S, B, K): per sample of the earlier latents
        out["modes_mean"] = mean.mean(0)
        out["modes_std"] = (var.mean(0) + mean.var(0, unbiased=False)).sqrt()
    out["samples"] = {s: values[s] for s in latents}
    out["log_q"] = log_q
    out["features"] = features
    return out
