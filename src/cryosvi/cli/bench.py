"""``cryosvi bench``: time the forward model stage by stage against the paper's kernels."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cryosvi.cli.common import add_threads_argument, positive_int
from cryosvi.errors import CryosviError


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "bench", help=summary,
        description="Time each stage of the forward model (normal-mode displacement, "
        "rotation, projection, CTF, noise, the whole model, and backward passes) in "
        "microseconds per image at the paper's Table 1 settings (133 atoms, 128 px, sigma "
        "2 px, window 12 px, batch 1000) and at a large setting (10^4 atoms, 512 px, batch "
        "64), against the paper's sparse-COO projection and a plain FFT CTF timed in the "
        "same run; then one full SVI step at the paper's preset, in images per second.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where to run (CUDA work is synchronised before each clock read)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--settings", default="table1,large",
                        help="comma-separated settings to time: table1, large, toy")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="timing rounds per stage (the best one counts)")
    parser.add_argument("--stage-seconds", type=float, default=2.0,
                        help="extra rounds for fast stages until each was timed this long")
    parser.add_argument("--svi-batch", type=positive_int, default=500,
                        help="batch size of the timed SVI step")
    parser.add_argument("--no-svi", action="store_true", help="skip the SVI step")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from cryosvi import bench

    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in bench.SETTINGS]
    if unknown or not names:
        raise CryosviError(f"unknown setting(s) {', '.join(unknown) or '(none)'}; choose from "
                           f"{', '.join(bench.SETTINGS)}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CryosviError("--device cuda: no CUDA device is available")
    report = bench.run(names, args.device, rounds=args.rounds, svi=not args.no_svi,
                       svi_batch=args.svi_batch, stage_seconds=args.stage_seconds,
                       progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(bench.format_report(report))
    if args.json:
        path = Path(args.json)
        try:
            path.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as error:
            raise CryosviError(f"cannot write {path}: {error}") from None
    return 0
