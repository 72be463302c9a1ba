"""Setting up a training run: its options, the particles read and prepared for it (the
reference at the working box, gray levels, the guide's configuration), starting from
another run's weights (--init), and the checks and restore of a resumed run."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from cryosvi.config import SIM_EPOCHS
from cryosvi.dataset import (ParticleData, estimate_levels, image_statistics,
                             priors_from_particles, uses_ctf_estimates, working_reference)
from cryosvi.noise_data import (estimate_noise_model, matched_noise_model,
                                resolve_noise_model)
from cryosvi.errors import CryosviError
from cryosvi.guide import Architecture, Guide, GuideConfig
from cryosvi.io.outputs import check_output_directory, directory_kind
from cryosvi.io.particles import read_particles
from cryosvi.latents import PAPER_SITES, guide_priors, known_values
from cryosvi.randomness import set_rng_state
from cryosvi.reference import Reference
from cryosvi.rundir import (CHECKPOINT, RUN_FILE, guide_config, load_checkpoint,
                            load_weights, read_run)
from cryosvi.training.schedule import Stage, default_schedule
from cryosvi.training.validation import VALIDATION_SIZE

PRIOR_OVERRIDES = {"defocus_offset_std": 500.0, "shift_std": 2.0}
"""The prior settings ``cryosvi train`` sets whatever the reference says (its
--defocus-offset-std and --shift-std defaults)."""
RUN_KIND = "run"


@dataclass
class TrainOptions:
    """What ``train`` needs besides the data: schedule and guide settings."""

    latents: tuple[str, ...] = PAPER_SITES
    schedule: list = field(default_factory=lambda: default_schedule("sim", SIM_EPOCHS,
                                                                     None, None))
    architecture: Architecture = field(default_factory=Architecture)
    seed: int = 0
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (CUDA when present); under torchrun a CUDA device is
    each process's cuda:LOCAL_RANK (``training.distributed.rank_device``)."""
    noise_std: float | None = None
    validation_size: int = VALIDATION_SIZE
    init_from: str | None = None
    box: int | None = None
    defocus_prior: str = "auto"
    priors: dict = field(default_factory=lambda: dict(PRIOR_OVERRIDES))
    """Fields of :class:`cryosvi.config.Priors` that replace the reference's (the
    command's prior options, e.g. defocus_offset_std and shift_std)."""
    noise_model: str = "auto"
    """The noise of the likelihood and of the simulations (``noise_data.NOISE_MODELS``);
    ``train`` resolves 'auto' (``noise_data.resolve_noise_model``) and records the result.
    The run keeps the noise model in its reference.npz: training simulations draw from
    it and ``cryosvi infer`` evaluates its likelihood."""
    precision: str = "auto"
    """The conv trunk's arithmetic (``cryosvi.config.PRECISIONS``): 'auto' is bf16 where
    the device has it natively (``Guide.bf16``), else fp32."""


def prepare(particles: str | Path, reference: Reference, options: TrainOptions,
            datadir: str | Path | None = None, invert: bool = False):
    """Read and check the particles (``cryosvi.io.read_particles``: STAR or .cs, stacks
    under ``datadir``, images times -1 when ``invert``) and set up the run: the reference
    at the working box (``options.box``, default min(64, the data's box)) with the priors
    and optics of the metadata, the gray levels and noise std (``options.noise_std``,
    else the reference's, else estimated from the particles: ``estimate_levels``), the
    guide config and the known values of fixed latents. Returns (particles, the
    particles as the model sees them (``dataset.ParticleData``), reference, config,
    known)."""
    table = read_particles(particles, datadir, invert)
    table.require("rlnImageName")
    estimates = uses_ctf_estimates(table, reference, options.defocus_prior)
    reference = working_reference(table, reference, options.box)
    reference = priors_from_particles(table, reference)
    reference = reference.with_settings(priors=replace(
        reference.priors, **{k: float(v) for k, v in options.priors.items()}))
    data = ParticleData(table, reference.optics.box, estimates)
    _, image_std = image_statistics(data, seed=options.seed)
    if not image_std > 0:
        raise CryosviError(f"{table.path}: the particle images are constant")
    choice = resolve_noise_model(options.noise_model, reference, options.noise_std)
    noise_std = options.noise_std or reference.noise.std
    if not noise_std > 0:
        levels = estimate_levels(data, reference, options.seed, options.device)
        reference = reference.with_settings(imaging=replace(
            reference.imaging, scale=levels.scale, offset=levels.offset))
        noise_std = levels.noise_std
    reference = reference.with_settings(noise=replace(reference.noise, std=float(noise_std)))
    if choice == "white":
        reference = reference.with_settings(noise_model=None)
    elif choice == "estimate":  # at the gray levels just set: its contrast is relative
        reference = reference.with_settings(noise_model=estimate_noise_model(
            data, reference, options.seed, options.device))
    else:  # the reference's own (e.g. a learnt reference's), for these particles' groups
        reference = matched_noise_model(data, reference)
    priors = reference.priors
    groups = {} if data.groups is None else {k: list(v) for k, v in
                                             data.groups._asdict().items()}
    config = GuideConfig(
        **asdict(options.architecture),
        box=reference.optics.box, n_modes=reference.n_modes, latents=tuple(options.latents),
        latent_priors=guide_priors(priors, estimates), ctf_estimates=estimates,
        estimate_mean=priors.defocus_mean, estimate_std=priors.defocus_std,
        input_scale=image_std, optics=asdict(reference.optics), groups=groups)
    known = known_values(table, [s for s in config.sites if s not in config.latents], config)
    return table, data, reference, config, known


def options_from_info(info: dict, directory: str | Path = "") -> TrainOptions:
    """The options a run was started with (run.json); CryosviError when it is damaged."""
    try:
        guide = info["guide"]
        config = guide_config(info, directory)
        options = TrainOptions(
            latents=tuple(guide["latents"]),
            schedule=[Stage(**_recorded_stage(s, info)) for s in info["schedule"]],
            architecture=config.architecture(),
            seed=int(info["seed"]), device=str(info["device"]),
            noise_std=float(info["noise_std"]),
            validation_size=int(info.get("validation_size", VALIDATION_SIZE)),
            init_from=info.get("init_from"), box=int(guide["box"]),
            defocus_prior="particle" if config.ctf_estimates else "dataset",
            priors=dict(info["priors"]) if "priors" in info else _legacy_priors(guide),
            precision=str(info.get("precision", "fp32")),  # fp32 before the field
            noise_model=str(info.get("noise_model", "reference")))
    except (KeyError, TypeError, ValueError) as error:
        raise CryosviError(f"{Path(directory) / RUN_FILE} is damaged: missing or bad "
                           f"{error}") from None
    if not (options.noise_std > 0 and math.isfinite(options.noise_std)):
        raise CryosviError(f"{Path(directory) / RUN_FILE} is damaged: noise_std "
                           f"{options.noise_std}")
    return options


def _recorded_stage(stage: dict, info: dict) -> dict:
    """A stage as run.json records it; a simulation stage without an epoch size is from
    a run.json written when a simulation epoch was one draw per particle (cryosvi 0.1.0
    before ``SIM_EPOCH_SIZE``), so it keeps that size on --resume."""
    if stage.get("objective", "sim") == "sim" and stage.get("epoch_size") is None:
        return {**stage, "epoch_size": int(info["n_particles"])}
    return stage


def _legacy_priors(guide: dict) -> dict:
    """The prior options of a run.json written before it recorded them (the guide
    settings held them)."""
    offset = guide.get("defocus_offset")
    return {"defocus_offset_std": float(guide["defocus_std"]) if offset
            else PRIOR_OVERRIDES["defocus_offset_std"],
            "shift_std": float(guide.get("shift_std", PRIOR_OVERRIDES["shift_std"]))}


INIT_KEEPS = ("latent_priors", "input_scale")
"""Guide settings taken from the run given to --init (the output parameterisation)."""


def initialise_from(guide: Guide, run: str | Path, device) -> None:
    """Start from the guide weights of another run (e.g. simulation pre-training before
    ELBO fine-tuning); the architecture must be the same."""
    info = read_run(run)
    checkpoint = Path(run) / CHECKPOINT
    if not checkpoint.is_file():
        raise CryosviError(f"--init: {run} has no {CHECKPOINT}")
    theirs = guide_config(info, run)  # (defaults for keys older runs lack)
    keys = ("box", "n_modes", "latents", *(f.name for f in fields(Architecture)))
    different = [k for k in keys if getattr(guide.config, k) != getattr(theirs, k)]
    if different:
        raise CryosviError(f"--init: the guide of {run} differs in {', '.join(different)}")
    load_weights(guide, load_checkpoint(checkpoint, device)["guide"], checkpoint)


def check_run_output(output: Path, force: bool, note: bool = True) -> None:
    """Before any work: may a new run be started in ``output``? Yes if it is absent or
    empty, or a run that never finished an epoch (killed before its first checkpoint: the
    same command starts it again); with ``force`` if it is a cryosvi run; never if it is
    a directory cryosvi did not make."""
    if directory_kind(output) == RUN_KIND and not (output / CHECKPOINT).exists():
        if note:
            print(f"note: {output} holds a run that never finished an epoch; starting it "
                  "again", file=sys.stderr)
        return
    try:
        check_output_directory(output, RUN_KIND, force)
    except CryosviError as error:
        if "--force" in str(error) and directory_kind(output) == RUN_KIND:
            raise CryosviError(f"{output} already holds a run; use --resume to continue it "
                               "or --force to start over") from None
        raise


def restore(path: Path, state: dict, guide: Guide, optimizer, device) -> None:
    """Guide, optimizer and RNG states of a checkpoint (``load_checkpoint``'s dict)."""
    load_weights(guide, state["guide"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.state.values():  # the loaded state follows the device
            for key, value in group.items():
                if torch.is_tensor(value):
                    group[key] = value.to(device)
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise CryosviError(f"{path} is damaged: bad optimizer or RNG state "
                           f"({type(error).__name__}: {error})") from None
