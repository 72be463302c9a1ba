"""Particles whose noise level varies (ice thickness): the likelihood with each particle's
level integrated out against the same run with every level fixed at 1, through the CLI.

    python benchmarks/noise/noise_levels.py -w WORKDIR [--n 2000] [--snr 0.1]
        [--spread 0.2] [--threads 1]

Data (``cryosvi simulate``, the paper preset, one ANM mode, poses and CTF given): a
held-out set of N particles at SNR S whose noise is times a lognormal level of log-std
``--spread`` (``--noise-spread``; cryosviTrueNoiseScale), and 1 000 training particles
(another seed). One run (``train --latents modes --epochs 1``: the grid that ``infer``
takes for one mode does not use the guide) keeps the true noise model (levels' spread
recorded); a copy of it has the spread set to 0. Each run's ``infer --model-error off``
is scored against the truth: the mode's 95 % coverage over all particles and over the
noisiest and the cleanest quarter (by the true level), Pearson r, and the fitted junk
fraction (there is no junk: a noisy particle taken for junk is a false positive).
Writes benchmarks/results/noise/noise_levels.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import starfile

from cryosvi.reference import Reference


def cryosvi(*arguments: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cryosvi", *arguments], check=True,
                          capture_output=True, text=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--workdir", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--spread", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output",
                        default=str(Path(__file__).parents[1] / "results" / "noise"
                                    / "noise_levels.json"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--snr", str(args.snr), "--noise-spread", str(args.spread), "--quiet",
              "--force"]
    cryosvi("simulate", "-n", "1000", "--seed", "0", "-o", str(work / "train"), *common)
    cryosvi("simulate", "-n", str(args.n), "--seed", "1", "-o", str(work / "test"), *common)
    cryosvi("train", "--particles", str(work / "train" / "particles.star"), "--reference",
            str(work / "train" / "reference.npz"), "--latents", "modes", "--epochs", "1",
            "--epoch-size", "1000", "-o", str(work / "levels"), "--threads",
            str(args.threads), "--quiet", "--force")
    shutil.copytree(work / "levels", work / "fixed", dirs_exist_ok=True)
    reference = Reference.load(work / "fixed" / "reference.npz")
    reference.with_settings(noise_model=reference.noise_model.replace(
        level_std=0.0)).save(work / "fixed" / "reference.npz")

    truth = starfile.read(work / "test" / "particles.star", always_dict=True)["particles"]
    amplitude = truth["cryosviModeAmplitude1"].to_numpy(float)
    level = truth["cryosviTrueNoiseScale"].to_numpy(float)
    noisiest, cleanest = level > np.quantile(level, 0.75), level < np.quantile(level, 0.25)
    record = {"command": " ".join(sys.argv), "n": args.n, "snr": args.snr,
              "spread": args.spread, "runs": {}}
    for name in ("levels", "fixed"):
        output = work / f"{name}.star"
        said = cryosvi("infer", "--run", str(work / name), "--particles",
                       str(work / "test" / "particles.star"), "-o", str(output),
                       "--threads", str(args.threads), "--model-error", "off", "--force")
        frame = starfile.read(output, always_dict=True)["particles"]
        mean = frame["cryosviModeAmplitude1"].to_numpy(float)
        std = frame["cryosviModeAmplitudeStd1"].to_numpy(float)
        covered = np.abs(mean - amplitude) <= 1.96 * std
        row = {"level_std": Reference.load(work / name / "reference.npz")
               .noise_model.level_std,
               "cov95": float(covered.mean()), "cov95_noisiest_quarter":
               float(covered[noisiest].mean()), "cov95_cleanest_quarter":
               float(covered[cleanest].mean()), "r": float(np.corrcoef(mean, amplitude)[0, 1]),
               "junk_fraction": float(said.split("fitted junk fraction")[-1].split()[0])}
        record["runs"][name] = row
        print(f"{name:>6}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
