"""Random numbers. Per-particle streams (Philox4x32-10): Random123's known answers, the
uniform and normal laws (KS tests against scipy), independence across particles,
elements and draws, and a particle's numbers independent of its batch. Library calls
keep the caller's global streams: simulate and train seed the global generators for
reproducibility and put the caller's back afterwards, and infer draws none."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from cryosvi.inference.driver import infer
from cryosvi.randomness import Streams, philox4x32, preserved_rng, rng_state, set_rng_state
from cryosvi.simulate import simulate_dataset
from cryosvi.training.loop import train
from test_train import load_reference, run_options, tiny_reference


def draws():
    """The next values of the torch, numpy and python streams (consumes them)."""
    return (torch.rand(3).tolist(), np.random.random_sample(3).tolist(),
            [random.random() for _ in range(3)])


def seeded_state(seed: int):
    """Seed all three streams; their state and the draws that follow it."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    state = rng_state()
    expected = draws()
    set_rng_state(state)
    return state, expected


def test_state_round_trips_and_preserved_rng_restores_on_error():
    state, expected = seeded_state(5)
    assert draws() == expected
    set_rng_state(state)
    with pytest.raises(RuntimeError):
        with preserved_rng():
            seeded_state(0)
            raise RuntimeError
    assert draws() == expected


def test_simulate_train_and_infer_leave_the_callers_streams_alone(tmp_path):
    state, expected = seeded_state(11)
    simulate_dataset(tiny_reference(), 24, tmp_path / "data", seed=3)
    assert draws() == expected
    set_rng_state(state)
    particles = tmp_path / "data" / "particles.star"
    train(particles, load_reference(tmp_path / "data"), tmp_path / "run", run_options(),
          progress=False)
    assert draws() == expected
    set_rng_state(state)
    infer(tmp_path / "run", particles, tmp_path / "posterior.star", importance=4,
          progress=False)
    assert draws() == expected


# ----------------------------------------------------------- per-particle streams

RANDOM123_KAT = [
    # Random123's tests/kat_vectors, the "philox4x32 10" lines: counter (4 words), key (2
    # words), expected output (4 words).
    ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff,) * 4, (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


@pytest.mark.parametrize("counter, key, expected", RANDOM123_KAT)
def test_philox_gives_random123s_known_answers(counter, key, expected):
    words = philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert [int(w) for w in words] == list(expected)


def test_uniforms_and_normals_have_their_distributions():
    """KS tests against scipy's uniform and normal CDFs, for both precisions; the
    uniforms never reach 0 or 1."""
    streams = Streams(7, torch.arange(1000))
    for dtype in (torch.float32, torch.float64):
        u = streams.child(1).uniform((1000, 100), axis=0, dtype=dtype)
        assert u.dtype == dtype and bool(((u > 0) & (u < 1)).all())
        assert stats.kstest(u.double().flatten().numpy(), "uniform").pvalue > 1e-3
        z = streams.child(2).normal((100, 1000), axis=1, dtype=dtype)
        assert stats.kstest(z.double().flatten().numpy(), "norm").pvalue > 1e-3
    # the tails: 10^6 normals, as many beyond 3 sigma as the normal law says (binomial)
    z = streams.child(3).normal((1000, 1000), axis=0, dtype=torch.float64).flatten()
    expected = 2 * stats.norm.sf(3) * z.numel()
    assert abs(int((z.abs() > 3).sum()) - expected) < 5 * math.sqrt(expected)


def test_streams_are_independent_across_particles_elements_and_draws():
    """Neighbouring particles, neighbouring elements and two draws of one particle are
    uncorrelated (|r| < 4.5 / sqrt(n)), and pairs of them are uniform on the square
    (chi^2 over 10 x 10 cells)."""
    n = 20000
    streams = Streams(3, torch.arange(n))
    u = streams.child(5).uniform((n, 4), axis=0, dtype=torch.float64).numpy()
    v = streams.child(6).uniform((n, 4), axis=0, dtype=torch.float64).numpy()
    pairs = [(u[:-1, 0], u[1:, 0]),  # particle i and i + 1
             (u[:, 0], u[:, 1]),  # elements 0 and 1 of one particle
             (u[:, 1], u[:, 2]),  # elements of the second counter block
             (u[:, 0], v[:, 0])]  # two draws
    for a, b in pairs:
        assert abs(np.corrcoef(a, b)[0, 1]) < 4.5 / math.sqrt(len(a))
        counts = np.histogram2d(a, b, bins=10, range=[[0, 1], [0, 1]])[0]
        assert stats.chisquare(counts.flatten()).pvalue > 1e-3


def test_a_particles_numbers_do_not_depend_on_its_batch():
    """The same particle gets the same numbers in any batch, at any place in it, with
    any particle axis, and through ``take``; another seed, particle or key gives other
    numbers."""
    whole = Streams(11, torch.tensor([5, 9, 2, 40]))
    part = Streams(11, torch.tensor([40, 9]))
    a = whole.child(3, 1).normal((6, 4, 2), axis=1)
    b = part.child(3, 1).normal((2, 6, 2), axis=0)
    assert torch.equal(a[:, 3], b[0]) and torch.equal(a[:, 1], b[1])
    c = whole.take(torch.tensor([3, 1])).child(3, 1).normal((6, 2, 2), axis=1)
    assert torch.equal(c, a[:, [3, 1]])
    others = [Streams(12, whole.index).child(3, 1), whole.child(3, 2), whole.child(3, 1, 0),
              whole.child(3)]
    for other in others:
        assert not torch.equal(other.normal((6, 4, 2), axis=1), a)
    assert not torch.equal(a[:, 0], a[:, 1])
    with pytest.raises(ValueError):
        whole.uniform((6, 3), axis=1)  # no particle axis of size 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_cpu_numbers():
    """The words and uniforms bit for bit; normals to an ulp (ndtri's implementations)."""
    cpu = Streams(5, torch.arange(300)).child(1)
    cuda = cpu.to("cuda")
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(cpu.uniform((300, 33), dtype=dtype),
                           cuda.uniform((300, 33), dtype=dtype).cpu())
    torch.testing.assert_close(cpu.normal((300, 33), dtype=torch.float64),
                               cuda.normal((300, 33), dtype=torch.float64).cpu(),
                               rtol=1e-14, atol=1e-14)
