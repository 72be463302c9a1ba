"""Data-parallel training (cryosvi.training.distributed): the share of a batch each
process computes, the BatchNorm synchronised over processes against nn.BatchNorm2d on
the whole batch, and ``torchrun -m cryosvi train`` with 2 gloo processes on the CPU
against one process with the same global batch, fresh and resumed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cryosvi
from cryosvi.cli.main import build_parser, main
from cryosvi.cli.train import options_from_args
from cryosvi.reference import Reference
from cryosvi.simulate import Acquisition, group_optics, simulate_dataset
from cryosvi.training.distributed import (World, process_group, rank_device,
                                          synchronise_batch_norm)
from cryosvi.training.log import read_log
from cryosvi.training.loop import train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from test_guide import tiny_reference

    root = tmp_path_factory.mktemp("ddp_data")
    # shifts and two optics groups: the conditions of each simulated particle matter
    reference = tiny_reference()
    simulate_dataset(reference, 48, root / "data", seed=0, progress=False,
                     acquisition=Acquisition(max_shift=4.0, astigmatism=300.0,
                                             groups=group_optics(reference.optics, 2)))
    return root / "data"


# ------------------------------------------------------------------ helpers, no processes
def test_the_ranks_share_every_row_of_a_batch_once():
    for size in range(1, 6):
        for batch in range(size, 40):
            parts = [World(rank, size).rows(batch) for rank in range(size)]
            assert [i for part in parts for i in range(batch)[part]] == list(range(batch))
            lengths = [part.stop - part.start for part in parts]
            assert max(lengths) - min(lengths) <= 1


def test_one_process_never_joins_a_process_group(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with process_group("cpu") as world:
        assert world == World() and not dist.is_initialized()
    assert rank_device("cpu") == "cpu"
    assert rank_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    # torchrun with one process: still no process group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with process_group("cpu") as world:
        assert world.size == 1 and not dist.is_initialized()


def test_synchronise_batch_norm_keeps_the_tensors():
    from cryosvi.training.distributed import SynchronisedBatchNorm

    trunk = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Sequential(nn.BatchNorm2d(3)))
    before = {k: v for k, v in trunk.state_dict(keep_vars=True).items()}
    assert synchronise_batch_norm(trunk) == 2
    after = trunk.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert isinstance(trunk[1], SynchronisedBatchNorm) and isinstance(trunk[3][0],
                                                                      nn.BatchNorm2d)
    x = torch.randn(4, 1, 6, 6)  # outside a process group: BatchNorm2d itself
    reference = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                              nn.Sequential(nn.BatchNorm2d(3)))
    reference.load_state_dict(trunk.state_dict())
    torch.testing.assert_close(trunk(x), reference(x), rtol=0, atol=0)


# ------------------------------------------------------------------ BatchNorm over ranks
SPLIT = (3, 5)
"""Rows of the whole batch on rank 0 and rank 1 (uneven on purpose)."""


def whole_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 2.0 + 3.0 * torch.randn(sum(SPLIT), 4, 5, 5, generator=generator)
    weight = torch.randn(sum(SPLIT), 4, 5, 5, generator=generator)  # of the loss
    return x.contiguous(memory_format=torch.channels_last), weight


def batch_norm(cls):
    layer = cls(4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 1.5, -2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return layer


def _worker(rank: int, folder: str, data: str) -> None:
    """Rank ``rank`` of 2: its rows of two training steps and an eval step through a
    SynchronisedBatchNorm (outputs, gradients and statistics saved), then its part of a
    training run of the ELBO on the particles of ``data``."""
    from cryosvi.guide import Architecture
    from cryosvi.training.distributed import SynchronisedBatchNorm
    from cryosvi.training.schedule import Stage
    from cryosvi.training.setup import TrainOptions

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=2)
    try:
        layer = batch_norm(SynchronisedBatchNorm)
        rows = slice(0, SPLIT[0]) if rank == 0 else slice(SPLIT[0], None)
        out = {}
        for step in range(2):
            x, weight = whole_batch(step)
            x = x[rows].detach().requires_grad_(True)
            y = layer(x)
            (y * weight[rows]).sum().backward()
            out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad
            out[f"dw{step}"], out[f"db{step}"] = layer.weight.grad.clone(), \
                layer.bias.grad.clone()
            layer.weight.grad, layer.bias.grad = None, None
        out.update(running_mean=layer.running_mean, running_var=layer.running_var,
                   tracked=layer.num_batches_tracked)
        layer.eval()
        out["eval"] = layer(whole_batch(2)[0][rows])
        out["sum"] = torch.tensor(World.current().sum([rank + 1.0, 10.0 * rank]))
        torch.save(out, f"{folder}/rank{rank}.pt")
        # the ELBO: each process's particles of a batch of 16, with draws of its own;
        # one stage trains the mode encoder alone, the next all (DDP made again)
        stages = [Stage(objective="elbo", epochs=1, batch_size=16, lr=1e-3,
                        train=("modes",), decay="constant"),
                  Stage(objective="elbo", epochs=1, batch_size=16, lr=1e-3,
                        decay="constant")]
        options = TrainOptions(architecture=Architecture(channels=(4, 8, 8), hidden=32,
                                                         n_components=2),
                               schedule=stages, validation_size=32, precision="fp32")
        info = train(Path(data) / "particles.star",
                     Reference.load(Path(data) / "reference.npz"), Path(folder) / "run",
                     options, progress=False)
        assert info["status"] == "finished" and info["processes"] == 2
        torch.save({"step": info["epochs_done"]}, f"{folder}/elbo{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_synchronised_batch_norm_is_batch_norm_of_the_whole_batch(dataset, tmp_path):
    """Two gloo processes with 3 and 5 rows of a batch: outputs, input gradients,
    parameter gradients (summed over the processes, as DDP's mean of the W-weighted
    losses gives), running statistics after two steps and the eval mode equal
    nn.BatchNorm2d on the concatenated batch. The same two processes then train by the
    ELBO (no equality with one process there: each draws its own samples of the
    guide), which ends, written by rank 0, with finite weights."""
    mp.spawn(_worker, args=(str(tmp_path), str(dataset)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    layer = batch_norm(nn.BatchNorm2d)
    for step in range(2):
        x, weight = whole_batch(step)
        x = x.detach().requires_grad_(True)
        y = layer(x)
        (y * weight).sum().backward()
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([r[f"y{step}"] for r in ranks]), y, **close)
        torch.testing.assert_close(torch.cat([r[f"dx{step}"] for r in ranks]), x.grad,
                                   **close)
        torch.testing.assert_close(ranks[0][f"dw{step}"] + ranks[1][f"dw{step}"],
                                   layer.weight.grad, **close)
        torch.testing.assert_close(ranks[0][f"db{step}"] + ranks[1][f"db{step}"],
                                   layer.bias.grad, **close)
        layer.weight.grad, layer.bias.grad = None, None
    for rank in ranks:
        torch.testing.assert_close(rank["running_mean"], layer.running_mean)
        torch.testing.assert_close(rank["running_var"], layer.running_var)
        assert int(rank["tracked"]) == int(layer.num_batches_tracked) == 2
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([r["eval"] for r in ranks]),
                                   layer(whole_batch(2)[0]))
    for rank in ranks:
        assert rank["sum"].tolist() == [3.0, 10.0]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"elbo{rank}.pt", weights_only=True)["step"] == 2
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["position"]["step"] == 6  # 48 particles, batches of 16, 2 epochs
    assert all(torch.isfinite(v).all() for v in state["guide"].values())
    assert [r["objective"] for r in read_log(tmp_path / "run" / "log.jsonl")] == ["elbo"] * 2


# ------------------------------------------------------------------ torchrun -m cryosvi
def train_arguments(data: Path) -> list[str]:
    """A tiny guide, 2 epochs of 3 steps of 15 (odd: 8 drawn and 7 antithetic twins,
    so rank 1's 8 rows are 1 drawn particle and the 7 twins), fp32."""
    return ["train", "--particles", str(data / "particles.star"), "--reference",
            str(data / "reference.npz"), "--epochs", "2", "--epoch-size", "45",
            "--batch-size", "15", "--channels", "4,8,8", "--hidden", "32",
            "--components", "2", "--precision", "fp32", "--device", "cpu", "--quiet"]


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m cryosvi ARGV`` (as
    ``python -m torch.distributed.run``), one thread per process."""
    source = str(Path(cryosvi.__file__).parents[1])
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "cryosvi", *argv, "--threads", "1"],
                          env=environment, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    """The run of one process (this one) with the global batch."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(train_arguments(dataset) + ["-o", str(run)]) == 0
    assert not dist.is_initialized()  # one process never joins a group
    return run


def guide_weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["guide"]


def assert_same_training(run: Path, reference: Path) -> None:
    """The same parameters up to float reassociation (relative norm of the difference of
    all floating-point parameters and buffers together < 1e-3), integer buffers equal,
    the same steps, and the same logged losses.

    Not per tensor: a BatchNorm bias whose gradient is ~0 takes Adam steps of about the
    learning rate in the direction of that gradient's sign, which float reassociation
    (sums over 2 processes instead of 1) can flip; such a tensor's norm is a few steps of
    the learning rate, so its own relative difference can reach 1e-2 while the model's
    is 1e-5."""
    ours, theirs = guide_weights(run), guide_weights(reference)
    assert ours.keys() == theirs.keys()
    floats = [name for name, value in theirs.items() if value.is_floating_point()]
    difference = torch.cat([(ours[n] - theirs[n]).flatten() for n in floats]).norm()
    size = torch.cat([theirs[n].flatten() for n in floats]).norm()
    assert float(difference / size) < 1e-3, float(difference / size)
    for name, value in theirs.items():
        if not value.is_floating_point():
            assert torch.equal(ours[name], value), name
    position = torch.load(run / "checkpoint.pt", weights_only=True)["position"]
    assert position["step"] == 6 and position["epoch"] == 2
    for a, b in zip(read_log(run / "log.jsonl"), read_log(reference / "log.jsonl"),
                    strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_torchrun_trains_the_parameters_of_one_process(dataset, one_process, tmp_path):
    run = tmp_path / "run"
    done = torchrun(train_arguments(dataset) + ["-o", str(run)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained") == 1  # rank 0 alone reports (and writes)
    assert "on 2 processes" in done.stdout
    info = json.loads((run / "run.json").read_text())
    assert info["processes"] == 2 and info["status"] == "finished"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in one_process.iterdir())
    assert_same_training(run, one_process)


def test_torchrun_resumes_a_run(dataset, one_process, tmp_path):
    """A run stopped after its first epoch (one process) and resumed by 2 processes ends
    where the one-process run does."""
    run = tmp_path / "run"
    argv = train_arguments(dataset) + ["-o", str(run)]
    options = options_from_args(build_parser(argv).parse_args(argv))
    stopped = train(dataset / "particles.star", options=options, output=run,
                    reference=Reference.load(dataset / "reference.npz"),
                    progress=False, max_epochs=1)
    assert stopped["status"] == "stopped" and stopped["epochs_done"] == 1
    done = torchrun(["train", "-o", str(run), "--resume", "--quiet", "--device", "cpu"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert_same_training(run, one_process)
