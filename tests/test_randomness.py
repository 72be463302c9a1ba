"""Library calls keep the caller's random streams: simulate, train and infer seed the
global generators for reproducibility and put the caller's back afterwards."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cryosvi.inference.driver import infer
from cryosvi.randomness import preserved_rng, rng_state, set_rng_state
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
