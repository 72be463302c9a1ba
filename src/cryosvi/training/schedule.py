"""Training schedules: stages (objective, epochs, learning rate and its decay, batch,
which encoders train), the defaults of ``cryosvi train`` and the bundled paper schedule
(``data/schedule_paper.toml``)."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path

from cryosvi.config import ELBO_LR, SIM_BATCH, SIM_EPOCH_SIZE, SIM_LR
from cryosvi.errors import CryosviError
from cryosvi.latents import BY_NAME, REGISTRY

OBJECTIVES = ("sim", "elbo")


@dataclass
class Stage:
    """One stage of a schedule.

    objective: 'sim' or 'elbo'. epochs: passes over the particles (elbo) or over
    ``epoch_size`` simulated particles (sim; default ``SIM_EPOCH_SIZE``, whatever the
    number of particles, set when the stage is made so that run.json records it).
    batch_size: particles per step, summed over the processes of a data-parallel run.
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
        if self.objective == "sim" and self.epoch_size is None:
            self.epoch_size = SIM_EPOCH_SIZE
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
        """Steps of an epoch: ``epoch_size`` simulations (sim) or a pass over the
        ``n_particles`` particles (elbo), in batches of ``batch_size``."""
        size = self.epoch_size if self.objective == "sim" else n_particles
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
    rates: ``SIM_LR`` for simulation, ``ELBO_LR`` for the ELBO (``cryosvi.config``);
    batches of ``SIM_BATCH`` and 128; a simulation epoch is ``epoch_size`` simulated
    particles (None: ``SIM_EPOCH_SIZE``), an ELBO epoch a pass over the particles.
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
