"""Posterior of every particle from a trained guide (one batched network pass), refined by
the physics likelihood (tempered SMC by default, or importance sampling), as STAR/npz.

Summaries per particle (``posterior_summary``):
* defocus: mean and std of q(defocus | x) (a Normal), or of the weighted samples;
* modes: mean and std of the guide's marginal over the sampled earlier latents (law of
  total variance), or of the weighted samples;
* pose: the mean direction of the heaviest mixture component (w >= 0) and an isotropic
  angular std: the RMS geodesic distance of the samples to that mean over sqrt(3) (the
  per-axis std of a 3-D isotropic rotation error, so the error angle is ~ std * chi_3).

Refinement with the physics likelihood (``refine``): importance sampling with the guide
as proposal (weights p(x | z) p(z) / q(z | x), self-normalised; its effective sample size
(sum w)^2 / sum w^2 is reported per particle), or adaptive tempered SMC from the guide to
the posterior (resample-move with random-walk Metropolis moves).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pyro import poutine
from tqdm.auto import tqdm

from cryosvi.guide import ORDER, Guide
from cryosvi.io.atomic import save_npz_atomically
from cryosvi.io.mrc import ParticleImages
from cryosvi.io.star import MODE_COLUMN, read_star, write_star
from cryosvi.model import model
from cryosvi.rotations import (canonical_quaternion, matrix_to_euler,
                               quaternion_geodesic_angle, quaternion_product,
                               quaternion_to_matrix, rotation_vector_to_quaternion)

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


@torch.no_grad()
def log_joint(forward, priors, noise_std: float, images: torch.Tensor,
              values: dict) -> torch.Tensor:
    """log p(x, z) of the model for samples ``values`` (site -> (S, B, ...)) of images
    (B, L, L); returns (S, B)."""
    n_samples, batch = next(iter(values.values())).shape[:2]
    flat = {s: v.reshape(n_samples * batch, *v.shape[2:]) for s, v in values.items()}
    tiled = images.unsqueeze(0).expand(n_samples, *images.shape).reshape(
        n_samples * batch, *images.shape[1:])
    trace = poutine.trace(poutine.condition(model, data=flat)).get_trace(
        forward, priors, noise_std, images=tiled)
    trace.compute_log_prob()
    total = sum(node["log_prob"] for node in trace.nodes.values()
                if node["type"] == "sample")
    return total.reshape(n_samples, batch)


def weighted_moments(values: torch.Tensor, weights: torch.Tensor):
    """Mean and std over samples: values (S, B, ...), weights (S, B) normalised ->
    two tensors (B, ...)."""
    w = weights.view(*weights.shape, *([1] * (values.dim() - 2)))
    mean = (w * values).sum(0)
    return mean, (w * (values - mean).square()).sum(0).sqrt()


def weighted_pose(rotation: torch.Tensor, weights: torch.Tensor):
    """Mean direction (B, 4) of weighted quaternion samples (S, B, 4), aligned with the
    heaviest sample, and their isotropic angular std (B,) in degrees."""
    batch = torch.arange(rotation.shape[1], device=rotation.device)
    mean = weighted_mean_direction(rotation, weights, rotation[weights.argmax(0), batch])
    return mean, pose_std_deg(rotation, mean, weights)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """(S, B) unnormalised log weights -> (B,) ESS = (sum w)^2 / sum w^2."""
    weights = torch.softmax(log_weights, dim=0)
    return 1.0 / weights.square().sum(0)


def next_temperature_step(increment: torch.Tensor, room: torch.Tensor,
                          target: float, iterations: int = 40) -> torch.Tensor:
    """Per particle, the largest step d in [0, room] with ESS(d * increment) >= target S
    (bisection; ESS decreases with d). increment (S, B), room (B,) -> (B,)."""
    n = increment.shape[0]
    full = effective_sample_size(increment * room) >= target * n
    low, high = torch.zeros_like(room), room.clone()
    for _ in range(iterations):
        middle = (low + high) / 2
        ok = effective_sample_size(increment * middle) >= target * n
        low = torch.where(ok, middle, low)
        high = torch.where(ok, high, middle)
    step = torch.where(full, room, low)
    # Always advance a little, so a particle whose increments are all equal to -inf but
    # one cannot stall the loop.
    return torch.where(room > 0, step.clamp_min(torch.minimum(room, torch.full_like(room, 1e-6))),
                       room)


def systematic_resample(weights: torch.Tensor) -> torch.Tensor:
    """(S, B) normalised weights -> (S, B) ancestor indices (identity for equal weights)."""
    n, batch = weights.shape
    cumulative = weights.double().cumsum(0)
    cumulative[-1] = 1.0
    offset = torch.rand(1, batch, dtype=torch.float64, device=weights.device)
    points = (torch.arange(n, dtype=torch.float64, device=weights.device)[:, None] + offset) / n
    return torch.searchsorted(cumulative.T.contiguous(), points.T.contiguous()).T.clamp(max=n - 1)


def population_widths(values: dict, weights: torch.Tensor, latents) -> dict:
    """Per-particle spread of a weighted population: pose RMS per-axis angle (rad),
    defocus and mode stds."""
    widths = {}
    if "rotation" in latents:
        widths["rotation"] = torch.deg2rad(weighted_pose(values["rotation"], weights)[1])
    if "defocus" in latents:
        widths["defocus"] = weighted_moments(values["defocus"], weights)[1]
    if "enm_scale" in latents:
        widths["enm_scale"] = weighted_moments(values["enm_scale"], weights)[1]
    return widths


@torch.no_grad()
def refine(guide: Guide, forward, priors, noise_std: float, images: torch.Tensor,
           known: dict | None, n_samples: int, method: str = "smc", moves: int = 2,
           max_steps: int = 40, ess_target: float = 0.5, chunk: int = 16) -> dict:
    """Refine the guide's posterior with the physics likelihood.

    method 'is': self-normalised importance sampling, S proposals per particle from the
    guide, weights p(x, z) / q(z | x).

    method 'smc': adaptive tempered sequential Monte Carlo from the guide to the
    posterior along pi_b(z) ~ q(z | x)^(1 - b) p(x, z)^b. Each step raises b as far as
    keeps the ESS of the incremental weights at ``ess_target`` * S (per particle),
    resamples (systematic) and makes ``moves`` random-walk Metropolis moves targeting
    pi_b (pose: isotropic Gaussian rotations; defocus, modes: Gaussian; widths 2.38 /
    sqrt(dim) times the population's spread). At b = 1 the equally weighted population
    samples the posterior. At most ``max_steps`` steps (the last jumps to b = 1).

    Returns the summary (same keys as ``posterior_summary``) plus 'ess' (B,): the ESS of
    plain importance sampling with the guide as proposal (the guide's quality), 'weights'
    (S, B), 'samples' and, for smc, 'steps' (B,) and 'acceptance' (B,).
    """
    if method not in ("is", "smc"):
        raise ValueError(f"unknown refinement {method!r} (is or smc)")
    known = dict(known or {})
    latents = guide.config.latents
    base = posterior_summary(guide, images, known, n_samples)
    features = base["features"]
    batch = images.shape[0]
    known_values = {s: v.unsqueeze(0).expand(n_samples, *v.shape) for s, v in known.items()}
    values = dict(base["samples"])
    log_q = base["log_q"]

    def log_target(samples):
        joint = {**known_values, **samples}
        parts = [log_joint(forward, priors, noise_std, images,
                           {s: v[i:i + chunk] for s, v in joint.items()})
                 for i in range(0, n_samples, chunk)]
        return torch.nan_to_num(torch.cat(parts), nan=-math.inf)

    log_p = log_target(values)
    increment = torch.nan_to_num(log_p - log_q, nan=-math.inf, posinf=-math.inf)
    guide_ess = effective_sample_size(increment)
    out = dict(base)
    out["ess"] = guide_ess
    if method == "is":
        weights = torch.softmax(increment, dim=0)
    else:
        dimension = sum({"rotation": 3, "defocus": 1}.get(s, guide.config.n_modes)
                        for s in latents)
        scale = 2.38 / math.sqrt(dimension)
        floors = {"rotation": math.radians(0.01), "defocus": 0.1, "enm_scale": 1e-4}
        beta = torch.zeros(batch, dtype=torch.float64, device=images.device)
        steps = torch.zeros(batch, device=images.device)
        accepted = torch.zeros(batch, device=images.device)
        tried = 0
        columns = torch.arange(batch, device=images.device).expand(n_samples, batch)
        for step in range(max_steps):
            if bool((beta >= 1).all()):
                break
            room = 1.0 - beta
            delta = room if step == max_steps - 1 else next_temperature_step(
                increment.double(), room, ess_target)
            steps += (delta > 0).float()
            weights = torch.softmax((delta[None] * increment.double()).float(), dim=0)
            widths = population_widths(values, weights, latents)
            beta = torch.where(room - delta < 1e-9, torch.ones_like(beta), beta + delta)
            parent = systematic_resample(weights)
            values = {s: v[parent, columns] for s, v in values.items()}
            log_p, log_q = log_p[parent, columns], log_q[parent, columns]
            b = beta.float()[None]
            for _ in range(moves):
                proposal = {}
                if "rotation" in latents:
                    width = torch.maximum(scale * widths["rotation"],
                                          torch.full_like(widths["rotation"],
                                                          floors["rotation"]))
                    width = width.clamp(max=math.radians(30))
                    omega = torch.randn(n_samples, batch, 3, device=images.device) \
                        * width[None, :, None]
                    q = quaternion_product(values["rotation"],
                                           rotation_vector_to_quaternion(omega))
                    proposal["rotation"] = q / q.norm(dim=-1, keepdim=True)
                if "defocus" in latents:
                    width = (scale * widths["defocus"]).clamp_min(floors["defocus"])
                    proposal["defocus"] = values["defocus"] + width * torch.randn_like(
                        values["defocus"])
                if "enm_scale" in latents:
                    width = (scale * widths["enm_scale"]).clamp_min(floors["enm_scale"])
                    proposal["enm_scale"] = values["enm_scale"] + width * torch.randn_like(
                        values["enm_scale"])
                new_log_p = log_target(proposal)
                new_log_q = guide.log_prob_at(features, {**known_values, **proposal})
                log_ratio = (1 - b) * (new_log_q - log_q) + b * (new_log_p - log_p)
                accept = torch.log(torch.rand_like(log_ratio)) < torch.nan_to_num(
                    log_ratio, nan=-math.inf)
                for s in values:
                    mask = accept.view(*accept.shape, *([1] * (values[s].dim() - 2)))
                    values[s] = torch.where(mask, proposal[s], values[s])
                log_p = torch.where(accept, new_log_p, log_p)
                log_q = torch.where(accept, new_log_q, log_q)
                accepted += accept.float().mean(0)
                tried += 1
            increment = torch.nan_to_num(log_p - log_q, nan=-math.inf, posinf=-math.inf)
        weights = torch.full((n_samples, batch), 1.0 / n_samples, device=images.device)
        out["steps"] = steps
        out["acceptance"] = accepted / max(tried, 1)
    out["samples"] = values
    out["weights"] = weights
    if "defocus" in latents:
        out["defocus_mean"], out["defocus_std"] = weighted_moments(values["defocus"], weights)
    if "enm_scale" in latents:
        out["modes_mean"], out["modes_std"] = weighted_moments(values["enm_scale"], weights)
    if "rotation" in latents:
        out["rotation_mean"], out["pose_std_deg"] = weighted_pose(values["rotation"], weights)
    return out


def summary_columns(summary: dict, latents, n_modes: int) -> dict[str, np.ndarray]:
    """STAR columns of the inferred latents from a summary."""
    columns = {}
    if "rotation" in latents:
        rot, tilt, psi = matrix_to_euler(quaternion_to_matrix(
            summary["rotation_mean"].double().cpu()))
        columns.update(rlnAngleRot=rot.numpy(), rlnAngleTilt=tilt.numpy(),
                       rlnAnglePsi=psi.numpy(),
                       cryosviPoseStdDeg=summary["pose_std_deg"].cpu().numpy())
    if "defocus" in latents:
        mean = summary["defocus_mean"].cpu().numpy()
        columns.update(rlnDefocusU=mean, rlnDefocusV=mean,
                       rlnDefocusAngle=np.zeros_like(mean),
                       cryosviDefocusStd=summary["defocus_std"].cpu().numpy())
    if "enm_scale" in latents:
        mean, std = summary["modes_mean"].cpu().numpy(), summary["modes_std"].cpu().numpy()
        for k in range(n_modes):
            columns[MODE_COLUMN.format(k + 1)] = mean[:, k]
            columns[f"cryosviModeAmplitudeStd{k + 1}"] = std[:, k]
    if "ess" in summary:
        columns["cryosviESS"] = summary["ess"].cpu().numpy()
    return columns


def infer(run: str | Path, particles: str | Path, output: str | Path, samples: int = 0,
          importance: int = 64, method: str = "smc", moves: int = 3,
          batch_size: int = 256,
          device: str = "cpu", summary_samples: int = 64,
          progress: bool = True) -> pd.DataFrame:
    """Posterior of every particle of ``particles`` under the trained run ``run``.

    Writes the STAR file ``output`` (input columns kept, inferred ones replaced) and, with
    ``samples`` > 0, ``output`` with suffix .npz holding S posterior samples per particle
    (site -> (N, S, ...)). ``importance`` > 0 refines with that many importance samples
    per particle: ``method`` 'smc' (tempered SMC from the guide to the posterior) or 'is'
    (importance sampling with the guide as proposal); see ``refine``.
    Returns the particle table written.
    """
    from cryosvi.train import check_compatible, known_values, load_trained, select_device

    select_device(device)
    info, reference, guide = load_trained(run, device)
    table = read_star(particles)
    images = ParticleImages(table)
    check_compatible(table, images, reference)
    config = guide.config
    fixed = [s for s in ORDER if s not in config.latents]
    known = known_values(table, fixed, reference.n_modes)
    forward = reference.forward_model().to(device) if importance else None
    n = len(table)
    collected: dict[str, list] = {}
    sample_store: dict[str, list] = {s: [] for s in config.latents}
    if samples:
        sample_store["weights"] = [] if importance else None
    draws = max(summary_samples, samples, importance)
    torch.manual_seed(0)
    for start in tqdm(range(0, n, batch_size), desc="inferring", unit="batch",
                      disable=not progress, leave=False):
        index = np.arange(start, min(start + batch_size, n))
        batch = torch.from_numpy(images[index]).to(device)
        batch_known = {s: v[index].to(device) for s, v in known.items()}
        if importance:
            summary = refine(guide, forward, reference.priors, reference.noise.std, batch,
                             batch_known, importance, method=method, moves=moves)
        else:
            summary = posterior_summary(guide, batch, batch_known, draws)
        for key, value in summary_columns(summary, config.latents, reference.n_modes).items():
            collected.setdefault(key, []).append(value)
        if samples:
            for site in config.latents:
                sample_store[site].append(
                    summary["samples"][site][:samples].transpose(0, 1).cpu().numpy())
            if importance:
                sample_store["weights"].append(
                    summary["weights"][:samples].T.cpu().numpy())
    frame = table.particles.copy()
    for key, parts in collected.items():
        frame[key] = np.concatenate(parts)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_star(output, frame, table.optics)
    if samples:
        arrays = {s: np.concatenate(v) for s, v in sample_store.items() if v}
        save_npz_atomically(output.with_suffix(".npz"), **arrays)
    images.close()
    return frame
