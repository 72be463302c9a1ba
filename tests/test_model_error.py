"""cryosvi.inference.model_error through ``infer``: the model-error spectrum from a first
pass, against data whose extra per-shell error is known.

References: cryosvi's own coloured-noise simulation (the model is exact, so D must be ~0
and the intervals unchanged) and the same particles plus an independent coloured
'misfit' of a known spectrum D0 that the run's noise model does not know about (D must
come back as D0, and the defocus intervals must cover the truth more nearly at the
nominal 95 %)."""

from __future__ import annotations

import json
import math
import shutil

import mrcfile
import numpy as np
import pytest
import torch

import cryosvi.inference.driver as driver
from cryosvi.errors import CryosviError
from cryosvi.inference import model_error
from cryosvi.inference.chunks import work_folder_path
from cryosvi.inference.driver import infer
from cryosvi.io.particles import read_particles
from cryosvi.physics.noise import ERROR_WEIGHT, coloured_noise
from cryosvi.physics.spectrum import n_shells
from cryosvi.reference import Reference
from cryosvi.simulate import ImageEffects, simulate_dataset
from cryosvi.training.loop import train
from cryosvi.training.setup import TrainOptions
from test_guide import tiny_reference
from test_train import TINY, tiny_schedule

PARTICLES = 400
INFER = dict(importance=32, method="smc", moves=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def misfit_spectrum(noise: torch.Tensor, box: int) -> torch.Tensor:
    """(n_shells,) D0: as much again as the noise at low frequency, fading by 1/4 box^-1."""
    nu = torch.arange(n_shells(box), dtype=torch.float64) / box
    return noise * torch.exp(-(nu / 0.25) ** 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A coloured-noise simulation, a run trained on it with its true noise model, and a
    copy of the particles with the misfit added; each inferred with and without the
    model-error term."""
    root = tmp_path_factory.mktemp("model_error")
    reference = tiny_reference(n_modes=1, snr=2.0)
    simulate_dataset(reference, PARTICLES, root / "own", seed=0, progress=False,
                     effects=ImageEffects(noise_spectrum=((3.0, 0.05, 0.4),)))
    reference = Reference.load(root / "own" / "reference.npz")
    train(root / "own" / "particles.star", reference, root / "run",
          TrainOptions(latents=("defocus", "enm_scale"), schedule=tiny_schedule(epochs=3),
                       noise_model="reference", **TINY), progress=False)
    shutil.copytree(root / "own", root / "misfit")
    box = reference.optics.box
    misfit = misfit_spectrum(reference.noise_model.noise[0], box)
    with mrcfile.open(root / "misfit" / "particles.mrcs", "r+") as stack:
        extra = coloured_noise(misfit.expand(stack.data.shape[0], -1), box,
                               torch.Generator().manual_seed(11))
        stack.data[:] = (stack.data + extra.numpy()).astype(stack.data.dtype)
    frames = {(name, on): infer(root / "run", root / name / "particles.star",
                                root / f"{name}_{on}.star", model_error=on, **INFER)
              for name in ("own", "misfit") for on in (False, True)}
    return root, reference, misfit, frames


def defocus_scores(frame, star) -> tuple[float, float]:
    """(cover95, median std) of the defocus against the truth in the simulation's STAR."""
    truth = read_particles(star).metadata["rlnDefocusU"].to_numpy()
    z = (frame["rlnDefocusU"].to_numpy() - truth) / frame["cryosviDefocusStd"].to_numpy()
    return float(np.mean(np.abs(z) < 1.96)), float(np.median(frame["cryosviDefocusStd"]))


def test_own_simulation_has_no_model_error(runs):
    root, reference, _, frames = runs
    entry = frames["own", True].attrs["model_error"]
    noise = model_error.noise_model(entry)
    torch.testing.assert_close(noise.noise, reference.noise_model.noise)  # the run's S
    share = (noise.error / noise.noise)[0, 1:9]  # inside Nyquist (8 shells of 16 px)
    assert float(share.max()) < 0.05, share
    assert abs(entry["bfactor_added"]) < 20  # 20 Å^2: 5 % at Nyquist of 5 Å pixels
    star = root / "own" / "particles.star"
    cover_off, std_off = defocus_scores(frames["own", False], star)
    cover_on, std_on = defocus_scores(frames["own", True], star)
    assert abs(std_on / std_off - 1) < 0.05, (std_on, std_off)
    assert abs(cover_on - cover_off) <= 0.015, (cover_on, cover_off)
    # the estimate is written beside the STAR, marked as cryosvi's
    beside = json.loads(model_error.beside(root / "own_True.star").read_text())
    assert beside["kind"] == "model error" and beside["noise_model"] == entry["noise_model"]
    assert not model_error.beside(root / "own_False.star").exists()


def test_known_misfit_is_recovered_and_the_intervals_cover(runs):
    root, reference, misfit, frames = runs
    noise = model_error.noise_model(frames["misfit", True].attrs["model_error"])
    recovered = noise.error[0]
    strong = (misfit / reference.noise_model.noise[0] > 0.1).nonzero()[:, 0]
    strong = strong[strong >= 3]  # shells 1-2 (8 and 12 coefficients) are the contrast's
    assert len(strong) >= 4
    ratio = recovered[strong] / misfit[strong]
    assert float((ratio - 1).abs().max()) < 0.2, ratio
    star = root / "misfit" / "particles.star"
    cover_off, std_off = defocus_scores(frames["misfit", False], star)
    cover_on, std_on = defocus_scores(frames["misfit", True], star)
    assert cover_off < 0.925 and cover_on > cover_off + 0.02, (cover_off, cover_on)
    assert 0.93 <= cover_on <= 0.98 and std_on > 1.1 * std_off


def test_resume_reads_the_stored_estimate(runs, tmp_path, monkeypatch):
    """A stopped inference keeps its estimate in the work folder; the resumed one uses
    that (here altered: the resumed run must use the alteration) and not a new one; a
    resume with the other --model-error setting or another weight is refused (the
    fingerprint)."""
    root, _, _, _ = runs
    star, output = root / "misfit" / "particles.star", tmp_path / "post.star"
    original = driver.run_chunks

    def first_chunk_only(work, chunks, to_do, *args, **kwargs):
        original(work, chunks, to_do[:1], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_chunks", first_chunk_only)
    with pytest.raises(KeyboardInterrupt):
        infer(root / "run", star, output, chunk_size=100, **INFER)
    monkeypatch.setattr(driver, "run_chunks", original)
    stored = work_folder_path(output) / model_error.FILE_NAME
    entry = model_error.load(stored)
    assert entry["noise_model"]["error_weight"] == ERROR_WEIGHT
    entry["noise_model"]["contrast_mean"] = 0.987654321
    model_error.save(stored, entry)
    with pytest.raises(CryosviError, match="another inference"):
        infer(root / "run", star, output, chunk_size=100, resume=True, model_error=False,
              **INFER)
    with pytest.raises(CryosviError, match="another inference"):
        infer(root / "run", star, output, chunk_size=100, resume=True,
              model_error_weight=ERROR_WEIGHT / 2, **INFER)
    frame = infer(root / "run", star, output, chunk_size=100, resume=True, **INFER)
    assert frame.attrs["model_error"]["noise_model"]["contrast_mean"] == 0.987654321


def test_white_run_has_no_model_error(tmp_path):
    """A run without a noise model infers as before: no estimate, no file beside."""
    reference = tiny_reference(n_modes=1, snr=2.0)
    simulate_dataset(reference, 32, tmp_path / "data", seed=1, progress=False)
    reference = Reference.load(tmp_path / "data" / "reference.npz")
    train(tmp_path / "data" / "particles.star", reference, tmp_path / "run",
          TrainOptions(latents=("defocus", "enm_scale"), schedule=tiny_schedule(epochs=1),
                       noise_model="white", **TINY), progress=False)
    frame = infer(tmp_path / "run", tmp_path / "data" / "particles.star",
                  tmp_path / "post.star", **INFER)
    assert "model_error" not in frame.attrs
    assert not model_error.beside(tmp_path / "post.star").exists()


def test_closed_form_toy_coverage_of_a_linear_amplitude():
    """x = theta g + n + e: a known template g, noise n of spectrum S, a misfit e of
    spectrum D0 that the noise model lacks. Under a likelihood of spectrum T the
    least-squares theta (``NoiseModel.fit_contrast``: the flat-prior posterior mean) has
    posterior std 1 / sqrt(g' T^-1 g) and true std sqrt(g' T^-1 (S + D0) T^-1 g) / (g'
    T^-1 g) (closed forms, evaluated here with numpy's full FFT grid), so its 95 %
    interval covers with probability 2 Phi(1.96 ratio) - 1. With T = S it under-covers;
    with D estimated from the residuals (``model_error_spectrum``) and T = S + 2 D it
    covers at >= 95 % and not much more; Monte Carlo draws agree with the closed form."""
    from scipy.stats import norm

    from cryosvi.physics.noise import NoiseModel
    from cryosvi.physics.spectrum import model_error_spectrum, spectrum_from_residuals

    box, draws = 24, 3000
    nu = torch.arange(n_shells(box), dtype=torch.float64) / box
    noise = (1 + 3 * torch.exp(-(nu / 0.05) ** 2 / 2)) * 0.4 ** ((nu / 0.5) ** 2)
    misfit = 2 * noise * torch.exp(-(nu / 0.15) ** 2)
    yx = torch.arange(box, dtype=torch.float64) - box // 2
    template = 0.4 * torch.exp(-(yx[:, None] ** 2 + yx[None, :] ** 2) / (2 * 2.5**2))
    generator = torch.Generator().manual_seed(2)
    images = (template + coloured_noise(noise.expand(draws, -1), box, generator)
              + coloured_noise(misfit.expand(draws, -1), box, generator))

    k = np.fft.fftfreq(box, 1 / box)
    shells = np.round(np.hypot(k[:, None], k[None, :])).astype(int)
    power = np.abs(np.fft.fft2(template.numpy())) ** 2 / box**2
    power[0, 0] = 0  # DC left out (the offset)

    def closed_form(total: torch.Tensor) -> float:
        t, s, d = (v.numpy()[shells] for v in (total, noise, misfit))
        precision = (power / t).sum()
        true_var = (power * (s + d) / t**2).sum() / precision**2
        return float(2 * norm.cdf(1.96 / np.sqrt(precision * true_var)) - 1)

    def monte_carlo(total: torch.Tensor) -> float:
        a, std = NoiseModel(box, 1.0, total).fit_contrast(images, template.expand_as(images))
        return float(((a - 1).abs() <= 1.96 * std).double().mean())

    a, _ = NoiseModel(box, 1.0, noise).fit_contrast(images, template.expand_as(images))
    residual = spectrum_from_residuals(images - a[:, None, None] * template)
    error = model_error_spectrum(residual, noise[None])[0]
    # against D0 through the same 3-shell smoothing (its expectation: R = S + D0)
    expected = model_error_spectrum((noise + misfit)[None], noise[None])[0]
    inside = slice(2, box // 2 - 1)  # shell 1 is smoothed with DC, the last with corners
    np.testing.assert_allclose(error[inside], expected[inside], rtol=0.1,
                               atol=0.02 * float(noise.min()))
    tolerance = 3 * math.sqrt(0.95 * 0.05 / draws) + 0.005
    alone, with_error = closed_form(noise), closed_form(noise + 2 * error)
    assert alone < 0.85 and 0.95 <= with_error <= 0.99, (alone, with_error)
    assert abs(monte_carlo(noise) - alone) < 2 * tolerance
    assert abs(monte_carlo(noise + 2 * error) - with_error) < tolerance


def test_particles_of_other_optics_groups_are_refused(runs, tmp_path):
    """The run's noise spectra go with its training's optics groups (one here): particles
    in two groups, read with their CTF estimates, end in one error line, not in a shape
    error deep in the model-error pass."""
    from dataclasses import replace

    from cryosvi.dataset import run_particles
    from cryosvi.noise_data import matched_noise_model
    from cryosvi.rundir import load_trained
    from cryosvi.simulate import Acquisition, group_optics

    root, reference, _, _ = runs
    simulate_dataset(reference, 20, tmp_path / "two", seed=1, progress=False,
                     acquisition=Acquisition(groups=group_optics(reference.optics, 2)))
    _, trained, guide = load_trained(root / "run", "cpu")
    table = read_particles(tmp_path / "two" / "particles.star")
    config = replace(guide.config, ctf_estimates=True)
    data, _ = run_particles(table, config, trained)
    with pytest.raises(CryosviError, match="2 optics group.*measured on 1"):
        matched_noise_model(data, trained)
