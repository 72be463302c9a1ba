"""The conformational latent: amplitudes along the reference's modes (ANM or learnt)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryosvi.io.particles import MODE_COLUMN, numeric_column
from cryosvi.latents.base import GaussianLatent

MODE_STD_COLUMN = "cryosviModeAmplitudeStd{}"


class Modes(GaussianLatent):
    """Normal-mode amplitudes (B, K), Å of RMS displacement per pseudo-atom; prior
    N(0, mode_std) per mode."""

    site, name = "enm_scale", "modes"
    model_rank, walk_rank = 0, 2
    mean_key, std_key = "modes_mean", "modes_std"
    headline = ("val_mode_r", "mode r")
    conformational = True
    simulation_weight = 4.0
    """Measured (paper preset, 265 epochs of the default training, 2 000 held-out
    particles, the guide alone; benchmarks/results/ablations.md): mode r 0.878 / 0.878 /
    0.894 and pose median 1.98 / 1.89 / 2.01 deg with weights 1 / 2 / 4 (the mode's
    loss at the end 0.98 / 0.95 / 0.82 nats). The mode's effect on the image is faint
    and nonlinear next to the pose's, and the trunk learns its features late."""
    floor = 1e-4
    difference_step = 0.01
    scalar = False

    def size(self, config) -> int:
        return config.n_modes

    def prior_loc_scale(self, priors, conditions, like):
        scale = torch.tensor(priors.mode_std, dtype=like.dtype, device=like.device)
        return torch.zeros_like(scale), scale

    def reflected(self, value: Tensor) -> Tensor:
        return -value  # the prior N(0, mode_std) is symmetric about 0

    def guide_prior(self, priors, ctf_estimates):
        return {"std": [float(s) for s in priors.mode_std]}

    def legacy_guide_prior(self, values):
        return {"std": [float(s) for s in values.get("mode_std", (2.0,))]}

    def guide_loc_scale(self, guide, conditions):
        std = guide.config.latent_priors[self.site]["std"]
        return None, torch.tensor(std, dtype=torch.float32, device=guide.device)

    def validation(self, summary, truth):
        return self._gaussian_validation("mode", summary[self.mean_key],
                                         summary[self.std_key], truth)

    def known(self, particles, config):
        columns = [MODE_COLUMN.format(k + 1) for k in range(config.n_modes)]
        particles.require(*columns)
        return torch.tensor(np.stack([particles.column(c).astype(float) for c in columns], -1),
                            dtype=torch.float32)

    def value_columns(self, value, frame, config):
        mean = value.cpu().numpy()
        return {MODE_COLUMN.format(k + 1): mean[:, k] for k in range(mean.shape[1])}

    def std_columns(self, std):
        std = std.cpu().numpy()
        return {MODE_STD_COLUMN.format(k + 1): std[:, k] for k in range(std.shape[1])}

    def output_columns(self, summary, frame, config):
        """Each mode's mean then its std (cryosviModeAmplitude1, ...Std1, 2, ...)."""
        values = self.value_columns(summary[self.mean_key], frame, config)
        stds = self.std_columns(summary[self.std_key])
        return {c: v for pair in zip(values.items(), stds.items()) for c, v in pair}

    def truth_columns(self, posterior, truth):
        in_truth = set(truth.mode_columns())
        return [(f"mode{k}", (lambda t, c=column: numeric_column(t, c)),
                 MODE_STD_COLUMN.format(k))
                for k, column in enumerate(posterior.mode_columns(), start=1)
                if column in in_truth]
