"""``cryosvi bench`` at a toy size: the baselines compute the same images as the fast
kernels (so the speed-ups compare like with like), the report and the JSON are complete,
and the CLI runs; a failing stage fails the bench. No timing is asserted."""

import json
import math
from dataclasses import replace

import pytest
import torch

from cryosvi import bench
from cryosvi.cli.main import main
from cryosvi.config import Optics
from cryosvi.physics.ctf import apply_ctf
from cryosvi.physics.projection import project

F64 = dict(dtype=torch.float64)


def test_sparse_coo_baseline_is_the_same_projection():
    generator = torch.Generator().manual_seed(0)
    coords = (torch.rand(3, 40, 3, generator=generator, **F64) * 2 - 1) * 16  # some outside
    coords.requires_grad_(True)
    weights = torch.randn(3, 24, 24, generator=generator, **F64)
    ours = project(coords, 24, 1.0, 2.0, 6)
    baseline = bench.sparse_coo_projection(coords, 24, 1.0, 2.0, 6)
    torch.testing.assert_close(baseline, ours, rtol=0, atol=1e-12)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), coords)
    (grad_baseline,) = torch.autograd.grad((baseline * weights).sum(), coords)
    torch.testing.assert_close(grad_baseline, grad_ours, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [16, 17])
def test_fft_ctf_baseline_is_the_same_ctf(size):
    optics = Optics(pixel_size=1.5, amplitude_contrast=0.1, bfactor=40.0, phase_shift=15.0)
    images = torch.randn(3, size, size, generator=torch.Generator().manual_seed(1), **F64)
    defocus = torch.tensor([8000.0, 12000.0, 15000.0], **F64)
    ours = apply_ctf(images, defocus, defocus, torch.zeros(3, **F64), optics, 2)
    baseline = bench.fft_ctf_baseline(images, defocus, optics, 2)
    torch.testing.assert_close(baseline, ours, rtol=0, atol=1e-12)


def test_run_setting_reports_every_stage():
    result = bench.run_setting(bench.TOY, torch.device("cpu"), rounds=1, stage_seconds=0)
    us = result["us_per_image"]
    for stage, _ in bench.STAGES:
        assert us[stage] > 0 and math.isfinite(us[stage])
    for baseline, _ in bench.BASELINES.values():
        assert us[baseline] > 0
    assert us["forward_baseline"] == pytest.approx(
        us["project_baseline"] + us["ctf_baseline"] + us["noise"])
    assert set(result["speedup"]) == {"project", "ctf", "project_backward", "forward"}
    assert result["method"] in ("scatter", "matmul")
    text = bench.format_report({"environment": bench.environment(torch.device("cpu")),
                                "settings": {"toy": result}})
    assert "sparse COO" in text and "whole forward model" in text


def test_svi_step_runs_with_the_papers_guide():
    """No exception is swallowed: a broken model, guide or loss fails here."""
    result = bench.time_svi_step(torch.device("cpu"), batch=4, steps=1)
    assert result["n_atoms"] == 133 and result["box"] == 32 and result["batch"] == 4
    assert result["images_per_second"] == pytest.approx(4 / result["seconds_per_step"])
    assert 0 < result["model_forward_backward_seconds"] < result["seconds_per_step"]
    # The paper's three encoders of ~1.6 M parameters each (test_guide checks each).
    assert 4.65e6 < result["guide_parameters"] < 4.95e6


def test_table1_setting_is_1ol5_at_stride_2():
    coords, source = bench.structure_coords(bench.TABLE1, torch.Generator())
    assert coords.shape == (133, 3) and source.startswith("1OL5")
    with pytest.raises(ValueError, match="133 atoms, not 134"):
        bench.structure_coords(replace(bench.TABLE1, n_atoms=134), torch.Generator())


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--settings", "toy", "--rounds", "1", "--stage-seconds", "0",
                 "--no-svi", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "projection" in out and "speed-up" in out
    report = json.loads(path.read_text())
    assert report["settings"]["toy"]["us_per_image"]["project"] > 0
    assert report["environment"]["device"] == "cpu"


def test_cli_rejects_unknown_setting(capsys):
    assert main(["bench", "--settings", "huge", "--no-svi"]) == 2
    assert "unknown setting" in capsys.readouterr().err


def test_cli_threads_option_sets_torch_threads(tmp_path):
    path = tmp_path / "bench.json"
    before = torch.get_num_threads()
    try:
        assert main(["bench", "--settings", "toy", "--rounds", "1", "--stage-seconds", "0",
                     "--no-svi", "--threads", "1", "--json", str(path)]) == 0
        assert json.loads(path.read_text())["environment"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
