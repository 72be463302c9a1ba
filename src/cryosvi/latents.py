"""Every latent of the model, defined once.

A latent is a small object in the ordered registry ``REGISTRY`` (site -> ``Latent``),
which the model, the guide, training, inference, posterior summaries, evaluation,
simulation and the command line walk; nothing outside this module branches on a
latent's name. Each one states:

* its Pyro ``site`` and command-line ``name`` (``--latents``, schedule ``train`` lists,
  log keys), whether it is a site of every model (``always``) or only when inferred;
* its prior, from :class:`cryosvi.config.Priors` and the batch's :class:`Conditions`
  (per-particle data: CTF estimates, known shifts);
* its guide head: output size, the distribution from the network outputs relative to
  the prior (an untrained guide is the prior), and the standardised features that later
  heads are conditioned on (and their width);
* its SMC random walk (``cryosvi.smc.RandomWalk``: dimension, population width, floor);
* its chart for the Gauss-Newton / Laplace refinement (``cryosvi.laplace``): local
  coordinates (``retract``), the base measure's volume in them, a difference step;
* its posterior summary (mean / std keys, from the guide or from weighted samples);
* its STAR columns: the known values read from the metadata when it is fixed, the
  output columns of ``cryosvi infer``, the truth columns ``cryosvi evaluate`` scores.

The registry is in the guide's sampling order (defocus -> shifts -> pose ->
conformation); ``model_rank`` and ``walk_rank`` keep the model's and the SMC moves' own
orders, which fix the sequence of random draws (same seed, same numbers as before the
registry existed).

Adding a latent: a class here, its argument in ``ForwardModel.forward`` when it changes
the image, and its option in ``cryosvi simulate`` if data sets should carry it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor

from cryosvi.errors import CryosviError
from cryosvi.io.particles import ANGLES, MODE_COLUMN, ORIGINS
from cryosvi.smc import RandomWalk, weighted_moments

SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(SOFTPLUS_ONE) == 1
MAX_LOG_CONCENTRATION = 12.0
MIN_CONCENTRATION = 1.0
"""Floor of each pose component's concentration. The antipodal density is even in the
concentration vector, so c = 0 is a stationary point where the direction gets no
gradient; measured: without a floor the simulation-trained pose encoder collapsed to
c = 0 (uniform) within the first epoch."""

MODE_STD_COLUMN = "cryosviModeAmplitudeStd{}"
CREDIBLE_LEVELS = (0.68, 0.95)
"""The credible levels of the pose's credible-ball radius columns (``Pose``), which are
also ``cryosvi evaluate``'s headline coverages."""
POSE_RADIUS_COLUMN = "cryosviPoseRadius{}Deg"
"""STAR column of the pose's credible-ball radius at a level, by its percentage."""


def pose_radius_column(level: float) -> str:
    """The STAR column of the pose's credible radius at ``level`` (0.95 ->
    cryosviPoseRadius95Deg)."""
    return POSE_RADIUS_COLUMN.format(round(100 * level))


class Conditions(NamedTuple):
    """What a batch of particles is imaged with besides its latents, per particle.

    ctf: a :class:`cryosvi.ctf.ParticleCTF` of (B,) tensors (the file's CTF estimates
    and optics group) or None (the data-set defocus prior, one optics group, no
    astigmatism: the paper's model). shifts: (B, 2) Å, the file's
    (rlnOriginXAngst, rlnOriginYAngst), or None (centred particles).
    """

    ctf: object = None
    shifts: Tensor | None = None

    def take(self, rows) -> "Conditions":
        """The particles ``rows`` (an index array or tensor) of every field."""
        rows = torch.as_tensor(np.asarray(rows)) if not torch.is_tensor(rows) else rows
        return Conditions(None if self.ctf is None else self.ctf.take(rows.to(
                              self.ctf.defocus_u.device)),
                          None if self.shifts is None else self.shifts[rows.to(
                              self.shifts.device)])

    def to(self, device) -> "Conditions":
        return Conditions(None if self.ctf is None else self.ctf.to(device),
                          None if self.shifts is None else self.shifts.to(device))

    def expand(self, n_samples: int) -> "Conditions":
        """Each particle's conditions repeated for S samples, (S * B,) in (S, B) order."""
        def tile(t):
            return None if t is None else t.repeat(n_samples, *([1] * (t.dim() - 1)))
        ctf = None if self.ctf is None else type(self.ctf)(*(tile(t) for t in self.ctf))
        return Conditions(ctf, tile(self.shifts))

    def quarter_turned(self, turns: int) -> "Conditions":
        """The conditions of the particles' images turned by ``turns`` quarter turns
        (``rotations.quarter_turn_images``): the shifts turned with them. The CTF is kept:
        the guide's heads see only its mean defocus, which a turn leaves alone."""
        if not turns or self.shifts is None:
            return self
        from cryosvi.rotations import quarter_turn_shifts

        return self._replace(shifts=quarter_turn_shifts(self.shifts, turns))

    def defocus_estimate(self) -> Tensor | None:
        """(B,) Å: each particle's mean defocus estimate (U + V) / 2, or None."""
        if self.ctf is None:
            return None
        return (self.ctf.defocus_u + self.ctf.defocus_v) / 2


class ParticleData:
    """The particles as the model sees them: images Fourier-cropped to the working box
    ``box`` (``cryosvi.dataset.working_images``) and every particle's ``Conditions``:
    the file's CTF estimates when ``ctf_estimates`` (else None: the data-set defocus
    prior) and the file's shifts when it has any. ``groups``: the ``OpticsGroups`` at
    the working pixel size (None without CTF estimates)."""

    def __init__(self, particles, box: int, ctf_estimates: bool):
        from cryosvi import dataset

        self.particles, self.box = particles, int(box)
        ctf, self.groups = None, None
        if ctf_estimates:
            ctf = dataset.particle_ctf(particles)
            self.groups = dataset.optics_groups(
                particles, dataset.working_pixel_size(particles, self.box))
        shifts = dataset.known_shifts(particles) if dataset.has_shifts(particles) else None
        self.conditions = Conditions(ctf, shifts)

    def __len__(self) -> int:
        return len(self.particles)

    def images(self, indices) -> np.ndarray:
        """float32 (k, box, box) images of the rows ``indices`` at the working box."""
        from cryosvi.dataset import working_images

        return working_images(self.particles, indices, self.box).numpy()

    @property
    def has_conditions(self) -> bool:
        return self.conditions.ctf is not None or self.conditions.shifts is not None

    def draw_conditions(self, count: int, device, generator=None) -> Conditions | None:
        """The conditions of ``count`` particles drawn with replacement (the empirical
        distribution of the file's CTFs, optics groups and shifts), or None when the
        particles have none (no random number is drawn then)."""
        if not self.has_conditions:
            return None
        rows = torch.randint(len(self), (count,), generator=generator)
        return self.conditions.take(rows).to(device)


def _column(frame, column: str) -> np.ndarray:
    return frame[column].to_numpy(float)


class Latent:
    """One latent: see the module notes. Subclasses fill in the methods."""

    site = ""
    name = ""
    always = True
    model_rank = 0
    walk_rank = 0
    mean_key = ""
    std_key = ""
    headline = ("", "")
    """(validation metric key, label) printed on each epoch line."""
    sets_ctf = False
    """Whether the value sets the particle's CTF (what the guide's phase flip uses)."""
    simulation_weight = 1.0
    """Weight of this latent's term -log q(z | x) in the simulation (forward-KL) loss.
    Each head's term alone is minimised by the true conditional posterior, so a weight
    changes only how the shared trunk divides its features between the latents, not
    what any head converges to."""

    # -------------------------------------------------------------------- prior
    def prior(self, priors, conditions: Conditions, like: Tensor):
        raise NotImplementedError

    def forward_value(self, values: dict, conditions: Conditions):
        """The ``ForwardModel.forward`` argument named ``site`` (None: not given)."""
        return values.get(self.site)

    def reflected(self, value: Tensor) -> Tensor | None:
        """The value mirrored through its prior's centre, which the prior makes as likely
        (an antithetic twin for training by simulation), or None where the latent has no
        such twin."""
        return None

    # ---------------------------------------------------------------- guide head
    def head_size(self, config) -> int:
        raise NotImplementedError

    def head(self, out: Tensor, guide, conditions: Conditions):
        """q(site | x, conditioning) from the encoder outputs (..., B, head_size)."""
        raise NotImplementedError

    def feature_width(self, config) -> int:
        raise NotImplementedError

    def features(self, value: Tensor, guide, conditions: Conditions) -> Tensor:
        """(..., B, feature_width): the value standardised, as later heads see it."""
        raise NotImplementedError

    def initialise_head(self, last_layer, config) -> None:
        """Bias of the head's last layer at the start (zero: the prior)."""

    def turned(self, value: Tensor, turns: int) -> Tensor:
        """The value for the particle's image turned by ``turns`` quarter turns
        (``rotations.quarter_turn_images``); most latents do not change."""
        return value

    def turned_back(self, q, turns: int):
        """q of the value of the turned image -> q of the particle's own value."""
        return q

    def mixture(self, parts: list):
        """The equal mixture of distributions of one family with batch shape (..., B)."""
        raise NotImplementedError

    # --------------------------------------------------------------------- SMC
    def random_walk(self, config) -> RandomWalk:
        raise NotImplementedError

    # ------------------------------------------------------------------- chart
    difference_step = 0.0
    """Finite-difference step along each chart axis (the latent's unit; ``laplace``)."""

    def chart_dim(self, config) -> int:
        """Local coordinates of one value (the latent's degrees of freedom)."""
        raise NotImplementedError

    def retract(self, value: Tensor, delta: Tensor) -> Tensor:
        """The value moved by ``delta`` (..., B, chart_dim) in its local coordinates;
        value (..., B, ...) broadcasts against delta's leading dimensions."""
        raise NotImplementedError

    def log_volume(self, delta: Tensor) -> Tensor:
        """(..., B): log of the prior's base measure per unit volume of the chart at
        ``delta`` (0 for a vector latent with Lebesgue measure)."""
        return delta.new_zeros(delta.shape[:-1])

    # ---------------------------------------------------------------- summaries
    def guide_summary(self, guide, q, samples: Tensor, features: dict, point: dict,
                      conditions: Conditions) -> tuple[Tensor, Tensor]:
        """(mean, std) of the guide's posterior, (B, ...) each. ``q`` is the head's
        distribution per sample (S, B); ``point`` holds the summary means of the earlier
        latents (and the known values)."""
        raise NotImplementedError

    def weighted_summary(self, samples: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        return weighted_moments(samples, weights)

    def interval_summary(self, samples: Tensor, weights: Tensor | None,
                         mean: Tensor) -> dict:
        """Summary entries besides mean and std (credible regions that mean +- z std
        would describe badly) of samples (S, B, ...) with normalised weights (S, B) or
        None (equal), about the summary's ``mean``; none for most latents."""
        return {}

    def validation(self, summary: dict, truth: Tensor) -> dict:
        """Validation metrics of a summary against simulated truth (training log)."""
        return {}

    # -------------------------------------------------------------------- STAR
    def known(self, particles, config) -> Tensor:
        """(N, ...) values of this latent for every particle, from the metadata, when it
        is fixed (not inferred). ``config``: the run's GuideConfig."""
        raise NotImplementedError

    def value_columns(self, value: Tensor, frame, config) -> dict[str, np.ndarray]:
        """STAR columns (N,) holding values (N, ...) of this latent (a posterior mean, or
        the truth of a simulation); ``frame``: the input metadata of these particles or
        None; ``config``: the run's GuideConfig or None (a simulation)."""
        raise NotImplementedError

    def std_columns(self, std: Tensor) -> dict[str, np.ndarray]:
        """STAR columns (N,) of the posterior std (the ``std_key`` of a summary)."""
        raise NotImplementedError

    def output_columns(self, summary: dict, frame, config) -> dict[str, np.ndarray]:
        """STAR columns of ``cryosvi infer`` from a summary: values and stds."""
        return {**self.value_columns(summary[self.mean_key], frame, config),
                **self.std_columns(summary[self.std_key])}

    def truth_columns(self, posterior, truth) -> list[tuple[str, object, str]]:
        """What ``cryosvi evaluate`` scores as scalars: (metric name, reader of a
        ParticleSet -> (N,), posterior std column) for each one both files have."""
        return []


class GaussianLatent(Latent):
    """A real vector latent with a Normal prior N(loc, scale) (per component) and a
    Normal guide head relative to it: mean = loc + scale * h0, std = scale *
    softplus(h1 + softplus^-1(1)) (+ a 1e-6 floor)."""

    floor = 0.0
    """The SMC random walk's smallest step, in the latent's unit."""
    scalar = True
    """Whether a value is one number per particle (event shape ()), i.e. ``size`` 0."""

    def size(self, config) -> int:
        """Components per particle; 0 for a scalar latent (event shape ())."""
        return 0

    def prior_loc_scale(self, priors, conditions: Conditions, like: Tensor):
        raise NotImplementedError

    def guide_loc_scale(self, guide, conditions: Conditions):
        raise NotImplementedError

    def prior(self, priors, conditions, like):
        loc, scale = self.prior_loc_scale(priors, conditions, like)
        q = dist.Normal(loc, scale)
        return q.to_event(1) if self.size(priors) else q

    def head_size(self, config) -> int:
        return 2 * max(self.size(config), 1)

    def head(self, out, guide, conditions):
        loc, scale = self.guide_loc_scale(guide, conditions)
        k = max(self.size(guide.config), 1)
        h0, h1 = (out[..., 0], out[..., 1]) if not self.size(guide.config) else \
            (out[..., :k], out[..., k:])
        mean = scale * h0 if loc is None else loc + scale * h0
        std = scale * (F.softplus(h1 + SOFTPLUS_ONE) + 1e-6)
        q = dist.Normal(mean, std)
        return q.to_event(1) if self.size(guide.config) else q

    def mixture(self, parts):
        """MixtureSameFamily of the parts' Normals (a component axis after the batch)."""
        normals = [q.base_dist if isinstance(q, dist.Independent) else q for q in parts]
        axis = -1 if self.scalar else -2  # after the batch, before a vector's components
        loc = torch.stack([q.loc for q in normals], axis)
        scale = torch.stack([q.scale for q in normals], axis)
        weights = dist.Categorical(logits=loc.new_zeros(loc.shape[:loc.dim() + axis + 1]))
        components = dist.Normal(loc, scale)
        return dist.MixtureSameFamily(weights, components if self.scalar
                                      else components.to_event(1))

    def feature_width(self, config) -> int:
        return max(self.size(config), 1)

    def features(self, value, guide, conditions):
        loc, scale = self.guide_loc_scale(guide, conditions)
        centred = value if loc is None else value - loc
        centred = centred / scale
        return centred if self.size(guide.config) else centred.unsqueeze(-1)

    def random_walk(self, config) -> RandomWalk:
        return RandomWalk(dim=max(self.size(config), 1), floor=self.floor)

    def chart_dim(self, config) -> int:
        return max(self.size(config), 1)

    def retract(self, value, delta):
        return value + (delta[..., 0] if self.scalar else delta)

    def guide_summary(self, guide, q, samples, features, point, conditions):
        if not guide.sampled_conditions(self.site):
            # No sampled latent before this one: every sample's q is the same.
            return q.mean[0], q.stddev[0]
        mean, var = q.mean, q.variance  # (S, B, ...): per sample of the earlier latents
        return mean.mean(0), (var.mean(0) + mean.var(0, unbiased=False)).sqrt()

    def _gaussian_validation(self, prefix: str, mean: Tensor, std: Tensor,
                             truth: Tensor) -> dict:
        """Pearson r of the (first component's) mean with the truth and the 95 %
        coverage of mean +- 1.96 std over every component."""
        z = (mean - truth) / std
        first = (lambda t: t[:, 0]) if mean.dim() > 1 else (lambda t: t)
        return {f"val_{prefix}_r": pearson(first(mean), first(truth)),
                f"val_{prefix}_cover95": float((z.abs() < 1.96).float().mean())}


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two (N,) tensors (float64)."""
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


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

    def prior_loc_scale(self, priors, conditions, like):
        if conditions.ctf is not None:
            return (like.new_zeros(()),
                    torch.tensor(priors.defocus_offset_std, dtype=like.dtype,
                                 device=like.device))
        return (torch.tensor(priors.defocus_mean, dtype=like.dtype, device=like.device),
                torch.tensor(priors.defocus_std, dtype=like.dtype, device=like.device))

    def guide_loc_scale(self, guide, conditions):
        # The run's GuideConfig holds the prior of this run's data (an offset's N(0, s)
        # when the particles have CTF estimates), so the head needs no conditions.
        return guide.config.defocus_mean, guide.config.defocus_std

    def validation(self, summary, truth):
        return self._gaussian_validation("defocus", summary[self.mean_key],
                                         summary[self.std_key], truth)

    def known(self, particles, config):
        if config.defocus_offset:
            return torch.zeros(len(particles))  # the file's estimate as it is
        from cryosvi.dataset import mean_defocus

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
        if config is not None and config.defocus_offset:
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
        from cryosvi.dataset import mean_defocus

        return [("defocus", mean_defocus, "cryosviDefocusStd")]


class Shifts(GaussianLatent):
    """In-plane shifts (B, 2) Å, RELION's (rlnOriginXAngst, rlnOriginYAngst): the image
    is the centred projection translated by -shifts (``cryosvi.shifts``). Prior N(file
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

    def guide_loc_scale(self, guide, conditions):
        return conditions.shifts, guide.config.shift_std

    def forward_value(self, values, conditions):
        return values.get(self.site, conditions.shifts)

    def turned(self, value, turns):
        from cryosvi.rotations import quarter_turn_shifts

        return quarter_turn_shifts(value, turns)

    def turned_back(self, q, turns):
        """The mean turned back, the per-axis stds swapped by an odd number of turns."""
        from cryosvi.rotations import quarter_turn_shifts

        normal = q.base_dist
        scale = normal.scale.flip(-1) if turns % 2 else normal.scale
        return dist.Normal(quarter_turn_shifts(normal.loc, -turns), scale).to_event(1)

    def validation(self, summary, truth):
        error = (summary[self.mean_key] - truth).square().sum(-1).mean().sqrt()
        return {"val_shifts_rmse": float(error)}

    def known(self, particles, config):
        from cryosvi.dataset import known_shifts

        return known_shifts(particles)

    def value_columns(self, value, frame, config):
        mean = value.cpu().numpy().astype(float)
        return {"rlnOriginXAngst": mean[:, 0], "rlnOriginYAngst": mean[:, 1]}

    def std_columns(self, std):
        std = std.cpu().numpy()
        return {"cryosviOriginXStd": std[:, 0], "cryosviOriginYStd": std[:, 1]}

    def truth_columns(self, posterior, truth):
        from cryosvi.io.particles import numeric_column

        std = {"rlnOriginXAngst": "cryosviOriginXStd", "rlnOriginYAngst": "cryosviOriginYStd"}
        # Scored only where the posterior inferred them (every file has origins, 0 by
        # default).
        return [(f"shift_{column[9].lower()}", (lambda t, c=column: numeric_column(t, c)),
                 std[column]) for column in ORIGINS
                if std[column] in posterior.metadata.columns and column in truth.metadata]


class Modes(GaussianLatent):
    """Normal-mode amplitudes (B, K), Å of RMS displacement per pseudo-atom; prior
    N(0, mode_std) per mode."""

    site, name = "enm_scale", "modes"
    model_rank, walk_rank = 0, 2
    mean_key, std_key = "modes_mean", "modes_std"
    headline = ("val_mode_r", "mode r")
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

    def guide_loc_scale(self, guide, conditions):
        return None, guide.prior_mode_std

    def validation(self, summary, truth):
        return self._gaussian_validation("mode", summary[self.mean_key],
                                         summary[self.std_key], truth)

    def known(self, particles, config):
        columns = [MODE_COLUMN.format(k + 1) for k in range(config.n_modes)]
        particles.require(*columns)
        return torch.tensor(particles.metadata[columns].to_numpy(float), dtype=torch.float32)

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
        from cryosvi.io.particles import numeric_column

        in_truth = set(truth.mode_columns())
        return [(f"mode{k}", (lambda t, c=column: numeric_column(t, c)),
                 MODE_STD_COLUMN.format(k))
                for k, column in enumerate(posterior.mode_columns(), start=1)
                if column in in_truth]


class Pose(Latent):
    """The rotation (B, 4), a unit quaternion w x y z (q and -q the same rotation).
    Prior: ProjectedNormal(rotation_concentration * rotation_mean) (0: uniform on SO(3)).
    Guide: a mixture of antipodal ProjectedNormals (``n_components``): per component 4
    direction outputs, a log concentration (1 + exp, floored) and a logit."""

    site, name = "rotation", "pose"
    model_rank, walk_rank = 1, 0
    mean_key, std_key = "rotation_mean", "pose_std_deg"
    radius_key = "pose_radius_deg"
    headline = ("val_pose_median_deg", "pose median")

    def prior(self, priors, conditions, like):
        from cryosvi.distributions import ProjectedNormal

        mean = torch.tensor(priors.rotation_mean, dtype=like.dtype, device=like.device)
        return ProjectedNormal(priors.rotation_concentration * mean / mean.norm())

    def head_size(self, config) -> int:
        return 6 * config.n_components  # 4 direction + 1 log concentration + 1 logit each

    def head(self, out, guide, conditions):
        from cryosvi.distributions import ProjectedNormalMixture

        c = guide.config.n_components
        direction = F.normalize(out[..., : 4 * c].unflatten(-1, (c, 4)), dim=-1, eps=1e-6)
        log_concentration = out[..., 4 * c: 5 * c].clamp(max=MAX_LOG_CONCENTRATION)
        logits = out[..., 5 * c: 6 * c]
        kappa = MIN_CONCENTRATION + log_concentration.exp()
        concentration = direction * kappa.unsqueeze(-1)
        return ProjectedNormalMixture(logits, concentration, antipodal=True)

    def initialise_head(self, last_layer, config) -> None:
        """Spread-out component directions and a low concentration (1 + e^0 = 2)."""
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            c = config.n_components
            last_layer.bias[: 4 * c] = torch.randn(4 * c, generator=generator)
            last_layer.bias[4 * c: 5 * c] = 0.0

    def turned(self, value, turns):
        from cryosvi.rotations import quarter_turn_quaternion, quaternion_product

        return quaternion_product(quarter_turn_quaternion(turns, value), value)

    def turned_back(self, q, turns):
        """Each component's concentration left-multiplied by the inverse turn: if v ~
        PN(c) then r v ~ PN(r c) for a unit quaternion r (an orthogonal map of R^4)."""
        from cryosvi.distributions import ProjectedNormalMixture
        from cryosvi.rotations import quarter_turn_quaternion, quaternion_product

        if not turns % 4:
            return q
        concentration = q.component_distribution.concentration
        back = quaternion_product(quarter_turn_quaternion(-turns, concentration),
                                  concentration)
        return ProjectedNormalMixture(q.logits, back, antipodal=q.antipodal)

    def mixture(self, parts):
        """One mixture of every part's components, each part weighing 1 / len(parts);
        its components stay grouped by part (``guide_summary`` relies on it)."""
        from cryosvi.distributions import ProjectedNormalMixture

        logits = torch.cat([q.logits.log_softmax(-1) for q in parts], -1)
        logits = logits - math.log(len(parts))
        concentration = torch.cat([q.component_distribution.concentration for q in parts], -2)
        return ProjectedNormalMixture(logits, concentration, antipodal=parts[0].antipodal)

    def feature_width(self, config) -> int:
        return 9

    def features(self, value, guide, conditions):
        from cryosvi.rotations import quaternion_to_matrix

        return quaternion_to_matrix(value).flatten(-2)  # the same for q and -q

    def random_walk(self, config) -> RandomWalk:
        """An isotropic rotation step of the population's per-axis RMS angle, 0.01 to 30
        degrees."""
        from cryosvi.rotations import weighted_pose

        return RandomWalk(dim=3, step=rotate_randomly,
                          spread=lambda q, w: torch.deg2rad(weighted_pose(q, w)[1]),
                          floor=math.radians(0.01), cap=math.radians(30))

    difference_step = 1e-3  # radians, 0.06 degrees

    def chart_dim(self, config) -> int:
        return 3

    def retract(self, value, delta):
        """q exp(delta): the rotation ``delta`` (rotation vector, radians, in the
        particle's frame) followed by q."""
        from cryosvi.rotations import quaternion_product, rotation_vector_to_quaternion

        step = rotation_vector_to_quaternion(delta)
        value, step = torch.broadcast_tensors(value, step)
        q = quaternion_product(value, step)
        return q / q.norm(dim=-1, keepdim=True)

    def log_volume(self, delta):
        """S^3's surface measure per unit of rotation-vector volume: with psi = |delta| /
        2 the quaternion's polar angle, dA = sin^2(psi) dpsi dOmega_2 and d^3 delta =
        8 psi^2 dpsi dOmega_2, so dA / d^3 delta = (sin psi / psi)^2 / 8."""
        psi = delta.norm(dim=-1) / 2
        return 2 * torch.log(torch.sinc(psi / math.pi).abs()) - math.log(8.0)

    def guide_summary(self, guide, q, samples, features, point, conditions):
        """The mean direction of the heaviest component of q(pose | x, mean earlier
        latents), and the samples' isotropic angular std (degrees)."""
        from cryosvi.rotations import heaviest_component_mean, pose_std_deg

        at_point = guide.distribution(self.site, features[self.site], point, conditions)
        mean = heaviest_component_mean(at_point, groups=guide.turns)
        return mean, pose_std_deg(samples, mean)

    def weighted_summary(self, samples, weights):
        from cryosvi.rotations import weighted_pose

        return weighted_pose(samples, weights)

    def interval_summary(self, samples, weights, mean):
        """The radii (B, L) of the credible balls about the mean at ``CREDIBLE_LEVELS``
        (``rotations.pose_credible_radii_deg``). Measured on 2 000 held-out particles
        of the paper preset (64 samples): at SNR 0.1 after the SMC the 95 % ball
        covered 0.916 of the true poses where chi_3^-1(0.95) std covered 0.888 (the
        posteriors of low SNR have several modes and heavy tails); at SNR 20 0.945-0.953
        against 0.933-0.939 (benchmarks/results/ablations.md)."""
        from cryosvi.rotations import pose_credible_radii_deg

        return {self.radius_key: pose_credible_radii_deg(samples, mean, CREDIBLE_LEVELS,
                                                         weights)}

    def output_columns(self, summary, frame, config):
        columns = super().output_columns(summary, frame, config)
        if self.radius_key in summary:
            radii = summary[self.radius_key].cpu().numpy()
            for i, level in enumerate(CREDIBLE_LEVELS):
                columns[pose_radius_column(level)] = radii[:, i]
        return columns

    def validation(self, summary, truth):
        from cryosvi.rotations import quaternion_geodesic_angle

        error = quaternion_geodesic_angle(summary[self.mean_key], truth)
        return {"val_pose_median_deg": float(error.median())}

    def known(self, particles, config):
        from cryosvi.rotations import euler_to_matrix, matrix_to_quaternion

        particles.require(*ANGLES)
        angles = [torch.tensor(_column(particles.metadata, c), dtype=torch.float64)
                  for c in ANGLES]
        return matrix_to_quaternion(euler_to_matrix(*angles)).float()

    def value_columns(self, value, frame, config):
        from cryosvi.rotations import matrix_to_euler, quaternion_to_matrix

        rot, tilt, psi = matrix_to_euler(quaternion_to_matrix(
            torch.as_tensor(value).double().cpu()))
        return {"rlnAngleRot": rot.numpy(), "rlnAngleTilt": tilt.numpy(),
                "rlnAnglePsi": psi.numpy()}

    def std_columns(self, std):
        return {"cryosviPoseStdDeg": std.cpu().numpy()}


def rotate_randomly(rotation: Tensor, width: Tensor) -> Tensor:
    """Random-walk step on SO(3): q (S, B, 4) times exp(omega), omega ~ N(0, width^2 I_3)
    with width (B,) in radians (symmetric: the inverse step is as likely)."""
    from cryosvi.rotations import quaternion_product, rotation_vector_to_quaternion

    omega = torch.randn(*rotation.shape[:-1], 3, device=rotation.device) * width[None, :, None]
    q = quaternion_product(rotation, rotation_vector_to_quaternion(omega))
    return q / q.norm(dim=-1, keepdim=True)


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
    """Local coordinates of the inferred ``latents`` (``cryosvi.laplace``): each latent's
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
