"""Posterior summaries of a guide (one batched network pass) and of weighted samples.

Each latent's summary is defined in ``cryosvi.latents``; the ones of the paper's latents:

* defocus: mean and std of q(defocus | x) (a Normal), or of weighted samples;
* modes (and shifts): mean and std of the guide's marginal over the sampled earlier
  latents (law of total variance), or of weighted samples;
* pose: the mean direction of the heaviest mixture component (w >= 0), or the weighted
  mean direction of samples, and an isotropic angular std: the RMS geodesic distance of
  the samples to that mean over sqrt(3) (the per-axis std of a 3-D isotropic rotation
  error, so the error angle is ~ std * chi_3).

Used by training (validation metrics) and inference alike; imports neither.
"""

from __future__ import annotations

import torch

from cryosvi.guide import Guide
from cryosvi.latents import REGISTRY, Conditions
from cryosvi.rotations import canonical_quaternion, quaternion_geodesic_angle


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
    """Summary keys (each latent's mean and std keys, e.g. defocus_mean/std, modes_mean/std,
    rotation_mean, pose_std_deg) of weighted samples: values site -> (S, B, ...),
    weights (S, B) normalised."""
    out = {}
    for site, latent in REGISTRY.items():
        if site in values:
            out[latent.mean_key], out[latent.std_key] = latent.weighted_summary(
                values[site], weights)
    return out


@torch.no_grad()
def posterior_summary(guide: Guide, images: torch.Tensor, known: dict | None = None,
                      n_samples: int = 32, conditions: Conditions | None = None) -> dict:
    """Means and stds of the guide's posterior for a batch of images (B, L, L).

    Returns tensors (B, ...) under each inferred latent's mean and std keys
    (``cryosvi.latents``), plus 'samples' (site -> (S, B, ...)), 'log_q' (S, B) and the
    image 'features' of each encoder (for ``Guide.log_prob_at``).
    """
    known = dict(known or {})
    conditions = conditions or Conditions()
    latents = guide.config.latents
    out = {}
    values, log_q, dists, features = guide.sample(images, known, n_samples,
                                                  return_features=True,
                                                  conditions=conditions)
    point = dict(known)  # the means of the earlier latents, for summaries at a point
    for site in latents:
        latent = REGISTRY[site]
        mean, std = latent.guide_summary(guide, dists[site], values[site], features, point,
                                         conditions)
        out[latent.mean_key], out[latent.std_key] = mean, std
        point[site] = mean
    out["samples"] = {s: values[s] for s in latents}
    out["log_q"] = log_q
    out["features"] = features
    return out
