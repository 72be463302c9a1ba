"""Random numbers: per-particle counter-based streams for inference, and the process's
global streams, saved as tensors and numbers and kept for the caller around library
calls.

Per-particle streams (:class:`Streams`): inference draws every random number from a
counter-based generator, Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random
numbers: as easy as 1, 2, 3", SC 2011; the Random123 library's reference algorithm),
written in torch integer operations. A number is a pure function of (seed, particle
index, the draw's key, element index), so a particle's posterior does not depend on the
other particles of its batch, on the batch size, on how the data set is split over
processes, or on the device: the integers are the same on CPU and CUDA bit for bit, and
so are the uniforms (exact integer-to-float arithmetic); normals are the uniforms
through the inverse normal CDF in float64 (equal across devices to an ulp of float64).

Counter layout: Philox's 128-bit counter holds (element pair index, particle index,
the draw's key as two 32-bit words), its 64-bit key the seed and the length of the
draw's key (so keys (1,) and (1, 0) differ). Each element takes two
32-bit words: float64 uniforms use 53 bits of them, float32 uniforms 23 bits of the
first, both (k + 1/2) / 2^bits, strictly inside (0, 1).

Global streams: ``simulate_dataset`` and ``train`` seed torch/numpy/python's global
generators (Pyro samples from torch's) so that a run is reproducible; ``preserved_rng``
puts the caller's streams back afterwards, so calling them changes no process-wide
state.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers (Random123, philox.h)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule increments (golden ratio, sqrt 3 - 1)
PHILOX_ROUNDS = 10
KEY_PARTS = 4
"""A draw's key is up to this many integers, each below ``KEY_PART_LIMIT``."""
KEY_PART_LIMIT = 1 << 16
MAX_PARTICLES = 1 << 32
"""Particle indices are below this (one 32-bit counter word)."""


def _mulhilo(a: Tensor, multiplier: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a * multiplier for 32-bit values a (int64 tensor) and
    a 32-bit constant, without int64 overflow: the multiplier in 16-bit halves."""
    p = a * (multiplier >> 16)  # < 2^48
    q = a * (multiplier & 0xFFFF)  # < 2^48
    # a m = p 2^16 + q = (p >> 16) 2^32 + t, t = (p & 0xFFFF) 2^16 + q < 2^49
    t = ((p & 0xFFFF) << 16) + q
    return (p >> 16) + (t >> 32), t & _MASK32


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int],
               rounds: int = PHILOX_ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` of counters (four int64 tensors of 32-bit values, broadcast
    together) under ``key`` (two 32-bit integers): four int64 tensors of 32-bit words.
    Random123's known-answer vectors are in tests/test_randomness.py."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(rounds):
        if round_:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


class Streams:
    """Counter-based random numbers for a batch of particles of a data set.

    ``index`` (B,) int64: each particle's index in the data set (0 <= i < 2^32); ``seed``
    (0 <= seed < 2^64); ``key``: the draw's key, up to ``KEY_PARTS`` integers in [0,
    2^16). ``child(*parts)`` extends the key: every separate draw takes its own child
    (two draws with one key give the same numbers). A draw's numbers for particle b
    depend only on (seed, index[b], key, element), never on the other particles.

    ``uniform(shape, axis)`` and ``normal(shape, axis)`` draw a tensor of ``shape`` whose
    dimension ``axis`` (of size B) is the particle axis, on the device of ``index``;
    a particle's elements are numbered in row-major order of the other dimensions, so
    particle b gets the same numbers whatever B and its place in the batch.
    """

    def __init__(self, seed: int, index: Tensor, key: tuple[int, ...] = ()):
        seed = int(seed)
        if not 0 <= seed < 1 << 32:
            raise ValueError(f"seed must be in [0, 2^32), got {seed}")
        index = torch.as_tensor(index, dtype=torch.int64)
        if index.dim() != 1:
            raise ValueError(f"index must be (B,), got {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= MAX_PARTICLES):
            raise ValueError("particle indices must be in [0, 2^32)")
        if len(key) > KEY_PARTS or any(not 0 <= int(k) < KEY_PART_LIMIT for k in key):
            raise ValueError(f"a key is at most {KEY_PARTS} integers in [0, 2^16), got {key}")
        self.seed, self.index, self.key = seed, index, tuple(int(k) for k in key)

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def device(self) -> torch.device:
        return self.index.device

    def child(self, *parts: int) -> "Streams":
        """The streams of a sub-draw: the key extended by ``parts``."""
        return Streams(self.seed, self.index, self.key + tuple(parts))

    def take(self, rows) -> "Streams":
        """The streams of the particles ``rows`` of this batch (their own numbers)."""
        return Streams(self.seed, self.index[torch.as_tensor(rows, device=self.device)],
                       self.key)

    def to(self, device) -> "Streams":
        return Streams(self.seed, self.index.to(device), self.key)

    # ----------------------------------------------------------------- words
    def _key_words(self) -> tuple[int, int]:
        parts = self.key + (0,) * (KEY_PARTS - len(self.key))
        return (parts[0] << 16) | parts[1], (parts[2] << 16) | parts[3]

    def _words(self, shape, axis: int) -> tuple[Tensor, Tensor]:
        """Two 32-bit words (int64 tensors of ``shape``) per element."""
        shape = tuple(int(s) for s in shape)
        axis = axis % len(shape) if shape else 0
        if not shape or shape[axis] != len(self):
            raise ValueError(f"shape {shape} has no particle axis {axis} of size {len(self)}")
        others = shape[:axis] + shape[axis + 1:]
        count = int(np.prod(others, dtype=np.int64))
        pairs = (count + 1) // 2
        if pairs >= MAX_PARTICLES:
            raise ValueError(f"{count} numbers per particle in one draw is too many")
        device = self.device
        block = torch.arange(pairs, dtype=torch.int64, device=device)[None, :]
        particle = self.index[:, None]
        k2, k3 = self._key_words()
        words = philox4x32((block, particle, torch.full_like(block, k2),
                            torch.full_like(block, k3)),
                           (self.seed, len(self.key)))
        # Block j holds elements 2j (words 0, 1) and 2j + 1 (words 2, 3).
        w = torch.stack(torch.broadcast_tensors(*words), -1).reshape(len(self), 2 * pairs, 2)
        w = w[:, :count].reshape(len(self), *others, 2)
        w = w.movedim(0, axis)
        return w[..., 0], w[..., 1]

    # --------------------------------------------------------------- numbers
    def uniform(self, shape, axis: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniforms in (0, 1) of ``shape`` with the particle axis ``axis``: float64 with
        53 random bits, float32 with 23 (the first word's top bits)."""
        first, second = self._words(shape, axis)
        if dtype == torch.float64:
            k = (first << 21) | (second >> 11)  # 53 bits
            return (k.double() + 0.5) * 2.0 ** -53
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"uniforms are floating point, got {dtype}")
        # (2 k + 1) / 2^24 with k < 2^23 is exact in float32.
        return ((first >> 9) * 2 + 1).to(torch.float32).mul_(2.0 ** -24).to(dtype)

    def normal(self, shape, axis: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normals of ``shape`` with the particle axis ``axis``: the inverse
        normal CDF of 53-bit uniforms, in float64 (|z| < 8.3), cast to ``dtype``."""
        return torch.special.ndtri(self.uniform(shape, axis, torch.float64)).to(dtype)


# ----------------------------------------------------------------- global streams
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
