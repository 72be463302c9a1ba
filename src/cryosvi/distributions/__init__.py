"""Distributions and Markov kernels on the latents' spaces, torch and Pyro only (nothing
here knows about cryo-EM): the projected normal family on spheres (the pose), weighted
samples' moments, and symmetric random-walk proposals (the SMC's moves); and the
measurement of images through a ``cryosvi.physics.noise.NoiseModel`` or white noise."""

from cryosvi.distributions.measurement import Measurement, WhiteNoise
from cryosvi.distributions.normaliser import log_projected_normal_normaliser
from cryosvi.distributions.projected_normal import (AntipodalProjectedNormal, ProjectedNormal,
                                                    ProjectedNormalMixture, pose_distribution,
                                                    projected_normal_log_density)
from cryosvi.distributions.random_walk import (RandomWalk, gaussian_step, sum_over_samples,
                                               weighted_moments)

__all__ = [
    "Measurement",
    "WhiteNoise",
    "ProjectedNormal",
    "AntipodalProjectedNormal",
    "ProjectedNormalMixture",
    "pose_distribution",
    "log_projected_normal_normaliser",
    "projected_normal_log_density",
    "RandomWalk",
    "gaussian_step",
    "sum_over_samples",
    "weighted_moments",
]
