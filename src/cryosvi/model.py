"""The generative model of particle images as a Pyro program (no trainable parameters).

For each particle i, inside ``pyro.plate("particles")``, one site per latent of
``cryosvi.latents`` (priors there):

    enm_scale  alpha_i ~ Normal(0, mode_std)                 (B, K) Å RMS per atom
    rotation   q_i     ~ ProjectedNormal(kappa * mean)       (B, 4) unit quaternion
                         (kappa = 0: uniform on SO(3))
    defocus    z_i     ~ Normal(defocus_mean, defocus_std)   (B,) Å; with CTF estimates
                         an offset dz ~ Normal(0, defocus_offset_std) around U and V
    shifts     s_i     ~ Normal(file's or 0, shift_std)      (B, 2) Å, only when inferred
    measurement Y_i    ~ Normal(scale * forward(...) + offset, noise_std)   (B, L, L)
                         (``WhiteNoise``: the same density, summed per image)
                         or, given a NoiseModel, Measurement(forward(...), group, noise)

``scale`` and ``offset`` are the data set's gray levels (``Imaging``, applied by the
forward model). With a ``cryosvi.physics.noise.NoiseModel`` instead of a noise std, the
measurement is coloured Gaussian noise of each particle's optics group (its CTF's
``group``, else 0) with the offset and a per-particle contrast integrated out
(``cryosvi.distributions.Measurement``). Simulation runs this same program from its
prior (``noise_std = 0`` makes the measurement the clean image, so noise can be scaled to
a data-set SNR afterwards).
"""

from __future__ import annotations

import pyro
from pyro import poutine
from torch import Tensor

from cryosvi.config import Priors
from cryosvi.distributions.measurement import Measurement, WhiteNoise
from cryosvi.latents import PAPER_SITES, forward_inputs, model_sites
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.noise import NoiseModel

SITES = tuple(latent.site for latent in model_sites())
"""The sites of every model (the paper's latents), in the model's sampling order."""


def model(forward: ForwardModel, priors: Priors, noise_std: float | NoiseModel,
          images: Tensor | None = None, batch_size: int | None = None,
          n_particles: int | None = None, conditions: Conditions | None = None,
          latents=PAPER_SITES) -> Tensor:
    """Sample (or score) a batch of particles; returns the clean images (B, L, L).

    images: observed (B, L, L) or None to simulate ``batch_size`` particles.
    n_particles: size of the whole data set when ``images`` is a mini-batch, so the
    ELBO is scaled to the full data set (Pyro's plate subsampling).
    noise_std: std of the white Gaussian noise; 0 leaves out the measurement site (the
    simulator adds noise afterwards, scaled to the data set's signal variance); or a
    ``NoiseModel`` at the images' box (see the module notes).
    conditions: the batch's per-particle CTF estimates and known shifts (None: the
    paper's model). latents: the inferred sites; latents that are not ``always`` sites
    (shifts) are sites only when listed.
    """
    conditions = conditions or Conditions()
    batch = images.shape[0] if images is not None else batch_size
    like = forward.coords
    values = {}
    with pyro.plate("particles", n_particles or batch, subsample_size=batch):
        for latent in model_sites(latents):
            values[latent.site] = pyro.sample(latent.site,
                                              latent.prior(priors, conditions, like))
        clean = forward(**forward_inputs(values, conditions))
        if isinstance(noise_std, NoiseModel):
            group = None if conditions.ctf is None else conditions.ctf.group
            pyro.sample("measurement", Measurement(clean, group, noise_std), obs=images)
        elif noise_std > 0:
            pyro.sample("measurement", WhiteNoise(clean, noise_std), obs=images)
    return clean


def sample_prior(forward: ForwardModel, priors: Priors, batch_size: int,
                 conditions: Conditions | None = None, latents=PAPER_SITES,
                 given: dict | None = None) -> tuple[dict, Tensor]:
    """One noise-free draw of ``batch_size`` particles imaged with ``conditions``:
    (latents by site (B, ...), clean images (B, L, L)); ``latents``: the inferred sites
    (see ``model``). ``given``: values (B, ...) of some sites to use instead of prior
    draws (e.g. each latent's ``implied_value``)."""
    program = poutine.condition(model, given) if given else model
    trace = poutine.trace(program).get_trace(forward, priors, 0.0, batch_size=batch_size,
                                             conditions=conditions, latents=latents)
    values = {latent.site: trace.nodes[latent.site]["value"]
              for latent in model_sites(latents)}
    return values, trace.nodes["_RETURN"]["value"]
