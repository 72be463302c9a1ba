"""The in-plane shift latent (RELION's origin), inferred on request."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from cryosvi.io.particles import ORIGINS, numeric_column, origins
from cryosvi.latents.base import GaussianLatent


class Shifts(GaussianLatent):
    """In-plane shifts (B, 2) Å, RELION's (rlnOriginXAngst, rlnOriginYAngst): the image
    is the centred projection translated by -shifts (``cryosvi.physics.shifts``). Prior N(file
    value or 0, shift_std) per axis. A site only when inferred; otherwise the file's
    shifts (``Conditions.shifts``) are applied as they are."""

    site, name = "shifts", "shifts"
    always = False
    model_rank, walk_rank = 3, 3
    mean_key, std_key = "shifts_mean", "shifts_std"
    headline = ("val_shifts_rmse", "shift RMSE Å")
    floor = 0.01
    difference_step = 0.01
    scalar = False

    def size(self, config) -> int:
        return 2

    def prior_loc_scale(self, priors, conditions, like):
        scale = torch.tensor(priors.shift_std, dtype=like.dtype, device=like.device)
        loc = like.new_zeros(2) if conditions.shifts is None else conditions.shifts.to(
            like.dtype)
        return loc, scale

    def guide_prior(self, priors, ctf_estimates):
        return {"std": float(priors.shift_std)}

    def legacy_guide_prior(self, values):
        return {"std": float(values.get("shift_std", 2.0))}

    def guide_loc_scale(self, guide, conditions):
        return conditions.shifts, guide.config.latent_priors[self.site]["std"]

    def forward_value(self, values, conditions):
        return values.get(self.site, conditions.shifts)

    def turned(self, value, turns):
        from cryosvi.physics.rotations import quarter_turn_shifts

        return quarter_turn_shifts(value, turns)

    def turned_back(self, q, turns):
        """The mean turned back, the per-axis stds swapped by an odd number of turns."""
        from cryosvi.physics.rotations import quarter_turn_shifts

        normal = q.base_dist
        scale = normal.scale.flip(-1) if turns % 2 else normal.scale
        return dist.Normal(quarter_turn_shifts(normal.loc, -turns), scale).to_event(1)

    def validation(self, summary, truth):
        error = (summary[self.mean_key] - truth).square().sum(-1).mean().sqrt()
        return {"val_shifts_rmse": float(error)}

    def known(self, particles, config):
        return torch.from_numpy(origins(particles))

    def value_columns(self, value, frame, config):
        mean = value.cpu().numpy().astype(float)
        return {"rlnOriginXAngst": mean[:, 0], "rlnOriginYAngst": mean[:, 1]}

    def std_columns(self, std):
        std = std.cpu().numpy()
        return {"cryosviOriginXStd": std[:, 0], "cryosviOriginYStd": std[:, 1]}

    def truth_columns(self, posterior, truth):
        std = {"rlnOriginXAngst": "cryosviOriginXStd", "rlnOriginYAngst": "cryosviOriginYStd"}
        # Scored only where the posterior inferred them (every file has origins, 0 by
        # default).
        return [(f"shift_{column[9].lower()}", (lambda t, c=column: numeric_column(t, c)),
                 std[column]) for column in ORIGINS
                if std[column] in posterior.metadata.columns and column in truth.metadata]
