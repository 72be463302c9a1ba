"""The run directory of ``cryosvi train``: its file names, run.json, the checkpoint, and
the device a run works on.

    run.json        settings: latents, guide config, schedule, data, noise, seed, status
    reference.npz   the reference with the priors and noise std used for training
    checkpoint.pt   guide + optimizer + RNG states + position, written atomically per epoch
    log.jsonl       one JSON line per epoch (loss, lr, time, validation metrics)
    loss.png        the loss curve
    .cryosvi        the marker of a directory cryosvi made (``cryosvi.io.outputs``)

A run directory is data that users share, so loading one never runs code: the checkpoint
holds only tensors, numbers, strings, lists and dicts, and is read with
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler, which refuses any other
object); every RNG state is stored as tensors and numbers (format 2).
"""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import torch

from cryosvi.errors import CryosviError
from cryosvi.io.atomic import write_atomically
from cryosvi.io.outputs import MARKER

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.pt"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
REFERENCE_FILE = "reference.npz"
RUN_CONTENTS = (RUN_FILE, REFERENCE_FILE, CHECKPOINT, LOG_FILE, PLOT_FILE, MARKER)
"""The files of a run directory (what ``cryosvi train`` writes into it)."""
CHECKPOINT_FORMAT = 2
"""1: RNG states pickled as numpy/python objects (refused: loading them needs pickle);
2: every RNG state as tensors and numbers."""
POSITION_KEYS = ("stage", "stage_epoch", "epoch", "step", "seconds")


def run_files(directory: str | Path) -> list[Path]:
    """The run's own files in ``directory`` (``RUN_CONTENTS``): the inputs a command that
    reads the run must never replace. Other files there, e.g. a posterior that
    ``cryosvi infer`` wrote into the folder, are not the run's."""
    return [Path(directory) / name for name in RUN_CONTENTS]


# ------------------------------------------------------------------------- run.json
def read_run(directory: str | Path) -> dict:
    """``RUN/run.json`` as a dict with a ``guide`` dict; a directory without one is not a
    run, a file that is not such a JSON object is damaged (CryosviError)."""
    directory = Path(directory)
    path = directory / RUN_FILE
    if not directory.is_dir():
        raise CryosviError(f"run directory not found: {directory}")
    if not path.is_file():
        raise CryosviError(f"{directory} is not a cryosvi run (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CryosviError(f"{path} is damaged: {error}") from None
    if not isinstance(info, dict) or not isinstance(info.get("guide"), dict):
        raise CryosviError(f"{path} is damaged: no 'guide' settings")
    return info


def guide_config(info: dict, directory: str | Path):
    """The GuideConfig of a run's info, or CryosviError naming what is wrong."""
    from cryosvi.guide import GuideConfig

    try:
        return GuideConfig.from_dict(info["guide"])
    except (TypeError, ValueError, KeyError) as error:
        raise CryosviError(f"{Path(directory) / RUN_FILE} is damaged: bad 'guide' "
                           f"settings ({error})") from None


def write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text))


# ----------------------------------------------------------------------- checkpoint
TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container")
"""What torch.save's RuntimeError says when the file cannot be written (a full disk)."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts only) atomically; a
    failed write is an OSError, as any other file's."""
    def write(temporary: Path) -> None:
        try:
            torch.save(state, temporary)
        except RuntimeError as error:
            if not any(mark in str(error) for mark in TORCH_WRITE_FAILURES):
                raise
            raise OSError(errno.EIO, "writing a checkpoint failed (is the disk full?): "
                          + str(error).splitlines()[0], str(path)) from None

    write_atomically(path, write)


def load_checkpoint(path: str | Path, device="cpu") -> dict:
    """A checkpoint written by ``save_checkpoint``, read without running code.

    Raises CryosviError (one line) for a missing, empty, truncated or foreign file, and
    for one holding any object other than tensors and plain containers (which a pickle
    could use to run code): such a file is refused, never unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CryosviError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CryosviError(f"{path} holds objects other than tensors (from an older "
                           "cryosvi, or tampered with); refusing to load it, as that "
                           "could run code") from None
    except Exception as error:  # zip, EOF and torch errors of damaged files
        raise CryosviError(f"{path} is damaged or not a cryosvi checkpoint: "
                           f"{_first_line(error)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("guide"), dict):
        raise CryosviError(f"{path} is not a cryosvi checkpoint (no guide weights)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CryosviError(f"{path} has checkpoint format {state.get('format')!r}; this "
                           f"cryosvi reads format {CHECKPOINT_FORMAT} (train the run again)")
    position = state.get("position")
    if not isinstance(position, dict) or any(
            not isinstance(position.get(k), (int, float)) for k in POSITION_KEYS):
        raise CryosviError(f"{path} is damaged: no training position")
    return state


LEGACY_BUFFERS = ("prior_mode_std",)
"""Buffers of older guides whose values now live in run.json (``latent_priors``)."""


def load_weights(module: torch.nn.Module, weights: dict, path: str | Path) -> None:
    """``module.load_state_dict(weights)``, with one line for a mismatch."""
    weights = {k: v for k, v in weights.items() if k not in LEGACY_BUFFERS}
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as error:
        raise CryosviError(f"{path} does not fit this guide (another architecture or a "
                           f"damaged file): {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def load_trained(directory: str | Path, device: str = "cpu"):
    """(run info, reference, guide in eval mode) of a run directory; the guide's trunk
    runs in the run's precision where ``device`` has it natively, else in fp32."""
    from cryosvi.guide import Guide, native_bf16
    from cryosvi.reference import Reference

    directory = Path(directory)
    info = read_run(directory)
    checkpoint = directory / CHECKPOINT
    if not checkpoint.is_file():
        raise CryosviError(f"{directory} has no {CHECKPOINT}: training has not finished an "
                           "epoch yet")
    reference = Reference.load(directory / REFERENCE_FILE)
    guide = Guide(guide_config(info, directory)).to(device)
    load_weights(guide, load_checkpoint(checkpoint, device)["guide"], checkpoint)
    guide.bf16 = info.get("precision") == "bf16" and native_bf16(torch.device(device))
    guide.eval()
    return info, reference, guide


# --------------------------------------------------------------------------- device
def select_device(device: str) -> torch.device:
    """The torch device for a --device value, with a clear error for a name torch does not
    know or CUDA asked for but absent."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise CryosviError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CryosviError(f"unsupported device {str(device)!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CryosviError(f"--device {device} was asked for but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CryosviError(f"--device {device}: there are only "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    return device
