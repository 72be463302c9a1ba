"""The particles of each bin as files RELION and cryoSPARC read: ``bin_K.star`` (RELION
3.1: the posterior's optics table, its columns and cryosvi's posterior columns, rows in
file order) and, when the posterior came with a cryoSPARC ``.cs`` (``cryosvi infer`` of
a .cs writes one beside its STAR), ``bin_K.cs`` with the same particles' records.

RELION looks for the stacks named in ``rlnImageName`` from the folder it runs in, and
cryosvi from the STAR file's folder (or ``--datadir``), so names that resolve are written
as absolute paths: the subsets work from any folder, e.g. ``relion_refine --i
OUT/bins/bin_1.star`` in a RELION project. The .cs records are copied unchanged apart
from the fields the posterior updates (``cryosvi.io.cryosparc.write_cs``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cryosvi.errors import CryosviError
from cryosvi.io.mrc import parse_image_names
from cryosvi.io.particles import ParticleSet, write_particles


def companion_cs(table: ParticleSet) -> np.ndarray | None:
    """The records of the ``.cs`` beside a posterior STAR (same stem), one per particle
    in the STAR's order, or None when there is none. CryosviError when it holds other
    particles."""
    path = table.path.with_suffix(".cs")
    if table.cs is not None or table.path.suffix.lower() == ".cs" or not path.is_file():
        return None
    from cryosvi.io.cryosparc import read_cs

    frame, array, _ = read_cs(path)
    if len(frame) != len(table) or not np.array_equal(
            frame["rlnImageName"].to_numpy(str),
            table.metadata["rlnImageName"].to_numpy(str)):
        raise CryosviError(f"{path}, beside the posterior, does not hold its particles "
                           f"({len(frame)} records for {len(table)} particles, or other "
                           "images); move it away or give a posterior without it")
    return array


def absolute_image_names(table: ParticleSet) -> tuple[pd.Series, list[str]]:
    """``rlnImageName`` with every stack that resolves (``ParticleSet.resolve``) as an
    absolute path (the image numbers as written), and the names of the stacks that do
    not (kept as written)."""
    names = table.metadata["rlnImageName"].astype(str)
    parse_image_names(names.to_numpy())  # one error line for a malformed name
    has_at = names.str.contains("@", regex=False)
    parts = names.str.partition("@")
    files = parts[2].where(has_at, names)
    found, missing = {}, []
    for name in files.unique():
        where = table.resolve(name)
        if where is None:
            missing.append(name)
        else:
            found[name] = str(where.resolve())
    rewritten = names.astype(object)
    known = files.isin(list(found))
    absolute = files[known].map(found).astype(str)
    rewritten[known & has_at] = (parts[0][known] + "@" + absolute)[has_at[known]]
    rewritten[known & ~has_at] = absolute[~has_at[known]]
    return rewritten.astype(str), missing


def write_subsets(table: ParticleSet, bins, directory: Path, cs: np.ndarray | None,
                  image_names: pd.Series) -> list[list[Path]]:
    """``directory/bin_K.star`` (and ``.cs`` with ``cs``) for every non-empty bin K =
    1..B of ``bins`` (``landscape.Bins``); returns the paths written per bin."""
    frame = table.metadata.copy()
    frame["rlnImageName"] = image_names
    written = []
    for k in range(bins.n_bins):
        rows = bins.rows(k)
        if not len(rows):
            written.append([])
            continue
        subset = table.subset(rows, frame, cs)
        written.append(write_particles(directory / f"bin_{k + 1}.star", subset,
                                       subset.metadata, []))
    return written
