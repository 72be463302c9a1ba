"""The defocus latent: the particle's defocus, or an offset around its CTF estimate."""

from __future__ import annotations

import numpy as np
import torch

from cryosvi.io.particles import mean_defocus
from cryosvi.latents.base import GaussianLatent, _column


class Defocus(GaussianLatent):
    """Defocus, Å (B,). Without per-particle CTF estimates the particle's defocus (U = V,
    no astigmatism), prior N(defocus_mean, defocus_std) of the data set; with them an
    offset dz added to the particle's U and V (angle kept), prior N(0,
    defocus_offset_std)."""

    site, name = "defocus", "defocus"
    model_rank, walk_rank = 2, 1
    mean_key, std_key = "defocus_mean", "defocus_std"
    headline = ("val_defocus_r", "defocus r")
    floor = 0.1
    difference_step = 1.0
    sets_ctf = True
    truth_label = "rlnDefocusU"

    def prior_loc_scale(self, priors, conditions, like):
        if conditions.ctf is not None:
            return (like.new_zeros(()),
                    torch.tensor(priors.defocus_offset_std, dtype=like.dtype,
                                 device=like.device))
        return (torch.tensor(priors.defocus_mean, dtype=like.dtype, device=like.device),
                torch.tensor(priors.defocus_std, dtype=like.dtype, device=like.device))

    def implied_value(self, conditions, count, like):
        """With per-particle CTFs the drawn CTF holds the defocus: the offset is 0."""
        return None if conditions.ctf is None else like.new_zeros(count)

    def guide_prior(self, priors, ctf_estimates):
        """An offset's N(0, defocus_offset_std) with CTF estimates, else the data set's
        N(defocus_mean, defocus_std)."""
        if ctf_estimates:
            return {"mean": 0.0, "std": float(priors.defocus_offset_std)}
        return {"mean": float(priors.defocus_mean), "std": float(priors.defocus_std)}

    def legacy_guide_prior(self, values):
        if "defocus_mean" in values and "defocus_std" in values:
            return {"mean": float(values["defocus_mean"]), "std": float(values["defocus_std"])}
        return None

    def guide_loc_scale(self, guide, conditions):
        # The run's GuideConfig holds the prior of this run's data (an offset's N(0, s)
        # when the particles have CTF estimates), so the head needs no conditions.
        prior = guide.config.latent_priors[self.site]
        return prior["mean"], prior["std"]

    def validation(self, summary, truth):
        return self._gaussian_validation("defocus", summary[self.mean_key],
                                         summary[self.std_key], truth)

    def known(self, particles, config):
        if config.ctf_estimates:
            return torch.zeros(len(particles))  # the file's estimate as it is
        particles.require("rlnDefocusU")
        return torch.tensor(mean_defocus(particles), dtype=torch.float32)

    def value_columns(self, value, frame, config):
        """U, V: the input's astigmatism kept around the value (an offset dz: U + dz,
        V + dz; a defocus m: m +- (U_in - V_in) / 2), the angle kept (0 without one)."""
        mean = value.cpu().numpy().astype(float)
        if frame is not None and "rlnDefocusU" in frame:
            u, v = _column(frame, "rlnDefocusU"), _column(frame, "rlnDefocusV")
            angle = _column(frame, "rlnDefocusAngle")
        else:
            u = v = angle = np.zeros_like(mean)
        if config is not None and config.ctf_estimates:
            new_u, new_v = u + mean, v + mean
        else:
            half = (u - v) / 2
            new_u, new_v = mean + half, mean - half
        return {"rlnDefocusU": new_u, "rlnDefocusV": new_v, "rlnDefocusAngle": angle}

    def std_columns(self, std):
        return {"cryosviDefocusStd": std.cpu().numpy()}

    def truth_columns(self, posterior, truth):
        if not all("rlnDefocusU" in t.metadata.columns for t in (posterior, truth)):
            return []
        return [("defocus", mean_defocus, "cryosviDefocusStd")]
