"""The training experiments, as documented ``cryosvi`` commands.

Each experiment simulates (or reuses) a data set, trains a run, infers a held-out set
and evaluates it, with the exact commands and wall times recorded:

    python benchmarks/train_experiments.py --list
    python benchmarks/train_experiments.py joint_sim_snr20 [more names] [--work DIR]

Results go to ``benchmarks/results/<name>.json`` (commands, wall times, metrics, the
training log's last line, machine) and the summary table ``benchmarks/results/README.md``
is rebuilt from all JSON files present. Data sets are cached under ``--work`` (default
``/tmp/cryosvi-bench``); runs are re-trained unless ``--reuse`` is given. Every run is
inferred in several ways (``--variants``): the guide alone, importance sampling from the
guide, tempered SMC and the default Laplace refinement.

Data sets (paper preset: 1OL5, 133 pseudo-atoms, 32 px x 2.5 Å, one ANM mode with prior
std 2 Å, defocus 10 000 +- 2 500 Å, 10 000 training particles seed 0, 2 000 held-out
particles seed 1):
    snr{20,1,0.1}: uniform poses;  fixedpose: every pose the identity (the paper's
    single-latent and "defocus + mode at fixed pose" experiments), SNR 20.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Guide of the simulation-trained runs: the paper's encoder layout with narrower channels
# (16-32-64, MLP 256) and one conv trunk shared by the latents (3x cheaper per epoch on
# CPU); the paper-schedule ELBO runs keep separate encoders so that freezing is exact.
SHARED = ["--channels", "16,32,64", "--hidden", "256", "--shared-trunk"]
SEPARATE = ["--channels", "16,32,64", "--hidden", "256"]
SIM = ["--objective", "sim", "--lr", "2e-3", "--batch-size", "128"]
# Inference variants evaluated for every run: the guide alone (one network pass), plain
# importance sampling from the guide, tempered SMC (64 samples, 3 moves; the default until
# commit ede3bae, 2026-11-30) and Gauss-Newton + Laplace importance sampling (64 samples,
# SMC for the particles where that fails). `default` is `cryosvi infer` as it comes
# ('auto': laplace64 for batches of SNR >= 15, the SMC with 12 moves below).
GUIDE_ONLY = {"guide": ["--importance", "0"]}
ALL_INFER = {"guide": ["--importance", "0"], "is64": ["--importance", "64", "--refine", "is"],
             "smc64": ["--refine", "smc"], "laplace64": ["--refine", "laplace"],
             "default": []}

EXPERIMENTS = {
    # --- the paper's single-latent experiments (others fixed to their true values) ----
    "defocus_only_sim": dict(
        data="fixedpose", latents="defocus", train=SHARED + SIM + ["--epochs", "8"],
        infer=ALL_INFER,
        note="defocus alone; pose (identity) and mode fixed to the truth"),
    "mode_only_sim": dict(
        data="fixedpose", latents="modes", train=SHARED + SIM + ["--epochs", "8"],
        infer=ALL_INFER,
        note="mode amplitude alone; pose (identity) and defocus fixed to the truth"),
    "pose_only_sim": dict(
        data="snr20", latents="pose", train=SHARED + SIM + ["--epochs", "20"],
        infer=ALL_INFER,
        note="pose alone (uniform poses); defocus and mode fixed to the truth"),
    # --- defocus + mode at fixed pose: the paper's staged ELBO schedule vs simulation ---
    "defocus_mode_paper_elbo": dict(
        data="fixedpose", latents="defocus,modes", train=SEPARATE + ["--schedule", "paper"],
        infer=ALL_INFER,
        note="the paper's schedule: ELBO, ClippedAdam 5e-4, batch 500, mode encoder 20 "
             "epochs (defocus frozen) then defocus encoder 20 epochs (mode frozen)"),
    "defocus_mode_sim": dict(
        data="fixedpose", latents="defocus,modes", train=SHARED + SIM + ["--epochs", "8"],
        infer=ALL_INFER, note="simulation-based, same data"),
    # --- joint pose + defocus + mode -------------------------------------------------
    "joint_sim_snr20": dict(
        data="snr20", latents="pose,defocus,modes",
        train=SHARED + ["--objective", "sim", "--lr", "1.5e-3", "--batch-size", "256",
                        "--epochs", "320"],
        infer={**ALL_INFER, "guide_turns4": ["--importance", "0", "--turns", "4"]},
        note="simulation-based, 320 epochs of 10 000 fresh particles in antithetic pairs "
             "(cryosvi train's defaults; the target run)"),
    "joint_elbo_snr20": dict(
        data="snr20", latents="pose,defocus,modes",
        train=SHARED + ["--objective", "elbo", "--epochs", "10", "--lr", "5e-4",
                        "--batch-size", "128"],
        infer=ALL_INFER,
        note="the paper's objective (Trace_ELBO, ClippedAdam) on all three latents from "
             "scratch"),
    "joint_sim_elbo_snr20": dict(
        data="snr20", latents="pose,defocus,modes", init="joint_sim_snr20",
        train=SHARED + ["--objective", "elbo", "--epochs", "3", "--lr", "1e-4",
                        "--batch-size", "128"],
        infer=ALL_INFER,
        note="joint_sim_snr20's guide fine-tuned by the ELBO on the particles (3 epochs)"),
    "joint_sim_snr1": dict(
        data="snr1", latents="pose,defocus,modes", train=SHARED + SIM + ["--epochs", "20"],
        infer=ALL_INFER, note="SNR 1, 20 epochs"),
    "joint_sim_snr0.1": dict(
        data="snr0.1", latents="pose,defocus,modes", train=SHARED + SIM + ["--epochs", "20"],
        infer=ALL_INFER, note="SNR 0.1, 20 epochs"),
}


def run(command: list[str], log: Path) -> float:
    """Run a command, appending its output to ``log``; returns the wall time."""
    print("$ " + shlex.join(command), flush=True)
    tic = time.perf_counter()
    with open(log, "a") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {shlex.join(command)}; see {log}")
    return time.perf_counter() - tic


def make_data(name: str, work: Path, log: Path) -> dict:
    """Simulate the training and held-out sets of data set ``name`` once."""
    train, test = work / f"{name}_train", work / f"{name}_test"
    commands = []
    if not (train / "particles.star").is_file() or not (test / "particles.star").is_file():
        if name == "fixedpose":
            code = (
                "from dataclasses import replace; from cryosvi.config import PAPER_PRESET; "
                "from cryosvi.reference import build_reference; "
                "from cryosvi.simulate import simulate_dataset; "
                "s = dict(PAPER_PRESET); "
                "s['priors'] = replace(s['priors'], rotation_concentration=1e6); "
                "r = build_reference(None, None, 2, **s); "
                f"simulate_dataset(r, 10000, {str(train)!r}, seed=0, force=True); "
                f"simulate_dataset(r, 2000, {str(test)!r}, seed=1, force=True)")
            commands.append([sys.executable, "-c", code])
        else:
            snr = name.removeprefix("snr")
            commands.append(["cryosvi", "simulate", "-o", str(train), "-n", "10000",
                             "--seed", "0", "--snr", snr, "--force"])
            commands.append(["cryosvi", "simulate", "-o", str(test), "-n", "2000",
                             "--seed", "1", "--snr", snr, "--force"])
    for command in commands:
        run(command, log)
    return {"train": train, "test": test, "commands": [shlex.join(c) for c in commands]}


def trained_guide(record: dict) -> tuple:
    """What identifies a record's guide: the training command and the final epoch's
    validation (not its timing), so a re-training under changed defaults is a new guide."""
    return record.get("train_command"), {k: v for k, v in record.get("last_epoch", {}).items()
                                         if k != "seconds"}


def experiment(name: str, work: Path, reuse: bool, threads: int | None,
               variants: list[str] | None = None) -> dict:
    spec = EXPERIMENTS[name]
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{name}.log"
    log.write_text("")
    data = make_data(spec["data"], work, log)
    run_dir = work / "runs" / name
    threads_args = ["--threads", str(threads)] if threads else []
    record = {"experiment": name, "note": spec.get("note", ""), "data": spec["data"],
              "latents": spec["latents"], "data_commands": data["commands"],
              "seconds": {}, "variants": {}}
    if reuse and (run_dir / "checkpoint.pt").is_file():
        print(f"reusing {run_dir}", flush=True)
    else:
        init = ["--init", str(work / "runs" / spec["init"])] if "init" in spec else []
        command = ["cryosvi", "train", "--particles", str(data["train"] / "particles.star"),
                   "--reference", str(data["train"] / "reference.npz"), "-o", str(run_dir),
                   "--latents", spec["latents"], *spec.get("train", []), *init,
                   *threads_args, "--force", "--quiet"]
        record["seconds"]["train_wall"] = round(run(command, log), 1)
    info = json.loads((run_dir / "run.json").read_text())
    record["train_command"] = info.get("command")
    record["seconds"]["train"] = info.get("train_seconds")
    record["parameters"] = info["parameters"]
    record["precision"] = info.get("precision", "fp32")
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    record["last_epoch"] = {k: v for k, v in lines[-1].items() if k != "loss_steps"}
    previous = RESULTS / f"{name}.json"
    if previous.is_file():  # keep variants measured earlier on the same guide
        old = json.loads(previous.read_text())
        if trained_guide(old) == trained_guide(record):
            record["variants"].update(old.get("variants", {}))
    for variant, arguments in spec["infer"].items():
        if variants and variant not in variants:
            continue
        posterior = work / f"{name}_{variant}_posterior.star"
        command = ["cryosvi", "infer", "--run", str(run_dir), "--particles",
                   str(data["test"] / "particles.star"), "-o", str(posterior), *arguments,
                   *threads_args, "--quiet", "--force"]  # replaces this script's own outputs
        seconds = round(run(command, log), 1)
        report = work / f"{name}_{variant}_eval"
        evaluate = ["cryosvi", "evaluate", "--posterior", str(posterior), "--truth",
                    str(data["test"] / "particles.star"), "-o", str(report), "--force"]
        run(evaluate, log)
        metrics = json.loads((report / "metrics.json").read_text())
        import starfile

        particles = starfile.read(posterior, always_dict=True)["particles"]
        if "cryosviESS" in particles:  # from the guide, or (laplace64) the Laplace proposal
            metrics["guide_is_ess_median"] = float(particles["cryosviESS"].median())
        if "cryosviRefinedBySMC" in particles:
            metrics["smc_fallback_fraction"] = float(particles["cryosviRefinedBySMC"].mean())
        record["variants"][variant] = {"infer_command": shlex.join(command),
                                       "evaluate_command": shlex.join(evaluate),
                                       "infer_seconds": seconds, "metrics": metrics}
    record["machine"] = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def machine() -> dict:
    import torch

    from cryosvi.guide import native_bf16

    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_native_bf16": native_bf16(torch.device("cpu")),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def summary() -> str:
    rows = ["| experiment | inferred | inference | defocus r | mode r | pose median ° | "
            "pose p90 ° | cov95 defocus / mode / pose | IS ESS | SMC fallback | train s | "
            "infer s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        inferred = r.get("latents", "")
        for variant, v in r["variants"].items():
            m = v["metrics"]
            d, mode, pose = m["latents"]["defocus"], m["latents"].get("mode1", {}), m["pose"]
            has = {k: k in inferred for k in ("defocus", "modes", "pose")}
            rows.append(
                f"| {r['experiment']} | {inferred} | {variant} | "
                f"{fmt(d['pearson_r'], '.4f') if has['defocus'] else 'fixed'} | "
                f"{fmt(mode.get('pearson_r'), '.4f') if has['modes'] else 'fixed'} | "
                f"{fmt(pose['median_error_deg'], '.2f') if has['pose'] else 'fixed'} | "
                f"{fmt(pose['p90_error_deg'], '.1f') if has['pose'] else '-'} | "
                f"{fmt(d['coverage95'], '.3f') if has['defocus'] else '-'} / "
                f"{fmt(mode.get('coverage95'), '.3f') if has['modes'] else '-'} / "
                f"{fmt(pose['coverage95'], '.3f') if has['pose'] else '-'} | "
                f"{fmt(m.get('guide_is_ess_median'), '.1f')} | "
                f"{fmt(m.get('smc_fallback_fraction'), '.3f')} | "
                f"{fmt(r['seconds'].get('train'), '.0f')} | {fmt(v['infer_seconds'], '.0f')} |")
    return "\n".join(rows)


def write_summary() -> None:
    header = (RESULTS / "HEADER.md").read_text() if (RESULTS / "HEADER.md").is_file() else ""
    text = header + "\n" + summary() + "\n"
    (RESULTS / "README.md").write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="experiments to run (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cryosvi-bench"))
    parser.add_argument("--reuse", action="store_true", help="keep existing runs")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--variants", help="comma-separated inference variants to run "
                        "(default: all of the experiment's)")
    parser.add_argument("--summary", action="store_true", help="only rebuild README.md")
    args = parser.parse_args(argv)
    if args.summary:
        write_summary()
        print(summary())
        return 0
    if args.list:
        for name, spec in EXPERIMENTS.items():
            print(f"{name:28s} {spec.get('note', '')}")
        return 0
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment(s): {', '.join(unknown)}")
    variants = args.variants.split(",") if args.variants else None
    for name in args.names:
        record = experiment(name, args.work, args.reuse, args.threads, variants)
        print(json.dumps({k: record[k] for k in ("experiment", "seconds")}), flush=True)
    write_summary()
    print(summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
