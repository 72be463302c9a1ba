"""Calibration of the junk probability on a toy with a closed-form truth.

    PYTHONPATH=src python benchmarks/noise/junk_calibration.py [--n 4000] [--seeds 0 1]

Each image (24 px, coloured noise of a known spectrum T) is, with probabilities 1 - pi,
pi/2, pi/2: a particle, a known template m times a lognormal contrast (mean 1, log-std
``spread``) plus noise; empty (noise alone); or structureless (noise plus a stationary
Gaussian of the particles' mean power spectrum). The template is scaled to a whitened
norm |u| = ``snr_u`` (the particle's matched-filter SNR at contrast 1).

For each prior rule the loop is the one a data set would run: the contrast prior (mu,
tau) from the per-image least-squares contrasts (method of moments, ``contrast_prior``)
weighted by 1 - p_junk, the particle's evidence in closed form
(``NoiseModel``-style contrast marginal with the rule's floor), the null evidences
(``inference.junk.null_log_evidence``) and EM (``fit_junk_mixture``), six passes. The
oracle integrates the true lognormal prior numerically. Printed per setting: the fitted
junk fraction, the expected calibration error (10 bins of p_junk; |mean p - frequency|
weighted by the bin's share), the Brier score and the AUC.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from cryosvi.inference.junk import fit_junk_mixture, null_log_evidence
from cryosvi.physics import spectrum as sp
from cryosvi.physics.contrast import contrast_floor, contrast_marginal, contrast_prior
from cryosvi.physics.noise import NoiseModel, coloured_noise, log_det, whitened_products

RULES = {
    "Gaussian (no floor)": lambda mu, tau: -math.inf,
    "truncated at 0": lambda mu, tau: 0.0,
    "floor mu - 3 tau": lambda mu, tau: max(0.0, mu - 3 * tau),
    "floor mu - 2 tau (default)": contrast_floor,
    "floor mu / 2": lambda mu, tau: mu / 2,
}
SETTINGS = [(pi, snr_u, spread) for pi in (0.05, 0.2, 0.35) for snr_u in (2.0, 3.0, 5.0)
            for spread in (0.15, 0.3, 0.4)]


def toy(seed: int, n: int, pi: float, snr_u: float, spread: float, box: int = 24):
    g = torch.Generator().manual_seed(seed)
    nu = torch.arange(sp.n_shells(box), dtype=torch.float64) / box
    spectrum = (1 + 3 * torch.exp(-nu**2 / (2 * 0.06**2))) * 0.4 ** ((nu / 0.5) ** 2)
    y, x = torch.meshgrid(*(torch.arange(box, dtype=torch.float64) - box // 2,) * 2,
                          indexing="ij")
    blob = torch.exp(-(x**2 + y**2) / (2 * 2.5**2))
    template = torch.fft.irfft2(torch.fft.rfft2(blob) * torch.cos(sp.frequency_radius(box)
                                                                   / 2.5), s=(box, box))
    template = template * snr_u / whitened_products(template, template, spectrum)[2].sqrt()
    u = torch.rand(n, generator=g, dtype=torch.float64)
    kind = torch.where(u < pi / 2, 1, torch.where(u < pi, 2, 0))
    contrast = torch.exp(spread * torch.randn(n, generator=g, dtype=torch.float64)
                         - spread**2 / 2)
    power = sp.shell_average(sp.power_spectrum(template)) * float(contrast.square().mean())
    images = (coloured_noise(spectrum.expand(n, -1), box, g)
              + (kind == 0)[:, None, None] * contrast[:, None, None] * template
              + (kind == 2)[:, None, None] * coloured_noise(power.expand(n, -1), box, g))
    noise = NoiseModel(box, 2.0, spectrum[None], signal_power=power[None])
    return images, template.expand(n, box, box), kind, noise


def scores(p: np.ndarray, junk: np.ndarray) -> dict:
    bins = np.clip((p * 10).astype(int), 0, 9)
    ece = sum(abs(p[bins == b].mean() - junk[bins == b].mean()) * (bins == b).mean()
              for b in range(10) if (bins == b).any())
    order = np.argsort(p)
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    positives = junk.sum()
    auc = (ranks[junk == 1].sum() - positives * (positives + 1) / 2) / (
        positives * (len(p) - positives))
    return {"ece": ece, "brier": float(((p - junk) ** 2).mean()), "auc": auc}


def fitted(images, template, noise, rule, passes: int = 6) -> tuple[np.ndarray, float]:
    box = images.shape[-1]
    spectrum = noise.noise[0]
    nulls = null_log_evidence(images, noise)
    _, xm, mm = whitened_products(images, template, spectrum)
    estimates, stds = xm / mm, mm.rsqrt()
    weights = None
    for _ in range(passes):
        mu, tau = contrast_prior(estimates, stds, weights)
        rr, ur, uu = whitened_products(images - mu * template, template, spectrum)
        particle = contrast_marginal(rr, ur, uu, log_det(spectrum, box), box * box - 1, mu,
                                     tau, rule(mu, tau)).log_likelihood
        mixture = fit_junk_mixture(torch.cat([particle[:, None], nulls], 1))
        weights = 1 - mixture.p_junk
    return mixture.p_junk.numpy(), mixture.junk_fraction


def oracle(images, template, noise, spread) -> tuple[np.ndarray, float]:
    box = images.shape[-1]
    spectrum = noise.noise[0]
    rr, ur, uu = whitened_products(images, template, spectrum)
    grid = torch.linspace(1e-4, 5, 5000, dtype=torch.float64)
    log_like = (-0.5 * (box * box - 1) * math.log(2 * math.pi)
                - 0.5 * log_det(spectrum, box)
                - 0.5 * (rr[:, None] - 2 * grid * ur[:, None] + grid**2 * uu[:, None]))
    log_prior = (-torch.log(grid) - 0.5 * math.log(2 * math.pi * spread**2)
                 - (torch.log(grid) + spread**2 / 2) ** 2 / (2 * spread**2))
    particle = torch.logsumexp(log_like + log_prior, 1) + math.log(float(grid[1] - grid[0]))
    mixture = fit_junk_mixture(torch.cat([particle[:, None],
                                          null_log_evidence(images, noise)], 1))
    return mixture.p_junk.numpy(), mixture.junk_fraction


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    summary = {name: [] for name in ["oracle", *RULES]}
    print("pi  |u|  spread | rule: fitted pi, ECE, Brier, AUC")
    for pi, snr_u, spread in SETTINGS:
        for seed in args.seeds:
            images, template, kind, noise = toy(seed, args.n, pi, snr_u, spread)
            junk = (kind > 0).numpy().astype(float)
            rows = {"oracle": oracle(images, template, noise, spread)}
            rows.update({name: fitted(images, template, noise, rule)
                         for name, rule in RULES.items()})
            for name, (p, fraction) in rows.items():
                s = scores(p, junk)
                summary[name].append((abs(fraction - junk.mean()), s["ece"]))
                print(f"{pi:.2f} {snr_u:.0f} {spread:.2f} | {name:28s} {fraction:.3f} "
                      f"{s['ece']:.4f} {s['brier']:.4f} {s['auc']:.4f}")
    print("\nover every setting: |fitted - true junk fraction| median / max, ECE median / max")
    for name, values in summary.items():
        errors, eces = np.array(values).T
        print(f"{name:28s} {np.median(errors):.3f} / {errors.max():.3f}   "
              f"{np.median(eces):.4f} / {eces.max():.4f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
