"""Compare a posterior STAR file (from ``cryosvi infer``) with the ground truth.

Metrics
-------
* defocus and each mode amplitude: Pearson r, RMSE and bias (posterior mean - truth), Å;
* pose: geodesic angle (degrees) between the posterior-mean and the true rotation,
  summarised by median, mean and 90th percentile;
* calibration: the fraction of particles whose truth lies in the central credible region
  of level ``p``. Defocus and modes: ``mean +- z std`` with ``z = Phi^-1((1 + p) / 2)``
  (Gaussian posterior). Pose: geodesic error ``<=`` the radius of the posterior's credible
  ball at level p (``cryosviPoseRadius68Deg``, ``cryosviPoseRadius95Deg``: sample
  quantiles of the distance to the posterior mean, ``cryosvi.latents.Pose``); at other
  levels (the calibration curve), and in files without those columns, ``<= sigma *
  chi_3^-1(p)`` with sigma = ``cryosviPoseStdDeg``, because a small isotropic Gaussian
  rotation error with per-axis std sigma has a rotation angle distributed as sigma times
  a chi variable with 3 degrees of freedom. A calibrated posterior gives coverage ~= p.
* pose after the frame alignment (``frame_aligned``): the same numbers once the rotation
  between the two files' molecule frames is taken out (``latents.pose.frame_alignment``:
  one rotation, plus one per unit of each of the truth's conformation coordinates,
  ``cryosviTrueConformation*`` and ``cryosviModeAmplitude*`` columns). A flexible
  molecule has no single frame: a learnt mode's rigid-body part, or a reference turned
  against the truth's, turns every pose by a rotation the images cannot tell from the
  pose's own, so this is the pose's error as the posterior can know it.
* junk: where the truth has ``cryosviTrueJunk`` (1: the image holds no particle), those
  particles have no pose, defocus or conformation and are left out of every metric
  above; with ``cryosviJunkProbability`` in the posterior, its AUC (the probability that
  a junk image scores above a real one, ties counted half) and the fractions above 0.5.

Only the latents the truth has columns for are scored (a RELION refinement has angles
and defocus but no mode amplitudes); the others are listed under ``skipped``. Rows are
matched by ``rlnImageName``; files without names in either are matched by row order only
when asked (``match_by_order``). Coverages are computed only where the posterior has the
std column. All quantiles come from scipy, so levels and radii agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from cryosvi.errors import CryosviError
from cryosvi.io.atomic import write_atomically
from cryosvi.io.particles import ParticleSet, numeric_column
from cryosvi.latents import CREDIBLE_LEVELS, JUNK_COLUMN, REGISTRY

NAME_COLUMN = "rlnImageName"
TRUE_JUNK_COLUMN = "cryosviTrueJunk"
"""Truth column: 1 where the image holds no particle (junk), else 0."""
TRUE_CONFORMATION_PREFIX = "cryosviTrueConformation"
"""Truth columns of conformation coordinates that are not mode amplitudes (the realistic
benchmark's hinge angle)."""

COVERAGE_LEVELS = {f"coverage{round(100 * p)}": p for p in CREDIBLE_LEVELS}
"""The two headline credible levels, by their key in the metrics."""
CALIBRATION_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
"""Nominal levels of the calibration curve."""

PLOT_FILES = ("truth_vs_prediction.png", "pose_error.png", "calibration.png")
METRICS_FILE = "metrics.json"


# ----------------------------------------------------------------------------- metrics


def pearson_r(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Pearson correlation of two (N,) arrays; NaN when either is constant or N < 2."""
    truth, prediction = np.asarray(truth, float), np.asarray(prediction, float)
    if truth.size < 2:
        return math.nan
    a, b = truth - truth.mean(), prediction - prediction.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    # Constant input (e.g. a latent fixed during inference): r is undefined, not 0.
    if denominator == 0:
        return math.nan
    return float(np.clip(a @ b / denominator, -1.0, 1.0))


def rmse(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Root-mean-square error of two (N,) arrays, in their unit."""
    difference = np.asarray(prediction, float) - np.asarray(truth, float)
    return float(np.sqrt(np.mean(difference**2)))


def gaussian_radius(level: float) -> float:
    """z with P(|X| <= z) = level for X ~ N(0, 1) (0.994 for 0.68, 1.960 for 0.95)."""
    return float(stats.norm.ppf(0.5 + level / 2))


def gaussian_coverage(truth: np.ndarray, mean: np.ndarray, std: np.ndarray,
                      level: float) -> float:
    """Fraction of (N,) truths inside ``mean +- z(level) * std`` (any common unit)."""
    inside = np.abs(np.asarray(truth, float) - np.asarray(mean, float)) \
        <= gaussian_radius(level) * np.asarray(std, float)
    return float(np.mean(inside))


def junk_auc(p_junk: np.ndarray, is_junk: np.ndarray) -> float:
    """P(a junk image's score > a real one's), ties counted half: the Mann-Whitney U of
    the two groups over the product of their counts (NaN without both kinds)."""
    junk, real = p_junk[is_junk], p_junk[~is_junk]
    if not (len(junk) and len(real)):
        return math.nan
    return float(stats.mannwhitneyu(junk, real).statistic) / (len(junk) * len(real))


def error_summary(error_deg: np.ndarray) -> dict:
    """Median, mean and 90th percentile of (N,) pose errors, degrees."""
    error_deg = np.asarray(error_deg, float)
    return {"median_error_deg": float(np.median(error_deg)),
            "mean_error_deg": float(np.mean(error_deg)),
            "p90_error_deg": float(np.percentile(error_deg, 90))}


# ----------------------------------------------------------------------- table handling


def _std_column(table: ParticleSet, column: str) -> np.ndarray:
    values = numeric_column(table, column)
    if (values < 0).any():
        raise CryosviError(f"{table.path}: column {column} has negative values (a "
                           "spread cannot be negative)")
    return values


def match_rows(posterior: ParticleSet, truth: ParticleSet,
               match_by_order: bool = False) -> tuple[np.ndarray, str]:
    """Index into ``truth`` for each posterior row, and how rows were matched.

    By rlnImageName when both tables have it (without duplicates; every posterior row
    must be in the truth, which may hold more: ``infer --max-junk`` writes a subset);
    by row order (the counts must be equal) only with ``match_by_order``,
    else a CryosviError: unnamed rows matched by position can silently pair the wrong
    particles.
    """
    n_post, n_truth = len(posterior), len(truth)
    if NAME_COLUMN in posterior.metadata.columns and NAME_COLUMN in truth.metadata.columns:
        names_post = posterior.metadata[NAME_COLUMN].astype(str)
        names_truth = truth.metadata[NAME_COLUMN].astype(str)
        for table, names in ((posterior, names_post), (truth, names_truth)):
            duplicated = names[names.duplicated()]
            if len(duplicated):
                raise CryosviError(f"{table.path}: {len(duplicated)} duplicate {NAME_COLUMN}"
                                   f"(s), e.g. {duplicated.iloc[0]}")
        position = pd.Series(np.arange(n_truth), index=names_truth.to_numpy())
        missing = names_post[~names_post.isin(position.index)]
        if len(missing):
            example = f"; e.g. {missing.iloc[0]} is not in the truth" if len(missing) else ""
            raise CryosviError(
                f"posterior and truth describe different particles: {n_post} vs {n_truth} "
                f"particles, {n_post - len(missing)} {NAME_COLUMN}s in common{example}")
        return position.loc[names_post.to_numpy()].to_numpy(), NAME_COLUMN
    if not match_by_order:
        unnamed = [t.path for t in (posterior, truth) if NAME_COLUMN not in t.metadata.columns]
        raise CryosviError(f"{unnamed[0]} has no {NAME_COLUMN} to match the particles by; "
                           "give --match-by-order to pair them by row order")
    if n_post != n_truth:
        raise CryosviError(f"posterior has {n_post} particles but truth has {n_truth} "
                           f"(no {NAME_COLUMN} in both files to match them by)")
    return np.arange(n_truth), "row order"


def _latent_metrics(truth: np.ndarray, mean: np.ndarray, std: np.ndarray | None,
                    unit: str, std_column: str) -> dict:
    r = pearson_r(truth, mean)
    metrics = {"unit": unit, "pearson_r": r if math.isfinite(r) else None,
               "rmse": rmse(truth, mean),
               "bias": float(np.mean(mean - truth)), "std_column": std_column}
    for key, level in COVERAGE_LEVELS.items():
        metrics[key] = None if std is None else gaussian_coverage(truth, mean, std, level)
    metrics["mean_posterior_std"] = None if std is None else float(np.mean(std))
    return metrics


def evaluate_tables(posterior: ParticleSet, truth: ParticleSet,
                    match_by_order: bool = False) -> dict:
    """All metrics of a posterior table against the truth, as a JSON-ready dict.

    Scored: pose (rlnAngleRot/Tilt/Psi), defocus (rlnDefocusU) and each
    ``cryosviModeAmplitude{k}`` wherever both files have the columns; at least one latent
    must be in common. Optional (coverage): cryosviDefocusStd,
    cryosviModeAmplitudeStd{k}, cryosviPoseStdDeg, cryosviPoseRadius68Deg/95Deg. Undefined numbers (e.g. r of a
    constant column, a skipped coverage) are None; ``pose`` is None when not scored.
    Rows the truth marks as junk (``TRUE_JUNK_COLUMN`` 1) are left out of every score
    ('n_particles' counts the rest) and scored under 'junk'. Schema: see
    ``write_report``; the per-particle arrays are under the private key ``"_arrays"``
    (removed before writing JSON). ``match_by_order``: see ``match_rows``.
    """
    skipped: list[str] = []
    # Scalar latents and those scored by the size of their error, each as its latent
    # defines them (cryosvi.latents).
    columns = [entry for latent in REGISTRY.values()
               for entry in latent.truth_columns(posterior, truth)]
    errors = [score for latent in REGISTRY.values()
              if (score := latent.truth_error(posterior, truth)) is not None]
    scored = {name for name, _, _ in columns} | {score.name for score in errors}
    for latent in REGISTRY.values():
        if latent.truth_label and latent.name not in scored:
            skipped.append(f"{latent.name}: no {latent.truth_label} in both files")
    truth_modes = set(truth.mode_columns())
    missing_modes = [c for c in posterior.mode_columns() if c not in truth_modes]
    if missing_modes:
        skipped.append(f"{', '.join(missing_modes)}: not in the truth")
    if not (errors or columns):
        labels = [latent.truth_label for latent in REGISTRY.values() if latent.truth_label]
        raise CryosviError(f"nothing to score: {posterior.path} and {truth.path} have no "
                           f"latent in common ({', '.join(labels)}, "
                           "cryosviModeAmplitude1..K)")
    order, matched_by = match_rows(posterior, truth, match_by_order)
    junk = None
    if truth.has(TRUE_JUNK_COLUMN):
        is_junk = numeric_column(truth, TRUE_JUNK_COLUMN)[order] == 1
        if is_junk.all():
            raise CryosviError(f"{truth.path}: every particle is junk ({TRUE_JUNK_COLUMN} "
                               "1): nothing to score")
        junk = _junk_metrics(posterior, is_junk)
        if is_junk.any():  # a junk image has no pose, defocus or conformation
            posterior, order = posterior.subset(np.flatnonzero(~is_junk)), order[~is_junk]
    covariates = [c for c in truth.columns
                  if c.startswith(TRUE_CONFORMATION_PREFIX)] + truth.mode_columns()

    latents: dict[str, dict] = {}
    arrays: dict[str, dict] = {}
    for name, read, std_column in columns:
        true_values, mean = read(truth)[order], read(posterior)
        std = None
        if std_column in posterior.metadata.columns:
            std = _std_column(posterior, std_column)
        else:
            skipped.append(f"coverage of {name}: no column {std_column} in the posterior")
        latents[name] = _latent_metrics(true_values, mean, std, "Å", std_column)
        arrays[name] = {"truth": true_values, "mean": mean, "std": std}
    extra = [c for c in truth.mode_columns() if c not in posterior.mode_columns()]
    if extra:
        skipped.append(f"{len(extra)} truth mode(s) not in the posterior: {', '.join(extra)}")
    by_error = {score.name: _error_metrics(score, posterior, truth, order, covariates,
                                           arrays, skipped)
                for score in errors}

    calibration = {"levels": list(CALIBRATION_LEVELS)}
    for name, latent in arrays.items():
        if latent["std"] is None:
            continue
        if "error" in latent:
            observed = [latent["coverage"](latent["error"], latent["std"], p)
                        for p in CALIBRATION_LEVELS]
        else:
            observed = [gaussian_coverage(latent["truth"], latent["mean"], latent["std"], p)
                        for p in CALIBRATION_LEVELS]
        calibration[name] = observed

    return {
        "n_particles": len(posterior), "truth_particles": len(truth),
        "posterior": str(posterior.path), "truth": str(truth.path),
        "matched_by": matched_by,
        "coverage_levels": dict(COVERAGE_LEVELS),
        "latents": latents,
        **{latent.name: None for latent in REGISTRY.values() if latent.scored_by_error},
        **by_error, "junk": junk, "calibration": calibration,
        "skipped": skipped, "_arrays": arrays,
    }


def _junk_metrics(posterior: ParticleSet, is_junk: np.ndarray) -> dict:
    """The junk's count and, with ``JUNK_COLUMN`` in the posterior, how it ranks them."""
    out = {"particles": int(is_junk.sum()), "real_particles": int((~is_junk).sum()),
           "auc": None, "junk_above_half": None, "real_above_half": None}
    if posterior.has(JUNK_COLUMN):
        p = numeric_column(posterior, JUNK_COLUMN)
        auc = junk_auc(p, is_junk)
        out.update(auc=auc if math.isfinite(auc) else None,
                   junk_above_half=float(np.mean(p[is_junk] > 0.5)) if is_junk.any() else None,
                   real_above_half=float(np.mean(p[~is_junk] > 0.5)))
    return out


def _coverages(score, posterior: ParticleSet, error: np.ndarray, std) -> dict:
    """coverage68/95 of errors (N,) on the credible radius columns, else on the spread,
    each with the interval it was scored on."""
    metrics = {}
    for key, level in COVERAGE_LEVELS.items():
        interval = score.intervals.get(level)
        if interval in posterior.metadata.columns:
            metrics[key] = float(np.mean(error <= _std_column(posterior, interval)))
        elif std is not None:
            interval = score.std_label
            metrics[key] = score.std_coverage(error, std, level)
        else:
            interval = metrics[key] = None
        metrics[f"{key}_interval"] = interval
    return metrics


def _error_metrics(score, posterior: ParticleSet, truth: ParticleSet, order: np.ndarray,
                   covariates: list[str], arrays: dict, skipped: list[str]) -> dict:
    """A latent scored by the size of its error (``latents.ErrorScore``, e.g. the pose's
    geodesic angle): its summary and coverage, and the same once the frames are aligned
    (with the truth's ``covariates`` columns); fills ``arrays[score.name]``."""
    error = score.error(posterior, truth, order)
    std = None
    if score.std_column in posterior.metadata.columns:
        std = _std_column(posterior, score.std_column)
    else:
        skipped.append(f"coverage of {score.name}: no column {score.std_column} in the "
                       "posterior")
    metrics = {"unit": score.unit, **error_summary(error), "std_column": score.std_column,
               **_coverages(score, posterior, error, std)}
    metrics[f"median_posterior_std_{score.unit}"] = None if std is None else float(np.median(std))
    arrays[score.name] = {"error": error, "std": std, "coverage": score.std_coverage}
    if score.aligned is not None:
        values = np.stack([numeric_column(truth, c)[order] for c in covariates], -1) \
            if covariates else np.zeros((len(order), 0))
        found = score.aligned(posterior, truth, order, values)
        metrics["frame_aligned"] = None
        if found is None:
            skipped.append(f"{score.name} after the frame alignment: too few particles")
        else:
            aligned, frame = found
            metrics["frame_aligned"] = {"covariates": covariates, **frame,
                                        **error_summary(aligned),
                                        **_coverages(score, posterior, aligned, std)}
            arrays[score.name]["aligned"] = aligned
    return metrics


# ----------------------------------------------------------------------------- output


def _json_ready(value):
    """NaN/inf -> None (strict JSON has no NaN); numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _save_figure(figure, path: Path) -> None:
    write_atomically(path, lambda t: figure.savefig(t, format="png", dpi=110))


def format_table(metrics: dict) -> str:
    """A compact text table of the headline numbers (for stdout)."""
    def number(value, spec):
        return "-" if value is None or not math.isfinite(value) else format(value, spec)

    lines = [f"{'latent':<10}{'r':>8}{'RMSE':>12}{'cov68':>8}{'cov95':>8}"]
    for name, m in metrics["latents"].items():
        lines.append(f"{name:<10}{number(m['pearson_r'], '.4f'):>8}"
                     f"{number(m['rmse'], '.4g') + ' ' + m['unit']:>12}"
                     f"{number(m['coverage68'], '.3f'):>8}{number(m['coverage95'], '.3f'):>8}")
    pose = metrics["pose"]
    if pose is not None:
        lines.append(f"{'pose':<10}{'':>8}{'':>12}{number(pose['coverage68'], '.3f'):>8}"
                     f"{number(pose['coverage95'], '.3f'):>8}")
        lines.append(f"pose error (deg): median {pose['median_error_deg']:.3g}, "
                     f"mean {pose['mean_error_deg']:.3g}, 90th percentile "
                     f"{pose['p90_error_deg']:.3g}  ({metrics['n_particles']} particles)")
        aligned = pose.get("frame_aligned")
        if aligned is not None:
            lines.append(f"  after the frame alignment: median {aligned['median_error_deg']:.3g}, "
                         f"90th percentile {aligned['p90_error_deg']:.3g}, cov68 "
                         f"{number(aligned['coverage68'], '.3f')}, cov95 "
                         f"{number(aligned['coverage95'], '.3f')}")
    junk = metrics.get("junk")
    if junk is not None:
        lines.append(f"junk: {junk['particles']} particles left out of the scores"
                     + ("" if junk["auc"] is None else
                        f"; {JUNK_COLUMN} AUC {junk['auc']:.4f}, above 0.5: junk "
                        f"{number(junk['junk_above_half'], '.3f')}, real "
                        f"{number(junk['real_above_half'], '.3f')}"))
    unscored = metrics.get("truth_particles", 0) - metrics["n_particles"] - (
        0 if junk is None else junk["particles"])
    if unscored > 0:
        lines.append(f"{unscored} of the truth's {metrics['truth_particles']} particles are "
                     "not in the posterior (a subset, e.g. infer --max-junk)")
    for reason in metrics["skipped"]:
        lines.append(f"skipped: {reason}")
    return "\n".join(lines)


def _plot_truth_vs_prediction(metrics: dict, arrays: dict):
    from matplotlib.figure import Figure

    names = list(metrics["latents"])
    if not names:
        return _note_figure("no defocus or mode amplitude scored")
    columns = min(len(names), 3)
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4.2 * columns, 4.0 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, name in zip(axes, names):
        data, m = arrays[name], metrics["latents"][name]
        n = data["truth"].size
        alpha = float(np.clip(300 / n, 0.08, 0.8))  # dense sets stay readable
        if data["std"] is not None and n <= 500:
            axis.errorbar(data["truth"], data["mean"], yerr=data["std"], fmt="o", ms=3,
                          alpha=alpha, elinewidth=0.8, color="C0")
        else:
            axis.scatter(data["truth"], data["mean"], s=6, alpha=alpha, color="C0",
                         linewidths=0)
        low = min(data["truth"].min(), data["mean"].min())
        high = max(data["truth"].max(), data["mean"].max())
        axis.plot([low, high], [low, high], "k--", lw=1, label="identity")
        r = "n/a" if m["pearson_r"] is None else f"{m['pearson_r']:.3f}"
        axis.set_title(f"{name}: r = {r}, RMSE = {m['rmse']:.3g} {m['unit']}", fontsize=10)
        axis.set_xlabel(f"truth ({m['unit']})")
        axis.set_ylabel(f"posterior mean ({m['unit']})")
    for axis in axes[len(names):]:
        axis.set_visible(False)
    return figure


def _plot_pose_error(metrics: dict, arrays: dict):
    from matplotlib.figure import Figure

    pose = metrics["pose"]
    if pose is None:
        return _note_figure("pose not scored (no angles in both files)")
    error = arrays["pose"]["error"]
    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    # Log bins show both the near-correct core and the flipped-pose tail; errors below
    # 1e-3 deg are piled into the first bin rather than dropped.
    floor = 1e-3
    high = max(float(error.max()), 10 * floor)
    low = max(min(float(error.min()), high / 10), floor)
    bins = np.geomspace(low, high * 1.0001, 40)
    axis.hist(np.clip(error, low, None), bins=bins, color="C0", alpha=0.8)
    aligned = arrays["pose"].get("aligned")
    if aligned is not None:
        axis.hist(np.clip(aligned, low, None), bins=bins, histtype="step", color="k",
                  lw=1.2, label="after the frame alignment (median "
                                f"{pose['frame_aligned']['median_error_deg']:.3g}°)")
    axis.set_xscale("log")
    median = max(pose["median_error_deg"], low)
    axis.axvline(median, color="C3", lw=2, label=f"median {pose['median_error_deg']:.3g}°")
    axis.axvline(max(pose["p90_error_deg"], low), color="C1", lw=1.5, ls="--",
                 label=f"90th percentile {pose['p90_error_deg']:.3g}°")
    axis.set_xlabel("pose geodesic error (degrees)")
    axis.set_ylabel("particles")
    axis.set_title(f"pose error, {error.size} particles (mean {pose['mean_error_deg']:.3g}°)",
                   fontsize=10)
    axis.legend()
    return figure


def _note_figure(text: str):
    """A small figure that says why there is no plot."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3), layout="constrained")
    axis = figure.subplots()
    axis.text(0.5, 0.5, text, ha="center", va="center")
    axis.set_axis_off()
    return figure


def _plot_calibration(metrics: dict):
    from matplotlib.figure import Figure

    calibration = metrics["calibration"]
    levels = calibration["levels"]
    figure = Figure(figsize=(5, 5), layout="constrained")
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    curves = [name for name in calibration if name != "levels"]
    for i, name in enumerate(curves):
        axis.plot(levels, calibration[name], "o-", ms=3, color=f"C{i}", label=name)
    if not curves:
        axis.text(0.5, 0.5, "no std columns in the posterior", ha="center", va="center")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_aspect("equal")
    axis.set_xlabel("credible level (expected coverage)")
    axis.set_ylabel("observed coverage")
    axis.set_title(f"calibration, {metrics['n_particles']} particles", fontsize=10)
    axis.legend(loc="upper left", fontsize=8)
    return figure


def write_report(metrics: dict, posterior: ParticleSet, truth: ParticleSet,
                 directory: str | Path) -> list[Path]:
    """Write ``metrics.json`` and the three PNGs into ``directory`` (created); returns paths.

    ``metrics`` comes from :func:`evaluate_tables` on the same tables (its per-particle
    arrays are used for the plots; recomputed if absent). Each file is written atomically
    and overwrites an existing one.

    metrics.json::

        {"n_particles": int, "truth_particles": int (the truth's rows; the posterior may
         hold a subset), "posterior": str, "truth": str,
         "matched_by": "rlnImageName" | "row order",
         "coverage_levels": {"coverage68": 0.68, "coverage95": 0.95},
         "latents": {"defocus" | "mode<k>": {"unit": "Å", "pearson_r": float|null,
                     "rmse": float, "bias": float, "std_column": str,
                     "coverage68": float|null, "coverage95": float|null,
                     "mean_posterior_std": float|null}},
         "pose": null (not scored) | {"unit": "deg", "median_error_deg", "mean_error_deg", "p90_error_deg",
                  "std_column": str, "coverage68": float|null, "coverage95": float|null,
                  "coverage68_interval", "coverage95_interval": the radius column scored,
                  "chi3 x cryosviPoseStdDeg" or null, "median_posterior_std_deg": float|null,
                  "frame_aligned": null | {"covariates": [truth column, ...],
                     "rotation_deg": [3], "per_unit_deg": [[3], ...], "particles_fitted": int,
                     the error summary and coverages as above}},
         "junk": null (no cryosviTrueJunk in the truth) | {"particles", "real_particles": int,
                  "auc", "junk_above_half", "real_above_half": float|null},
         "calibration": {"levels": [0.1, ..., 0.99], "<latent>" | "pose": [observed, ...]},
         "skipped": [str, ...]}
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CryosviError(f"cannot create output directory {directory}: {error}") from None
    arrays = metrics.get("_arrays") or evaluate_tables(posterior, truth)["_arrays"]
    paths = []
    text = json.dumps(_json_ready(metrics), indent=2, ensure_ascii=False) + "\n"
    path = directory / METRICS_FILE
    write_atomically(path, lambda t: t.write_text(text, encoding="utf-8"))
    paths.append(path)
    figures = (_plot_truth_vs_prediction(metrics, arrays), _plot_pose_error(metrics, arrays),
               _plot_calibration(metrics))
    for name, figure in zip(PLOT_FILES, figures):
        _save_figure(figure, directory / name)
        paths.append(directory / name)
    return paths
