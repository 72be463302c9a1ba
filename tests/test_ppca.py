"""cryosvi.inference.ppca against closed forms: Tipping & Bishop's ML solution for isotropic noise,
Gaussian conditioning in information form, and recovery under unequal noise where a
plain PCA of the estimates fails."""

import numpy as np
import pytest
import torch

from cryosvi.inference.ppca import principal_directions


def test_isotropic_noise_matches_tipping_bishop_closed_form():
    rng = np.random.default_rng(1)
    n, dim, k, sigma2 = 400, 5, 2, 0.3
    points = rng.normal(size=(n, k)) @ rng.normal(size=(k, dim)) * 1.5 + rng.normal(size=dim)
    estimates = points + rng.normal(size=(n, dim)) * np.sqrt(sigma2)
    covariances = np.broadcast_to(sigma2 * np.eye(dim), (n, dim, dim))
    fit = principal_directions(torch.tensor(estimates), torch.tensor(covariances.copy()), k)
    centred = estimates - estimates.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred / n)
    values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    expected = vectors @ np.diag(values - sigma2) @ vectors.T  # W W^T (TB 1999 eq. 7)
    found = (fit.directions.T * fit.std.square()) @ fit.directions
    np.testing.assert_allclose(found.numpy(), expected, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(fit.centre.numpy(), estimates.mean(0), atol=1e-7)
    assert fit.converged
    np.testing.assert_allclose(fit.directions @ fit.directions.T, np.eye(k), atol=1e-10)


def test_unequal_noise_finds_the_direction_a_plain_pca_misses():
    rng = np.random.default_rng(2)
    n, dim = 3000, 4
    truth = np.array([0.0, 0.6, 0.8, 0.0])
    points = rng.normal(size=(n, 1)) * 2.0 * truth
    covariances = np.empty((n, dim, dim))
    for i in range(n):  # half the items are very uncertain along axis 0, half along 3
        variances = np.full(dim, 0.2)
        variances[0 if i % 2 else 3] = 30.0
        rotation, _ = np.linalg.qr(np.eye(dim) + 0.05 * rng.normal(size=(dim, dim)))
        covariances[i] = rotation @ np.diag(variances) @ rotation.T
    estimates = points + np.einsum("nij,nj->ni", np.linalg.cholesky(covariances),
                                   rng.normal(size=(n, dim)))
    plain = np.linalg.eigh(np.cov(estimates.T))[1][:, -1]
    assert abs(plain @ truth) < 0.5  # the noisy axes dominate the raw spread
    fit = principal_directions(torch.tensor(estimates), torch.tensor(covariances), 1)
    assert abs(float(fit.directions[0] @ torch.tensor(truth))) > 0.995
    assert fit.std[0] == pytest.approx(2.0, rel=0.06)
    assert fit.directions[0].abs().argmax() == fit.directions[0].argmax()  # sign rule


def test_coordinates_equal_the_information_form_posterior():
    rng = np.random.default_rng(3)
    n, dim, k = 50, 3, 2
    estimates = torch.tensor(rng.normal(size=(n, dim)))
    a = rng.normal(size=(n, dim, dim))
    covariances = torch.tensor(a @ a.transpose(0, 2, 1) + 0.5 * np.eye(dim))
    fit = principal_directions(estimates, covariances, k)
    mean, covariance = fit.coordinates(estimates, covariances)
    factor = (fit.directions.T * fit.std).numpy()
    for i in range(n):
        information = np.linalg.inv(covariances[i].numpy())
        precision = np.eye(k) + factor.T @ information @ factor
        expected = np.linalg.solve(precision, factor.T @ information
                                   @ (estimates[i] - fit.centre).numpy())
        np.testing.assert_allclose(mean[i].numpy(), expected, atol=1e-10)
        np.testing.assert_allclose(covariance[i].numpy(), np.linalg.inv(precision), atol=1e-10)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="k must be"):
        principal_directions(torch.zeros(5, 3), torch.eye(3).expand(5, 3, 3), 4)
    with pytest.raises(ValueError, match="covariances"):
        principal_directions(torch.zeros(5, 3), torch.eye(2).expand(5, 2, 2), 1)


def test_weights_are_a_weighted_likelihood():
    """Weight 0 removes an item (the fit of the others alone), weight 2 counts it twice
    (the fit with it duplicated): the weighted likelihood's two defining cases."""
    generator = torch.Generator().manual_seed(4)
    n, dim = 60, 4
    direction = torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64)
    points = 2.0 * torch.randn(n, 1, generator=generator, dtype=torch.float64) * direction
    covariances = (0.1 + 0.2 * torch.rand(n, dim, generator=generator,
                                          dtype=torch.float64)).diag_embed()
    estimates = points + covariances.diagonal(dim1=1, dim2=2).sqrt() * torch.randn(
        n, dim, generator=generator, dtype=torch.float64)
    estimates[:10] = 5.0 * torch.randn(10, dim, generator=generator, dtype=torch.float64)
    weights = torch.ones(n, dtype=torch.float64)
    weights[:10] = 0.0
    weighted = principal_directions(estimates, covariances, 1, weights=weights)
    alone = principal_directions(estimates[10:], covariances[10:], 1)
    torch.testing.assert_close(weighted.directions, alone.directions, atol=1e-5, rtol=0)
    torch.testing.assert_close(weighted.std, alone.std, atol=1e-5, rtol=1e-5)
    assert float(weighted.directions[0] @ direction) > 0.95

    weights = torch.ones(n, dtype=torch.float64)
    weights[:10] = 2.0
    doubled = principal_directions(estimates, covariances, 1, weights=weights)
    copies = principal_directions(torch.cat([estimates, estimates[:10]]),
                                  torch.cat([covariances, covariances[:10]]), 1)
    torch.testing.assert_close(doubled.directions, copies.directions, atol=1e-5, rtol=0)
    torch.testing.assert_close(doubled.std, copies.std, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        principal_directions(estimates, covariances, 1, weights=torch.zeros(n))
