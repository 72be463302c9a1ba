"""The losses of training: simulation-based (the forward KL from the model's joint to the
guide, on fresh draws of the model) and the ELBO on the particles (Pyro's Trace_ELBO)."""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from cryosvi.guide import Guide
from cryosvi.latents import PAPER_SITES, REGISTRY, forward_inputs
from cryosvi.model import model, sample_prior
from cryosvi.physics.conditions import Conditions
from cryosvi.reference import Reference


def simulation_batch(reference: Reference, forward, noise_std: float, batch_size: int,
                     conditions: Conditions | None = None, latents=PAPER_SITES,
                     antithetic: bool = False):
    """Fresh (latents, noisy images, conditions) from the model's prior, imaged with
    ``conditions`` (per-particle data for this batch, e.g. rows of the particles'
    metadata; returned as the images were made with them).

    antithetic: the second half of the batch are twins of the first: the latents that
    have a mirror image under their prior (``Latent.reflected``: the mode amplitudes)
    reflected, everything else (pose, defocus, conditions, noise) the same. Each image is
    still a draw from the model, so the loss keeps its expectation; the pair's difference
    is the reflected latents' effect alone (common random numbers), which the heads of
    weak latents otherwise see buried under pose and noise.
    """
    conditions = conditions or Conditions()
    twins = batch_size // 2 if antithetic else 0
    drawn = batch_size - twins
    if twins:  # the twins are imaged with their originals' conditions
        conditions = conditions.take(torch.arange(batch_size) % drawn)
    with torch.no_grad():
        values, clean = sample_prior(forward, reference.priors, drawn,
                                     conditions.take(torch.arange(drawn)) if twins
                                     else conditions, latents)
        noise = noise_std * torch.randn_like(clean)
        if twins:
            twin = {}
            for site, value in values.items():
                mirror = REGISTRY[site].reflected(value[:twins])
                twin[site] = value[:twins] if mirror is None else mirror
            twin_clean = forward(**forward_inputs(twin, conditions.take(
                torch.arange(drawn, batch_size))))
            values = {s: torch.cat([values[s], twin[s]]) for s in values}
            clean = torch.cat([clean, twin_clean])
            noise = torch.cat([noise, noise[:twins]])
    return values, clean + noise, conditions


def simulation_loss(guide: Guide, latents: dict, images, sites,
                    conditions: Conditions | None = None) -> tuple[torch.Tensor, dict]:
    """Forward-KL loss -E log q(z_true | x) over ``sites``, each term times its latent's
    ``simulation_weight``; also the per-site terms (unweighted)."""
    log_q = guide.log_prob(images, latents, conditions)
    terms = {s: -log_q[s].mean() for s in sites}
    loss = sum(REGISTRY[s].simulation_weight * term for s, term in terms.items())
    return loss, {s: float(v.detach()) for s, v in terms.items()}


def elbo_loss(guide: Guide, forward, priors, noise_std: float, images, known: dict,
              n_particles: int, conditions: Conditions | None = None) -> torch.Tensor:
    """-ELBO per particle of a mini-batch (Trace_ELBO, subsampled plate)."""
    conditioned = poutine.condition(model, data=known) if known else model
    loss = Trace_ELBO().differentiable_loss(
        conditioned, guide.pyro_guide(known, register=False), forward, priors, noise_std,
        images=images, n_particles=n_particles, conditions=conditions,
        latents=guide.config.latents)
    return loss / n_particles
