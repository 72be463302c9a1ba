"""``cryosvi infer`` with and without the model-error term (``--model-error on|off``, and
on with each ``--model-error-weight`` k of ``--weights``) on the same trained run, scored
against the truth, through the CLI as a user would.

    python benchmarks/noise/model_error.py own -w WORKDIR [--n 1000] [--test 300]
        [--snr 1] [--epochs 10] [--latents pose,defocus,modes] [--threads 1] [--weights 8]
    python benchmarks/noise/model_error.py realistic -w WORKDIR [--preset ctf-shifts-given]
        [--run run-ctf-shifts-given] [--reuse] [--weights 2,4,8]

* ``own``: cryosvi's own simulation (``cryosvi simulate --preset paper --noise-spectrum
  coloured``: a training set of N and a held-out set of TEST particles, other seeds),
  a run trained with the true noise model (``--noise-model reference``): the model is
  exact, so the model error must be ~0 and the intervals unchanged (pose median error
  and interval widths within 10 %).
* ``realistic``: the run and data set that ``benchmarks/realistic/run_experiments.py -w
  WORKDIR --experiments PRESET`` left (RELION-projected all-atom images with coloured
  noise, B 100, contrast spread and junk; WORKDIR/run-PRESET, or ``--run`` NAME, e.g.
  run-PRESET-anm, the first pass's run with the ANM mode; WORKDIR/data-PRESET).

``--reuse``: score the posteriors WORKDIR/posterior-model-error-{off,kK}.star that are
there instead of inferring them again.

Scores over the real particles (cryosviTrueJunk 0 where the data have junk), computed
here from the STAR files: the median geodesic pose error (deg); pose cover95: the
fraction whose error is within cryosviPoseRadius95Deg (the 95 % credible ball about the
posterior mean); the same two once the frames are aligned (``cryosvi.latents.pose.
frame_alignment`` with the true conformation, as ``cryosvi evaluate`` does: a learnt
mode's rigid-body part turns the molecule's frame with the conformation); the median
radius95; defocus cover95: |U - U_true| <= 1.96
cryosviDefocusStd, and the median std; |Spearman| (scipy) of cryosviModeAmplitude1 with
the true conformation (realistic: cryosviTrueConformation; own: the true amplitude).
Results go to benchmarks/results/noise/model_error_MODE[_TAG].json with the wall times,
the model-error line of ``cryosvi infer`` and the estimate it wrote.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import starfile
import torch

from cryosvi.latents.pose import frame_alignment
from cryosvi.physics.noise import ERROR_WEIGHT

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "noise"


def cryosvi(*arguments) -> list[str]:
    return [sys.executable, "-m", "cryosvi", *arguments]


def run(command: list[str], log: list) -> str:
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    log.append({"command": shlex.join(command), "wall_s": round(time.perf_counter() - start, 1),
                "stdout": done.stdout.strip()[-1000:]})
    print(done.stdout.strip(), flush=True)
    return done.stdout


def pose_error(inferred, truth, prefix: str) -> np.ndarray:
    from cryosvi.physics.rotations import euler_to_matrix, geodesic_angle

    def matrices(frame, name):
        return euler_to_matrix(*(torch.tensor(frame[f"{name}{a}"].to_numpy(float),
                                              dtype=torch.float64)
                                 for a in ("Rot", "Tilt", "Psi")))
    return geodesic_angle(matrices(inferred, "rlnAngle"), matrices(truth, prefix)).numpy()


def score(posterior: Path, truth_star: Path, realistic: bool) -> dict:
    inferred = starfile.read(posterior, always_dict=True)["particles"]
    truth = starfile.read(truth_star, always_dict=True)["particles"]
    if len(inferred) != len(truth):
        raise RuntimeError(f"{posterior}: {len(inferred)} rows, the truth {len(truth)}")
    out = {"particles": int(len(inferred))}
    if realistic and "cryosviTrueJunk" in truth:
        real = truth["cryosviTrueJunk"].to_numpy(int) == 0
        inferred, truth = inferred[real], truth[real]
        out["real_particles"] = int(real.sum())
    true_pose = "cryosviTrueAngle" if realistic else "rlnAngle"
    true_defocus = "cryosviTrueDefocusU" if realistic else "rlnDefocusU"
    if "cryosviPoseRadius95Deg" in inferred:
        error = pose_error(inferred, truth, true_pose)
        radius = inferred["cryosviPoseRadius95Deg"].to_numpy(float)
        conformation = truth["cryosviTrueConformation" if realistic
                             else "cryosviModeAmplitude1"].to_numpy(float)[:, None]
        angles = [[frame[f"{name}{a}"].to_numpy(float) for a in ("Rot", "Tilt", "Psi")]
                  for frame, name in ((truth, true_pose), (inferred, "rlnAngle"))]
        found = frame_alignment(*(np.stack(a, -1) for a in angles), conformation)
        aligned = np.full_like(error, np.nan) if found is None else found[1]
        out.update(pose_median_deg=float(np.median(error)),
                   pose_cover95=float(np.mean(error <= radius)),
                   pose_aligned_median_deg=float(np.median(aligned)),
                   pose_aligned_cover95=float(np.mean(aligned <= radius)),
                   pose_radius95_median_deg=float(np.median(radius)),
                   pose_std_median_deg=float(np.median(inferred["cryosviPoseStdDeg"])))
    if "cryosviDefocusStd" in inferred:
        error = inferred["rlnDefocusU"].to_numpy(float) - truth[true_defocus].to_numpy(float)
        std = inferred["cryosviDefocusStd"].to_numpy(float)
        out.update(defocus_rmse=float(np.sqrt(np.mean(error**2))),
                   defocus_cover95=float(np.mean(np.abs(error) <= 1.96 * std)),
                   defocus_std_median=float(np.median(std)))
    if "cryosviModeAmplitude1" in inferred:
        true_mode = truth["cryosviTrueConformation" if realistic else "cryosviModeAmplitude1"]
        rho = scipy.stats.spearmanr(inferred["cryosviModeAmplitude1"], true_mode).statistic
        out["mode_spearman"] = abs(float(rho))
        if "cryosviModeAmplitudeStd1" in inferred:
            out["mode_std_median"] = float(np.median(inferred["cryosviModeAmplitudeStd1"]))
    return out


def infer_all(rundir: Path, particles: Path, work: Path, truth: Path, realistic: bool,
              threads: list[str], options: str, weights: list[float], log: list,
              reuse: bool = False) -> dict:
    scores, estimates = {}, {}
    for setting in ["off", *(f"k{k:g}" for k in weights)]:
        posterior = work / f"posterior-model-error-{setting}.star"
        inferred = not (reuse and posterior.is_file())
        model = (["--model-error", "off"] if setting == "off" else
                 ["--model-error", "on", "--model-error-weight", setting[1:]])
        if inferred:
            run(cryosvi("infer", "--run", str(rundir), "--particles", str(particles), "-o",
                        str(posterior), *model, "--force", "--quiet",
                        *shlex.split(options), *threads), log)
        scores[setting] = score(posterior, truth, realistic)
        if inferred:
            scores[setting]["infer_wall_s"] = log[-1]["wall_s"]
        beside = posterior.with_suffix(".model_error.json")
        if setting != "off" and beside.is_file():
            entry = json.loads(beside.read_text())
            estimates = {k: entry[k] for k in ("particles", "weight", "bfactor_added",
                                               "contrast")}
            estimates["groups"] = [{k: g[k] for k in g if k not in ("noise", "total")}
                                   for g in entry["groups"]]
    return {"scores": scores, "estimate": estimates}


def own(args, log: list) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)]
    for part, n, seed in (("train", args.n, 0), ("test", args.test, 1)):
        output = work / part
        if not (output / "particles.star").is_file():
            run(cryosvi("simulate", "--preset", "paper", "-n", str(n), "--snr", str(args.snr),
                        "--seed", str(seed), "--noise-spectrum", "coloured", "-o", str(output),
                        "--quiet"), log)
    rundir = work / "run"
    if not (rundir / "checkpoint.pt").is_file() or args.retrain:
        run(cryosvi("train", "--particles", str(work / "train" / "particles.star"),
                    "--reference", str(work / "train" / "reference.npz"), "--latents",
                    args.latents, "--epochs", str(args.epochs), "--noise-model", "reference",
                    "-o", str(rundir), "--force", "--quiet", *threads), log)
    test = work / "test" / "particles.star"
    return infer_all(rundir, test, work, test, False, threads, args.infer_options,
                     args.weights, log, args.reuse)


def realistic(args, log: list) -> dict:
    work = Path(args.workdir)
    data = work / f"data-{args.preset}"
    return infer_all(work / (args.run or f"run-{args.preset}"), data / "particles.star",
                     work, data / "particles.star", True, ["--threads", str(args.threads)],
                     args.infer_options, args.weights, log, args.reuse)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("own", "realistic"))
    parser.add_argument("-w", "--workdir", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--snr", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--latents", default="pose,defocus,modes")
    parser.add_argument("--preset", default="ctf-shifts-given")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--infer-options", default="")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--run", default=None, help="realistic: the run's folder in WORKDIR")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--weights", type=lambda text: [float(k) for k in text.split(",")],
                        default=[ERROR_WEIGHT],
                        help=f"comma-separated k of --model-error-weight (default "
                             f"{ERROR_WEIGHT:g}, the library's)")
    args = parser.parse_args(argv)
    log: list = []
    start = time.perf_counter()
    result = (own if args.mode == "own" else realistic)(args, log)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    record = {"settings": vars(args), "commit": commit, "machine": platform.processor()
              or platform.machine(), "wall_s": round(time.perf_counter() - start, 1),
              **result, "commands": log}
    path = RESULTS / f"model_error_{args.mode}{'_' + args.tag if args.tag else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    keys = sorted({k for s in result["scores"].values() for k in s})
    print(f"{'model error':12s}" + "".join(f"{k[:22]:>24s}" for k in keys))
    for name, values in result["scores"].items():
        print(f"{name:12s}" + "".join(f"{values.get(k, float('nan')):24.4g}" for k in keys))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
