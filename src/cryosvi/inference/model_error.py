"""The model-error spectrum of ``cryosvi infer``: honest intervals when the physics model
does not explain the images exactly.

A model that misses something (a conformation it has no mode for, a density that is
only close, an envelope it lacks) leaves residual power R beyond the noise spectrum S.
With S alone in the likelihood the posterior is too narrow: the misfit acts as signal.
Counting it as one more Gaussian error per optics group and shell, T = S + k D with
D = max(R - S, 0) and k = ``physics.noise.ERROR_WEIGHT`` (8, measured there), widens the
posterior along the directions the misfit touches. On cryosvi's own simulations R = S,
hence D ~ 0, and the intervals stay as they were.

The estimate (``estimate``), before the main pass of a run with a noise model:

1. a fixed subset of the particles, up to MODEL_ERROR_PARTICLES chosen by the seed
   (``subset``: a function of the file's length and the seed alone, as the SNR estimate
   of 'auto' and the junk nulls' subset are);
2. a first pass over it with the run's noise model and the same refinement as the main
   pass; the model images at each particle's posterior mean (``mean_images``), and the
   junk probability from the subset's three evidences (``junk.assess_junk``), whose
   1 - p_junk weighs the particles;
3. ``noise_data.refine_noise_model`` against those images: B from the per-shell gain (the
   envelope, added to the noise model's), the contrast prior and the residual spectrum
   R; then D = max(R - S, 0) smoothed over 3 shells (``model_error_spectrum``) with S
   the run's own noise spectrum (the one its guide was trained with; a background
   estimate cannot tell a misfit that fills the box from noise), so T = S + k D >= R.

Every particle is then inferred with the refined noise model: its posterior depends on
it, the run, the settings and the seed only. The estimate is written to the work folder
(``FILE_NAME``) before any chunk, and a resumed inference (or another process) reads it
from there instead of computing it, so every chunk of one inference uses the same
numbers whatever the device; the result is also written beside the STAR
(``record``: the full noise model and the D/T summary).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosvi.noise_data import refine_noise_model
from cryosvi.errors import CryosviError
from cryosvi.inference.junk import assess_junk
from cryosvi.io.atomic import write_atomically
from cryosvi.io.outputs import provenance
from cryosvi.latents import REGISTRY, forward_inputs
from cryosvi.physics.noise import ERROR_WEIGHT, NoiseModel
from cryosvi.physics.spectrum import model_error_spectrum, shell_frequency
from cryosvi.reference import NOISE_MODEL_ARRAYS, NOISE_MODEL_DEFAULTS, NOISE_MODEL_NUMBERS

MODEL_ERROR_PARTICLES = 1000
"""The first pass's particles: 1 000 give each shell's residual power of a 48 px box
to about 1 % (a shell of n coefficients averages 1000 n of them)."""
SUBSET_SEED = 15_485_863
"""Added to the inference's seed for the subset's draw (apart from the other subsets)."""
FILE_NAME = "model_error.json"
"""The estimate in the work folder, and the suffix of the copy beside the STAR."""


def beside(output: str | Path) -> Path:
    """Where ``infer`` writes the estimate beside its STAR: OUTPUT with suffix
    .model_error.json."""
    return Path(output).with_suffix(".model_error.json")


def subset(count: int, seed: int, size: int = MODEL_ERROR_PARTICLES) -> np.ndarray:
    """(k,) sorted rows: min(count, size) particles drawn without replacement by
    ``seed`` (a generator of its own: no global random state is touched)."""
    generator = torch.Generator().manual_seed(seed + SUBSET_SEED)
    return np.sort(torch.randperm(count, generator=generator)[:min(count, size)].numpy())


def mean_images(forward, summary: dict, known: dict, conditions, latents) -> torch.Tensor:
    """(B, L, L): the model images at each particle's posterior mean (each latent's
    ``mean_key`` of a refinement summary; the pose's is the mean direction of its
    heaviest component) with the ``known`` values of the others."""
    values = {**known, **{site: summary[REGISTRY[site].mean_key] for site in latents}}
    return forward(**forward_inputs(values, conditions))


def estimate(summarise: Callable[[np.ndarray], dict], images_at_means: Callable,
             data, reference, noise: NoiseModel, seed: int, batch_size: int,
             progress: bool = True, weight: float = ERROR_WEIGHT) -> dict:
    """The refined noise model of a run's particles (module notes), as a ``record``,
    with k = ``weight`` in T = S + k D.

    summarise(index) -> the refinement's summary of the particles ``index`` (with
    'log_evidence' (B, 3): the physics model's and the two nulls'); images_at_means(index,
    summary) -> their model images (B, L, L) at the posterior means (``mean_images``).
    noise: the run's noise model, at the working box."""
    rows = subset(len(data), seed)
    images, evidence = [], []
    bar = tqdm(total=len(rows), desc="model error (first pass)", unit="particle",
               disable=not progress, smoothing=0.05)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            index = rows[start:start + batch_size]
            summary = summarise(index)
            images.append(images_at_means(index, summary).double().cpu())
            evidence.append(summary["log_evidence"].double().cpu())
            bar.update(len(index))
    bar.close()
    p_junk = assess_junk(torch.cat(evidence)).p_junk
    weights = (1 - p_junk).nan_to_num(0.0).clamp(0, 1)  # a broken image weighs nothing
    if not float(weights.sum()) > 0:
        raise CryosviError("the model-error estimate found no particle that is not junk "
                           "(use --model-error off)")
    noise = noise.to("cpu")
    refined = refine_noise_model(noise, data, reference, rows, torch.cat(images), weights)
    fitted = refined.noise
    # D against the run's own S: the background that refine_noise_model also measures
    # cannot tell a misfit that fills the box from noise, and the run's S is what the
    # guide was trained with.
    error = model_error_spectrum(refined.residual_spectrum, noise.noise)
    out = fitted.replace(noise=noise.noise, error=error, error_weight=weight)
    # P, the particles' power beyond T, follows the new T (P + T is what was measured)
    out = out.replace(signal_power=(fitted.signal_power + fitted.total - out.total)
                      .clamp_min(0))
    return record(out, noise, len(rows), float(weights.sum()), refined.bfactor_shells)


def record(noise: NoiseModel, before: NoiseModel, particles: int, weight: float,
           bfactor_shells: int) -> dict:
    """JSON-able: the refined noise model (exactly: floats round-trip through JSON) and
    its summary per optics group: each shell's frequency (1/Å), S, D, T and the share
    k D / T of the likelihood's variance that is model error; the median and largest
    share; the B added to the run's and the contrast prior."""
    share = noise.error_weight * noise.error / noise.total
    frequency = shell_frequency(noise.box, noise.pixel_size)
    inside = frequency <= 1 / (2 * noise.pixel_size)  # the corners beyond Nyquist left out
    groups = []
    for g in range(noise.n_groups):
        part = share[g, 1:][inside[1:]]
        peak = int(part.argmax()) + 1
        groups.append({"median_error_share": float(part.median()),
                       "max_error_share": float(part.max()),
                       "max_error_share_at_resolution_A": float(1 / frequency[peak]),
                       "frequency_per_A": frequency.tolist(),
                       "noise": noise.noise[g].tolist(), "error": noise.error[g].tolist(),
                       "total": noise.total[g].tolist(), "error_share": share[g].tolist()})
    return {**provenance("model error"),
            "particles": particles, "weight": weight,
            "bfactor_added": noise.bfactor - before.bfactor,
            "bfactor_shells": bfactor_shells,
            "contrast": [noise.contrast_mean, noise.contrast_std],
            "groups": groups,
            "noise_model": {**{k: getattr(noise, k) for k in NOISE_MODEL_NUMBERS},
                            **{k: getattr(noise, k).tolist() for k in NOISE_MODEL_ARRAYS}}}


def noise_model(entry: dict) -> NoiseModel:
    """The NoiseModel of a ``record``."""
    numbers = entry["noise_model"]
    return NoiseModel(**{k: numbers[k] if k in numbers else NOISE_MODEL_DEFAULTS[k]
                         for k in NOISE_MODEL_NUMBERS},
                      **{k: torch.tensor(numbers[k], dtype=torch.float64)
                         for k in NOISE_MODEL_ARRAYS})


def save(path: str | Path, entry: dict) -> None:
    """Write a ``record`` atomically (JSON)."""
    text = json.dumps(entry, indent=1)
    write_atomically(Path(path), lambda temporary: temporary.write_text(text))


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def summary_line(entry: dict) -> str:
    """One line: how much of the likelihood's variance is model error, and the B."""
    groups = entry["groups"]
    median = np.median([g["median_error_share"] for g in groups])
    worst = max(groups, key=lambda g: g["max_error_share"])
    bfactor = entry["bfactor_added"]
    return (f"model error from {entry['particles']} particles: k D / T median "
            f"{100 * median:.0f} %, at most {100 * worst['max_error_share']:.0f} % (at "
            f"{worst['max_error_share_at_resolution_A']:.1f} Å); B envelope "
            + (f"{bfactor:+.1f} Å^2" if math.isfinite(bfactor) and entry["bfactor_shells"]
               else "not measurable (kept)"))
