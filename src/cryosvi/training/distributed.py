"""Data-parallel training under ``torchrun``: the processes of a run, the slice of a batch
each one computes, the sums over them, and a BatchNorm whose batch statistics are those
of the whole batch.

``torchrun --standalone --nproc-per-node N -m cryosvi train ...`` starts N processes with
the environment variables RANK, LOCAL_RANK and WORLD_SIZE (torch.distributed's
``env://`` rendezvous). ``process_group`` (entered by the command line, which owns the
process) joins them into one process group: NCCL when the run's device is CUDA (each
process on cuda:LOCAL_RANK, ``rank_device``), gloo on the CPU. A process started without
torchrun, or by torchrun alone (WORLD_SIZE 1), never initialises torch.distributed; its
``World`` is rank 0 of 1 and every helper here is then the identity.

How the training loop (``cryosvi.training.loop``) uses them: every process reads the
particles and draws every random number of the whole (global) batch in the order one
process draws them, computes the forward model and the loss of its own rows
(``World.rows``) only, and DistributedDataParallel averages the gradients; rank 0 alone
writes (``World.writes``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cryosvi.errors import CryosviError

ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
"""The variables torchrun sets for each process it starts."""


@dataclass(frozen=True)
class World:
    """The processes of a run: this one's ``rank`` of ``size`` (``local_rank`` on its
    machine). ``World()`` is one process alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> "World":
        """The process group this process belongs to (``process_group``), else one
        process alone."""
        if not initialised():
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local)

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (rank 0 alone does)."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This process's contiguous share of a batch of ``batch_size`` rows: rank r of
        W gets rows [r B // W, (r + 1) B // W) (sizes differ by at most one; every row
        goes to exactly one rank)."""
        return slice(self.rank * batch_size // self.size,
                     (self.rank + 1) * batch_size // self.size)

    def sum(self, values: list[float]) -> list[float]:
        """The sums over the processes of ``values`` (each process gives its own;
        float64), the same list on every process. No gradient."""
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait until every process has come here."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def initialised() -> bool:
    """Whether this process has joined a process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where the tensors of a collective live: the process's CUDA device under NCCL,
    else the CPU (gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def torchrun_world() -> World:
    """The World torchrun's environment describes (not joined yet), else one process."""
    if not all(name in os.environ for name in ENVIRONMENT):
        return World()
    try:
        rank, local, size = (int(os.environ[name]) for name in ENVIRONMENT)
    except ValueError:
        raise CryosviError(f"torchrun's environment is damaged: "
                           f"{', '.join(f'{n}={os.environ[n]!r}' for n in ENVIRONMENT)}") \
            from None
    if not 0 <= rank < size:
        raise CryosviError(f"torchrun's environment: RANK {rank} of WORLD_SIZE {size}")
    return World(rank, size, local)


def rank_device(name: str, world: World | None = None) -> str:
    """The device of this process for a --device value: 'auto' is CUDA when present,
    else the CPU; a CUDA device under torchrun (several processes) is cuda:LOCAL_RANK,
    one GPU per process. A CryosviError when there are fewer GPUs than processes on the
    machine."""
    world = world or torchrun_world()
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if world.size == 1 or not name.startswith("cuda"):
        return name
    if not torch.cuda.is_available():
        raise CryosviError(f"--device {name}: no CUDA device is available")
    if world.local_rank >= torch.cuda.device_count():
        raise CryosviError(f"torchrun started a process with LOCAL_RANK {world.local_rank} "
                           f"but this machine has {torch.cuda.device_count()} CUDA "
                           "device(s); start at most one process per GPU")
    return f"cuda:{world.local_rank}"


@contextmanager
def process_group(device: str):
    """Join the processes torchrun started (NCCL for a CUDA ``device``, which becomes the
    process's current CUDA device, else gloo) for the body, and leave the group after it.
    Yields the ``World``; outside torchrun (or with WORLD_SIZE 1) it does nothing and
    yields one process alone. For the program that owns the process (the command line):
    a process group is process-wide state."""
    world = torchrun_world()
    if world.size == 1 or initialised():
        yield World.current() if initialised() else World()
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise CryosviError("this torch has no torch.distributed; run one process")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    try:
        yield World.current()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ BatchNorm over ranks
class _SumOverProcesses(torch.autograd.Function):
    """y = sum over the processes of x, on every process. Each process's loss L_r
    depends on y, so dL/dx_r = sum over r' of dL_r'/dy: the backward is the same sum of
    the incoming gradients (``torch.distributed.nn.functional.all_reduce``, deprecated
    in torch 2.13 for a private module, computes the same)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the processes of the group, with its gradient (every
    process must call it alike, in the same order)."""
    return _SumOverProcesses.apply(tensor)


class SynchronisedBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the whole batch of every
    process of the group: the per-channel count, sum and sum of squared deviations are
    summed over the processes (``sum_over_processes``, whose backward is the sum of the
    gradients over the processes, so the input gradient is that of the whole batch's
    normalisation), mean and biased variance normalise the input, and the running statistics are updated as ``nn.BatchNorm2d`` updates them with
    the whole batch's count (unbiased variance, ``momentum``). Statistics in float64, the
    output in the input's dtype (as BatchNorm2d under bf16 autocast).

    torch's ``nn.SyncBatchNorm`` does the same for CUDA tensors only. In eval mode, or
    outside a process group of several processes, this is ``nn.BatchNorm2d``; its
    parameters and buffers (and so its state_dict) are BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and initialised()):
            return super().forward(x)
        import torch.distributed as dist

        if dist.get_world_size() == 1:
            return super().forward(x)
        x32 = x.float()
        channels = (1, -1, 1, 1)
        count = x32.new_tensor([x32.numel() // x32.shape[1]], dtype=torch.float64)
        # two passes (sum, then squared deviations): no cancellation in E[x^2] - E[x]^2
        first = sum_over_processes(torch.cat([x32.sum((0, 2, 3)).double(), count]))
        total = first[-1]
        mean = (first[:-1] / total).float()
        centred = x32 - mean.reshape(channels)
        var = (sum_over_processes(centred.square().sum((0, 2, 3)).double())
               / total).float()
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(total.detach()))
        y = centred * torch.rsqrt(var + self.eps).reshape(channels)
        if self.affine:
            y = y * self.weight.reshape(channels) + self.bias.reshape(channels)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """BatchNorm2d's update: running = (1 - m) running + m batch, with the unbiased
        variance (count / (count - 1)); momentum None is the cumulative average."""
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(factor * mean)
        self.running_var.mul_(1 - factor).add_(factor * unbiased)


def synchronise_batch_norm(module: nn.Module) -> int:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a ``SynchronisedBatchNorm``
    that holds the same parameter and buffer tensors (an optimizer over them, a
    state_dict and a checkpoint are unchanged). Returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm2d:
                continue
            twin = SynchronisedBatchNorm(child.num_features, child.eps, child.momentum,
                                         child.affine, child.track_running_stats)
            for key in ("weight", "bias"):
                setattr(twin, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(twin, key, getattr(child, key))
            twin.train(child.training)
            setattr(parent, name, twin)
            replaced += 1
    return replaced


# ------------------------------------------------------------------ gradients over ranks
class _Loss(nn.Module):
    """The guide as DistributedDataParallel sees it: ``forward(loss)`` is ``loss(guide)``,
    so any loss of the guide (simulation or ELBO) runs inside DDP's forward."""

    def __init__(self, guide: nn.Module):
        super().__init__()
        self.guide = guide

    def forward(self, loss):
        return loss(self.guide)


def data_parallel(guide: nn.Module, world: World):
    """A callable ``f(loss) -> loss(guide)`` whose backward leaves in every parameter's
    gradient the mean over the processes of their gradients (DistributedDataParallel
    over the parameters that require a gradient now: make a new one when that set
    changes); ``loss`` itself for one process. (DDP also copies rank 0's buffers to the
    others before each step: ``SynchronisedBatchNorm`` keeps them equal anyway.)"""
    if world.size == 1:
        return lambda loss: loss(guide)
    from torch.nn.parallel import DistributedDataParallel

    device = next(guide.parameters()).device
    return DistributedDataParallel(_Loss(guide), device_ids=[device] if device.type ==
                                   "cuda" else None)
