"""Training the guide: objectives, staged schedules, checkpoints, resume, logs.

Objectives (a schedule is a list of stages, each with one objective):

* ``sim`` -- simulation-based training (neural posterior estimation). Every step draws
  fresh (latents, image) pairs from the model itself (``simulate.sample_prior`` plus white
  noise of the run's noise std) and minimises ``-log q(z_true | x)``, the forward KL from
  the model's joint to the guide. It is mass-covering, cannot fall into pose local minima
  and never runs out of data; only the priors, optics and noise level come from the
  particles.
* ``elbo`` -- the paper's objective: ``Trace_ELBO`` on the particles with ClippedAdam
  (``pyro.optim.clipped_adam.ClippedAdam``, the optimizer ``pyro.optim.ClippedAdam``
  wraps; one instance over all guide parameters is the same update as ``SVI.step``).
  The loss is reported per particle (the full-data ELBO divided by the number of
  particles). Sites without reparameterised samples get Pyro's score-function term.
* ``sim`` then ``elbo``: pre-training by simulation, fine-tuning on the particles.

Each stage lists the encoders it trains; the others are frozen (the paper's staged
schedule, ``data/schedule_paper.toml``).

The run directory (``RUN/``: run.json, reference.npz, checkpoint.pt, log.jsonl,
loss.png) and its checkpoint are described in ``cryosvi.rundir``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from tqdm.auto import tqdm

from cryosvi import __version__
from cryosvi.config import ELBO_LR, SIM_BATCH, SIM_EPOCHS, SIM_LR
from cryosvi.errors import CryosviError
from cryosvi.dataset import check_compatible, image_statistics, priors_from_particles
from cryosvi.guide import Architecture, Guide, GuideConfig, trunk_bf16
from cryosvi.io.atomic import write_atomically
from cryosvi.io.outputs import check_output_directory, directory_kind, mark_directory
from cryosvi.io.particles import read_particles
from cryosvi.latents import (BY_NAME, PAPER_SITES, REGISTRY, Conditions, forward_inputs,
                             known_values, names)
from cryosvi.model import model
from cryosvi.reference import Reference
from cryosvi.randomness import preserved_rng, rng_state, set_rng_state
from cryosvi.rundir import (CHECKPOINT, CHECKPOINT_FORMAT, LOG_FILE, PLOT_FILE,
                            REFERENCE_FILE, RUN_FILE, guide_config, load_checkpoint,
                            load_weights, read_run, save_checkpoint, select_device,
                            write_json_atomic)

OBJECTIVES = ("sim", "elbo")
VALIDATION_SIZE = 512


class TrainingDiverged(CryosviError):
    """The loss or a gradient became NaN/Inf."""


# ---------------------------------------------------------------------------- schedule
@dataclass
class Stage:
    """One stage of a schedule.

    objective: 'sim' or 'elbo'. epochs: passes over the particles (elbo) or over
    ``epoch_size`` simulated particles (sim; default: the number of particles).
    train: CLI latent names (``cryosvi.latents``: 'pose', 'defocus', ...) whose encoders are optimised in
    this stage (None: all inferred ones). lr: peak learning rate; decay: 'constant' or
    'cosine' (to lr * final_lr_fraction over the stage), after ``warmup`` linear steps.
    antithetic: sim only, half of each batch are antithetic twins of the other half
    (``simulation_batch``).
    """

    objective: str = "sim"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    train: tuple[str, ...] | None = None
    decay: str = "cosine"
    final_lr_fraction: float = 0.01
    warmup: int = 0
    epoch_size: int | None = None
    name: str = ""
    antithetic: bool = False

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise CryosviError(f"schedule: unknown objective {self.objective!r} "
                               f"(choose from {', '.join(OBJECTIVES)})")
        if self.decay not in ("constant", "cosine"):
            raise CryosviError(f"schedule: unknown decay {self.decay!r} (constant or cosine)")
        if not isinstance(self.antithetic, bool):
            raise CryosviError(f"schedule: antithetic must be true or false, got "
                               f"{self.antithetic!r}")
        for name, low in (("epochs", 0), ("batch_size", 1), ("warmup", 0),
                          ("epoch_size", 1)):
            value = getattr(self, name)
            if (value is not None or name != "epoch_size") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < low
                    or value > 10**9):
                raise CryosviError(f"schedule: {name} must be an integer from {low} to "
                                   f"10^9, got {value!r}")
        for name, low, high in (("lr", 0.0, 10.0), ("final_lr_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not low < value <= high:
                raise CryosviError(f"schedule: {name} must be a number in ({low:g}, "
                                   f"{high:g}], got {value!r}")
        if not isinstance(self.name, str):
            raise CryosviError(f"schedule: name must be a string, got {self.name!r}")
        if self.train is not None:
            if isinstance(self.train, str) or not isinstance(self.train, (list, tuple)):
                raise CryosviError(f"schedule: 'train' must be a list of latent names, got "
                                   f"{self.train!r}")
            self.train = tuple(self.train)
            unknown = [n for n in self.train if n not in BY_NAME]
            if unknown:
                raise CryosviError(f"schedule: unknown latent(s) {', '.join(unknown)} in "
                                   f"'train' (choose from {', '.join(BY_NAME)})")

    def trained_sites(self, latents: tuple[str, ...]) -> tuple[str, ...]:
        if self.train is None:
            return latents
        return tuple(s for s in latents if REGISTRY[s].name in self.train)

    def steps_per_epoch(self, n_particles: int) -> int:
        size = self.epoch_size or n_particles if self.objective == "sim" else n_particles
        return max(1, math.ceil(size / self.batch_size))

    def lr_at(self, step: int, total: int) -> float:
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant" or total <= 1:
            return self.lr
        progress = (step - self.warmup) / max(1, total - self.warmup)
        floor = self.final_lr_fraction
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


PAPER_SCHEDULE = "paper"


def load_schedule(path: str | Path, overrides: dict | None = None) -> list[Stage]:
    """Stages from a TOML (or JSON) file: ``[defaults]`` then ``[[stage]]`` tables.
    ``path='paper'`` is the bundled ``data/schedule_paper.toml``. ``overrides`` (e.g.
    {'lr': ...} from the command line) replace the file's values in every stage."""
    if str(path) == PAPER_SCHEDULE:
        text = (files("cryosvi") / "data" / "schedule_paper.toml").read_text()
        name = "schedule_paper.toml"
    else:
        path = Path(path)
        if not path.is_file():
            raise CryosviError(f"schedule file not found: {path}")
        try:
            text, name = path.read_text(), str(path)
        except (OSError, UnicodeDecodeError) as error:
            raise CryosviError(f"cannot read schedule {path}: {error}") from None
    try:
        data = json.loads(text) if name.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise CryosviError(f"cannot read schedule {name}: {error}") from None
    if not isinstance(data, dict):
        raise CryosviError(f"schedule {name}: not a table of [defaults] and [[stage]]")
    defaults = data.get("defaults", {})
    stages = data.get("stage", data.get("stages"))
    if not stages:
        raise CryosviError(f"schedule {name}: no [[stage]] tables")
    if not isinstance(defaults, dict) or not isinstance(stages, list) or \
            not all(isinstance(entry, dict) for entry in stages):
        raise CryosviError(f"schedule {name}: [defaults] must be a table and [[stage]] a "
                           "list of tables")
    fields = set(Stage.__dataclass_fields__)
    out = []
    for i, entry in enumerate(stages):
        values = {**defaults, **entry, **(overrides or {})}
        unknown = set(values) - fields
        if unknown:
            raise CryosviError(f"schedule {name}: stage {i + 1} has unknown key(s) "
                               f"{', '.join(sorted(unknown))}")
        out.append(Stage(**values))
    return out


FROZEN_NORM_FRACTION = 0.1
"""The last tenth of each stage's epochs (none below 10) trains with the guide's
BatchNorm statistics frozen (``Guide.freeze_batch_norm``)."""


def default_schedule(objective: str, epochs: int, lr: float | None, batch_size: int | None,
                     finetune_epochs: int = 0, epoch_size: int | None = None) -> list[Stage]:
    """One stage per objective: 'sim', 'elbo' or 'sim+elbo'. Default peak learning
    rates: ``SIM_LR`` for simulation, ``ELBO_LR`` for the ELBO (``cryosvi.config``).
    Simulation batches are antithetic pairs (``simulation_batch``; measured on the paper
    preset, 160 epochs: the mode head learns from the 10th epoch instead of the 80th or
    never, guide-alone mode r 0.81 against 0 and 0.73 in two runs without;
    benchmarks/results/ablations.md)."""
    sim = Stage(objective="sim", epochs=epochs, lr=lr or SIM_LR,
                batch_size=batch_size or SIM_BATCH,
                decay="cosine", warmup=50, epoch_size=epoch_size, name="simulation",
                antithetic=True)
    elbo = Stage(objective="elbo", epochs=epochs, lr=lr or ELBO_LR, batch_size=batch_size or 128,
                 decay="constant", name="elbo")
    if objective == "sim":
        return [sim]
    if objective == "elbo":
        return [elbo]
    if objective == "sim+elbo":
        return [sim, replace(elbo, epochs=finetune_epochs or max(1, epochs // 4),
                             lr=(lr or 1e-3) / 10, name="elbo fine-tuning")]
    raise CryosviError(f"unknown objective {objective!r} (sim, elbo or sim+elbo)")


# ------------------------------------------------------------------------ objectives
def simulation_batch(reference: Reference, forward, noise_std: float, batch_size: int,
                     conditions: Conditions | None = None, latents=PAPER_SITES,
                     antithetic: bool = False):
    """Fresh (latents, noisy images, conditions) from the model's prior, imaged with
    ``conditions`` (per-particle data for this batch, e.g. rows of the particles'
    metadata; returned as the images were made with them).

    antithetic: the second half of the batch are twins of the first: the latents that
    have a mirror image under their prior (``Latent.reflected``: the mode amplitudes)
    reflected, everything else (pose, defocus, conditions, noise) the same. Each image is
    still a draw from the model, so the loss keeps its expectation; the pair's difference
    is the reflected latents' effect alone (common random numbers), which the heads of
    weak latents otherwise see buried under pose and noise.
    """
    from cryosvi.simulate import sample_prior

    conditions = conditions or Conditions()
    twins = batch_size // 2 if antithetic else 0
    drawn = batch_size - twins
    if twins:  # the twins are imaged with their originals' conditions
        conditions = conditions.take(torch.arange(batch_size) % drawn)
    with torch.no_grad():
        values, clean = sample_prior(reference, forward, drawn,
                                     conditions.take(torch.arange(drawn)) if twins
                                     else conditions, latents)
        noise = noise_std * torch.randn_like(clean)
        if twins:
            twin = {}
            for site, value in values.items():
                mirror = REGISTRY[site].reflected(value[:twins])
                twin[site] = value[:twins] if mirror is None else mirror
            twin_clean = forward(**forward_inputs(twin, conditions.take(
                torch.arange(drawn, batch_size))))
            values = {s: torch.cat([values[s], twin[s]]) for s in values}
            clean = torch.cat([clean, twin_clean])
            noise = torch.cat([noise, noise[:twins]])
    return values, clean + noise, conditions


def simulation_loss(guide: Guide, latents: dict, images, sites,
                    conditions: Conditions | None = None) -> tuple[torch.Tensor, dict]:
    """Forward-KL loss -E log q(z_true | x) over ``sites``, each term times its latent's
    ``simulation_weight``; also the per-site terms (unweighted)."""
    log_q = guide.log_prob(images, latents, conditions)
    terms = {s: -log_q[s].mean() for s in sites}
    loss = sum(REGISTRY[s].simulation_weight * term for s, term in terms.items())
    return loss, {s: float(v.detach()) for s, v in terms.items()}


def elbo_loss(guide: Guide, forward, priors, noise_std: float, images, known: dict,
              n_particles: int, conditions: Conditions | None = None) -> torch.Tensor:
    """-ELBO per particle of a mini-batch (Trace_ELBO, subsampled plate)."""
    conditioned = poutine.condition(model, data=known) if known else model
    loss = Trace_ELBO().differentiable_loss(
        conditioned, guide.pyro_guide(known, register=False), forward, priors, noise_std,
        images=images, n_particles=n_particles, conditions=conditions,
        latents=guide.config.latents)
    return loss / n_particles


# ------------------------------------------------------------------------ validation
def validation_set(reference: Reference, forward, noise_std: float, seed: int, n: int,
                   conditions: Conditions | None = None, latents=PAPER_SITES):
    """A fixed simulated set for monitoring, drawn without touching the global RNG."""
    devices = [forward.coords.device] if forward.coords.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7_919)
        values, images, _ = simulation_batch(reference, forward, noise_std, n, conditions,
                                             latents)
        return values, images


def validation_metrics(guide: Guide, latents: dict, images, known_sites,
                       conditions: Conditions | None = None) -> dict:
    """Loss and point-estimate accuracy (each latent's ``validation``) on the simulated
    validation set."""
    from cryosvi.posterior import posterior_summary

    was_training = guide.training
    guide.eval()
    out = {}
    with torch.no_grad():
        log_q = guide.log_prob(images, latents, conditions)
        out["val_loss"] = float(-sum(v.mean() for v in log_q.values()))
        known = {s: latents[s] for s in known_sites}
        summary = posterior_summary(guide, images, known, n_samples=32,
                                    conditions=conditions)
    for site in guide.config.latents:
        out.update(REGISTRY[site].validation(summary, latents[site]))
    guide.train(was_training)
    return out


# ------------------------------------------------------------------------ training
@dataclass
class TrainOptions:
    """What ``train`` needs besides the data: schedule and guide settings."""

    latents: tuple[str, ...] = PAPER_SITES
    schedule: list = field(default_factory=lambda: default_schedule("sim", SIM_EPOCHS,
                                                                     None, None))
    architecture: Architecture = field(default_factory=Architecture)
    seed: int = 0
    device: str = "cpu"
    noise_std: float | None = None
    validation_size: int = VALIDATION_SIZE
    init_from: str | None = None
    box: int | None = None
    defocus_prior: str = "auto"
    defocus_offset_std: float = 500.0
    shift_std: float = 2.0
    precision: str = "auto"
    """The conv trunk's arithmetic (``cryosvi.config.PRECISIONS``): 'auto' is bf16 where
    the device has it natively (``Guide.bf16``), else fp32."""


DEFOCUS_PRIORS = ("auto", "particle", "dataset")
"""'particle': the defocus latent is an offset dz ~ N(0, defocus_offset_std) around each
particle's CTF estimate (U + dz, V + dz, angle kept) with every optics group's own
optics; 'dataset': one defocus per particle (U = V) with the data set's prior, the
paper's model; 'auto': 'particle' when the file has per-particle estimates and the
reference does not say they are a simulation's truth (``source['ctf_estimates']``
False: ``cryosvi simulate`` of the paper's model)."""
GRAY_LEVEL_IMAGES = 1000
"""Particles (and as many prior model images) the gray levels are estimated from."""


def uses_ctf_estimates(table, reference: Reference, defocus_prior: str) -> bool:
    """Whether a run uses the particles' CTF estimates (see ``DEFOCUS_PRIORS``)."""
    from cryosvi.dataset import has_ctf_estimates

    if defocus_prior not in DEFOCUS_PRIORS:
        raise CryosviError(f"unknown defocus prior {defocus_prior!r} (choose from "
                           f"{', '.join(DEFOCUS_PRIORS)})")
    if defocus_prior == "dataset":
        return False
    has = has_ctf_estimates(table)
    if defocus_prior == "particle" and not has:
        raise CryosviError(f"{table.path}: no per-particle CTF estimates (rlnDefocusU); "
                           "use --defocus-prior dataset")
    return has and (defocus_prior == "particle"
                    or bool(reference.source.get("ctf_estimates", True)))


def working_reference(table, reference: Reference, box: int | None) -> Reference:
    """The reference at the working box (``dataset.working_box``) and the cropped pixel
    size; a reference already there (a run's) is checked, one at the particles' own box
    and pixel size (``dataset.check_compatible``) is cropped."""
    from cryosvi.dataset import data_box, working_box, working_pixel_size

    box = working_box(table, box)
    pixel = working_pixel_size(table, box)
    if reference.optics.box == data_box(table) or reference.optics.box != box:
        check_compatible(table, reference)
    elif not math.isclose(reference.optics.pixel_size, pixel, rel_tol=1e-3):
        raise CryosviError(f"{table.path}: {pixel:.4g} Å pixels at the {box} px working box, "
                           f"but the run's are {reference.optics.pixel_size:.4g} Å")
    return reference.at_box(box, pixel)


def estimate_levels(data, reference: Reference, seed: int, device):
    """``cryosvi.graylevels.GrayLevels`` (scale, offset, noise std) of the particles (``cryosvi.graylevels``):
    up to GRAY_LEVEL_IMAGES particles against as many clean model images drawn from the
    prior with the conditions (CTF estimates, optics groups, shifts) of random particles
    of the data. No global random state is touched."""
    from cryosvi.graylevels import estimate_gray_levels, mask_radius
    from cryosvi.simulate import sample_prior

    unit = reference.with_settings(imaging=replace(reference.imaging, scale=1.0, offset=0.0))
    forward = unit.forward_model(data.groups).to(device)
    n = min(len(data), GRAY_LEVEL_IMAGES)
    generator = torch.Generator().manual_seed(seed + 104_729)
    rows = np.sort(torch.randperm(len(data), generator=generator)[:n].numpy())
    images = torch.from_numpy(data.images(rows))
    devices = [forward.coords.device] if forward.coords.is_cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 104_729)
        conditions = data.draw_conditions(max(n, 2), device, generator)
        _, clean = sample_prior(unit, forward, max(n, 2), conditions)
    radius = mask_radius(reference.coords, reference.optics.pixel_size, data.box)
    return estimate_gray_levels(images, clean.cpu(), radius)


def prepare(particles: str | Path, reference: Reference, options: TrainOptions,
            datadir: str | Path | None = None, invert: bool = False):
    """Read and check the particles (``cryosvi.io.read_particles``: STAR or .cs, stacks
    under ``datadir``, images times -1 when ``invert``) and set up the run: the reference
    at the working box (``options.box``, default min(64, the data's box)) with the priors
    and optics of the metadata, the gray levels and noise std (``options.noise_std``,
    else the reference's, else estimated from the particles: ``estimate_levels``), the
    guide config and the known values of fixed latents. Returns (particles, the
    particles as the model sees them (``latents.ParticleData``), reference, config,
    known)."""
    from cryosvi.latents import ParticleData

    table = read_particles(particles, datadir, invert)
    table.require("rlnImageName")
    estimates = uses_ctf_estimates(table, reference, options.defocus_prior)
    reference = working_reference(table, reference, options.box)
    reference = priors_from_particles(table, reference)
    reference = reference.with_settings(priors=replace(
        reference.priors, defocus_offset_std=float(options.defocus_offset_std),
        shift_std=float(options.shift_std)))
    data = ParticleData(table, reference.optics.box, estimates)
    _, image_std = image_statistics(data, seed=options.seed)
    if not image_std > 0:
        raise CryosviError(f"{table.path}: the particle images are constant")
    noise_std = options.noise_std or reference.noise.std
    if not noise_std > 0:
        levels = estimate_levels(data, reference, options.seed, options.device)
        reference = reference.with_settings(imaging=replace(
            reference.imaging, scale=levels.scale, offset=levels.offset))
        noise_std = levels.noise_std
    reference = reference.with_settings(noise=replace(reference.noise, std=float(noise_std)))
    priors = reference.priors
    groups = {} if data.groups is None else {k: list(v) for k, v in
                                             data.groups._asdict().items()}
    config = GuideConfig(
        **asdict(options.architecture),
        box=reference.optics.box, n_modes=reference.n_modes, latents=tuple(options.latents),
        defocus_mean=0.0 if estimates else priors.defocus_mean,
        defocus_std=priors.defocus_offset_std if estimates else priors.defocus_std,
        defocus_offset=estimates, estimate_mean=priors.defocus_mean,
        estimate_std=priors.defocus_std, mode_std=tuple(priors.mode_std),
        shift_std=priors.shift_std, input_scale=image_std,
        optics=asdict(reference.optics), groups=groups)
    known = known_values(table, [s for s in config.sites if s not in config.latents], config)
    return table, data, reference, config, known


@preserved_rng()
def train(particles: str | Path, reference: Reference | None, output: str | Path,
          options: TrainOptions | None = None, resume: bool = False, force: bool = False,
          max_epochs: int | None = None, progress: bool = True,
          device: str | None = None, command: str | None = None,
          datadir: str | Path | None = None, invert: bool = False) -> dict:
    """Train a guide on ``particles`` into the run directory ``output``.
    datadir, invert: where the stacks are and whether to negate the images (``prepare``;
    recorded in run.json, so ``resume`` needs neither again).

    resume: continue ``output`` from its checkpoint with its stored settings (the
    reference, options and schedule given here are then ignored; ``device`` may move it).
    max_epochs: stop after this many epochs in this call (the run can be resumed).
    command: the command line, recorded in run.json. Returns the final run info.
    """
    output = Path(output)
    if resume:
        info = read_run(output)
        if not (output / CHECKPOINT).is_file():
            raise CryosviError(f"{output} has no checkpoint to resume from (no epoch had "
                               "finished); start it again with the same command without "
                               "--resume")
        options = options_from_info(info, output)
        state = load_checkpoint(output / CHECKPOINT)  # damaged: fail before any work
        reference = Reference.load(output / REFERENCE_FILE)
        particles = info.get("particles") if particles is None else particles
        datadir = info.get("datadir") if datadir is None else datadir
        invert = invert or bool(info.get("invert", False))
        if not isinstance(particles, str):
            raise CryosviError(f"{output / RUN_FILE} is damaged: no 'particles'; give "
                               "--particles")
    else:
        options = options or TrainOptions()
        if reference is None:
            raise CryosviError("a reference is needed (--reference or --structure)")
        check_run_output(output, force)
    if device:
        options = replace(options, device=device)
    device = select_device(options.device)
    table, data, reference, config, known = prepare(particles, reference, options,
                                                    datadir, invert)
    if options.init_from:
        # Keep the initial run's output parameterisation, so its weights mean the same.
        theirs = read_run(options.init_from)["guide"]
        config = replace(config, **{k: (tuple(theirs[k]) if isinstance(theirs[k], list)
                                        else theirs[k])
                                    for k in INIT_KEEPS if k in theirs})
    now = json.loads(json.dumps(config.to_dict()))  # as run.json stores it
    if resume and now != info["guide"]:
        changed = [k for k, v in now.items() if info["guide"].get(k) != v]
        raise CryosviError(f"the particles differ from those the run was started with "
                           f"({', '.join(changed)} changed)")
    stages = options.schedule
    active = [s for s in stages if s.trained_sites(config.latents)]
    if not active:
        raise CryosviError("no schedule stage trains any of the inferred latents")
    n_particles = len(table)
    output.mkdir(parents=True, exist_ok=True)
    if directory_kind(output) is None:
        mark_directory(output, RUN_KIND)

    pyro.set_rng_seed(options.seed)
    guide = Guide(config).to(device)
    guide.bf16 = trunk_bf16(options.precision, device)
    forward = reference.forward_model(data.groups).to(device)
    optimizer = ClippedAdam(guide.parameters(), lr=active[0].lr)
    start = {"stage": 0, "stage_epoch": 0, "epoch": 0, "step": 0, "seconds": 0.0}
    if resume:
        restore(output / CHECKPOINT, state, guide, optimizer, device)
        start = state["position"]
        truncate_log(output / LOG_FILE, start["epoch"])
    else:
        if options.init_from:
            initialise_from(guide, options.init_from, device)
        for stale in (CHECKPOINT, LOG_FILE, PLOT_FILE):
            (output / stale).unlink(missing_ok=True)
        reference.save(output / REFERENCE_FILE)
    info = {
        "cryosvi": __version__, "particles": str(Path(particles).resolve()),
        "datadir": None if datadir is None else str(Path(datadir).resolve()),
        "invert": bool(invert),
        "n_particles": n_particles, "latents": list(config.latents),
        "guide": config.to_dict(), "parameters": guide.parameter_count(),
        "schedule": [asdict(s) for s in stages], "seed": options.seed,
        "device": str(device), "noise_std": reference.noise.std,
        "fixed_from_star": names(s for s in config.sites if s not in config.latents),
        "validation_size": options.validation_size, "status": "training",
        "precision": "bf16" if guide.bf16 else "fp32",
        "init_from": options.init_from,
        "command": (info["command"] if resume and "command" in info else command),
        "epochs_done": start["epoch"],
    }
    write_json_atomic(output / RUN_FILE, info)

    latents = config.latents
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(options.seed + 7_907)
        val_conditions = data.draw_conditions(options.validation_size, device)
    val_latents, val_images = validation_set(reference, forward, reference.noise.std,
                                             options.seed, options.validation_size,
                                             val_conditions, latents)
    fixed_sites = [s for s in config.sites if s not in config.latents]
    known_device = {s: v.to(device) for s, v in known.items()}
    position = dict(start)
    seconds = position["seconds"]
    epochs_this_call = 0
    for stage_index in range(start["stage"], len(stages)):
        stage = stages[stage_index]
        sites = stage.trained_sites(config.latents)
        first_epoch = start["stage_epoch"] if stage_index == start["stage"] else 0
        if not sites or first_epoch >= stage.epochs:
            continue
        for site, encoder in guide.encoders.items():
            encoder.requires_grad_(site in sites)
        steps = stage.steps_per_epoch(n_particles)
        total = steps * stage.epochs
        for stage_epoch in range(first_epoch, stage.epochs):
            if max_epochs is not None and epochs_this_call >= max_epochs:
                return finish(output, info, position, stopped=True)
            tic = time.perf_counter()
            guide.train()
            if stage_epoch >= stage.epochs - int(FROZEN_NORM_FRACTION * stage.epochs):
                guide.freeze_batch_norm()
            losses, terms_sum = [], {}
            order = np.random.default_rng([options.seed, position["epoch"]]).permutation(
                n_particles)
            bar = tqdm(range(steps), disable=not progress, leave=False, dynamic_ncols=True,
                       desc=f"epoch {position['epoch'] + 1} {stage.name or stage.objective}")
            for i in bar:
                lr = stage.lr_at(stage_epoch * steps + i, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if stage.objective == "sim":
                    # The data's own CTFs, optics groups and shifts, drawn with replacement.
                    conditions = data.draw_conditions(stage.batch_size, device)
                    values, batch_images, conditions = simulation_batch(
                        reference, forward, reference.noise.std, stage.batch_size,
                        conditions, latents, antithetic=stage.antithetic)
                    loss, terms = simulation_loss(guide, values, batch_images, sites,
                                                  conditions)
                else:
                    index = np.sort(order[i * stage.batch_size:(i + 1) * stage.batch_size])
                    batch_images = torch.from_numpy(data.images(index)).to(device)
                    batch_known = {s: v[index] for s, v in known_device.items()}
                    conditions = data.conditions.take(index).to(device)
                    loss = elbo_loss(guide, forward, reference.priors, reference.noise.std,
                                     batch_images, batch_known, n_particles, conditions)
                    terms = {}
                value = float(loss.detach())
                step = position["step"] + 1
                if not math.isfinite(value):
                    raise diverged(output, f"the loss is {value}", step, position)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = total_grad_norm(guide)
                if not math.isfinite(grad_norm):
                    raise diverged(output, f"a gradient is {grad_norm}", step, position)
                optimizer.step()
                position["step"] = step
                # logged unweighted (the forward KL), comparable with the validation's
                losses.append(sum(terms.values()) if terms else value)
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4g}",
                                refresh=False)
            bar.close()
            seconds += time.perf_counter() - tic
            metrics = validation_metrics(guide, val_latents, val_images, fixed_sites,
                                         val_conditions)
            position.update(stage=stage_index, stage_epoch=stage_epoch + 1,
                            epoch=position["epoch"] + 1, seconds=seconds)
            record = {"epoch": position["epoch"], "stage": stage_index,
                      "objective": stage.objective, "step": position["step"],
                      "loss": float(np.mean(losses)), "lr": lr,
                      "seconds": round(seconds, 2),
                      **{f"loss_{REGISTRY[k].name}": v / len(losses)
                         for k, v in terms_sum.items()},
                      **metrics, "loss_steps": chunk_means(losses, 20)}
            append_log(output / LOG_FILE, record)
            save_checkpoint(output / CHECKPOINT, {
                "guide": guide.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": rng_state(), "position": dict(position),
                "format": CHECKPOINT_FORMAT})
            info["epochs_done"] = position["epoch"]
            write_json_atomic(output / RUN_FILE, info)
            plot_log(output / LOG_FILE, output / PLOT_FILE)
            if progress:
                print(epoch_line(record), file=sys.stderr, flush=True)
            epochs_this_call += 1
    return finish(output, info, position, stopped=False)


INIT_KEEPS = ("defocus_mean", "defocus_std", "mode_std", "input_scale")
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


RUN_KIND = "run"


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


def finish(output: Path, info: dict, position: dict, stopped: bool) -> dict:
    info["status"] = "stopped" if stopped else "finished"
    info["epochs_done"] = position["epoch"]
    info["train_seconds"] = round(position["seconds"], 2)
    write_json_atomic(output / RUN_FILE, info)
    return info


def diverged(output: Path, what: str, step: int, position: dict) -> TrainingDiverged:
    kept = (f"{output / CHECKPOINT} keeps the last good state (epoch {position['epoch']})"
            if (output / CHECKPOINT).is_file() else "no epoch had finished, so there is no "
            "checkpoint")
    return TrainingDiverged(f"{what} at step {step}; training stopped. {kept}. Try a lower "
                            "--lr or a larger --batch-size.")


def total_grad_norm(module: torch.nn.Module) -> float:
    return float(torch.nn.utils.get_total_norm(
        [p.grad for p in module.parameters() if p.grad is not None]))


def chunk_means(values, n_chunks: int) -> list[float]:
    chunks = np.array_split(np.asarray(values, dtype=float), min(n_chunks, len(values)))
    return [round(float(c.mean()), 6) for c in chunks]


def epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']:>3}", f"{record['objective']:>4}",
             f"loss {record['loss']:.4g}", f"val {record.get('val_loss', float('nan')):.4g}"]
    for key, label in (latent.headline for latent in REGISTRY.values()):
        if key in record:
            parts.append(f"{label} {record[key]:.3f}")
    parts.append(f"{record['seconds']:.0f} s")
    return " | ".join(parts)


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, epochs: int) -> None:
    """Drop log lines of epochs after the checkpoint (written before a crash)."""
    text = "".join(json.dumps(r) + "\n" for r in read_log(path) if r["epoch"] <= epochs)
    write_atomically(path, lambda temporary: temporary.write_text(text))


def plot_log(log: Path, output: Path) -> None:
    """loss.png: training loss per step (chunk means) and validation loss per epoch,
    with the validation pose error on a second panel when it was measured."""
    from matplotlib.figure import Figure

    records = read_log(log)
    if not records:
        return
    has_pose = any("val_pose_median_deg" in r for r in records)
    figure = Figure(figsize=(10 if has_pose else 6, 4), layout="constrained")
    axes = figure.subplots(1, 2 if has_pose else 1, squeeze=False)
    ax = axes[0, 0]
    series = {objective: ([], []) for objective in OBJECTIVES}
    previous = 0
    for r in records:
        chunk = r.get("loss_steps", [r["loss"]])
        positions = np.linspace(previous, r["step"], len(chunk) + 1)[1:]
        series[r["objective"]][0].extend(positions)
        series[r["objective"]][1].extend(chunk)
        previous = r["step"]
    labels = {"sim": "training: simulation -log q(z | x)", "elbo": "training: -ELBO / particle"}
    axis_of = {"sim": ax, "elbo": ax}
    if series["sim"][0] and series["elbo"][0]:
        axis_of["elbo"] = ax.twinx()  # different scales: ELBO on the right axis
        axis_of["elbo"].set_ylabel("-ELBO / particle", color="C1")
    for colour, objective in (("C0", "sim"), ("C1", "elbo")):
        xs, ys = series[objective]
        if not xs:
            continue
        target = axis_of[objective]
        target.scatter(xs, ys, s=4, color=colour, label=labels[objective])
        finite = [y for y in ys if np.isfinite(y)]
        if finite:
            low, high = np.percentile(finite, [1, 99])
            pad = max(high - low, 1e-3 * max(abs(high), 1.0))
            target.set_ylim(low - 0.05 * pad, high + 0.1 * pad)
    validation = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in validation], [r["val_loss"] for r in validation], "k.-",
            label="validation (simulated) -log q(z | x)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles = [h for a in set(axis_of.values()) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8)
    if has_pose:
        ax = axes[0, 1]
        ax.semilogy([r["epoch"] for r in records],
                    [r.get("val_pose_median_deg", np.nan) for r in records], "k.-")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation pose median error (deg)")
    write_atomically(output, lambda temporary: figure.savefig(temporary, dpi=90))


def options_from_info(info: dict, directory: str | Path = "") -> TrainOptions:
    """The options a run was started with (run.json); CryosviError when it is damaged."""
    try:
        guide = info["guide"]
        options = TrainOptions(
            latents=tuple(guide["latents"]),
            schedule=[Stage(**s) for s in info["schedule"]],
            architecture=guide_config(info, directory).architecture(),
            seed=int(info["seed"]), device=str(info["device"]),
            noise_std=float(info["noise_std"]),
            validation_size=int(info.get("validation_size", VALIDATION_SIZE)),
            init_from=info.get("init_from"), box=int(guide["box"]),
            defocus_prior="particle" if guide.get("defocus_offset") else "dataset",
            defocus_offset_std=float(guide["defocus_std"]) if guide.get("defocus_offset")
            else TrainOptions.defocus_offset_std,
            shift_std=float(guide.get("shift_std", TrainOptions.shift_std)),
            precision=str(info.get("precision", "fp32")))  # fp32 before the field
    except (KeyError, TypeError, ValueError) as error:
        raise CryosviError(f"{Path(directory) / RUN_FILE} is damaged: missing or bad "
                           f"{error}") from None
    if not (options.noise_std > 0 and math.isfinite(options.noise_std)):
        raise CryosviError(f"{Path(directory) / RUN_FILE} is damaged: noise_std "
                           f"{options.noise_std}")
    return options
