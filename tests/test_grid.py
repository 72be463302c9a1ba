"""The refinement 'grid' (``cryosvi.inference.grid``) and its quadrature core
(``cryosvi.inference.quadrature``): against closed-form Gaussian posteriors (a linear
forward model with the model's own likelihood and prior), a dense reference grid on a
two-peaked density, batch independence with the real forward model, 'auto' choosing it,
and ``cryosvi infer --refine grid``."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from cryosvi.cli.main import main
from cryosvi.guide import Guide
from cryosvi.inference.grid import GRIDS, grid_dimension, grid_refine
from cryosvi.inference.quadrature import adaptive_grid_posterior, split_grid_posterior
from cryosvi.inference.refine import Batch, Settings, refine
from cryosvi.io.particles import MODE_COLUMN, read_particles
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.rotations import random_quaternions
from cryosvi.reference import Reference
from cryosvi.simulate import simulate_dataset
from cryosvi.training.loop import train
from cryosvi.training.setup import TrainOptions

from test_guide import tiny_config, tiny_reference
from test_train import TINY, tiny_schedule

Z = {0.68: stats.norm.ppf(0.84), 0.95: stats.norm.ppf(0.975)}


def gaussian(mean, cov):
    """log N(z; mean, cov) up to a constant, as a batched log density (G, B, d) -> (G, B)
    of the problems ``rows``."""
    precision = torch.linalg.inv(cov)

    def log_density(points, rows=None):
        m, p = (mean, precision) if rows is None else (mean[rows], precision[rows])
        d = points - m
        return -0.5 * torch.einsum("gbi,bij,gbj->gb", d, p, d)
    return log_density


def test_adaptive_lattice_against_gaussians_of_every_width():
    """1-D Gaussians from as wide as the box to 1/4000 of it (extra levels): mean, std,
    equal-tailed 68/95 % intervals and the evidence (the integral of exp(-z^2 / 2 s^2)
    = sqrt(2 pi) s) within 1e-3 of the closed forms (in posterior stds)."""
    mu = torch.tensor([[0.3], [-2.0], [1.0], [0.0], [3.5]], dtype=torch.float64)
    sd = torch.tensor([1.0, 0.05, 0.3, 0.002, 0.7], dtype=torch.float64)
    post = adaptive_grid_posterior(gaussian(mu, torch.diag_embed(sd[:, None] ** 2)),
                                   torch.zeros(5, 1, dtype=torch.float64),
                                   torch.full((5, 1), 8.0, dtype=torch.float64))
    assert ((post.mean - mu)[:, 0] / sd).abs().max() < 1e-3
    assert (post.std[:, 0] / sd - 1).abs().max() < 1e-3
    intervals = post.intervals((0.68, 0.95))[:, 0]  # (B, 2 levels, 2)
    for i, level in enumerate((0.68, 0.95)):
        exact = torch.stack([mu[:, 0] - Z[level] * sd, mu[:, 0] + Z[level] * sd], -1)
        assert ((intervals[:, i] - exact) / sd[:, None]).abs().max() < 1e-3, level
    evidence = torch.log(math.sqrt(2 * math.pi) * sd)
    assert (post.log_evidence - evidence).abs().max() < 1e-3
    assert post.evaluations[3] > post.evaluations[0]  # the narrowest took more levels
    assert (post.resolution >= 1).all()


def test_adaptive_lattice_against_a_dense_grid_on_two_peaks():
    """A rough posterior like an ANM mode's at SNR 0.1 (peaks 0.3-0.5 wide over a prior
    std of 2): two peaks 3 apart (widths 0.3 and 0.45, masses 2:1) on a broad shoulder.
    The (32, 24) lattice's mean and std (within 0.005 posterior stds) and 95 % interval
    against a 2 000 001-point
    trapezoid rule (numpy, float64)."""
    def log_p(z):
        peaks = np.logaddexp(-0.5 * ((z - 1.2) / 0.3) ** 2 + math.log(2 / 0.3),
                             -0.5 * ((z + 1.8) / 0.45) ** 2 + math.log(1 / 0.45))
        return np.logaddexp(peaks, -0.5 * (z / 2.0) ** 2 + math.log(0.05 / 2.0))

    post = adaptive_grid_posterior(
        lambda points, rows=None: torch.from_numpy(log_p(points[..., 0].numpy())),
        torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 8.0, dtype=torch.float64),
        GRIDS[1].sizes)
    z = np.linspace(-8, 8, 2_000_001)
    density = np.exp(log_p(z))
    density /= np.trapezoid(density, z)
    mean = np.trapezoid(z * density, z)
    std = math.sqrt(np.trapezoid((z - mean) ** 2 * density, z))
    cdf = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(z))])
    interval = np.interp([0.025, 0.975], cdf, z)
    assert float(post.mean[0, 0]) == pytest.approx(mean, abs=5e-3 * std)
    assert float(post.std[0, 0]) == pytest.approx(std, rel=5e-3)
    np.testing.assert_allclose(post.intervals((0.95,))[0, 0, 0].numpy(), interval,
                               atol=0.01 * std)


def test_split_cells_against_correlated_gaussians():
    """2-D: the default split grid (6 x 6 cells, 2 rounds of 4 splits: 100 evaluations)
    on correlated Gaussians (rho -0.75 to 0.75, posterior stds 0.04-0.2 of the box):
    mean within 0.05 posterior stds, std and correlation within 0.1 of the closed form
    (on 400 random smooth posteriors its mean error was median 0.02, p99 0.12-0.28
    posterior stds)."""
    mean = torch.tensor([[0.5, -0.5], [1.0, 2.0], [-3.0, 0.5]], dtype=torch.float64)
    sd = torch.tensor([[1.5, 1.0], [0.4, 0.3], [0.8, 1.2]], dtype=torch.float64)
    rho = torch.tensor([0.75, -0.75, 0.3], dtype=torch.float64)
    cov = torch.diag_embed(sd ** 2)
    cov[:, 0, 1] = cov[:, 1, 0] = rho * sd[:, 0] * sd[:, 1]
    rule = GRIDS[2]
    post = split_grid_posterior(gaussian(mean, cov), torch.zeros(3, 2, dtype=torch.float64),
                                torch.full((3, 2), 8.0, dtype=torch.float64),
                                rule.sizes[0], *rule.split)
    assert ((post.mean - mean) / sd).abs().max() < 0.05
    assert (post.std / sd - 1).abs().max() < 0.1
    correlation = post.cov[:, 0, 1] / (post.std[:, 0] * post.std[:, 1])
    assert (correlation - rho).abs().max() < 0.1
    assert (post.evaluations == 6 * 6 + 2 * 4 * 8).all()
    assert torch.allclose(post.weights.sum(0), torch.ones(3, dtype=post.weights.dtype))


class LinearForward:
    """A forward model linear in the amplitudes, image = b + A alpha (pixels (P, K)),
    ignoring the pose and CTF: with the model's Gaussian noise and Normal prior the
    posterior of alpha is exactly Gaussian."""

    def __init__(self, matrix, offset, box):
        self.matrix, self.offset, self.box = matrix, offset, box
        self.coords = torch.zeros(1, 3)

    def __call__(self, enm_scale, **_):
        return (self.offset + enm_scale @ self.matrix.T).view(-1, self.box, self.box)


@pytest.mark.parametrize("modes", [1, 2])
def test_grid_refine_against_a_linear_gaussian_model(modes):
    """``grid_refine`` through ``Batch.log_target`` (the Pyro model's likelihood and
    priors) with a linear forward model: posterior N(P^-1 A^T (x - b) / s^2, P^-1), P =
    A^T A / s^2 + diag(1 / mode_std^2), and the evidence N(x; b, s^2 I + A diag(mode_std^2)
    A^T). 1 mode: mean, std and equal-tailed intervals within 1e-3
    posterior stds; 2 modes (the split grid's 100 evaluations on posteriors 0.2-0.3 of
    the prior's width, where its p99 error on random Gaussians is 0.12): within 0.15."""
    torch.manual_seed(0)
    box, batch = 6, 5
    reference = tiny_reference(n_modes=modes)
    mode_std = torch.tensor(reference.priors.mode_std, dtype=torch.float64)
    noise_std = 1.0
    matrix = torch.randn(box * box, modes) * torch.tensor([0.6, 0.25][:modes])
    offset = torch.randn(box * box)
    alpha = torch.randn(batch, modes) * mode_std.float()
    images = (offset + alpha @ matrix.T + noise_std * torch.randn(batch, box * box)) \
        .view(batch, box, box)
    images[0] += 2.0 * matrix[:, 0].view(box, box)  # a posterior far in the prior's tail
    config = tiny_config(latents=("enm_scale",), n_modes=modes)
    known = {"rotation": random_quaternions(batch),
             "defocus": torch.full((batch,), 10000.0)}
    part = Batch(Guide(config), LinearForward(matrix, offset, box), reference.priors,
                 noise_std, images, known, Conditions())
    out = grid_refine(part, Settings(64))

    a = matrix.double()
    precision = a.T @ a / noise_std ** 2 + torch.diag(1 / mode_std ** 2)
    cov = torch.linalg.inv(precision)
    mean = ((images.double().view(batch, -1) - offset.double()) @ a / noise_std ** 2) @ cov
    sd = cov.diagonal().sqrt()
    tolerance = 1e-3 if modes == 1 else 0.15
    assert ((out["modes_mean"].double() - mean) / sd).abs().max() < tolerance
    assert (out["modes_std"].double() / sd - 1).abs().max() < tolerance
    if modes == 1:  # the lattice's intervals (the split grid has none)
        intervals = out["intervals"]["enm_scale"].double()  # (B, K, 2 levels, 2)
        for i, level in enumerate((0.68, 0.95)):
            exact = torch.stack([mean - Z[level] * sd, mean + Z[level] * sd], -1)
            assert ((intervals[:, :, i] - exact) / sd[..., None]).abs().max() < tolerance
    else:
        assert "intervals" not in out
    # the evidence p(x | the given pose and defocus) in closed form: x ~ N(b, s^2 I +
    # A diag(mode_std^2) A^T); the given sites' priors are not part of it (the junk
    # nulls, which it is compared with, have none); the split grid's 100 evaluations
    # give it to 0.1 nats
    marginal = torch.distributions.MultivariateNormal(
        offset.double(), noise_std ** 2 * torch.eye(box * box, dtype=torch.float64)
        + a @ torch.diag(mode_std ** 2) @ a.T)
    exact = marginal.log_prob(images.double().view(batch, -1))
    assert (out["log_evidence"] - exact).abs().max() < (1e-3 if modes == 1 else 0.15)
    # deterministic, equally weighted draws whose moments are the grid's
    draws = out["samples"]["enm_scale"]
    assert draws.shape == (64, batch, modes)
    assert torch.equal(draws, grid_refine(part, Settings(64))["samples"]["enm_scale"])
    # the draws are nodes: the split grid's heavy cells are up to 0.6 posterior stds wide
    assert ((draws.double().mean(0) - mean) / sd).abs().max() < (0.1 if modes == 1 else 0.3)
    assert torch.allclose(out["weights"], torch.full((64, batch), 1 / 64))
    assert (out["ess"] > 3).all()


def test_a_particles_grid_posterior_does_not_depend_on_its_batch():
    """With the real forward model (two modes: the split grid; one: the lattice with its
    per-particle extra levels) a particle refined alone or among others gets the same
    summary, to float rounding."""
    torch.manual_seed(0)
    for modes in (1, 2):
        reference = tiny_reference(n_modes=modes, snr=20.0)
        forward = reference.forward_model()
        rotation, defocus = random_quaternions(6), 10000 + 2500 * torch.randn(6)
        alpha = torch.randn(6, modes) * 2
        with torch.no_grad():
            clean = forward(alpha, rotation, defocus)
        noise_std = float(clean.std()) / math.sqrt(20.0)
        images = clean + noise_std * torch.randn_like(clean)
        guide = Guide(tiny_config(latents=("enm_scale",), n_modes=modes))
        known = {"rotation": rotation, "defocus": defocus}
        whole = Batch(guide, forward, reference.priors, noise_std, images, known,
                      Conditions())
        full = grid_refine(whole, Settings(16))
        assert (full["modes_std"] < 0.5).all()  # informative: the likelihood did work
        for i in (0, 3, 5):
            alone = grid_refine(whole.take(torch.tensor([i])), Settings(16))
            for key in ("modes_mean", "modes_std", "ess"):
                torch.testing.assert_close(alone[key][0], full[key][i], atol=1e-5,
                                           rtol=1e-5)
            torch.testing.assert_close(alone["samples"]["enm_scale"][:, 0],
                                       full["samples"]["enm_scale"][:, i])


def test_auto_takes_the_grid_for_the_amplitudes_alone():
    """'auto' (which otherwise needs the data set's SNR) runs the grid for a run that
    infers 1 or 2 modes alone; with 3 modes or a joint run the grid is refused and the
    SNR rule applies."""
    reference = tiny_reference(n_modes=2)
    forward = reference.forward_model()
    torch.manual_seed(1)
    rotation = random_quaternions(3)
    with torch.no_grad():
        images = forward(torch.randn(3, 2), rotation, torch.full((3,), 1e4)) \
            + 0.1 * torch.randn(3, 16, 16)
    known = {"rotation": rotation, "defocus": torch.full((3,), 1e4)}
    guide = Guide(tiny_config(latents=("enm_scale",), n_modes=2))
    out = refine(guide, forward, reference.priors, 0.1, images, known, 8, method="auto")
    assert (out["evaluations"] == 6 * 6 + 2 * 4 * 8).all() and "smc_fallback" not in out
    assert grid_dimension(("enm_scale",), tiny_config(n_modes=1)) == 1
    assert grid_dimension(("enm_scale",), tiny_config(n_modes=3)) is None
    assert grid_dimension(("defocus", "enm_scale"), tiny_config(n_modes=1)) is None
    joint = Guide(tiny_config(latents=("defocus", "enm_scale"), n_modes=2))
    with pytest.raises(ValueError, match="SNR"):
        refine(joint, forward, reference.priors, 0.1, images, {"rotation": rotation}, 8,
               method="auto")


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory):
    """A tiny run that infers the two modes alone, one that infers everything, and
    held-out particles."""
    root = tmp_path_factory.mktemp("grid")
    reference = tiny_reference(n_modes=2)
    simulate_dataset(reference, 40, root / "train", seed=0)
    simulate_dataset(reference, 12, root / "test", seed=1)
    reference = Reference.load(root / "train" / "reference.npz")
    for name, latents in (("modes", ("enm_scale",)),
                          ("joint", ("defocus", "rotation", "enm_scale"))):
        train(root / "train" / "particles.star", reference, root / name,
              TrainOptions(latents=latents, schedule=tiny_schedule(epochs=1), **TINY),
              progress=False)
    return root


def test_infer_refine_grid_writes_the_usual_columns(modes_run, capsys):
    """``cryosvi infer --refine grid``: the mode columns and their stds, cryosviESS
    (the grid's effective cells), the given pose and defocus unchanged, the samples
    file; on a run that infers the pose too, one error line before any work."""
    root = modes_run
    output = root / "posterior.star"
    assert main(["infer", "--run", str(root / "modes"), "--particles",
                 str(root / "test" / "particles.star"), "-o", str(output),
                 "--refine", "grid", "--samples", "4", "--quiet", "--threads", "1"]) == 0
    assert "effective grid cells" in capsys.readouterr().out
    back = read_particles(output).metadata
    given = read_particles(root / "test" / "particles.star").metadata
    for k in (1, 2):
        assert np.isfinite(back[MODE_COLUMN.format(k)]).all()
        assert (back[f"cryosviModeAmplitudeStd{k}"] > 0).all()
    assert (back["cryosviESS"] >= 1).all()
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU"):
        np.testing.assert_array_equal(back[column].to_numpy(), given[column].to_numpy())
    with np.load(output.with_suffix(".npz")) as samples:
        assert samples["enm_scale"].shape == (12, 4, 2)
        assert samples["weights"].shape == (12, 4)

    refused = root / "refused.star"
    assert main(["infer", "--run", str(root / "joint"), "--particles",
                 str(root / "test" / "particles.star"), "-o", str(refused),
                 "--refine", "grid", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--latents modes" in err and "Traceback" not in err
    assert not refused.exists()
