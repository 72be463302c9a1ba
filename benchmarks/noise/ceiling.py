"""The conformation's ceiling on a realistic set with micrograph effects: what a perfect
inference of the hinge would rank, given the data.

Along the EXACT hinge displacement of the pseudo-atoms (``model_match.hinge_displacement``:
no direction to learn), at each particle's given (consensus) pose, CTF estimate and
shift, the posterior mean of the amplitude on a grid (0.125 Å RMS apart) under a uniform
prior on +-8 Å RMS, under the data set's own prior (the truth's: uniform from 0 to the
largest hinge's amplitude: the Bayes estimate of a perfect model), and under a Gaussian
of that prior's mean and variance (the shape cryosvi's priors have), with three
likelihoods, each with the contrast integrated out and the B envelope and contrast prior
refined against the model images at the given poses (``noise_data.refine_noise_model``,
no model-error term):

* ``true``: each optics group's true noise spectrum (``realistic_noise.truth_spectrum``);
* ``estimate``: the particles' background estimate (``noise_data.estimate_noise_model``);
* ``white``: white noise of the particles' background variance.

Printed and written (--json): |Spearman| of the posterior means with the true hinge angle
over the real particles under each prior (true junk left out of the score and of the
refinement), and the refined B and contrast prior: what the data allow, against which to
read the product's |Spearman| on the same set (learnt direction, trained guide, grid).
``--blocks K``: the same along the hinge's part in the span of learn-modes' fitting basis
(K rigid blocks); ``--learnt``: along learnt references' first modes, under their own
priors (the product's model, without the guide).

    python benchmarks/realistic/make_dataset.py -o DATA --preset poses-given --realistic \
        --oracle 0
    PYTHONPATH=src python benchmarks/noise/ceiling.py DATA [--blocks 3] \
        [--learnt LEARNT.npz ...] [--json OUT.json]
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
from cryosvi.dataset import ParticleData, data_box, data_pixel_size
from cryosvi.noise_data import estimate_noise_model, refine_noise_model
from cryosvi.io.particles import read_particles
from cryosvi.latents import BY_NAME
from cryosvi.inference.fitting_basis import fitting_basis
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.spectrum import apply_envelope
from cryosvi.reference import Reference, build_reference

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
    parser.add_argument("--blocks", type=int, help="also the exact hinge projected on the "
                        "rigid motions of this many blocks (learn-modes' fitting basis)")
    parser.add_argument("--learnt", type=Path, nargs="*", default=[],
                        help="also the first mode of these learnt references (cryosvi "
                        "learn-modes), under a flat prior and its own")
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
    exact = ForwardModel(reference.coords, unit.reshape(1, -1, 3), reference.optics,
                         reference.imaging, data.groups)
    n = len(table)
    rows = np.arange(n)
    images = torch.from_numpy(data.images(rows)).double()
    ctf, shifts = data.conditions.ctf, data.conditions.shifts
    rotation = BY_NAME["pose"].known(table, None)
    group = ctf.group
    real = meta.get("cryosviTrueJunk", 0 * meta["rlnOpticsGroup"]).to_numpy() == 0
    weights = torch.from_numpy(real.astype(np.float64))

    angle = meta["cryosviTrueConformation"].to_numpy()

    def scan(forward: ForwardModel, starts: dict, priors: dict) -> dict:
        """Per likelihood: the B and contrast prior refined against ``forward``'s images
        at amplitude 0, and |Spearman| of the grid posterior means under each prior."""
        def model_at(value: float) -> torch.Tensor:
            with torch.no_grad():
                return forward(torch.full((n, 1), value), rotation, None, ctf=ctf,
                               shifts=shifts).double()

        at_zero, models, result = model_at(0.0), {}, {}
        for name, start_model in starts.items():
            refined = refine_noise_model(start_model, data, reference, rows, at_zero,
                                         weights).noise
            # the spectrum as given (the refinement's own S and D left out)
            models[name] = refined.replace(noise=start_model.noise, error=None)
        values = {name: torch.empty(len(GRID), n, dtype=torch.float64) for name in models}
        for j, value in enumerate(GRID.tolist()):
            model = model_at(value)
            for name, noise in models.items():
                enveloped = apply_envelope(model, pixel, noise.bfactor)
                values[name][j] = noise.log_likelihood(images, enveloped, group)
        for name, noise in models.items():
            scores = {}
            for prior, log_prior in priors.items():
                posterior = torch.softmax(values[name] + log_prior, 0)
                mean = (posterior * GRID.double()[:, None]).sum(0).numpy()
                scores[prior] = round(abs(float(stats.spearmanr(
                    mean[real], angle[real]).statistic)), 4)
            result[name] = {"bfactor": round(noise.bfactor, 1),
                            "contrast_mean": round(noise.contrast_mean, 4),
                            "contrast_std": round(noise.contrast_std, 4),
                            "abs_spearman_real": scores}
            print(f"  {name:9s} |Spearman| {scores}  B {noise.bfactor:.1f} Å^2  contrast "
                  f"{noise.contrast_mean:.3f} +- {noise.contrast_std:.3f}")
        return result

    estimate = estimate_noise_model(data, reference, seed=0, weights=weights.numpy())
    background = float(estimate.noise[:, 1:].mean())
    starts = {"true": estimate.replace(noise=truth_spectrum(table, truth)),
              "estimate": estimate,
              "white": estimate.replace(noise=torch.full_like(estimate.noise, background))}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False,
                            capture_output=True, text=True, cwd=HERE).stdout.strip()
    out = {"data": str(args.data), "commit": commit, "date": time.strftime("%Y-%m-%d"),
           "seed": truth["settings"]["seed"], "particles": n,
           "real_particles": int(real.sum()),
           "grid": [float(GRID[0]), float(GRID[-1]), len(GRID)],
           "largest_hinge_amplitude": round(largest, 4)}
    inside = ((GRID >= 0) & (GRID <= largest + 1e-6)).double()[:, None]
    flat = torch.zeros_like(inside)
    # the truth's mean and variance in a Gaussian, the shape a model's prior has
    gaussian = -0.5 * ((GRID.double()[:, None] - largest / 2) / (largest / 12 ** 0.5)) ** 2
    truth_priors = {"uniform_8": flat, "truth_prior": torch.log(inside + 1e-300),
                    "gaussian_of_truth": gaussian}
    print("the exact hinge")
    out["likelihoods"] = scan(exact, starts, truth_priors)
    if args.blocks:
        # orthonormal rows, so the projection needs no QR
        basis = fitting_basis(reference, args.blocks).reshape(-1, unit.numel())
        projected = basis.T @ (basis @ unit.double().numpy())
        overlap = float(np.linalg.norm(projected))
        print(f"the exact hinge in the span of {args.blocks} blocks (overlap "
              f"{overlap:.4f})")
        direction = torch.tensor(projected / overlap, dtype=torch.float32).reshape(1, -1, 3)
        out["blocks"] = {"blocks": args.blocks, "overlap_with_hinge": round(overlap, 4),
                         "likelihoods": scan(
                             ForwardModel(reference.coords, direction, reference.optics,
                                          reference.imaging, data.groups),
                             {"estimate": estimate}, truth_priors)}
    for path in args.learnt:
        learnt = Reference.load(path)
        overlap = abs(float(learnt.modes[0].reshape(-1) @ unit.double().numpy()))
        print(f"{path}: its first learnt mode (overlap with the hinge {overlap:.4f})")
        own = -0.5 * (GRID.double()[:, None] / learnt.priors.mode_std[0]) ** 2
        out.setdefault("learnt", {})[str(path)] = {
            "overlap_with_hinge": round(overlap, 4), "mode_std": learnt.priors.mode_std[0],
            "likelihoods": scan(
                ForwardModel(learnt.coords,
                             torch.tensor(learnt.modes[:1], dtype=torch.float32),
                             reference.optics, reference.imaging, data.groups),
                {"estimate": estimate}, {"uniform_8": flat, "its_own_prior": own})}
    out["wall_s"] = round(time.time() - start, 1)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
