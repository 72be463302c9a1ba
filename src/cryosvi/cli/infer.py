"""``cryosvi infer``: the posterior of every particle under a trained run."""

from __future__ import annotations

import warnings
from pathlib import Path

from cryosvi.cli.common import (HelpFormatter, add_particle_source_arguments,
                                add_threads_argument, check_device, check_memory,
                                device_name, integer_between, number, seed_int)
from cryosvi.errors import CryosviError, CryosviWarning


def register(subparsers, summary: str) -> None:
    from cryosvi.inference.chunks import CHUNK_PARTICLES
    from cryosvi.inference.laplace_fit import LAPLACE_STARTS
    from cryosvi.inference.refine import METHODS
    from cryosvi.physics.noise import ERROR_WEIGHT

    parser = subparsers.add_parser(
        "infer", help=summary,
        description="Run the trained guide of a run on a particle STAR file (one batched "
        "network pass) and write the posterior: rlnAngleRot/Tilt/Psi (mean direction of "
        "the heaviest pose component), rlnDefocusU/V, cryosviModeAmplitude1..K (means) "
        "and cryosviPoseStdDeg, cryosviDefocusStd, cryosviModeAmplitudeStd1..K, with "
        "cryosviPoseRadius68Deg/95Deg (radii of the pose's 68 % and 95 % credible balls "
        "about the mean). Other "
        "columns of the input are kept; latents the run does not infer keep their input "
        "values. --importance S refines with the physics likelihood (by default: for "
        "a run that infers 1 or 2 mode amplitudes alone, poses and CTF given, exact "
        "grid quadrature; otherwise for data sets of SNR >= 15, Gauss-Newton to each "
        "posterior mode and importance sampling from the Laplace approximation there, "
        "tempered SMC for the particles where that fails; below, tempered SMC with 12 "
        "moves; adds cryosviESS, the effective sample size per particle, and "
        "cryosviRefinedBySMC). Every particle "
        "gets cryosviJunkProbability: the posterior probability that its image holds no "
        "molecule of this kind (empty ice, aggregates, contamination), from its evidence "
        "under the physics model against two null models (the noise alone; noise plus "
        "the particles' power without their structure), with the junk fraction fitted "
        "over the whole file (--max-junk writes only the particles below a limit). A "
        "particle's "
        "posterior depends only on it, the run, the settings and --seed, not on the "
        "other particles: --batch-size, --chunk-size, the device and the number of "
        "processes change it only by float rounding, which the refinement's Metropolis "
        "and Gauss-Newton decisions can turn into another Monte Carlo realisation "
        "(differences within the Monte Carlo error). "
        "Finished chunks of particles are kept in OUTPUT.partial/ until the STAR is "
        "written, so a stopped run continues with --resume. Several processes: "
        "'torchrun --standalone --nproc-per-node N -m -- cryosvi infer ...' (the '--' "
        "keeps torchrun from reading --run as its --run-path; each process takes a "
        "block of the chunks and a GPU of its own where there are GPUs; rank 0 writes "
        "the result and shows the whole run's progress).",
        formatter_class=HelpFormatter)
    parser.add_argument("--run", required=True, help="run directory from 'cryosvi train'")
    parser.add_argument("--particles", required=True,
                        help="particle file: RELION STAR (3.0 to 5) or cryoSPARC .cs")
    add_particle_source_arguments(parser)
    parser.add_argument("-o", "--output", required=True,
                        help="posterior STAR file (.star; never one of the inputs)")
    parser.add_argument("--samples", type=integer_between(0, 10**4), default=0,
                        help="posterior samples per particle to write to OUTPUT.npz "
                        "(with --importance: the proposals and their weights)")
    parser.add_argument("--importance", type=integer_between(0, 10**5), default=64,
                        help="samples per particle for the refinement with the physics "
                        "likelihood (0: the guide alone, one network pass)")
    parser.add_argument("--refine", choices=METHODS, default="auto",
                        help="with --importance: 'grid' integrates the mode amplitudes "
                        "on a grid (deterministic quadrature of the exact posterior) for a "
                        "run that infers them alone (train --latents modes, at most 2 "
                        "modes; cryosviESS is then the number of grid cells carrying the "
                        "mass); 'laplace' runs Gauss-Newton from the "
                        "guide's best draws to the posterior mode and importance-samples "
                        "its Laplace approximation, handing the particles where that "
                        "fails (a misfit 4 sigma above the noise's, ESS < S/4) to 'smc'; "
                        "'smc' tempers from the guide to the posterior with resample-move "
                        "steps; 'is' is plain importance sampling with the guide as "
                        "proposal; 'joint' (pose, CTF or shifts inferred with 1-2 modes) "
                        "runs the Laplace fit, searches the modes' profile with the other "
                        "latents refitted at each node, integrates the modes on a grid "
                        "with the others at their Laplace approximations and "
                        "importance-samples that, retrying from 16 starts and then handing "
                        "to 'smc' the particles where it fails; 'auto' takes 'grid' for "
                        "the amplitudes alone, else 'laplace' for data sets of SNR >= 15 "
                        "(estimated once from up to 2000 particles), 'joint' for one mode "
                        "inferred with the pose or CTF at SNR 0.75-15 (about 6x the "
                        "SMC's speed at SNR ~1, as accurate and calibrated), and 'smc' with at "
                        "least 12 moves otherwise")
    parser.add_argument("--moves", type=integer_between(1, 1000), default=3,
                        help="smc (and the fallback of laplace and joint): Metropolis "
                        "moves per tempering step, at least 1: without moves its resampled "
                        "samples collapse onto a few ('auto' uses at least 12 below SNR 15)")
    parser.add_argument("--starts", type=integer_between(1, 64), default=LAPLACE_STARTS,
                        help="laplace and joint (and auto, which takes them): "
                        "Gauss-Newton starts per particle from the guide's best draws")
    parser.add_argument("--max-junk", type=number(0.0, 1.0, low_open=True), default=None,
                        metavar="P",
                        help="write only the particles whose cryosviJunkProbability is "
                        "below P (STAR, .cs and samples; default: every particle)")
    parser.add_argument("--model-error", choices=("on", "off"), default="on",
                        help="for a run with a noise model (train --noise-model): before "
                        "the main pass, a first pass over up to 1000 particles chosen by "
                        "--seed measures the residual power the model leaves beyond the "
                        "noise, per optics group and shell (model error D), and the B "
                        "envelope from the per-shell gain; every particle is then inferred "
                        "with the noise spectrum S + k D (--model-error-weight), so the "
                        "intervals widen where the model misfits (on the model's own "
                        "simulations D ~ 0 and they stay as they were). Writes the "
                        "estimate to OUTPUT.model_error.json. 'off': the run's noise model "
                        "as trained. A run with white noise has none")
    parser.add_argument("--model-error-weight", type=number(0.0, 1000.0),
                        default=ERROR_WEIGHT, metavar="K",
                        help="k in the noise spectrum S + k D of --model-error: the larger, "
                        "the wider the intervals where the model misfits (default: "
                        "%(default)g, measured: see README)")
    parser.add_argument("--turns", type=int, choices=[1, 2, 4], default=1,
                        help="the guide's posterior as the mixture of its posteriors for "
                        "this many quarter turns of each image: more accurate means, "
                        "wider intervals (4: the guide alone's pose error -23 %%, its "
                        "95 %% intervals cover 0.97-0.99)")
    parser.add_argument("--batch-size", type=integer_between(1, 10**6), default=256,
                        help="particles per network pass (memory and speed; the results "
                        "depend on it by float rounding only, which the SMC can turn "
                        "into differences within the Monte Carlo error)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="seed of the particles' random numbers")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:N or auto (cuda where present, each "
                        "torchrun process its own GPU cuda:LOCAL_RANK; else cpu)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped inference whose finished chunks are in "
                        "OUTPUT.partial/ (same run, particles, settings and seed)")
    parser.add_argument("--chunk-size", type=integer_between(1, 10**7),
                        default=CHUNK_PARTICLES,
                        help="particles per chunk written to OUTPUT.partial/ as it "
                        "finishes (the most a crash loses, and the unit of work of a "
                        "process)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing outputs that an earlier 'cryosvi infer' wrote "
                        "(never other files), and start again over its OUTPUT.partial/")
    add_threads_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> None:
    from cryosvi.inference import distributed
    from cryosvi.inference.driver import infer

    args.device = infer_device(args.device)
    check_outputs(args)
    import torch

    ranks = distributed.start(torch.device(args.device))
    try:
        written = infer(args.run, args.particles, args.output, samples=args.samples,
                        importance=args.importance, method=args.refine, moves=args.moves,
                        starts=args.starts,
                        turns=args.turns, batch_size=args.batch_size,
                        device=args.device, progress=not args.quiet, datadir=args.datadir,
                        invert=args.invert, seed=args.seed, resume=args.resume,
                        force=args.force, chunk_size=args.chunk_size, ranks=ranks,
                        max_junk=args.max_junk, model_error=args.model_error == "on",
                        model_error_weight=args.model_error_weight,
                        table=False)
    finally:
        distributed.stop(ranks)
    if written is None:  # another rank wrote the result
        return
    for stale in args.stale:  # an earlier inference's, which this one does not replace
        stale.unlink(missing_ok=True)
    extra = ""
    if written.ess_median is not None:
        proposal = {"laplace": "the Laplace approximation",
                    "auto": "the Laplace approximation or (SMC) the guide"}.get(
                        args.refine, "the guide")
        extra = (f"; ESS of importance sampling from {proposal}: median "
                 f"{written.ess_median:.1f} of {args.importance}")
        if getattr(args, "grid", False):
            extra = f"; effective grid cells (cryosviESS): median {written.ess_median:.1f}"
    if written.refined_by_smc is not None:
        extra += f"; {written.refined_by_smc} particles refined by SMC instead"
    npz = f" and {args.samples} samples per particle to " \
          f"{samples_path(args.output)}" if args.samples else ""
    if "junk_fraction" in written.attrs:
        extra += f"; fitted junk fraction {written.attrs['junk_fraction']:.3f}"
    left = "" if args.max_junk is None else \
        f" (those with junk probability below {args.max_junk:g})"
    print(f"wrote the posterior of {written.particles} particles{left} to {args.output}"
          f"{npz}{extra}")
    if "model_error" in written.attrs:
        from cryosvi.inference.model_error import beside, summary_line

        print(f"{summary_line(written.attrs['model_error'])}; wrote {beside(args.output)}")


def infer_device(name: str) -> str:
    """The device of this process: 'auto' is this rank's GPU where CUDA is present (under
    torchrun cuda:LOCAL_RANK), else cpu; 'cuda' under torchrun is the rank's own GPU too;
    absent CUDA is a CryosviError (``check_device``)."""
    from cryosvi.inference import distributed

    checked = check_device(name)
    if name == "auto" or checked == "cuda":
        return distributed.auto_device()
    return checked


def samples_path(output: str | Path) -> Path:
    """Where ``infer`` writes the samples of ``--samples``: OUTPUT with suffix .npz."""
    return Path(output).with_suffix(".npz")


def check_outputs(args) -> None:
    """Before any work: the posterior STAR (and the samples .npz) may be written, replace
    no input and nothing cryosvi did not write (``cryosvi.io.outputs``), and the
    refinement's images in flight fit in memory."""
    from cryosvi.io.outputs import check_output_file, output_path
    from cryosvi.reference import Reference
    from cryosvi.rundir import REFERENCE_FILE, read_run, run_files

    output = output_path(args.output)
    if output.suffix.lower() != ".star":
        raise CryosviError(f"-o {output}: the posterior is a STAR file; give a name "
                           "ending in .star")
    from cryosvi.inference.grid import grid_dimension
    from cryosvi.inference.refine import check_refinement
    from cryosvi.rundir import guide_config

    config = guide_config(read_run(args.run), args.run)
    if args.importance:
        check_refinement(args.refine, config)
    elif args.refine != "auto":
        warnings.warn(f"--refine {args.refine} is not used with --importance 0 (the guide "
                      "alone)", CryosviWarning)
    args.grid = bool(args.importance) and args.refine in ("grid", "auto") \
        and grid_dimension(config.latents, config) is not None
    # The run's own files and the particles; a posterior written into the run folder
    # earlier is an output (replaced with --force when cryosvi wrote it).
    inputs = [args.particles, *run_files(args.run)]
    check_output_file(output, "posterior", args.force, inputs)
    check_work_folder(output, args.resume, args.force)
    if Path(args.particles).suffix.lower() == ".cs":  # infer writes a .cs beside the STAR
        check_output_file(output.with_suffix(".cs"), "posterior", args.force,
                          [*inputs, output], option="the .cs beside -o,")
    if args.samples:
        check_output_file(samples_path(output), "samples", args.force, [*inputs, output],
                          option="--samples to")
    reference = Reference.load(Path(args.run) / REFERENCE_FILE)
    if getattr(args, "model_error", "off") == "on" and reference.noise_model is not None:
        from cryosvi.inference.model_error import beside

        check_output_file(beside(output), "model error", args.force, [*inputs, output],
                          option="the model error beside -o,")
    check_memory(args.batch_size * max(args.importance, 1), reference.optics,
                 reference.imaging, args.device, "use a smaller --batch-size or --importance")
    args.stale = stale_side_files(output, args, reference.noise_model is not None)


def stale_side_files(output: Path, args, noise_model: bool) -> list[Path]:
    """An earlier inference's files beside OUTPUT that this one will not write (its .cs,
    samples .npz, model-error .json), to be removed once the new STAR is written: with
    --force; without it a CryosviError (they would describe other particles). Files
    cryosvi did not write are left alone."""
    from cryosvi.inference.model_error import beside
    from cryosvi.io.outputs import file_kind

    cs_input = Path(args.particles).suffix.lower() == ".cs"
    side_files = (  # (path, its kind, whether this inference writes it)
        (output.with_suffix(".cs"), "posterior", cs_input),
        (samples_path(output), "samples", bool(args.samples)),
        (beside(output), "model error",
         getattr(args, "model_error", "off") == "on" and noise_model))
    stale = [path for path, kind, made in side_files
             if not made and path.is_file() and file_kind(path) == kind]
    if stale and not args.force:
        raise CryosviError(f"{stale[0]} is left from an earlier inference into "
                           f"{output.name}; use --force to replace that inference (its "
                           "files are then removed)")
    return stale


def check_work_folder(output: Path, resume: bool, force: bool) -> None:
    """The work folder OUTPUT.partial: none, or an earlier inference's with --resume
    (the driver then checks that it is this one's) or --force; never a folder or file
    that 'cryosvi infer' did not make."""
    from cryosvi.inference.chunks import WorkFolder, work_folder_path

    work = WorkFolder(work_folder_path(output))
    if work.path.exists() or work.path.is_symlink():
        if not work.ours():
            raise CryosviError(f"{work.path} exists and is not a work folder of 'cryosvi "
                               "infer'; move it away or choose another output")
        if not (resume or force):
            raise CryosviError(f"{work.path} holds the finished chunks of an earlier "
                               "'cryosvi infer' that stopped: use --resume to continue "
                               "it or --force to start again")
