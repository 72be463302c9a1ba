"""The training log (``log.jsonl``, one JSON record per epoch), its plot (``loss.png``)
and the line printed per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cryosvi.io.atomic import write_atomically
from cryosvi.latents import REGISTRY
from cryosvi.training.schedule import OBJECTIVES


def chunk_means(values, n_chunks: int) -> list[float]:
    chunks = np.array_split(np.asarray(values, dtype=float), min(n_chunks, len(values)))
    return [round(float(c.mean()), 6) for c in chunks]


def epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']:>3}", f"{record['objective']:>4}",
             f"loss {record['loss']:.4g}", f"val {record.get('val_loss', float('nan')):.4g}"]
    for key, label in (latent.headline for latent in REGISTRY.values()):
        if key in record:
            parts.append(f"{label} {record[key]:.3f}")
    parts.append(f"{record['seconds']:.0f} s")
    return " | ".join(parts)


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, epochs: int) -> None:
    """Drop log lines of epochs after the checkpoint (written before a crash)."""
    text = "".join(json.dumps(r) + "\n" for r in read_log(path) if r["epoch"] <= epochs)
    write_atomically(path, lambda temporary: temporary.write_text(text))


def plot_log(log: Path, output: Path) -> None:
    """loss.png: training loss per step (chunk means) and validation loss per epoch,
    with the validation pose error on a second panel when it was measured."""
    from matplotlib.figure import Figure

    records = read_log(log)
    if not records:
        return
    has_pose = any("val_pose_median_deg" in r for r in records)
    figure = Figure(figsize=(10 if has_pose else 6, 4), layout="constrained")
    axes = figure.subplots(1, 2 if has_pose else 1, squeeze=False)
    ax = axes[0, 0]
    series = {objective: ([], []) for objective in OBJECTIVES}
    previous = 0
    for r in records:
        chunk = r.get("loss_steps", [r["loss"]])
        positions = np.linspace(previous, r["step"], len(chunk) + 1)[1:]
        series[r["objective"]][0].extend(positions)
        series[r["objective"]][1].extend(chunk)
        previous = r["step"]
    labels = {"sim": "training: simulation -log q(z | x)", "elbo": "training: -ELBO / particle"}
    axis_of = {"sim": ax, "elbo": ax}
    if series["sim"][0] and series["elbo"][0]:
        axis_of["elbo"] = ax.twinx()  # different scales: ELBO on the right axis
        axis_of["elbo"].set_ylabel("-ELBO / particle", color="C1")
    for colour, objective in (("C0", "sim"), ("C1", "elbo")):
        xs, ys = series[objective]
        if not xs:
            continue
        target = axis_of[objective]
        target.scatter(xs, ys, s=4, color=colour, label=labels[objective])
        finite = [y for y in ys if np.isfinite(y)]
        if finite:
            low, high = np.percentile(finite, [1, 99])
            pad = max(high - low, 1e-3 * max(abs(high), 1.0))
            target.set_ylim(low - 0.05 * pad, high + 0.1 * pad)
    validation = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in validation], [r["val_loss"] for r in validation], "k.-",
            label="validation (simulated) -log q(z | x)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles = [h for a in set(axis_of.values()) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8)
    if has_pose:
        ax = axes[0, 1]
        ax.semilogy([r["epoch"] for r in records],
                    [r.get("val_pose_median_deg", np.nan) for r in records], "k.-")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation pose median error (deg)")
    write_atomically(output, lambda temporary: figure.savefig(temporary, dpi=90))
