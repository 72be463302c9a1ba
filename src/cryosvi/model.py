"""The generative model of particle images as a Pyro program (no trainable parameters).

For each particle i, inside ``pyro.plate("particles")``:

    enm_scale  alpha_i ~ Normal(0, mode_std)                 (B, K) Å RMS per atom
    rotation   q_i     ~ ProjectedNormal(kappa * mean)       (B, 4) unit quaternion
                         (kappa = 0: uniform on SO(3))
    defocus    z_i     ~ Normal(defocus_mean, defocus_std)   (B,) Å
    measurement Y_i    ~ Normal(forward(alpha_i, q_i, z_i), noise_std)   (B, L, L)

Simulation runs this same program from its prior (``noise_std = 0`` makes the
measurement the clean image, so noise can be scaled to a data-set SNR afterwards).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from cryosvi.config import Priors
from cryosvi.distributions import ProjectedNormal
from cryosvi.forward import ForwardModel

SITES = ("enm_scale", "rotation", "defocus")
"""Latent site names, shared with the guide."""


def rotation_prior(priors: Priors, like: Tensor) -> ProjectedNormal:
    """ProjectedNormal over unit quaternions; concentration 0 is uniform on SO(3)."""
    mean = torch.tensor(priors.rotation_mean, dtype=like.dtype, device=like.device)
    return ProjectedNormal(priors.rotation_concentration * mean / mean.norm())


def model(forward: ForwardModel, priors: Priors, noise_std: float,
          images: Tensor | None = None, batch_size: int | None = None,
          n_particles: int | None = None) -> Tensor:
    """Sample (or score) a batch of particles; returns the clean images (B, L, L).

    images: observed (B, L, L) or None to simulate ``batch_size`` particles.
    n_particles: size of the whole data set when ``images`` is a mini-batch, so the
    ELBO is scaled to the full data set (Pyro's plate subsampling).
    noise_std: std of the white Gaussian noise; 0 leaves out the measurement site (the
    simulator adds noise afterwards, scaled to the data set's signal variance).
    """
    batch = images.shape[0] if images is not None else batch_size
    like = forward.coords
    mode_std = torch.tensor(priors.mode_std, dtype=like.dtype, device=like.device)
    with pyro.plate("particles", n_particles or batch, subsample_size=batch):
        enm_scale = pyro.sample("enm_scale", dist.Normal(torch.zeros_like(mode_std), mode_std)
                                .to_event(1))
        rotation = pyro.sample("rotation", rotation_prior(priors, like))
        defocus = pyro.sample("defocus", dist.Normal(
            torch.tensor(priors.defocus_mean, dtype=like.dtype, device=like.device),
            torch.tensor(priors.defocus_std, dtype=like.dtype, device=like.device)))
        clean = forward(enm_scale, rotation, defocus)
        if noise_std > 0:
            pyro.sample("measurement", dist.Normal(clean, noise_std).to_event(2), obs=images)
    return clean
