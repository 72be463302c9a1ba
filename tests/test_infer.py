"""Inference: STAR output round trip, kept columns, samples, fixed latents, importance
sampling and the pose summaries."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from cryosvi.cli.main import main
from cryosvi.distributions import ProjectedNormalMixture
from cryosvi.inference.driver import infer
from cryosvi.inference.refine import refine
from cryosvi.io.particles import MODE_COLUMN, read_particles
from cryosvi.io.star import write_star
from cryosvi.physics.rotations import heaviest_component_mean, pose_std_deg, weighted_mean_direction
from cryosvi.reference import Reference
from cryosvi.physics.rotations import quaternion_geodesic_angle, random_quaternions
from cryosvi.rundir import load_trained
from cryosvi.simulate import simulate_dataset
from cryosvi.training.setup import TrainOptions
from cryosvi.training.loop import train

from test_guide import tiny_reference
from test_train import TINY, tiny_schedule


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (all latents) and one with the pose fixed, plus held-out particles
    with an extra column."""
    root = tmp_path_factory.mktemp("infer")
    reference = tiny_reference(n_modes=2)
    simulate_dataset(reference, 40, root / "train", seed=0)
    simulate_dataset(reference, 20, root / "test", seed=1)
    table = read_particles(root / "test" / "particles.star")
    table.metadata["rlnMicrographName"] = [f"mic{i % 3}.mrc" for i in range(len(table))]
    write_star(root / "test" / "particles.star", table.metadata, table.optics)
    reference = Reference.load(root / "train" / "reference.npz")
    for name, latents in (("run", ("defocus", "rotation", "enm_scale")),
                          ("fixed_pose", ("defocus", "enm_scale"))):
        train(root / "train" / "particles.star", reference, root / name,
              TrainOptions(latents=latents, schedule=tiny_schedule(epochs=1), **TINY),
              progress=False)
    return root


def test_star_output_round_trip(trained, tmp_path):
    output = tmp_path / "posterior.star"
    frame = infer(trained / "run", trained / "test" / "particles.star", output,
                  importance=0, progress=False)
    back = read_particles(output)
    truth = read_particles(trained / "test" / "particles.star")
    assert len(back) == 20 and list(back.metadata["rlnImageName"]) == \
        list(truth.metadata["rlnImageName"])
    assert list(back.metadata["rlnMicrographName"]) == list(truth.metadata["rlnMicrographName"])
    expected = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnDefocusV",
                "cryosviDefocusStd", "cryosviPoseStdDeg", "cryosviPoseRadius68Deg",
                "cryosviPoseRadius95Deg", MODE_COLUMN.format(1),
                MODE_COLUMN.format(2), "cryosviModeAmplitudeStd1", "cryosviModeAmplitudeStd2"]
    for column in expected:
        values = back.metadata[column].to_numpy(float)
        assert np.isfinite(values).all(), column
        np.testing.assert_allclose(values, frame[column].to_numpy(float), rtol=1e-5, atol=1e-4)
    assert (back.metadata["cryosviDefocusStd"] > 0).all()
    assert (back.metadata["cryosviPoseStdDeg"] > 0).all()
    assert (back.metadata["cryosviPoseRadius95Deg"]
            >= back.metadata["cryosviPoseRadius68Deg"]).all()
    assert back.metadata["rlnAngleTilt"].between(0, 180).all()
    assert len(back.optics) == 1


def test_samples_are_written_per_particle(trained, tmp_path):
    output = tmp_path / "posterior.star"
    infer(trained / "run", trained / "test" / "particles.star", output, samples=5,
          importance=0, batch_size=8, progress=False)
    with np.load(tmp_path / "posterior.npz") as samples:
        assert samples["defocus"].shape == (20, 5)
        assert samples["rotation"].shape == (20, 5, 4)
        assert samples["enm_scale"].shape == (20, 5, 2)
        np.testing.assert_allclose(np.linalg.norm(samples["rotation"], axis=-1), 1, atol=1e-5)


def test_fixed_latents_keep_the_input_values(trained, tmp_path):
    output = tmp_path / "posterior.star"
    frame = infer(trained / "fixed_pose", trained / "test" / "particles.star", output,
                  importance=8, moves=1, progress=False)
    truth = read_particles(trained / "test" / "particles.star").metadata
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        np.testing.assert_array_equal(frame[column].to_numpy(), truth[column].to_numpy())
    assert "cryosviPoseStdDeg" not in frame
    assert "cryosviDefocusStd" in frame


def test_importance_sampling_reports_the_ess(trained, tmp_path):
    output = tmp_path / "posterior.star"
    frame = infer(trained / "run", trained / "test" / "particles.star", output,
                  importance=8, moves=1, samples=4, progress=False)
    ess = frame["cryosviESS"].to_numpy()
    assert np.all((ess >= 1 - 1e-4) & (ess <= 8 + 1e-4))
    with np.load(tmp_path / "posterior.npz") as samples:
        assert samples["weights"].shape == (20, 4)


def test_importance_weights_are_p_over_q_recomputed(trained):
    """refine('is') weights against p(x, z) / q(z | x) computed independently: the
    forward model's image and the Gaussian noise density by hand, the priors' closed forms
    (uniform SO(3): 1 / (2 pi^2) on the unit quaternions), q from the guide's training path
    (``Guide.log_prob``, one sample at a time)."""
    _, reference, guide = load_trained(trained / "run")
    # 50x the training noise: a flat enough likelihood that the weights are not one-hot
    # (ESS 2-4 of 6), so q(z | x) visibly matters.
    priors, noise_std = reference.priors, 50 * reference.noise.std
    assert priors.rotation_concentration == 0
    forward = reference.forward_model()
    torch.manual_seed(0)
    with torch.no_grad():  # particles from the model itself
        clean = forward(torch.randn(4, 2) * 2, random_quaternions(4),
                        10000 + 2500 * torch.randn(4))
        images = clean + noise_std * torch.randn_like(clean)
    out = refine(guide, forward, priors, noise_std, images, {}, n_samples=6, method="is",
                 chunk=4)
    samples = {s: v.double() for s, v in out["samples"].items()}
    log_p, log_q = [], []
    with torch.no_grad():
        for s in range(6):
            value = {site: v[s] for site, v in out["samples"].items()}
            clean = forward(value["enm_scale"], value["rotation"], value["defocus"]).double()
            residual = images.double() - clean
            likelihood = (-0.5 * residual.square().sum((-1, -2)) / noise_std ** 2
                          - residual[0].numel() * math.log(noise_std * math.sqrt(2 * math.pi)))
            prior = (-math.log(2 * math.pi ** 2)
                     + torch.from_numpy(stats.norm.logpdf(
                         samples["defocus"][s].numpy(), priors.defocus_mean,
                         priors.defocus_std))
                     + torch.from_numpy(stats.norm.logpdf(
                         samples["enm_scale"][s].numpy(), 0.0,
                         np.array(priors.mode_std)).sum(-1)))
            log_p.append(likelihood + prior)
            log_q.append(sum(guide.log_prob(images, value).values()).double())
    log_w = torch.stack(log_p) - torch.stack(log_q)
    expected = torch.softmax(log_w, dim=0)
    torch.testing.assert_close(out["weights"].double(), expected, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(out["ess"].double(), 1 / expected.square().sum(0),
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out["rotation_mean"].norm(dim=-1), torch.ones(4))


def test_pose_summaries_on_known_rotations():
    torch.manual_seed(0)
    mean = random_quaternions(1)[0]
    # Samples rotated from the mean by known small angles about random axes.
    angle = torch.deg2rad(torch.tensor([2.0, 4.0, 6.0, 8.0]))
    axis = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    delta = torch.cat([torch.cos(angle / 2)[:, None], torch.sin(angle / 2)[:, None] * axis], 1)
    w0, v0 = mean[0], mean[1:]
    w1, v1 = delta[:, 0], delta[:, 1:]
    samples = torch.cat([(w0 * w1 - v1 @ v0)[:, None],
                         w0 * v1 + w1[:, None] * v0 + torch.cross(v0.expand(4, 3), v1,
                                                                   dim=-1)], 1)
    samples = samples * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]  # q and -q mixed
    std = pose_std_deg(samples[:, None], mean[None])
    expected = math.sqrt((4 + 16 + 36 + 64) / 4 / 3)
    assert float(std) == pytest.approx(expected, rel=1e-4)
    weights = torch.tensor([1.0, 0.0, 0.0, 0.0])[:, None]
    assert float(pose_std_deg(samples[:, None], mean[None], weights)) == \
        pytest.approx(2 / math.sqrt(3), rel=1e-4)
    average = weighted_mean_direction(samples[:, None], torch.full((4, 1), 0.25), mean[None])
    assert float(quaternion_geodesic_angle(average, mean[None])) < 8.0


def test_heaviest_component_mean():
    q = random_quaternions(3)
    concentration = torch.stack([5 * q, -40 * q.flip(0)], 1)  # (B=3, K=2, 4)
    mixture = ProjectedNormalMixture(torch.tensor([[0.0, 1.0]] * 3), concentration)
    mean = heaviest_component_mean(mixture)
    assert (mean[:, 0] >= 0).all()
    torch.testing.assert_close(quaternion_geodesic_angle(mean, q.flip(0)), torch.zeros(3),
                               atol=1e-3, rtol=0)


def test_cli_infer_errors(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["infer", "--run", str(tmp_path / "empty"), "--particles",
                 str(trained / "test" / "particles.star"), "-o", str(tmp_path / "p.star")]) == 2
    assert "not a cryosvi run" in capsys.readouterr().err
    assert main(["infer", "--run", str(trained / "run"), "--particles",
                 str(tmp_path / "missing.star"), "-o", str(tmp_path / "p.star")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["infer", "--run", str(trained / "run"), "--particles",
                 str(trained / "test" / "particles.star"), "-o", str(tmp_path / "p.star"),
                 "--importance", "8", "--moves", "1", "--quiet"]) == 0
    assert "wrote the posterior of 20 particles" in capsys.readouterr().out


def test_infer_writes_angstrom_origins_from_a_file_with_pixel_origins(trained, tmp_path,
                                                                       capsys):
    """A RELION 3.1 file with origins in pixels (rlnOriginX/Y, as ASPIRE writes) in,
    RELION 3.1 out: rlnOriginXAngst/YAngst = pixels * pixel size (the run does not infer
    shifts, so they are the file's), no pixel columns. Written and read by starfile."""
    import starfile

    blocks = starfile.read(trained / "test" / "particles.star", always_dict=True)
    particles, optics = blocks["particles"], blocks["optics"]
    pixel = float(optics["rlnImagePixelSize"].iloc[0])
    shifts = np.random.default_rng(3).uniform(-2, 2, (len(particles), 2))
    particles = particles.drop(columns=["rlnOriginXAngst", "rlnOriginYAngst"],
                               errors="ignore")
    particles["rlnOriginX"], particles["rlnOriginY"] = shifts[:, 0], shifts[:, 1]
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "aspire.star")
    (tmp_path / "particles.mrcs").symlink_to(trained / "test" / "particles.mrcs")
    output = tmp_path / "posterior.star"
    assert main(["infer", "--run", str(trained / "run"), "--particles",
                 str(tmp_path / "aspire.star"), "-o", str(output), "--importance", "0",
                 "--quiet"]) == 0, capsys.readouterr().err
    written = starfile.read(output, always_dict=True)
    assert list(written) == ["optics", "particles"]
    rows = written["particles"]
    assert "rlnOriginX" not in rows and "rlnOriginY" not in rows
    np.testing.assert_allclose(rows["rlnOriginXAngst"], shifts[:, 0] * pixel, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(rows["rlnOriginYAngst"], shifts[:, 1] * pixel, rtol=1e-5,
                               atol=1e-6)


def test_rotation_perturbations_have_the_requested_spread():
    """The Metropolis moves rotate by omega ~ N(0, width^2 I_3): RMS angle sqrt(3) width."""
    from cryosvi.physics.rotations import quaternion_product, rotation_vector_to_quaternion

    torch.manual_seed(0)
    centre = random_quaternions(1).expand(20000, 4)
    width = math.radians(5.0)
    q = quaternion_product(centre, rotation_vector_to_quaternion(torch.randn(20000, 3) * width))
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(20000))
    angle = quaternion_geodesic_angle(q, centre)
    assert float(angle.square().mean().sqrt()) == pytest.approx(math.sqrt(3) * 5.0, rel=0.03)


def test_laplace_refinement_agrees_with_a_long_smc(trained):
    """refine('laplace') (Gauss-Newton, Laplace proposal, importance weights) and a
    256-sample tempered SMC with 5 moves target the same posterior: on particles made by
    the model, with the pose known, their defocus and mode means agree within a fraction
    of the posterior std and their stds within 25 %, wherever the Laplace approximation
    was kept (its ESS > S / 4: here all but a particle with a two-mode defocus posterior,
    ESS 1, which went to the SMC)."""
    _, reference, guide = load_trained(trained / "fixed_pose")
    priors, noise_std = reference.priors, reference.noise.std
    forward = reference.forward_model()
    torch.manual_seed(0)
    rotation = random_quaternions(12)
    with torch.no_grad():
        clean = forward(torch.randn(12, 2) * 2, rotation, 10000 + 2500 * torch.randn(12))
        images = clean + noise_std * torch.randn_like(clean)
    known = {"rotation": rotation}
    laplace = refine(guide, forward, priors, noise_std, images, known, 64, method="laplace")
    smc = refine(guide, forward, priors, noise_std, images, known, 256, method="smc", moves=5)
    # Compared where the Laplace path did the work (the others ran a 64-sample SMC).
    kept = ~laplace["smc_fallback"]
    assert kept.float().mean() > 0.5
    assert (laplace["ess"][kept] > 16).all()
    for mean, std in (("defocus_mean", "defocus_std"), ("modes_mean", "modes_std")):
        gap = ((laplace[mean] - smc[mean]).abs() / smc[std])[kept]
        assert gap.median() < 0.3 and gap.max() < 1.5, (mean, gap)
        ratio = (laplace[std] / smc[std])[kept]
        assert ((ratio > 0.75) & (ratio < 1.33)).float().mean() > 0.8, (std, ratio)


def test_laplace_hands_a_particle_to_the_smc_by_its_own_misfit():
    """``_stuck`` judges each particle alone: noise-only residuals (a correct mode) are
    flagged at the chi^2_P tail rate P(|r|^2 > P + 8 sqrt(P / 2)) (scipy), a mode that
    leaves signal in the residuals and an ESS below S / 4 always, and a particle's flag
    does not change with the other particles of the batch."""
    from cryosvi.inference.refine import _stuck

    pixels, n = 256, 20000
    noise = torch.randn(n, pixels, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    misfit = 0.5 * noise.square().sum(-1)
    ess = torch.full((n,), 50.0)
    flagged = _stuck(misfit, ess, n_samples=64, pixels=pixels).double().mean()
    rate = stats.chi2.sf(pixels + 8 * math.sqrt(pixels / 2), pixels)
    assert abs(float(flagged) - rate) < 5 * math.sqrt(rate / n) + 1e-4
    local = 0.5 * (noise[:3] + 1.0).square().sum(-1)  # signal left: P / 2 more
    low = torch.tensor([50.0, 50.0, 10.0])
    stuck = _stuck(torch.cat([misfit[:3], local]), torch.cat([ess[:3], low]), 64, pixels)
    assert stuck[3:].all()
    assert torch.equal(stuck[:3], _stuck(misfit[:3], ess[:3], 64, pixels))


def test_auto_refinement_picks_by_the_data_sets_snr(trained):
    """``dataset_snr`` is the paper's SNR (clean variance / noise variance) of a
    simulation (``cryosvi simulate`` at SNR 20); 'auto' takes the SMC for every particle
    below LAPLACE_MIN_SNR, the Laplace path above, and needs the SNR."""
    from cryosvi.dataset import ParticleData
    from cryosvi.inference.refine import LAPLACE_MIN_SNR, dataset_snr

    table = read_particles(trained / "test" / "particles.star")
    truth = Reference.load(trained / "test" / "reference.npz")
    data = ParticleData(table, 16, False)
    assert dataset_snr(data, truth.noise.std) == pytest.approx(20.0, abs=1.5)
    assert dataset_snr(data, 3 * truth.noise.std) == pytest.approx(21 / 9 - 1, abs=0.3)

    _, reference, guide = load_trained(trained / "fixed_pose")
    forward = reference.forward_model()
    torch.manual_seed(1)
    rotation = random_quaternions(6)
    with torch.no_grad():
        clean = forward(torch.randn(6, 2) * 2, rotation, 10000 + 2500 * torch.randn(6))
        images = clean + reference.noise.std * torch.randn_like(clean)
    for snr, smc in ((4 * LAPLACE_MIN_SNR, False), (LAPLACE_MIN_SNR / 10, True)):
        out = refine(guide, forward, reference.priors, reference.noise.std, images,
                     {"rotation": rotation}, 16, method="auto", moves=1, snr=snr)
        if smc:
            assert out["smc_fallback"].all() and "steps" in out
        else:
            assert "steps" not in out  # the Laplace path ran (perhaps with a fallback)
    with pytest.raises(ValueError, match="SNR"):
        refine(guide, forward, reference.priors, reference.noise.std, images,
               {"rotation": rotation}, 16, method="auto")
