"""Training: objectives reduce their loss, schedules, run directory, exact resume, NaN
handling and clear errors for bad input."""

import json
import math
import warnings
from dataclasses import replace

import mrcfile
import numpy as np
import pytest
import torch

from cryosvi.cli.main import main
from cryosvi.errors import CryosviError
from cryosvi.guide import Architecture, Guide, native_bf16
from cryosvi.io.particles import read_particles
from cryosvi.io.star import write_star
from cryosvi.latents import REGISTRY
from cryosvi.reference import Reference
from cryosvi.rundir import load_trained
from cryosvi.simulate import simulate_dataset
from cryosvi.training.loop import CHECKPOINT, TrainingDiverged, train
from cryosvi.training.schedule import Stage, default_schedule, load_schedule
from cryosvi.training.setup import TrainOptions
from cryosvi.training.objectives import elbo_loss, simulation_batch, simulation_loss
from cryosvi.latents import known_values
from cryosvi.training.log import read_log

from test_guide import tiny_config, tiny_reference

TINY = dict(architecture=Architecture(channels=(4, 8, 8), hidden=32, n_components=2),
            validation_size=32)


def tiny_schedule(epochs=2, objective="sim", **changes):
    stage = Stage(objective=objective, epochs=epochs, lr=1e-3, batch_size=16,
                  epoch_size=32, decay="cosine", warmup=2)
    return [replace(stage, **changes)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    simulate_dataset(tiny_reference(), 48, root / "data", seed=0)
    return root / "data"


def run_options(**changes):
    values = dict(TINY, schedule=tiny_schedule())
    values.update(changes)
    return TrainOptions(**values)


def load_reference(dataset):
    return Reference.load(dataset / "reference.npz")


# ----------------------------------------------------------------------- objectives
def test_one_svi_step_reduces_the_elbo_on_a_tiny_batch(dataset):
    """Defocus + mode at known pose (all sites reparameterised): with common random
    numbers, one ClippedAdam step along the ELBO gradient lowers the loss."""
    from pyro.optim.clipped_adam import ClippedAdam

    reference = load_reference(dataset)
    table = read_particles(dataset / "particles.star")
    images = torch.from_numpy(table.images(np.arange(8)))
    known = {"rotation": known_values(table, ["rotation"], tiny_config())["rotation"][:8]}
    torch.manual_seed(1)
    guide = Guide(tiny_config(latents=("defocus", "enm_scale"),
                              input_scale=float(images.std())))
    forward = reference.forward_model()

    def loss():
        torch.manual_seed(123)
        return elbo_loss(guide, forward, reference.priors, reference.noise.std, images,
                         known, n_particles=48)

    optimizer = ClippedAdam(guide.parameters(), lr=1e-3)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert math.isfinite(float(before.detach())) and float(after) < float(before.detach())


def test_one_simulation_step_reduces_the_forward_kl():
    reference = tiny_reference()
    reference = reference.with_settings(noise=replace(reference.noise, std=0.3))
    forward = reference.forward_model()
    torch.manual_seed(0)
    latents, images, _ = simulation_batch(reference, forward, 0.3, 16)
    guide = Guide(tiny_config(input_scale=float(images.std())))
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-3)
    before, terms = simulation_loss(guide, latents, images, guide.config.latents)
    assert set(terms) == {"defocus", "rotation", "enm_scale"}
    # each latent's term counts with its weight (the mode's is not 1)
    assert float(before.detach()) == pytest.approx(
        sum(REGISTRY[s].simulation_weight * term for s, term in terms.items()), rel=1e-5)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = simulation_loss(guide, latents, images, guide.config.latents)
    assert float(after) < float(before.detach())


# ------------------------------------------------------------------------ schedules
def test_antithetic_twins_differ_only_in_the_mode_amplitudes():
    """The second half of an antithetic batch: the first half's particles with the mode
    amplitudes negated and the same pose, defocus, conditions and noise; each image is
    the forward model of its own latents plus that noise."""
    from cryosvi.latents import forward_inputs

    reference = tiny_reference()
    forward = reference.forward_model()
    torch.manual_seed(0)
    values, images, conditions = simulation_batch(reference, forward, 0.3, 9,
                                                  antithetic=True)
    assert images.shape[0] == 9 and all(v.shape[0] == 9 for v in values.values())
    drawn, twins = slice(0, 4), slice(5, 9)  # 5 drawn, the first 4 of them twinned
    torch.testing.assert_close(values["enm_scale"][twins], -values["enm_scale"][drawn])
    assert values["enm_scale"].abs().min() > 0
    for site in ("rotation", "defocus"):
        torch.testing.assert_close(values[site][twins], values[site][drawn])
    noise = images - forward(**forward_inputs(values, conditions))
    torch.testing.assert_close(noise[twins], noise[drawn])
    assert 0.25 < float(noise.std()) < 0.35


def test_paper_schedule_file():
    stages = load_schedule("paper")
    assert [s.train for s in stages] == [("modes",), ("defocus",), ("pose",)]
    assert all(s.objective == "elbo" and s.lr == 5e-4 and s.batch_size == 500
               and s.epochs == 20 and s.decay == "constant" for s in stages)
    # 10 000 particles, batch 500: 20 steps per epoch, 400 per stage (the paper's numbers).
    assert stages[0].steps_per_epoch(10000) * stages[0].epochs == 400
    assert stages[0].trained_sites(("defocus", "enm_scale")) == ("enm_scale",)
    assert stages[2].trained_sites(("defocus", "enm_scale")) == ()
    assert load_schedule("paper", {"lr": 1e-3})[1].lr == 1e-3


def test_schedule_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[stage]]\nepochs = 2\nlearning_rate = 1\n")
    with pytest.raises(CryosviError, match="unknown key"):
        load_schedule(bad)
    bad.write_text("[[stage]]\nobjective = 'csis'\n")
    with pytest.raises(CryosviError, match="unknown objective"):
        load_schedule(bad)
    with pytest.raises(CryosviError, match="not found"):
        load_schedule(tmp_path / "missing.toml")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"defaults": {"lr": 0.01},
                                "stage": [{"objective": "sim", "epochs": 1}]}))
    assert load_schedule(good)[0].lr == 0.01


def test_cosine_schedule_with_warmup():
    stage = Stage(lr=1e-3, decay="cosine", warmup=10, final_lr_fraction=0.01)
    assert stage.lr_at(0, 110) == pytest.approx(1e-4)
    assert stage.lr_at(10, 110) == pytest.approx(1e-3)
    assert stage.lr_at(109, 110) == pytest.approx(1e-5, rel=0.05)
    assert Stage(decay="constant").lr_at(50, 100) == Stage().lr
    assert [s.objective for s in default_schedule("sim+elbo", 8, None, None)] == ["sim", "elbo"]


# --------------------------------------------------------------------- run directory
def test_train_writes_a_run_directory(dataset, tmp_path):
    info = train(dataset / "particles.star", load_reference(dataset), tmp_path / "run",
                 run_options(precision="bf16"), progress=False)
    run = tmp_path / "run"
    for name in ("run.json", "reference.npz", "checkpoint.pt", "log.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert info["status"] == "finished" and info["epochs_done"] == 2
    log = read_log(run / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(math.isfinite(r["loss"]) and "val_pose_median_deg" in r for r in log)
    stored = json.loads((run / "run.json").read_text())
    assert stored["guide"]["input_scale"] > 0 and stored["noise_std"] > 0
    _, reference, guide = load_trained(run)
    assert reference.noise.std == pytest.approx(stored["noise_std"])
    assert not guide.training
    # trained with a bf16 trunk; inferred so where the CPU has bf16 in hardware
    assert stored["precision"] == "bf16"
    assert guide.bf16 == native_bf16(torch.device("cpu"))
    with pytest.raises(CryosviError, match="already holds a run"):
        train(dataset / "particles.star", load_reference(dataset), run, run_options(),
              progress=False)


def test_resume_continues_exactly(dataset, tmp_path):
    schedule = tiny_schedule(epochs=1) + tiny_schedule(epochs=2, objective="elbo",
                                                       decay="constant")
    options = run_options(schedule=schedule)
    reference = load_reference(dataset)
    train(dataset / "particles.star", reference, tmp_path / "whole", options, progress=False)
    stopped = train(dataset / "particles.star", reference, tmp_path / "parts", options,
                    progress=False, max_epochs=2)
    assert stopped["status"] == "stopped" and stopped["epochs_done"] == 2
    resumed = train(None, None, tmp_path / "parts", resume=True, progress=False)
    assert resumed["status"] == "finished" and resumed["epochs_done"] == 3
    whole = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)
    parts = torch.load(tmp_path / "parts" / CHECKPOINT, weights_only=True)
    timing = ("seconds",)
    assert {k: v for k, v in whole["position"].items() if k not in timing} == \
        {k: v for k, v in parts["position"].items() if k not in timing}
    for name, value in whole["guide"].items():
        torch.testing.assert_close(parts["guide"][name], value, rtol=0, atol=0)
    assert [r["loss"] for r in read_log(tmp_path / "whole" / "log.jsonl")] == \
        [r["loss"] for r in read_log(tmp_path / "parts" / "log.jsonl")]


def test_the_last_tenth_of_a_stage_keeps_the_batch_norm_statistics(dataset, tmp_path):
    """Epoch 10 of 10 trains with BatchNorm frozen: its running statistics stay as epoch 9
    left them while the weights move; epoch 9 still updated them."""
    options = run_options(schedule=tiny_schedule(epochs=10))
    run = tmp_path / "run"
    train(dataset / "particles.star", load_reference(dataset), run, options,
          progress=False, max_epochs=8)
    states = [torch.load(run / CHECKPOINT, weights_only=True)["guide"]]
    for _ in (9, 10):
        train(None, None, run, resume=True, progress=False, max_epochs=1)
        states.append(torch.load(run / CHECKPOINT, weights_only=True)["guide"])
    statistics = [k for k in states[0] if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in states[0] if k.startswith("trunk.") and k.endswith("weight")]
    assert statistics and weights
    assert any(not torch.equal(states[0][k], states[1][k]) for k in statistics)
    for k in statistics:
        torch.testing.assert_close(states[2][k], states[1][k], rtol=0, atol=0)
    assert any(not torch.equal(states[1][k], states[2][k]) for k in weights)


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(dataset, tmp_path,
                                                                 monkeypatch):
    import cryosvi.training.loop as training

    calls = {"n": 0}
    original = training.simulation_loss

    def poisoned(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] == 3 else loss), terms

    monkeypatch.setattr(training, "simulation_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 3.*epoch 1"):
        train(dataset / "particles.star", load_reference(dataset), run, run_options(),
              progress=False)
    state = torch.load(run / CHECKPOINT, weights_only=True)
    assert state["position"]["epoch"] == 1 and state["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["guide"].values())


# ------------------------------------------------------------------------ bad input
def test_clear_errors_for_bad_input(dataset, tmp_path):
    reference = load_reference(dataset)
    star = read_particles(dataset / "particles.star")
    # Pose fixed (not inferred) but the angles are missing.
    write_star(dataset / "no_angles.star", star.metadata.drop(columns=["rlnAngleTilt"]),
               star.optics)
    with pytest.raises(CryosviError, match="missing STAR column.*rlnAngleTilt"):
        train(dataset / "no_angles.star", reference, tmp_path / "a",
              run_options(latents=("defocus", "enm_scale")), progress=False)
    # Box and pixel size must match the reference.
    other = reference.with_settings(optics=replace(reference.optics, box=24))
    with pytest.raises(CryosviError, match="24 px"):
        train(dataset / "particles.star", other, tmp_path / "b", run_options(),
              progress=False)
    other = reference.with_settings(optics=replace(reference.optics, pixel_size=4.0))
    with pytest.raises(CryosviError, match="pixel size"):
        train(dataset / "particles.star", other, tmp_path / "c", run_options(),
              progress=False)
    # NaN images.
    bad = tmp_path / "nan"
    bad.mkdir()
    with mrcfile.open(dataset / "particles.mrcs") as mrc:
        data = mrc.data.copy()
    data[5, 3, 3] = np.nan
    with mrcfile.new(bad / "particles.mrcs") as mrc, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN we put there
        mrc.set_data(data)
        mrc.voxel_size = 5.0
    write_star(bad / "particles.star", star.metadata, star.optics)
    with pytest.raises(CryosviError, match="particle 6 contains NaN"):
        train(bad / "particles.star", reference, tmp_path / "d", run_options(),
              progress=False)
    # Not a run.
    (tmp_path / "empty").mkdir()
    with pytest.raises(CryosviError, match="not a cryosvi run"):
        train(None, None, tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(CryosviError, match="not a cryosvi run"):
        load_trained(tmp_path / "empty")


def test_cli_train_and_resume(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "--particles", str(dataset / "particles.star"), "--reference",
              str(dataset / "reference.npz"), "-o", str(run), "--epochs", "1",
              "--epoch-size", "32", "--batch-size", "16", "--channels", "4,8,8",
              "--hidden", "32", "--components", "2", "--quiet"]
    assert main(common + ["--latents", "pose,defocus"]) == 0
    assert "trained" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["latents"] == ["defocus", "rotation"]
    assert main(["train", "-o", str(run), "--resume", "--quiet"]) == 0
    assert main(common) == 2  # exists
    assert "already holds a run" in capsys.readouterr().err
    assert main(common + ["--latents", "pose,shift", "--force"]) == 2
    assert main(["train", "-o", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_noise_std_is_estimated_from_the_images(dataset):
    """Without a noise std in the reference (e.g. built from --structure), prepare()
    measures the gray levels and noise in the particles (cryosvi.physics.graylevels)."""
    from cryosvi.training.setup import prepare

    reference = load_reference(dataset)
    unknown = reference.with_settings(noise=replace(reference.noise, std=0.0))
    _, _, prepared, _, _ = prepare(dataset / "particles.star", unknown, run_options())
    assert prepared.noise.std == pytest.approx(reference.noise.std, rel=0.1)
    assert prepared.imaging.scale == pytest.approx(1.0, rel=0.1)


def test_init_from_another_run(dataset, tmp_path):
    from cryosvi.guide import GuideConfig
    from cryosvi.training.setup import initialise_from

    train(dataset / "particles.star", load_reference(dataset), tmp_path / "pre",
          run_options(), progress=False)
    info, _, trained = load_trained(tmp_path / "pre")
    fresh = Guide(GuideConfig.from_dict(info["guide"]))
    initialise_from(fresh, tmp_path / "pre", "cpu")
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value)
    other = Guide(GuideConfig.from_dict({**info["guide"], "hidden": 16}))
    with pytest.raises(CryosviError, match="differs in hidden"):
        initialise_from(other, tmp_path / "pre", "cpu")


@pytest.mark.slow
def test_joint_training_reaches_the_targets_at_reduced_size(tmp_path):
    """Paper preset (1OL5, 32 px, SNR 20): a small simulation-trained guide (60 000
    samples) plus tempered SMC (64 samples, 6 moves) on 150 held-out particles meets
    the targets (defocus and mode r >= 0.95, pose median <= 5 deg, 95 % intervals
    covering 85-99 % at this size). With half the samples the pose guide is still near
    uniform and 1-5 of the 150 particles end in a wrong pose (a flip, or a few degrees
    traded against the mode): over six draws mode r 0.925-0.999, a coin toss at 0.95."""
    from cryosvi.config import PAPER_PRESET
    from cryosvi.evaluate import evaluate_tables
    from cryosvi.inference.driver import infer
    from cryosvi.reference import build_reference

    reference = build_reference(None, None, 2, **PAPER_PRESET)
    simulate_dataset(reference, 2000, tmp_path / "train", seed=0)
    simulate_dataset(reference, 150, tmp_path / "test", seed=1)
    schedule = [Stage(objective="sim", epochs=12, lr=2e-3, batch_size=128, epoch_size=5000,
                      decay="cosine", warmup=50)]
    options = TrainOptions(schedule=schedule, architecture=Architecture(
        channels=(16, 32, 64), hidden=256, shared_trunk=True))
    train(tmp_path / "train" / "particles.star",
          Reference.load(tmp_path / "train" / "reference.npz"), tmp_path / "run", options,
          progress=False)
    infer(tmp_path / "run", tmp_path / "test" / "particles.star", tmp_path / "post.star",
          importance=64, moves=6, progress=False)
    metrics = evaluate_tables(read_particles(tmp_path / "post.star"),
                              read_particles(tmp_path / "test" / "particles.star"))
    defocus, mode, pose = metrics["latents"]["defocus"], metrics["latents"]["mode1"], \
        metrics["pose"]
    print({"defocus_r": defocus["pearson_r"], "mode_r": mode["pearson_r"],
           "pose_median": pose["median_error_deg"], "cov95": [defocus["coverage95"],
                                                              mode["coverage95"],
                                                              pose["coverage95"]]})
    assert defocus["pearson_r"] >= 0.95 and mode["pearson_r"] >= 0.95
    assert pose["median_error_deg"] <= 5.0
    for latent in (defocus, mode, pose):
        assert 0.85 <= latent["coverage95"] <= 0.99


def write_ca_pdb(path, coords):
    """A PDB file with one alanine CA per coordinate (chain A)."""
    lines = [f"ATOM  {i + 1:5d}  CA  ALA A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00"
             f"           C" for i, (x, y, z) in enumerate(coords)]
    path.write_text("\n".join(lines + ["END"]) + "\n")


def test_cli_train_from_a_structure_estimates_the_noise(dataset, tmp_path):
    """--structure builds the reference with the particles' optics; the noise std is then
    measured in the images (the simulated truth is in the data set's reference.npz)."""
    reference = load_reference(dataset)
    write_ca_pdb(tmp_path / "tiny.pdb", reference.coords)
    run = tmp_path / "run"
    assert main(["train", "--particles", str(dataset / "particles.star"), "--structure",
                 str(tmp_path / "tiny.pdb"), "--stride", "1", "--sigma", "4", "-o", str(run),
                 "--epochs", "1", "--epoch-size", "32", "--batch-size", "16",
                 "--channels", "4,8,8", "--hidden", "32", "--components", "2",
                 "--quiet"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["noise_std"] == pytest.approx(reference.noise.std, rel=0.15)


# ------------------------------------------------------------------- scale and devices
def test_a_simulation_epoch_is_a_constant_whatever_the_particles(dataset, tmp_path):
    """The default simulation epoch is SIM_EPOCH_SIZE draws (40 steps of 256: the
    demo's and the paper preset's 10 000 particles keep their numbers) for 48 particles
    or a million; --epoch-size overrides it; an ELBO epoch is still a pass over the
    particles; a run.json from before the constant resumes with its particle count."""
    from cryosvi.cli.main import build_parser
    from cryosvi.cli.train import options_from_args
    from cryosvi.config import SIM_BATCH, SIM_EPOCH_SIZE
    from cryosvi.training.setup import options_from_info

    sim, elbo = default_schedule("sim+elbo", 4, None, None)
    assert sim.epoch_size == SIM_EPOCH_SIZE == 10_000 and SIM_BATCH == 256
    assert sim.steps_per_epoch(48) == sim.steps_per_epoch(10**6) == 40
    assert sim.steps_per_epoch(10_000) == math.ceil(10_000 / 256)  # one draw per particle
    assert elbo.steps_per_epoch(10**6) == math.ceil(10**6 / 128)
    assert Stage(objective="sim").epoch_size == SIM_EPOCH_SIZE  # schedule files too
    assert load_schedule("paper")[0].epoch_size is None  # ELBO stages have none
    argv = ["train", "--particles", "p.star", "-o", "run", "--epoch-size", "512"]
    assert options_from_args(build_parser(argv).parse_args(argv)).schedule[0].epoch_size \
        == 512
    argv = argv[:-2]
    args = build_parser(argv).parse_args(argv)
    assert options_from_args(args).schedule[0].epoch_size == SIM_EPOCH_SIZE
    assert args.device == "auto"
    info = train(dataset / "particles.star", load_reference(dataset), tmp_path / "run",
                 run_options(schedule=[Stage(objective="sim", epochs=1, batch_size=16,
                                             lr=1e-3)]), progress=False, max_epochs=0)
    assert info["schedule"][0]["epoch_size"] == SIM_EPOCH_SIZE  # recorded in run.json
    old = {**info, "schedule": [{**info["schedule"][0], "epoch_size": None}]}
    assert options_from_info(old).schedule[0].epoch_size == 48  # n_particles


def test_train_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10000, whatever the number of particles)" in text
    assert "(default: auto)" in text and "torchrun" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_gives_the_cpu_numbers(dataset, tmp_path, monkeypatch):
    """The same run on the CPU and on CUDA: the simulations are drawn on the CPU either
    way, so the parameters agree up to float arithmetic (TF32 convolutions off)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    runs = {}
    for device in ("cpu", "cuda"):
        train(dataset / "particles.star", load_reference(dataset), tmp_path / device,
              run_options(precision="fp32"), device=device, progress=False)
        runs[device] = torch.load(tmp_path / device / CHECKPOINT, weights_only=True,
                                  map_location="cpu")
    assert json.loads((tmp_path / "cuda" / "run.json").read_text())["device"] == "cuda"
    for name, value in runs["cpu"]["guide"].items():
        other = runs["cuda"]["guide"][name]
        if value.is_floating_point():
            assert float((other - value).norm() / value.norm().clamp_min(1e-12)) < 1e-3, name
    for a, b in zip(read_log(tmp_path / "cpu" / "log.jsonl"),
                    read_log(tmp_path / "cuda" / "log.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
