"""``cryosvi bench``: time the forward model stage by stage against the paper's kernels."""

from __future__ import annotations

import json
import sys

from cryosvi.cli.common import (HelpFormatter, add_threads_argument, check_device,
                                device_name, integer_between, number)
from cryosvi.errors import CryosviError
from cryosvi.io.atomic import write_atomically
from cryosvi.io.outputs import check_output_file, output_path, provenance

BENCH_KIND = "bench"


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "bench", help=summary,
        description="Time each stage of the forward model (normal-mode displacement, "
        "rotation, projection, CTF, noise, the whole model, and backward passes) in "
        "microseconds per image at the paper's Table 1 settings (133 atoms, 128 px, sigma "
        "2 px, window 12 px, batch 1000) and at a large setting (10^4 atoms, 512 px, batch "
        "64), against the paper's sparse-COO projection and a plain FFT CTF timed in the "
        "same run; then one full SVI step at the paper's preset, in images per second.",
        formatter_class=HelpFormatter)
    parser.add_argument("--device", type=device_name, default="cpu",
                        help="where to run: cpu, cuda or cuda:N (CUDA work is synchronised "
                        "before each clock read)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON (default: not written)")
    parser.add_argument("--force", action="store_true",
                        help="replace a --json file an earlier 'cryosvi bench' wrote (never "
                        "other files)")
    parser.add_argument("--settings", default="table1,large",
                        help="comma-separated settings to time: table1, large, toy")
    parser.add_argument("--rounds", type=integer_between(1, 1000), default=3,
                        help="timing rounds per stage (the best one counts)")
    parser.add_argument("--stage-seconds", type=number(0.0, 3600.0), default=2.0,
                        help="extra rounds for fast stages until each was timed this long")
    parser.add_argument("--svi-batch", type=integer_between(1, 10**5), default=500,
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
    if args.device == "auto":
        raise CryosviError("--device: bench times one device; give cpu or cuda")
    device = check_device(args.device)
    if args.json is not None:
        output_path(args.json, "--json")
        if not args.json.lower().endswith(".json"):
            raise CryosviError(f"--json {args.json}: give a file name ending in .json")
        check_output_file(args.json, BENCH_KIND, args.force, option="--json")
    report = bench.run(names, device, rounds=args.rounds, svi=not args.no_svi,
                       svi_batch=args.svi_batch, stage_seconds=args.stage_seconds,
                       progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(bench.format_report(report))
    if args.json is not None:
        text = json.dumps({**provenance(BENCH_KIND), **report}, indent=2) + "\n"
        try:
            write_atomically(args.json, lambda temporary: temporary.write_text(text))
        except OSError as error:
            raise CryosviError(f"cannot write {args.json}: {error}") from None
    return 0
