"""``cryosvi.inference.smc`` against posteriors known in closed form.

The conjugate Gaussian model: per problem b (B independent ones, handled in parallel),
latents z (2 coordinates) and c (a scalar), each coordinate with prior N(m0, s0^2) and n
observations y_i ~ N(coordinate, sigma^2). The posterior of each coordinate is Gaussian
with precision 1/s0^2 + n/sigma^2 and mean (m0/s0^2 + sum y / sigma^2) / precision, and
the evidence p(y) is that of y ~ N(m0 1, sigma^2 I + s0^2 1 1^T) (e.g. Bishop, PRML,
sec. 2.3.3 and eq. 3.86). The proposal is a deliberately broad, shifted Gaussian.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from cryosvi.distributions import RandomWalk, weighted_moments
from cryosvi.inference.importance import (effective_sample_size, importance_weights,
                                          log_importance_weights)
from cryosvi.inference.smc import systematic_resample, tempered_smc
from cryosvi.randomness import Streams

M0, S0, SIGMA = 1.0, 2.0, 1.0
SHAPES = {"z": (2,), "c": ()}


class Conjugate:
    """B problems with true latents drawn from the prior and n observations each."""

    def __init__(self, batch: int, n_obs: int, generator: torch.Generator):
        self.truth = {s: M0 + S0 * torch.randn(batch, *shape, generator=generator,
                                               dtype=torch.float64)
                      for s, shape in SHAPES.items()}
        self.y = {s: t[None] + SIGMA * torch.randn(n_obs, *t.shape, generator=generator,
                                                   dtype=torch.float64)
                  for s, t in self.truth.items()}  # (n, B, ...)
        precision = 1 / S0 ** 2 + n_obs / SIGMA ** 2
        self.post_std = 1 / math.sqrt(precision)
        self.post_mean = {s: (M0 / S0 ** 2 + y.sum(0) / SIGMA ** 2) / precision
                          for s, y in self.y.items()}

    def log_joint(self, values: dict) -> torch.Tensor:
        """log p(y, z, c) (S, B): the prior plus sum_i log N(y_i; v, sigma^2), from the
        sufficient statistics n, sum y, sum y^2."""
        total = 0.0
        for s, v in values.items():
            n, sum_y, sum_y2 = self.y[s].shape[0], self.y[s].sum(0), self.y[s].square().sum(0)
            prior = torch.distributions.Normal(M0, S0).log_prob(v)
            likelihood = (-n * math.log(SIGMA * math.sqrt(2 * math.pi))
                          - (sum_y2 - 2 * v * sum_y + n * v.square()) / (2 * SIGMA ** 2))
            total = total + (prior + likelihood).reshape(*v.shape[:2], -1).sum(-1)
        return total

    def log_posterior(self, values: dict) -> np.ndarray:
        """log p(z, c | y) (S, B) from the closed form (scipy)."""
        total = 0.0
        for s, v in values.items():
            logpdf = stats.norm.logpdf(v.numpy(), self.post_mean[s].numpy(), self.post_std)
            total = total + logpdf.reshape(*v.shape[:2], -1).sum(-1)
        return total

    def log_evidence(self) -> np.ndarray:
        """log p(y) (B,) from the closed form: the observations of each coordinate are
        jointly Gaussian, mean m0, covariance sigma^2 I + s0^2 1 1^T."""
        total = 0.0
        for y in self.y.values():
            n = y.shape[0]
            columns = y.reshape(n, y.shape[1], -1).permute(1, 2, 0).numpy()  # (B, d, n)
            cov = SIGMA ** 2 * np.eye(n) + S0 ** 2
            logpdf = stats.multivariate_normal(np.full(n, M0), cov).logpdf(columns)
            total = total + logpdf.reshape(columns.shape[:2]).sum(-1)
        return total


class Proposal:
    """q: every coordinate N(mean, std^2), independent."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std = mean, std

    def sample(self, n: int, batch: int, generator: torch.Generator) -> dict:
        return {s: self.mean + self.std * torch.randn(n, batch, *shape, generator=generator,
                                                      dtype=torch.float64)
                for s, shape in SHAPES.items()}

    def log_prob(self, values: dict) -> torch.Tensor:
        return sum(torch.distributions.Normal(self.mean, self.std).log_prob(v)
                   .reshape(*v.shape[:2], -1).sum(-1) for v in values.values())


WALKS = {"z": RandomWalk(dim=2), "c": RandomWalk(dim=1)}


def run_smc(problem: Conjugate, proposal: Proposal, n_samples: int, batch: int,
            generator: torch.Generator, moves: int = 5):
    values = proposal.sample(n_samples, batch, generator)
    return tempered_smc(values, problem.log_joint, proposal.log_prob, WALKS, moves=moves)


def test_importance_weights_are_the_closed_form_ratio():
    generator = torch.Generator().manual_seed(0)
    problem = Conjugate(batch=5, n_obs=4, generator=generator)
    proposal = Proposal(mean=0.0, std=3.0)
    values = proposal.sample(200, 5, generator)
    log_p, log_q = problem.log_joint(values), proposal.log_prob(values)
    weights, ess = importance_weights(log_p, log_q)
    # p(y, z) / q(z) = p(y) p(z | y) / q(z): normalised, the evidence cancels.
    expected = torch.softmax(torch.from_numpy(problem.log_posterior(values))
                             - log_q, dim=0)
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ess, 1 / expected.square().sum(0), rtol=1e-9, atol=0)
    # And unnormalised: the log weights are log p(y) + log p(z | y) - log q(z).
    log_w = log_importance_weights(log_p, log_q)
    torch.testing.assert_close(
        log_w, torch.from_numpy(problem.log_evidence()[None] + problem.log_posterior(values))
        - log_q, rtol=1e-9, atol=1e-9)


def test_effective_sample_size_by_hand():
    # Weights 1, 2, 3, 4: (10)^2 / (1 + 4 + 9 + 16) = 10 / 3. Equal weights: S. One weight
    # and zeros (log -inf, or NaN mapped to -inf): 1.
    log_w = torch.tensor([[1.0, 0.0, 5.0], [2.0, 0.0, -math.inf], [3.0, 0.0, -math.inf],
                          [4.0, 0.0, -math.inf]], dtype=torch.float64)
    log_w[:, 0] = log_w[:, 0].log() + 7.0  # a common factor does not matter
    torch.testing.assert_close(effective_sample_size(log_w),
                               torch.tensor([10 / 3, 4.0, 1.0], dtype=torch.float64))
    log_p = torch.tensor([[0.0], [float("nan")], [0.0]])
    _, ess = importance_weights(log_p, torch.zeros(3, 1))
    torch.testing.assert_close(ess, torch.tensor([2.0]))


def test_systematic_resampling_is_unbiased():
    torch.manual_seed(1)
    weights = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1], dtype=torch.float64)
    n, batch = weights.shape[0], 200_000
    parent = systematic_resample(weights[:, None].expand(n, batch))
    counts = torch.nn.functional.one_hot(parent, n).sum(0)  # (B, n) offspring counts
    expected = n * weights
    # Each count is floor or ceil of S w (variance <= 1/4): the mean within 5 se.
    assert bool(((counts == expected.floor()) | (counts == expected.ceil())).all())
    torch.testing.assert_close(counts.double().mean(0), expected, rtol=0,
                               atol=5 * 0.5 / math.sqrt(batch))
    equal = torch.full((n, 3), 1 / n)
    assert torch.equal(systematic_resample(equal), torch.arange(n)[:, None].expand(n, 3))


def test_weighted_moments():
    values = torch.tensor([[1.0], [3.0]])
    mean, std = weighted_moments(values, torch.tensor([[0.25], [0.75]]))
    torch.testing.assert_close(mean, torch.tensor([2.5]))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(0.75)]))


@pytest.fixture(scope="module")
def smc_run():
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(2)
    batch, n_samples = 1000, 128
    problem = Conjugate(batch=batch, n_obs=10, generator=generator)
    result = run_smc(problem, Proposal(mean=-2.0, std=6.0), n_samples, batch, generator)
    return problem, result


def test_smc_matches_the_closed_form_posterior(smc_run):
    problem, result = smc_run
    assert bool((result.steps >= 2).all())  # it had to temper
    for s, samples in result.values.items():
        mean, std = samples.mean(0), samples.std(0)
        # Per problem: S = 128 correlated samples; within 5 posterior std / sqrt(S / 4).
        error = (mean - problem.post_mean[s]) / problem.post_std
        assert float(error.abs().max()) < 5 / math.sqrt(128 / 4)
        # Over all problems the errors average out: no bias in mean or width.
        assert abs(float(error.mean())) < 0.01
        assert float((std / problem.post_std).mean()) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("level", [0.68, 0.95])
def test_smc_credible_intervals_cover_at_the_nominal_rate(smc_run, level):
    problem, result = smc_run
    for s, samples in result.values.items():
        # The posterior is Gaussian: mean +- z std of the samples (empirical quantiles of
        # S = 128 samples would under-cover by themselves: 0.936 at 95 %).
        z = stats.norm.ppf(0.5 + level / 2)
        mean, std = samples.mean(0), samples.std(0)
        covered = ((problem.truth[s] - mean).abs() <= z * std).double().flatten()
        # Coordinates of one problem are independent: binomial with n = B * d.
        error = math.sqrt(level * (1 - level) / covered.numel())
        assert float(covered.mean()) == pytest.approx(level, abs=3.5 * error), s


def test_tempering_recovers_what_plain_importance_sampling_cannot():
    """10^3 observations: the posterior std (0.03) is 1/200 of the proposal's."""
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(3)
    batch, n_samples = 50, 64
    problem = Conjugate(batch=batch, n_obs=1000, generator=generator)
    proposal = Proposal(mean=3.0, std=6.0)
    values = proposal.sample(n_samples, batch, generator)
    weights, ess = importance_weights(problem.log_joint(values), proposal.log_prob(values))
    assert float(ess.median()) < 1.5  # collapsed onto one or two samples
    is_mean, _ = weighted_moments(values["c"], weights)
    is_error = (is_mean - problem.post_mean["c"]).abs() / problem.post_std
    assert float(is_error.median()) > 5

    result = tempered_smc(values, problem.log_joint, proposal.log_prob, WALKS, moves=5)
    for s, samples in result.values.items():
        error = (samples.mean(0) - problem.post_mean[s]) / problem.post_std
        assert float(error.abs().max()) < 5 / math.sqrt(n_samples / 4)
        assert float((samples.std(0) / problem.post_std).mean()) == pytest.approx(1.0, abs=0.1)


def test_a_problems_chain_depends_on_its_own_numbers_only():
    """With per-problem random streams, a problem's population, steps and acceptance are
    the same alone or beside a problem that needs many more tempering steps (a
    posterior 1000x narrower): a problem that reaches b = 1 is not moved again. The same
    with ``subset`` (finished problems left out of the evaluations)."""
    precision = torch.tensor([1.0, 1e6, 4.0], dtype=torch.float64)  # easy, hard, easy
    centre = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def problems(columns):
        p, m = precision[columns], centre[columns]

        def log_target(values):
            total = 0.0
            for v in values.values():
                shape = (1, -1, *([1] * (v.dim() - 2)))
                term = -0.5 * p.view(shape) * (v - m.view(shape)).square()
                total = total + term.reshape(*v.shape[:2], -1).sum(-1)
            return total
        return log_target

    proposal = Proposal(mean=0.0, std=3.0)

    def run(columns, use_subset):
        columns = torch.tensor(columns)
        noise = Streams(4, columns)
        values = {"z": proposal.mean + proposal.std * noise.child(0).normal(
                      (64, len(columns), 2), axis=1, dtype=torch.float64),
                  "c": proposal.mean + proposal.std * noise.child(1).normal(
                      (64, len(columns)), axis=1, dtype=torch.float64)}
        subset = (lambda rows: (problems(columns[rows]), proposal.log_prob)) \
            if use_subset else None
        return tempered_smc(values, problems(columns), proposal.log_prob, WALKS,
                            moves=3, noise=noise.child(2), subset=subset)

    alone = run([0, 2], False)
    for use_subset in (False, True):
        beside = run([0, 1, 2], use_subset)
        assert beside.steps[1] > beside.steps[0] + 3  # the hard one tempers much longer
        for s, v in alone.values.items():
            assert torch.equal(v, beside.values[s][:, [0, 2]]), s
        assert torch.equal(alone.steps, beside.steps[[0, 2]])
        assert torch.equal(alone.acceptance, beside.acceptance[[0, 2]])
    # and the populations are the posterior's N(centre, 1 / precision)
    for s, v in alone.values.items():
        mean = v.mean(0).reshape(2, -1)
        error = (mean - centre[[0, 2], None]) * precision[[0, 2], None].sqrt()
        assert float(error.abs().max()) < 5 / math.sqrt(64 / 4)


def test_log_evidence_matches_the_closed_form():
    """The SMC's log Z (sum over the steps of log mean w^delta) and plain importance
    sampling's (log mean p / q) against the conjugate model's exact log p(y) (scipy's
    multivariate normal): the SMC from a proposal far off (posterior std 1/60 of q's),
    importance sampling from a proposal near the posterior."""
    from cryosvi.inference.importance import importance_log_evidence

    generator = torch.Generator().manual_seed(11)
    batch, n_samples = 40, 128
    problem = Conjugate(batch=batch, n_obs=200, generator=generator)
    exact = problem.log_evidence()
    torch.manual_seed(11)
    result = run_smc(problem, Proposal(mean=3.0, std=6.0), n_samples, batch, generator)
    error = result.log_evidence.numpy() - exact
    assert np.median(np.abs(error)) < 0.5 and abs(error.mean()) < 0.5, error

    easy = Conjugate(batch=batch, n_obs=2, generator=generator)
    std = 1.3 * easy.post_std  # q: the posterior's means, its std times 1.3
    values = {s: m + std * torch.randn(4096, *m.shape, generator=generator,
                                       dtype=torch.float64)
              for s, m in easy.post_mean.items()}
    log_q = sum(torch.distributions.Normal(easy.post_mean[s], std).log_prob(v)
                .reshape(*v.shape[:2], -1).sum(-1) for s, v in values.items())
    estimate = importance_log_evidence(easy.log_joint(values), log_q)
    assert np.abs(estimate.numpy() - easy.log_evidence()).max() < 0.05
