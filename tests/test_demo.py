"""``cryosvi demo`` end to end at a tiny size: simulate, train, infer, evaluate, report."""

import json

import pytest

from cryosvi.cli.demo import MARKER, prepare_output
from cryosvi.cli.main import main
from cryosvi.errors import CryosviError


def test_demo_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    arguments = ["demo", "-o", str(output), "--n-train", "64", "--n-test", "24",
                 "--epochs", "1", "--channels", "4,8,8", "--hidden", "32",
                 "--components", "2", "--importance", "4", "--moves", "1", "--quiet"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "defocus" in printed and "pose error" in printed and "wall time" in printed
    for name in ("metrics.json", "truth_vs_prediction.png", "pose_error.png",
                 "calibration.png", "loss.png"):
        assert (output / "report" / name).is_file(), name
    for name in ("data/train/particles.star", "data/test/particles.star", "run/run.json",
                 "posterior.star"):
        assert (output / name).is_file(), name
    record = json.loads((output / MARKER).read_text())
    assert set(record["seconds"]) == {"simulate", "train", "infer", "evaluate", "total"}
    assert record["metrics"]["latents"]["defocus"]["pearson_r"] is not None
    assert json.loads((output / "run" / "run.json").read_text())["guide"]["shared_trunk"]


def test_demo_output_directory_rules(tmp_path, capsys):
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / MARKER).write_text("{}")  # a demo of an earlier version (no .cryosvi)
    (previous / "old.txt").write_text("from the last demo")
    with pytest.raises(CryosviError, match="--force"):
        prepare_output(previous, force=False)
    prepare_output(previous, force=True)  # a previous demo is replaced with --force
    assert [p.name for p in previous.iterdir()] == [".cryosvi"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    for force in ([], ["--force"]):
        assert main(["demo", "-o", str(foreign), "--quiet", *force]) == 2
        assert "not made by cryosvi" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["precious.txt"]
