"""Adaptive tempered SMC for a batch of independent posteriors at once. Nothing here
knows about cryo-EM.

Latents are a dict name -> tensor (S, B, ...): S samples ("particles" in the SMC sense)
for each of B independent problems. The caller supplies the log target log p(x, z) (the
unnormalised posterior), the proposal log density log q(z) it drew the samples from, and
a symmetric random walk per latent (:class:`RandomWalk`).

Tempered SMC (Del Moral, Doucet & Jasra 2006; the adaptive temperature of Jasra et al.
2011): a path pi_b(z) ~ q(z)^(1 - b) p(x, z)^b from the proposal (b = 0) to the
posterior (b = 1). Each step raises b by the largest amount that keeps the ESS of the
incremental weights (p / q)^delta at ``ess_target`` * S (bisection, per problem),
resamples (systematic; Kitagawa 1996) and moves every sample by random-walk Metropolis
steps that leave pi_b invariant, with widths 2.38 / sqrt(d) times the population's
spread (Roberts, Gelman & Gilks 1997). At b = 1 the equally weighted population samples
the posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from cryosvi.distributions.random_walk import RandomWalk
from cryosvi.inference.importance import effective_sample_size, log_importance_weights

Latents = dict[str, Tensor]


def next_temperature_step(increment: Tensor, room: Tensor, target: float,
                          iterations: int = 40) -> Tensor:
    """Per problem, the largest step d in [0, room] with ESS(d * increment) >= target S
    (bisection; ESS decreases with d). increment (S, B) log p - log q, room (B,) -> (B,)."""
    n = increment.shape[0]
    full = effective_sample_size(increment * room) >= target * n
    low, high = torch.zeros_like(room), room.clone()
    for _ in range(iterations):
        middle = (low + high) / 2
        ok = effective_sample_size(increment * middle) >= target * n
        low = torch.where(ok, middle, low)
        high = torch.where(ok, high, middle)
    step = torch.where(full, room, low)
    # Always advance a little, so a problem whose increments are all -inf but one cannot
    # stall the loop.
    return torch.where(room > 0,
                       step.clamp_min(torch.minimum(room, torch.full_like(room, 1e-6))), room)


def systematic_resample(weights: Tensor) -> Tensor:
    """(S, B) normalised weights -> (S, B) ancestor indices: one uniform offset u per
    problem, sample i takes the ancestor whose cumulative weight first reaches
    (i + u) / S. Ancestor j gets S w_j offspring on average (floor or ceil of it);
    equal weights give the identity."""
    n, batch = weights.shape
    cumulative = weights.double().cumsum(0)
    cumulative[-1] = 1.0
    offset = torch.rand(1, batch, dtype=torch.float64, device=weights.device)
    points = (torch.arange(n, dtype=torch.float64, device=weights.device)[:, None] + offset) / n
    return torch.searchsorted(cumulative.T.contiguous(), points.T.contiguous()).T.clamp(max=n - 1)


@dataclass
class SMCResult:
    """An equally weighted population at b = 1 (values (S, B, ...), their log p and log q
    (S, B)), the number of tempering steps (B,) and the mean Metropolis acceptance (B,)."""

    values: Latents
    log_target: Tensor
    log_proposal: Tensor
    steps: Tensor
    acceptance: Tensor


def tempered_smc(values: Latents, log_target: Callable[[Latents], Tensor],
                 log_proposal: Callable[[Latents], Tensor], walks: dict[str, RandomWalk],
                 log_p: Tensor | None = None, log_q: Tensor | None = None, moves: int = 2,
                 max_steps: int = 40, ess_target: float = 0.5) -> SMCResult:
    """Adaptive tempered SMC from the proposal q to the posterior ~ p(x, z), per problem.

    values: samples (S, B, ...) drawn from q, one entry per latent. log_target(values),
    log_proposal(values) -> (S, B). walks: the random walk of each latent (keys of
    ``values``; their order fixes the order of random draws). log_p, log_q: the two log
    densities of ``values`` if already known. moves: Metropolis moves per step. At most
    ``max_steps`` steps; the last one jumps to b = 1.
    """
    values = dict(values)
    first = next(iter(values.values()))
    n_samples, batch = first.shape[:2]
    device = first.device
    log_p = log_target(values) if log_p is None else log_p
    log_q = log_proposal(values) if log_q is None else log_q
    increment = log_importance_weights(log_p, log_q)
    scale = 2.38 / math.sqrt(sum(walk.dim for walk in walks.values()))
    beta = torch.zeros(batch, dtype=torch.float64, device=device)
    steps = torch.zeros(batch, device=device)
    accepted = torch.zeros(batch, device=device)
    tried = 0
    columns = torch.arange(batch, device=device).expand(n_samples, batch)
    for step in range(max_steps):
        if bool((beta >= 1).all()):
            break
        room = 1.0 - beta
        delta = room if step == max_steps - 1 else next_temperature_step(
            increment.double(), room, ess_target)
        steps += (delta > 0).float()
        weights = torch.softmax((delta[None] * increment.double()).float(), dim=0)
        widths = {s: walk.width(values[s], weights, scale) for s, walk in walks.items()}
        beta = torch.where(room - delta < 1e-9, torch.ones_like(beta), beta + delta)
        parent = systematic_resample(weights)
        values = {s: v[parent, columns] for s, v in values.items()}
        log_p, log_q = log_p[parent, columns], log_q[parent, columns]
        b = beta.float()[None]
        for _ in range(moves):
            proposal = dict(values)
            proposal.update({s: walk.step(values[s], widths[s]) for s, walk in walks.items()})
            new_log_p, new_log_q = log_target(proposal), log_proposal(proposal)
            # pi_b(z') / pi_b(z) for a symmetric proposal.
            log_ratio = (1 - b) * (new_log_q - log_q) + b * (new_log_p - log_p)
            accept = torch.log(torch.rand_like(log_ratio)) < torch.nan_to_num(
                log_ratio, nan=-math.inf)
            for s in values:
                mask = accept.view(*accept.shape, *([1] * (values[s].dim() - 2)))
                values[s] = torch.where(mask, proposal[s], values[s])
            log_p = torch.where(accept, new_log_p, log_p)
            log_q = torch.where(accept, new_log_q, log_q)
            accepted += accept.float().mean(0)
            tried += 1
        increment = log_importance_weights(log_p, log_q)
    return SMCResult(values, log_p, log_q, steps, accepted / max(tried, 1))
