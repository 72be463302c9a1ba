"""kill -9 during ``cryosvi train``, then ``--resume``: the same checkpoint, bit for bit,
as a run that was never interrupted (a real SIGKILL of a real process, not a stop flag)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cryosvi.cli.main import main


def train_command(data, run, *extra):
    return [sys.executable, "-m", "cryosvi.cli.main", "train", "--particles",
            str(data / "particles.star"), "--reference", str(data / "reference.npz"),
            "-o", str(run), "--epochs", "4", "--epoch-size", "512", "--batch-size", "64",
            "--channels", "4,8,8", "--hidden", "16", "--threads", "1", "--quiet", *extra]


def epochs_done(run) -> int:
    try:
        return json.loads((run / "run.json").read_text()).get("epochs_done", 0)
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_checkpoint(tmp_path):
    data = tmp_path / "data"
    assert main(["simulate", "-o", str(data), "-n", "64", "--seed", "3"]) == 0
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    subprocess.run(train_command(data, whole), check=True, env=environment,
                   capture_output=True)

    process = subprocess.Popen(train_command(data, parts), env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while epochs_done(parts) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the third epoch
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 2 <= epochs_done(parts) < 4

    subprocess.run(train_command(data, parts, "--resume"), check=True, env=environment,
                   capture_output=True)
    first = torch.load(whole / "checkpoint.pt", weights_only=True)
    second = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert first["position"]["step"] == second["position"]["step"]
    for name, value in first["guide"].items():
        assert torch.equal(second["guide"][name], value), name
