"""``cryosvi.inference.population``: the nonparametric maximum-likelihood distribution of
latent values on a grid, from each item's likelihood there."""

from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy import stats

from cryosvi.inference.population import grid_population, spread_evidence

NODES = torch.linspace(-4.0, 8.0, 97, dtype=torch.float64)


def gaussian_log_likelihoods(values: np.ndarray, noise_std: float) -> torch.Tensor:
    """(G, n): log N(x_i; node, noise_std^2) of observations x_i = values_i + noise."""
    observed = values + np.random.default_rng(1).normal(0.0, noise_std, len(values))
    return torch.from_numpy(stats.norm.logpdf(observed[None], NODES.numpy()[:, None],
                                              noise_std))


def moments(mass: torch.Tensor) -> tuple[float, float]:
    mean = float((mass * NODES).sum())
    return mean, float((mass * (NODES - mean).square()).sum().sqrt())


def test_recovers_the_spread_behind_noisy_observations():
    """4 000 values uniform on [0, 4] (mean 2, std 4 / sqrt 12 = 1.155) seen with
    Gaussian noise of std 1: the observations spread 1.53; the estimated distribution
    has the values' moments, and its masses sum to 1."""
    values = np.random.default_rng(0).uniform(0.0, 4.0, 4000)
    mass = grid_population(gaussian_log_likelihoods(values, 1.0))
    assert abs(float(mass.sum()) - 1) < 1e-12
    mean, std = moments(mass)
    assert abs(mean - values.mean()) < 0.05
    assert abs(std - values.std()) < 0.08
    assert float(mass[(NODES < -1) | (NODES > 5)].sum()) < 0.02


def test_each_step_raises_the_marginal_likelihood_and_weights_count_as_copies():
    """EM never lowers its objective (Laird 1978), so more iterations fit at least as
    well; an item of weight 2 counts as two copies, one of weight 0 not at all."""
    values = np.random.default_rng(2).normal(1.0, 0.7, 300)
    log_likelihood = gaussian_log_likelihoods(values, 1.5)

    def objective(mass, weights=None):
        marginal = torch.logsumexp(log_likelihood + torch.log(mass)[:, None], 0)
        return float(marginal.mean() if weights is None else
                     (weights * marginal).sum() / weights.sum())

    fits = [objective(grid_population(log_likelihood, max_iterations=k))
            for k in (1, 2, 5, 20, 100)]
    assert all(b >= a - 1e-12 for a, b in pairwise(fits))
    weights = torch.ones(300, dtype=torch.float64)
    weights[:50], weights[50:100] = 0.0, 2.0
    weighted = grid_population(log_likelihood, weights)
    copies = grid_population(torch.cat([log_likelihood[:, 50:], log_likelihood[:, 50:100]],
                                       1))
    torch.testing.assert_close(weighted, copies, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("spread", [0.0, 0.5, 1.0, 2.0])
def test_the_spread_evidence_is_the_likelihood_ratio_of_a_gaussian_spread(spread):
    """2 000 values N(2, spread^2) seen with noise of std 1: the evidence of the fitted
    distribution against the best single value is, for Gaussian data, the closed form
    n/2 (v - 1 - log v) of the sample variance v of the observations (the maximum-
    likelihood Gaussian spread against the point at their mean; 0 when v <= 1), up to
    the grid's spacing (the best node is up to 0.0625 from the mean: n/2 0.0625^2 = 3.9
    nats) and what the nonparametric estimate fits beyond a Gaussian."""
    rng = np.random.default_rng(3)
    values = rng.normal(2.0, spread, 2000) if spread else np.full(2000, 2.0)
    log_likelihood = gaussian_log_likelihoods(values, 1.0)
    observed = values + np.random.default_rng(1).normal(0.0, 1.0, len(values))
    v = observed.var()
    expected = len(values) / 2 * (v - 1 - np.log(v)) if v > 1 else 0.0
    found = spread_evidence(log_likelihood, grid_population(log_likelihood))
    assert abs(found - expected) < 5.0 + 0.005 * expected
    weights = torch.full((len(values),), 2.0, dtype=torch.float64)  # each counts twice
    assert spread_evidence(log_likelihood, grid_population(log_likelihood, weights),
                           weights) == pytest.approx(2 * found, rel=1e-6, abs=1e-6)
