"""The ``cryosvi`` command: one subcommand per module in this package.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` to the function that runs it. Modules are imported only when needed so that
``cryosvi --help`` stays fast. A :class:`~cryosvi.errors.CryosviError` (a user mistake)
is printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import sys
import warnings
from contextlib import contextmanager

from cryosvi import __version__
from cryosvi.errors import CryosviError, CryosviWarning

COMMANDS = {
    "simulate": "simulate a particle stack from the forward model",
    "modes": "ANM normal modes of a structure",
    "learn-modes": "conformational modes learnt from particles of known pose",
    "train": "train the amortized posterior (guide) on particles",
    "infer": "posterior over pose, defocus and modes for each particle",
    "evaluate": "compare a posterior STAR file with the ground truth",
    "analyze": "landscape, atomic ensemble, particle subsets and maps from a posterior",
    "inspect": "what a particle file (STAR or .cs) holds, before a run",
    "bench": "time the forward model stage by stage",
    "demo": "simulate, train, infer and evaluate on the bundled 1OL5",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryosvi",
        description="Physics-aware amortized Bayesian inference of pose, CTF defocus "
        "and normal-mode conformation for single-particle cryo-EM.",
    )
    parser.add_argument("--version", action="version", version=f"cryosvi {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, summary in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(f"cryosvi.cli.{name.replace('-', '_')}")
            module.register(subparsers, summary)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


ALLOCATION_HEAVY = ("train", "infer", "demo")
"""Commands whose CPU training/inference loops allocate and free large tensors each step."""


def keep_freed_memory() -> None:
    """Let glibc serve large blocks from the heap and keep freed memory instead of
    returning it to the OS after every step. Training on CPU otherwise spends its time in
    page faults (measured: 6 700 -> 84 minor faults and 19 % less CPU per step of the
    demo's guide). Process-wide, so the command line (the program) sets it, never the
    library; a no-op outside Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD (glibc caps it at its maximum)
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _one_line_warning(command: str):
    """A ``warnings.showwarning`` that prints cryosvi's own warnings (about the user's
    input) as ``cryosvi CMD: warning: ...`` and others in Python's format."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CryosviWarning):
            print(f"cryosvi {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ALLOCATION_HEAVY:
        keep_freed_memory()
    try:
        with warnings.catch_warnings(), torch_threads(getattr(args, "threads", None)):
            warnings.showwarning = _one_line_warning(args.command)
            return args.func(args) or 0
    except CryosviError as error:
        print(f"cryosvi {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine's, not the code's: a full disk, a lost mount
        where = "".join(f" ({name})" for name in (error.filename, error.filename2) if name)
        print(f"cryosvi {args.command}: error: {error.strerror or error}{where}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cryosvi {args.command}: interrupted", file=sys.stderr)
        return 130


@contextmanager
def torch_threads(count: int | None):
    """torch's CPU threads set to ``count`` (--threads; None: unchanged) for the command,
    and put back afterwards, so that a caller of ``main`` in the same process (a script,
    a test) keeps its own."""
    if not count:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    sys.exit(main())
