"""Every latent of the model, defined once.

A latent is a small object in the ordered registry ``REGISTRY`` (site -> ``Latent``),
which the model, the guide, training, inference, posterior summaries, evaluation,
simulation and the command line walk; nothing outside this module branches on a
latent's name or keeps a latent's settings. Each one states:

* its Pyro ``site`` and command-line ``name`` (``--latents``, schedule ``train`` lists,
  log keys), whether it is a site of every model (``always``) or only when inferred;
* its prior, from :class:`cryosvi.config.Priors` and the batch's
  :class:`cryosvi.physics.conditions.Conditions` (per-particle data: CTF estimates,
  known shifts), and the numbers of it the guide's outputs are relative to
  (``guide_prior``, stored in the run's ``GuideConfig.latent_priors``);
* its guide head: output size, the distribution from the network outputs relative to
  the prior (an untrained guide is the prior), and the standardised features that later
  heads are conditioned on (and their width);
* its SMC random walk (``cryosvi.distributions.RandomWalk``: dimension, population
  width, floor);
* its chart for the Gauss-Newton / Laplace refinement (``cryosvi.inference.laplace``): local
  coordinates (``retract``), the base measure's volume in them, a difference step;
* its posterior summary (mean / std keys, from the guide or from weighted samples);
* its STAR columns: the known values read from the metadata when it is fixed, the
  output columns of ``cryosvi infer``, the truth columns ``cryosvi evaluate`` scores
  (as scalars, or by the size of the error: the pose);
* in a simulation, the value the acquisition implies (``implied_value``).

The registry is in the guide's sampling order (defocus -> shifts -> pose ->
conformation); ``model_rank`` and ``walk_rank`` keep the model's and the SMC moves' own
orders, which fix the sequence of random draws (same seed, same numbers as before the
registry existed).

Adding a latent: a module here with its class, its entry in ``REGISTRY`` and its tests;
a latent with new physics also needs its argument in ``ForwardModel.forward``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryosvi.distributions import RandomWalk
from cryosvi.errors import CryosviError
from cryosvi.latents.base import CREDIBLE_LEVELS, ErrorScore, GaussianLatent, Latent
from cryosvi.latents.defocus import Defocus
from cryosvi.latents.modes import MODE_STD_COLUMN, Modes
from cryosvi.latents.pose import POSE_STD_COLUMN, Pose, pose_radius_column
from cryosvi.latents.shifts import Shifts
from cryosvi.physics.conditions import Conditions

__all__ = ["CREDIBLE_LEVELS", "JUNK_COLUMN", "MODE_STD_COLUMN", "POSE_STD_COLUMN", "BY_NAME",
           "ORDER", "PAPER_SITES", "REGISTRY", "Chart", "Defocus", "ErrorScore", "GaussianLatent",
           "Latent", "Modes", "Pose", "Shifts", "forward_inputs", "guide_priors",
           "known_values", "legacy_guide_priors", "model_sites", "names", "parse_latents",
           "pose_radius_column", "random_walks", "summary_columns"]


REGISTRY: dict[str, Latent] = {latent.site: latent for latent in
                               (Defocus(), Shifts(), Pose(), Modes())}
"""Every latent by site, in the guide's sampling order."""

ORDER = tuple(REGISTRY)
"""Sites in the guide's sampling order."""
PAPER_SITES = tuple(s for s in ORDER if REGISTRY[s].always)
"""The sites of every model (the paper's latents), in the guide's order."""
BY_NAME = {latent.name: latent for latent in REGISTRY.values()}
"""Command-line name -> latent."""


def model_sites(latents=()) -> list[Latent]:
    """The model's sites, in its sampling order: every ``always`` latent, and the others
    that ``latents`` (inferred sites) lists."""
    chosen = [latent for latent in REGISTRY.values()
              if latent.always or latent.site in latents]
    return sorted(chosen, key=lambda latent: latent.model_rank)


def forward_inputs(values: dict, conditions: Conditions) -> dict:
    """The keyword arguments of ``ForwardModel.forward`` for latent values (site ->
    (B, ...)) and the batch's conditions."""
    inputs = {latent.site: latent.forward_value(values, conditions)
              for latent in REGISTRY.values()}
    inputs["ctf"] = conditions.ctf
    return inputs


def random_walks(latents, config) -> dict[str, RandomWalk]:
    """The SMC moves of the inferred ``latents``, in their fixed order (which fixes the
    order of the random draws)."""
    chosen = sorted((REGISTRY[s] for s in latents), key=lambda latent: latent.walk_rank)
    return {latent.site: latent.random_walk(config) for latent in chosen}


class Chart:
    """Local coordinates of the inferred ``latents`` (``cryosvi.inference.laplace``): each latent's
    chart, concatenated in the guide's order; values are dicts site -> (..., B, ...)."""

    def __init__(self, latents, config):
        self.latents = [REGISTRY[s] for s in ORDER if s in latents]
        self.dims = [latent.chart_dim(config) for latent in self.latents]
        self.dim = sum(self.dims)

    def steps(self, like: Tensor) -> Tensor:
        """(d,) finite-difference steps, in the dtype and device of ``like``."""
        return torch.tensor([latent.difference_step for latent, d in
                             zip(self.latents, self.dims) for _ in range(d)],
                            dtype=like.dtype, device=like.device)

    def _split(self, delta: Tensor) -> list[Tensor]:
        return list(delta.split(self.dims, dim=-1))

    def retract(self, values: dict, delta: Tensor) -> dict:
        """``values`` moved by delta (..., B, d); sites outside the chart unchanged."""
        moved = dict(values)
        for latent, part in zip(self.latents, self._split(delta)):
            moved[latent.site] = latent.retract(values[latent.site], part)
        return moved

    def log_volume(self, delta: Tensor) -> Tensor:
        """(..., B): the sum of the latents' ``log_volume``."""
        return sum(latent.log_volume(part) for latent, part in
                   zip(self.latents, self._split(delta)))


def parse_latents(text: str) -> tuple[str, ...]:
    """'pose,defocus,modes' -> the sites in sampling order; ValueError if unknown."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise ValueError(f"unknown latent(s) {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(BY_NAME)}")
    sites = {BY_NAME[n].site for n in names}
    return tuple(s for s in ORDER if s in sites)


def names(sites) -> list[str]:
    """Command-line names of ``sites``."""
    return [REGISTRY[s].name for s in sites]


def known_values(particles, sites, config) -> dict[str, Tensor]:
    """Values of the fixed ``sites`` for every particle, from the metadata (each
    latent's ``known``); CryosviError for non-finite ones."""
    out = {}
    for site in sites:
        out[site] = REGISTRY[site].known(particles, config)
        if not torch.isfinite(out[site]).all():
            raise CryosviError(f"{particles.path}: non-finite values in the "
                               f"{REGISTRY[site].name} columns")
    return out


JUNK_COLUMN = "cryosviJunkProbability"
"""The posterior probability that a particle's image holds no molecule of the run's
kind (``cryosvi.inference.junk``): every posterior STAR of ``cryosvi infer`` has it."""


def summary_columns(summary: dict, latents, frame, config) -> dict[str, np.ndarray]:
    """STAR columns of the inferred ``latents`` from a summary, plus cryosviESS and
    cryosviRefinedBySMC (1: the Laplace refinement handed the particle to the SMC) when
    the summary has them."""
    columns = {}
    for site in latents:
        columns.update(REGISTRY[site].output_columns(summary, frame, config))
    if "ess" in summary:
        columns["cryosviESS"] = summary["ess"].cpu().numpy()
    if "smc_fallback" in summary:
        columns["cryosviRefinedBySMC"] = summary["smc_fallback"].cpu().numpy().astype(int)
    return columns


def guide_priors(priors, ctf_estimates: bool) -> dict[str, dict]:
    """Each latent's ``guide_prior`` by site: what ``GuideConfig.latent_priors`` holds."""
    return {site: latent.guide_prior(priors, ctf_estimates)
            for site, latent in REGISTRY.items()}


def legacy_guide_priors(values: dict) -> dict[str, dict]:
    """``guide_priors`` from the per-latent fields of an older run.json's guide settings
    (each latent's ``legacy_guide_prior``; latents with none are left out)."""
    return {site: prior for site, latent in REGISTRY.items()
            if (prior := latent.legacy_guide_prior(values)) is not None}
