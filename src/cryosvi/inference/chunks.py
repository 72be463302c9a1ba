"""Inference over a particle file in chunks: shared out over processes, every finished
chunk written at once, resumable after a crash, assembled into one result.

The particles 0..N-1 form chunks of ``chunk_size`` (``CHUNK_PARTICLES``) consecutive
ones. Each process (``cryosvi.inference.distributed.Ranks``) takes a contiguous block of
the chunks not yet finished (``shard``) and writes each chunk, as it finishes, to the
work folder beside the output (``WorkFolder``: ``OUTPUT.partial/``, one .npz per chunk
with its STAR columns and samples, written atomically, and a manifest that fingerprints
the run, the particle file, the settings and the seed). A later run with the same
fingerprint (``--resume``) skips the finished chunks. Rank 0 assembles the chunks in
the particles' order (``assemble_columns``, ``write_samples``) and removes the folder.

Since a particle's posterior depends only on the particle, the run, the settings and
the seed (``cryosvi.inference.refine``), the result is the same for any batch size,
chunk size, number of processes, and however often the run was stopped and resumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from cryosvi import __version__
from cryosvi.errors import CryosviError
from cryosvi.inference.distributed import Ranks
from cryosvi.io.atomic import save_npz_atomically, write_atomically
from cryosvi.io.outputs import directory_kind, mark_directory, provenance

CHUNK_PARTICLES = 4096
"""Particles per chunk: the unit of work of a process and of what a crash can lose."""
WORK_KIND = "infer-work"
"""The ``.cryosvi`` marker kind of a work folder."""
MANIFEST = "manifest.json"
COLUMN, SAMPLE = "column.", "sample."
"""Prefixes of a chunk file's arrays: the STAR columns and the posterior samples."""


def chunk_ranges(n_particles: int, chunk_size: int = CHUNK_PARTICLES) -> list[range]:
    """The chunks of N particles: ranges of ``chunk_size`` consecutive indices (the last
    one shorter)."""
    return [range(start, min(start + chunk_size, n_particles))
            for start in range(0, n_particles, chunk_size)]


def shard(chunks: list[int], ranks: Ranks) -> list[int]:
    """This rank's share of ``chunks`` (chunk numbers in order): a contiguous block,
    the blocks of the ranks differing in length by at most one."""
    start = len(chunks) * ranks.rank // ranks.world
    stop = len(chunks) * (ranks.rank + 1) // ranks.world
    return chunks[start:stop]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def work_folder_path(output: str | Path) -> Path:
    """The work folder of the output file ``output``: ``OUTPUT.partial`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


class WorkFolder:
    """The chunk files of one inference and its manifest (see the module notes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def chunk_path(self, k: int) -> Path:
        return self.path / f"chunk-{k:06d}.npz"

    def manifest(self) -> dict | None:
        try:
            value = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def ours(self) -> bool:
        """Whether the folder exists and is a work folder of ``cryosvi infer``."""
        return self.path.is_dir() and directory_kind(self.path) == WORK_KIND

    def check(self, fingerprint: dict, resume: bool, force: bool) -> str:
        """What to do with the folder, decided before any work (every rank decides the
        same; nothing is changed): 'create' (none there), 'resume' (one of this
        inference, with ``resume``) or 'replace' (an earlier one, with ``force``).
        CryosviError for a folder of another inference with ``resume``, any folder
        without ``resume`` or ``force``, and anything cryosvi did not make there."""
        if not self.path.exists() and not self.path.is_symlink():
            return "create"
        if not self.ours():
            raise CryosviError(f"{self.path} exists and is not a work folder of 'cryosvi "
                               "infer'; move it away or choose another output")
        if resume:
            found = self.manifest()
            if found != fingerprint:
                raise CryosviError(f"{self.path} holds the chunks of another inference "
                                   f"({_difference(found, fingerprint)}); use --force to "
                                   "start again")
            return "resume"
        if force:
            return "replace"
        raise CryosviError(f"{self.path} holds the finished chunks of an earlier "
                           "'cryosvi infer' that stopped: use --resume to continue it or "
                           "--force to start again")

    def prepare(self, action: str, fingerprint: dict) -> None:
        """Carry out ``check``'s decision (rank 0 alone): a fresh folder with the
        manifest, or the existing one as it is."""
        if action == "resume":
            return
        if action == "replace":
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        mark_directory(self.path, WORK_KIND)
        text = json.dumps(fingerprint, indent=1) + "\n"
        write_atomically(self.path / MANIFEST, lambda temporary: temporary.write_text(text))

    def finished(self) -> set[int]:
        """The chunks whose files are there."""
        if not self.path.is_dir():
            return set()
        return {int(p.stem[6:]) for p in self.path.glob("chunk-*.npz")
                if p.stem[6:].isdigit()}

    def write(self, k: int, columns: dict[str, np.ndarray],
              samples: dict[str, np.ndarray]) -> None:
        """The results of chunk ``k`` (STAR columns (n,) and samples (n, S, ...)),
        atomically."""
        arrays = {**{COLUMN + c: v for c, v in columns.items()},
                  **{SAMPLE + s: v for s, v in samples.items()}}
        save_npz_atomically(self.chunk_path(k), **arrays,
                            cryosvi=np.array(json.dumps(provenance("infer-chunk"))))

    def read(self, k: int, prefix: str, names=None) -> dict[str, np.ndarray]:
        """The arrays of chunk ``k`` under ``prefix`` (COLUMN or SAMPLE), by name."""
        path = self.chunk_path(k)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name[len(prefix):]: data[name] for name in data.files
                        if name.startswith(prefix)
                        and (names is None or name[len(prefix):] in names)}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise CryosviError(f"{path} is damaged ({error}); delete it and run again "
                               "with --resume") from None

    def remove(self) -> None:
        if self.ours():
            shutil.rmtree(self.path)


def _difference(found: dict | None, expected: dict) -> str:
    """The first fingerprint entry that differs, in words."""
    if found is None:
        return "no readable manifest"
    for key in expected:
        if found.get(key) != expected[key]:
            return f"its {key} differ"
    return "its manifest differs"


def fingerprint(run_files: Iterable[Path], particles: Path, settings: dict) -> dict:
    """What a resumed inference must share with the one it continues: the run's files
    and the particle file (sha256 of their contents), the settings that change the
    results (and the chunk size, which fixes the chunk files), the cryosvi version."""
    return {"cryosvi": __version__, "kind": WORK_KIND,
            "run": {Path(p).name: file_digest(p) for p in run_files if Path(p).is_file()},
            "particles": {"name": Path(particles).name, "sha256": file_digest(particles)},
            "settings": settings}


# ----------------------------------------------------------------------- the work
def run_chunks(work: WorkFolder, chunks: list[range], to_do: list[int], ranks: Ranks,
               compute: Callable[[np.ndarray, Callable[[int], None]],
                                 tuple[dict, dict]],
               progress: bool = True) -> None:
    """Compute and write this rank's share (``shard``) of the chunks ``to_do`` (numbers
    into ``chunks``): ``compute(indices, advance)`` -> (STAR columns, samples) of the
    particles ``indices``, calling ``advance(n)`` as n more are done.

    The progress bar (particles, particles/s, time left) is rank 0's and shows the whole
    run: its own particles as they finish and the other ranks' chunks as their files
    appear."""
    mine = shard(to_do, ranks)
    others = set(to_do) - set(mine)
    bar = tqdm(total=sum(len(chunks[k]) for k in to_do), desc="inferring",
               unit="particle", smoothing=0.05, disable=not (progress and ranks.leader),
               leave=False)
    seen: set[int] = set()

    def advance(n: int) -> None:
        bar.update(n)
        if others and not bar.disable:
            arrived = (work.finished() & others) - seen
            seen.update(arrived)
            bar.update(sum(len(chunks[k]) for k in arrived))

    try:
        for k in mine:
            columns, samples = compute(np.asarray(chunks[k], dtype=np.int64), advance)
            work.write(k, columns, samples)
    finally:
        bar.close()


def assemble_columns(work: WorkFolder, n_chunks: int,
                     names=None) -> dict[str, np.ndarray]:
    """Every chunk's STAR columns (those in ``names`` alone; None: all), concatenated
    in the particles' order."""
    parts = [work.read(k, COLUMN, names) for k in range(n_chunks)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class ChunkColumns:
    """The STAR columns of any run of consecutive particles, from the chunk files that
    hold them (``read``): memory holds those particles' columns and one chunk's, never
    every particle's."""

    def __init__(self, work: WorkFolder, chunks: list[range], skip=()):
        self.work, self.skip = work, set(skip)
        self.starts = np.asarray([chunk.start for chunk in chunks], dtype=np.int64)
        self.cached: tuple[int, dict] | None = None

    def names(self) -> list[str]:
        """The columns, in the chunk files' order (``skip`` left out)."""
        return [name for name in self._chunk(0) if name not in self.skip]

    def _chunk(self, k: int) -> dict[str, np.ndarray]:
        if self.cached is None or self.cached[0] != k:  # a chunk shared by two runs
            self.cached = (k, self.work.read(k, COLUMN))
        return self.cached[1]

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """{column: (stop - start,)} of the particles start..stop-1."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        parts = []
        for k in range(first, last + 1):
            offset = int(self.starts[k])
            columns = self._chunk(k)
            parts.append({name: value[max(start - offset, 0):stop - offset]
                          for name, value in columns.items() if name not in self.skip})
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write_samples(path: Path, work: WorkFolder, chunks: list[range],
                  kind_entry: np.ndarray, keep: np.ndarray | None = None) -> None:
    """The samples of every chunk as one .npz (site -> (N, S, ...), in the particles'
    order; ``kind_entry``: the file's ``cryosvi`` provenance entry), written atomically
    and array by array in the .npy format (``np.lib.format``; what ``np.savez``
    writes): memory holds one chunk's array at a time, not the whole file. ``keep``
    (N,) bool: only those particles' rows (None: all)."""
    first = work.read(0, SAMPLE)
    total = sum(len(chunk) for chunk in chunks) if keep is None else int(keep.sum())

    def write(temporary: Path) -> None:
        with zipfile.ZipFile(temporary, "w", allowZip64=True) as archive:
            for name, array in first.items():
                shape = (total, *array.shape[1:])
                header = {"descr": np.lib.format.dtype_to_descr(array.dtype),
                          "fortran_order": False, "shape": shape}
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, header)
                    for k in range(len(chunks)):
                        part = work.read(k, SAMPLE, names={name})[name]
                        if keep is not None:
                            part = part[keep[chunks[k].start:chunks[k].stop]]
                        member.write(np.ascontiguousarray(part, array.dtype).tobytes())
            with archive.open("cryosvi.npy", "w") as member:
                np.lib.format.write_array(member, kind_entry)

    write_atomically(path, write)
