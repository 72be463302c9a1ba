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
from cryosvi.physics.noise import NoiseModel
from cryosvi.reference import Reference


def simulation_batch(reference: Reference, forward, noise_std: float | NoiseModel,
                     batch_size: int,
                     conditions: Conditions | None = None, latents=PAPER_SITES,
                     antithetic: bool = False, rows: slice | None = None):
    """Fresh (latents, noisy images, conditions) from the model's prior, imaged with
    ``conditions`` (per-particle data for this batch, e.g. rows of the particles'
    metadata; returned as the images were made with them).

    antithetic: the second half of the batch are twins of the first: the latents that
    have a mirror image under their prior (``Latent.reflected``: the mode amplitudes)
    reflected, everything else (pose, defocus, conditions, noise) the same. Each image is
    still a draw from the model, so the loss keeps its expectation; the pair's difference
    is the reflected latents' effect alone (common random numbers), which the heads of
    weak latents otherwise see buried under pose and noise.

    rows: the rows of the batch to return (default all), e.g. one process's share of a
    data-parallel batch. Every random number of the whole batch is drawn all the same,
    so the rows are those of the whole batch; the forward model runs for them alone.

    The latents and the noise are drawn on the CPU from torch's global stream (latents
    in the model's order, then the noise of the drawn images), then moved to the forward
    model's device: a batch is the same on the CPU and on CUDA.

    noise_std: the white noise's std, or the run's ``NoiseModel``: then each image is a
    contrast from its prior times the clean image plus coloured noise of its optics
    group's spectrum (``NoiseModel.sample``; the contrasts, then the white pixels it
    filters, drawn after the latents; the twins share their originals').
    """
    conditions = conditions or Conditions()
    twins = batch_size // 2 if antithetic else 0
    drawn = batch_size - twins
    rows = rows or slice(0, batch_size)
    device = forward.coords.device
    if twins:  # the twins are imaged with their originals' conditions
        conditions = conditions.take(torch.arange(batch_size) % drawn)
    with torch.no_grad():
        first = conditions.take(torch.arange(drawn)) if twins else conditions
        values, _ = sample_prior(_Unimaged(forward.coords), reference.priors, drawn,
                                 first.to("cpu"), latents)
        box = forward.optics.box
        coloured = isinstance(noise_std, NoiseModel)
        if coloured:
            contrast = noise_std.draw_contrast((drawn,))
            noise = torch.randn(drawn, box, box, dtype=forward.coords.dtype)
        else:
            noise = noise_std * torch.randn(drawn, box, box, dtype=forward.coords.dtype)
        if twins:
            twin = {}
            for site, value in values.items():
                mirror = REGISTRY[site].reflected(value[:twins])
                twin[site] = value[:twins] if mirror is None else mirror
            values = {s: torch.cat([values[s], twin[s]]) for s in values}
        values = {s: v[rows].to(device) for s, v in values.items()}
        conditions = conditions.take(torch.arange(batch_size)[rows])
        # the drawn images and their twins apart, as one process images them
        parts = [range(rows.start, min(rows.stop, drawn)),
                 range(max(rows.start, drawn), rows.stop)]
        clean = torch.cat([forward(**forward_inputs(
            {s: v[part.start - rows.start:part.stop - rows.start] for s, v in values.items()},
            conditions.take(torch.arange(part.start - rows.start, part.stop - rows.start))))
            for part in parts if len(part)])
        which = torch.arange(rows.start, rows.stop) % drawn
        if coloured:
            ctf = conditions.ctf
            group = None if ctf is None or ctf.group is None else ctf.group.to(device)
            images = noise_std.to(device).sample(clean, group, white=noise[which].to(device),
                                                 contrast=contrast[which].to(device))
        else:
            images = clean + noise[which].to(device)
    return values, images, conditions


class _Unimaged:
    """What ``sample_prior`` needs of a forward model to draw latents from the prior
    without imaging them: ``coords``, whose dtype the priors take, on the CPU."""

    def __init__(self, coords: torch.Tensor):
        self.coords = torch.zeros((), dtype=coords.dtype)

    def __call__(self, **inputs):
        return None


def simulation_loss(guide: Guide, latents: dict, images, sites,
                    conditions: Conditions | None = None) -> tuple[torch.Tensor, dict]:
    """Forward-KL loss -E log q(z_true | x) over ``sites``, each term times its latent's
    ``simulation_weight``; also the per-site terms (unweighted)."""
    log_q = guide.log_prob(images, latents, conditions)
    terms = {s: -log_q[s].mean() for s in sites}
    loss = sum(REGISTRY[s].simulation_weight * term for s, term in terms.items())
    return loss, {s: float(v.detach()) for s, v in terms.items()}


def elbo_loss(guide: Guide, forward, priors, noise_std: float | NoiseModel, images,
              known: dict,
              n_particles: int, conditions: Conditions | None = None) -> torch.Tensor:
    """-ELBO per particle of a mini-batch (Trace_ELBO, subsampled plate); ``noise_std``:
    the white noise's std or the run's ``NoiseModel`` (``cryosvi.model``)."""
    conditioned = poutine.condition(model, data=known) if known else model
    loss = Trace_ELBO().differentiable_loss(
        conditioned, guide.pyro_guide(known, register=False), forward, priors, noise_std,
        images=images, n_particles=n_particles, conditions=conditions,
        latents=guide.config.latents)
    return loss / n_particles
