"""The processes of one ``cryosvi infer`` run: one process, or several started by
``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in the
environment). torch.distributed serves only as a barrier (gloo on CPU, NCCL on CUDA);
the work is shared through files (``cryosvi.inference.chunks``).

One process without torchrun never initialises torch.distributed. Starting the process
group is process-wide state, so the command line does it (``start``/``stop``); library
calls take the ``Ranks`` they are given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

BARRIER_TIMEOUT = timedelta(days=7)
"""How long a rank waits at a barrier for the others: a rank that finished its shard
waits for the slowest one, which on a large data set takes hours (torch's default is
30 minutes). A rank that fails ends the whole run at once (torchrun stops the others)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank``
    on its machine; ``backend`` the torch.distributed backend of the process group
    ('gloo' or 'nccl'), or None for one process without one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def leader(self) -> bool:
        """Whether this is rank 0, which prepares the work folder and writes the
        result."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing for one process)."""
        if self.backend is None:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets
    WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_rank() -> int:
    """LOCAL_RANK under torchrun (the GPU a rank takes), else 0."""
    return int(os.environ.get("LOCAL_RANK", 0)) if launched() else 0


def auto_device(ranks: Ranks | None = None) -> str:
    """The device of ``--device auto``: this rank's GPU (cuda:LOCAL_RANK; cuda:0 for one
    process) where CUDA is present, else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    index = (ranks or Ranks(local_rank=local_rank())).local_rank
    return f"cuda:{index % torch.cuda.device_count()}"


def start(device: torch.device) -> Ranks:
    """This process's ``Ranks``: under torchrun with several processes, the process
    group is initialised (NCCL for a CUDA ``device``, which becomes the current one,
    else gloo); otherwise nothing is initialised."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return Ranks(local_rank=local_rank())
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank(), backend)


def stop(ranks: Ranks) -> None:
    """Leave the process group ``start`` initialised (nothing for one process)."""
    if ranks.backend is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
