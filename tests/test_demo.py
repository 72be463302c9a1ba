"""``cryosvi demo`` end to end at a tiny size: simulate, train, infer, evaluate, report."""

import json

from cryosvi.cli.main import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    arguments = ["demo", "-o", str(output), "--n-train", "64", "--n-test", "24",
                 "--epochs", "1", "--channels", "4,8,8", "--hidden", "32",
                 "--components", "2", "--quiet"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "defocus" in printed and "pose error" in printed and "wall time" in printed
    for name in ("metrics.json", "truth_vs_prediction.png", "pose_error.png",
                 "calibration.png", "loss.png"):
        assert (output / "report" / name).is_file(), name
    record = json.loads((output / "demo.json").read_text())
    assert set(record["seconds"]) == {"simulate", "train", "infer", "evaluate", "total"}
    assert record["metrics"]["latents"]["defocus"]["pearson_r"] is not None
    # A second run into the same demo directory replaces it; a foreign directory is kept.
    assert main(arguments) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    assert main(["demo", "-o", str(foreign), "--quiet"]) == 2
    assert (foreign / "precious.txt").read_text() == "keep me"
