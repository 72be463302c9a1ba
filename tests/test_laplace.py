"""Gauss-Newton and the Laplace proposal (cryosvi.inference.laplace) against closed forms: a linear
Gaussian model (exact posterior), torch's MultivariateNormal, quadrature of a non-Gaussian
posterior, and the uniform density on S^3 for the pose chart."""

import math

import numpy as np
import torch

from cryosvi.inference.laplace import gauss_newton, laplace_log_evidence, laplace_proposal
from cryosvi.latents import REGISTRY, Chart
from cryosvi.inference.importance import importance_weights
from cryosvi.distributions import weighted_moments


def select(mask, first, second):
    return torch.where(mask.view(1, -1, 1), first, second)


def retract(point, delta):
    return point + delta


def linear_problem(batch=5, dim=3, pixels=40, seed=0):
    """r(theta) = (A theta - y) / sigma with a prior N(mu, s^2) per component."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, pixels, dim, generator=generator, dtype=torch.float64)
    y = torch.randn(batch, pixels, generator=generator, dtype=torch.float64)
    sigma, mu, s = 0.7, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 1.5

    def residuals(theta):  # (n, B, d) -> (n, B, P)
        return (torch.einsum("bpd,nbd->nbp", a, theta) - y) / sigma

    def log_prior(theta):
        return -0.5 * ((theta - mu) / s).square().sum(-1)

    identity = torch.eye(dim, dtype=torch.float64)
    precision = a.transpose(1, 2) @ a / sigma ** 2 + identity / s ** 2
    mean = torch.linalg.solve(precision, (a.transpose(1, 2) @ y[..., None])[..., 0]
                              / sigma ** 2 + mu / s ** 2)
    return residuals, log_prior, mean, precision


def test_gauss_newton_solves_a_linear_gaussian_model_exactly():
    residuals, log_prior, mean, precision = linear_problem()
    start = torch.randn(1, 5, 3, dtype=torch.float64) * 3
    steps = torch.full((3,), 1e-3, dtype=torch.float64)
    result = gauss_newton(start, residuals, log_prior, retract, select, steps, iterations=3)
    torch.testing.assert_close(result.point[0], mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.precision, precision, rtol=1e-6, atol=1e-6)
    assert (result.accepted >= 1).all()
    # misfit: |r|^2 / 2 at the exact posterior mode
    torch.testing.assert_close(result.misfit,
                               0.5 * residuals(mean[None])[0].square().sum(-1),
                               rtol=1e-9, atol=1e-9)
    # The Laplace evidence of a Gaussian is exact: -min objective - log|H| / 2 + const;
    # the same problem shifted by a constant in the objective moves it by that constant.
    evidence = laplace_log_evidence(result.objective, result.precision)
    assert torch.isfinite(evidence).all()


def test_levenberg_marquardt_never_accepts_a_worse_point():
    """A residual whose Gauss-Newton step overshoots (r = theta^3 - 1 from far away)."""
    def residuals(theta):
        return theta.pow(3) - 1.0

    def flat(theta):
        return torch.zeros(theta.shape[:-1], dtype=theta.dtype)

    start = torch.tensor([[[4.0], [2.0], [0.9]]], dtype=torch.float64)
    previous = None
    for iterations in range(0, 12, 3):
        result = gauss_newton(start, residuals, flat, retract, select,
                              torch.tensor([1e-6], dtype=torch.float64), iterations)
        if previous is not None:
            assert (result.objective <= previous + 1e-12).all()
        previous = result.objective
    torch.testing.assert_close(result.point[0, :, 0], torch.ones(3, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_laplace_proposal_matches_torch_multivariate_normal():
    *_, precision = linear_problem(batch=4)
    torch.manual_seed(1)
    delta, log_q = laplace_proposal(precision, 40000)
    reference = torch.distributions.MultivariateNormal(torch.zeros(4, 3, dtype=torch.float64),
                                                       precision_matrix=precision)
    torch.testing.assert_close(log_q, reference.log_prob(delta), rtol=1e-9, atol=1e-6)
    covariance = torch.einsum("sbi,sbj->bij", delta, delta) / delta.shape[0]
    torch.testing.assert_close(covariance, torch.linalg.inv(precision), rtol=0.05, atol=1e-3)


def test_laplace_proposal_is_a_function_of_the_noise_given():
    """delta = L^-T eps for H = L L^T: delta^T H delta = |eps|^2 exactly, and the log
    density is MultivariateNormal's at delta."""
    *_, precision = linear_problem(batch=4)
    eps = torch.randn(50, 4, 3, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(3))
    delta, log_q = laplace_proposal(precision, 50, noise=eps)
    quadratic = torch.einsum("sbi,bij,sbj->sb", delta, precision, delta)
    torch.testing.assert_close(quadratic, eps.square().sum(-1), rtol=1e-7, atol=1e-9)
    reference = torch.distributions.MultivariateNormal(torch.zeros(4, 3, dtype=torch.float64),
                                                       precision_matrix=precision)
    torch.testing.assert_close(log_q, reference.log_prob(delta), rtol=1e-9, atol=1e-6)
    again, _ = laplace_proposal(precision, 50, noise=eps)
    assert torch.equal(delta, again)


def test_laplace_importance_sampling_corrects_a_skewed_posterior():
    """1-D posterior p(t | y) ~ exp(-(t^3 + t - y)^2 / (2 s^2)) N(t; 0, 1): GN + Laplace
    + importance weights against the mean and std by quadrature."""
    y, s = 1.5, 0.4

    def residuals(theta):
        return (theta.pow(3) + theta - y) / s

    def log_prior(theta):
        return -0.5 * theta.square().sum(-1)

    grid = np.linspace(-6, 6, 200001)
    log_density = -0.5 * ((grid ** 3 + grid - y) / s) ** 2 - 0.5 * grid ** 2
    density = np.exp(log_density - log_density.max())
    mean = np.trapezoid(grid * density, grid) / np.trapezoid(density, grid)
    mass = np.trapezoid(density, grid)
    std = math.sqrt(np.trapezoid((grid - mean) ** 2 * density, grid) / mass)

    start = torch.zeros(1, 1, 1, dtype=torch.float64)
    result = gauss_newton(start, residuals, log_prior, retract, select,
                          torch.tensor([1e-6], dtype=torch.float64), iterations=10)
    torch.manual_seed(2)
    # inflated: tails heavier than the target's, so the weights have a finite variance
    delta, log_q = laplace_proposal(result.precision, 20000, inflate=1.5)
    values = result.point + delta
    log_p = -0.5 * residuals(values).square().sum(-1) + log_prior(values)
    weights, ess = importance_weights(log_p, log_q)
    estimate, spread = weighted_moments(values, weights)
    assert 0.3 * 20000 < ess.item() < 20000  # not Gaussian, but a good proposal
    assert abs(estimate.item() - mean) < 0.01 * std * 5 + 4 * std / math.sqrt(ess.item())
    assert abs(spread.item() - std) < 0.03 * std
    # The Laplace mean alone is off (the posterior is skewed); the weights fix it.
    assert abs(result.point.item() - mean) > 10 * std / math.sqrt(ess.item())


def test_pose_chart_density_is_the_surface_density_on_s3():
    """q = exp(omega), omega ~ N(0, s^2 I): the rotation vectors |omega| < 2 pi cover S^3
    once, so with log q = log N(omega) - log_volume(omega) the importance estimate
    E_q[p / q 1(|omega| < 2 pi)] of the uniform density's mass (p = 1 / (2 pi^2)) is
    exactly 1 (without the (sin psi / psi)^2 factor it would be 2 pi^2 / 3), and the
    self-normalised estimate of the mean rotation angle is the uniform's pi/2 + 2/pi."""
    pose = REGISTRY["rotation"]
    torch.manual_seed(3)
    s, n = 1.5, 400000
    omega = torch.randn(n, 1, 3, dtype=torch.float64) * s
    identity = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q = pose.retract(identity, omega)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(n, 1, dtype=torch.float64))
    log_normal = (-0.5 * omega.square().sum(-1) / s ** 2
                  - 1.5 * math.log(2 * math.pi * s ** 2))
    log_q = log_normal - pose.log_volume(omega)
    inside = omega.norm(dim=-1) < 2 * math.pi
    ratio = torch.where(inside, torch.exp(-math.log(2 * math.pi ** 2) - log_q), 0.0)
    error = ratio.std() / math.sqrt(n)
    assert abs(ratio.mean().item() - 1.0) < 4 * error.item()
    angle = 2 * torch.acos(q[..., 0].abs().clamp(max=1))  # rotation angle in [0, pi]
    estimate = (ratio * angle).sum() / ratio.sum()
    assert abs(estimate.item() - (math.pi / 2 + 2 / math.pi)) < 0.01


def test_chart_retracts_every_inferred_latent():
    class Config:
        n_modes = 2

    chart = Chart(("defocus", "rotation", "enm_scale"), Config())
    assert chart.dim == 1 + 3 + 2
    values = {"defocus": torch.tensor([[1000.0, 2000.0]]),
              "rotation": torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]),
              "enm_scale": torch.zeros(1, 2, 2), "shifts": torch.ones(1, 2, 2)}
    same = chart.retract(values, torch.zeros(1, 2, 6))
    for site, value in values.items():
        torch.testing.assert_close(same[site], value)
    delta = torch.zeros(3, 2, 6)
    delta[..., 0] = 5.0
    delta[..., 4:] = 0.5
    moved = chart.retract(values, delta)
    assert moved["defocus"].shape == (3, 2) and moved["enm_scale"].shape == (3, 2, 2)
    torch.testing.assert_close(moved["defocus"], values["defocus"].expand(3, 2) + 5.0)
    torch.testing.assert_close(moved["enm_scale"], torch.full((3, 2, 2), 0.5))
    assert moved["shifts"] is values["shifts"]
    steps = chart.steps(torch.zeros(()))
    assert steps.shape == (6,) and (steps > 0).all()
