"""``cryosvi train``: train the amortized posterior (the guide) for a particle set."""

from __future__ import annotations

import sys
import warnings

from cryosvi.cli.common import (HelpFormatter, add_particle_source_arguments,
                                add_structure_arguments, add_threads_argument,
                                check_device, check_memory, device_name,
                                integer_between, number, positive, positive_int,
                                seed_int)
from cryosvi.config import (ELBO_LR, GUIDE_TRAINING_BYTES_PER_PIXEL, LIMITS, PRECISIONS,
                            SIM_BATCH, SIM_EPOCH_SIZE, SIM_EPOCHS, SIM_LR)
from cryosvi.errors import CryosviError, CryosviWarning
from cryosvi.latents import BY_NAME, PAPER_SITES, names

def add_guide_arguments(parser) -> None:
    """The guide architecture options; defaults: ``cryosvi.guide.Architecture()``."""
    from cryosvi.guide import Architecture

    default = Architecture()
    group = parser.add_argument_group("guide architecture")
    group.add_argument("--channels", default=",".join(map(str, default.channels)),
                       help="channels of the three conv modules")
    group.add_argument("--hidden", type=integer_between(1, 65536), default=default.hidden,
                       help="width of the two hidden MLP layers of each latent")
    group.add_argument("--components", type=integer_between(1, 64),
                       default=default.n_components,
                       help="antipodal ProjectedNormal components of the pose posterior")
    group.add_argument("--no-conditioning", dest="conditioning", action="store_false",
                       default=default.conditioning,
                       help="independent encoders (the paper's); default feeds defocus "
                       "into the pose encoder and both into the mode encoder")
    group.add_argument("--phase-flip", action="store_true", default=default.phase_flip,
                       help="phase-flip the images by the CTF at the defocus before the "
                       "pose and mode encoders (needs --separate-encoders)")
    group.add_argument("--no-batch-norm", dest="batch_norm", action="store_false",
                       default=default.batch_norm,
                       help="no BatchNorm after the convolutions (the paper's trunk)")
    group.add_argument("--additive-conditioning", dest="gated_conditioning",
                       action="store_false", default=default.gated_conditioning,
                       help="earlier latents enter each head additively only (the paper's "
                       "layout; default: also multiplicatively, by a gate MLP)")
    trunk = group.add_mutually_exclusive_group()
    trunk.add_argument("--separate-encoders", dest="shared_trunk", action="store_false",
                       default=default.shared_trunk,
                       help="the paper's one conv trunk per latent (default: one shared "
                       "trunk, about 3x less convolution work)")
    trunk.add_argument("--shared-trunk", dest="shared_trunk", action="store_true",
                       help="one conv trunk for all latents, each keeping its MLP (the "
                       "default; accepted for older command lines)")


def add_reference_arguments(parser, required: bool = False) -> None:
    """--reference or --structure (one of them; ``required``: argparse insists) and how
    a reference is built from a structure (--chain, --stride, --beads, --sigma), as
    ``reference_from_args`` reads them."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--reference", help="reference.npz (e.g. from 'cryosvi simulate'; "
                        "default: none, give it or --structure)")
    source.add_argument("--structure", help="PDB/mmCIF file to build the reference from "
                        "(default: none, give it or --reference)")
    # Real particles: a bead per residue at its centre of mass fits RELION's all-atom
    # images better than every second C-alpha (benchmarks/realistic/README.md).
    add_structure_arguments(parser, stride=1, beads="residue")
    parser.add_argument("--sigma", type=positive, default=2.0,
                        help="with --structure: pseudo-atom Gaussian std, Å")


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "train", help=summary,
        description="Train the guide (one CNN encoder per latent) for the particles in a "
        "RELION STAR file. The default objective ('sim') trains on fresh simulations from "
        "the model, with the priors and optics of the particles and the reference; 'elbo' "
        "is the paper's SVI on the particles; 'sim+elbo' fine-tunes a simulation-trained "
        "guide on the particles. Latents left out of --latents are fixed to the values in "
        "the STAR file. Writes RUN/run.json, reference.npz, checkpoint.pt (every epoch), "
        "log.jsonl and loss.png. A run that never finished an epoch is started again by "
        "the same command; one that did needs --resume or --force. Data-parallel on "
        "several GPUs or CPU processes under torchrun: 'torchrun --standalone "
        "--nproc-per-node N -m cryosvi train ...' (NCCL on CUDA, each process on "
        "cuda:LOCAL_RANK; gloo on the CPU); --batch-size is then the sum over the "
        "processes and the run trains the parameters of one process with that batch, "
        "up to the order of floating-point sums.",
        formatter_class=HelpFormatter)
    parser.add_argument("--particles", help="particle file: RELION STAR (3.0 to 5) or "
                        "cryoSPARC .cs (default: none; required unless --resume)")
    add_particle_source_arguments(parser)
    add_reference_arguments(parser)
    parser.add_argument("--n-modes", type=positive_int, default=1,
                        help="with --structure: number of ANM modes")
    parser.add_argument("--mode-std", type=number(0.0, LIMITS["mode_std"][1], low_open=True),
                        default=2.0,
                        help="with --structure: prior std of each mode amplitude, Å")
    parser.add_argument("-o", "--output", required=True, help="run directory")
    parser.add_argument("--latents", default=",".join(names(PAPER_SITES)),
                        help=f"latents to infer, from {', '.join(BY_NAME)}; the others "
                        "are fixed to the particle file's values")
    parser.add_argument("--objective", choices=["sim", "elbo", "sim+elbo"],
                        default="sim", help="training objective")
    parser.add_argument("--epochs", type=integer_between(1, 10**6), default=SIM_EPOCHS,
                        help="epochs of the (first) stage; a simulation epoch is "
                        "--epoch-size fresh simulated particles whatever the number of "
                        "particles in the file, an ELBO epoch a pass over the particles")
    parser.add_argument("--finetune-epochs", type=integer_between(1, 10**6),
                        help="sim+elbo: ELBO epochs (default epochs/4)")
    parser.add_argument("--epoch-size", type=integer_between(1, 10**9),
                        help=f"simulated particles per 'sim' epoch (default: "
                        f"{SIM_EPOCH_SIZE}, whatever the number of particles)")
    parser.add_argument("--batch-size", type=integer_between(1, 10**6),
                        help=f"particles per step, summed over the processes under "
                        f"torchrun (default: {SIM_BATCH} for sim, 128 for elbo)")
    parser.add_argument("--lr", type=number(0.0, 10.0, low_open=True),
                        help=f"peak learning rate (default: {SIM_LR:g} for sim, "
                        f"{ELBO_LR:g} for elbo)")
    parser.add_argument("--schedule", help="staged schedule file (TOML/JSON), or 'paper' "
                        "for the bundled paper schedule; replaces --objective/--epochs "
                        "(default: one stage of --objective)")
    parser.add_argument("--init", metavar="RUN",
                        help="start from the guide of another run with the same "
                        "architecture (e.g. simulation pre-training, then --objective elbo; "
                        "default: random weights)")
    parser.add_argument("--noise-std", type=positive,
                        help="noise std of the particles, for images already in the "
                        "model's gray levels (default: the reference's, else the gray "
                        "levels and noise are estimated from the images)")
    add_noise_model_argument(parser, "The run keeps it; 'cryosvi infer' uses it")
    parser.add_argument("--box", type=integer_between(16, 4096),
                        help="working box, px (even): the particles are Fourier-cropped to "
                        "it (default: min(64, the particles' box))")
    parser.add_argument("--defocus-prior", choices=["auto", "particle", "dataset"],
                        default="auto",
                        help="'particle': defocus offsets around each particle's CTF "
                        "estimate (astigmatism and optics groups kept); 'dataset': one "
                        "defocus prior for the data set (the paper's); 'auto': 'particle' "
                        "when the file has estimates that are not a cryosvi simulation's "
                        "truth")
    parser.add_argument("--defocus-offset-std", type=number(0.0, LIMITS["defocus"][1],
                                                            low_open=True), default=500.0,
                        help="prior std of the defocus offset around the estimates, Å")
    parser.add_argument("--shift-std", type=number(0.0, 1e4, low_open=True), default=2.0,
                        help="prior std of inferred shifts around the file's, Å per axis")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="arithmetic of the conv trunk: 'auto' is bf16 where the device "
                        "has it in hardware (CUDA, CPUs with AVX512-BF16 or AMX; measured "
                        "1.4-1.9x faster training on such a CPU), else fp32")
    add_guide_arguments(parser)
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:N or auto: CUDA when present, else the CPU, "
                        "also on --resume; under torchrun each process takes "
                        "cuda:LOCAL_RANK")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in -o from its last checkpoint, with its "
                        "stored settings (other settings given with it are ignored, with a "
                        "warning; --particles, --datadir, --invert, --device, --threads and "
                        "--quiet are taken)")
    parser.add_argument("--force", action="store_true",
                        help="start over in an existing run directory (never in a directory "
                        "cryosvi did not make)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    stored = {}
    for action in parser._actions:  # (an option and its opposite share a destination)
        if action.option_strings and action.dest not in RESUME_OPTIONS:
            stored.setdefault(action.dest, (action.option_strings[-1],
                                            parser.get_default(action.dest)))
    parser.set_defaults(func=run, stored_settings=stored)


RESUME_OPTIONS = {"help", "output", "particles", "datadir", "invert", "device", "threads",
                  "quiet", "resume"}
"""What --resume takes from the command line; every other setting is the run's own."""


def add_noise_model_argument(parser, keeps: str) -> None:
    """--noise-model (``cryosvi.noise_data.NOISE_MODELS``)."""
    from cryosvi.noise_data import NOISE_MODELS

    parser.add_argument("--noise-model", choices=NOISE_MODELS, default="auto",
                        help="the noise of the likelihood (and of the training simulations): "
                        "'estimate' measures the particles' coloured noise spectrum per "
                        "optics group from the background around the molecule (for real "
                        "micrographs); 'white' is white noise of the noise std (the "
                        "paper's); 'reference' takes the reference's own noise model where "
                        "it has one ('cryosvi simulate' with --noise-spectrum, "
                        "--contrast-spread or --bfactor records its truth, 'cryosvi "
                        "learn-modes' its estimate), else white; 'auto': 'reference' when "
                        "the reference knows the noise (a cryosvi simulation, a learnt "
                        "reference) or --noise-std is given, else 'estimate'. " + keeps)


def architecture_from_args(args):
    """The guide architecture of the options of ``add_guide_arguments``."""
    from cryosvi.guide import Architecture

    if args.phase_flip and args.shared_trunk:
        raise CryosviError("--phase-flip needs --separate-encoders (a shared trunk sees one "
                           "image for all latents)")
    return Architecture(channels=parse_channels(args.channels), hidden=args.hidden,
                        n_components=args.components, conditioning=args.conditioning,
                        phase_flip=args.phase_flip, shared_trunk=args.shared_trunk,
                        batch_norm=args.batch_norm,
                        gated_conditioning=args.gated_conditioning)


def parse_channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise CryosviError(f"--channels must be integers separated by commas, got {text!r}") \
            from None
    if not 1 <= len(channels) <= 8 or min(channels) < 1 or max(channels) > 4096:
        raise CryosviError(f"--channels must be 1 to 8 integers from 1 to 4096, got {text!r}")
    return channels


def reference_from_args(args, particles: str):
    """The reference of --reference, or one built from --structure with the particles'
    optics."""
    from cryosvi.reference import Reference

    if args.reference:
        return Reference.load(args.reference)
    if not args.structure:
        raise CryosviError("give --reference reference.npz or --structure FILE")
    from cryosvi.config import PAPER_PRESET, Imaging, Noise, Priors
    from cryosvi.dataset import model_optics
    from cryosvi.io.particles import read_particles
    from cryosvi.reference import build_reference

    optics = model_optics(read_particles(particles, args.datadir))
    preset = PAPER_PRESET["imaging"]
    window = preset.window if (args.sigma == preset.sigma
                               and optics.pixel_size == PAPER_PRESET["optics"].pixel_size) \
        else None
    imaging = Imaging(sigma=args.sigma, window=window, pad_factor=preset.pad_factor)
    priors = Priors(mode_std=(args.mode_std,) * args.n_modes)
    return build_reference(args.structure, args.chain, args.stride, optics, imaging, priors,
                           Noise(snr=float("inf"), std=0.0), beads=args.beads)


def options_from_args(args):
    from cryosvi.latents import parse_latents
    from cryosvi.training.setup import TrainOptions
    from cryosvi.training.schedule import default_schedule, load_schedule

    try:
        latents = parse_latents(args.latents)
    except ValueError as error:
        raise CryosviError(f"--latents: {error}") from None
    if args.schedule:
        overrides = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size))
                     if v is not None}
        schedule = load_schedule(args.schedule, overrides)
    else:
        schedule = default_schedule(args.objective, args.epochs, args.lr, args.batch_size,
                                    args.finetune_epochs, args.epoch_size)
    return TrainOptions(latents=latents, schedule=schedule,
                        architecture=architecture_from_args(args), seed=args.seed,
                        device=args.device, noise_std=args.noise_std,
                        init_from=args.init, box=args.box, defocus_prior=args.defocus_prior,
                        priors={"defocus_offset_std": args.defocus_offset_std,
                                "shift_std": args.shift_std}, precision=args.precision,
                        noise_model=args.noise_model)


def run(args) -> None:
    import shlex

    from pathlib import Path

    from cryosvi.io.outputs import check_writable
    from cryosvi.training.distributed import process_group, rank_device
    from cryosvi.training.setup import check_run_output
    from cryosvi.training.loop import train

    command = shlex.join(["cryosvi", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else None
    args.device = rank_device(check_device(args.device))
    check_writable(args.output, directory=True)  # the run is written, resumed or not
    with process_group(args.device) as world:
        if args.resume:
            given = [option for dest, (option, default) in args.stored_settings.items()
                     if getattr(args, dest) != default]
            if given:  # e.g. the first command repeated with --resume: its own settings
                warnings.warn(f"--resume continues the run with its stored settings; "
                              f"{', '.join(given)} ignored (to change them, start a new "
                              "run with --force, or from this one with --init RUN)",
                              CryosviWarning)
            info = train(args.particles, None, args.output, resume=True,
                         progress=not args.quiet, device=args.device, command=command,
                         datadir=args.datadir, invert=args.invert)
            if info.get("already_finished"):
                if world.writes:
                    print(f"{args.output}/ has already finished its "
                          f"{info.get('epochs_done')} epoch(s); nothing to resume (to "
                          f"train on from it, start a new run with --init {args.output})")
                return
        else:
            if not args.particles:
                raise CryosviError("--particles is required (unless --resume)")
            options = options_from_args(args)
            check_run_output(Path(args.output), args.force, note=False)
            reference = reference_from_args(args, args.particles)
            validation = options.validation_size
            check_memory(max([s.batch_size for s in options.schedule] + [validation]),
                         reference.optics, reference.imaging, options.device,
                         "use a smaller --batch-size",
                         GUIDE_TRAINING_BYTES_PER_PIXEL * reference.optics.box**2)
            info = train(args.particles, reference, args.output, options,
                         force=args.force, progress=not args.quiet, command=command,
                         datadir=args.datadir, invert=args.invert)
    if world.writes:
        processes = f" on {world.size} processes" if world.size > 1 else ""
        print(f"trained {info['parameters']:,} guide parameters for "
              f"{info['epochs_done']} epoch(s){processes} in {info['train_seconds']:.0f} "
              f"s: {args.output}/ (status {info['status']})", file=sys.stdout)
