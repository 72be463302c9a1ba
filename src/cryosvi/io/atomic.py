"""Files written whole or not at all: written under a temporary name beside the target,
then renamed onto it (a rename within a directory is atomic), so a crash or Ctrl-C never
leaves a half-written STAR file, checkpoint, reference or plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary)`` and rename ``temporary`` onto ``path``. The temporary
    name keeps the suffix (writers such as numpy and matplotlib go by it)."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_npz_atomically(path: str | Path, **arrays) -> None:
    """``np.savez(path, **arrays)`` atomically, to exactly ``path`` (through a file
    handle: given a name, numpy would append .npz to it)."""
    import numpy as np

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    write_atomically(path, write)
