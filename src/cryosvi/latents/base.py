"""The base of every latent (``Latent``; ``GaussianLatent`` for real vectors with a
Normal prior); the registry and what each method is for: ``cryosvi.latents``."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor

from cryosvi.distributions import RandomWalk, sum_over_samples, weighted_moments
from cryosvi.physics.conditions import Conditions

SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(SOFTPLUS_ONE) == 1
CREDIBLE_LEVELS = (0.68, 0.95)
"""The credible levels of the interval columns that ``cryosvi infer`` writes where a
latent's posterior is summarised by more than mean +- z std (the pose's credible balls),
which are also ``cryosvi evaluate``'s headline coverages."""


class ErrorScore(NamedTuple):
    """A latent scored by the size of its error (``Latent.truth_error``).

    name: metric name; unit: of the error; error(posterior, truth, order) -> (N,) the
    error of each posterior row against truth row ``order[i]``; std_column: the
    posterior's spread column; intervals: {level: the column of the radius of the
    credible region at that level}; std_coverage(error, std, level) -> the fraction
    inside the region that a spread implies (where the files lack the radius columns and
    for the calibration curve), with ``std_label`` naming that rule; aligned(posterior,
    truth, order, covariates) -> (errors (N,), the fitted frame as a dict) once the
    molecule frames of the two files are aligned, or None where too few particles fix
    it (the field None: the latent has no frame).
    """

    name: str
    unit: str
    error: Callable
    std_column: str
    intervals: dict
    std_coverage: Callable
    std_label: str
    aligned: Callable | None = None


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
    conformational = False
    """Whether it is a conformational amplitude: a real vector with a Normal prior and a
    Euclidean chart, which the refinement 'grid' (``cryosvi.inference.grid``) integrates
    on a grid about the prior's mean when every other latent is given."""
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

    def implied_value(self, conditions: Conditions, count: int, like: Tensor) -> Tensor | None:
        """The value (count, ...) that the acquisition ``conditions`` fix (a simulation
        draws it instead of sampling it, and does not record it as a latent), or None.
        E.g. the defocus offset is 0 when each particle's CTF is drawn with it."""
        return None

    # ---------------------------------------------------------------- guide head
    def guide_prior(self, priors, ctf_estimates: bool) -> dict:
        """The numbers (JSON-ready) of the prior that the guide's outputs are expressed
        relative to, for ``GuideConfig.latent_priors``: from ``priors``
        (:class:`cryosvi.config.Priors`) and whether the run uses the particles' CTF
        estimates. Empty for latents whose head does not need them."""
        return {}

    def legacy_guide_prior(self, values: dict) -> dict | None:
        """``guide_prior``'s numbers from the fields of a run.json written before
        ``latent_priors`` existed (``values``: the stored guide settings), or None."""
        return None

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

    def draw(self, q, noise) -> Tensor:
        """A value of the guide's ``q`` (batch shape (S, B)) from the particles' own
        random numbers: ``noise`` is a ``cryosvi.randomness.Streams`` over the B
        particles (particle axis 1), of which each separate draw takes a child. The
        same distribution as ``q.sample()``, as a function of the uniforms and normals
        drawn (the reparameterisation), so that a particle's value does not depend on
        the other particles of the batch."""
        raise NotImplementedError

    # --------------------------------------------------------------------- SMC
    def random_walk(self, config) -> RandomWalk:
        """The SMC's symmetric random-walk Metropolis move for this latent."""
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

    truth_label = ""
    """The columns ``cryosvi evaluate`` needs in both files to score this latent, as
    named in its note when they are missing ("" for latents it does not mention)."""

    scored_by_error = False
    """Whether ``truth_error`` scores it (its metrics.json entry is then null when the
    files cannot be scored)."""

    def truth_error(self, posterior, truth) -> ErrorScore | None:
        """How ``cryosvi evaluate`` scores a latent by the size of its error (the pose's
        geodesic angle) rather than as scalars, when both files have its columns; None
        for scalar latents (``truth_columns``)."""
        return None


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

    def draw(self, q, noise):
        """loc + scale * eps, eps ~ N(0, 1) per component; from a mixture (``Guide.turns``)
        the component first (``categorical_from_uniform``)."""
        shape = tuple(q.batch_shape)
        if isinstance(q, torch.distributions.MixtureSameFamily):
            pick = categorical_from_uniform(q.mixture_distribution.logits,
                                            noise.child(0).uniform(shape, axis=1))
            components = q.component_distribution
            normal = components.base_dist if isinstance(components, dist.Independent) \
                else components
            loc, scale = torch.broadcast_tensors(normal.loc, normal.scale)
            axis = len(shape)  # the component axis, after (S, B)
            index = pick.view(*shape, 1, *([1] * (loc.dim() - axis - 1))).expand(
                *shape, 1, *loc.shape[axis + 1:])
            loc = loc.gather(axis, index).squeeze(axis)
            scale = scale.gather(axis, index).squeeze(axis)
        else:
            normal = q.base_dist if isinstance(q, dist.Independent) else q
            loc, scale = torch.broadcast_tensors(normal.loc, normal.scale)
        return loc + scale * noise.child(1).normal(loc.shape, axis=1, dtype=loc.dtype)

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
        n = mean.shape[0]
        average = sum_over_samples(mean) / n
        spread = sum_over_samples(var) / n + sum_over_samples((mean - average).square()) / n
        return average, spread.sqrt()

    def _gaussian_validation(self, prefix: str, mean: Tensor, std: Tensor,
                             truth: Tensor) -> dict:
        """Pearson r of the (first component's) mean with the truth and the 95 %
        coverage of mean +- 1.96 std over every component."""
        z = (mean - truth) / std
        first = (lambda t: t[:, 0]) if mean.dim() > 1 else (lambda t: t)
        return {f"val_{prefix}_r": pearson(first(mean), first(truth)),
                f"val_{prefix}_cover95": float((z.abs() < 1.96).float().mean())}


def categorical_from_uniform(logits: Tensor, uniform: Tensor) -> Tensor:
    """Component indices (...,) int64 of a categorical with ``logits`` (..., K), one per
    uniform (...,) in (0, 1): the first k whose cumulative probability exceeds u (the
    inverse CDF; the last component where rounding leaves the total below u)."""
    cumulative = torch.softmax(logits.double(), -1).cumsum(-1)
    pick = (cumulative < uniform.double().unsqueeze(-1)).sum(-1)
    return pick.clamp(max=logits.shape[-1] - 1)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two (N,) tensors (float64)."""
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))
