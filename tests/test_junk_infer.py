"""The junk column of ``cryosvi infer`` end to end, and the likelihood with a noise model
in the refinement.

References: the junk images' truth (empty images: the noise alone; phase-scrambled
particles: a particle's Fourier amplitudes with random phases, which keeps its power
spectrum and destroys its structure) scored by the area under the ROC curve, computed
here from the Mann-Whitney U statistic (scipy); the white noise model's likelihood
against the Normal one by the DC term written out by hand."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch
from scipy import stats

from cryosvi.cli.main import main
from cryosvi.inference.driver import infer
from cryosvi.inference.refine import Batch, refine
from cryosvi.io.particles import read_particles
from cryosvi.latents import JUNK_COLUMN, forward_inputs
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.noise import NoiseModel
from cryosvi.physics.rotations import random_quaternions
from cryosvi.reference import Reference
from cryosvi.rundir import load_trained
from cryosvi.simulate import simulate_dataset
from cryosvi.training.loop import train
from cryosvi.training.setup import TrainOptions

from test_guide import tiny_reference
from test_train import TINY, tiny_schedule

N_TEST, N_EMPTY, N_SCRAMBLED = 36, 6, 6


@pytest.fixture(scope="module")
def junk_run(tmp_path_factory):
    """A tiny run trained on clean simulations, poses given (as in the research
    prototype's junk experiment: a tiny guide's global pose search would fail particles
    and junk alike), and held-out particles of which the first N_EMPTY are replaced by
    empty images and the next N_SCRAMBLED by phase-scrambled particles."""
    root = tmp_path_factory.mktemp("junk")
    reference = tiny_reference(n_modes=1, snr=2.0)
    simulate_dataset(reference, 40, root / "train", seed=0, progress=False)
    simulate_dataset(reference, N_TEST, root / "test", seed=1, progress=False)
    std = Reference.load(root / "test" / "reference.npz").noise.std
    rng = np.random.default_rng(5)
    with mrcfile.open(root / "test" / "particles.mrcs", "r+") as stack:
        data = stack.data
        box = data.shape[-1]
        for i in range(N_EMPTY):
            data[i] = (data[i].mean() + std * rng.standard_normal((box, box))).astype(
                data.dtype)
        for i in range(N_EMPTY, N_EMPTY + N_SCRAMBLED):
            spectrum = np.fft.rfft2(data[i])
            phases = np.angle(np.fft.rfft2(rng.standard_normal((box, box))))
            phases[0, 0] = 0.0
            data[i] = np.fft.irfft2(np.abs(spectrum) * np.exp(1j * phases),
                                    s=(box, box)).astype(data.dtype)
    train(root / "train" / "particles.star", Reference.load(root / "train" / "reference.npz"),
          root / "run", TrainOptions(latents=("defocus", "enm_scale"),
                                     schedule=tiny_schedule(epochs=2), **TINY),
          progress=False)
    truth = np.zeros(N_TEST, bool)
    truth[:N_EMPTY + N_SCRAMBLED] = True
    return root, truth


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: U / (n1 n0), U the Mann-Whitney statistic."""
    u = stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
    return float(u) / (positive.sum() * (~positive).sum())


@pytest.mark.parametrize("importance, method", [(16, "smc"), (0, "auto")])
def test_junk_probability_ranks_empty_and_scrambled_images(junk_run, tmp_path, importance,
                                                           method):
    """Both kinds of junk rank above the particles (AUC >= 0.9, chance 0.5), whether the
    physics evidence is the SMC's or the guide's importance estimate; the fitted junk
    fraction is above 0."""
    root, truth = junk_run
    frame = infer(root / "run", root / "test" / "particles.star", tmp_path / "post.star",
                  importance=importance, method=method, moves=2, progress=False)
    p = frame[JUNK_COLUMN].to_numpy()
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert auc(p, truth) >= 0.9, (p[truth], p[~truth])
    for kind in (slice(0, N_EMPTY), slice(N_EMPTY, N_EMPTY + N_SCRAMBLED)):
        alone = np.r_[truth[kind], truth[~truth]]
        assert auc(np.r_[p[kind], p[~truth]], alone) >= 0.85
    assert frame.attrs["junk_fraction"] > 0
    written = read_particles(tmp_path / "post.star").metadata
    np.testing.assert_allclose(written[JUNK_COLUMN].to_numpy(), p, rtol=1e-5, atol=1e-8)


def test_max_junk_writes_only_the_particles_below(junk_run, tmp_path, capsys):
    """--max-junk P: the STAR and the samples hold exactly the particles of the full
    output whose junk probability is below P, in their order."""
    root, _ = junk_run
    common = ["infer", "--run", str(root / "run"), "--particles",
              str(root / "test" / "particles.star"), "--importance", "8", "--refine", "is",
              "--samples", "2", "--quiet", "--threads", "1"]
    assert main([*common, "-o", str(tmp_path / "all.star")]) in (0, None)
    full = read_particles(tmp_path / "all.star").metadata
    limit = float(np.median(full[JUNK_COLUMN]))  # some in, some out, whatever the fit
    limit = limit if (full[JUNK_COLUMN] < limit).any() else 1.0
    assert main([*common, "-o", str(tmp_path / "kept.star"), "--max-junk",
                 f"{limit!r}"]) in (0, None)
    kept = read_particles(tmp_path / "kept.star").metadata
    below = full[JUNK_COLUMN].to_numpy() < limit
    assert 0 < len(kept) == below.sum() < len(full) or limit == 1.0
    np.testing.assert_array_equal(kept["rlnImageName"].to_numpy(),
                                  full["rlnImageName"].to_numpy()[below])
    with np.load(tmp_path / "kept.npz") as kept_samples, \
            np.load(tmp_path / "all.npz") as all_samples:
        np.testing.assert_array_equal(kept_samples["defocus"],
                                      all_samples["defocus"][below])
    assert "junk probability below" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: the probability must be in (0, 1]
        main([*common, "-o", str(tmp_path / "x.star"), "--max-junk", "0"])


def test_white_noise_model_in_the_likelihood_is_the_normal_less_its_dc_term(junk_run):
    """``Batch.log_target`` with a white NoiseModel (std s, contrast 1, nothing cropped)
    equals the Normal likelihood's minus the density of the residual's DC coordinate,
    -N rbar^2 / (2 s^2) - log(2 pi s^2) / 2 (rbar the residual's pixel mean), which the
    noise model integrates out with the offset."""
    root, _ = junk_run
    _, reference, guide = load_trained(root / "run")
    forward = reference.forward_model()
    std = 3 * reference.noise.std
    torch.manual_seed(1)
    with torch.no_grad():
        rotation = random_quaternions(4)
        values = {"enm_scale": torch.randn(3, 4, 1),
                  "defocus": 10000 + 2000 * torch.randn(3, 4)}
        images = forward(**forward_inputs({"rotation": rotation,
                                           **{s: v[0] for s, v in values.items()}},
                                          Conditions()))
        images = images + std * torch.randn_like(images)
        box = images.shape[-1]
        white = NoiseModel.white(std, box, reference.optics.pixel_size)
        common = (guide, forward, reference.priors, std, images, {"rotation": rotation},
                  Conditions())
        normal = Batch(*common).log_target(values).double()
        coloured = Batch(*common, noise_model=white).log_target(values).double()
        clean = torch.stack([forward(**forward_inputs(
            {"rotation": rotation, **{s: v[k] for s, v in values.items()}}, Conditions()))
            for k in range(3)])
    rbar = (images[None] - clean).double().mean((-2, -1))
    dc = -box**2 * rbar.square() / (2 * std**2) - 0.5 * math.log(2 * math.pi * std**2)
    torch.testing.assert_close(normal - coloured, dc, rtol=1e-4, atol=2e-2)


def test_laplace_refinement_runs_on_a_coloured_likelihood(junk_run):
    """With a noise model, the Laplace path's Gauss-Newton residuals are the noise
    model's whitened ones: refined poses of clean-ish particles land near the truth, and
    the evidence is finite."""
    root, _ = junk_run
    _, reference, guide = load_trained(root / "run")
    forward = reference.forward_model()
    std = reference.noise.std
    torch.manual_seed(2)
    with torch.no_grad():
        rotation = random_quaternions(6)
        images = forward(torch.zeros(6, 1), rotation, torch.full((6,), 12000.0))
        images = images + std * torch.randn_like(images)
    white = NoiseModel.white(std, images.shape[-1], reference.optics.pixel_size)
    out = refine(guide, forward, reference.priors, std, images, {"rotation": rotation},
                 n_samples=32, method="laplace", noise_model=white)
    assert torch.isfinite(out["log_evidence"]).all()
    error = (out["defocus_mean"] - 12000).abs() / out["defocus_std"]
    assert float(error.median()) < 3
