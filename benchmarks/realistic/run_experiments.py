"""The realistic experiments, run through the cryosvi CLI as a user would.

    python benchmarks/realistic/run_experiments.py -w WORKDIR [--n 2000] [--epochs 40]
        [--threads 2] [--structure-options "--stride 1 --beads residue --sigma 2 --n-modes 1"]
        [--learn-modes OPTIONS | --no-learn-modes] [--infer-options ""]
        [--experiments poses-given,ctf-shifts-given] [--data realistic|clean] [--seed 0]
        [--tag latest]

The defaults are the measured best (benchmarks/realistic/README.md): the mode learnt
from the particles (``cryosvi learn-modes``), residue beads, 40 epochs, the default
``cryosvi infer``.

The data (``--data``): 'realistic' (the default) adds what micrographs add
(``make_dataset.py --realistic``: coloured noise per optics group, B 100 Å^2, a
per-particle contrast and noise level, 10 % junk: empty and phase-scrambled images); the
runs measure their noise model from the particles (the default ``--noise-model auto``
of ``learn-modes`` and ``train``), the scores count the real particles only, and the
junk probability's AUC is scored. 'clean' is the data set before those effects (white
noise, no junk; the runs' noise is white, ``--noise-model white``, as before).

For each experiment:
1. the data set (``make_dataset.py -o WORKDIR/data-PRESET[-clean] --preset PRESET --n N
   [--realistic]``; kept and reused when WORKDIR already holds one made with the same
   settings);
2. unless --no-learn-modes, ``cryosvi learn-modes --particles P --structure
   src/cryosvi/data/1ol5.pdb STRUCTURE_OPTIONS -o WORKDIR/learnt-PRESET.npz``, P being
   DATA/particles.star when it has the poses (poses-given), else the posterior of a
   first pass of steps 3-4 with the ANM modes (ctf-shifts-given);
3. ``cryosvi train --particles DATA/particles.star (--reference LEARNT | --structure
   src/cryosvi/data/1ol5.pdb STRUCTURE_OPTIONS) --latents LATENTS --epochs E -o RUN``;
4. ``cryosvi infer --run RUN --particles DATA/particles.star -o
   WORKDIR/posterior-PRESET.star``;
5. ``cryosvi evaluate --posterior WORKDIR/posterior-PRESET.star --truth DATA/truth.star
   -o WORKDIR/evaluate-PRESET``;
6. scores computed here from the STAR files (independently of ``cryosvi evaluate``):
   |Spearman| (scipy.stats.spearmanr) of cryosviModeAmplitude1 with
   cryosviTrueConformation (the mode's sign is arbitrary), the range of the inferred
   amplitudes, and the median geodesic pose error (deg) against the true angles, over
   the real particles (cryosviTrueJunk 0); with junk, the AUC of cryosviJunkProbability
   against cryosviTrueJunk (the Mann-Whitney U over the two counts).

Experiments and their targets:
- ``poses-given``: SNR 0.1, the rlnAngle columns are the consensus poses (~2 deg off),
  CTF estimates and shifts given; only the mode is inferred (``--latents modes``).
  Target |Spearman| >= 0.9.
- ``ctf-shifts-given``: SNR 1, CTF estimates and shifts given; pose, defocus and mode
  inferred (``--latents pose,defocus,modes``). Targets pose median <= 5 deg,
  |Spearman| >= 0.8, pose and defocus 95 % coverage 0.90-0.98. The table gives the pose
  also after ``cryosvi evaluate``'s frame alignment (median / cov95): a learnt mode's
  rigid-body part turns the molecule's frame with the conformation, which no posterior
  can tell from the pose.

A step that fails is recorded (exit code, the end of its stderr) and the experiment's
later steps are skipped. Everything (commands, exit codes, wall times, metrics, the git
commit and whether the tree had uncommitted changes) goes to
benchmarks/realistic/results/experiments_TAG.json, and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import starfile
import torch

from cryosvi.io.atomic import write_atomically
from cryosvi.physics.rotations import euler_to_matrix, geodesic_angle

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STRUCTURE = ROOT / "src" / "cryosvi" / "data" / "1ol5.pdb"
EXPERIMENTS = {
    "poses-given": {"latents": "modes", "targets": {"spearman": 0.9}},
    "ctf-shifts-given": {"latents": "pose,defocus,modes",
                         "targets": {"spearman": 0.8, "pose_median_deg": 5.0}},
}
STDERR_TAIL = 2000  # characters of a failed command's stderr kept in the record


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workdir", required=True,
                        help="folder for the data sets and runs (created)")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS),
                        help="comma-separated, from %(default)s")
    parser.add_argument("--n", type=int, default=2000, help="particles per data set")
    parser.add_argument("--epochs", type=int, default=40, help="cryosvi train --epochs")
    parser.add_argument("--threads", type=int, default=2, help="--threads of every command")
    parser.add_argument("--device", default="cpu", help="cryosvi train/infer --device")
    parser.add_argument("--structure-options",
                        default="--stride 1 --beads residue --sigma 2 --n-modes 1",
                        help="options of cryosvi train that build the reference from "
                             "1ol5.pdb (default: %(default)s)")
    parser.add_argument("--train-options", default="",
                        help="more cryosvi train options, e.g. '--batch-size 64'")
    parser.add_argument("--infer-options", default="",
                        help="cryosvi infer options (default: none, its defaults; "
                             "'--importance 0': the guide alone)")
    learn = parser.add_mutually_exclusive_group()
    learn.add_argument("--learn-modes", metavar="OPTIONS", default="",
                       help="options of 'cryosvi learn-modes', which learns the mode from "
                            "the particles first; cryosvi train then gets that reference "
                            "instead of --structure-options' ANM modes; the particles' "
                            "poses are the file's (poses-given) or those of a first pass "
                            "with the ANM modes (ctf-shifts-given) (default: '', its own "
                            "defaults)")
    learn.add_argument("--no-learn-modes", dest="learn_modes", action="store_const",
                       const=None, help="train with the ANM modes of --structure-options")
    parser.add_argument("--data", choices=["realistic", "clean"], default="realistic",
                        help="the data sets: with the micrograph effects and junk "
                        "(make_dataset.py --realistic; the runs estimate their noise "
                        "model), or without them (white noise)")
    parser.add_argument("--tag", default="latest",
                        help="results go to results/experiments_TAG.json; name a kept "
                        "result by the commit it measures and the experiment, e.g. "
                        "--snapshot --tag cacc39f_poses_given")
    parser.add_argument("--seed", type=int, default=0,
                        help="the data sets' seed (make_dataset.py --seed; default 0): "
                             "another seed makes other particles, e.g. to check settings "
                             "chosen on seed 0")
    parser.add_argument("--remake-data", action="store_true",
                        help="make the data sets again even when WORKDIR has them")
    parser.add_argument("--snapshot", action="store_true",
                        help="run the committed HEAD (git archive into WORKDIR/snapshot, "
                             "first on PYTHONPATH) instead of the working tree, so that "
                             "uncommitted edits do not enter the measurement")
    return parser.parse_args(argv)


ENVIRONMENT = dict(os.environ)
"""The environment of every command (PYTHONPATH set by --snapshot)."""


def run(command: list[str], log: list[dict]) -> bool:
    """Run ``command``; append {command, rc, wall_s, stderr_tail} to ``log``; True if rc 0."""
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=ENVIRONMENT)
    entry = {"command": shlex.join(command), "rc": done.returncode,
             "wall_s": round(time.perf_counter() - start, 2)}
    if done.returncode != 0:
        entry["stderr_tail"] = done.stderr[-STDERR_TAIL:]
        print(f"  -> exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    else:
        entry["stderr_tail"] = done.stderr[-500:]  # warnings and notes, for the record
    log.append(entry)
    return done.returncode == 0


def make_data(preset: str, args, log: list[dict]) -> Path | None:
    """The data set of ``preset`` in WORKDIR/data-PRESET (reused when it has the same n)."""
    realistic = args.data == "realistic"
    output = Path(args.workdir) / (f"data-{preset}" + ("" if realistic else "-clean"))
    truth = output / "truth.json"
    if truth.is_file() and not args.remake_data:
        settings = json.loads(truth.read_text())["settings"]
        if settings.get("n") == args.n and settings.get("preset") == preset and \
                bool(settings.get("realistic")) == realistic and \
                settings.get("seed", 0) == args.seed:
            log.append({"command": f"(reused {output})", "rc": 0, "wall_s": 0.0})
            return output
    command = [sys.executable, str(HERE / "make_dataset.py"), "-o", str(output),
               "--preset", preset, "--n", str(args.n), "--oracle", "0",
               "--seed", str(args.seed),
               *(["--realistic"] if realistic else [])]
    return output if run(command, log) else None


def score(posterior: Path, data: Path) -> dict:
    """|Spearman| of mode 1 with the true conformation, amplitude range, pose errors."""
    inferred = starfile.read(posterior, always_dict=True)["particles"]
    truth = starfile.read(data / "particles.star", always_dict=True)["particles"]
    merged = truth.merge(inferred, on="rlnImageName", suffixes=("_given", ""))
    if len(merged) != len(truth):
        raise RuntimeError(f"{posterior}: {len(merged)} of {len(truth)} particles matched")
    out = {"particles": int(len(merged))}
    if "cryosviTrueJunk" in merged:
        junk = merged["cryosviTrueJunk"].to_numpy(int) == 1
        if junk.any() and "cryosviJunkProbability" in merged:
            p = merged["cryosviJunkProbability"].to_numpy(float)
            u = scipy.stats.mannwhitneyu(p[junk], p[~junk]).statistic
            out.update(junk=int(junk.sum()),
                       junk_auc=float(u) / (junk.sum() * (~junk).sum()),
                       junk_fraction_above_half=float((p[junk] > 0.5).mean()),
                       real_fraction_above_half=float((p[~junk] > 0.5).mean()))
        merged = merged[~junk]
        out["real_particles"] = int(len(merged))
    if "cryosviModeAmplitude1" in merged:
        amplitude = merged["cryosviModeAmplitude1"].to_numpy(float)
        rho = scipy.stats.spearmanr(amplitude, merged["cryosviTrueConformation"]).statistic
        out.update(spearman=abs(float(rho)), mode1_min=float(amplitude.min()),
                   mode1_max=float(amplitude.max()), mode1_std=float(amplitude.std()))

    def rotations(prefix: str):
        return euler_to_matrix(*(torch.tensor(merged[f"{prefix}{a}"].to_numpy(float),
                                              dtype=torch.float64)
                                 for a in ("Rot", "Tilt", "Psi")))

    error = geodesic_angle(rotations("rlnAngle"), rotations("cryosviTrueAngle")).numpy()
    out.update(pose_median_deg=float(np.median(error)), pose_mean_deg=float(error.mean()))
    return out


def noise_options(args) -> list[str]:
    """The realistic data take the commands' default noise model (their own estimate);
    the clean data keep the white noise they were first measured with."""
    return [] if args.data == "realistic" else ["--noise-model", "white"]


def train_and_infer(preset: str, name: str, data: Path, reference: list[str], args,
                    steps: list[dict]) -> Path | None:
    """``cryosvi train`` (the reference options ``reference``) into WORKDIR/run-NAME and
    ``cryosvi infer`` to WORKDIR/posterior-NAME.star; that path, or None if one failed."""
    name = name + ("" if args.data == "realistic" else "-clean")
    rundir = Path(args.workdir) / f"run-{name}"
    common = ["--threads", str(args.threads)]
    train = ["cryosvi", "train", "--particles", str(data / "particles.star"), *reference,
             "--latents", EXPERIMENTS[preset]["latents"], "--epochs", str(args.epochs),
             "--device", args.device,
             *noise_options(args),
             *shlex.split(args.train_options), "-o", str(rundir),
             "--quiet", *common]
    if (rundir / "run.json").exists():
        train.append("--force")
    if not run(train, steps):
        return None
    # Outside RUN: cryosvi infer refuses to write into its --run folder once a file of
    # that name is there (an input), even with --force.
    posterior = Path(args.workdir) / f"posterior-{name}.star"
    infer = ["cryosvi", "infer", "--run", str(rundir), "--particles",
             str(data / "particles.star"), "-o", str(posterior), "--device", args.device,
             *shlex.split(args.infer_options), "--quiet", "--force", *common]
    return posterior if run(infer, steps) else None


def experiment(preset: str, args) -> dict:
    settings = EXPERIMENTS[preset]
    record = {"preset": preset, "data": args.data, "latents": settings["latents"],
              "targets": settings["targets"], "steps": []}
    steps = record["steps"]
    data = make_data(preset, args, steps)
    if data is None:
        record["status"] = "data set not made"
        return record
    reference = ["--structure", str(STRUCTURE), *shlex.split(args.structure_options)]
    if args.learn_modes is not None:
        particles = data / "particles.star"
        if "pose" in settings["latents"]:  # no poses in the file: a first pass gives them
            particles = train_and_infer(preset, f"{preset}-anm", data, reference, args,
                                        steps)
            if particles is None:
                record["status"] = "first pass failed"
                return record
        learnt = Path(args.workdir) / (f"learnt-{preset}"
                                       + ("" if args.data == "realistic" else "-clean") + ".npz")
        # the structure options build its pseudo-atoms (their --n-modes: modes learnt)
        command = ["cryosvi", "learn-modes", "--particles", str(particles), "--datadir",
                   str(data), *reference, *noise_options(args),
                   *shlex.split(args.learn_modes), "-o", str(learnt), "--force", "--quiet",
                   "--threads", str(args.threads)]
        if not run(command, steps):
            record["status"] = "learn-modes failed"
            return record
        reference = ["--reference", str(learnt)]
    posterior = train_and_infer(preset, preset, data, reference, args, steps)
    if posterior is None:
        record["status"] = "train or infer failed"
        return record
    report = Path(args.workdir) / (f"evaluate-{preset}"
                                   + ("" if args.data == "realistic" else "-clean"))
    evaluate = ["cryosvi", "evaluate", "--posterior", str(posterior), "--truth",
                str(data / "truth.star"), "-o", str(report), "--force"]
    if run(evaluate, steps):
        record["evaluate"] = json.loads((report / "metrics.json").read_text())
    record["metrics"] = score(posterior, data)
    record["status"] = "done"
    return record


def git(*arguments, **kwargs) -> str:
    return subprocess.run(["git", *arguments], capture_output=True, text=True, cwd=ROOT,
                          check=True, **kwargs).stdout.strip()


def git_state(snapshot: bool) -> dict:
    """The commit measured, and whether uncommitted edits of the tree took part."""
    return {"commit": git("rev-parse", "HEAD"), "snapshot_of_head": snapshot,
            "uncommitted_changes": False if snapshot else
            bool(git("status", "--porcelain", "--untracked-files=no"))}


def make_snapshot(workdir: Path) -> Path:
    """The committed HEAD unpacked into WORKDIR/snapshot; returns its src folder."""
    target = workdir / "snapshot"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], capture_output=True, cwd=ROOT,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def table(records: list[dict]) -> str:
    """The headline numbers; the pose's and defocus's 95 % coverage and the pose after the
    frame alignment come from ``cryosvi evaluate`` (its metrics.json)."""
    lines = [f"{'experiment':<18} {'status':<14} {'|Spearman|':>10} {'mode1 range':>16} "
             f"{'pose med':>9} {'cov95':>6} {'aligned':>14} {'defocus cov95':>13} "
             f"{'wall s':>8}"]
    for r in records:
        m = r.get("metrics", {})
        spearman = f"{m['spearman']:.3f}" if "spearman" in m else "-"
        amplitude = (f"{m['mode1_min']:+.1f}..{m['mode1_max']:+.1f}" if "mode1_min" in m
                     else "-")
        pose = f"{m['pose_median_deg']:.2f}" if "pose_median_deg" in m else "-"
        scored = r.get("evaluate") or {}
        evaluated = scored.get("pose") or {}
        aligned = evaluated.get("frame_aligned") or {}
        defocus = scored.get("latents", {}).get("defocus") or {}

        def number(entry, key, spec=".3f"):
            return "-" if entry.get(key) is None else format(entry[key], spec)

        aligned_text = (f"{number(aligned, 'median_error_deg', '.2f')} / "
                        f"{number(aligned, 'coverage95')}") if aligned else "-"
        wall = sum(s["wall_s"] for s in r["steps"])
        lines.append(f"{r['preset']:<18} {r['status']:<14} {spearman:>10} {amplitude:>16} "
                     f"{pose:>9} {number(evaluated, 'coverage95'):>6} {aligned_text:>14} "
                     f"{number(defocus, 'coverage95'):>13} {wall:>8.0f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    presets = [p for p in args.experiments.split(",") if p]
    unknown = sorted(set(presets) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"run_experiments: error: unknown experiment(s) {unknown}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    state = git_state(args.snapshot)  # before any work: what the snapshot holds
    if args.snapshot:
        source = make_snapshot(Path(args.workdir))
        ENVIRONMENT["PYTHONPATH"] = os.pathsep.join(
            [str(source), *filter(None, [os.environ.get("PYTHONPATH")])])
    start = time.perf_counter()
    records = [experiment(preset, args) for preset in presets]
    result = {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "settings": vars(args), "git": state,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpus": os.cpu_count()},
              "wall_s": round(time.perf_counter() - start, 1), "experiments": records}
    path = HERE / "results" / f"experiments_{args.tag}.json"
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(result, indent=2)))
    print(table(records))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
