"""Posterior of every particle from a trained guide (one batched network pass), refined by
the physics likelihood (tempered SMC by default, or importance sampling), as STAR/npz.

Summaries per particle: ``cryosvi.posterior``. Refinement with the physics likelihood
(``refine``): the guide is the proposal of the generic samplers in ``cryosvi.smc``,
importance sampling (weights p(x | z) p(z) / q(z | x), self-normalised; its effective
sample size (sum w)^2 / sum w^2 is reported per particle) or adaptive tempered SMC from
the guide to the posterior (resample-move with random-walk Metropolis moves).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pyro import poutine
from tqdm.auto import tqdm

from cryosvi.guide import Guide
from cryosvi.io.atomic import save_npz_atomically
from cryosvi.io.outputs import provenance_array
from cryosvi.errors import CryosviError
from cryosvi.latents import (PAPER_SITES, Conditions, ParticleData, known_values,
                             random_walks, summary_columns)
from cryosvi.model import model
from cryosvi.posterior import posterior_summary, weighted_summary
from cryosvi.randomness import preserved_rng
from cryosvi.smc import importance_weights, tempered_smc


@torch.no_grad()
def log_joint(forward, priors, noise_std: float, images: torch.Tensor, values: dict,
              conditions: Conditions | None = None, latents=PAPER_SITES) -> torch.Tensor:
    """log p(x, z) of the model for samples ``values`` (site -> (S, B, ...)) of images
    (B, L, L) with the batch's ``conditions``; returns (S, B)."""
    n_samples, batch = next(iter(values.values())).shape[:2]
    flat = {s: v.reshape(n_samples * batch, *v.shape[2:]) for s, v in values.items()}
    tiled = images.unsqueeze(0).expand(n_samples, *images.shape).reshape(
        n_samples * batch, *images.shape[1:])
    tiled_conditions = (conditions or Conditions()).expand(n_samples)
    trace = poutine.trace(poutine.condition(model, data=flat)).get_trace(
        forward, priors, noise_std, images=tiled, conditions=tiled_conditions,
        latents=latents)
    trace.compute_log_prob()
    total = sum(node["log_prob"] for node in trace.nodes.values()
                if node["type"] == "sample")
    return total.reshape(n_samples, batch)


@torch.no_grad()
def refine(guide: Guide, forward, priors, noise_std: float, images: torch.Tensor,
           known: dict | None, n_samples: int, method: str = "smc", moves: int = 2,
           max_steps: int = 40, ess_target: float = 0.5, chunk: int = 16,
           conditions: Conditions | None = None) -> dict:
    """Refine the guide's posterior with the physics likelihood (``cryosvi.smc``).

    method 'is': self-normalised importance sampling, S proposals per particle from the
    guide, weights p(x, z) / q(z | x).

    method 'smc': adaptive tempered SMC from the guide to the posterior along
    pi_b(z) ~ q(z | x)^(1 - b) p(x, z)^b (``tempered_smc`` with each latent's random
    walk, ``cryosvi.latents.random_walks``):
    ``moves`` Metropolis moves per step, at most ``max_steps`` steps, each keeping the
    ESS at ``ess_target`` * S. The likelihood is evaluated ``chunk`` samples at a time.

    Returns the summary (same keys as ``posterior_summary``) plus 'ess' (B,): the ESS of
    plain importance sampling with the guide as proposal (the guide's quality), 'weights'
    (S, B), 'samples' and, for smc, 'steps' (B,) and 'acceptance' (B,).
    """
    if method not in ("is", "smc"):
        raise ValueError(f"unknown refinement {method!r} (is or smc)")
    known = dict(known or {})
    base = posterior_summary(guide, images, known, n_samples, conditions=conditions)
    features = base["features"]
    known_values = {s: v.unsqueeze(0).expand(n_samples, *v.shape) for s, v in known.items()}
    latents = guide.config.latents

    def log_target(samples):
        joint = {**known_values, **samples}
        parts = [log_joint(forward, priors, noise_std, images,
                           {s: v[i:i + chunk] for s, v in joint.items()}, conditions,
                           latents)
                 for i in range(0, n_samples, chunk)]
        return torch.nan_to_num(torch.cat(parts), nan=-math.inf)

    def log_proposal(samples):
        return guide.log_prob_at(features, {**known_values, **samples}, conditions)

    values, log_q = base["samples"], base["log_q"]
    log_p = log_target(values)
    weights, ess = importance_weights(log_p, log_q)
    out = dict(base)
    out["ess"] = ess
    if method == "smc":
        result = tempered_smc(values, log_target, log_proposal,
                              random_walks(latents, guide.config),
                              log_p=log_p, log_q=log_q, moves=moves, max_steps=max_steps,
                              ess_target=ess_target)
        values = result.values
        weights = torch.full_like(log_p, 1.0 / n_samples)
        out["steps"], out["acceptance"] = result.steps, result.acceptance
    out["samples"] = values
    out["weights"] = weights
    out.update(weighted_summary(values, weights))
    return out


@preserved_rng()
def infer(run: str | Path, particles: str | Path, output: str | Path, samples: int = 0,
          importance: int = 64, method: str = "smc", moves: int = 3,
          batch_size: int = 256,
          device: str = "cpu", summary_samples: int = 64,
          progress: bool = True, datadir: str | Path | None = None,
          invert: bool = False) -> pd.DataFrame:
    """Posterior of every particle of ``particles`` (STAR or cryoSPARC .cs, read by
    ``cryosvi.io.read_particles`` with ``datadir`` and ``invert``) under the trained run
    ``run``.

    Writes the STAR file ``output`` (RELION 3.1: the input's optics table, columns and row
    order, inferred columns replaced or added; an inferred defocus m keeps each particle's
    astigmatism: U = m + (U_in - V_in) / 2, V = m - (U_in - V_in) / 2, angle kept), from a
    .cs input also ``output`` with suffix .cs (the input's records, fields updated), and, with
    ``samples`` > 0, ``output`` with suffix .npz holding S posterior samples per particle
    (site -> (N, S, ...)). ``importance`` > 0 refines with that many importance samples
    per particle: ``method`` 'smc' (tempered SMC from the guide to the posterior) or 'is'
    (importance sampling with the guide as proposal); see ``refine``.
    Returns the particle table written.
    """
    from cryosvi.dataset import has_ctf_estimates, working_box, working_pixel_size
    from cryosvi.io.particles import read_particles, write_particles
    from cryosvi.rundir import load_trained, select_device

    select_device(device)
    info, reference, guide = load_trained(run, device)
    table = read_particles(particles, datadir, invert)
    config = guide.config
    box = working_box(table, config.box)
    if not math.isclose(working_pixel_size(table, box), reference.optics.pixel_size,
                        rel_tol=1e-3):
        raise CryosviError(f"{table.path}: {working_pixel_size(table, box):.4g} Å pixels at "
                           f"the run's {box} px working box, but the run was trained at "
                           f"{reference.optics.pixel_size:.4g} Å")
    if config.defocus_offset and not has_ctf_estimates(table):
        raise CryosviError(f"{table.path}: the run uses per-particle CTF estimates "
                           "(rlnDefocusU/V/Angle) and this file has none")
    data = ParticleData(table, box, config.defocus_offset)
    fixed = [s for s in config.sites if s not in config.latents]
    known = known_values(table, fixed, config)
    forward = reference.forward_model(data.groups).to(device) if importance else None
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
        batch = torch.from_numpy(data.images(index)).to(device)
        batch_known = {s: v[index].to(device) for s, v in known.items()}
        conditions = data.conditions.take(index).to(device)
        if importance:
            summary = refine(guide, forward, reference.priors, reference.noise.std, batch,
                             batch_known, importance, method=method, moves=moves,
                             conditions=conditions)
        else:
            summary = posterior_summary(guide, batch, batch_known, draws,
                                        conditions=conditions)
        rows = table.metadata.iloc[index]
        for key, value in summary_columns(summary, config.latents, rows, config).items():
            collected.setdefault(key, []).append(value)
        if samples:
            for site in config.latents:
                sample_store[site].append(
                    summary["samples"][site][:samples].transpose(0, 1).cpu().numpy())
            if importance:
                sample_store["weights"].append(
                    summary["weights"][:samples].T.cpu().numpy())
    frame = table.metadata.copy()
    for key, parts in collected.items():
        frame[key] = np.concatenate(parts)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_particles(output, table, frame, list(collected))
    if samples:
        arrays = {s: np.concatenate(v) for s, v in sample_store.items() if v}
        save_npz_atomically(output.with_suffix(".npz"), **arrays,
                            cryosvi=provenance_array("samples"))
    table.close()
    return frame
