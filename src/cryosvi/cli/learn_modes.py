"""``cryosvi learn-modes``: conformational modes learnt from particles of known pose."""

from __future__ import annotations

import sys
import warnings

from cryosvi.cli.common import (HelpFormatter, add_particle_source_arguments,
                                add_threads_argument, check_device, device_name,
                                integer_between, number, positive, seed_int)
from cryosvi.cli.train import (add_noise_model_argument, add_reference_arguments,
                               reference_from_args)
from cryosvi.errors import CryosviError, CryosviWarning
from cryosvi.inference.fitting_basis import BASES

KIND = "reference"


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "learn-modes", help=summary,
        description="Learn the directions of the particles' conformational change from "
        "their images, given each particle's pose, CTF and shift (a consensus "
        "refinement): each particle's displacement along the rigid motions of a few "
        "compact blocks of the structure, of segments of its chain, or along the "
        "reference's lowest ANM modes and the 6 rigid motions (by default each of the "
        "three, keeping the one that explains the particles best) is fitted "
        "(Gauss-Newton, Laplace covariance), "
        "and the directions along which the particles spread are found by probabilistic "
        "PCA that weighs each particle by its own uncertainty (cryosvi.inference.learnt_modes). "
        "Writes a reference.npz whose pseudo-atoms sit at the particles' mean "
        "conformation and whose modes are the learnt directions (prior std: the "
        "particles' spread along each), with the estimated gray levels and noise; give "
        "it to 'cryosvi train --reference'.",
        formatter_class=HelpFormatter)
    parser.add_argument("--particles", required=True,
                        help="particle file (STAR or .cs) with poses (rlnAngleRot/Tilt/Psi) "
                        "and CTF estimates")
    add_particle_source_arguments(parser)
    add_reference_arguments(parser, required=True)
    parser.add_argument("--basis", choices=["auto", *BASES],
                        default="auto",
                        help="fitting basis: the rigid motions of --blocks compact blocks "
                        "of pseudo-atoms (k-means of their positions), of --blocks "
                        "segments of the chain (contiguous in sequence, each as compact "
                        "as can be), or the reference's lowest ANM modes and the 6 rigid "
                        "motions; 'auto' learns in each and keeps the directions along "
                        "which the particles' spread explains their images best (the "
                        "likelihood ratio of the spread against one conformation; three "
                        "times the time of one basis)")
    parser.add_argument("--blocks", type=integer_between(1, 100), default=3,
                        help="with --basis blocks or segments: number of blocks")
    parser.add_argument("--anm-modes", dest="n_modes", metavar="K",
                        type=integer_between(1, 100), default=10,
                        help="with --basis anm or auto and --structure: ANM modes in "
                        "the basis")
    parser.add_argument("--n-modes", dest="learnt_modes", metavar="K",
                        type=integer_between(1, 100), default=1, help="modes to learn")
    parser.add_argument("-o", "--output", required=True, help="output reference (.npz)")
    parser.add_argument("--box", type=integer_between(16, 4096),
                        help="working box, px (even; default: min(64, the particles' box))")
    parser.add_argument("--noise-std", type=positive,
                        help="noise std, for images already in the model's gray levels "
                        "(default: the reference's, else fitted with the gray levels "
                        "against the model at the given poses)")
    add_noise_model_argument(parser, "It whitens the fit, and the learnt reference keeps "
                             "it for 'cryosvi train' (whose 'auto' then takes it) with "
                             "the B envelope the particles show beyond the learnt model")
    parser.add_argument("--max-particles", type=integer_between(2), default=20000,
                        help="fit at most this many particles (a random subset)")
    parser.add_argument("--prior-std", type=number(0.0, 1e3, low_open=True), default=10.0,
                        help="std of the fit's weak prior on each amplitude, Å RMS")
    parser.add_argument("--iterations", type=integer_between(1, 100), default=10,
                        help="Levenberg-Marquardt iterations per particle")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:N or auto (CUDA when present, else the CPU)")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="random seed of the particle subset")
    parser.add_argument("--force", action="store_true",
                        help="replace a reference an earlier cryosvi command wrote")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, mode_std=2.0)


def run(args) -> None:
    from tqdm.auto import tqdm

    from cryosvi.inference.learnt_modes import learn_modes_from_particles
    from cryosvi.io.outputs import check_output_file, directory_kind, output_path
    from cryosvi.io.particles import read_particles

    output = output_path(args.output)
    if output.suffix.lower() != ".npz":
        raise CryosviError(f"-o {output}: a reference is an .npz file; give a name ending "
                           "in .npz")
    check_output_file(output, KIND, args.force,
                      inputs=[args.particles, args.structure, args.reference])
    folder = directory_kind(output.parent)
    if folder is not None:  # e.g. a data set's reference.npz, its ground truth
        raise CryosviError(f"-o {output} is inside a cryosvi {folder} folder, whose files "
                           "belong to it; write the learnt reference elsewhere")
    device = check_device(args.device)
    table = read_particles(args.particles, args.datadir, args.invert)
    reference = reference_from_args(args, args.particles)
    count = min(len(table), args.max_particles)
    with tqdm(total=count, desc="fitting", unit="particle", disable=args.quiet,
              file=sys.stderr) as bar:
        label, passes = "fitting", 1

        def stage(basis: str) -> None:
            nonlocal label, passes
            label, passes = f"{basis} basis", 1
            bar.reset()
            bar.set_description(label)

        def progress(done: int) -> None:
            nonlocal passes
            if bar.n + done > bar.total:  # a second pass (refitted gray levels, the grid)
                passes += 1
                bar.reset()
                bar.set_description(f"{label}, pass {passes}")
            bar.update(done)

        learnt, summary = learn_modes_from_particles(
            table, reference, args.learnt_modes, args.basis, args.blocks, args.box,
            args.max_particles, args.seed, args.noise_std, args.prior_std,
            args.iterations, device, progress, args.reference or "ANM",
            noise_model=args.noise_model, stage=stage)
    output.parent.mkdir(parents=True, exist_ok=True)
    learnt.save(output)
    envelope = "" if summary["bfactor"] is None else (
        f", B envelope {summary['bfactor']:.1f} Å^2"
        + ("" if summary["bfactor_shells"] else " (not measurable; none fitted)"))
    print(f"gray levels: scale {summary['scale']:.4g}, offset {summary['offset']:.4g}, "
          f"noise std {summary['noise_std']:.4g} ({summary['fitting_passes']} fitting "
          f"pass(es)); noise model: {summary['noise_model']}{envelope}", file=sys.stderr)
    for k, (std, rigid) in enumerate(zip(summary["mode_std"], summary["rigid_fraction"])):
        print(f"learnt mode {k + 1}: particles' std {std:.3g} Å RMS, rigid part "
              f"{100 * rigid ** 2:.0f} % of its square norm")
    if "basis_evidence" in summary:
        print("fitting bases, how much the particles' spread explains (nats): " + ", ".join(
            f"{kind} {value:.1f}" for kind, value in summary["basis_evidence"].items()),
            file=sys.stderr)
    print(f"{summary['fitted_particles']} particles, {summary['basis']} -> "
          f"{output} ({learnt.n_modes} learnt mode{'s' * (learnt.n_modes > 1)}; "
          f"cryosvi train --reference {output})")
    if not summary["converged"]:
        warnings.warn("the PCA's optimiser stopped at its iteration limit", CryosviWarning)
