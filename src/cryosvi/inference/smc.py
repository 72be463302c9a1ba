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
from cryosvi.inference.importance import (effective_sample_size, log_importance_weights,
                                          normalised_weights)

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


def systematic_resample(weights: Tensor, offset: Tensor | None = None) -> Tensor:
    """(S, B) normalised weights -> (S, B) ancestor indices: one uniform offset u per
    problem (``offset`` (B,) in [0, 1), float64, or drawn here when None), sample i takes
    the ancestor whose cumulative weight first reaches (i + u) / S. Ancestor j gets
    S w_j offspring on average (floor or ceil of it); equal weights give the identity."""
    n, batch = weights.shape
    cumulative = weights.double().T.contiguous().cumsum(-1)  # (B, S): per problem
    cumulative[:, -1] = 1.0
    if offset is None:
        offset = torch.rand(batch, dtype=torch.float64, device=weights.device)
    points = (torch.arange(n, dtype=torch.float64, device=weights.device)[None]
              + offset.double()[:, None]) / n
    return torch.searchsorted(cumulative, points).T.clamp(max=n - 1)


@dataclass
class SMCResult:
    """An equally weighted population at b = 1 (values (S, B, ...), their log p and log q
    (S, B)), the number of tempering steps (B,), the mean Metropolis acceptance (B,) and
    the log evidence log Z = log integral p(x, z) dz (B,) float64: the sum over the steps
    of log mean_s w_s^delta, w = p / q, the ratio Z_(b + delta) / Z_b estimated from
    the equally weighted population at b (Del Moral, Doucet & Jasra 2006, sec. 3.2;
    unbiased in Z)."""

    values: Latents
    log_target: Tensor
    log_proposal: Tensor
    steps: Tensor
    acceptance: Tensor
    log_evidence: Tensor | None = None


RESAMPLE, ACCEPT, WALK = 0, 1, 2
"""The last part of the key of each draw of step s, move m: (s, m, RESAMPLE), (s, m,
ACCEPT), (s, m, WALK + j) for the walk of the j-th latent."""


def tempered_smc(values: Latents, log_target: Callable[[Latents], Tensor],
                 log_proposal: Callable[[Latents], Tensor], walks: dict[str, RandomWalk],
                 log_p: Tensor | None = None, log_q: Tensor | None = None, moves: int = 2,
                 max_steps: int = 40, ess_target: float = 0.5, noise=None,
                 subset: Callable | None = None) -> SMCResult:
    """Adaptive tempered SMC from the proposal q to the posterior ~ p(x, z), per problem.

    values: samples (S, B, ...) drawn from q, one entry per latent. log_target(values),
    log_proposal(values) -> (S, B). walks: the random walk of each latent (keys of
    ``values``). log_p, log_q: the two log densities of ``values`` if already known.
    moves: Metropolis moves per step. At most ``max_steps`` steps; the last one jumps to
    b = 1.

    Each problem's chain is its own: a problem that reaches b = 1 is neither resampled
    nor moved again, so its population does not depend on how many steps the other
    problems of the batch need. ``noise``: the problems' random streams
    (``cryosvi.randomness.Streams`` over the B problems; each draw of step s and move m
    takes the child (s, m, what)), so that a problem's chain depends on its own numbers
    only; None draws from torch's global generator. ``subset(rows)`` -> (log_target,
    log_proposal) of the problems ``rows`` alone, for values (S, len(rows), ...): when
    given, the problems still tempering are evaluated without the finished ones.
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
    log_evidence = torch.zeros(batch, dtype=torch.float64, device=device)
    steps = torch.zeros(batch, device=device)
    accepted = torch.zeros(batch, device=device)
    tried = torch.zeros(batch, device=device)
    for step in range(max_steps):
        rows = (beta < 1).nonzero()[:, 0]
        if not len(rows):
            break
        every = len(rows) == batch
        part = (lambda t: t) if every else (lambda t: t[:, rows])
        own = noise if noise is None or every else noise.take(rows)
        target, proposal_density = log_target, log_proposal
        if not every and subset is not None:
            target, proposal_density = subset(rows)
        elif not every:
            target = _within(log_target, values, rows)
            proposal_density = _within(log_proposal, values, rows)
        current = {s: part(v) for s, v in values.items()}
        p, q, inc = part(log_p), part(log_q), part(increment)
        room = 1.0 - beta[rows]
        delta = room if step == max_steps - 1 else next_temperature_step(
            inc.double(), room, ess_target)
        steps[rows] += (delta > 0).float()
        # Each problem's own column, so that it does not depend on the batch (rounding).
        tempered = delta[None] * inc.double()
        log_evidence[rows] += torch.logsumexp(tempered.T.contiguous(), -1) \
            - math.log(n_samples)
        weights = normalised_weights(tempered.float())
        widths = {s: walk.width(current[s], weights, scale) for s, walk in walks.items()}
        b = torch.where(room - delta < 1e-9, torch.ones_like(delta), beta[rows] + delta)
        beta[rows] = b
        offset = None if own is None else own.child(step, 0, RESAMPLE).uniform(
            (len(rows),), axis=0, dtype=torch.float64)
        parent = systematic_resample(weights, offset)
        columns = torch.arange(len(rows), device=device).expand(n_samples, len(rows))
        current = {s: v[parent, columns] for s, v in current.items()}
        p, q = p[parent, columns], q[parent, columns]
        b = b.float()[None]
        for move in range(moves):
            proposal = dict(current)
            for j, (s, walk) in enumerate(walks.items()):
                eps = None if own is None else own.child(step, move, WALK + j).normal(
                    walk.noise_shape(current[s]), axis=1, dtype=current[s].dtype)
                proposal[s] = walk.step(current[s], widths[s], eps)
            new_p, new_q = target(proposal), proposal_density(proposal)
            # pi_b(z') / pi_b(z) for a symmetric proposal.
            log_ratio = (1 - b) * (new_q - q) + b * (new_p - p)
            uniform = torch.rand_like(log_ratio) if own is None else own.child(
                step, move, ACCEPT).uniform(log_ratio.shape, axis=1, dtype=log_ratio.dtype)
            # log u in float64: torch's float32 log can round a particle's value
            # differently at another place in the batch (vectorised and scalar loops);
            # a float64 ulp cannot decide a comparison with a float32 ratio.
            accept = torch.log(uniform.double()) < torch.nan_to_num(
                log_ratio, nan=-math.inf).double()
            for s in current:
                mask = accept.view(*accept.shape, *([1] * (current[s].dim() - 2)))
                current[s] = torch.where(mask, proposal[s], current[s])
            p = torch.where(accept, new_p, p)
            q = torch.where(accept, new_q, q)
            accepted[rows] += accept.float().mean(0)
            tried[rows] += 1
        for s, v in current.items():
            if every:
                values[s] = v
            else:
                values[s] = values[s].clone()
                values[s][:, rows] = v
        if every:
            log_p, log_q = p, q
        else:
            log_p, log_q = log_p.clone(), log_q.clone()
            log_p[:, rows], log_q[:, rows] = p, q
        increment = log_importance_weights(log_p, log_q)
    return SMCResult(values, log_p, log_q, steps, accepted / tried.clamp_min(1),
                     log_evidence)


def _within(density: Callable[[Latents], Tensor], values: Latents,
            rows: Tensor) -> Callable[[Latents], Tensor]:
    """``density`` of the problems ``rows`` alone, evaluated on the whole batch: the
    values of the others as in ``values`` (their results are dropped)."""
    def evaluate(part: Latents) -> Tensor:
        whole = {}
        for s, v in values.items():
            whole[s] = v.clone()
            whole[s][:, rows] = part[s]
        return density(whole)[:, rows]
    return evaluate
