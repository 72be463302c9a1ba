"""The refinement 'joint' (``cryosvi.inference.joint``): against the closed-form posterior
of a linear Gaussian model with a conformation coupled to the defocus, a particle's
result alone and in a batch, and 'auto' taking it for one mode inferred with the pose."""

import math

import pytest
import torch

from cryosvi.errors import CryosviError
from cryosvi.guide import Guide
from cryosvi.inference.joint import joint_dimension, joint_refine
from cryosvi.inference.refine import (JOINT_MIN_SNR, LAPLACE_MIN_SNR, Batch, Settings,
                                      check_refinement, joint_path, refine)
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.rotations import random_quaternions
from cryosvi.randomness import Streams

from test_guide import tiny_config, tiny_reference


class CoupledLinearForward:
    """image = b + A (alpha, (defocus - 10^4 A) / 2500 A): linear in the mode amplitude
    and the defocus, whose columns of A overlap (the posterior couples them), pose and
    CTF ignored. With the model's Gaussian noise and Normal priors the posterior of
    (defocus, alpha) is exactly Gaussian."""

    def __init__(self, matrix, offset, box):
        self.matrix, self.offset, self.box = matrix, offset, box
        self.coords = torch.zeros(1, 3)

    def __call__(self, enm_scale, defocus, **_):
        theta = torch.cat([enm_scale, ((defocus - 1e4) / 2500.0)[:, None]], -1)
        return (self.offset + theta @ self.matrix.T).view(-1, self.box, self.box)


def test_joint_against_a_coupled_linear_gaussian_model():
    """``joint_refine`` (profile, grid, anchors, importance sampling) through the Pyro
    model's likelihood and priors, on posteriors from about 0.1 to 0.75 of the mode
    prior.s std, the defocus and the mode correlated: with S = 4 000 draws every mean
    within 0.1 posterior stds of the closed form N(P^-1 (M^T (x - b) / s^2 + Lambda mu),
    P^-1), P = M^T M / s^2 + Lambda, every std within 10 %, the correlation within 0.1
    (the Monte Carlo error of S draws at the ESS found is ~0.02 std), and the proposal
    nearly the posterior itself (ESS > S / 2)."""
    torch.manual_seed(0)
    box, count, noise_std = 16, 6, 1.0
    priors = tiny_reference(n_modes=1).priors
    common = torch.randn(box * box)
    matrix = torch.stack([0.1 * common + 0.02 * torch.randn(box * box),
                          -0.1 * common + 0.08 * torch.randn(box * box)], -1)
    offset = torch.randn(box * box)
    guide = Guide(tiny_config(latents=("defocus", "enm_scale"), n_modes=1)).eval()
    prior_mean = torch.tensor([0.0, priors.defocus_mean], dtype=torch.float64)
    prior_precision = torch.diag(torch.tensor(
        [priors.mode_std[0] ** -2, priors.defocus_std ** -2], dtype=torch.float64))
    widths, correlations = [], []
    for b, gain in enumerate(torch.linspace(0.3, 6.0, count)):  # one width per particle
        forward = CoupledLinearForward(gain * matrix, offset, box)
        theta = torch.stack([torch.randn(()) * priors.mode_std[0],
                             1e4 + 2500 * torch.randn(())])
        with torch.no_grad():
            image = forward(theta[:1][None], theta[1:]) \
                + noise_std * torch.randn(1, box, box)
        # image = b' + M theta with M's defocus column per A and b' = b - M 10^4 e_2
        m = (gain * matrix).double() * torch.tensor([1.0, 1 / 2500.0], dtype=torch.float64)
        shift = offset.double() - m[:, 1] * 1e4
        precision = m.T @ m / noise_std ** 2 + prior_precision
        cov = torch.linalg.inv(precision)
        mean = cov @ (m.T @ (image.reshape(-1).double() - shift) / noise_std ** 2
                      + prior_precision @ prior_mean)
        sd = cov.diagonal().sqrt()
        part = Batch(guide, forward, priors, noise_std, image,
                     {"rotation": random_quaternions(1)}, Conditions(),
                     Streams(0, torch.tensor([b])))
        result = joint_refine(part, Settings(2000))
        got_mean = torch.stack([result["modes_mean"][0, 0], result["defocus_mean"][0]])
        got_std = torch.stack([result["modes_std"][0, 0], result["defocus_std"][0]])
        assert ((got_mean.double() - mean) / sd).abs().max() < 0.1, (b, got_mean, mean, sd)
        assert (got_std.double() / sd - 1).abs().max() < 0.1, (b, got_std, sd)
        weights = result["weights"][:, 0].double()
        a = result["samples"]["enm_scale"][:, 0, 0].double()
        d = result["samples"]["defocus"][:, 0].double()
        da, dd = a - (weights * a).sum(), d - (weights * d).sum()
        rho = (weights * da * dd).sum() / ((weights * da ** 2).sum()
                                           * (weights * dd ** 2).sum()).sqrt()
        exact = cov[0, 1] / (sd[0] * sd[1])
        assert abs(float(rho - exact)) < 0.1, (b, rho, exact)
        assert float(result["ess"][0]) > 1000, (b, result["ess"])
        widths.append(float(sd[0]) / priors.mode_std[0])
        correlations.append(abs(float(exact)))
    # the test covers what it claims: narrow and wide posteriors, coupled
    assert min(widths) < 0.15 and max(widths) > 0.4, widths
    assert sorted(correlations)[1] > 0.5, correlations  # all but the widest


def test_a_particles_joint_posterior_does_not_depend_on_its_batch():
    """With the real forward model (pose, defocus and one mode inferred, an untrained
    guide) a particle refined by 'joint' alone or among others gets the same summary and
    draws, to float rounding (every decision and random number is the particle's own),
    whether 'joint' kept it or handed it to the SMC."""
    torch.manual_seed(0)
    reference = tiny_reference(n_modes=1, snr=2.0)
    forward = reference.forward_model()
    rotation, defocus = random_quaternions(5), 10000 + 2500 * torch.randn(5)
    with torch.no_grad():
        clean = forward(torch.randn(5, 1) * 2, rotation, defocus)
    noise_std = float(clean.std()) / math.sqrt(2.0)
    images = clean + noise_std * torch.randn_like(clean)
    guide = Guide(tiny_config(latents=("defocus", "rotation", "enm_scale"),
                              n_modes=1)).eval()
    whole = Batch(guide, forward, reference.priors, noise_std, images, {}, Conditions(),
                  Streams(3, torch.arange(5)))
    settings = Settings(16, moves=1, max_steps=3)
    full = joint_path(whole, settings)
    # both ways through: refined by 'joint' (most) and handed to the SMC (particle 1)
    assert full["smc_fallback"].any() and not full["smc_fallback"].all()
    for i in (0, 1, 4):
        alone = joint_path(whole.take(torch.tensor([i])), settings)
        for key in ("modes_mean", "modes_std", "defocus_mean", "rotation_mean", "ess",
                    "smc_fallback"):
            torch.testing.assert_close(alone[key][0], full[key][i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(alone["samples"]["enm_scale"][:, 0],
                                   full["samples"]["enm_scale"][:, i], atol=1e-4,
                                   rtol=1e-4)


def test_auto_takes_joint_for_one_mode_with_the_pose_between_the_snr_limits():
    """'auto' gives a run that infers one mode with the pose and defocus exactly what
    'joint' gives (same streams) for JOINT_MIN_SNR <= SNR < LAPLACE_MIN_SNR, the SMC below
    (every particle flagged); 'joint' refuses a run without a mode or with the modes
    alone, before any work."""
    torch.manual_seed(1)
    reference = tiny_reference(n_modes=1)
    forward = reference.forward_model()
    rotation = random_quaternions(3)
    with torch.no_grad():
        images = forward(torch.randn(3, 1), rotation, torch.full((3,), 1e4)) \
            + 0.1 * torch.randn(3, 16, 16)
    guide = Guide(tiny_config(latents=("defocus", "rotation", "enm_scale"),
                              n_modes=1)).eval()
    arguments = (guide, forward, reference.priors, 0.1, images, {}, 8)
    snr = math.sqrt(JOINT_MIN_SNR * LAPLACE_MIN_SNR)
    auto = refine(*arguments, method="auto", moves=1, snr=snr,
                  noise=Streams(0, torch.arange(3)))
    joint = joint_path(Batch(guide, forward, reference.priors, 0.1, images, {},
                             Conditions(), Streams(0, torch.arange(3))),
                       Settings(8, moves=12, snr=snr))
    for key in ("modes_mean", "modes_std", "rotation_mean", "smc_fallback"):
        assert torch.equal(auto[key], joint[key]), key
    low = refine(*arguments, method="auto", moves=1, snr=JOINT_MIN_SNR / 2, max_steps=2)
    assert low["smc_fallback"].all() and "steps" in low
    config = guide.config
    assert joint_dimension(config.latents, config) == 1
    for latents in (("defocus", "rotation"), ("enm_scale",)):
        with pytest.raises(CryosviError, match="--refine joint"):
            check_refinement("joint", tiny_config(latents=latents, n_modes=1))
    assert joint_dimension(("rotation", "enm_scale"), tiny_config(n_modes=3)) is None
