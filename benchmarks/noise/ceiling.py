"""The conformation's ceiling on a realistic set with micrograph effects: what a perfect
inference of the hinge would rank, given the data.

Along the EXACT hinge displacement of the pseudo-atoms (``model_match.hinge_displacement``:
no direction to learn), at each particle's given (consensus) pose, CTF estimate and
shift, the posterior mean of the amplitude on a grid (0.125 Å RMS apart) under a uniform
prior on +-8 Å RMS, under the data set's own prior (the truth's: uniform from 0 to the
largest hinge's amplitude: the Bayes estimate of a perfect model), and under a Gaussian
of that prior's mean and variance (the shape cryosvi's priors have), with three
likelihoods, each with the contrast integrated out and the B envelope and contrast prior
refined against the model images at the given poses (``dataset.refine_noise_model``,
no model-error term):

* ``true``: each optics group's true noise spectrum (``realistic_noise.truth_spectrum``);
* ``estimate``: the particles' background estimate (``dataset.estimate_noise_model``);
* ``white``: white noise of the particles' background variance.

Printed and written (--json): |Spearman| of the posterior means with the true hinge angle
over the real particles under each prior (true junk left out of the score and of the
refinement), and the refined B and contrast prior: what the data allow, against which to
read the product's |Spearman| on the same set (learnt direction, trained guide, grid).

    python benchmarks/realistic/make_dataset.py -o DATA --preset poses-given --realistic \
        --oracle 0
    PYTHONPATH=src python benchmarks/noise/ceiling.py DATA [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from cryosvi.config import Imaging, Noise, Optics, Priors
from cryosvi.dataset import (ParticleData, data_box, data_pixel_size,
                             estimate_noise_model, refine_noise_model)
from cryosvi.io.particles import read_particles
from cryosvi.latents import BY_NAME
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.noise import NoiseModel
from cryosvi.physics.spectrum import apply_envelope
from cryosvi.reference import build_reference

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "realistic"))
from model_match import hinge_displacement  # the data set's own hinge
from realistic_noise import truth_spectrum

GRID = torch.linspace(-8, 8, 129)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a make_dataset.py --realistic output")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    truth = json.loads((args.data / "truth.json").read_text())
    table = read_particles(args.data / "particles.star")
    meta = table.metadata
    data = ParticleData(table, data_box(table), True)
    pixel = data_pixel_size(table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = build_reference(truth["settings"]["structure"], "A", 1,
                                    Optics(box=data.box, pixel_size=pixel),
                                    Imaging(sigma=2.0), Priors(mode_std=(2.0,)),
                                    Noise(snr=float("inf")), beads="residue")
    unit = hinge_displacement(reference, truth["settings"]).ravel()
    largest = float(np.linalg.norm(unit) / np.sqrt(reference.n_atoms))  # Å RMS
    unit = torch.tensor(unit / np.linalg.norm(unit), dtype=torch.float32)
    forward = ForwardModel(reference.coords, unit.reshape(1, -1, 3), reference.optics,
                           reference.imaging, data.groups)
    n = len(table)
    rows = np.arange(n)
    images = torch.from_numpy(data.images(rows)).double()
    ctf, shifts = data.conditions.ctf, data.conditions.shifts
    rotation = BY_NAME["pose"].known(table, None)
    group = ctf.group
    real = meta.get("cryosviTrueJunk", 0 * meta["rlnOpticsGroup"]).to_numpy() == 0
    weights = torch.from_numpy(real.astype(np.float64))

    def model_at(value: float) -> torch.Tensor:
        with torch.no_grad():
            return forward(torch.full((n, 1), value), rotation, None, ctf=ctf,
                           shifts=shifts).double()

    at_zero = model_at(0.0)
    estimate = estimate_noise_model(data, reference, seed=0, weights=weights.numpy())
    background = float(estimate.noise[:, 1:].mean())
    starts = {"true": estimate.replace(noise=truth_spectrum(table, truth)),
              "estimate": estimate,
              "white": estimate.replace(noise=torch.full_like(estimate.noise, background))}
    models: dict[str, NoiseModel] = {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False,
                            capture_output=True, text=True, cwd=HERE).stdout.strip()
    out = {"data": str(args.data), "commit": commit, "date": time.strftime("%Y-%m-%d"),
           "seed": truth["settings"]["seed"], "particles": n,
           "real_particles": int(real.sum()),
           "grid": [float(GRID[0]), float(GRID[-1]), len(GRID)],
           "largest_hinge_amplitude": round(largest, 4), "likelihoods": {}}
    for name, start_model in starts.items():
        refined = refine_noise_model(start_model, data, reference, rows, at_zero,
                                     weights).noise
        # the spectrum as given (the refinement's own S and D left out)
        models[name] = refined.replace(noise=start_model.noise, error=None)
        out["likelihoods"][name] = {"bfactor": round(refined.bfactor, 1),
                                    "contrast_mean": round(refined.contrast_mean, 4),
                                    "contrast_std": round(refined.contrast_std, 4)}
    log_likelihood = {name: torch.empty(len(GRID), n, dtype=torch.float64)
                      for name in models}
    for j, value in enumerate(GRID.tolist()):
        model = model_at(value)
        for name, noise in models.items():
            enveloped = apply_envelope(model, pixel, noise.bfactor)
            log_likelihood[name][j] = noise.log_likelihood(images, enveloped, group)
    angle = meta["cryosviTrueConformation"].to_numpy()
    inside = ((GRID >= 0) & (GRID <= largest + 1e-6)).double()[:, None]
    # the truth's mean and variance in a Gaussian, the shape a model's prior has
    gaussian = -0.5 * ((GRID.double()[:, None] - largest / 2) / (largest / 12 ** 0.5)) ** 2
    for name, values in log_likelihood.items():
        scores = {}
        for prior, log_prior in (("uniform_8", torch.zeros_like(inside)),
                                 ("truth_prior", torch.log(inside + 1e-300)),
                                 ("gaussian_of_truth", gaussian)):
            posterior = torch.softmax(values + log_prior, 0)
            mean = (posterior * GRID.double()[:, None]).sum(0).numpy()
            scores[prior] = abs(float(stats.spearmanr(mean[real], angle[real]).statistic))
        out["likelihoods"][name]["abs_spearman_real"] = {k: round(v, 4)
                                                         for k, v in scores.items()}
        print(f"{name:9s} |Spearman| {scores['uniform_8']:.4f} (the truth's prior "
              f"{scores['truth_prior']:.4f}, a Gaussian of its mean and variance "
              f"{scores['gaussian_of_truth']:.4f})  B {models[name].bfactor:.1f} Å^2  "
              f"contrast {models[name].contrast_mean:.3f} +- {models[name].contrast_std:.3f}")
    out["wall_s"] = round(time.time() - start, 1)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
