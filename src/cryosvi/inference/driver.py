"""``cryosvi infer``'s driver: the particles of a file through a trained run, chunk by
chunk (``cryosvi.inference.chunks``: shared out over processes, resumable), written as a
posterior STAR (and .cs, and samples)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryosvi.dataset import run_particles
from cryosvi.noise_data import junk_null_model, matched_noise_model
from cryosvi.errors import CryosviError
from cryosvi.guide import check_turns
from cryosvi.inference.chunks import (CHUNK_PARTICLES, ChunkColumns, WorkFolder,
                                      assemble_columns, chunk_ranges, fingerprint,
                                      run_chunks, work_folder_path, write_samples)
from cryosvi.inference.distributed import Ranks, auto_device
from cryosvi.inference.importance import importance_log_evidence
from cryosvi.inference.junk import MODELS, assess_junk, null_log_evidence
from cryosvi.inference import model_error as errors
from cryosvi.inference.laplace_fit import LAPLACE_STARTS
from cryosvi.inference.refine import (METHODS, REFINERS, Batch, Settings,
                                      check_refinement, dataset_snr, guide_alone,
                                      needs_snr)
from cryosvi.io.outputs import provenance_array
from cryosvi.io.particles import read_particles, write_particles
from cryosvi.latents import JUNK_COLUMN, summary_columns
from cryosvi.physics.noise import ERROR_WEIGHT
from cryosvi.randomness import Streams, preserved_rng
from cryosvi.rundir import CHECKPOINT, REFERENCE_FILE, RUN_FILE, load_trained, select_device

EVIDENCE_COLUMNS = tuple(f"_logEvidence_{model}" for model in MODELS)
"""The chunk files' columns of each particle's log evidences under the three models of
``cryosvi.inference.junk`` (never written to the STAR): the junk mixture is fitted over
all particles when the chunks are assembled, so a chunk's results stay its own."""
JUNK_DRAWS = 16
"""Guide draws per particle whose importance weights give the physics model's evidence
where the refinement gives none (``--importance 0``: the guide alone)."""


@dataclass
class Written:
    """What ``infer`` wrote, without the table (``table=False``): particles, the
    number of particles written; attrs: 'junk_fraction' and, with a model error
    estimate, 'model_error' (as the table's attrs); ess_median: the median of the
    cryosviESS column, refined_by_smc: the sum of cryosviRefinedBySMC (None where the
    posterior has no such column)."""

    particles: int
    attrs: dict
    ess_median: float | None = None
    refined_by_smc: int | None = None


@preserved_rng()
def infer(run: str | Path, particles: str | Path, output: str | Path, samples: int = 0,
          importance: int = 64, method: str = "auto", moves: int = 3,
          starts: int = LAPLACE_STARTS, turns: int = 1, batch_size: int = 256,
          device: str = "auto", summary_samples: int = 64,
          progress: bool = True, datadir: str | Path | None = None,
          invert: bool = False, seed: int = 0, resume: bool = False,
          force: bool = False, chunk_size: int = CHUNK_PARTICLES,
          ranks: Ranks | None = None, max_junk: float | None = None,
          model_error: bool = True, model_error_weight: float = ERROR_WEIGHT,
          table: bool = True) -> pd.DataFrame | Written | None:
    """Posterior of every particle of ``particles`` (STAR or cryoSPARC .cs, read by
    ``cryosvi.io.read_particles`` with ``datadir`` and ``invert``) under the trained run
    ``run``.

    Writes the STAR file ``output`` (RELION 3.1: the input's optics table, columns and row
    order, inferred columns replaced or added; an inferred defocus m keeps each particle's
    astigmatism: U = m + (U_in - V_in) / 2, V = m - (U_in - V_in) / 2, angle kept), from a
    .cs input also ``output`` with suffix .cs (the input's records, fields updated), and, with
    ``samples`` > 0, ``output`` with suffix .npz holding S posterior samples per particle
    (site -> (N, S, ...)). ``importance`` > 0 refines with that many samples per
    particle: ``method`` one of ``refine.METHODS`` ('auto', 'laplace', 'smc', 'is',
    'grid'; see ``cryosvi.inference.refine``); ``moves``: the SMC's per tempering step;
    ``starts``: the Laplace path's Gauss-Newton starts. ``turns``: the guide's posterior averaged
    over that many quarter turns of each image (``Guide.turns``). ``device``: cpu, cuda, cuda:N or
    auto (cuda where present: cuda:LOCAL_RANK under torchrun; else cpu).

    A particle's posterior depends only on it, the run, these settings and ``seed``,
    not on the other particles: ``batch_size`` (particles per network pass),
    ``chunk_size``, the device and the processes change it only by the rounding of
    float32 kernels of other batch shapes, which the Gauss-Newton steps and the SMC's
    Metropolis decisions can turn into another Monte Carlo realisation of the same
    posterior (differences within its Monte Carlo error). The particles go in chunks
    of ``chunk_size``, each written when done to the work folder ``OUTPUT.partial``
    (removed at the end);
    ``resume`` continues the inference whose chunks are there (same run, particle file,
    settings and seed), ``force`` starts afresh over one; without either, a work folder
    there is an error. ``ranks``: this process's place among several (``torchrun``;
    ``cryosvi.inference.distributed.start``): each takes a block of the chunks, rank 0
    writes the result. Returns the particle table written (None on the other ranks),
    or with ``table`` False what was written, in numbers (``Written``).

    Memory does not grow with the particles beyond a few numbers each: the particle
    file's rows are read a piece at a time and what inference needs of them kept
    (``cryosvi.io.particles``), the images a batch at a time, and the STAR is written
    a piece of the input's rows at a time with the columns of the chunk files that
    hold them (the returned table, with ``table``, is the exception: it is the whole
    table).

    Junk: every particle's log evidence under the physics model (the refinement's
    estimate, or importance sampling of JUNK_DRAWS guide draws) and under the two nulls
    of ``cryosvi.inference.junk`` (the run's noise model, or for a white-noise run white
    noise with the particles' signal power, ``noise_data.junk_null_model``), the mixture's
    weights fitted by EM over all particles at the end: the column ``JUNK_COLUMN``.
    ``max_junk``: only the particles whose junk probability is below it are written (STAR,
    .cs and samples; None: all). The returned table's ``attrs['junk_fraction']`` is the
    fitted junk fraction.

    Model error (``model_error``, for a run with a noise model): before the main pass, a
    first pass over a fixed subset of the particles (``cryosvi.inference.model_error``)
    gives the residual power the model leaves beyond the noise; every particle is then
    inferred with the refined noise model (T = S + k D with k = ``model_error_weight``,
    the B envelope and the contrast prior from those residuals). The estimate is kept in
    the work folder (a resumed run and every process use the same numbers) and written
    beside the STAR (``model_error.beside``); the returned table's
    ``attrs['model_error']`` holds it.
    """
    check_turns(turns)  # before the run is loaded
    if method not in REFINERS:
        raise CryosviError(f"unknown refinement {method!r} ({', '.join(METHODS)})")
    ranks = ranks or Ranks()
    device = select_device(auto_device(ranks) if device == "auto" else device)
    _, reference, guide = load_trained(run, device)
    guide.turns = turns
    if importance:
        check_refinement(method, guide.config)
    source = read_particles(particles, datadir, invert)
    config = guide.config
    data, known = run_particles(source, config, reference)
    reference = matched_noise_model(data, reference)  # its spectra for these groups
    source.forget()  # a latent's known values may have read the whole table
    output = Path(output)
    work = WorkFolder(work_folder_path(output))
    model_error = bool(model_error) and reference.noise_model is not None
    settings = dict(importance=importance, method=method, moves=moves, starts=starts,
                    turns=turns, model_error=model_error,
                    model_error_weight=model_error_weight,
                    samples=samples, summary_samples=summary_samples, seed=seed,
                    chunk_size=chunk_size, invert=invert,
                    datadir=None if datadir is None else str(Path(datadir).resolve()))
    identity = fingerprint([Path(run) / name for name in (RUN_FILE, REFERENCE_FILE,
                                                           CHECKPOINT)],
                           Path(particles), settings)
    action = work.check(identity, resume, force)
    ranks.barrier()  # every rank has checked the folder before rank 0 changes it
    if ranks.leader:
        output.parent.mkdir(parents=True, exist_ok=True)
        work.prepare(action, identity)
    ranks.barrier()

    noise_std = reference.noise.std
    snr = dataset_snr(data, noise_std) if importance and needs_snr(method, config) \
        else None
    refine = Settings(importance, moves, snr=snr, starts=starts)
    draws = max(summary_samples, samples, importance)

    priors = reference.priors

    def likelihood(reference):
        """(forward model, noise model, junk nulls) of a reference, on the device."""
        noise = None if reference.noise_model is None else reference.noise_model.to(device)
        return (reference.forward_model(data.groups).to(device), noise,
                junk_null_model(data, reference, seed).to(device))

    def batch_of(index: np.ndarray, model) -> Batch:
        forward, noise_model, _ = model
        return Batch(guide, forward, priors, noise_std,
                     torch.from_numpy(data.images(index)).to(device),
                     {s: v[index].to(device) for s, v in known.items()},
                     data.conditions.take(index).to(device),
                     Streams(seed, torch.from_numpy(index)).to(device),
                     noise_model=noise_model)

    def summarise(index: np.ndarray, model) -> dict:
        """The posterior summary of the particles ``index`` (one batch) under ``model``
        (``likelihood``), with 'log_evidence' (B, 3): the three models'
        (``EVIDENCE_COLUMNS``)."""
        batch = batch_of(index, model)
        with torch.no_grad():
            summary = REFINERS[method](batch, refine) if importance else \
                guide_alone(batch, draws)
            physics = summary.get("log_evidence")
            if physics is None:
                own = None if importance else summary  # the guide's draws, when its own
                physics = _guide_log_evidence(batch, own)
            summary["log_evidence"] = torch.cat(
                [physics.double()[:, None], _null_log_evidence(batch, model[2])], -1)
        return summary

    estimate = None
    if model_error:
        stored = work.path / errors.FILE_NAME
        if ranks.leader and not stored.is_file():
            first = likelihood(reference)

            def images_at_means(index, summary):
                batch = batch_of(index, first)
                return errors.mean_images(batch.forward, summary, batch.known,
                                          batch.conditions, config.latents)

            errors.save(stored, errors.estimate(
                lambda index: summarise(index, first), images_at_means, data, reference,
                reference.noise_model, seed, batch_size, progress, model_error_weight))
        ranks.barrier()  # rank 0 has written the estimate
        estimate = errors.load(stored)
        reference = reference.with_settings(noise_model=errors.noise_model(estimate))
    model = likelihood(reference)

    def compute(indices: np.ndarray, advance) -> tuple[dict, dict]:
        """STAR columns (n,) and samples (n, S, ...) of the particles ``indices``."""
        columns: dict[str, list] = {}
        drawn: dict[str, list] = {}
        for start in range(0, len(indices), batch_size):
            index = indices[start:start + batch_size]
            summary = summarise(index, model)
            rows = source.numbers(index)
            for key, value in summary_columns(summary, config.latents, rows, config).items():
                columns.setdefault(key, []).append(value)
            for key, value in zip(EVIDENCE_COLUMNS, summary["log_evidence"].T):
                columns.setdefault(key, []).append(value.cpu().numpy())
            if samples:
                for site in config.latents:
                    drawn.setdefault(site, []).append(
                        summary["samples"][site][:samples].transpose(0, 1).cpu().numpy())
                if importance:
                    drawn.setdefault("weights", []).append(
                        summary["weights"][:samples].T.cpu().numpy())
            advance(len(index))
        return ({k: np.concatenate(v) for k, v in columns.items()},
                {k: np.concatenate(v) for k, v in drawn.items()})

    chunks = chunk_ranges(len(source), chunk_size)
    to_do = sorted(set(range(len(chunks))) - work.finished())
    run_chunks(work, chunks, to_do, ranks, compute, progress)
    ranks.barrier()  # every chunk is written
    result = None
    if ranks.leader:
        result = _write_result(output, source, work, chunks, samples, max_junk, table)
        if estimate is not None:
            errors.save(errors.beside(output), estimate)
            result.attrs["model_error"] = estimate
    source.close()
    ranks.barrier()  # the result is written before any rank returns
    return result


def _guide_log_evidence(batch: Batch, summary: dict | None) -> torch.Tensor:
    """(B,) the physics model's log evidence by importance sampling of JUNK_DRAWS guide
    draws: the first of the guide summary's own (``summary``), or fresh ones."""
    if summary is None:
        summary = guide_alone(batch, JUNK_DRAWS)
    values = {s: v[:JUNK_DRAWS] for s, v in summary["samples"].items()}
    return importance_log_evidence(batch.log_target(values), summary["log_q"][:JUNK_DRAWS])


def _null_log_evidence(batch: Batch, nulls) -> torch.Tensor:
    """(B, 2) float64: the batch's images under the junk nulls (``junk.null_log_evidence``
    of the ``NoiseModel`` ``nulls``; a white-noise run's likelihood counts the images' DC
    coordinate, and so do its nulls)."""
    ctf = batch.conditions.ctf
    group = None if ctf is None or ctf.group is None else ctf.group
    white = None if batch.noise_model is not None else \
        (batch.noise_std, batch.forward.imaging.offset)
    return null_log_evidence(batch.images, nulls, group, white)


def _write_result(output: Path, source, work: WorkFolder, chunks: list[range],
                  samples: int, max_junk: float | None = None,
                  table: bool = True) -> pd.DataFrame | Written:
    """The STAR (and .cs) of every chunk's columns with the junk probability from the
    mixture fitted over all particles (those below ``max_junk`` alone), the samples'
    .npz, then the work folder removed. The STAR is written a piece of the input's rows
    at a time (``write_particles``), each with its particles' columns from the chunk
    files (``ChunkColumns``). Returns the table written (``table``: held whole, the
    input's columns and the inferred ones) or ``Written``."""
    evidence = assemble_columns(work, len(chunks), set(EVIDENCE_COLUMNS))
    junk = assess_junk(torch.from_numpy(np.stack([evidence.pop(name)
                                                  for name in EVIDENCE_COLUMNS], -1)))
    p_junk = junk.p_junk.numpy()
    keep = None if max_junk is None else np.asarray(p_junk < max_junk)  # NaN (broken) out
    reader = ChunkColumns(work, chunks, skip=EVIDENCE_COLUMNS)
    names = [*reader.names(), JUNK_COLUMN]

    def values(start: int, stop: int) -> dict[str, np.ndarray]:
        return {**reader.read(start, stop), JUNK_COLUMN: p_junk[start:stop]}

    write_particles(output, source, added=names, values=values, keep=keep)
    if samples:
        write_samples(output.with_suffix(".npz"), work, chunks,
                      provenance_array("samples"), keep)
    if table:
        result = source.metadata  # the table is this call's own: no copy
        for key, value in values(0, len(source)).items():
            result[key] = value
        if keep is not None:
            result = result[keep]
    else:
        kept = slice(None) if keep is None else keep
        summary = assemble_columns(work, len(chunks), {"cryosviESS", "cryosviRefinedBySMC"})
        result = Written(len(source) if keep is None else int(keep.sum()), {})
        if "cryosviESS" in summary:
            result.ess_median = float(np.median(summary["cryosviESS"][kept]))
        if "cryosviRefinedBySMC" in summary:
            result.refined_by_smc = int(summary["cryosviRefinedBySMC"][kept].sum())
    work.remove()
    result.attrs["junk_fraction"] = junk.junk_fraction
    return result
