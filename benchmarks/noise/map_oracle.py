"""What the data allow: the Bayes estimate of the conformation by an oracle that knows the
data set's own 41 all-atom maps and every micrograph effect.

For each real particle of a ``make_dataset.py`` output, RELION projects every
conformation map (``relion_project --ctf``, the given or the true pose, CTF and shift),
the projections get the data set's B envelope, and the likelihood of the normalised
image is the Gaussian of the true noise: each optics group's coloured spectrum at every
Fourier coefficient (the generator's own ``noise_shape``) times the particle's
cryosviNoiseStd^2. The signal's scale is either known (cryosviTrueSignalScale: the
particle's contrast over its normalisation) or fitted per map (weighted least squares:
the profile likelihood). The zero frequency is left out (the normalisation subtracts a
mean). The posterior mean of the hinge angle under the data set's uniform prior on the
bins is the best any model can rank; |Spearman| with the true angle over the real
particles is printed (and written with --json), next to make_dataset.py's white,
correlation-based oracle.

This differs from ``ceiling.py``, which scans cryosvi's own pseudo-atom model along the
exact hinge: the gap between the two is what the pseudo-atoms cost.

    python benchmarks/realistic/make_dataset.py -o DATA --preset poses-given --realistic
    PYTHONPATH=src python benchmarks/noise/map_oracle.py DATA [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import scipy.stats
import starfile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "realistic"))
from make_dataset import (given_for_relion, half_plane_weights, noise_shape,  # noqa: E402
                          relion_project, shell_radius, truth_for_relion)


def log_likelihoods(y: np.ndarray, m: np.ndarray, inverse_power: np.ndarray,
                    scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per particle, the log likelihood (up to a per-particle constant) of the images'
    rfft2 ``y`` (n, L, L//2+1) given the model's ``m`` (the same shape), the inverse
    noise power (n, L, L//2+1) per coefficient times its weight, and the known signal
    scale (n,): (known scale, fitted scale), each (n,)."""
    dot = (inverse_power * (y.conj() * m).real).sum((1, 2))
    norm = (inverse_power * np.abs(m) ** 2).sum((1, 2))
    known = scale * dot - 0.5 * scale**2 * norm  # -|y - s m|^2 / 2 without |y|^2
    fitted = 0.5 * dot**2 / norm
    return known, fitted


def scores(log_like: np.ndarray, angles: np.ndarray, truth: np.ndarray) -> dict:
    """(n, bins) log likelihoods -> |Spearman| of the posterior mean and of the best bin
    with the true angle (n,), under the uniform prior on the bins."""
    weights = np.exp(log_like - log_like.max(1, keepdims=True))
    mean = (weights * angles).sum(1) / weights.sum(1)
    best = angles[log_like.argmax(1)]

    def rank(estimate: np.ndarray) -> float:
        return abs(float(scipy.stats.spearmanr(estimate, truth)[0]))

    return {"abs_spearman_posterior_mean": rank(mean), "abs_spearman_best_bin": rank(best),
            "median_abs_error_deg": float(np.median(np.abs(mean - truth)))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a make_dataset.py output")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    start = time.time()
    truth = json.loads((args.data / "truth.json").read_text())
    settings = truth["settings"]
    box, pixel = settings["box"], settings["pixel"]
    star = starfile.read(args.data / "particles.star")
    optics, particles = star["optics"], star["particles"]
    real = (particles["cryosviTrueJunk"].to_numpy() == 0 if "cryosviTrueJunk" in particles
            else np.ones(len(particles), bool))
    particles = particles[real].reset_index(drop=True)
    rows = particles["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    stack = mrcfile.read(args.data / "particles.mrcs")[rows]
    images = np.fft.rfft2(stack.astype(np.float64))  # transformed once for every map
    angles = np.linspace(0.0, settings["max_angle"], settings["bins"])
    true_angle = particles["cryosviTrueConformation"].to_numpy()

    # The noise power of each particle at each rfft2 coefficient, times the coefficient's
    # weight in the full grid; the zero frequency left out.
    group = particles["rlnOpticsGroup"].to_numpy() - 1
    if truth["noise"]["spectrum"] == "coloured":
        p = truth["noise"]["parameters"]
        shapes = np.stack([noise_shape(box, p["excess"][g], p["width_cycles_per_px"][g],
                                       p["nyquist"][g]) for g in range(len(optics))])
    else:
        shapes = np.ones((len(optics), box, box // 2 + 1))
    level = particles["cryosviNoiseStd"].to_numpy()[:, None, None] ** 2
    inverse_power = half_plane_weights(box) / (box**2 * level * shapes[group])
    inverse_power[:, 0, 0] = 0.0
    envelope = np.exp(-truth["bfactor"] * (shell_radius(box) / (box * pixel)) ** 2 / 4)
    scale = (particles["cryosviTrueSignalScale"].to_numpy()
             if "cryosviTrueSignalScale" in particles else
             1.0 / particles["cryosviNormStd"].to_numpy())

    maps = sorted((args.data / "maps").glob("conformation_*.mrc"))
    if len(maps) != len(angles):
        parser.error(f"{args.data}/maps holds {len(maps)} maps for {len(angles)} bins")
    result = {"data": str(args.data), "command": truth["command"],
              "real_particles": int(real.sum()), "bfactor": truth["bfactor"],
              "noise_spectrum": truth["noise"]["spectrum"]}
    with tempfile.TemporaryDirectory() as scratch:
        for kind, table in (("given", given_for_relion(particles)),
                            ("true", truth_for_relion(particles))):
            known = np.empty((len(particles), len(maps)))
            fitted = np.empty_like(known)
            for k, path in enumerate(maps):
                projections = relion_project(path, table, optics, Path(scratch),
                                             f"m{k:03d}", pixel).astype(np.float64)
                known[:, k], fitted[:, k] = log_likelihoods(
                    images, np.fft.rfft2(projections) * envelope, inverse_power, scale)
            found = {"known_scale": scores(known, angles, true_angle),
                     "fitted_scale": scores(fitted, angles, true_angle)}
            result[f"{kind}_metadata"] = found
            known_rho, fitted_rho = (found[f"{scale}_scale"]["abs_spearman_posterior_mean"]
                                     for scale in ("known", "fitted"))
            print(f"{kind} pose/CTF/shift: |Spearman| of the posterior mean "
                  f"{known_rho:.4f} (known scale), {fitted_rho:.4f} (fitted scale)",
                  flush=True)
    white = (truth.get("oracle") or {}).get("given")
    if white:
        result["make_dataset_oracle_given"] = white["spearman_posterior_mean"]
        print(f"make_dataset.py's oracle (white, correlation, {white['particles']} "
              f"particles): {white['spearman_posterior_mean']:.4f}")
    result["wall_s"] = round(time.time() - start, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
