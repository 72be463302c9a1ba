"""Self-normalised importance sampling for a batch of independent posteriors at once.
Nothing here knows about cryo-EM.

Samples (S, B): S draws from a proposal q for each of B problems, with log q and the log
target log p(x, z). Weights w = p(x, z) / q(z), self-normalised; the effective sample size
(sum w)^2 / sum w^2 (Kong 1992; Liu 2001, sec. 2.5.3) says how many independent posterior
samples they are worth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_importance_weights(log_target: Tensor, log_proposal: Tensor) -> Tensor:
    """Unnormalised log weights log p - log q (S, B); NaN and +inf (a sample the proposal
    cannot have drawn, or a broken likelihood) become -inf, i.e. weight 0."""
    return torch.nan_to_num(log_target - log_proposal, nan=-math.inf, posinf=-math.inf)


def normalised_weights(log_weights: Tensor) -> Tensor:
    """(S, B) unnormalised log weights -> (S, B) weights summing to 1 per problem (the
    softmax over the samples). Each problem's are computed along a contiguous axis, so
    they do not depend on the other problems of the batch, even at rounding level
    (torch's softmax over a leading axis rounds differently for different batch
    sizes)."""
    return torch.softmax(log_weights.T.contiguous(), dim=-1).T


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """(S, B) unnormalised log weights -> (B,) ESS = (sum w)^2 / sum w^2, in [1, S]."""
    weights = torch.softmax(log_weights.T.contiguous(), dim=-1)
    return 1.0 / weights.square().sum(-1)


def importance_weights(log_target: Tensor, log_proposal: Tensor) -> tuple[Tensor, Tensor]:
    """Self-normalised importance sampling: samples (S, B) drawn from q, their log q and
    log p(x, z) -> normalised weights (S, B) and the ESS (B,)."""
    log_weights = log_importance_weights(log_target, log_proposal)
    return normalised_weights(log_weights), effective_sample_size(log_weights)


def importance_log_evidence(log_target: Tensor, log_proposal: Tensor) -> Tensor:
    """(B,) float64: the importance sampling estimate of log Z = log integral p(x, z) dz,
    log mean_s p(x, z_s) / q(z_s) over the S draws (S, B) (unbiased in Z; Liu 2001, sec.
    2.5). Each problem along a contiguous axis, as ``normalised_weights``."""
    log_weights = log_importance_weights(log_target.double(), log_proposal.double())
    return torch.logsumexp(log_weights.T.contiguous(), -1) - math.log(log_weights.shape[0])
