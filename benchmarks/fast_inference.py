"""The default refinement of ``cryosvi infer`` against the previous default, timed in the
same process on the same particles.

    PYTHONPATH=src python benchmarks/fast_inference.py --run RUN --particles FILE \\
        -o RESULT.json [--first 128] [--all] [--methods smc12,default] [--threads 1]

Loads the run and particle file as ``cryosvi infer`` does (the run's working box, CTF
estimates, the given latents from the metadata, each particle's random streams with
seed 0) and refines the first ``--first`` particles, ``--batch`` at a time, with each
method of ``--methods``, one after the other in this process:

* ``smc12``: what ``--refine auto`` ran below SNR 15 up to commit 3a2d059 (modes-only
  runs included), tempered SMC with 12 moves (``--refine smc --moves 12``);
* ``default``: ``--refine auto`` as it is now (the grid for a run that infers the mode
  amplitudes alone, else the rule by the run's latents and the data set's SNR: 'joint'
  for one mode inferred with the pose at SNR 0.5-15);
* ``grid``, ``laplace``, ``laplace8`` (the Laplace path with 8 Gauss-Newton starts),
  ``joint``, ``jointN`` (with N starts; the fallback's 12 moves, as 'auto' gives it),
  ``smcN`` (the SMC with N moves): for comparisons.

``--baseline-checkout DIR`` also times the first method with the library and this script
of an earlier commit checked out in DIR (``git worktree add DIR COMMIT``), in a process
of its own just before the others, and makes it the baseline: the speed of a default
against the previous default as it was, when a change also sped up the previous default.
Every method has ``--importance`` (64) samples per particle. Printed and written to the
JSON: particles/s in wall and CPU time (``time.process_time``, which other jobs on a
shared machine disturb less) and each method's speed over the first method's (the
baseline: ``smc12`` by default), and,
against the truth where the file has it, |Spearman| of the first mode's mean with the
true conformation (``cryosviTrueConformation`` of the realistic data sets, else the
file's own ``cryosviModeAmplitude1`` in a simulation), the coverage cov68 / cov95 of
mean +- z std over every mode (the file's own mode columns; a simulation), and the
median / p90 pose error in degrees where the pose is inferred (``cryosviTrueAngle*``
or, in a simulation, the file's own angles). ``--all`` also runs ``default`` (or the
last method) on every particle of the file for its |Spearman| and coverage. The JSON holds the command,
the machine (CPU model and flags, threads) and the library version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

import cryosvi
from cryosvi.dataset import run_particles
from cryosvi.inference.refine import REFINERS, Batch, Settings, dataset_snr
from cryosvi.io.particles import read_particles
from cryosvi.physics.rotations import euler_geodesic_error, matrix_to_euler, \
    quaternion_to_matrix
from cryosvi.randomness import Streams
from cryosvi.rundir import load_trained


def method(name: str, snr: float):
    """(refiner, Settings changes) of a ``--methods`` name."""
    if name == "default":
        return REFINERS["auto"], dict(snr=snr)
    if name == "laplace8":
        return REFINERS["laplace"], dict(starts=8, moves=12)
    if name.startswith("joint"):  # jointN: N starts; the fallback's 12 moves as 'auto'
        return REFINERS["joint"], dict(moves=12, starts=int(name[5:] or 2))
    if name.startswith("smc"):
        return REFINERS["smc"], dict(moves=int(name[3:] or 3))
    return REFINERS[name], dict(moves=12, snr=snr)


def machine() -> dict:
    """The CPU's model and flags (Linux /proc/cpuinfo), cores and torch threads."""
    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update(cpu=fields.get("model name"), flags=fields.get("flags"),
                    cores=text.count("processor\t:"))
    except OSError:
        pass
    try:
        info["load"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


class Setup:
    """A run and a particle file loaded as ``cryosvi.inference.driver.infer`` does."""

    def __init__(self, run: str, particles: str):
        _, self.reference, self.guide = load_trained(run, "cpu")
        self.table = read_particles(particles, None, False)
        self.config = self.guide.config
        self.data, self.known = run_particles(self.table, self.config, self.reference)
        self.forward = self.reference.forward_model(self.data.groups)
        self.snr = dataset_snr(self.data, self.reference.noise.std)

    def batch(self, index: np.ndarray) -> Batch:
        return Batch(self.guide, self.forward, self.reference.priors,
                     self.reference.noise.std, torch.from_numpy(self.data.images(index)),
                     {s: v[index] for s, v in self.known.items()},
                     self.data.conditions.take(index), Streams(0, torch.from_numpy(index)))

    def refine(self, name: str, index: np.ndarray, importance: int, size: int) -> dict:
        """Summaries of the particles ``index`` by method ``name``, timed."""
        refiner, changes = method(name, self.snr)
        settings = Settings(importance, **changes)
        parts = []
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for start in range(0, len(index), size):
                out = refiner(self.batch(index[start:start + size]), settings)
                parts.append({k: out[k] for k in ("modes_mean", "modes_std",
                                                  "rotation_mean", "smc_fallback")
                              if k in out})
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        merged = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
        return {"summary": merged, "wall_s": wall, "cpu_s": cpu,
                "particles_per_s_wall": len(index) / wall,
                "particles_per_s_cpu": len(index) / cpu}

    def scores(self, summary: dict, index: np.ndarray) -> dict:
        """|Spearman|, coverage and pose errors against the truth the file holds."""
        frame = self.table.metadata.iloc[index]
        out = {}
        if "smc_fallback" in summary:  # the Laplace path's particles handed to the SMC
            out["smc_fraction"] = float(summary["smc_fallback"].mean())
        mean, std = summary.get("modes_mean"), summary.get("modes_std")
        if mean is not None:
            if "cryosviTrueConformation" in frame:
                truth = frame["cryosviTrueConformation"].to_numpy(float)
            elif "cryosviModeAmplitude1" in frame and "enm_scale" in self.config.latents:
                truth = frame["cryosviModeAmplitude1"].to_numpy(float)
            else:
                truth = None
            if truth is not None:
                out["spearman"] = abs(float(scipy.stats.spearmanr(mean[:, 0], truth)
                                            .statistic))
            columns = [f"cryosviModeAmplitude{k + 1}" for k in range(mean.shape[1])]
            if "cryosviTrueConformation" not in frame and all(c in frame for c in columns):
                every = frame[columns].to_numpy(float)
                for level in (0.68, 0.95):
                    z = scipy.stats.norm.ppf(0.5 + level / 2)
                    out[f"cov{round(level * 100)}"] = float(
                        (np.abs(every - mean) <= z * std).mean())
        if "rotation_mean" in summary:
            prefix = "cryosviTrueAngle" if "cryosviTrueAngleRot" in frame else "rlnAngle"
            truth = frame[[prefix + a for a in ("Rot", "Tilt", "Psi")]].to_numpy(float)
            euler = matrix_to_euler(quaternion_to_matrix(
                torch.from_numpy(summary["rotation_mean"]).double()))
            predicted = np.stack([e.numpy() for e in euler], -1)  # degrees
            error = euler_geodesic_error(truth, predicted)
            out["pose_median_deg"] = float(np.median(error))
            out["pose_p90_deg"] = float(np.quantile(error, 0.9))
        return out


def earlier_commit(args, name: str) -> dict:
    """Method ``name`` timed by the benchmark of the checkout ``args.baseline_checkout``
    (its library and script) on the same particles, in a subprocess; its row of the
    result with the checkout's commit."""
    import subprocess
    import tempfile

    checkout = Path(args.baseline_checkout).resolve()
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "baseline.json"
        subprocess.run([sys.executable, str(checkout / "benchmarks" / "fast_inference.py"),
                        "--run", args.run, "--particles", args.particles, "-o", str(output),
                        "--first", str(args.first), "--methods", name,
                        "--importance", str(args.importance), "--batch", str(args.batch),
                        "--threads", str(args.threads)],
                       env={**os.environ, "PYTHONPATH": str(checkout / "src")}, check=True)
        row = json.loads(output.read_text())["methods"][name]
    return {**row, "commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--particles", required=True)
    parser.add_argument("-o", "--output", required=True, help="result JSON")
    parser.add_argument("--first", type=int, default=128, help="particles timed")
    parser.add_argument("--methods", default="smc12,default",
                        help="comma-separated; speeds are relative to the first")
    parser.add_argument("--all", action="store_true",
                        help="also 'default' (or the last method) on every particle")
    parser.add_argument("--importance", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="particles per batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline-checkout", metavar="DIR",
                        help="a checkout of an earlier commit: the first method is also "
                             "timed there (its own benchmarks/fast_inference.py, in a "
                             "process of its own, just before this one's), and that is "
                             "the baseline of the speed-ups")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = Setup(args.run, args.particles)
    names = args.methods.split(",")
    index = np.arange(min(args.first, len(setup.table)))
    record = {"command": " ".join(sys.argv), "cryosvi": cryosvi.__version__,
              "machine": machine(), "run": args.run, "particles": args.particles,
              "latents": list(setup.config.latents), "n_modes": setup.config.n_modes,
              "dataset_snr": setup.snr, "first": len(index), "methods": {}}
    print(f"{args.run}: latents {', '.join(setup.config.latents)}, data set SNR "
          f"{setup.snr:.3g}; {len(index)} particles, {args.threads} thread(s)")
    base, baseline = None, names[0]
    if args.baseline_checkout:
        row = earlier_commit(args, names[0])
        base, baseline = row, f"{names[0]}@{row['commit']}"
        record["methods"][baseline] = row
        print(f"{names[0]} at {row['commit']}: {row['particles_per_s_wall']:.2f} "
              f"particles/s wall ({row['particles_per_s_cpu']:.2f} CPU)", flush=True)
    for name in names:
        result = setup.refine(name, index, args.importance, args.batch)
        row = {k: v for k, v in result.items() if k != "summary"}
        row.update(setup.scores(result["summary"], index))
        base = base or row
        row["speedup_wall"] = base["wall_s"] / row["wall_s"]
        row["speedup_cpu"] = base["cpu_s"] / row["cpu_s"]
        record["methods"][name] = row
        print(f"{name:>9}: {row['particles_per_s_wall']:.2f} particles/s wall "
              f"({row['particles_per_s_cpu']:.2f} CPU); {row['speedup_wall']:.1f}x "
              f"{baseline}'s speed in wall time, {row['speedup_cpu']:.1f}x in CPU time; "
              + ", ".join(f"{k} {row[k]:.3f}" for k in
                          ("spearman", "cov68", "cov95", "pose_median_deg", "pose_p90_deg",
                           "smc_fraction")
                          if k in row), flush=True)
    if args.all:
        every = np.arange(len(setup.table))
        name = "default" if "default" in names else names[-1]
        result = setup.refine(name, every, args.importance, 256)
        row = {k: v for k, v in result.items() if k != "summary"}
        row.update(setup.scores(result["summary"], every))
        record["all"] = {"method": name, "particles": len(every), **row}
        print(f"{name} on all {len(every)} particles: "
              + ", ".join(f"{k} {row[k]:.4f}" for k in ("spearman", "cov68", "cov95")
                          if k in row) + f" ({row['wall_s']:.0f} s wall)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
