"""Conformational modes learnt from particles of known pose.

The lowest ANM mode is a guess from elasticity; a real change (a hinge, a morph) is in
general none of the ANM modes, and in the frame of consensus poses it also moves the
molecule rigidly, which ANM modes (orthogonal to rigid motions by construction) cannot
represent. Measured on the realistic data set of ``benchmarks/realistic`` (a 30 deg
hinge of 1OL5's N-lobe): 69 % of the change's norm is rigid motion in the map frame, the
rest is spread over ANM modes 4-6, and a scan along ANM mode 1 ranks the conformations at
|Spearman| 0.33 even without noise, against 0.98 along the true change.

So the particles choose the direction. With every particle's pose, CTF and shift given
(a consensus refinement), each particle's displacement in a fitting basis -- the rigid
motions of 3 compact blocks of pseudo-atoms or of 3 segments of the chain, or the
reference's K lowest ANM modes and the 6 rigid motions; orthonormal 3N-vectors, the
amplitude units of the modes (Å RMS per pseudo-atom) -- is fitted by Gauss-Newton to its
posterior mode with a Laplace covariance (``cryosvi.inference.laplace``, a weak N(0, prior_std^2)
prior), and the directions along which the particles spread are the maximum-likelihood
subspace of these noisy estimates (``cryosvi.inference.ppca``: each particle's own covariance
weighs what it says about each direction, e.g. nothing about a translation along its
line of sight). Along each learnt direction, the particles' mean conformation and
spread are then measured from each particle's likelihood on a grid
(``cryosvi.inference.population``): at low SNR the fits stop short of the particles'
conformations, and so does their mean. The result is a reference whose pseudo-atoms sit
at the particles' mean conformation and whose modes are the learnt directions, with prior
stds equal to the particles' spread along them; ``cryosvi train --reference`` then uses
it as any other.

Which basis holds a change depends on the molecule: a domain's hinge is a rigid motion
of a block, an ANM mode of a small single-domain protein is not (ubiquitin's mode 1: its
projection on the 3-block span has norm 0.83, and the direction learnt there from 600
particles at SNR 1 misses it, overlap 0.16, against 0.98 in the ANM basis). By default
every basis is tried, and the learnt reference kept is the one along whose directions
the particles' spread explains their images best (``population.spread_evidence``, each
on its own grid).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from cryosvi.dataset import (ParticleData, has_ctf_estimates, priors_from_particles,
                             working_reference)
from cryosvi.noise_data import (estimate_noise_model, matched_noise_model,
                                resolve_noise_model)
from cryosvi.errors import CryosviError
from cryosvi.io.particles import ANGLES, ParticleSet
from cryosvi.latents import BY_NAME, JUNK_COLUMN
from cryosvi.physics.anm import rigid_basis
from cryosvi.physics.forward import ForwardModel
from cryosvi.physics.graylevels import MEASURABLE_Z, GrayLevels
from cryosvi.physics.noise import NoiseModel
from cryosvi.inference.envelope import fitted_envelope
from cryosvi.inference.fitting_basis import BASES, fitting_basis
from cryosvi.inference.junk import junk_weights
from cryosvi.inference.laplace import gauss_newton
from cryosvi.inference.population import population_moments
from cryosvi.inference.ppca import PrincipalDirections, principal_directions
from cryosvi.reference import Reference

FIT_STEP = 0.05
"""Å RMS: the finite-difference step of the amplitudes (cf. ``latents.Modes``)."""
GRAY_LEVEL_IMAGES = 2000
"""Particles whose images fix the gray levels and noise std against the model at their
given poses (``graylevels.fit_scale_with_poses``)."""
REFIT_TOLERANCE = 0.02
"""Relative change of the gray-level scale, between the undeformed model and the fitted
conformations, above which the amplitudes are fitted again with the new gray levels."""


def fit_amplitudes(forward: ForwardModel, images, rotation: Tensor, ctf,
                   shifts: Tensor | None, noise_std: float, prior_std: float,
                   iterations: int = 10, batch_size: int = 64,
                   progress=None, noise_model: NoiseModel | None = None
                   ) -> "AmplitudeFit":
    """Each particle's posterior mode (n, D) and Laplace covariance (n, D, D) float64 of
    the amplitudes of ``forward``'s D modes under a N(0, prior_std^2) prior (Å RMS), by
    Levenberg-Marquardt from 0 (``cryosvi.inference.laplace.gauss_newton``), with the
    misfits |r|^2 / 2 at the mode and |r_0|^2 / 2 of an image with no particle (the
    gray levels' offset and the noise alone), r the whitened residuals: what
    ``AmplitudeFit.log_bayes`` needs.

    images: (n, L, L) in the forward model's gray levels, noise std ``noise_std``, or a
    function of particle positions (k,) int64 returning their (k, L, L) images, read
    ``batch_size`` at a time (e.g. from a memory-mapped stack: then only a batch of
    images is in memory); rotation (n, 4) quaternions; ctf a ``ParticleCTF`` of n;
    shifts (n, 2) Å or None. ``progress``: called with the number of particles done
    after each batch. The batches are fitted independently, so the result does not
    depend on where the images come from. ``noise_model``: the images' coloured noise
    (``cryosvi.physics.noise.NoiseModel`` at their box): the residuals are whitened by
    it, with the contrast profiled (``NoiseModel.residuals``), instead of divided by
    ``noise_std``.
    """
    read = images if callable(images) else images.__getitem__
    n, dim = rotation.shape[0], forward.n_modes
    device = forward.coords.device
    steps = torch.full((dim,), FIT_STEP, device=device)
    means = torch.zeros(n, dim, dtype=torch.float64)
    covariances = torch.zeros(n, dim, dim, dtype=torch.float64)
    misfits = torch.zeros(n, 2, dtype=torch.float64)
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(n, start + batch_size))
        data = read(rows).to(device)
        batch_rotation = rotation[rows].to(device)
        batch_ctf = ctf.take(rows).to(device)
        batch_shifts = None if shifts is None else shifts[rows].to(device)

        def whitened(model):
            """The residuals of model images (copies, batch, L, L) against the data."""
            copies, batch = model.shape[:2]
            if noise_model is not None:
                group = batch_ctf.group
                return noise_model.residuals(data[None], model,
                                             None if group is None else group.to(device))
            return ((model.reshape(copies, batch, -1) - data.reshape(1, batch, -1))
                    / noise_std)

        def residuals(point):
            amplitudes = point["a"]
            copies, batch = amplitudes.shape[:2]
            index = torch.arange(batch, device=device).repeat(copies)
            with torch.no_grad():
                model = forward(amplitudes.reshape(-1, dim), batch_rotation[index], None,
                                ctf=batch_ctf.take(index),
                                shifts=None if batch_shifts is None else batch_shifts[index])
            return whitened(model.view(copies, *data.shape))

        result = gauss_newton(
            {"a": torch.zeros(1, len(rows), dim, device=device)}, residuals,
            lambda point: -0.5 * (point["a"] / prior_std).square().sum(-1),
            lambda point, delta: {"a": point["a"] + delta},
            lambda mask, a, b: {"a": torch.where(mask[None, :, None], a["a"], b["a"])},
            steps, iterations=iterations)
        means[rows] = result.point["a"][0].double().cpu()
        covariances[rows] = torch.linalg.inv(result.precision).cpu()
        empty = torch.full_like(data, forward.imaging.offset)[None]
        misfits[rows, 0] = result.misfit.double().cpu()
        misfits[rows, 1] = 0.5 * whitened(empty).double().square().sum(-1)[0].cpu()
        if progress is not None:
            progress(len(rows))
    return AmplitudeFit(means, covariances, misfits[:, 0], misfits[:, 1], prior_std)


class AmplitudeFit(NamedTuple):
    """``fit_amplitudes``' result: means (n, D), covariances (n, D, D), misfit (n,) at
    the mode and misfit_empty (n,) of an image with no particle (half squared whitened
    residual norms) float64; prior_std: the fit's prior std (Å RMS)."""

    means: Tensor
    covariances: Tensor
    misfit: Tensor
    misfit_empty: Tensor
    prior_std: float

    def log_bayes(self, centre: Tensor | None = None, factor: Tensor | None = None
                  ) -> Tensor:
        """(n,) float64: each particle's log Bayes factor of the molecule, its
        amplitudes drawn from a population N(centre, W W^T) (``centre`` (D,), ``factor``
        W (D, k); None: the structure itself, a = 0), against an image with no particle.

        The fit's prior (prior_std, a regulariser 10 Å wide on every amplitude) is no
        population: its Occam factor would cost a real particle tens of nats and make
        the evidence useless for telling it from junk at low SNR (measured: at SNR 0.1
        the real particles' factors had median -8.5 nats, and a mixture fitted a junk
        fraction of 0.74 for 0.11). Here the misfit about the mode a^ is its Gauss-Newton
        quadratic, misfit(a) = m^ + g^T (a - a^) + 1/2 (a - a^)^T H_L (a - a^), with H_L =
        H - I / prior_std^2 the likelihood's precision and g = -a^ / prior_std^2 its
        gradient at the posterior mode; with a = c + W z, z ~ N(0, I_k), the integral is
        closed form: log B = misfit_empty - f_0 - 1/2 log det A + 1/2 b^T A^-1 b, d = c -
        a^, f_0 = m^ + g^T d + 1/2 d^T H_L d, b = W^T (g + H_L d), A = I + W^T H_L W
        (Gaussian integrals, e.g. Bishop 2006, sec. 2.3.3)."""
        precision = torch.linalg.inv(self.covariances)
        dim = precision.shape[-1]
        inverse_variance = 1.0 / self.prior_std**2
        likelihood = precision - inverse_variance * torch.eye(dim, dtype=precision.dtype)
        gradient = -inverse_variance * self.means
        centre = torch.zeros(dim, dtype=torch.float64) if centre is None else centre.double()
        d = centre - self.means
        h_d = (likelihood @ d[..., None])[..., 0]
        log_b = self.misfit_empty - (self.misfit + (gradient * d).sum(-1)
                                     + 0.5 * (d * h_d).sum(-1))
        if factor is not None:
            w = factor.double()
            a = torch.eye(w.shape[1], dtype=torch.float64) + w.T @ likelihood @ w
            b = (gradient + h_d) @ w
            log_b = log_b - 0.5 * torch.logdet(a) + 0.5 * (
                b * torch.linalg.solve(a, b[..., None])[..., 0]).sum(-1)
        return log_b


class _PooledLeastSquares:
    """``graylevels.fit_scale_with_poses`` (images = scale * model + offset over every
    pixel, noise std from the residuals) from chunks of (images, model images): pooled
    means and centred second moments in float64, merged chunk by chunk (Chan, Golub &
    LeVeque 1983, Am. Stat. 37: 242), so only a chunk is in memory."""

    def __init__(self):
        self.count, self.mean, self.moments = 0, torch.zeros(2, dtype=torch.float64), \
            torch.zeros(2, 2, dtype=torch.float64)

    def add(self, images: Tensor, model_images: Tensor) -> None:
        pixels = torch.stack([images.double().reshape(-1),
                              model_images.double().to(images.device).reshape(-1)]).cpu()
        count, mean = pixels.shape[1], pixels.mean(1)
        centred = pixels - mean[:, None]
        delta, total = mean - self.mean, self.count + count
        self.moments += centred @ centred.T + torch.outer(delta, delta) * (
            self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def gray_levels(self) -> GrayLevels:
        """As ``fit_scale_with_poses`` (and its CryosviErrors)."""
        (xx, xy), (_, yy) = self.moments.tolist()
        if not yy > 0:
            raise CryosviError("the model images are constant; no scale can be fitted")
        scale = xy / yy
        offset = float(self.mean[0]) - scale * float(self.mean[1])
        noise_var = max(xx - scale * xy, 0.0) / (self.count - 2)
        if not abs(scale) > MEASURABLE_Z * math.sqrt(noise_var / yy):
            raise CryosviError(f"the particles' scale is not measurable: {scale:.3g} +- "
                               f"{math.sqrt(noise_var / yy):.3g}")
        return GrayLevels(scale, offset, math.sqrt(noise_var))


def learn_modes(reference: Reference, basis: np.ndarray, images, rotation: Tensor,
                ctf, shifts: Tensor | None, groups, n_modes: int = 1,
                prior_std: float = 10.0, iterations: int = 10, source: dict | None = None,
                progress=None, chunk_size: int = 256,
                weights: Tensor | None = None,
                estimate_noise=None) -> tuple[Reference, dict]:
    """The reference of ``n_modes`` modes learnt from particles of known pose.

    reference: at the images' box and pixel size; basis (D, N, 3): the fitting basis of
    its pseudo-atoms (``fitting_basis``), D >= ``n_modes``. The reference's gray levels
    and noise std are used when ``reference.noise.std`` > 0; else they are fitted by
    least squares against the undeformed model at the given poses, then again at the
    fitted conformations (a conformational spread across the data set biases the first fit's
    scale low), and the amplitudes are fitted again if the scale moved by more than
    REFIT_TOLERANCE. images: (n, L, L), or a function of particle positions (k,) int64
    returning their images (``fit_amplitudes``; read and imaged by the model at most
    ``chunk_size`` at a time, so that memory does not grow with n beyond the fitted
    amplitudes (n, D) and covariances (n, D, D)); rotation (n, 4); ctf a ``ParticleCTF``
    of n; shifts (n, 2) Å or None; groups: the ``OpticsGroups`` of the CTFs.
    ``progress``: as in ``fit_amplitudes``, over every fitting pass and the
    population's grid. Returns the learnt reference (``learnt_reference``: the PPCA's
    directions, with the centre and spread along each from
    ``population.population_moments``) and its summary, with the gray levels, fitting
    passes, the PPCA's stds and the population's shift of its centre.
    The reference's ``noise_model``, where it has one, whitens the fit's residuals
    (``fit_amplitudes``); ``estimate_noise``, a function of the reference at its gray
    levels returning the images' ``NoiseModel`` (e.g. ``noise_data.estimate_noise_model``),
    replaces it whenever the gray levels are set (its contrast is relative to them);
    with a noise model, the learnt reference's keeps the B envelope the particles show
    beyond it (``envelope.fitted_envelope``). ``weights`` (n,): each particle's weight
    in the directions' likelihood, the population's and the envelope's fit
    (``principal_directions``; e.g. 1 - its junk probability), times its own
    probability of holding the molecule: from its evidence against an image with no
    particle (``junk.junk_weights``), for the directions ``AmplitudeFit.log_bayes`` of
    the structure, then of the directions' first population, for the rest its exact
    evidence along the directions (``population_moments``; the summary's
    junk_fraction)."""
    device = rotation.device
    read = images if callable(images) else images.__getitem__
    n = rotation.shape[0]
    fit_levels = not reference.noise.std > 0

    def model_at(settings: Reference) -> ForwardModel:
        """The fitting basis's model (with the noise model's envelope, as every model)."""
        return settings.forward_model(groups, modes=basis).to(device)

    def with_levels(amplitudes: Tensor) -> Reference:
        """The gray levels of the first GRAY_LEVEL_IMAGES particles against the model
        at ``amplitudes``, a chunk at a time."""
        count = min(n, GRAY_LEVEL_IMAGES)
        if count < 2:
            raise ValueError(f"images must be (k, n, n) with k >= 2, got {count} image(s)")
        unit = model_at(reference.with_settings(imaging=replace(
            reference.imaging, scale=1.0, offset=0.0)))
        pooled = _PooledLeastSquares()
        for start in range(0, count, chunk_size):
            rows = torch.arange(start, min(count, start + chunk_size))
            with torch.no_grad():
                clean = unit(amplitudes[rows].float().to(device), rotation[rows.to(device)],
                             None, ctf=ctf.take(rows),
                             shifts=None if shifts is None else shifts[rows.to(device)])
            pooled.add(read(rows), clean)
        fitted = pooled.gray_levels()
        return with_noise(reference.with_settings(
            imaging=replace(reference.imaging, scale=fitted.scale, offset=fitted.offset),
            noise=replace(reference.noise, std=fitted.noise_std)))

    def with_noise(settings: Reference) -> Reference:
        if estimate_noise is None:
            return settings
        return settings.with_settings(noise_model=estimate_noise(settings))

    def fit() -> AmplitudeFit:
        noise = None if reference.noise_model is None else reference.noise_model.to(device)
        return fit_amplitudes(model_at(reference), read, rotation, ctf, shifts,
                              reference.noise.std, prior_std, iterations, progress=progress,
                              noise_model=noise)

    reference = with_levels(torch.zeros(n, len(basis))) if fit_levels \
        else with_noise(reference)
    fitted = fit()
    passes = 1
    if fit_levels:
        first_scale = reference.imaging.scale
        reference = with_levels(fitted.means)
        if abs(reference.imaging.scale / first_scale - 1) > REFIT_TOLERANCE:
            fitted = fit()
            passes = 2
    # Junk (empty ice, structureless images) would pull the directions: each particle
    # counts by its own probability of holding the molecule, times the given weight;
    # first of the structure itself, then of the population of conformations learnt.
    given, fit = weights, None
    for _ in range(2):
        own = junk_weights(fitted.log_bayes(
            *((None, None) if fit is None else (fit.centre, fit.directions.T * fit.std))))[0]
        weights = own if given is None else own * given.double()
        fit = principal_directions(fitted.means, fitted.covariances, n_modes,
                                   weights=weights)
    # The fits' mean, and so the PPCA's centre, sits toward the structure at low SNR:
    # the centre and spread along each direction from the particles' likelihoods on a grid.
    # There also each particle's evidence along the directions: the junk weights again.
    moments = population_moments(learnt_reference(reference, basis, fit, {})[0], groups,
                                 read, rotation, ctf, shifts, given, chunk_size, progress,
                                 weigh_junk=True)
    shift, weights, junk_fraction = moments.mean, moments.weights, moments.junk_fraction
    population = replace(fit, centre=fit.centre + torch.from_numpy(shift) @ fit.directions,
                         std=torch.from_numpy(moments.std))
    learnt, summary = learnt_reference(reference, basis, population, source or {})
    summary.update(ppca_mode_std=fit.std.numpy().round(4).tolist(),
                   population_shift=shift.round(4).tolist(),
                   spread_evidence=round(moments.evidence, 2))
    bfactor_shells = 0
    if learnt.noise_model is not None:
        # the envelope nobody states, for ``train``'s simulations and ``infer``
        bfactor, bfactor_shells = fitted_envelope(learnt, groups, read, rotation, ctf,
                                                  shifts, weights, chunk_size)
        if math.isfinite(bfactor):
            learnt = learnt.with_settings(noise_model=learnt.noise_model.replace(
                bfactor=learnt.noise_model.bfactor + bfactor))
    summary.update(fitting_passes=passes, scale=reference.imaging.scale,
                   offset=reference.imaging.offset, noise_std=reference.noise.std,
                   junk_fraction=round(junk_fraction, 4),
                   bfactor=None if learnt.noise_model is None
                   else round(learnt.noise_model.bfactor, 2),
                   bfactor_shells=bfactor_shells)
    return learnt, summary


def block_labels(basis: np.ndarray) -> np.ndarray:
    """(N,) int: the pseudo-atoms of a fitting ``basis`` (D, N, 3) grouped into the
    blocks its vectors move together: two pseudo-atoms share a block when a chain of
    basis vectors moves both (connected components of the atoms-vectors graph), blocks
    numbered in the order of their first pseudo-atom. The B blocks of a basis of rigid
    blocks (``fitting_basis(reference, B)``: its vectors never move two blocks); one
    block for the ANM basis, whose vectors move every pseudo-atom."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    size = np.abs(basis).max(axis=2)  # (D, N)
    vector, atom = np.nonzero(size > 1e-9 * size.max())
    n_vectors, n_atoms = size.shape
    # nodes: the atoms 0..N-1, then the vectors
    graph = coo_matrix((np.ones(len(atom)), (atom, n_atoms + vector)),
                       shape=(n_atoms + n_vectors,) * 2)
    _, component = connected_components(graph, directed=False)
    _, first, labels = np.unique(component[:n_atoms], return_index=True,
                                 return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[labels.reshape(-1)]


def rigid_block_motions(coords: np.ndarray, labels: np.ndarray, fields: np.ndarray,
                        tolerance: float = 1e-6) -> tuple[np.ndarray, np.ndarray] | None:
    """Each displacement field ``fields`` (M, N, 3) Å of the pseudo-atoms ``coords``
    (N, 3) Å as an infinitesimal rigid motion of each block of ``labels`` (N,):
    v_i = t_b + w_b x (r_i - c_b) about the block's centroid c_b, fitted by least squares.
    Returns the rotation vectors w (M, B, 3) and translations t (M, B, 3), or None when a
    field is not such a motion (RMS residual above ``tolerance`` times its RMS)."""
    fields = np.asarray(fields, np.float64)
    n_blocks = int(labels.max()) + 1
    rotations = np.zeros((len(fields), n_blocks, 3))
    translations = np.zeros((len(fields), n_blocks, 3))
    residual = np.zeros(len(fields))
    for block in range(n_blocks):
        inside = labels == block
        arm = coords[inside] - coords[inside].mean(0)  # (n_b, 3)
        design = np.zeros((len(arm), 3, 6))
        design[:, :, :3] = np.eye(3)
        # w x arm = -[arm]_x w, with [a]_x the matrix of a x (the cross product)
        design[:, 0, 4], design[:, 0, 5] = arm[:, 2], -arm[:, 1]
        design[:, 1, 3], design[:, 1, 5] = -arm[:, 2], arm[:, 0]
        design[:, 2, 3], design[:, 2, 4] = arm[:, 1], -arm[:, 0]
        design = design.reshape(-1, 6)
        target = fields[:, inside].reshape(len(fields), -1).T  # (3 n_b, M)
        solution = np.linalg.lstsq(design, target, rcond=None)[0]  # (6, M)
        translations[:, block], rotations[:, block] = solution[:3].T, solution[3:].T
        residual += np.square(design @ solution - target).sum(0)
    scale = np.square(fields).reshape(len(fields), -1).sum(1)
    if np.any(residual > tolerance**2 * scale + 1e-24):
        return None
    return rotations, translations


def learnt_reference(reference: Reference, basis: np.ndarray, fit: PrincipalDirections,
                     source: dict) -> tuple[Reference, dict]:
    """The reference of the k directions along which the particles spread, ``fit`` in
    the fitting ``basis`` (D, N, 3) (``cryosvi.inference.ppca.principal_directions`` of
    the fitted amplitudes, or with the population's centre and spread): pseudo-atoms
    moved to the particles' mean conformation, modes (k, N, 3) orthonormal, mode stds
    (Å RMS) the spread along each, eigenvalues the variances (Å^2). Also returns a
    summary: each direction's components in the fitting basis, its rigid fraction, the
    spread.

    The learnt reference keeps the structure's pseudo-atoms (``structure_coords``: the
    fitting reference's own) and, when the basis moves blocks of them rigidly and the
    fitting reference is the structure's (not itself learnt), each block's motion along
    each mode and from the structure to the mean conformation (``RigidBlocks``), with
    which ``cryosvi analyze`` moves every atom of the structure."""
    from cryosvi.reference import RigidBlocks

    n_modes = len(fit.directions)
    flat = basis.reshape(len(basis), -1)
    n_atoms = reference.n_atoms
    centre = fit.centre.numpy()
    offset = math.sqrt(n_atoms) * (centre @ flat).reshape(n_atoms, 3)
    coords = reference.coords + offset
    directions = fit.directions.numpy()
    modes = (directions @ flat).reshape(n_modes, n_atoms, 3)
    std = fit.std.numpy()
    rigid = rigid_basis(reference.coords).T @ modes.reshape(n_modes, -1).T  # (6, k)
    summary = {
        "mode_std": std.round(4).tolist(),
        "rigid_fraction": np.linalg.norm(rigid, axis=0).round(4).tolist(),
        "components": directions.round(4).tolist(),
        "centre_rms": float(np.linalg.norm(centre)),
        "log_likelihood": fit.log_likelihood, "converged": fit.converged,
    }
    blocks = None
    if reference.structure_coords is None:
        labels = block_labels(basis)
        fields = np.concatenate([offset[None], math.sqrt(n_atoms) * modes])
        motions = rigid_block_motions(reference.coords, labels, fields)
        if motions is not None:
            rotations, translations = motions
            blocks = RigidBlocks(labels, rotations[1:], translations[1:], rotations[0],
                                 translations[0])
    learnt = reference.with_settings(
        coords=coords.astype(np.float64), modes=modes, eigenvalues=std ** 2,
        priors=replace(reference.priors, mode_std=tuple(float(s) for s in std)),
        source={**reference.source, **source, "modes": "learnt", "learnt": summary},
        structure_coords=np.array(reference.structure_beads, np.float64), blocks=blocks)
    learnt.check("learnt reference: ")
    return learnt, summary


def _fitting_basis(reference: Reference, basis: str, blocks: int,
                   reference_name: str) -> tuple[np.ndarray, str]:
    """The fitting basis ``basis`` (one of BASES) of ``reference`` and its description."""
    if basis == "anm":
        return (fitting_basis(reference),
                f"{reference.n_modes} modes of {reference_name} + 6 rigid motions")
    try:
        return (fitting_basis(reference, blocks, contiguous=basis == "segments"),
                f"rigid motions of {blocks} "
                f"{'chain segments' if basis == 'segments' else 'blocks'}")
    except ValueError as error:  # more blocks than the pseudo-atoms allow
        raise CryosviError(f"--blocks {error}") from None


def learn_modes_from_particles(table: ParticleSet, reference: Reference, n_modes: int = 1,
                               basis: str = "auto", blocks: int = 3,
                               box: int | None = None,
                               max_particles: int = 20000, seed: int = 0,
                               noise_std: float | None = None, prior_std: float = 10.0,
                               iterations: int = 10, device="cpu", progress=None,
                               reference_name: str = "ANM",
                               chunk_size: int = 256, noise_model: str = "auto",
                               stage=None) -> tuple[Reference, dict]:
    """``cryosvi learn-modes``: the reference of ``n_modes`` modes learnt from the
    particles of ``table`` (a consensus refinement: poses and CTF estimates; CryosviError
    without them) and ``reference`` (at the particles' box and pixel size).

    The particles are Fourier-cropped to the working box ``box``
    (``dataset.working_box``), at most ``max_particles`` of them (a random subset drawn
    with ``seed``) are fitted in the fitting basis ``basis`` (one of BASES, with
    ``blocks`` blocks or segments; 'auto': each of them, keeping the learnt reference
    whose particles' spread along its directions explains the most, the summary's
    spread_evidence, ``population.spread_evidence``), with the gray levels and noise
    std fitted unless ``noise_std`` is given (``reference_name``: how the basis names
    the reference's modes). The images are read from the stacks (memory-mapped) a chunk
    at a time as the fit needs them (``learn_modes``: at most ``chunk_size`` images, and
    the fit's batches of 64), never all at once. A ``JUNK_COLUMN`` in the table (a
    posterior of ``cryosvi infer``) weighs each particle by 1 - its junk probability in
    the directions' fit, so that junk does not pull them. Returns the learnt reference
    and ``learn_modes``'s summary, with 'basis' (what the basis is), 'fitted_particles'
    and, with 'auto', each basis's 'basis_evidence'. ``noise_model``
    (``noise_data.NOISE_MODELS``; 'auto' resolved by ``noise_data.resolve_noise_model``):
    'estimate' measures the particles' coloured noise (``noise_data.estimate_noise_model``)
    at the fitted gray levels; it whitens the fit and the learnt reference keeps it for
    ``cryosvi train``. ``stage``: called with each basis's name (one of BASES) before
    its fit, e.g. to label a progress bar.
    """
    missing = [c for c in (*ANGLES, "rlnDefocusU") if not table.has(c)]
    if missing or not has_ctf_estimates(table):
        raise CryosviError(f"{table.path}: learning modes needs every particle's pose and "
                           f"CTF estimate (a consensus refinement); missing: "
                           f"{', '.join(missing) or 'per-particle rlnDefocusU values'}")
    table.require("rlnImageName")
    reference = priors_from_particles(table, working_reference(table, reference, box))
    candidates = {}
    for kind in BASES if basis == "auto" else (basis,):
        candidates[kind] = _fitting_basis(reference, kind, blocks, reference_name)
        fitting, name = candidates[kind]
        if n_modes > len(fitting):
            raise CryosviError(f"--n-modes {n_modes}: the fitting basis ({name}) has "
                               f"{len(fitting)} dimensions")
    data = ParticleData(table, reference.optics.box, ctf_estimates=True)
    rows = np.arange(len(table))
    if len(rows) > max_particles:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_particles,
                                                          replace=False))
    rows_t = torch.from_numpy(rows)

    def images(positions: Tensor) -> Tensor:
        """The images of the fitted particles at ``positions`` (k,) of ``rows``, read
        from the memory-mapped stacks when asked for: a chunk at a time."""
        return torch.from_numpy(data.images(rows[positions.numpy()]))

    rotation = BY_NAME["pose"].known(table, None)[rows_t]
    ctf = data.conditions.ctf.take(rows_t)
    shifts = None if data.conditions.shifts is None else data.conditions.shifts[rows_t]
    choice = resolve_noise_model(noise_model, reference, noise_std)
    if noise_std:
        reference = reference.with_settings(noise=replace(reference.noise,
                                                          std=float(noise_std)))
    if choice == "white":
        reference = reference.with_settings(noise_model=None)
    elif choice == "reference":  # its own noise model, for these particles' groups
        reference = matched_noise_model(data, reference)
    estimate_noise = None if choice != "estimate" else \
        lambda settings: estimate_noise_model(data, settings, seed, device)
    weights = None
    if table.has(JUNK_COLUMN):
        junk = table.column(JUNK_COLUMN, rows).astype(np.float64)
        weights = torch.from_numpy(np.nan_to_num(1.0 - junk, nan=0.0).clip(0.0, 1.0))
        if not float(weights.sum()) > 0:
            raise CryosviError(f"{table.path}: every particle has junk probability 1")
    learnt = {}
    for kind, (fitting, name) in candidates.items():
        if stage is not None:
            stage(kind)
        learnt[kind] = learn_modes(
            reference, fitting, images, rotation.to(device), ctf.to(device),
            None if shifts is None else shifts.to(device), data.groups, n_modes,
            prior_std, iterations,
            {"particles": str(table.path), "fitted_particles": int(len(rows)),
             "fitting_basis": name, "junk_weighted": weights is not None,
             "noise_model": choice}, progress, chunk_size, weights, estimate_noise)
    evidence = {kind: summary["spread_evidence"] for kind, (_, summary) in learnt.items()}
    best = max(evidence, key=evidence.get)
    chosen, summary = learnt[best]
    if basis == "auto":
        summary["basis_evidence"] = evidence
    # (a copy: the learnt reference's source holds ``summary`` itself)
    return chosen, {**summary, "basis": candidates[best][1],
                    "fitted_particles": int(len(rows)), "noise_model": choice}
