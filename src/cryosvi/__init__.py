"""cryosvi: physics-aware Bayesian inference of pose, defocus and conformation in cryo-EM."""

__version__ = "0.1.0"
