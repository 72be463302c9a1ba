"""Argument types, checks and help format shared by the commands.

Every command validates its numbers once, before any work: the argparse types below
refuse what is not a finite number in range (argparse then exits with code 2 and one
``error:`` line), and ``check_device`` / ``check_memory`` / ``check_disk`` refuse a device
that is not there and sizes that do not fit, with a ``CryosviError``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from pathlib import Path

from cryosvi.config import Imaging, Optics, Priors, bytes_per_image, check
from cryosvi.errors import CryosviError

SEED_MAX = 2**31 - 1
"""Seeds are in [0, 2^31 - 1]: numpy and Pyro refuse negative ones, and the commands
derive a few further seeds by adding small offsets."""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, stated once: '(default: X)' unless the
    help already says 'default'; flags show 'on' or 'off'; nothing for required options
    or a default of None (such help states its default in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.required or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            on = action.default is not action.const
            return f"{text} (default: {'off' if on else 'on'})".strip()
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)".strip()


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           allow_inf: bool = False):
    """An argparse type: a float in [low, high] ((low, high] with ``low_open``), finite
    unless ``allow_inf`` (then +inf is accepted as well)."""
    bracket = "(" if low_open else "["

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if allow_inf and value == math.inf:
            return value
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ((low < value if low_open else low <= value) and value <= high):
            if high == math.inf:
                raise argparse.ArgumentTypeError(
                    f"must be {'>' if low_open else '>='} {low:g}, got {text}")
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low:g}, {high:g}], "
                                             f"got {text}")
        return value
    return parse


positive = number(0.0, low_open=True)
"""A finite float > 0, for argparse."""


def integer_between(minimum: int, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
        return value
    return parse


positive_int = integer_between(1)
"""An integer >= 1, for argparse."""
non_negative_int = integer_between(0)
"""An integer >= 0, for argparse."""
seed_int = integer_between(0, SEED_MAX)
"""A random seed, for argparse."""


def device_name(text: str) -> str:
    """A --device value, for argparse: cpu, cuda, cuda:N or auto (availability is checked
    by ``check_device`` when the command runs)."""
    name = text.strip().lower()
    if name in ("cpu", "cuda", "auto") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda, cuda:N or auto")


def check_device(name: str) -> str:
    """The device a command runs on: 'auto' becomes cuda when present, else cpu; CUDA asked
    for but absent is a CryosviError."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CryosviError(f"--device {name}: no CUDA device is available")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise CryosviError(f"--device {name}: there are only {torch.cuda.device_count()} "
                               "CUDA device(s)")
    return name


def add_threads_argument(parser) -> None:
    """--threads N: torch's CPU threads, set by ``cryosvi.cli.main`` before the command."""
    parser.add_argument("--threads", type=integer_between(1, 4096),
                        help="CPU threads for torch (default: torch's own choice)")


def add_structure_arguments(parser, stride: int, beads: str) -> None:
    """--chain, --stride and --beads (defaults ``stride``, ``beads``): which pseudo-atoms
    a structure gives (``cryosvi.physics.structure.load_pseudo_atoms``)."""
    from cryosvi.physics.structure import BEADS

    parser.add_argument("--chain", help="chain ID (default: first protein chain)")
    parser.add_argument("--stride", type=positive_int, default=stride,
                        help="keep every k-th residue")
    parser.add_argument("--beads", choices=BEADS, default=beads,
                        help="where each residue's pseudo-atom sits: 'ca' on its C-alpha "
                        "(the paper's model), 'residue' on the centre of mass of its heavy "
                        "atoms (closer to the all-atom density of real particles)")


def validate_settings(optics: Optics, imaging: Imaging, priors: Priors, noise=None) -> None:
    """Physical sanity of settings that argparse types cannot check alone
    (``config.check``)."""
    check(optics, imaging, priors, noise)


def memory_bytes(device: str) -> int:
    """Memory of the device: the GPU's, or the machine's physical memory."""
    if device.startswith("cuda"):
        import torch

        index = int(device[5:]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n_bytes: float) -> str:
    """A size for a message: GiB, or MiB below 1 GiB (never '0.0 GiB')."""
    if n_bytes < 2**30:
        return f"{n_bytes / 2**20:,.1f} MiB"
    return f"{n_bytes / 2**30:,.1f} GiB"


def check_memory(images: int, optics: Optics, imaging: Imaging, device: str,
                 advice: str, extra_per_image: int = 0) -> None:
    """Refuse a forward model of ``images`` images at once that needs more memory than
    the device has (an estimate, ``config.bytes_per_image``, plus ``extra_per_image``
    bytes each, e.g. a training step's guide)."""
    need = images * (bytes_per_image(optics, imaging) + extra_per_image)
    have = memory_bytes(device)
    if need > have:
        window = imaging.window or "default"
        raise CryosviError(f"{images} image(s) of {optics.box} px (window {window} px) at "
                           f"once would need about {gib(need)}, more than the {gib(have)} "
                           f"of {device}; {advice}")


def check_disk(path: str | Path, n_bytes: int) -> None:
    """Refuse to write ``n_bytes`` where the file system has less free space."""
    ancestor = Path(path).resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    free = shutil.disk_usage(ancestor).free
    if n_bytes > free:
        raise CryosviError(f"{path} would take {gib(n_bytes)} but {ancestor} has "
                           f"{gib(free)} free")


def add_particle_source_arguments(parser) -> None:
    """--datadir and --invert, for every command that reads particles
    (``cryosvi.io.read_particles``)."""
    parser.add_argument("--datadir", metavar="DIR",
                        help="folder holding the particle stacks named in the metadata "
                        "(default: the metadata file's folder)")
    parser.add_argument("--invert", action="store_true",
                        help="multiply the images by -1, for stacks in raw micrograph "
                        "contrast (protein dark; default: used as they are)")
