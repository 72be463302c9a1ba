"""Particle stacks in MRC format: validated memory-mapped reading and streamed writing.

MRC2014 (https://www.ccpem.ac.uk/mrc_format/mrc2014.php): a 1024-byte header, an
extended header of ``nsymbt`` bytes, then nx * ny * nz values of the type ``mode`` says.
A stack is read only when the file holds exactly that many bytes: a float32 stack whose
header says mode 0 (int8) would otherwise be read as four times as many int8 images.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from cryosvi.errors import CryosviError

HEADER_BYTES = 1024
REAL_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
"""The MRC modes that hold real pixel values (3, 4: complex; 101: 4-bit)."""


class StackWriter:
    """A new float32 stack (n, box, box) written and re-read chunk by chunk.

    Positioned file I/O instead of a writable memory map: every page touched through a
    map stays in the process's resident set until the map is closed, so a 6.5 GB stack
    would need 6.5 GB of RAM. Here memory stays at one chunk.
    """

    def __init__(self, path: str | Path, n_images: int, box: int, pixel_size: float):
        self.path, self.box = Path(path), box
        # mrcfile writes a valid header and sizes the file; no data page is touched.
        with mrcfile.new_mmap(self.path, shape=(n_images, box, box), mrc_mode=2,
                              overwrite=True) as stack:
            stack.set_image_stack()
            stack.voxel_size = pixel_size
            self.data_offset = stack.header.nbytes + stack.extended_header.nbytes
            self.dtype = stack.data.dtype
        self.file = open(self.path, "r+b")

    def _offset(self, start: int) -> int:
        return self.data_offset + start * self.box * self.box * self.dtype.itemsize

    def write(self, start: int, images: np.ndarray) -> None:
        """Write images (b, box, box) at image index ``start``."""
        # The array's own buffer, not a bytes copy of it (see ``read``).
        view = memoryview(np.ascontiguousarray(images, self.dtype)).cast("B")
        offset, done = self._offset(start), 0
        while done < len(view):  # pwrite may write less than asked (signals, >2 GiB)
            done += os.pwrite(self.file.fileno(), view[done:], offset + done)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Images start..stop-1 as a (stop - start, box, box) array: ``out`` (a
        C-contiguous array of the stack's type and that shape, filled in place) or a new
        one. A buffer reused chunk after chunk keeps the process's memory flat: fresh
        chunk-sized allocations (bytes, copies) are what glibc's heap, once its mmap
        threshold has grown past a chunk, fragments into several times their size."""
        shape = (stop - start, self.box, self.box)
        if out is None:
            out = np.empty(shape, self.dtype)
        if out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of {shape}")
        view = memoryview(out).cast("B")
        offset, done = self._offset(start), 0
        while done < len(view):
            got = os.preadv(self.file.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise EOFError(f"{self.path} ends before image {stop}")
            done += got
        return out

    def close(self, minimum: float, maximum: float, mean: float, rms: float) -> None:
        """Close the file, recording the data statistics in the header."""
        self.file.close()
        with mrcfile.mmap(self.path, mode="r+") as stack:
            stack.header.dmin, stack.header.dmax = minimum, maximum
            stack.header.dmean, stack.header.rms = mean, rms


@dataclass
class Stack:
    """An opened stack: ``data`` a read-only memory map (n, ny, nx) of the file's own
    type, ``pixel_size`` the header's (Å; 0 when unset), ``offset`` the byte where the
    images start."""

    path: Path
    data: np.ndarray
    pixel_size: float
    offset: int = HEADER_BYTES

    @property
    def count(self) -> int:
        return self.data.shape[0]

    @property
    def box(self) -> int:
        return self.data.shape[-1]

    def read(self, indices: np.ndarray, out: np.ndarray) -> None:
        """The images ``indices`` (k,) (0-based, in range) into ``out`` (k, ny, nx), by
        positioned reads of each run of consecutive images (one read for a chunk of
        consecutive particles), not through ``data``: every page a memory map touches
        stays in the process's resident set until the map goes, so images read at
        random from a large stack (a noise estimate's 2 000 of 10^6) would map most of
        the file; here memory holds the images asked for."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        image_bytes = self.data.shape[1] * self.data.shape[2] * self.data.dtype.itemsize
        with open(self.path, "rb") as handle:
            for run in np.split(np.arange(ordered.size), breaks):
                first, count = int(ordered[run[0]]), run.size
                buffer = np.empty((count, *self.data.shape[1:]), self.data.dtype)
                view = memoryview(buffer).cast("B")
                done, start = 0, self.offset + first * image_bytes
                while done < len(view):  # pread may read less than asked (>2 GiB, signals)
                    got = os.preadv(handle.fileno(), [view[done:]], start + done)
                    if got == 0:
                        raise CryosviError(f"{self.path} ends before image {first + count}")
                    done += got
                out[order[run]] = buffer


def open_stack(path: Path) -> Stack:
    """Memory-map the MRC file ``path`` as (n, ny, nx) after checking that its header
    describes its size exactly (a 2-D image is a stack of one)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive: we check what matters below
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                header = None if mrc.header is None else mrc.header.copy()
    except (ValueError, OSError, EOFError, TypeError, OverflowError) as error:
        raise CryosviError(f"cannot read {path} as MRC: {error}") from None
    if header is None:
        raise CryosviError(f"cannot read {path} as MRC: no header")
    mode = int(header.mode)
    if mode not in REAL_MODES:
        raise CryosviError(f"{path}: MRC mode {mode} does not hold real pixel values "
                           f"(supported: {', '.join(f'{k} ({v})' for k, v in REAL_MODES.items())})")
    dtype = np.dtype(REAL_MODES[mode]).newbyteorder(header.mode.dtype.byteorder)
    nx, ny, nz = (int(header.nx), int(header.ny), int(header.nz))
    extended = int(header.nsymbt)
    if min(nx, ny, nz) < 1 or extended < 0:
        raise CryosviError(f"{path}: MRC header with nonsense sizes nx={nx} ny={ny} nz={nz}")
    if nx != ny:
        raise CryosviError(f"{path}: images are {nx} x {ny} px; square images are needed")
    offset = HEADER_BYTES + extended
    expected = nx * ny * nz * dtype.itemsize
    held = path.stat().st_size - offset
    if held != expected:
        raise CryosviError(
            f"{path}: the header says {nz} image(s) of {nx} x {ny} px in mode {mode} "
            f"({REAL_MODES[mode]}), {expected} bytes, but the file holds {held} bytes of "
            "data: a damaged file or a wrong mode in the header")
    try:
        data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(nz, ny, nx))
    except (ValueError, OSError) as error:
        raise CryosviError(f"cannot map {path}: {error}") from None
    mx = int(header.mx)
    cell = float(header.cella.x)
    pixel_size = cell / mx if mx > 0 and np.isfinite(cell) and cell > 0 else 0.0
    return Stack(path, data, pixel_size, offset)


def parse_image_names(names) -> tuple[np.ndarray, np.ndarray]:
    """RELION ``rlnImageName`` values ``'000001@stack.mrcs'`` -> (0-based index, file);
    a name without '@' names a file of a single image (index -1, which the reader checks
    and reads as image 0). Vectorised with pandas."""
    import pandas as pd

    names = pd.Series(np.asarray(names, dtype=object)).astype(str)
    has_at = names.str.contains("@", regex=False).to_numpy()
    parts = names.str.partition("@")
    number = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(float)
    bad = ~np.isfinite(number) | (number != np.round(number)) | (number < 1)
    if bad.any():
        example = names.iloc[int(np.flatnonzero(bad)[0])]
        raise CryosviError(f"rlnImageName {example!r} does not look like "
                           "'000001@particles.mrcs' (image numbers start at 1)")
    files = np.where(has_at, parts[2].to_numpy(str), names.to_numpy(str))
    index = number.astype(np.int64) - 1
    index[~has_at] = -1
    return index, files
