"""``cryosvi demo``: simulate, train, infer and evaluate on the bundled 1OL5, end to end.

With no arguments: the paper preset (32 px, SNR 20, one mode), 10 000 training particles
(seed 0) and 2 000 held-out particles (seed 1), a guide for pose + defocus + mode trained
by simulation, its posterior of the held-out particles and their evaluation, in
``cryosvi-demo/``:

    data/train/, data/test/   particles.star + .mrcs + reference.npz
    run/                      the training run (run.json, checkpoint.pt, log.jsonl, loss.png)
    posterior.star            the held-out posterior
    report/                   metrics.json, truth_vs_prediction.png, pose_error.png,
                              calibration.png, loss.png
    demo.json                 settings and the wall time of every step
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from cryosvi.cli.common import (HelpFormatter, add_threads_argument, check_device,
                                check_disk, check_memory, device_name, integer_between,
                                number, seed_int)
from cryosvi.cli.train import add_guide_arguments, architecture_from_args
from cryosvi.config import LIMITS, SIM_BATCH, SIM_EPOCHS, SIM_LR
from cryosvi.io.atomic import write_atomically
from cryosvi.io.outputs import check_output_directory, mark_directory, remove_directory

MARKER = "demo.json"
DEMO_KIND = "demo"
DEMO_DEFAULTS = dict(n_train=10000, n_test=2000, epochs=SIM_EPOCHS, batch_size=SIM_BATCH,
                     lr=SIM_LR, importance=64, moves=3)
"""The defaults of ``cryosvi train`` (guide ``guide.Architecture()``, epochs
``SIM_EPOCHS`` of ``SIM_BATCH``) and of ``cryosvi infer``, as in the joint SNR 20 run of
benchmarks/results (measured: 15-26 minutes on a 2-core AVX-512 EPYC, README's quick
start; ``--epochs 40``: about 3)."""


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "demo", help=summary,
        description="Simulate the paper preset from the bundled 1OL5 (training and held-out "
        "sets with different seeds), train a guide for pose + defocus + mode by "
        "simulation, infer the held-out particles, evaluate and write a report. Sized to "
        "finish in 15-26 minutes on a 2-core AVX-512 CPU (--epochs 40: about 3; machines "
        "without AVX-512 are several times slower); uses CUDA when present.",
        formatter_class=HelpFormatter)
    parser.add_argument("-o", "--output", default="cryosvi-demo", help="output directory")
    parser.add_argument("--n-train", type=integer_between(2, 10**7),
                        default=DEMO_DEFAULTS["n_train"], help="training particles")
    parser.add_argument("--n-test", type=integer_between(2, 10**7),
                        default=DEMO_DEFAULTS["n_test"], help="held-out particles")
    parser.add_argument("--snr", type=number(*LIMITS["snr"], allow_inf=True), default=20.0,
                        help="signal-to-noise ratio of both sets ('inf': noise-free)")
    parser.add_argument("--epochs", type=integer_between(1, 10**6),
                        default=DEMO_DEFAULTS["epochs"],
                        help="simulation epochs of n-train fresh particles each")
    parser.add_argument("--batch-size", type=integer_between(1, 10**6),
                        default=DEMO_DEFAULTS["batch_size"], help="particles per step")
    parser.add_argument("--lr", type=number(0.0, 10.0, low_open=True),
                        default=DEMO_DEFAULTS["lr"], help="peak learning rate")
    add_guide_arguments(parser)
    parser.add_argument("--importance", type=integer_between(0, 10**5),
                        default=DEMO_DEFAULTS["importance"],
                        help="samples per particle of the refinement at inference (0: the "
                        "guide alone)")
    parser.add_argument("--moves", type=integer_between(0, 1000), default=DEMO_DEFAULTS["moves"],
                        help="Metropolis moves per SMC tempering step (the particles the "
                        "Laplace refinement hands to the SMC)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (cuda when present), cpu, cuda or cuda:N")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="random seed (the held-out set uses seed + 1)")
    parser.add_argument("--force", action="store_true",
                        help="replace an output directory an earlier demo made (never "
                        "another directory)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def prepare_output(output: Path, force: bool) -> None:
    """A new, empty, marked output directory; an existing one is replaced only with
    ``force`` and only when an earlier demo made it (``cryosvi.io.outputs``)."""
    if check_output_directory(output, DEMO_KIND, force):
        remove_directory(output)
    output.mkdir(parents=True, exist_ok=True)
    mark_directory(output, DEMO_KIND)


def run(args) -> None:
    from cryosvi.config import PAPER_PRESET, Noise
    from cryosvi.evaluate import evaluate_tables, format_table, write_report
    from cryosvi.inference.driver import infer
    from cryosvi.io.particles import read_particles
    from cryosvi.reference import Reference, build_reference
    from cryosvi.simulate import simulate_dataset
    from cryosvi.training.setup import TrainOptions
    from cryosvi.training.schedule import default_schedule
    from cryosvi.training.loop import train

    architecture = architecture_from_args(args)  # bad --channels fail here, not after simulating
    device = check_device(args.device)
    optics, imaging = PAPER_PRESET["optics"], PAPER_PRESET["imaging"]
    check_memory(max(256, args.batch_size, 512, 256 * max(args.importance, 1)), optics,
                 imaging, device, "use a smaller --batch-size or --importance")
    output = Path(args.output)
    check_output_directory(args.output, DEMO_KIND, args.force)  # check_disk looks there
    check_disk(output, (args.n_train + args.n_test) * optics.box**2 * 4)
    prepare_output(output, args.force)
    times: dict[str, float] = {}
    record = {"settings": vars(args) | {"func": None, "device": device}, "seconds": times}

    def save_record():
        text = json.dumps(record, indent=2, default=str) + "\n"
        write_atomically(output / MARKER, lambda temporary: temporary.write_text(text))

    save_record()
    start = time.perf_counter()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr,
                                                                  flush=True))

    tic = time.perf_counter()
    settings = dict(PAPER_PRESET)
    settings["noise"] = Noise(snr=args.snr)
    reference = build_reference(None, None, 2, **settings)
    say(f"[1/4] simulating {args.n_train} + {args.n_test} particles (1OL5, "
        f"{reference.n_atoms} pseudo-atoms, {reference.optics.box} px, SNR {args.snr:g})")
    simulate_dataset(reference, args.n_train, output / "data" / "train", seed=args.seed,
                     device=device, progress=not args.quiet)
    simulate_dataset(reference, args.n_test, output / "data" / "test",
                     seed=args.seed + 1, device=device, progress=not args.quiet)
    times["simulate"] = round(time.perf_counter() - tic, 1)

    tic = time.perf_counter()
    say(f"[2/4] training pose + defocus + mode by simulation ({args.epochs} epochs of "
        f"{args.n_train} particles, device {device})")
    options = TrainOptions(
        schedule=default_schedule("sim", args.epochs, args.lr, args.batch_size,
                                  epoch_size=args.n_train),  # as its --epochs says
        architecture=architecture, seed=args.seed, device=device)
    train_reference = Reference.load(output / "data" / "train" / "reference.npz")
    info = train(output / "data" / "train" / "particles.star", train_reference,
                 output / "run", options, progress=not args.quiet)
    times["train"] = round(time.perf_counter() - tic, 1)
    record["parameters"] = info["parameters"]

    tic = time.perf_counter()
    say(f"[3/4] inferring the held-out particles (guide + refinement with the physics "
        f"likelihood, {args.importance} samples per particle)")
    test_star = output / "data" / "test" / "particles.star"
    infer(output / "run", test_star, output / "posterior.star", device=device,
          importance=args.importance, moves=args.moves, progress=not args.quiet)
    times["infer"] = round(time.perf_counter() - tic, 1)

    tic = time.perf_counter()
    say("[4/4] evaluating")
    posterior, truth = read_particles(output / "posterior.star"), read_particles(test_star)
    metrics = evaluate_tables(posterior, truth)
    write_report(metrics, posterior, truth, output / "report")
    shutil.copy(output / "run" / "loss.png", output / "report" / "loss.png")
    times["evaluate"] = round(time.perf_counter() - tic, 1)
    times["total"] = round(time.perf_counter() - start, 1)
    record["metrics"] = {k: v for k, v in metrics.items() if not k.startswith("_")}
    save_record()
    print(format_table(metrics))
    print(f"guide: {info['parameters']:,} parameters; wall time {times['total']:.0f} s "
          f"(simulate {times['simulate']:.0f}, train {times['train']:.0f}, infer "
          f"{times['infer']:.0f}, evaluate {times['evaluate']:.0f}) on {device}")
    print(f"report: {output / 'report'}/")
