"""The validation of training: a fixed simulated set drawn once per run, and the guide's
loss and point-estimate accuracy on it after each epoch."""

from __future__ import annotations

import torch

from cryosvi.guide import Guide
from cryosvi.latents import PAPER_SITES, REGISTRY
from cryosvi.physics.conditions import Conditions
from cryosvi.posterior import posterior_summary
from cryosvi.reference import Reference
from cryosvi.training.objectives import simulation_batch

VALIDATION_SIZE = 512


def validation_set(reference: Reference, forward, noise_std: float, seed: int, n: int,
                   conditions: Conditions | None = None, latents=PAPER_SITES):
    """A fixed simulated set for monitoring, drawn without touching the global RNG."""
    devices = [forward.coords.device] if forward.coords.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7_919)
        values, images, _ = simulation_batch(reference, forward, noise_std, n, conditions,
                                             latents)
        return values, images


def validation_metrics(guide: Guide, latents: dict, images, known_sites,
                       conditions: Conditions | None = None) -> dict:
    """Loss and point-estimate accuracy (each latent's ``validation``) on the simulated
    validation set."""
    was_training = guide.training
    guide.eval()
    out = {}
    with torch.no_grad():
        log_q = guide.log_prob(images, latents, conditions)
        out["val_loss"] = float(-sum(v.mean() for v in log_q.values()))
        known = {s: latents[s] for s in known_sites}
        summary = posterior_summary(guide, images, known, n_samples=32,
                                    conditions=conditions)
    for site in guide.config.latents:
        out.update(REGISTRY[site].validation(summary, latents[site]))
    guide.train(was_training)
    return out
