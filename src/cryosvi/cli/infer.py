"""``cryosvi infer``: the posterior of every particle under a trained run."""

from __future__ import annotations

import argparse

from cryosvi.cli.common import add_threads_argument, non_negative_int, positive_int


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "infer", help=summary,
        description="Run the trained guide of a run on a particle STAR file (one batched "
        "network pass) and write the posterior: rlnAngleRot/Tilt/Psi (mean direction of "
        "the heaviest pose component), rlnDefocusU/V, cryosviModeAmplitude1..K (means) "
        "and cryosviPoseStdDeg, cryosviDefocusStd, cryosviModeAmplitudeStd1..K. Other "
        "columns of the input are kept; latents the run does not infer keep their input "
        "values. --importance S refines by importance sampling with the physics "
        "likelihood (adds cryosviESS, the effective sample size per particle).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory from 'cryosvi train'")
    parser.add_argument("--particles", required=True, help="particle STAR file")
    parser.add_argument("-o", "--output", required=True, help="posterior STAR file")
    parser.add_argument("--samples", type=non_negative_int, default=0,
                        help="posterior samples per particle to write to OUTPUT.npz "
                        "(with --importance: the proposals and their weights)")
    parser.add_argument("--importance", type=non_negative_int, default=64,
                        help="samples per particle for the refinement with the physics "
                        "likelihood (0: the guide alone, one network pass)")
    parser.add_argument("--refine", choices=["smc", "is"], default="smc",
                        help="with --importance: 'smc' tempers from the guide to the "
                        "posterior with resample-move steps; 'is' is plain importance "
                        "sampling with the guide as proposal")
    parser.add_argument("--moves", type=non_negative_int, default=3,
                        help="smc: Metropolis moves per tempering step")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_threads_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> None:
    import numpy as np

    from cryosvi.infer import infer

    frame = infer(args.run, args.particles, args.output, samples=args.samples,
                  importance=args.importance, method=args.refine, moves=args.moves,
                  batch_size=args.batch_size,
                  device=args.device, progress=not args.quiet)
    extra = ""
    if "cryosviESS" in frame:
        ess = frame["cryosviESS"].to_numpy()
        extra = (f"; ESS of importance sampling from the guide: median "
                 f"{np.median(ess):.1f} of {args.importance}")
    npz = f" and {args.samples} samples per particle to " \
          f"{str(args.output).rsplit('.', 1)[0]}.npz" if args.samples else ""
    print(f"wrote the posterior of {len(frame)} particles to {args.output}{npz}{extra}")
