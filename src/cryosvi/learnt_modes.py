"""Conformational modes learnt from particles of known pose (issue 12).

The lowest ANM mode is a guess from elasticity; a real change (a hinge, a morph) is in
general none of the ANM modes, and in the frame of consensus poses it also moves the
molecule rigidly, which ANM modes (orthogonal to rigid motions by construction) cannot
represent. Measured on the realistic data set of ``benchmarks/realistic`` (a 30 deg
hinge of 1OL5's N-lobe): 69 % of the change's norm is rigid motion in the map frame, the
rest is spread over ANM modes 4-6, and a scan along ANM mode 1 ranks the conformations at
|Spearman| 0.33 even without noise, against 0.98 along the true change.

So the particles choose the direction. With every particle's pose, CTF and shift given
(a consensus refinement), each particle's displacement in a fitting basis -- the
reference's K lowest ANM modes and the 6 rigid motions, orthonormal 3N-vectors, the same
amplitude units as the modes (Å RMS per pseudo-atom) -- is fitted by Gauss-Newton to its
posterior mode with a Laplace covariance (``cryosvi.laplace``, a weak N(0, prior_std^2)
prior), and the directions along which the particles spread are the maximum-likelihood
subspace of these noisy estimates (``cryosvi.ppca``: each particle's own covariance
weighs what it says about each direction, e.g. nothing about a translation along its
line of sight). The result is a reference whose pseudo-atoms sit at the particles' mean
conformation and whose modes are the learnt directions, with prior stds equal to the
particles' spread along them; ``cryosvi train --reference`` then uses it as any other.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from cryosvi.anm import rigid_basis
from cryosvi.forward import ForwardModel
from cryosvi.laplace import gauss_newton
from cryosvi.ppca import principal_directions
from cryosvi.reference import Reference

FIT_STEP = 0.05
"""Å RMS: the finite-difference step of the amplitudes (cf. ``latents.Modes``)."""


def fitting_basis(reference: Reference) -> np.ndarray:
    """(K + 6, N, 3) float64: the reference's K modes and the 6 rigid motions of its
    pseudo-atoms (translations, rotations about the centroid), orthonormal as
    3N-vectors (ANM modes are orthogonal to rigid motions; re-orthonormalised here so
    that any reference's modes work)."""
    modes = np.asarray(reference.modes, np.float64).reshape(reference.n_modes, -1)
    stacked = np.concatenate([modes, rigid_basis(reference.coords).T])
    q, r = np.linalg.qr(stacked.T)
    q = q * np.sign(np.diagonal(r))  # keep each input vector's orientation
    return q.T.reshape(len(stacked), reference.n_atoms, 3)


def fit_amplitudes(forward: ForwardModel, images: Tensor, rotation: Tensor, ctf,
                   shifts: Tensor | None, noise_std: float, prior_std: float,
                   iterations: int = 10, batch_size: int = 64,
                   progress=None) -> tuple[Tensor, Tensor]:
    """Each particle's posterior mode (n, D) and Laplace covariance (n, D, D) float64 of
    the amplitudes of ``forward``'s D modes under a N(0, prior_std^2) prior (Å RMS), by
    Levenberg-Marquardt from 0 (``cryosvi.laplace.gauss_newton``).

    images (n, L, L) in the forward model's gray levels, noise std ``noise_std``;
    rotation (n, 4) quaternions; ctf a ``ParticleCTF`` of n; shifts (n, 2) Å or None.
    ``progress``: called with the number of particles done after each batch.
    """
    n, dim = images.shape[0], forward.n_modes
    device = forward.coords.device
    steps = torch.full((dim,), FIT_STEP, device=device)
    means = torch.zeros(n, dim, dtype=torch.float64)
    covariances = torch.zeros(n, dim, dim, dtype=torch.float64)
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(n, start + batch_size))
        data = images[rows].to(device)
        batch_rotation = rotation[rows].to(device)
        batch_ctf = ctf.take(rows).to(device)
        batch_shifts = None if shifts is None else shifts[rows].to(device)

        def residuals(point):
            amplitudes = point["a"]
            copies, batch = amplitudes.shape[:2]
            index = torch.arange(batch, device=device).repeat(copies)
            with torch.no_grad():
                model = forward(amplitudes.reshape(-1, dim), batch_rotation[index], None,
                                ctf=batch_ctf.take(index),
                                shifts=None if batch_shifts is None else batch_shifts[index])
            return ((model.reshape(copies, batch, -1) - data.reshape(1, batch, -1))
                    / noise_std)

        result = gauss_newton(
            {"a": torch.zeros(1, len(rows), dim, device=device)}, residuals,
            lambda point: -0.5 * (point["a"] / prior_std).square().sum(-1),
            lambda point, delta: {"a": point["a"] + delta},
            lambda mask, a, b: {"a": torch.where(mask[None, :, None], a["a"], b["a"])},
            steps, iterations=iterations)
        means[rows] = result.point["a"][0].double().cpu()
        covariances[rows] = torch.linalg.inv(result.precision).cpu()
        if progress is not None:
            progress(len(rows))
    return means, covariances


def learnt_reference(reference: Reference, basis: np.ndarray, means: Tensor,
                     covariances: Tensor, n_modes: int, source: dict) -> tuple[Reference, dict]:
    """The reference of the ``n_modes`` directions along which the particles spread
    (``cryosvi.ppca.principal_directions`` of the fitted amplitudes ``means`` (n, D) and
    ``covariances`` in the fitting ``basis`` (D, N, 3)): pseudo-atoms moved to the
    particles' mean conformation, modes (n_modes, N, 3) orthonormal, mode stds (Å RMS)
    the spread along each, eigenvalues the variances (Å^2). Also returns a summary:
    each direction's components in the fitting basis, its rigid fraction, the spread."""
    fit = principal_directions(means, covariances, n_modes)
    flat = basis.reshape(len(basis), -1)
    n_atoms = reference.n_atoms
    centre = fit.centre.numpy()
    coords = reference.coords + math.sqrt(n_atoms) * (centre @ flat).reshape(n_atoms, 3)
    directions = fit.directions.numpy()
    modes = (directions @ flat).reshape(n_modes, n_atoms, 3)
    std = fit.std.numpy()
    rigid = directions[:, -6:]
    summary = {
        "mode_std": std.round(4).tolist(),
        "rigid_fraction": np.linalg.norm(rigid, axis=1).round(4).tolist(),
        "components": directions.round(4).tolist(),
        "centre_rms": float(np.linalg.norm(centre)),
        "log_likelihood": fit.log_likelihood, "converged": fit.converged,
    }
    learnt = reference.with_settings(
        coords=coords.astype(np.float64), modes=modes, eigenvalues=std ** 2,
        priors=replace(reference.priors, mode_std=tuple(float(s) for s in std)),
        source={**reference.source, **source, "modes": "learnt", "learnt": summary})
    learnt.check("learnt reference: ")
    return learnt, summary
