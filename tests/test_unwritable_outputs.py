"""Every command refuses, before any work, an output it cannot write: one ``error:`` line
(exit code 2) that says which option, where and why, never a Python traceback.

The places: an empty name (``-o ''``, which Python would take for the current folder), a
path under a regular file, a name longer than the file system allows, a read-only folder
and a folder that may not be entered (another user's). The last two need permissions
that apply: as root they do not, so there they run in a user namespace
(``unshare --user``, where root's files are checked like anyone's), else they skip."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cryosvi.cli.main import main
from test_safety import assert_one_error_line
from cryosvi.guide import Architecture
from cryosvi.reference import Reference
from cryosvi.simulate import simulate_dataset
from cryosvi.training.loop import train
from cryosvi.training.schedule import Stage
from cryosvi.training.setup import TrainOptions

from test_guide import tiny_reference

TINY_GUIDE = ["--channels", "4,8,8", "--hidden", "32", "--components", "2"]


@functools.cache
def permissions_apply() -> bool:
    """Whether this process is refused writing into a folder of mode 0o500 (not so for
    root, or with CAP_DAC_OVERRIDE): probed, not guessed from the user id."""
    with tempfile.TemporaryDirectory() as folder:
        locked = Path(folder, "locked")
        locked.mkdir(mode=0o500)
        try:
            (locked / "probe").touch()
        except PermissionError:
            return True
        finally:
            locked.chmod(0o700)
        return False


@functools.cache
def user_namespace_works() -> bool:
    """Whether ``unshare --user`` runs a command here (root in a container usually may)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--user", "true"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


INPUTS_VARIABLE = "CRYOSVI_TEST_UNWRITABLE_INPUTS"
"""The ``inputs`` folder handed to the pytest run in a user namespace."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny simulated data set and a run trained on it for one epoch: valid inputs, so
    that the output is what every command below refuses."""
    if os.environ.get(INPUTS_VARIABLE):
        return Path(os.environ[INPUTS_VARIABLE])
    root = tmp_path_factory.mktemp("inputs")
    simulate_dataset(tiny_reference(), 16, root / "data", seed=0)
    options = TrainOptions(
        architecture=Architecture(channels=(4, 8, 8), hidden=32, n_components=2),
        validation_size=8,
        schedule=[Stage(objective="sim", epochs=1, lr=1e-3, batch_size=8, epoch_size=8)])
    train(root / "data" / "particles.star", Reference.load(root / "data" / "reference.npz"),
          root / "run", options, progress=False)
    return root


def commands(inputs: Path, scratch: Path) -> dict[str, tuple[list[str], str, str]]:
    """Each command and output option: (arguments before the output, its option, the
    output's suffix). ``scratch`` is a writable folder for outputs that are not tested."""
    star, reference = inputs / "data" / "particles.star", inputs / "data" / "reference.npz"
    particles = ["--particles", star]
    return {
        "simulate": (["simulate", "-n", "2"], "-o", ""),
        "modes": (["modes", "--n-modes", "2"], "-o", ".npz"),
        "modes --movie": (["modes", "--n-modes", "2", "-o", scratch / "m.npz"], "--movie",
                          ""),
        "learn-modes": (["learn-modes", *particles, "--reference", reference], "-o",
                        ".npz"),
        "train": (["train", *particles, "--reference", reference, "--quiet", *TINY_GUIDE],
                  "-o", ""),
        "train --resume": (["train", "--resume", "--quiet"], "-o", ""),
        "infer": (["infer", "--run", inputs / "run", *particles, "--importance", "0",
                   "--quiet"], "-o", ".star"),
        "evaluate": (["evaluate", "--posterior", star, "--truth", star], "-o", ""),
        "inspect": (["inspect", star], "-o", ".png"),
        "bench": (["bench", "--settings", "toy", "--no-svi"], "--json", ".json"),
        "demo": (["demo", "--quiet", "--epochs", "1"], "-o", ""),
    }


def assert_refused(capsys, argv, *fragments) -> None:
    """``cryosvi ARGV`` returns 2 with one ``error:`` line holding ``fragments``."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    assert_one_error_line(code, capsys.readouterr().err, *fragments)


def refuse_everywhere(capsys, inputs: Path, root: Path, folder: Path, name: str,
                      *fragments) -> None:
    """Every command, pointed at ``folder/NAME+suffix``, is refused with ``fragments``
    (and the option's name) in its line, and writes nothing under ``root``."""
    scratch = root / "scratch"
    scratch.mkdir(exist_ok=True)
    before = sorted(root.rglob("*"))
    for head, option, suffix in commands(inputs, scratch).values():
        assert_refused(capsys, [*head, option, folder / f"{name}{suffix}"], option,
                       *fragments)
    assert sorted(root.rglob("*")) == before and list(scratch.iterdir()) == []


# ------------------------------------------------------------------------ the places
def test_an_empty_output_name_is_refused(capsys, inputs, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for head, option, _ in commands(inputs, scratch).values():
        assert_refused(capsys, [*head, option, ""], f"{option} ''", "empty")
    assert list(scratch.iterdir()) == []


def test_an_output_under_a_regular_file_is_refused(capsys, inputs, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    refuse_everywhere(capsys, inputs, tmp_path, blocker, "out", "cannot write",
                      str(blocker), "not a directory")
    refuse_everywhere(capsys, inputs, tmp_path, blocker / "deeper", "out", str(blocker),
                      "not a directory")
    assert blocker.read_text() == "a file, not a folder"


def test_an_output_name_too_long_for_the_file_system_is_refused(capsys, inputs, tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    refuse_everywhere(capsys, inputs, tmp_path, tmp_path / "out", "x" * limit,
                      "cannot write", "bytes long")
    # short enough itself, but not for the temporary name written beside it
    refuse_everywhere(capsys, inputs, tmp_path, tmp_path / "out", "x" * (limit - 12),
                      "bytes long")


def test_infer_refuses_a_cs_or_samples_file_that_cannot_be_written(capsys, inputs,
                                                                   tmp_path):
    """infer's outputs beside the STAR (OUTPUT.cs from a .cs input, OUTPUT.npz with
    --samples) are checked like the STAR: a folder in their place is refused."""
    from particle_files import write_cs

    particles, _, _ = write_cs(tmp_path)
    (tmp_path / "post.cs").mkdir()
    (tmp_path / "post.npz").mkdir()
    base = ["infer", "--run", inputs / "run", "--importance", "0", "--quiet", "-o",
            tmp_path / "post.star"]
    assert_refused(capsys, [*base, "--particles", particles], "post.cs", "directory")
    assert_refused(capsys, [*base, "--particles", inputs / "data" / "particles.star",
                            "--samples", "2"], "post.npz", "directory")
    assert not (tmp_path / "post.star").exists()


def check_folders_without_permission(capsys, inputs, tmp_path):
    locked = tmp_path / "locked"  # read-only
    locked.mkdir(mode=0o500)
    other = tmp_path / "other"  # another user's: may not even be entered
    other.mkdir(mode=0o000)
    try:
        refuse_everywhere(capsys, inputs, tmp_path, locked, "out", "cannot write",
                          str(locked), "permission denied", "not writable")
        refuse_everywhere(capsys, inputs, tmp_path, locked / "a" / "b", "out",
                          str(locked), "not writable")
        refuse_everywhere(capsys, inputs, tmp_path, other, "out", str(other),
                          "permission denied", "may not be entered")
        refuse_everywhere(capsys, inputs, tmp_path, other / "a", "out", str(other),
                          "may not be entered")
        # an existing, empty output folder that may not be written into
        for name, mode in (("readonly-run", 0o500), ("unlistable-run", 0o300)):
            (tmp_path / name).mkdir(mode=mode)
            assert_refused(capsys, ["train", "--particles",
                                    inputs / "data" / "particles.star", "--reference",
                                    inputs / "data" / "reference.npz", "-o",
                                    tmp_path / name, "--quiet", *TINY_GUIDE],
                           "permission denied", str(tmp_path / name))
    finally:
        for folder in tmp_path.iterdir():
            folder.chmod(0o700)


@pytest.mark.skipif(not permissions_apply(), reason="permissions do not apply to this "
                    "user (root); see the user-namespace test")
def test_folders_without_permission_are_refused(capsys, inputs, tmp_path):
    check_folders_without_permission(capsys, inputs, tmp_path)


@pytest.mark.skipif(permissions_apply() or not user_namespace_works(),
                    reason="permissions apply here (the test above runs) or there is no "
                    "user namespace")
def test_folders_without_permission_are_refused_in_a_user_namespace(inputs, tmp_path):
    """As root: the test above, run by pytest in a user namespace, where it is no longer
    root for the files here (and so may not skip)."""
    paths = [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")]
    environment = {**os.environ, INPUTS_VARIABLE: str(inputs),
                   "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    result = subprocess.run(
        ["unshare", "--user", sys.executable, "-m", "pytest", "-q", "-rs", "-p",
         "no:cacheprovider", "--basetemp", str(tmp_path / "base"),
         f"{__file__}::test_folders_without_permission_are_refused"],
        capture_output=True, text=True, cwd=Path(__file__).parent, env=environment,
        timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "1 passed" in result.stdout, result.stdout[-4000:]


@functools.cache
def mount_namespace_works() -> bool:
    """Whether ``unshare --user --map-root-user --mount`` may mount a tmpfs here."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        try:
            return subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "ro",
                                   "none", folder], capture_output=True,
                                  timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


def commands_on_a_tmpfs(mount: Path, options: str, commands: list[list[str]],
                        codes: list[int]) -> list[str]:
    """Run cryosvi ``commands`` (each an argv with MOUNT for the tmpfs) in a user and
    mount namespace of their own with a tmpfs of ``options`` mounted on ``mount``;
    assert they exit with ``codes`` and no traceback; their 'error:' lines."""
    commands = [[str(mount) + a[5:] if a.startswith("MOUNT") else a for a in argv]
                for argv in commands]
    script = ("import sys; from cryosvi.cli.main import main; "
              f"codes = [main(argv) for argv in {commands!r}]; "
              f"print(codes); sys.exit(0 if codes == {codes!r} else 1)")
    paths = [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    mount_then_run = f'mount -t tmpfs -o {options} none "$0" && exec "$1" -c "$2"'
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount_then_run, str(mount), sys.executable, script],
        capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.mark.skipif(not mount_namespace_works(), reason="no user and mount namespaces")
def test_a_read_only_file_system_is_refused(tmp_path):
    """A read-only tmpfs: the output's folder, and one to be made in it, are refused
    by name."""
    mount = tmp_path / "ro"
    mount.mkdir()
    lines = commands_on_a_tmpfs(mount, "ro", [
        ["modes", "--n-modes", "2", "-o", "MOUNT/m.npz"],
        ["simulate", "-n", "2", "-o", "MOUNT/sub/data"]], [2, 2])
    assert len(lines) == 2, lines
    for line in lines:
        assert f"{mount} is on a read-only file system" in line, line
    assert list(mount.iterdir()) == []


@pytest.mark.skipif(not mount_namespace_works(), reason="no user and mount namespaces")
def test_a_full_disk_ends_in_one_error_line(tmp_path):
    """A 64 KiB tmpfs, too small for the outputs: simulate refuses before any work (it
    knows its size), modes' archive fails while being written; one error line each,
    not a traceback."""
    mount = tmp_path / "small"
    mount.mkdir()
    lines = commands_on_a_tmpfs(mount, "size=64k", [
        ["simulate", "-n", "200", "-o", "MOUNT/data"],
        ["modes", "--n-modes", "20", "-o", "MOUNT/m.npz"]], [2, 1])
    assert len(lines) == 2, lines
    assert "MiB but" in lines[0] and "KiB" not in lines[0], lines[0]
    assert "No space left on device" in lines[1], lines[1]
