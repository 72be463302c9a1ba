"""``cryosvi analyze``'s driver: a posterior STAR and its run in, structures out.

    OUT/landscape.png, landscape.csv   the particles along each coordinate (``landscape``)
    OUT/ensemble.pdb, ensemble.cif     a model per bin centre, every atom (``ensemble``)
    OUT/ensemble.png                   the models' C-alpha traces
    OUT/view.cxc                       ChimeraX: the ensemble, and the maps if any
    OUT/bins/bin_K.star (and .cs)      the particles of bin K (``subsets``)
    OUT/bins/bin_K.mrc                 with ``reconstruct``: bin K's map (``maps``)
    OUT/summary.json                   bins, ranges, posterior widths, map correlations
    OUT/.cryosvi                       the marker of a folder cryosvi made

Every check of the user's input runs before any work. OUT is built in a hidden staging
folder beside it and renamed into place when complete (``cryosvi.io.outputs``), so a
crash or Ctrl-C leaves the earlier OUT, if any, as it was; an existing OUT is replaced
only with ``force`` and only when an earlier ``cryosvi analyze`` made it.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cryosvi.analysis.ensemble import (chain_atoms, chimerax_script, displacements,
                                       ensemble_structure, plot_ensemble, write_ensemble)
from cryosvi.analysis.landscape import (landscape, make_bins, plot_landscape,
                                        read_coordinates, write_landscape_table)
from cryosvi.analysis.maps import check_relion, map_correlations, reconstruct
from cryosvi.analysis.subsets import absolute_image_names, companion_cs, write_subsets
from cryosvi.dataset import check_run_pixel_size
from cryosvi.errors import CryosviError, CryosviWarning
from cryosvi.io.atomic import write_atomically
from cryosvi.io.outputs import check_output_directory, provenance, staged_directory
from cryosvi.io.particles import DATADIR_HINT, read_particles
from cryosvi.latents import BY_NAME
from cryosvi.reference import Reference
from cryosvi.rundir import REFERENCE_FILE, guide_config, read_run, write_json_atomic

KIND = "analysis"
SUMMARY = "summary.json"


def analyze(posterior: str | Path, run: str | Path, output: str | Path,
            structure: str | Path | None = None, chain: str | None = None, bins: int = 5,
            coordinate: int = 1, equal_width: bool = False, reconstruct_maps: bool = False,
            force: bool = False, datadir: str | Path | None = None,
            progress: bool = True) -> dict:
    """Write OUT (module docstring) for the posterior STAR ``posterior`` of the run
    ``run``: ``bins`` bins along coordinate ``coordinate`` (1-based) with equal counts,
    or equal widths (``equal_width``); the ensemble of the chain ``chain`` of
    ``structure`` (default: those the run's reference was built from); with
    ``reconstruct_maps`` each bin's map by ``relion_reconstruct``. Stacks are looked up
    as ``cryosvi.io.read_particles`` does (``datadir``). Returns the summary written."""
    output = Path(output)
    replace = check_output_directory(output, KIND, force,
                                     inputs=[posterior, run, structure, datadir])
    if reconstruct_maps:
        check_relion()
    info = read_run(run)
    config = guide_config(info, run)
    site = BY_NAME["modes"].site
    if site not in config.latents:
        raise CryosviError(f"the run {run} does not infer the conformation (its latents: "
                           f"{', '.join(config.latents)}); analyze needs the posterior of a "
                           "run trained with the modes among --latents")
    reference = Reference.load(Path(run) / REFERENCE_FILE)
    table = read_particles(posterior, datadir)
    check_run_pixel_size(table, config, reference)  # a posterior of another data set
    coordinates = read_coordinates(table)
    if coordinates.n_modes != reference.n_modes:
        raise CryosviError(f"{posterior} has {coordinates.n_modes} mode amplitude(s) but the "
                           f"run's reference has {reference.n_modes} modes: not a posterior "
                           f"of the run {run}")
    if not 1 <= coordinate <= coordinates.n_modes:
        raise CryosviError(f"--coordinate {coordinate}: the posterior has "
                           f"{coordinates.n_modes} coordinate(s), 1..{coordinates.n_modes}")
    column = coordinate - 1
    binned = make_bins(coordinates.means[:, column], bins, equal_width, column)
    atoms = chain_atoms(reference, structure, chain)
    cs = companion_cs(table)
    image_names, missing = absolute_image_names(table)
    pixel_size = box = None
    if reconstruct_maps:
        if missing:
            raise CryosviError(f"--reconstruct: particle stack {missing[0]} not found "
                               f"(from {table.path.parent}); {DATADIR_HINT}")
        table.ensure_image_size()
        box, pixel_size = _one_box(table)
    elif missing:
        warnings.warn(f"{len(missing)} particle stack(s) not found (e.g. {missing[0]}): "
                      "the subsets name their images as the posterior does; to have them "
                      f"as absolute paths, {DATADIR_HINT}", CryosviWarning, stacklevel=2)

    with staged_directory(output, KIND, replace, "analyze") as staging:
        summary = {**provenance(KIND), "posterior": str(posterior), "run": str(run),
                   **_analyze_into(staging, table, coordinates, binned, reference, atoms,
                                   cs, image_names, box, pixel_size, progress)}
        write_json_atomic(staging / SUMMARY, summary)
        # the staging folder is private (mkdtemp); OUT gets the mode of a folder made
        # here with the user's umask, as bins/ was
        staging.chmod(stat.S_IMODE((staging / "bins").stat().st_mode))
    return summary


def _one_box(table) -> tuple[int, float]:
    """The particles' one box (px) and pixel size (Å), which RELION reconstructs at."""
    boxes = np.unique(table.metadata["rlnImageSize"].to_numpy(int))
    pixels = table.metadata["rlnImagePixelSize"].to_numpy(float)
    if len(boxes) > 1 or np.ptp(pixels) > 1e-3 * pixels.max():
        raise CryosviError(f"--reconstruct: the optics groups of {table.path} differ in box "
                           f"({', '.join(map(str, boxes))} px) or pixel size "
                           f"({pixels.min():g}-{pixels.max():g} Å); relion_reconstruct "
                           "makes one map of one box and pixel size")
    return int(boxes[0]), float(pixels[0])


def _analyze_into(directory: Path, table, coordinates, binned, reference, atoms, cs,
                  image_names, box, pixel_size, progress: bool) -> dict:
    """Write every output but the summary into ``directory``; returns the summary."""
    column = binned.column
    others = [k for k in range(coordinates.n_modes) if k != column]
    result = landscape(coordinates, (column, others[0]) if others else None)
    write_landscape_table(result, directory / "landscape.csv")
    plot_landscape(result, binned, directory / "landscape.png")

    amplitudes = np.tile(coordinates.means.mean(0), (binned.n_bins, 1))
    amplitudes[:, column] = binned.centres
    positions = atoms.positions + displacements(atoms, reference, amplitudes)
    write_ensemble(ensemble_structure(atoms, positions), directory / "ensemble.pdb",
                   directory / "ensemble.cif")
    plot_ensemble(atoms, positions, directory / "ensemble.png",
                  f"{atoms.n_atoms} atoms of {Path(atoms.path).name} chain {atoms.chain}: "
                  f"{binned.n_bins} models along {coordinates.names[column]} (C-alpha traces)")

    (directory / "bins").mkdir()
    files = write_subsets(table, binned, directory / "bins", cs, image_names)
    maps, correlations, relion = [], None, None
    if box is not None:
        filled = [k for k in range(binned.n_bins) if binned.counts[k]]
        for k in tqdm(filled, desc="reconstructing", unit="bin", disable=not progress,
                      file=sys.stderr):
            reconstruct(directory / "bins" / f"bin_{k + 1}.star",
                        directory / "bins" / f"bin_{k + 1}.mrc", pixel_size)
            maps.append(f"bins/bin_{k + 1}.mrc")
        correlations = map_correlations([directory / m for m in maps])
        relion = _relion_version()
    script = chimerax_script("ensemble.pdb", maps, coordinates.names[column], box,
                             pixel_size, reference.centroid)
    write_atomically(directory / "view.cxc", lambda temporary: temporary.write_text(script))

    def described(k: int) -> dict:
        means, stds = coordinates.means[:, k], coordinates.stds[:, k]
        return {"column": coordinates.names[k], "range": [float(means.min()),
                                                           float(means.max())],
                "mean": float(means.mean()), "std_of_means": float(means.std()),
                "mean_posterior_std": float(stds.mean())}

    chosen = described(column)
    return {
        "particles": len(table),
        "coordinate": {"index": column + 1, **chosen}, "binning": binned.kind,
        "range": chosen["range"], "mean_posterior_std": chosen["mean_posterior_std"],
        "coordinates": [described(k) for k in range(coordinates.n_modes)],
        "bins": {"edges": binned.edges.tolist(), "centres": binned.centres.tolist(),
                 "counts": binned.counts.tolist(),
                 "files": [[f"bins/{p.name}" for p in paths] for paths in files],
                 "maps": maps},
        "ensemble": {"files": ["ensemble.pdb", "ensemble.cif", "ensemble.png"],
                     "structure": atoms.path,
                     "chain": atoms.chain, "models": binned.n_bins, "atoms": atoms.n_atoms,
                     "motion": (f"rigid motions of {reference.blocks.n_blocks} blocks"
                                if reference.blocks is not None else
                                "the displacement of each residue's pseudo-atom"),
                     "amplitudes": amplitudes.tolist()},
        "map_correlations": None if correlations is None else correlations.tolist(),
        "reconstruction": None if box is None else {
            "program": relion.strip(), "box": box, "pixel_size": pixel_size,
            "command": "relion_reconstruct --i bin_K.star --o bin_K.mrc --ctf --angpix "
                       f"{pixel_size:g}"},
    }


def _relion_version() -> str:
    done = subprocess.run(["relion_reconstruct", "--version"], capture_output=True,
                          text=True)
    return (done.stdout.strip().splitlines() or ["relion_reconstruct"])[0]
