"""Two independent motions, two learnt coordinates: the realistic data set with the
N-lobe's hinge and the C-lobe's twist, run through the cryosvi CLI as a user would.

    python benchmarks/realistic/two_motions.py -w WORKDIR [--n 2000] [--snr 0.1]
        [--max-angle 30] [--twist 25] [--twist-bins 11] [--epochs 40] [--threads 1]
        [--structure-options "--stride 1 --beads residue --sigma 2"] [--learn-modes ""]
        [--infer-options ""] [--bins 5] [--reconstruct] [--reuse-run] [--tag two_motions]

Steps (each timed; a failed step is recorded and the later ones skipped):
1. ``make_dataset.py -o WORKDIR/data --preset poses-given --n N --snr SNR --twist U
   --oracle 0``: the hinge t uniform on 0..max-angle (41 bins) and, drawn independently,
   the C-lobe's twist u uniform on 0..U (``--twist-bins`` bins); consensus poses (~2 deg
   off), CTF estimates and shifts given; reused when WORKDIR has it with the same
   settings;
2. ``cryosvi learn-modes --particles DATA/particles.star --structure 1ol5.pdb
   STRUCTURE_OPTIONS --n-modes 2 -o WORKDIR/learnt.npz``;
3. ``cryosvi train --reference learnt.npz --latents modes --epochs E -o WORKDIR/run``;
4. ``cryosvi infer --run RUN -o WORKDIR/posterior.star`` (its defaults);
5. ``cryosvi analyze --posterior POSTERIOR --run RUN -o WORKDIR/analysis --bins B``.

Scores, computed here from the STAR files: |Spearman| (scipy.stats.spearmanr) of each
true motion (``cryosviTrueConformation``, ``cryosviTrueConformation2``) with each inferred
coordinate (``cryosviModeAmplitude1``, ``2``); each motion is scored by its
best-matching coordinate (target >= 0.85 each; the coordinates' signs and order are
arbitrary). Also: the overlap of each true motion's displacement of the residue beads
(at its largest angle, a unit 3N-vector) with each learnt mode and with their span, and
analyze's bins. Everything goes to benchmarks/realistic/results/two_motions_TAG.json
(commands, exit codes, wall times, scores, the git commit), and a table is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import starfile
import torch

from cryosvi.io.atomic import write_atomically

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STRUCTURE = ROOT / "src" / "cryosvi" / "data" / "1ol5.pdb"
TARGET = 0.85


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


experiments = _script("run_experiments")  # run(), git_state(): the same records
make_dataset = _script("make_dataset")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workdir", required=True, help="folder (created)")
    parser.add_argument("--n", type=int, default=2000, help="particles")
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--max-angle", type=float, default=30.0, help="largest hinge (deg)")
    parser.add_argument("--twist", type=float, default=25.0, help="largest twist (deg)")
    parser.add_argument("--twist-bins", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=40, help="cryosvi train --epochs")
    parser.add_argument("--threads", type=int, default=1, help="--threads of every command")
    parser.add_argument("--structure-options", default="--stride 1 --beads residue --sigma 2",
                        help="how learn-modes builds the pseudo-atoms (default: %(default)s)")
    parser.add_argument("--learn-modes", default="", help="more learn-modes options")
    parser.add_argument("--infer-options", default="", help="cryosvi infer options")
    parser.add_argument("--bins", type=int, default=5, help="cryosvi analyze --bins")
    parser.add_argument("--reconstruct", action="store_true",
                        help="cryosvi analyze --reconstruct (needs relion_reconstruct)")
    parser.add_argument("--remake-data", action="store_true")
    parser.add_argument("--reuse-run", action="store_true",
                        help="keep WORKDIR/learnt.npz and WORKDIR/run from an earlier call "
                             "(only infer and analyze run)")
    parser.add_argument("--tag", default="latest",
                        help="results go to results/two_motions_TAG.json")
    return parser.parse_args(argv)


def cryosvi(*arguments) -> list[str]:
    return [sys.executable, "-m", "cryosvi", *map(str, arguments)]


def make_data(args, steps: list[dict]) -> Path | None:
    data = Path(args.workdir) / "data"
    truth = data / "truth.json"
    wanted = {"n": args.n, "snr": args.snr, "max_angle": args.max_angle,
              "twist": args.twist, "twist_bins": args.twist_bins}
    if truth.is_file() and not args.remake_data:
        settings = json.loads(truth.read_text())["settings"]
        if all(settings.get(k) == v for k, v in wanted.items()):
            steps.append({"command": f"(reused {data})", "rc": 0, "wall_s": 0.0})
            return data
    command = [sys.executable, str(HERE / "make_dataset.py"), "-o", str(data), "--preset",
               "poses-given", "--n", str(args.n), "--snr", str(args.snr), "--max-angle",
               str(args.max_angle), "--twist", str(args.twist), "--twist-bins",
               str(args.twist_bins), "--oracle", "0"]
    return data if experiments.run(command, steps) else None


def spearman_table(posterior: Path, data: Path) -> dict:
    """|Spearman| of every true motion with every coordinate, and each motion's best."""
    inferred = starfile.read(posterior, always_dict=True)["particles"]
    truth = starfile.read(data / "particles.star", always_dict=True)["particles"]
    merged = truth.merge(inferred, on="rlnImageName", suffixes=("_given", ""))
    motions = {"hinge": "cryosviTrueConformation", "twist": "cryosviTrueConformation2"}
    columns = [c for c in ("cryosviModeAmplitude1", "cryosviModeAmplitude2") if c in merged]
    table = {name: {c: abs(float(scipy.stats.spearmanr(merged[truth_column],
                                                       merged[c]).statistic))
                    for c in columns}
             for name, truth_column in motions.items()}
    best = {name: max(values.items(), key=lambda item: item[1])
            for name, values in table.items()}
    return {"particles": int(len(merged)), "abs_spearman": table,
            "best": {name: {"coordinate": c, "abs_spearman": value,
                            "target": TARGET, "met": value >= TARGET,
                            "short_by": max(0.0, TARGET - value)}
                     for name, (c, value) in best.items()}}


def overlaps(learnt: Path, truth: dict) -> dict:
    """Each true motion's displacement of the residue beads (largest angle; unit
    3N-vector) against the learnt modes: |cosine| with each, and the norm of its
    projection on their span."""
    from cryosvi.physics.structure import load_pseudo_atoms
    from cryosvi.reference import Reference

    reference = Reference.load(learnt)
    structure = make_dataset.load_chain(str(STRUCTURE), "A")
    positions, masses, residues, names = make_dataset.atom_arrays(structure)
    beads = load_pseudo_atoms(STRUCTURE, "A", 1, "residue")
    if len(beads.coords) != reference.n_atoms:
        return {"note": "the learnt reference's pseudo-atoms are not residue beads at "
                        "stride 1; overlaps not computed"}

    def bead_positions(atoms):
        return np.array([np.average(atoms[residues == r], axis=0, weights=masses[residues == r])
                         for r in beads.residue_numbers])

    conformation, second = truth["conformation"], truth["second_motion"]
    moved = {
        "hinge": make_dataset.hinge_conformation(
            positions, residues, np.array(conformation["axis_point_in_file_angst"]),
            np.array(conformation["axis_direction"]), conformation["bin_angles_deg"][-1]),
        "twist": make_dataset.twist_conformation(
            positions, residues, np.array(second["axis_point_in_file_angst"]),
            np.array(second["axis_direction"]), second["bin_angles_deg"][-1])}
    start = bead_positions(positions)
    modes = reference.modes.reshape(reference.n_modes, -1)
    out = {}
    for name, atoms in moved.items():
        change = (bead_positions(atoms) - start).ravel()
        change /= np.linalg.norm(change)
        cosines = np.abs(modes @ change)
        span = np.linalg.norm(np.linalg.qr(modes.T)[0].T @ change)
        out[name] = {"per_mode": cosines.round(4).tolist(), "span": round(float(span), 4)}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state = experiments.git_state(False)
    steps: list[dict] = []
    record = {"command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "settings": vars(args), "git": state,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpus": os.cpu_count(),
                          "load_average_at_start": list(os.getloadavg())},
              "steps": steps, "status": "started"}
    start = time.perf_counter()
    threads = ["--threads", str(args.threads)]
    data = make_data(args, steps)
    learnt, run = workdir / "learnt.npz", workdir / "run"
    posterior, analysis = workdir / "posterior.star", workdir / "analysis"
    plan = [
        ("learn-modes", cryosvi("learn-modes", "--particles", data / "particles.star",
                                "--structure", STRUCTURE,
                                *shlex.split(args.structure_options), "--n-modes", "2",
                                *shlex.split(args.learn_modes), "-o", learnt, "--force",
                                "--quiet", *threads)),
        ("train", cryosvi("train", "--particles", data / "particles.star", "--reference",
                          learnt, "--latents", "modes", "--epochs", args.epochs, "-o", run,
                          "--quiet", *threads, *(["--force"] if (run / "run.json").exists()
                                                 else []))),
        ("infer", cryosvi("infer", "--run", run, "--particles", data / "particles.star",
                          "-o", posterior, *shlex.split(args.infer_options), "--quiet",
                          "--force", *threads)),
        ("analyze", cryosvi("analyze", "--posterior", posterior, "--run", run, "-o",
                            analysis, "--datadir", data, "--bins", args.bins, "--force",
                            "--quiet", *(["--reconstruct"] if args.reconstruct else []))),
    ] if data is not None else []
    if args.reuse_run and learnt.is_file() and (run / "run.json").is_file():
        plan = [(name, command) for name, command in plan
                if name not in ("learn-modes", "train")]
        steps.append({"command": f"(reused {learnt} and {run})", "rc": 0, "wall_s": 0.0})
    record["status"] = "data set not made" if data is None else "done"
    for name, command in plan:
        if not experiments.run(command, steps):
            record["status"] = f"{name} failed"
            break
        steps[-1]["step"] = name
    if record["status"] == "done":
        truth = json.loads((data / "truth.json").read_text())
        record["scores"] = spearman_table(posterior, data)
        record["overlaps"] = overlaps(learnt, truth)
        record["learnt"] = json.loads(str(np.load(learnt)["settings"]))["source"]["learnt"]
        record["analysis"] = {k: v for k, v in json.loads(
            (analysis / "summary.json").read_text()).items()
            if k in ("coordinate", "bins", "map_correlations", "coordinates")}
    record["wall_s"] = round(time.perf_counter() - start, 1)
    path = HERE / "results" / f"two_motions_{args.tag}.json"
    write_atomically(path, lambda temporary: temporary.write_text(
        json.dumps(record, indent=2, default=str)))
    print(table(record))
    print(f"wrote {path}")


def table(record: dict) -> str:
    lines = [f"status: {record['status']}"]
    for step in record["steps"]:
        lines.append(f"  {step.get('step', 'data'):<12} rc {step['rc']}  {step['wall_s']:>8.1f} s")
    scores = record.get("scores")
    if scores:
        for name, best in scores["best"].items():
            lines.append(f"{name:<6} best coordinate {best['coordinate']}: |Spearman| "
                         f"{best['abs_spearman']:.3f} (target {TARGET}: "
                         f"{'met' if best['met'] else 'missed by %.3f' % best['short_by']}); "
                         f"all: {scores['abs_spearman'][name]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
