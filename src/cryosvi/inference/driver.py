"""``cryosvi infer``'s driver: the particles of a file through a trained run, written as a
posterior STAR (and .cs, and samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cryosvi.dataset import run_particles
from cryosvi.guide import check_turns
from cryosvi.inference.refine import refine
from cryosvi.io.atomic import save_npz_atomically
from cryosvi.io.outputs import provenance_array
from cryosvi.io.particles import read_particles, write_particles
from cryosvi.latents import summary_columns
from cryosvi.posterior import posterior_summary
from cryosvi.randomness import preserved_rng
from cryosvi.rundir import load_trained, select_device


@preserved_rng()
def infer(run: str | Path, particles: str | Path, output: str | Path, samples: int = 0,
          importance: int = 64, method: str = "auto", moves: int = 3,
          turns: int = 1, batch_size: int = 256,
          device: str = "cpu", summary_samples: int = 64,
          progress: bool = True, datadir: str | Path | None = None,
          invert: bool = False) -> pd.DataFrame:
    """Posterior of every particle of ``particles`` (STAR or cryoSPARC .cs, read by
    ``cryosvi.io.read_particles`` with ``datadir`` and ``invert``) under the trained run
    ``run``.

    Writes the STAR file ``output`` (RELION 3.1: the input's optics table, columns and row
    order, inferred columns replaced or added; an inferred defocus m keeps each particle's
    astigmatism: U = m + (U_in - V_in) / 2, V = m - (U_in - V_in) / 2, angle kept), from a
    .cs input also ``output`` with suffix .cs (the input's records, fields updated), and, with
    ``samples`` > 0, ``output`` with suffix .npz holding S posterior samples per particle
    (site -> (N, S, ...)). ``importance`` > 0 refines with that many samples per
    particle: ``method`` 'auto', 'laplace', 'smc' or 'is'; see ``refine``. ``turns``:
    the guide's posterior averaged over that many quarter turns of each image
    (``Guide.turns``). Returns the particle table written.
    """
    check_turns(turns)  # before the run is loaded
    select_device(device)
    info, reference, guide = load_trained(run, device)
    guide.turns = turns
    table = read_particles(particles, datadir, invert)
    config = guide.config
    data, known = run_particles(table, config, reference)
    forward = reference.forward_model(data.groups).to(device) if importance else None
    n = len(table)
    collected: dict[str, list] = {}
    sample_store: dict[str, list] = {s: [] for s in config.latents}
    if samples:
        sample_store["weights"] = [] if importance else None
    draws = max(summary_samples, samples, importance)
    torch.manual_seed(0)
    for start in tqdm(range(0, n, batch_size), desc="inferring", unit="batch",
                      disable=not progress, leave=False):
        index = np.arange(start, min(start + batch_size, n))
        batch = torch.from_numpy(data.images(index)).to(device)
        batch_known = {s: v[index].to(device) for s, v in known.items()}
        conditions = data.conditions.take(index).to(device)
        if importance:
            summary = refine(guide, forward, reference.priors, reference.noise.std, batch,
                             batch_known, importance, method=method, moves=moves,
                             conditions=conditions)
        else:
            summary = posterior_summary(guide, batch, batch_known, draws,
                                        conditions=conditions)
        rows = table.metadata.iloc[index]
        for key, value in summary_columns(summary, config.latents, rows, config).items():
            collected.setdefault(key, []).append(value)
        if samples:
            for site in config.latents:
                sample_store[site].append(
                    summary["samples"][site][:samples].transpose(0, 1).cpu().numpy())
            if importance:
                sample_store["weights"].append(
                    summary["weights"][:samples].T.cpu().numpy())
    frame = table.metadata.copy()
    for key, parts in collected.items():
        frame[key] = np.concatenate(parts)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_particles(output, table, frame, list(collected))
    if samples:
        arrays = {s: np.concatenate(v) for s, v in sample_store.items() if v}
        save_npz_atomically(output.with_suffix(".npz"), **arrays,
                            cryosvi=provenance_array("samples"))
    table.close()
    return frame
