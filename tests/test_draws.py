"""Each latent's draw from the particles' own random streams (``Latent.draw``): the law
of the guide's distribution (KS tests against scipy's normal CDF, a mixture's CDF, and
the pose family's exact density integrated over S^3's slices), and a particle's samples
independent of the batch it is in."""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import torch
from scipy import integrate, stats

from cryosvi.distributions import ProjectedNormalMixture
from cryosvi.latents import REGISTRY
from cryosvi.latents.base import categorical_from_uniform
from cryosvi.posterior import posterior_summary
from cryosvi.randomness import Streams
from test_turns import random_guide

N = 4000


def streams(n: int = N) -> Streams:
    return Streams(2, torch.arange(n)).child(1)


def test_gaussian_draws_follow_the_guides_normal():
    """Scalar (defocus) and vector (modes) heads: (value - loc) / scale is N(0, 1)."""
    loc, scale = torch.tensor([9000.0, 11000.0]), torch.tensor([300.0, 50.0])
    q = dist.Normal(loc, scale).expand((N, 2))
    value = REGISTRY["defocus"].draw(q, Streams(2, torch.arange(2)).child(1))
    for b in range(2):
        z = ((value[:, b] - loc[b]) / scale[b]).double().numpy()
        assert stats.kstest(z, "norm").pvalue > 1e-3
    q = dist.Normal(torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, 2.0]])).to_event(1)
    value = REGISTRY["enm_scale"].draw(q.expand((N, 1)), Streams(2, torch.arange(1)))
    assert value.shape == (N, 1, 2)
    for k, (m, s) in enumerate(((0.5, 0.2), (-1.0, 2.0))):
        assert stats.kstest(value[:, 0, k].double().numpy(), "norm", (m, s)).pvalue > 1e-3


def test_mixture_draws_follow_the_mixtures_cdf():
    """The equal mixture of ``Guide.turns``: KS against sum_k w_k Phi((x - m_k) / s_k)."""
    latent = REGISTRY["defocus"]
    parts = [dist.Normal(torch.tensor([8000.0]), torch.tensor([200.0])),
             dist.Normal(torch.tensor([9000.0]), torch.tensor([500.0]))]
    q = latent.mixture(parts).expand((N, 1))
    value = latent.draw(q, Streams(4, torch.arange(1))).double().numpy()[:, 0]

    def cdf(x):
        return 0.5 * stats.norm.cdf(x, 8000, 200) + 0.5 * stats.norm.cdf(x, 9000, 500)

    assert stats.kstest(value, cdf).pvalue > 1e-3


def test_categorical_from_uniform_is_the_inverse_cdf():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    u = torch.tensor([0.1, 0.199, 0.2001, 0.69, 0.71, 0.9999999])
    pick = categorical_from_uniform(logits.expand(6, 3), u)
    assert pick.tolist() == [0, 0, 1, 1, 2, 2]


def test_pose_draws_follow_the_projected_normal_density():
    """One antipodal component PN(c): t = |<v, c / |c|>| has the density p(v(t)) times
    the 2-sphere slice 4 pi sqrt(1 - t^2) (x 2 for +-t), with p the family's exact
    log_prob; two components: each draw's nearer axis follows the weights."""
    direction = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, -1.0, 0.5]), dim=0)
    q = ProjectedNormalMixture(torch.zeros(1, 1), (3.0 * direction)[None, None])
    value = REGISTRY["rotation"].draw(q.expand((N, 1)), Streams(5, torch.arange(1)))
    torch.testing.assert_close(value.norm(dim=-1), torch.ones(N, 1))
    t = (value[:, 0] @ direction).double()
    assert abs(float((t < 0).double().mean()) - 0.5) < 4 * 0.5 / math.sqrt(N)  # antipodal
    grid = np.linspace(0.0, 1.0, 4001)
    other = torch.nn.functional.normalize(torch.tensor([0.0, 1.0, -2.0, 0.0]) -
                                          direction * (direction @ torch.tensor(
                                              [0.0, 1.0, -2.0, 0.0])), dim=0)
    points = (torch.from_numpy(grid)[:, None] * direction.double()
              + torch.from_numpy(np.sqrt(1 - grid ** 2))[:, None] * other.double())
    density = q.log_prob(points.float()[:, None]).double().exp()[:, 0].numpy()
    pdf = 2 * density * 4 * math.pi * np.sqrt(1 - grid ** 2)
    cdf = integrate.cumulative_trapezoid(pdf, grid, initial=0.0)
    assert abs(cdf[-1] - 1) < 1e-3
    assert stats.kstest(t.abs().numpy(), lambda x: np.interp(x, grid, cdf)).pvalue > 1e-3

    axes = torch.stack([direction, other])
    mixture = ProjectedNormalMixture(torch.log(torch.tensor([[0.3, 0.7]])),
                                     (40.0 * axes)[None])
    value = REGISTRY["rotation"].draw(mixture.expand((N, 1)), Streams(6, torch.arange(1)))
    nearer = (value[:, 0] @ axes.T).abs().argmax(-1)
    assert abs(float(nearer.double().mean()) - 0.7) < 4 * math.sqrt(0.21 / N)


def test_a_particles_guide_samples_do_not_depend_on_its_batch():
    """``Guide.sample`` with streams: the particles 3..5 drawn alone or within 0..5, and
    with two quarter turns mixed, get the same samples and densities."""
    guide = random_guide()
    images = torch.randn(6, 16, 16, generator=torch.Generator().manual_seed(1))
    for turns in (1, 2):
        guide.turns = turns
        whole = posterior_summary(guide, images, n_samples=5,
                                  noise=Streams(9, torch.arange(6)))
        part = posterior_summary(guide, images[3:], n_samples=5,
                                 noise=Streams(9, torch.arange(3, 6)))
        for site, value in part["samples"].items():
            torch.testing.assert_close(value, whole["samples"][site][:, 3:], rtol=1e-6,
                                       atol=1e-6)
        torch.testing.assert_close(part["log_q"], whole["log_q"][:, 3:], rtol=1e-5,
                                   atol=1e-4)
        again = posterior_summary(guide, images, n_samples=5,
                                  noise=Streams(9, torch.arange(6)))
        for site, value in whole["samples"].items():
            assert torch.equal(value, again["samples"][site])  # reproducible
