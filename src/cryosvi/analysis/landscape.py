"""Where the particles lie along the conformational coordinates, and bins along one.

Each particle's posterior over coordinate k (the amplitude of the run's mode k, Å RMS per
pseudo-atom) is summarised by its mean m_ik and std s_ik (``cryosviModeAmplitudeK`` and
``cryosviModeAmplitudeStdK`` of ``cryosvi infer``). Two pictures of the landscape:

* the histogram of the means, which takes every mean at face value;
* the density that accounts for each particle's posterior width,
  p(x) = sum_i N(x; m_i, s_i^2) in particles per unit of x: a particle whose posterior is
  wide spreads its weight over the values it may have, so a cloud of noisy particles
  does not pass for a sharp state. On a grid, ``width_density`` gives the mean of p over
  each cell, the differences of the Normal CDF at the cell edges, so that the cells hold
  exactly the particles' mass (n, less the tails beyond ``TAILS`` stds of the grid's
  ends). In 2-D each particle is the product of its two marginal Normals: the STAR file
  gives no posterior correlation between modes.

Bins along one coordinate (``make_bins``) partition the particles by their posterior
means: equal counts (quantiles, the default: bins for refinement are then equally well
determined) or equal widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtr

from cryosvi.errors import CryosviError
from cryosvi.io.atomic import write_atomically
from cryosvi.io.particles import MODE_COLUMN, ParticleSet, numeric_column
from cryosvi.latents.modes import MODE_STD_COLUMN

TAILS = 5.0
"""The grid reaches this many posterior stds beyond the extreme particles (the Normal
mass beyond 5 stds is 2.9e-7)."""
CELLS_1D, CELLS_2D = 240, 96
"""Grid cells of the width-aware density along one coordinate, and per axis in 2-D."""
HISTOGRAM_CELLS_1D, HISTOGRAM_CELLS_2D = 6, 4
"""Grid cells per histogram bin (40 and 24 histogram bins per axis): the histogram of
the means shares the density's grid, coarser, so both are on one table."""
CHUNK = 4096
"""Particles per block of the density sums (memory: CHUNK x cells floats)."""


@dataclass
class Coordinates:
    """The posterior of the particles' conformational coordinates: ``names`` (K) the STAR
    columns of the means, ``means`` and ``stds`` (n, K), in Å RMS per pseudo-atom."""

    names: list[str]
    means: np.ndarray
    stds: np.ndarray

    @property
    def n_modes(self) -> int:
        return len(self.names)


def read_coordinates(table: ParticleSet) -> Coordinates:
    """The mode amplitudes of a posterior (``cryosviModeAmplitude1..K`` and their
    ``...Std1..K``); CryosviError without them or with a std <= 0."""
    names = table.mode_columns()
    if not names:
        raise CryosviError(f"{table.path} has no {MODE_COLUMN.format(1)} column: not the "
                           "posterior of a run that infers the conformation (cryosvi "
                           "infer with a run trained with --latents ...,modes)")
    std_names = [MODE_STD_COLUMN.format(k + 1) for k in range(len(names))]
    missing = [name for name in std_names if name not in table.metadata]
    if missing:
        raise CryosviError(f"{table.path} has the mode amplitudes but not their posterior "
                           f"stds ({', '.join(missing)}): not a posterior of cryosvi infer")
    means = np.stack([numeric_column(table, name) for name in names], 1)
    stds = np.stack([numeric_column(table, name) for name in std_names], 1)
    if (stds <= 0).any():
        row, column = np.argwhere(stds <= 0)[0]
        raise CryosviError(f"{table.path}: {std_names[column]} is {stds[row, column]:g} at "
                           f"particle {row + 1}; posterior stds must be > 0")
    return Coordinates(names, means, stds)


# ------------------------------------------------------------------------- densities
def grid_edges(means: np.ndarray, stds: np.ndarray, cells: int) -> np.ndarray:
    """(cells + 1,) equally spaced edges from min(m - TAILS s) to max(m + TAILS s)."""
    low, high = float((means - TAILS * stds).min()), float((means + TAILS * stds).max())
    return np.linspace(low, high, cells + 1)


def _cell_masses(means: np.ndarray, stds: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(n, cells): the mass of each particle's Normal in each cell."""
    cdf = ndtr((edges[None, :] - means[:, None]) / stds[:, None])
    return np.diff(cdf, axis=1)


def width_density(means: np.ndarray, stds: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(cells,) particles per unit: the mean over each cell [edges[j], edges[j + 1]] of
    sum_i N(x; means[i], stds[i]^2). ``means``, ``stds`` (n,); stds > 0."""
    total = np.zeros(len(edges) - 1)
    for start in range(0, len(means), CHUNK):
        rows = slice(start, start + CHUNK)
        total += _cell_masses(means[rows], stds[rows], edges).sum(0)
    return total / np.diff(edges)


def width_density_2d(means: np.ndarray, stds: np.ndarray, x_edges: np.ndarray,
                     y_edges: np.ndarray) -> np.ndarray:
    """(x cells, y cells) particles per unit area: the cell means of
    sum_i N(x; m_i1, s_i1^2) N(y; m_i2, s_i2^2). ``means``, ``stds`` (n, 2)."""
    total = np.zeros((len(x_edges) - 1, len(y_edges) - 1))
    for start in range(0, len(means), CHUNK):
        rows = slice(start, start + CHUNK)
        along_x = _cell_masses(means[rows, 0], stds[rows, 0], x_edges)
        along_y = _cell_masses(means[rows, 1], stds[rows, 1], y_edges)
        total += along_x.T @ along_y  # the sum over particles of outer products
    return total / np.outer(np.diff(x_edges), np.diff(y_edges))


@dataclass
class Profile:
    """One coordinate: the width-aware density on ``edges`` (cells + 1) and the histogram
    of the means on the coarser ``histogram_edges``, both in particles per unit."""

    name: str
    edges: np.ndarray
    density: np.ndarray
    histogram_edges: np.ndarray
    histogram: np.ndarray


@dataclass
class Surface:
    """Two coordinates ``names`` (x, y): the 2-D width-aware density on the cells of
    ``x_edges`` x ``y_edges`` and the 2-D histogram of the means on the coarser grid,
    both in particles per unit area; ``columns`` the coordinates' indices."""

    names: tuple[str, str]
    columns: tuple[int, int]
    x_edges: np.ndarray
    y_edges: np.ndarray
    density: np.ndarray
    histogram_x_edges: np.ndarray
    histogram_y_edges: np.ndarray
    histogram: np.ndarray


@dataclass
class Landscape:
    profiles: list[Profile]
    surface: Surface | None = None


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.histogram(values, edges)[0] / np.diff(edges)


def landscape(coordinates: Coordinates, pair: tuple[int, int] | None = None) -> Landscape:
    """The profile of every coordinate and, for ``pair`` (indices of two coordinates),
    the 2-D surface."""
    profiles = []
    for k, name in enumerate(coordinates.names):
        means, stds = coordinates.means[:, k], coordinates.stds[:, k]
        edges = grid_edges(means, stds, CELLS_1D)
        coarse = edges[::HISTOGRAM_CELLS_1D]
        profiles.append(Profile(name, edges, width_density(means, stds, edges), coarse,
                                _histogram(means, coarse)))
    surface = None
    if pair is not None:
        columns = list(pair)
        means, stds = coordinates.means[:, columns], coordinates.stds[:, columns]
        x_edges = grid_edges(means[:, 0], stds[:, 0], CELLS_2D)
        y_edges = grid_edges(means[:, 1], stds[:, 1], CELLS_2D)
        coarse_x, coarse_y = x_edges[::HISTOGRAM_CELLS_2D], y_edges[::HISTOGRAM_CELLS_2D]
        histogram = np.histogram2d(means[:, 0], means[:, 1], [coarse_x, coarse_y])[0]
        surface = Surface((coordinates.names[pair[0]], coordinates.names[pair[1]]),
                          (pair[0], pair[1]), x_edges, y_edges,
                          width_density_2d(means, stds, x_edges, y_edges), coarse_x, coarse_y,
                          histogram / np.outer(np.diff(coarse_x), np.diff(coarse_y)))
    return Landscape(profiles, surface)


# ------------------------------------------------------------------------------ bins
@dataclass
class Bins:
    """Bins along coordinate ``column`` (0-based): ``index`` (n,) each particle's bin
    0..B-1, ``edges`` (B + 1,), ``centres`` (B,), ``kind`` 'equal-count' or
    'equal-width'. Every particle is in exactly one bin; bin 0 holds the lowest values."""

    column: int
    kind: str
    index: np.ndarray
    edges: np.ndarray
    centres: np.ndarray
    counts: np.ndarray = field(init=False)

    def __post_init__(self):
        self.counts = np.bincount(self.index, minlength=len(self.centres))

    @property
    def n_bins(self) -> int:
        return len(self.centres)

    def rows(self, k: int) -> np.ndarray:
        """The particles (row indices, in file order) of bin k."""
        return np.flatnonzero(self.index == k)


def make_bins(values: np.ndarray, count: int, equal_width: bool = False,
              column: int = 0) -> Bins:
    """``count`` bins of the posterior means ``values`` (n,).

    Equal counts: the particles in order of their values (ties in file order), the first
    n/count in bin 0 and so on (the counts differ by at most one); the edge between two
    bins halfway between the last value of one and the first of the next, the outer
    edges the extreme values, the centre of a bin the median of its values. Equal widths:
    ``count`` equal intervals from the smallest to the largest value (the largest in the
    last bin), centres at their midpoints; a bin may be empty.
    """
    values = np.asarray(values, np.float64)
    n = len(values)
    if count < 1:
        raise CryosviError(f"--bins {count}: at least one bin")
    if count > n:
        raise CryosviError(f"--bins {count}: more bins than the {n} particles")
    if count > 1 and values.min() == values.max():
        raise CryosviError(f"every particle has the same value {values[0]:g}: nothing to "
                           "bin")
    if equal_width:
        edges = np.linspace(values.min(), values.max(), count + 1)
        index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, count - 1)
        return Bins(column, "equal-width", index, edges, 0.5 * (edges[1:] + edges[:-1]))
    order = np.argsort(values, kind="stable")
    index = np.empty(n, np.int64)
    index[order] = np.arange(n) * count // n
    ordered = values[order]
    firsts = np.searchsorted(np.arange(n) * count // n, np.arange(count))  # first rank
    inner = 0.5 * (ordered[firsts[1:] - 1] + ordered[firsts[1:]])
    edges = np.concatenate([[ordered[0]], inner, [ordered[-1]]])
    centres = np.array([np.median(values[index == k]) for k in range(count)])
    return Bins(column, "equal-count", index, edges, centres)


# ------------------------------------------------------------------------- writing
def landscape_table(result: Landscape) -> pd.DataFrame:
    """One row per grid cell: ``panel`` (a coordinate's name, or 'NAME1 x NAME2'),
    ``x`` (and ``y`` in 2-D, else empty) the cell centre, ``density`` (width-aware) and
    ``histogram`` (of the means, the value of the coarser histogram bin holding the
    cell), per unit length (area in 2-D)."""
    parts = []
    for profile in result.profiles:
        centres = 0.5 * (profile.edges[1:] + profile.edges[:-1])
        parts.append(pd.DataFrame({
            "panel": profile.name, "x": centres, "y": np.nan, "density": profile.density,
            "histogram": np.repeat(profile.histogram, HISTOGRAM_CELLS_1D)}))
    surface = result.surface
    if surface is not None:
        x = 0.5 * (surface.x_edges[1:] + surface.x_edges[:-1])
        y = 0.5 * (surface.y_edges[1:] + surface.y_edges[:-1])
        histogram = np.repeat(np.repeat(surface.histogram, HISTOGRAM_CELLS_2D, 0),
                              HISTOGRAM_CELLS_2D, 1)
        grid_x, grid_y = np.meshgrid(x, y, indexing="ij")
        parts.append(pd.DataFrame({
            "panel": f"{surface.names[0]} x {surface.names[1]}", "x": grid_x.ravel(),
            "y": grid_y.ravel(), "density": surface.density.ravel(),
            "histogram": histogram.ravel()}))
    return pd.concat(parts, ignore_index=True)


def write_landscape_table(result: Landscape, path: str | Path) -> None:
    table = landscape_table(result)
    write_atomically(path, lambda temporary: table.to_csv(temporary, index=False,
                                                         float_format="%.6g"))


def plot_landscape(result: Landscape, bins: Bins, path: str | Path) -> None:
    """``path`` (PNG): a panel per coordinate (histogram of the means as bars, the
    width-aware density as a line, the bins' edges dashed on the binned coordinate) and,
    with a surface, the 2-D histogram and density side by side with the edges."""
    from matplotlib.figure import Figure

    profiles = result.profiles
    rows = 1 + (result.surface is not None)
    columns = max(len(profiles), 2 if result.surface is not None else 1)
    figure = Figure(figsize=(4.6 * columns, 3.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for k, (axis, profile) in enumerate(zip(axes[0], profiles)):
        axis.stairs(profile.histogram, profile.histogram_edges, fill=True, color="C0",
                    alpha=0.35, label="posterior means (histogram)")
        centres = 0.5 * (profile.edges[1:] + profile.edges[:-1])
        axis.plot(centres, profile.density, color="C3", lw=1.6,
                  label="sum of the particles' posteriors")
        if k == bins.column:
            for edge in bins.edges:
                axis.axvline(edge, color="k", ls="--", lw=0.8)
            axis.set_title(f"{profile.name}: {bins.n_bins} {bins.kind} bins", fontsize=10)
        else:
            axis.set_title(profile.name, fontsize=10)
        axis.set_xlabel("amplitude (Å RMS per pseudo-atom)")
        axis.set_ylabel("particles per Å")
        axis.legend(fontsize=7, loc="upper right")
    for axis in axes[0][len(profiles):]:
        axis.set_axis_off()
    surface = result.surface
    if surface is not None:
        pictures = ((surface.histogram_x_edges, surface.histogram_y_edges,
                     surface.histogram, "posterior means (histogram)"),
                    (surface.x_edges, surface.y_edges, surface.density,
                     "sum of the particles' posteriors"))
        for axis, (x_edges, y_edges, values, title) in zip(axes[1], pictures):
            image = axis.pcolormesh(x_edges, y_edges, values.T, cmap="viridis",
                                    shading="flat")
            figure.colorbar(image, ax=axis, label="particles per Å²")
            for edge in bins.edges:
                if bins.column == surface.columns[0]:
                    axis.axvline(edge, color="w", ls="--", lw=0.8)
                elif bins.column == surface.columns[1]:
                    axis.axhline(edge, color="w", ls="--", lw=0.8)
            axis.set_xlabel(f"{surface.names[0]} (Å)")
            axis.set_ylabel(f"{surface.names[1]} (Å)")
            axis.set_title(title, fontsize=10)
        for axis in axes[1][2:]:
            axis.set_axis_off()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png",
                                                            dpi=110))
