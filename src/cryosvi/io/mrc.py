"""Particle stacks in MRC format: lazy (memory-mapped) reading and streamed writing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from cryosvi.errors import CryosviError
from cryosvi.io.star import ParticleTable


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
        os.pwrite(self.file.fileno(), np.ascontiguousarray(images, self.dtype).tobytes(),
                  self._offset(start))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images start..stop-1 as a new (stop - start, box, box) array."""
        size = (stop - start) * self.box * self.box * self.dtype.itemsize
        raw = os.pread(self.file.fileno(), size, self._offset(start))
        return np.frombuffer(raw, self.dtype).reshape(stop - start, self.box, self.box).copy()

    def close(self, minimum: float, maximum: float, mean: float, rms: float) -> None:
        """Close the file, recording the data statistics in the header."""
        self.file.close()
        with mrcfile.mmap(self.path, mode="r+") as stack:
            stack.header.dmin, stack.header.dmax = minimum, maximum
            stack.header.dmean, stack.header.rms = mean, rms


def parse_image_names(names) -> tuple[np.ndarray, np.ndarray]:
    """RELION ``rlnImageName`` values ``'000001@stack.mrcs'`` -> (0-based index, file)."""
    split = np.asarray([str(name).split("@", 1) for name in names], dtype=object)
    if split.ndim != 2 or split.shape[1] != 2:
        raise CryosviError("rlnImageName entries must look like '000001@particles.mrcs'")
    try:
        index = split[:, 0].astype(np.int64) - 1
    except ValueError:
        raise CryosviError("rlnImageName entries must start with an image number") from None
    return index, split[:, 1].astype(str)


class ParticleImages:
    """The images of a :class:`ParticleTable`, read lazily from memory-mapped stacks.

    ``images[indices]`` returns float32 (len(indices), box, box); nothing is loaded until
    asked for, so stacks larger than memory work.
    """

    def __init__(self, table: ParticleTable):
        table.require("rlnImageName")
        self.index, files = parse_image_names(table.particles["rlnImageName"])
        if np.any(self.index < 0):
            raise CryosviError(f"{table.path}: image numbers in rlnImageName start at 1")
        self.file_names, self.file_of = np.unique(files, return_inverse=True)
        self.stacks = [self._open(table.path.parent / name) for name in self.file_names]
        shapes = {stack.data.shape[1:] for stack in self.stacks}
        if len(shapes) != 1:
            raise CryosviError(f"{table.path}: stacks have different image sizes {shapes}")
        self.box = int(next(iter(shapes))[-1])
        for k, stack in enumerate(self.stacks):
            largest = self.index[self.file_of == k].max()
            if largest >= stack.data.shape[0]:
                raise CryosviError(f"{self.file_names[k]} has {stack.data.shape[0]} images "
                                   f"but the STAR file refers to image {largest + 1}")
        self.pixel_size = float(self.stacks[0].voxel_size.x)

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise CryosviError(f"particle stack not found: {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stack = mrcfile.mmap(path, mode="r", permissive=True)
        except (ValueError, OSError) as error:
            raise CryosviError(f"cannot read {path} as MRC: {error}") from None
        if stack.data is None or stack.data.ndim not in (2, 3):
            raise CryosviError(f"{path} is not an image stack")
        if stack.data.ndim == 2:
            raise CryosviError(f"{path} holds one image; expected a stack (.mrcs)")
        return stack

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.atleast_1d(np.asarray(indices))
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        files = self.file_of[indices]
        for k in np.unique(files):
            chosen = files == k
            out[chosen] = self.stacks[k].data[self.index[indices[chosen]]]
        bad = ~np.isfinite(out).all(axis=(1, 2))
        if bad.any():
            raise CryosviError(f"particle {indices[bad][0] + 1} contains NaN or Inf values")
        return out

    def close(self) -> None:
        for stack in self.stacks:
            stack.close()
