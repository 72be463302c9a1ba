"""A run with a noise model: training simulations draw its coloured noise and contrast,
train keeps it (--noise-model), infer evaluates its likelihood.

References: the per-shell power of the simulated noise (images minus contrast times the
clean image) against the spectrum asked for, within its sampling error (a shell of n
coefficients averaged over B images has relative std ~ 1 / sqrt(n B)); the drawn
contrasts' mean and std against the truncated normal's (scipy.stats.truncnorm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cryosvi.inference.driver import infer
from cryosvi.latents import JUNK_COLUMN
from cryosvi.physics.noise import NoiseModel
from cryosvi.physics.spectrum import coloured_spectrum, spectrum_from_residuals
from cryosvi.reference import Reference
from cryosvi.rundir import load_trained
from cryosvi.simulate import ImageEffects, simulate_dataset
from cryosvi.training.loop import train
from cryosvi.training.objectives import simulation_batch
from cryosvi.training.setup import TrainOptions

from test_guide import tiny_reference
from test_train import TINY, tiny_schedule


def test_simulation_batches_draw_the_noise_models_spectrum_and_contrast():
    reference = tiny_reference(n_modes=1)
    forward = reference.forward_model()
    box = reference.optics.box
    spectrum = 0.3 * coloured_spectrum(box, 3.0, 0.05, 0.4)
    noise = NoiseModel(box, reference.optics.pixel_size, spectrum, contrast_mean=1.0,
                       contrast_std=0.0)
    torch.manual_seed(0)
    values, images, _ = simulation_batch(reference, forward, noise, 2048,
                                         latents=("defocus", "rotation", "enm_scale"))
    torch.manual_seed(0)
    _, clean, _ = simulation_batch(reference, forward, 0.0, 2048,
                                   latents=("defocus", "rotation", "enm_scale"))
    measured = spectrum_from_residuals((images - clean).double())[0]
    # every shell but DC (the offset's, left out) within 4 sampling stds (~ 1 / sqrt(nB))
    relative = (measured[1:] / spectrum[1:] - 1).abs()
    assert float(relative.max()) < 0.1, relative

    noise = noise.replace(contrast_mean=0.8, contrast_std=0.3, contrast_floor=0.4)
    torch.manual_seed(1)
    contrast = noise.draw_contrast((20000,))
    low = (0.4 - 0.8) / 0.3
    law = stats.truncnorm(low, np.inf, loc=0.8, scale=0.3)
    assert float(contrast.min()) >= 0.4
    assert float(contrast.mean()) == pytest.approx(law.mean(), abs=0.01)
    assert float(contrast.std()) == pytest.approx(law.std(), abs=0.01)


@pytest.fixture(scope="module")
def coloured_run(tmp_path_factory):
    """A coloured-noise simulation (cryosvi simulate --noise-spectrum) and runs trained
    on it with its recorded noise model, with one estimated from the particles and
    with white noise."""
    root = tmp_path_factory.mktemp("coloured")
    reference = tiny_reference(n_modes=1, snr=2.0)
    effects = ImageEffects(noise_spectrum=((3.0, 0.05, 0.4),))
    simulate_dataset(reference, 48, root / "data", seed=0, progress=False, effects=effects)
    reference = Reference.load(root / "data" / "reference.npz")
    for choice in ("reference", "estimate", "white"):
        train(root / "data" / "particles.star", reference, root / choice,
              TrainOptions(latents=("defocus", "enm_scale"), schedule=tiny_schedule(epochs=1),
                           noise_model=choice, **TINY), progress=False)
    return root


def test_train_keeps_the_noise_model_it_was_asked_for(coloured_run):
    truth = Reference.load(coloured_run / "data" / "reference.npz").noise_model
    kept = {c: load_trained(coloured_run / c)[1].noise_model
            for c in ("reference", "estimate", "white")}
    assert kept["white"] is None
    torch.testing.assert_close(kept["reference"].noise, truth.noise)
    # the estimate from the background: the spectrum's shape within 35 % on 48 particles
    # of a 16 px box (the 5 % per shell at 2 000 particles is tests/test_noise_estimation)
    ratio = kept["estimate"].noise[0, 1:9] / truth.noise[0, 1:9]
    assert float((ratio / ratio.median() - 1).abs().max()) < 0.35, ratio


def test_auto_noise_model_estimates_unless_the_reference_knows_the_noise(coloured_run,
                                                                          tmp_path):
    """'auto' (the default): the reference's own noise model where it has one, white where
    the noise std is known (given, or a white simulation's), else the particles' own
    estimate, which a training run from a bare reference records and keeps."""
    import dataclasses
    import json

    from cryosvi.noise_data import resolve_noise_model
    from cryosvi.errors import CryosviError

    known = Reference.load(coloured_run / "data" / "reference.npz")
    white = known.with_settings(noise_model=None)
    bare = white.with_settings(noise=dataclasses.replace(white.noise, std=0.0))
    assert resolve_noise_model("auto", known) == "reference"
    assert resolve_noise_model("auto", white) == "reference"
    assert resolve_noise_model("auto", bare) == "estimate"
    assert resolve_noise_model("auto", bare, noise_std=0.5) == "reference"
    assert resolve_noise_model("white", known) == "white"
    with pytest.raises(CryosviError, match="unknown noise model"):
        resolve_noise_model("pink", known)
    train(coloured_run / "data" / "particles.star", bare, tmp_path / "auto",
          TrainOptions(latents=("defocus", "enm_scale"), schedule=tiny_schedule(epochs=1),
                       **TINY), progress=False)
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["noise_model"] == "estimate"
    kept = load_trained(tmp_path / "auto")[1].noise_model
    ratio = kept.noise[0, 1:9] / known.noise_model.noise[0, 1:9]
    assert float((ratio / ratio.median() - 1).abs().max()) < 0.35, ratio


def test_infer_uses_the_runs_noise_model(coloured_run, tmp_path):
    """The same particles through the run with the true noise model give finite junk
    probabilities and a defocus no worse than through the white run (each from its own
    guide; a loose bound, 1.5x, as a tiny guide's accuracy varies)."""
    star = coloured_run / "data" / "particles.star"
    truth = Reference.load(coloured_run / "data" / "reference.npz")
    frames = {c: infer(coloured_run / c, star, tmp_path / f"{c}.star", importance=16,
                       method="smc", moves=2, progress=False)
              for c in ("reference", "white")}
    from cryosvi.io.particles import read_particles
    true_defocus = read_particles(star).metadata["rlnDefocusU"].to_numpy()
    assert truth.noise_model is not None
    errors = {}
    for choice, frame in frames.items():
        assert np.isfinite(frame[JUNK_COLUMN]).all()
        errors[choice] = np.sqrt(np.mean((frame["rlnDefocusU"].to_numpy() - true_defocus) ** 2))
    assert errors["reference"] <= 1.5 * errors["white"], errors
