"""The training loop of ``cryosvi train``: stages and epochs of optimisation steps, the
validation, log, checkpoint and run.json after each epoch, resume from a checkpoint.

Data-parallel under torchrun (``cryosvi.training.distributed``): a step's batch is the
global batch, every process draws all of its random numbers as one process does and
computes its own rows of it (``World.rows``); the gradients are averaged by
DistributedDataParallel with each process's loss weighted by its share of the batch, the
guide's BatchNorm layers use the whole batch's statistics (``SynchronisedBatchNorm``),
and rank 0 alone validates and writes. The parameters are then those of one process
with the same global batch, up to the order of floating-point sums (simulation; the
ELBO's draws from the guide are each process's own, so there only in distribution).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.optim.clipped_adam import ClippedAdam
from tqdm.auto import tqdm

from cryosvi import __version__
from cryosvi.dataset import ParticleData
from cryosvi.noise_data import resolve_noise_model
from cryosvi.errors import CryosviError
from cryosvi.guide import Guide, GuideConfig, trunk_bf16
from cryosvi.io.outputs import directory_kind, mark_directory
from cryosvi.latents import REGISTRY, names
from cryosvi.randomness import preserved_rng, rng_state
from cryosvi.reference import Reference
from cryosvi.rundir import (CHECKPOINT, CHECKPOINT_FORMAT, LOG_FILE, PLOT_FILE,
                            REFERENCE_FILE, RUN_FILE, load_checkpoint, load_trained,
                            read_run, save_checkpoint, select_device, write_json_atomic)
from cryosvi.training.distributed import (World, data_parallel, rank_device,
                                          synchronise_batch_norm)
from cryosvi.training.log import append_log, chunk_means, epoch_line, plot_log, truncate_log
from cryosvi.training.objectives import elbo_loss, simulation_batch, simulation_loss
from cryosvi.training.schedule import FROZEN_NORM_FRACTION, Stage
from cryosvi.training.setup import (INIT_KEEPS, RUN_KIND, TrainOptions, check_run_output,
                                    initialise_from, options_from_info, prepare, restore)
from cryosvi.training.validation import validation_metrics, validation_set


class TrainingDiverged(CryosviError):
    """The loss or a gradient became NaN/Inf."""


@dataclass
class Run:
    """What the epochs of one ``train`` call work with."""

    output: Path
    info: dict
    options: TrainOptions
    config: GuideConfig
    reference: Reference
    data: ParticleData
    known: dict
    guide: Guide
    forward: torch.nn.Module
    optimizer: ClippedAdam
    device: torch.device
    progress: bool
    validation: tuple = ()
    world: World = World()
    step: object = None
    """``f(loss) -> loss(guide)``, through DistributedDataParallel with several processes
    (``distributed.data_parallel``; made again for each stage's trained encoders)."""


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
    device: cpu, cuda, cuda:N or auto (CUDA when present); replaces ``options.device``.
    max_epochs: stop after this many epochs in this call (the run can be resumed).
    command: the command line, recorded in run.json. Returns the final run info (of a
    finished run resumed: its stored info, with 'already_finished', and nothing written).

    Inside a process group of several processes (``distributed.process_group``, under
    torchrun) every process calls this alike and trains its share of each batch; the
    options' batch sizes are global (summed over the processes), and rank 0 alone
    writes.
    """
    output = Path(output)
    world = World.current()
    info, state = None, None
    if resume:
        info, options, state, reference, source = _resumed(output, particles, datadir,
                                                           invert)
        if info.get("status") == "finished":  # nothing left to train
            load_trained(output)  # but a damaged run says so, as infer would
            return {**info, "already_finished": True}
        particles, datadir, invert = source
    else:
        options = options or TrainOptions()
        if reference is None:
            raise CryosviError("a reference is needed (--reference or --structure)")
        check_run_output(output, force, note=world.writes)
    if device:
        options = replace(options, device=device)
    device = select_device(rank_device(options.device, world))
    # 'auto' resolved, as run.json records them
    options = replace(options, device=str(device), noise_model=resolve_noise_model(
        options.noise_model, reference, options.noise_std))
    table, data, reference, config, known = prepare(particles, reference, options,
                                                    datadir, invert)
    config = _keep_init_parameterisation(config, options.init_from)
    if resume:
        _check_same_particles(config, info)
    active = [s for s in options.schedule if s.trained_sites(config.latents)]
    if not active:
        raise CryosviError("no schedule stage trains any of the inferred latents")
    _check_world(active, world)
    world.barrier()  # every process has checked its inputs before rank 0 writes
    if world.writes:
        output.mkdir(parents=True, exist_ok=True)
        if directory_kind(output) is None:
            mark_directory(output, RUN_KIND)

    pyro.set_rng_seed(options.seed)
    guide = Guide(config).to(device)
    guide.bf16 = trunk_bf16(options.precision, device)
    if world.size > 1:
        synchronise_batch_norm(guide)
    forward = reference.forward_model(data.groups).to(device)
    optimizer = ClippedAdam(guide.parameters(), lr=active[0].lr)
    run = Run(output, {}, options, config, reference, data, known, guide, forward,
              optimizer, device, progress and world.writes, world=world)
    start = _start(run, state)
    run.info = _run_info(run, particles, datadir, invert, len(table), start,
                         info["command"] if resume and "command" in info else command)
    if world.writes:
        write_json_atomic(output / RUN_FILE, run.info)
        run.validation = _validation(run)
    return _train_stages(run, start, max_epochs)


def _check_world(stages, world: World) -> None:
    """Each process needs at least one particle of every step's batch."""
    small = [s.batch_size for s in stages if s.batch_size < world.size]
    if small:
        raise CryosviError(f"a batch of {min(small)} particles cannot be shared by "
                           f"{world.size} processes: the batch size is the sum over the "
                           f"processes, give at least {world.size}")


def _resumed(output: Path, particles, datadir, invert):
    """(run.json, options, checkpoint, reference, (particles, datadir, invert)) of the
    run in ``output``, checked before any work; the arguments given replace the stored
    particles and datadir."""
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
    return info, options, state, reference, (particles, datadir, invert)


def _keep_init_parameterisation(config: GuideConfig, init_from: str | None) -> GuideConfig:
    """With --init, the initial run's output parameterisation (``INIT_KEEPS``), so that
    its weights mean the same."""
    if not init_from:
        return config
    theirs = GuideConfig.from_dict(read_run(init_from)["guide"])
    return replace(config, **{k: getattr(theirs, k) for k in INIT_KEEPS})


def _check_same_particles(config: GuideConfig, info: dict) -> None:
    now = json.loads(json.dumps(config.to_dict()))  # as run.json stores it
    if now != info["guide"]:
        changed = [k for k, v in now.items() if info["guide"].get(k) != v]
        raise CryosviError(f"the particles differ from those the run was started with "
                           f"({', '.join(changed)} changed)")


def _start(run: Run, state: dict | None) -> dict:
    """The position to start from: a resumed run's checkpoint (guide, optimizer and RNG
    restored, the log cut back to it), else a fresh run's beginning (--init's weights,
    stale files removed, the reference saved)."""
    output, writes = run.output, run.world.writes
    if state is not None:
        restore(output / CHECKPOINT, state, run.guide, run.optimizer, run.device)
        if writes:
            truncate_log(output / LOG_FILE, state["position"]["epoch"])
        return state["position"]
    if run.options.init_from:
        initialise_from(run.guide, run.options.init_from, run.device)
    if writes:
        for stale in (CHECKPOINT, LOG_FILE, PLOT_FILE):
            (output / stale).unlink(missing_ok=True)
        run.reference.save(output / REFERENCE_FILE)
    return {"stage": 0, "stage_epoch": 0, "epoch": 0, "step": 0, "seconds": 0.0}


def _run_info(run: Run, particles, datadir, invert: bool, n_particles: int, start: dict,
              command: str | None) -> dict:
    """run.json's contents."""
    config, options = run.config, run.options
    return {
        "cryosvi": __version__, "particles": str(Path(particles).resolve()),
        "datadir": None if datadir is None else str(Path(datadir).resolve()),
        "invert": bool(invert),
        "n_particles": n_particles, "latents": list(config.latents),
        "guide": config.to_dict(), "parameters": run.guide.parameter_count(),
        "schedule": [asdict(s) for s in options.schedule], "seed": options.seed,
        "priors": dict(options.priors),
        "device": str(run.device), "noise_std": run.reference.noise.std,
        "fixed_from_star": names(s for s in config.sites if s not in config.latents),
        "validation_size": options.validation_size, "status": "training",
        "precision": "bf16" if run.guide.bf16 else "fp32",
        "noise_model": options.noise_model,
        "init_from": options.init_from, "command": command,
        "epochs_done": start["epoch"], "processes": run.world.size,
    }


def _validation(run: Run) -> tuple:
    """(latents, images, conditions) of the run's fixed simulated validation set, drawn
    with the conditions of random particles, without touching the global RNG."""
    options, device = run.options, run.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(options.seed + 7_907)
        conditions = run.data.draw_conditions(options.validation_size, device)
    latents, images = validation_set(run.reference, run.forward, _noise(run.reference),
                                     options.seed, options.validation_size, conditions,
                                     run.config.latents)
    return latents, images, conditions


def _train_stages(run: Run, start: dict, max_epochs: int | None) -> dict:
    """Every epoch of every stage from ``start``; stops after ``max_epochs`` epochs of
    this call (a run to be resumed)."""
    position = dict(start)
    epochs_this_call = 0
    for stage_index in range(start["stage"], len(run.options.schedule)):
        stage = run.options.schedule[stage_index]
        sites = stage.trained_sites(run.config.latents)
        first_epoch = start["stage_epoch"] if stage_index == start["stage"] else 0
        if not sites or first_epoch >= stage.epochs:
            continue
        for site, encoder in run.guide.encoders.items():
            encoder.requires_grad_(site in sites)
        run.step = None  # (DDP's hooks on the previous stage's parameters go with it)
        run.step = data_parallel(run.guide, run.world)
        for stage_epoch in range(first_epoch, stage.epochs):
            if max_epochs is not None and epochs_this_call >= max_epochs:
                return finish(run.output, run.info, position, stopped=True,
                              write=run.world.writes)
            record = _train_epoch(run, stage, stage_index, stage_epoch, sites, position)
            _end_epoch(run, record, position)
            epochs_this_call += 1
    return finish(run.output, run.info, position, stopped=False, write=run.world.writes)


def _train_epoch(run: Run, stage: Stage, stage_index: int, stage_epoch: int, sites,
                 position: dict) -> dict:
    """One epoch's optimisation steps and validation; updates ``position`` and returns
    the epoch's log record."""
    tic = time.perf_counter()
    n_particles = len(run.data)
    run.guide.train()
    if stage_epoch >= stage.epochs - int(FROZEN_NORM_FRACTION * stage.epochs):
        run.guide.freeze_batch_norm()
    losses, terms_sum = [], {}
    order = np.random.default_rng([run.options.seed, position["epoch"]]).permutation(
        n_particles)
    steps = stage.steps_per_epoch(n_particles)
    bar = tqdm(range(steps), disable=not run.progress, leave=False, dynamic_ncols=True,
               desc=f"epoch {position['epoch'] + 1} {stage.name or stage.objective}")
    for i in bar:
        lr = stage.lr_at(stage_epoch * steps + i, steps * stage.epochs)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        batch = np.sort(order[i * stage.batch_size:(i + 1) * stage.batch_size])
        if stage.objective == "elbo" and len(batch) < run.world.size:
            continue  # an epoch's last few particles, fewer than the processes
        loss, value, terms = _global_loss(run, stage, sites, batch)
        _step(run, loss, value, position)
        # logged unweighted (the forward KL), comparable with the validation's
        losses.append(sum(terms.values()) if terms else value)
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4g}", refresh=False)
    bar.close()
    seconds = position["seconds"] + time.perf_counter() - tic
    metrics = _validate(run) if run.world.writes else {}
    position.update(stage=stage_index, stage_epoch=stage_epoch + 1,
                    epoch=position["epoch"] + 1, seconds=seconds)
    return {"epoch": position["epoch"], "stage": stage_index,
            "objective": stage.objective, "step": position["step"],
            "loss": float(np.mean(losses)), "lr": lr, "seconds": round(seconds, 2),
            **{f"loss_{REGISTRY[k].name}": v / len(losses) for k, v in terms_sum.items()},
            **metrics, "loss_steps": chunk_means(losses, 20)}


def _validate(run: Run) -> dict:
    """The validation metrics, with a random stream of their own (the same each epoch):
    the training's stream, which every process shares, is left as it was, so a run's
    simulations do not depend on where the validation's draws are made (CPU or CUDA) nor
    on which processes validate."""
    val_latents, val_images, val_conditions = run.validation
    fixed_sites = [s for s in run.config.sites if s not in run.config.latents]
    devices = list(range(torch.cuda.device_count())) if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(run.options.seed + 7_927)
        return validation_metrics(run.guide, val_latents, val_images, fixed_sites,
                                  val_conditions)


def _global_loss(run: Run, stage: Stage, sites,
                 batch: np.ndarray) -> tuple[torch.Tensor, float, dict]:
    """(the loss to differentiate, its value over the whole batch, the per-site terms
    over the whole batch) of one step. One process: ``_loss`` of the batch. Several:
    this process's rows of it, its loss weighted by W b_r / B (b_r of the B rows here,
    W processes), so that DDP's mean of the gradients is the whole batch's; the values
    are summed over the processes."""
    world = run.world
    size = stage.batch_size if stage.objective == "sim" else len(batch)
    rows = world.rows(size)
    loss, terms = run.step(lambda guide: _loss(run, stage, sites, batch, rows, guide))
    if world.size == 1:
        return loss, float(loss.detach()), terms
    share = (rows.stop - rows.start) / size
    names = list(terms)
    totals = world.sum([float(loss.detach()) * share, *(terms[k] * share for k in names)])
    return loss * (world.size * share), totals[0], dict(zip(names, totals[1:]))


def _loss(run: Run, stage: Stage, sites, batch: np.ndarray, rows: slice,
          guide: Guide) -> tuple[torch.Tensor, dict]:
    """The loss of the rows ``rows`` of one step's batch (the mean over them) and its
    per-site terms: on fresh simulations imaged with the data's own CTFs, optics groups
    and shifts (drawn with replacement; every random number of the whole batch is drawn,
    the forward model runs for ``rows``), or the ELBO on the particles ``batch[rows]``."""
    reference, device = run.reference, run.device
    if stage.objective == "sim":
        conditions = run.data.draw_conditions(stage.batch_size, device)
        values, images, conditions = simulation_batch(
            reference, run.forward, _noise(reference), stage.batch_size, conditions,
            run.config.latents, antithetic=stage.antithetic, rows=rows)
        return simulation_loss(guide, values, images, sites, conditions)
    batch = batch[rows]
    images = torch.from_numpy(run.data.images(batch)).to(device)
    known = {s: v[batch].to(device) for s, v in run.known.items()}
    conditions = run.data.conditions.take(batch).to(device)
    with _own_stream(run.world, device):
        loss = elbo_loss(guide, run.forward, reference.priors, _noise(reference),
                         images, known, len(run.data), conditions)
    return loss, {}


def _noise(reference):
    """What the model's measurement takes: the run's NoiseModel, else the white std."""
    return reference.noise.std if reference.noise_model is None else reference.noise_model


@contextmanager
def _own_stream(world: World, device: torch.device):
    """One process: nothing. Several: a random stream of this process's own for the
    body (the ELBO's draws from the guide for its own particles), seeded from one draw
    of the stream every process shares, which so stays the same on every process."""
    if world.size == 1:
        yield
        return
    seed = int(torch.randint(2**62, ()))
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + world.rank)
        yield


def _step(run: Run, loss: torch.Tensor, value: float, position: dict) -> None:
    """One optimiser step; TrainingDiverged for a non-finite loss ``value`` (the whole
    batch's, so every process stops alike) or gradient."""
    step = position["step"] + 1
    if not math.isfinite(value):
        raise diverged(run.output, f"the loss is {value}", step, position)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = total_grad_norm(run.guide)
    if not math.isfinite(grad_norm):
        raise diverged(run.output, f"a gradient is {grad_norm}", step, position)
    run.optimizer.step()
    position["step"] = step


def _end_epoch(run: Run, record: dict, position: dict) -> None:
    """The epoch's log line, checkpoint, run.json and plot, written as it ends (by rank
    0 alone)."""
    if not run.world.writes:
        return
    output = run.output
    append_log(output / LOG_FILE, record)
    save_checkpoint(output / CHECKPOINT, {
        "guide": run.guide.state_dict(), "optimizer": run.optimizer.state_dict(),
        "rng": rng_state(), "position": dict(position), "format": CHECKPOINT_FORMAT})
    run.info["epochs_done"] = position["epoch"]
    write_json_atomic(output / RUN_FILE, run.info)
    plot_log(output / LOG_FILE, output / PLOT_FILE)
    if run.progress:
        print(epoch_line(record), file=sys.stderr, flush=True)


def finish(output: Path, info: dict, position: dict, stopped: bool,
           write: bool = True) -> dict:
    """The final run info (status, epochs, time), written to run.json when ``write``."""
    info["status"] = "stopped" if stopped else "finished"
    info["epochs_done"] = position["epoch"]
    info["train_seconds"] = round(position["seconds"], 2)
    if write:
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
