"""cryosvi at the scale of a real data set: simulate, train and infer 10^5 particles,
timed stage by stage.

    python benchmarks/scale.py -w WORK [--n 100000] [--box 64] [--device auto]
                               [--epochs 320] [--infer-particles K] [--threads T]
                               [--force]

The data set: cryosvi's own simulator with the paper's model (bundled 1OL5, one ANM
mode) at a working box of ``--box`` px and 2 Å pixels, SNR 0.1, two optics groups
(300 kV / Cs 2.7 mm and 200 kV / Cs 2.0 mm), astigmatic CTFs (|U - V| up to 500 Å) whose
values the STAR file gives as the particles' CTF estimates, in-plane shifts up to 4 Å,
and the poses given (``cryosvi train --latents modes``: pose, defocus and shifts come
from the file, the mode amplitude is inferred). Then the commands with their defaults:

    cryosvi simulate -o WORK/data -n N --box 64 --pixel-size 2 --snr 0.1 ...
    cryosvi train --particles WORK/data/particles.star --reference WORK/data/reference.npz
                  --latents modes -o WORK/run --epochs E
    cryosvi infer --run WORK/run --particles WORK/data/particles.star -o WORK/posterior.star
    cryosvi evaluate --posterior WORK/posterior.star --truth WORK/data/particles.star ...

Each runs as its own process under ``/usr/bin/time -v`` (its peak resident memory and
CPU seconds; where that program is missing, the largest of the finished processes so
far from ``getrusage(RUSAGE_CHILDREN)``). ``--epochs`` defaults to the product's default
(``cryosvi.config.SIM_EPOCHS``); with fewer, the training time of the full run is
extrapolated from the measured seconds per epoch and labelled so. ``--infer-particles
K`` infers (and evaluates) only the first K particles, for a machine too small to infer
them all; the time for all of them is then extrapolated and labelled so. Prints a table
and writes WORK/scale.json: per stage the command, wall and CPU seconds, particles per
second (simulated particles for training) and peak RSS; the machine (CPU model,
AVX-512 / bf16 / AMX flags from /proc/cpuinfo, cores, torch version and threads, the GPU
when there is one); and the evaluation's headline numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cryosvi.config import SIM_EPOCH_SIZE, SIM_EPOCHS

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""The /proc/cpuinfo flags that decide the speed of the guide's trunk (bf16 in hardware:
AVX512-BF16 or AMX; ``cryosvi.guide.native_bf16``)."""


def machine(threads: int | None) -> dict:
    """CPU model and flags, cores, torch and its threads, the GPU."""
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(found.group(1).split()) if found else set()
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(),
            "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
            "torch": torch.__version__, "torch_threads": threads or torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version()}


def timed(name: str, command: list[str], environment: dict, log: Path) -> dict:
    """Run ``command`` (wall time, peak RSS), its output to ``log``; exits on failure."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        wrapped = (["/usr/bin/time", "-v", "-o", report.name, *command]
                   if Path("/usr/bin/time").exists() else command)
        tic = time.perf_counter()
        with open(log, "w") as handle:
            done = subprocess.run(wrapped, env=environment, stdout=handle,
                                  stderr=subprocess.STDOUT)
        wall = time.perf_counter() - tic
        text = report.read()
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}); see {log}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = sum(float(value) for value in
              re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
    if found:
        peak, how = int(found.group(1)) * 1024, "/usr/bin/time -v"
    else:  # the largest finished child so far (kB on Linux)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        how = "getrusage(RUSAGE_CHILDREN), largest so far"
    return {"command": " ".join(command), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1) if cpu else None, "peak_rss_bytes": peak,
            "peak_rss_from": how, "log": str(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--work", required=True, type=Path, help="work directory")
    parser.add_argument("--n", type=int, default=100_000, help="particles")
    parser.add_argument("--box", type=int, default=64, help="image box, px")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--epochs", type=int, default=SIM_EPOCHS,
                        help=f"simulation epochs of {SIM_EPOCH_SIZE} (default: cryosvi "
                        "train's)")
    parser.add_argument("--infer-particles", type=int,
                        help="infer only the first K particles (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads of every stage "
                        "(default: torch's choice)")
    parser.add_argument("--force", action="store_true",
                        help="replace what an earlier run of this script left in WORK")
    args = parser.parse_args()
    work = args.work
    if (work / "scale.json").exists() and not args.force:
        sys.exit(f"{work}/scale.json exists; give --force to run again")
    work.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ)
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.threads:  # simulate has no --threads
        environment["OMP_NUM_THREADS"] = str(args.threads)
    force = ["--force"] if args.force else []
    cryosvi = [sys.executable, "-m", "cryosvi"]
    data, run = work / "data", work / "run"
    posterior, report = work / "posterior.star", work / "report"
    inferred = data / "particles.star"
    n_inferred = min(args.infer_particles or args.n, args.n)
    if n_inferred < args.n:
        inferred = work / f"first_{n_inferred}.star"
    stages = {
        "simulate": cryosvi + ["simulate", "-o", str(data), "-n", str(args.n), "--box",
                               str(args.box), "--pixel-size", "2", "--snr", "0.1",
                               "--optics-groups", "2", "--max-shift", "4",
                               "--astigmatism", "500", "--seed", "0", "--device",
                               args.device, "--quiet", *force],
        "train": cryosvi + ["train", "--particles", str(data / "particles.star"),
                            "--reference", str(data / "reference.npz"), "--latents",
                            "modes", "-o", str(run), "--epochs", str(args.epochs),
                            "--device", args.device, "--quiet", *threads, *force],
        "infer": cryosvi + ["infer", "--run", str(run), "--particles", str(inferred),
                            "--datadir", str(data), "-o", str(posterior), "--device",
                            args.device, "--quiet", *threads, *force],
        "evaluate": cryosvi + ["evaluate", "--posterior", str(posterior), "--truth",
                               str(inferred), "-o", str(report), *force],
    }
    result = {"settings": {"n": args.n, "box": args.box, "device": args.device,
                           "epochs": args.epochs, "epoch_size": SIM_EPOCH_SIZE,
                           "inferred": n_inferred, "threads": args.threads},
              "machine": machine(args.threads), "stages": {}}
    for name, command in stages.items():
        if name == "infer" and n_inferred < args.n:
            first_particles(data / "particles.star", inferred, n_inferred)
        print(f"{name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
        result["stages"][name] = timed(name, command, environment, work / f"{name}.log")
    stages_out = result["stages"]
    info = json.loads((run / "run.json").read_text())
    stages_out["simulate"]["particles_per_s"] = args.n / stages_out["simulate"]["wall_s"]
    simulated = args.epochs * SIM_EPOCH_SIZE
    stages_out["train"].update(
        particles_per_s=simulated / info["train_seconds"], simulated_particles=simulated,
        train_seconds=info["train_seconds"], device=info["device"])
    stages_out["infer"]["particles_per_s"] = n_inferred / stages_out["infer"]["wall_s"]
    extrapolated = {}  # labelled: not measured
    if args.epochs < SIM_EPOCHS:
        per_epoch = info["train_seconds"] / args.epochs
        setup = stages_out["train"]["wall_s"] - info["train_seconds"]
        extrapolated["train_wall_s"] = {
            "value": round(setup + per_epoch * SIM_EPOCHS),
            "from": f"the default {SIM_EPOCHS} epochs at the measured {per_epoch:.1f} s "
                    "per epoch plus the measured setup"}
    if n_inferred < args.n:
        extrapolated["infer_wall_s"] = {
            "value": round(args.n / stages_out["infer"]["particles_per_s"]),
            "from": f"all {args.n} particles at the rate measured on {n_inferred}"}
    if extrapolated:
        result["extrapolated"] = extrapolated
    metrics = json.loads((report / "metrics.json").read_text())
    mode = metrics.get("latents", {}).get("mode1", {})
    result["accuracy"] = {k: mode.get(k) for k in ("pearson_r", "coverage68",
                                                   "coverage95")}
    (work / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def first_particles(star: Path, output: Path, count: int) -> None:
    """A STAR file of the first ``count`` particles of ``star`` (same optics table)."""
    import starfile

    tables = starfile.read(star, always_dict=True)
    tables["particles"] = tables["particles"].iloc[:count]
    starfile.write(tables, output, overwrite=True)


def print_table(result: dict) -> None:
    m = result["machine"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["cpu_flags"].items())
    print(f"machine: {m['cpu']} ({m['cores']} cores; {flags}); torch {m['torch']}, "
          f"{m['torch_threads']} threads; GPU: {m['gpu'] or 'none'}")
    s = result["settings"]
    print(f"{s['n']} particles of {s['box']} px ({s['inferred']} inferred), "
          f"{s['epochs']} epochs of {s['epoch_size']} simulations, device {s['device']}")
    print(f"{'stage':<10}{'wall s':>10}{'CPU s':>10}{'particles/s':>14}"
          f"{'peak RSS GiB':>14}")
    for name, stage in result["stages"].items():
        rate, cpu = stage.get("particles_per_s"), stage.get("cpu_s")
        print(f"{name:<10}{stage['wall_s']:>10.1f}{(f'{cpu:.1f}' if cpu else '-'):>10}"
              f"{(f'{rate:.2f}' if rate else '-'):>14}"
              f"{stage['peak_rss_bytes'] / 2**30:>14.2f}")
    for name, value in result.get("extrapolated", {}).items():
        print(f"extrapolated, not measured: {name} {value['value']} s ({value['from']})")
    print(f"mode amplitude: r {result['accuracy']['pearson_r']}, 95 % coverage "
          f"{result['accuracy']['coverage95']}")


if __name__ == "__main__":
    main()
