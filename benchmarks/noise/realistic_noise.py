"""The noise model estimated from RELION-projected particles, against their truth.

    python benchmarks/realistic/make_dataset.py -o DATA --preset poses-given --realistic \
        --oracle 0 --save-clean
    python benchmarks/realistic/make_dataset.py -o PLAIN --preset poses-given --realistic \
        --oracle 0 --save-clean --bfactor 0 --contrast-spread 0
    PYTHONPATH=src python benchmarks/noise/realistic_noise.py DATA --plain PLAIN

1. ``noise_data.estimate_noise_model`` from the particles alone (no poses), with cryosvi's
   reference of 1OL5 (residue beads, sigma 2 Å: the experiments' reference) for the prior
   model images, unweighted and with the junk weighted out by the truth;
2. ``noise_data.refine_noise_model`` against model images that are the truth without the
   envelope and the contrast: PLAIN's clean RELION images (the same seed: the same
   particles, poses, CTFs and junk) normalised by DATA's per-particle background mean
   and std. It should find B = DATA's B-factor, the contrast prior of DATA's lognormal
   (mean 1, std sqrt(exp(c^2) - 1)) and no model error.

The truth per optics group g: the mean over its real particles of cryosviNoiseStd^2
S_g (truth.json's spectrum). Printed: the largest and mean relative error over shells
1..L/2 and over the corners, per group, of the background estimate, and after the
refinement of the residual spectrum R, the noise S and the likelihood's T; the
B-factor; the contrast prior; the per-particle contrasts' correlation with the truth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryosvi.config import Imaging, Noise, Priors
from cryosvi.dataset import ParticleData, model_optics
from cryosvi.noise_data import estimate_noise_model, refine_noise_model
from cryosvi.io.particles import read_particles
from cryosvi.reference import build_reference


def truth_spectrum(table, truth: dict) -> torch.Tensor:
    """(2, n_shells): each group's mean noise spectrum over its real particles."""
    shells = torch.tensor([truth["noise"]["shells"][g] for g in ("1", "2")], dtype=torch.float64)
    meta = table.metadata
    real = meta.get("cryosviTrueJunk", 0 * meta["rlnOpticsGroup"]).to_numpy() == 0
    group = meta["rlnOpticsGroup"].to_numpy()
    level = meta["cryosviNoiseStd"].to_numpy() ** 2
    return torch.stack([float(level[real & (group == g)].mean()) * shells[g - 1]
                        for g in (1, 2)])


def errors(estimate: torch.Tensor, truth: torch.Tensor, box: int) -> str:
    relative = (estimate / truth - 1).abs()
    inner, corners = relative[:, 1:box // 2 + 1], relative[:, box // 2 + 1:]
    return " | ".join(f"group {g + 1}: max {inner[g].max():.3f} mean {inner[g].mean():.3f} "
                      f"corners {corners[g].max():.3f}" for g in range(len(truth)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--plain", type=Path, help="the same data without envelope and "
                        "contrast spread (refinement against the truth)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = read_particles(args.data / "particles.star")
    truth = json.loads((args.data / "truth.json").read_text())
    optics = model_optics(table)
    data = ParticleData(table, optics.box, True)
    reference = build_reference(None, "A", 1, optics, Imaging(sigma=2.0), Priors(mode_std=(2.0,)),
                                Noise(), beads="residue")
    true = truth_spectrum(table, truth)
    meta = table.metadata
    junk = meta["cryosviTrueJunk"].to_numpy() if "cryosviTrueJunk" in meta else np.zeros(len(table))
    print(f"{args.data}: {len(table)} particles, SNR {truth['snr']}, B {truth['bfactor']}, "
          f"contrast spread {truth['contrast_spread']}, junk {int(junk.sum())}")
    for name, weights in (("unweighted", None), ("junk weighted out", 1.0 - junk)):
        if name != "unweighted" and not junk.any():
            continue
        tick = time.perf_counter()
        first = estimate_noise_model(data, reference, args.seed, weights=weights)
        print(f"from the background ({name}, {time.perf_counter() - tick:.1f} s): "
              f"{errors(first.noise, true, optics.box)}")
    if args.plain is None:
        return
    stds = meta["cryosviNormStd"].to_numpy()[:, None, None]
    model = (mrcfile.read(args.plain / "clean.mrcs").astype(np.float64)
             - meta["cryosviNormMean"].to_numpy()[:, None, None]) / stds
    rows = np.arange(len(table))
    tick = time.perf_counter()
    out = refine_noise_model(first, data, reference, rows, torch.from_numpy(model),
                             weights=1.0 - junk)
    noise = out.noise
    spread = truth["contrast_spread"]
    print(f"refined against the truth ({time.perf_counter() - tick:.1f} s):\n"
          f"  residuals R: {errors(out.residual_spectrum, true, optics.box)}\n"
          f"  noise S (background, capped at R): {errors(noise.noise, true, optics.box)}\n"
          f"  total T = S + {noise.error_weight:g} D: {errors(noise.total, true, optics.box)}")
    print(f"  B {noise.bfactor:.1f} Å^2 (true {truth['bfactor']}, {out.bfactor_shells} "
          f"shells); contrast prior {noise.contrast_mean:.3f} +- {noise.contrast_std:.3f} "
          f"(true 1 +- {np.sqrt(np.expm1(spread**2)):.3f}), floor {noise.contrast_floor:.3f}; "
          f"model error D / T max {float((noise.error / noise.total)[:, 1:].max()):.3f}")
    real = junk == 0
    contrast = meta["cryosviTrueContrast"].to_numpy() if "cryosviTrueContrast" in meta \
        else np.ones(len(table))
    print(f"  per-particle contrast vs truth: corr "
          f"{np.corrcoef(out.contrast.numpy()[real], contrast[real])[0, 1]:.3f}")


if __name__ == "__main__":
    main()
