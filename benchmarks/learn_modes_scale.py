"""Time and peak memory of ``cryosvi learn-modes`` on a small and a 100x larger particle
file, for this cryosvi and optionally another (e.g. an older checkout), in the same run.

    python benchmarks/learn_modes_scale.py -w WORK [--n 2000] [--copies 100]
        [--box 32] [--iterations 3] [--baseline-src /path/to/other/src]

Simulates ``--n`` particles of 64 px at 2 Å (SNR 0.1, two optics groups, shifts up to
4 Å, astigmatism) with ``cryosvi simulate``, writes a STAR file of ``--copies`` x n rows
that name the same images again and again, and runs learn-modes (the bundled 1OL5 as
the structure, default basis and --max-particles, working box ``--box``, ``--iterations``
Levenberg-Marquardt steps, one thread) on both files under ``/usr/bin/time -v``: wall
and CPU seconds, peak RSS. With ``--baseline-src`` the same runs with that source tree
on PYTHONPATH, and the ratios. Prints a table and writes WORK/learn_modes_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cryosvi


def run(command: list[str], source: str, log: Path) -> dict:
    """``command`` under /usr/bin/time -v with ``source`` first on PYTHONPATH."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["/usr/bin/time", "-v", *command], env=environment,
                          capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}; see {log}")
    text = done.stderr

    def number(pattern):
        return float(re.search(pattern, text).group(1))

    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    parts = [float(p) for p in wall.group(1).split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"wall_s": round(seconds, 1),
            "cpu_s": round(number(r"User time \(seconds\): ([\d.]+)")
                           + number(r"System time \(seconds\): ([\d.]+)"), 1),
            "peak_rss_mib": round(number(r"Maximum resident set size \(kbytes\): (\d+)")
                                  / 1024, 1),
            "fitted": int(re.search(r"^(\d+) particles,", done.stdout, re.M).group(1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--work", required=True, type=Path)
    parser.add_argument("--n", type=int, default=2000, help="simulated particles")
    parser.add_argument("--copies", type=int, default=100,
                        help="rows of the large file per particle")
    parser.add_argument("--box", type=int, default=32, help="learn-modes --box")
    parser.add_argument("--iterations", type=int, default=3,
                        help="learn-modes --iterations")
    parser.add_argument("--baseline-src", help="another cryosvi source tree to compare")
    args = parser.parse_args()
    import starfile

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    this = str(Path(cryosvi.__file__).parents[1])
    data = work / "data"
    if not (data / "particles.star").exists():
        subprocess.run([sys.executable, "-m", "cryosvi", "simulate", "-o", str(data), "-n",
                        str(args.n), "--box", "64", "--pixel-size", "2", "--snr", "0.1",
                        "--optics-groups", "2", "--max-shift", "4", "--astigmatism", "500",
                        "--quiet"], check=True,
                       env={**os.environ, "PYTHONPATH": this})
    large = work / "large" / "particles.star"
    if not large.exists():
        large.parent.mkdir(exist_ok=True)
        (large.parent / "particles.mrcs").symlink_to((data / "particles.mrcs").resolve())
        tables = starfile.read(data / "particles.star", always_dict=True)
        tables["particles"] = tables["particles"].iloc[
            list(range(len(tables["particles"]))) * args.copies].reset_index(drop=True)
        starfile.write(tables, large, overwrite=True)
    structure = Path(cryosvi.__file__).parent / "data" / "1ol5.pdb"
    sources = {"this": this}
    if args.baseline_src:
        sources["baseline"] = str(Path(args.baseline_src).resolve())
    results = {}
    for name, source in sources.items():
        for label, star in (("small", data / "particles.star"), ("large", large)):
            command = [sys.executable, "-m", "cryosvi", "learn-modes", "--particles",
                       str(star), "--structure", str(structure), "--stride", "2",
                       "--beads", "ca", "-o", str(work / f"{name}_{label}.npz"), "--force",
                       "--box", str(args.box), "--iterations", str(args.iterations),
                       "--threads", "1", "--quiet"]
            results[f"{name} {label}"] = run(command, source,
                                             work / f"{name}_{label}.log")
            print(f"{name} {label}: {results[f'{name} {label}']}", file=sys.stderr)
    rows = {"small": args.n, "large": args.n * args.copies}
    print(f"{'code':<10}{'rows':>9}{'fitted':>8}{'wall s':>9}{'CPU s':>8}{'peak MiB':>10}")
    for key, value in results.items():
        name, label = key.split()
        print(f"{name:<10}{rows[label]:>9}{value['fitted']:>8}{value['wall_s']:>9.1f}"
              f"{value['cpu_s']:>8.1f}{value['peak_rss_mib']:>10.1f}")
    if "baseline" in sources:
        for label in ("small", "large"):
            ours, theirs = results[f"this {label}"], results[f"baseline {label}"]
            print(f"{label}: peak RSS this/baseline "
                  f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}, CPU time "
                  f"{ours['cpu_s'] / theirs['cpu_s']:.2f}")
    (work / "learn_modes_scale.json").write_text(json.dumps(
        {"settings": vars(args) | {"work": str(work)}, "results": results}, indent=2,
        default=str) + "\n")


if __name__ == "__main__":
    main()
