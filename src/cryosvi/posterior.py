"""Posterior summaries of a guide (one batched network pass) and of weighted samples.

Each latent's summary is defined in ``cryosvi.latents``; the ones of the paper's latents:

* defocus: mean and std of q(defocus | x) (a Normal), or of weighted samples;
* modes (and shifts): mean and std of the guide's marginal over the sampled earlier
  latents (law of total variance), or of weighted samples;
* pose: the mean direction of the heaviest mixture component (w >= 0), or the weighted
  mean direction of samples, and an isotropic angular std: the RMS geodesic distance of
  the samples to that mean over sqrt(3) (the per-axis std of a 3-D isotropic rotation
  error, so the error angle is ~ std * chi_3), and the radii of the credible balls about
  it at ``CREDIBLE_LEVELS`` (sample quantiles of the distance; what the coverage of the
  pose is scored on).

Used by training (validation metrics) and inference alike; imports neither.
"""

from __future__ import annotations

import torch

from cryosvi.guide import Guide
from cryosvi.latents import REGISTRY
from cryosvi.physics.conditions import Conditions


def weighted_summary(values: dict, weights: torch.Tensor) -> dict:
    """Summary keys (each latent's mean and std keys, e.g. defocus_mean/std, modes_mean/std,
    rotation_mean, pose_std_deg) of weighted samples: values site -> (S, B, ...),
    weights (S, B) normalised."""
    out = {}
    for site, latent in REGISTRY.items():
        if site in values:
            out[latent.mean_key], out[latent.std_key] = latent.weighted_summary(
                values[site], weights)
            out.update(latent.interval_summary(values[site], weights, out[latent.mean_key]))
    return out


@torch.no_grad()
def posterior_summary(guide: Guide, images: torch.Tensor, known: dict | None = None,
                      n_samples: int = 32, conditions: Conditions | None = None,
                      noise=None) -> dict:
    """Means and stds of the guide's posterior for a batch of images (B, L, L).

    Returns tensors (B, ...) under each inferred latent's mean and std keys
    (``cryosvi.latents``), plus 'samples' (site -> (S, B, ...)), 'log_q' (S, B) and the
    image 'features' of each encoder (for ``Guide.log_prob_at``). ``noise``: the
    particles' random streams (``Guide.sample``; None: torch's global generator).
    """
    known = dict(known or {})
    conditions = conditions or Conditions()
    latents = guide.config.latents
    out = {}
    values, log_q, dists, features = guide.sample(images, known, n_samples,
                                                  return_features=True,
                                                  conditions=conditions, noise=noise)
    point = dict(known)  # the means of the earlier latents, for summaries at a point
    for site in latents:
        latent = REGISTRY[site]
        mean, std = latent.guide_summary(guide, dists[site], values[site], features, point,
                                         conditions)
        out[latent.mean_key], out[latent.std_key] = mean, std
        out.update(latent.interval_summary(values[site], None, mean))
        point[site] = mean
    out["samples"] = {s: values[s] for s in latents}
    out["log_q"] = log_q
    out["features"] = features
    return out
