"""Safe by default: loading a run never runs code, no output replaces an input or
a file cryosvi did not make, numbers are validated before any work, damaged files and
nonsense values end in one ``error:`` line (exit code 2), never a traceback or NaN data.

Commands are driven in-process through ``cryosvi.cli.main.main`` at tiny sizes."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryosvi.cli.main import COMMANDS, build_parser, main
from cryosvi.errors import CryosviError
from cryosvi.guide import Architecture
from cryosvi.io.outputs import MARKER, file_kind
from cryosvi.reference import Reference
from cryosvi.rundir import CHECKPOINT, load_checkpoint, load_trained
from cryosvi.simulate import simulate_dataset
from cryosvi.physics.structure import default_structure_path, load_pseudo_atoms
from cryosvi.training.schedule import Stage
from cryosvi.training.setup import TrainOptions
from cryosvi.training.loop import train

from test_guide import tiny_reference

HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
TINY_GUIDE = ["--channels", "4,8,8", "--hidden", "32", "--components", "2"]


def run_cli(argv) -> tuple[int, str]:
    """Exit code and stderr of ``cryosvi ARGV`` run in-process (argparse's exit too)."""
    stderr = io.StringIO()
    real, sys.stderr = sys.stderr, stderr
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.stderr = real
    return code, stderr.getvalue()


def assert_one_error_line(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_data")
    simulate_dataset(tiny_reference(), 24, root / "data", seed=0)
    return root / "data"


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    directory = tmp_path_factory.mktemp("safety_run") / "run"
    options = TrainOptions(
        architecture=Architecture(channels=(4, 8, 8), hidden=32, n_components=2),
        validation_size=16,
        schedule=[Stage(objective="sim", epochs=1, lr=1e-3, batch_size=8, epoch_size=16)])
    train(dataset / "particles.star", Reference.load(dataset / "reference.npz"), directory,
          options, progress=False)
    return directory


def copy_run(run, destination: Path) -> Path:
    destination.mkdir()
    for path in run.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


# ----------------------------------------------------------------- no code from data
class WritesAFile:
    """Unpickling this object writes ``path``: what a tampered checkpoint could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code ran"))


def test_a_pickle_in_a_checkpoint_is_refused_and_never_runs(run, tmp_path):
    tampered = copy_run(run, tmp_path / "tampered")
    witness = tmp_path / "witness.txt"
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["position"]["payload"] = WritesAFile(witness)
    torch.save(state, tampered / CHECKPOINT)
    # the payload is live: plain pickle loading would run it
    with pytest.raises(CryosviError, match="refusing to load"):
        load_checkpoint(tampered / CHECKPOINT)
    with pytest.raises(CryosviError, match="refusing to load"):
        load_trained(tampered)
    for argv in (["infer", "--run", tampered, "--particles", run.parent / "none.star",
                  "-o", tmp_path / "p.star"],
                 ["train", "-o", tampered, "--resume", "--quiet"],
                 ["train", "--particles", run.parent / "none.star", "--reference",
                  tampered / "reference.npz", "--init", tampered, "-o", tmp_path / "new",
                  "--quiet", *TINY_GUIDE]):
        code, err = run_cli(argv)
        assert code == 2 and "Traceback" not in err, err
    assert not witness.exists()
    # and the same payload does run under a plain unpickler: the test can fail
    pickle.loads(pickle.dumps(WritesAFile(witness)))
    assert witness.read_text() == "code ran"


def test_checkpoints_hold_only_tensors_and_plain_values(run):
    def walk(value):
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and walk(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(walk(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))

    assert walk(torch.load(run / CHECKPOINT, weights_only=True))


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "run.json {}",
                                    "run.json garbage", "architecture", "bad width",
                                    "bad gate", "no reference", "reference garbage"])
def test_damaged_run_directories_give_one_line(run, tmp_path, damage):
    broken = copy_run(run, tmp_path / "broken")
    checkpoint = broken / CHECKPOINT
    if damage == "empty":
        checkpoint.write_bytes(b"")
    elif damage == "garbage":
        checkpoint.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    elif damage == "run.json {}":
        (broken / "run.json").write_text("{}")
    elif damage == "run.json garbage":
        (broken / "run.json").write_bytes(b"\xff\xfe{")
    elif damage == "architecture":
        info = json.loads((broken / "run.json").read_text())
        info["guide"]["hidden"] = 16
        (broken / "run.json").write_text(json.dumps(info))
    elif damage in ("bad width", "bad gate"):  # values no network can have
        info = json.loads((broken / "run.json").read_text())
        info["guide"].update({"hidden": -3} if damage == "bad width" else
                             {"gated_conditioning": True, "gate_hidden": "x"})
        (broken / "run.json").write_text(json.dumps(info))
    elif damage == "no reference":
        (broken / "reference.npz").unlink()
    else:
        (broken / "reference.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CryosviError) as caught:
        load_trained(broken)
    assert "\n" not in str(caught.value)
    code, err = run_cli(["train", "-o", broken, "--resume", "--quiet"])
    assert_one_error_line(code, err)


# ------------------------------------------------------------------- nothing overwritten
def test_infer_never_replaces_an_input_or_a_foreign_file(run, dataset, tmp_path):
    star = tmp_path / "particles.star"
    star.write_bytes((dataset / "particles.star").read_bytes())
    (tmp_path / "particles.mrcs").symlink_to(dataset / "particles.mrcs")
    before = star.read_bytes()
    base = ["infer", "--run", run, "--particles", star, "--importance", "0", "--quiet"]
    for output, extra, fragment in (
            (star, ["--force"], "also an input"),
            (tmp_path / "post.npz", ["--samples", "4"], ".star"),
            (tmp_path, [], ".star")):
        code, err = run_cli(base + ["-o", output, *extra])
        assert_one_error_line(code, err, fragment)
    assert star.read_bytes() == before
    # a data set's reference.npz is not replaced by --samples, even with --force
    reference = dataset / "reference.npz"
    kept = reference.read_bytes()
    for extra in ([], ["--force"]):
        code, err = run_cli(base + ["-o", dataset / "reference.star", "--samples", "2",
                                    *extra])
        assert_one_error_line(code, err, "reference.npz")
    assert reference.read_bytes() == kept and not (dataset / "reference.star").exists()
    # a file cryosvi did not write is never replaced; its own posterior only with --force
    foreign = tmp_path / "mine.star"
    foreign.write_text("data_\nloop_\n_rlnImageName #1\n1@x.mrcs\n")
    for extra in ([], ["--force"]):
        code, err = run_cli(base + ["-o", foreign, *extra])
        assert_one_error_line(code, err)
    assert foreign.read_text().startswith("data_")
    posterior = tmp_path / "post.star"
    assert run_cli(base + ["-o", posterior, "--samples", "2"])[0] == 0
    assert file_kind(posterior) == "posterior" and file_kind(tmp_path / "post.npz") == "samples"
    code, err = run_cli(base + ["-o", posterior])
    assert_one_error_line(code, err, "--force")
    assert run_cli(base + ["-o", posterior, "--samples", "2", "--force"])[0] == 0
    # the earlier samples would describe another inference: --force removes them
    assert run_cli(base + ["-o", posterior, "--force"])[0] == 0
    assert file_kind(posterior) == "posterior" and not (tmp_path / "post.npz").exists()
    assert run_cli(base + ["-o", posterior, "--samples", "2", "--force"])[0] == 0
    posterior.unlink()  # without --force, a stale .npz beside a new name is refused
    code, err = run_cli(base + ["-o", posterior])
    assert_one_error_line(code, err, "earlier inference")
    assert (tmp_path / "post.npz").exists()
    # the simulated ground truth is not a posterior: --force does not replace it either
    truth = tmp_path / "truth.star"
    truth.write_bytes(before)
    code, err = run_cli(base + ["-o", truth, "--force"])
    assert_one_error_line(code, err, "particles")


def test_infer_replaces_its_posterior_in_the_run_folder_only_with_force(run, dataset,
                                                                         tmp_path):
    """A posterior written into the run folder is an output, not one of the run's files:
    refused without --force, replaced with it; the run's own files never are."""
    own = copy_run(run, tmp_path / "run")
    base = ["infer", "--run", own, "--particles", dataset / "particles.star",
            "--importance", "0", "--quiet"]
    posterior = own / "posterior.star"

    def rows():  # the file without comments (a '# Created ... <time>' line) and blanks
        return [line for line in posterior.read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    assert run_cli(base + ["-o", posterior])[0] == 0
    first, kept = rows(), posterior.read_bytes()
    code, err = run_cli(base + ["-o", posterior])
    assert_one_error_line(code, err, "--force")
    assert posterior.read_bytes() == kept
    posterior.write_text("\n".join(first[:-1]) + "\n")  # its last row lost: replaced
    assert run_cli(base + ["-o", posterior, "--force"])[0] == 0
    assert rows() == first
    # the run's reference.npz is an input: --samples never replaces it
    kept = (own / "reference.npz").read_bytes()
    code, err = run_cli(base + ["-o", own / "reference.star", "--samples", "2", "--force"])
    assert_one_error_line(code, err, "also an input")
    assert (own / "reference.npz").read_bytes() == kept
    assert not (own / "reference.star").exists()


def test_unwritable_output_is_refused_before_any_work(run, dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(["infer", "--run", run, "--particles", dataset / "particles.star",
                         "-o", blocker / "post.star", "--importance", "0", "--quiet"])
    assert_one_error_line(code, err, "not a directory")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = run_cli(["simulate", "-o", locked / "out", "-n", "2"])
        assert_one_error_line(code, err, "not writable")


def test_simulate_force_replaces_only_a_cryosvi_data_set(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("years of work")
    for extra in ([], ["--force"]):
        code, err = run_cli(["simulate", "-o", foreign, "-n", "2", *extra])
        assert_one_error_line(code, err, "not made by cryosvi")
    assert (foreign / "chapter1.tex").read_text() == "years of work"
    ours = tmp_path / "ours"
    assert run_cli(["simulate", "-o", ours, "-n", "2"])[0] == 0
    assert json.loads((ours / MARKER).read_text())["kind"] == "dataset"
    code, err = run_cli(["simulate", "-o", ours, "-n", "2"])
    assert_one_error_line(code, err, "--force")
    assert run_cli(["simulate", "-o", ours, "-n", "3", "--force"])[0] == 0
    with mrcfile.open(ours / "particles.mrcs") as stack:
        assert stack.data.shape[0] == 3


def test_modes_and_bench_do_not_overwrite_without_force(tmp_path):
    output = tmp_path / "modes.npz"
    assert run_cli(["modes", "--n-modes", "2", "-o", output])[0] == 0
    code, err = run_cli(["modes", "--n-modes", "2", "-o", output])
    assert_one_error_line(code, err, "--force")
    assert run_cli(["modes", "--n-modes", "2", "-o", output, "--force"])[0] == 0
    # a modes file given where a reference is expected: said so, in one line
    code, err = run_cli(["train", "--particles", tmp_path / "none.star", "--reference",
                         output, "-o", tmp_path / "run"])
    assert_one_error_line(code, err, "it is a cryosvi modes file")
    report = tmp_path / "bench.json"
    report.write_text('{"mine": 1}')
    for extra in ([], ["--force"]):
        code, err = run_cli(["bench", "--settings", "toy", "--no-svi", "--json", report,
                             *extra])
        assert_one_error_line(code, err)
    assert report.read_text() == '{"mine": 1}'


# ----------------------------------------------------------------------- leftovers
def test_stale_staging_folder_of_a_killed_simulate_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / ".out.cryosvi-staging.abc123"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"cryosvi": "0", "kind": "staging",
                                            "pid": int(dead)}))
    (stale / "particles.mrcs").write_bytes(b"\0" * 4096)
    foreign = tmp_path / ".out.cryosvi-staging.foreign"  # no marker: not ours
    foreign.mkdir()
    code, err = run_cli(["simulate", "-o", tmp_path / "out", "-n", "2"])
    assert code == 0 and f"removed {stale}" in err
    assert not stale.exists() and foreign.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "out"]


def test_train_killed_before_its_first_checkpoint_restarts_with_the_same_command(
        dataset, tmp_path):
    output = tmp_path / "run"
    command = ["train", "--particles", dataset / "particles.star", "--reference",
               dataset / "reference.npz", "-o", output, "--epochs", "1", "--epoch-size",
               "16", "--batch-size", "8", "--quiet", *TINY_GUIDE]
    # what a kill before the first checkpoint leaves: run.json, reference.npz, no checkpoint
    options = TrainOptions(architecture=Architecture(channels=(4, 8, 8), hidden=32,
                                                     n_components=2), validation_size=16)
    train(dataset / "particles.star", Reference.load(dataset / "reference.npz"), output,
          options, max_epochs=0, progress=False)
    assert not (output / CHECKPOINT).exists()
    code, err = run_cli(["train", "-o", output, "--resume", "--quiet"])
    assert_one_error_line(code, err, "same command without --resume")
    code, err = run_cli(command)
    assert code == 0 and "never finished an epoch" in err, err
    assert (output / CHECKPOINT).is_file()
    code, err = run_cli(command)  # now there is something to lose
    assert_one_error_line(code, err, "--resume", "--force")


def test_train_refuses_a_directory_it_did_not_make(dataset, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        code, err = run_cli(["train", "--particles", dataset / "particles.star",
                             "--reference", dataset / "reference.npz", "-o", home,
                             "--quiet", *extra])
        assert_one_error_line(code, err, "not made by cryosvi")
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------- validation
@pytest.mark.parametrize("arguments, fragment", [
    (["--snr", "1e-300"], "--snr"), (["--cs", "nan"], "--cs"), (["--cs", "inf"], "--cs"),
    (["--defocus-mean", "inf"], "--defocus-mean"),
    (["--defocus-mean", "1e300"], "--defocus-mean"),
    (["--defocus-std", "inf"], "--defocus-std"), (["--defocus-std", "1e300"], "--defocus-std"),
    (["--defocus-std", "0"], "--defocus-std"), (["--mode-std", "inf"], "--mode-std"),
    (["--mode-std", "1e300"], "--mode-std"), (["--sigma", "1e-30"], "quarter pixel"),
    (["--seed", "-1"], "--seed"), (["--device", "bogus"], "--device"),
    (["--sigma", "inf"], "--sigma"), (["--sigma", "nan"], "--sigma"),
    (["--pixel-size", "inf"], "--pixel-size"), (["--sigma", "1e6"], "window"),
    (["--window", "100000"], "window"), (["--box", "20000"], "box"),
    (["--max-shift", "1000"], "half the box"),
])
def test_simulate_refuses_nonsense_numbers_before_any_work(tmp_path, arguments, fragment):
    code, err = run_cli(["simulate", "-o", tmp_path / "out", "-n", "2", *arguments])
    assert_one_error_line(code, err, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["simulate", "-n", "2"], ["demo", "--quiet"]])
def test_cuda_without_cuda_is_one_line(tmp_path, command):
    code, err = run_cli([command[0], "-o", tmp_path / "out", "--device", "cuda",
                         *command[1:]])
    assert_one_error_line(code, err, "CUDA")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--lr", "nan"),
                                           ("--noise-std", "inf"), ("--noise-std", "nan"),
                                           ("--mode-std", "inf"), ("--sigma", "nan"),
                                           ("--seed", "-1"), ("--device", "bogus"),
                                           ("--batch-size", "0"), ("--channels", "4,x")])
def test_train_refuses_nonsense_numbers(dataset, tmp_path, option, value):
    code, err = run_cli(["train", "--particles", dataset / "particles.star", "--reference",
                         dataset / "reference.npz", "-o", tmp_path / "run", option, value])
    assert_one_error_line(code, err, option)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, fragment", [
    ("[[stage]]\nepochs = 'many'\n", "epochs"), ("[[stage]]\nlr = nan\n", "lr"),
    ("stage = 3\n", "list of tables"), ("[[stage]]\ntrain = 'pose'\n", "train"),
    ("\xff\xfe", "schedule"), ("[[stage]\n", "cannot read")])
def test_damaged_schedule_files_give_one_line(dataset, tmp_path, text, fragment):
    schedule = tmp_path / "schedule.toml"
    schedule.write_bytes(text.encode("latin-1"))
    code, err = run_cli(["train", "--particles", dataset / "particles.star", "--reference",
                         dataset / "reference.npz", "-o", tmp_path / "run", "--schedule",
                         schedule, "--quiet"])
    assert_one_error_line(code, err, fragment)


# ------------------------------------------------------------------------ help texts
def subcommand_parsers():
    for name in COMMANDS:
        parser = build_parser([name])
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        yield name, action.choices[name]


def test_every_option_states_its_default_once():
    for name, parser in subcommand_parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            label = f"{name} {action.option_strings[-1]}"
            assert action.help, f"{label} has no help text"
            text = formatter._expand_help(action)
            if action.required:
                assert "default" not in text.lower(), label
                continue
            assert text.lower().count("default") == 1, f"{label}: {text!r}"
            assert "(default: None)" not in text, label


def test_help_of_every_command_prints(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert "(default: None)" not in capsys.readouterr().out


# ------------------------------------------------------------------ property tests
BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e-300", "1e300", "abc", "", "2.5",
               "1e6", "99999999999999999999", "0x10"]
NUMBER = st.one_of(st.sampled_from(BAD_NUMBERS), st.floats().map(repr),
                   st.integers(-10**6, 10**6).map(str))
SMALL_INTEGER = st.sampled_from(["-1", "0", "1", "2", "3", "2.5", "nan", "abc", "1e3",
                                 "99999999999999999999"])

SIMULATE_FLOATS = ["--pixel-size", "--sigma", "--snr", "--defocus-mean", "--defocus-std",
                   "--voltage", "--cs", "--amp-contrast", "--mode-std"]
SIMULATE_INTEGERS = ["--stride", "-n", "--box", "--window", "--n-modes", "--seed"]


def check_simulated(directory: Path):
    with mrcfile.open(directory / "particles.mrcs", permissive=True) as stack:
        assert np.isfinite(stack.data).all()
        assert stack.data.std() > 0
    reference = Reference.load(directory / "reference.npz")
    assert math.isfinite(reference.noise.std)


@HYPOTHESIS
@given(options=st.dictionaries(st.sampled_from(SIMULATE_FLOATS), NUMBER, max_size=3),
       integers=st.dictionaries(st.sampled_from(SIMULATE_INTEGERS), SMALL_INTEGER,
                                max_size=2))
def test_simulate_numbers_property(tmp_path_factory, options, integers):
    output = tmp_path_factory.mktemp("sim") / "out"
    argv = ["simulate", "-o", output]
    values = {"-n": "2", **integers, **options}
    for option, value in values.items():
        argv += [f"{option}={value}"]
    code, err = run_cli(argv)
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 0:
        check_simulated(output)
    else:
        assert_one_error_line(code, err)
        assert not output.exists()


MODES_NUMBERS = {"--cutoff": NUMBER, "--gamma": NUMBER, "--movie-amplitude": NUMBER,
                 "--stride": SMALL_INTEGER, "--n-modes": SMALL_INTEGER,
                 "--movie-frames": SMALL_INTEGER}


@HYPOTHESIS
@given(option=st.sampled_from(sorted(MODES_NUMBERS)), data=st.data())
def test_modes_numbers_property(tmp_path_factory, option, data):
    value = data.draw(MODES_NUMBERS[option])
    directory = tmp_path_factory.mktemp("modes")
    code, err = run_cli(["modes", "-o", directory / "m.npz", "--movie", directory / "movie",
                         f"{option}={value}"])
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 0:
        with np.load(directory / "m.npz") as saved:
            assert np.isfinite(saved["modes"]).all() and np.isfinite(saved["eigenvalues"]).all()
    else:
        assert_one_error_line(code, err)


VALIDATED_ONLY = {
    "train": (["--epochs", "--finetune-epochs", "--epoch-size", "--batch-size", "--lr",
               "--noise-std", "--mode-std", "--sigma", "--stride", "--n-modes", "--hidden",
               "--components", "--seed", "--threads", "--channels"],
              ["--particles", "{data}/particles.star", "--reference", "{data}/reference.npz",
               "-o", "{foreign}", "--quiet"]),
    "infer": (["--samples", "--importance", "--moves", "--batch-size", "--threads"],
              ["--run", "{run}", "--particles", "{data}/particles.star", "-o",
               "{foreign}/post.star", "--quiet"]),
    "demo": (["--n-train", "--n-test", "--snr", "--epochs", "--batch-size", "--lr",
              "--importance", "--moves", "--seed", "--hidden", "--components", "--threads"],
             ["-o", "{foreign}", "--quiet"]),
    "bench": (["--rounds", "--stage-seconds", "--svi-batch", "--threads"],
              ["--settings", "toy", "--no-svi", "--json", "{foreign}/x.json"]),
}
"""Options whose accepted values lead to long work: the command is pointed at an output it
may not replace, so it must stop with one error line after validating its numbers."""


@HYPOTHESIS
@given(command=st.sampled_from(sorted(VALIDATED_ONLY)), data=st.data())
def test_numbers_of_the_long_commands_property(tmp_path_factory, dataset, run, command,
                                               data):
    options, base = VALIDATED_ONLY[command]
    option = data.draw(st.sampled_from(options))
    value = data.draw(st.one_of(NUMBER, SMALL_INTEGER))
    foreign = tmp_path_factory.mktemp("foreign")
    (foreign / "keep.txt").write_text("mine")
    (foreign / "post.star").write_text("not cryosvi's")
    (foreign / "x.json").write_text("{}")
    argv = [a.format(data=dataset, run=run, foreign=foreign) for a in base]
    code, err = run_cli([command, *argv, f"{option}={value}"])
    assert_one_error_line(code, err)
    assert (foreign / "keep.txt").read_text() == "mine"


PDB_LINES = default_structure_path().read_text().splitlines()[:400]


@st.composite
def damaged_structure(draw):
    lines = list(PDB_LINES)
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        j = draw(st.integers(0, max(0, len(line) - 1)))
        junk = draw(st.text(st.sampled_from("0123456789 -.eEnaifABCX*\t"), max_size=8))
        lines[i] = line[:j] + junk + line[j + len(junk):]
    cut = draw(st.integers(0, len(lines)))
    text = "\n".join(lines[:cut])
    if draw(st.booleans()):
        text = "data_x\n" + text  # an mmCIF header over PDB lines
    return text


@HYPOTHESIS
@given(text=damaged_structure(), stride=st.integers(1, 5))
def test_structure_reader_property(tmp_path_factory, text, stride):
    path = tmp_path_factory.mktemp("pdb") / "x.pdb"
    path.write_text(text)
    try:
        atoms = load_pseudo_atoms(path, stride=stride)
    except CryosviError as error:
        assert "\n" not in str(error)
        return
    assert atoms.n_atoms >= 1 and np.isfinite(atoms.coords).all()
    assert np.isfinite(atoms.centroid).all()


@HYPOTHESIS
@given(data=st.data())
def test_reference_loading_property(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("ref") / "reference.npz"
    tiny_reference().save(path)
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    settings_ = json.loads(str(arrays["settings"]))
    action = data.draw(st.sampled_from(["drop", "array", "setting", "truncate", "none"]))
    if action == "drop":
        arrays.pop(data.draw(st.sampled_from(sorted(arrays))))
    elif action == "array":
        name = data.draw(st.sampled_from(["coords", "centroid", "modes", "eigenvalues"]))
        shape = data.draw(st.lists(st.integers(0, 4), max_size=3))
        fill = data.draw(st.sampled_from([np.nan, np.inf, 1e300, 0.0, 1.0]))
        arrays[name] = np.full(shape, fill)
    elif action == "setting":
        group = data.draw(st.sampled_from(["optics", "imaging", "priors", "noise"]))
        key = data.draw(st.sampled_from(sorted(settings_[group])))
        settings_[group][key] = data.draw(st.sampled_from(
            [None, "abc", -1, 0, 1e300, float("nan"), [], {"a": 1}, True]))
        arrays["settings"] = np.array(json.dumps(settings_))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    if action == "truncate":
        blob = path.read_bytes()
        path.write_bytes(blob[:data.draw(st.integers(0, len(blob) - 1))])
    try:
        reference = Reference.load(path)
    except CryosviError as error:
        assert "\n" not in str(error)
        return
    for name in ("coords", "centroid", "modes", "eigenvalues"):
        assert np.isfinite(getattr(reference, name)).all()
    reference.forward_model()  # usable


def test_reference_with_a_pickled_array_is_refused(tmp_path):
    path = tmp_path / "reference.npz"
    with zipfile.ZipFile(path, "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.array([WritesAFile(tmp_path / "witness")], dtype=object),
                allow_pickle=True)
        archive.writestr("coords.npy", buffer.getvalue())
    with pytest.raises(CryosviError):
        Reference.load(path)
    assert not (tmp_path / "witness").exists()


def test_resume_says_which_settings_it_ignores(run, tmp_path):
    """--resume continues with the run's stored settings: a setting given with it (the
    first command repeated with --resume, or an attempt to change it) is named in one
    warning line and ignored; the options it takes (--quiet, --device) pass silently."""
    resumed = copy_run(run, tmp_path / "resumed")
    stored = json.loads((resumed / "run.json").read_text())["schedule"]
    for extra, named in ((["--epochs", "12"], "--epochs"), (["--lr", "0.1"], "--lr"),
                         (["--separate-encoders"], "--separate-encoders")):
        code, err = run_cli(["train", "-o", resumed, "--resume", "--quiet", *extra])
        assert code == 0 and "Traceback" not in err, err
        warned = [line for line in err.splitlines() if "warning:" in line]
        assert len(warned) == 1 and named in warned[0] and "ignored" in warned[0], err
    assert json.loads((resumed / "run.json").read_text())["schedule"] == stored
    code, err = run_cli(["train", "-o", resumed, "--resume", "--quiet", "--device", "cpu"])
    assert code == 0 and "warning:" not in err, err


def test_resume_of_a_finished_run_says_so_and_changes_nothing(run, tmp_path, capsys):
    """--resume of a run that has finished trains nothing, says so (it printed the
    stored wall time as if it had trained), and leaves the run's files as they were."""
    resumed = copy_run(run, tmp_path / "resumed")
    before = {p.name: p.read_bytes() for p in resumed.iterdir() if p.is_file()}
    assert main(["train", "-o", str(resumed), "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "nothing to resume" in out, out
    assert {p.name: p.read_bytes() for p in resumed.iterdir() if p.is_file()} == before


def test_infer_says_when_refine_is_not_used(run, dataset, tmp_path):
    """--refine only chooses the refinement of --importance draws: with --importance 0
    (the guide alone) a --refine given is named in one warning, and the default is
    silent."""
    base = ["infer", "--run", run, "--particles", dataset / "particles.star",
            "--importance", "0", "--quiet"]
    code, err = run_cli(base + ["-o", tmp_path / "a.star", "--refine", "smc"])
    warned = [line for line in err.splitlines() if "warning:" in line]
    assert code == 0 and len(warned) == 1 and "--refine smc is not used" in warned[0], err
    code, err = run_cli(base + ["-o", tmp_path / "b.star"])
    assert code == 0 and "warning:" not in err, err
