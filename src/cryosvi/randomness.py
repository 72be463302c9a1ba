"""The process's random streams: saved as tensors and numbers (checkpoints load them with
``torch.load(weights_only=True)``), and kept for the caller around library calls.

``simulate_dataset``, ``train`` and ``infer`` seed torch/numpy/python's global generators
(Pyro samples from torch's) so that a run is reproducible; ``preserved_rng`` puts the
caller's streams back afterwards, so calling them changes no process-wide state.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


def rng_state() -> dict:
    """torch, CUDA, numpy and python RNG states as tensors and numbers (no pickle)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].cpu().numpy().astype(np.uint32),
                         numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["words"].tolist()),
                     python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@contextmanager
def preserved_rng():
    """Run the body (or the decorated function) with the global random streams restored
    afterwards, whether it returns or raises."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
