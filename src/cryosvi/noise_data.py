"""The noise of a particle set (``cryosvi.physics.noise.NoiseModel``), measured from the
particles: ``estimate_noise_model`` from the particles alone (their background, no
poses), ``refine_noise_model`` from residuals against model images at given latents,
the junk nulls' model of a run (``junk_null_model``), which noise model a command uses
(``resolve_noise_model``), and a noise model's spectra for a particle set's optics
groups (``matched_noise_model``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from cryosvi.dataset import ParticleData, data_box, group_codes, particle_rows
from cryosvi.errors import CryosviError
from cryosvi.model import sample_prior
from cryosvi.physics.contrast import contrast_floor, contrast_prior, level_spread
from cryosvi.physics.graylevels import estimate_gray_levels, mask_radius
from cryosvi.physics.noise import NoiseModel
from cryosvi.physics.spectrum import (apply_envelope, background_levels, background_mask,
                                      bfactor_from_gain_sums, group_sums,
                                      model_error_spectrum, power_spectrum, shell_average,
                                      shell_gain_sums, spectrum_from_background,
                                      spectrum_from_residuals)
from cryosvi.reference import Reference

NOISE_IMAGES = 2000
"""Particles (and as many prior model images) a noise model is estimated from: 2 000
gave every shell of a 48 px box within 2 % from residuals."""


def matched_noise_model(data: ParticleData, reference: Reference) -> Reference:
    """The reference with its noise model's spectra for the particles' optics groups
    (``NoiseModel.for_groups``: by rlnOpticsGroup; a CryosviError naming a group it
    lacks), e.g. a run's on a subset of its groups."""
    noise = reference.noise_model
    if noise is None:
        return reference
    try:
        noise = noise.for_groups(noise_group_labels(data), noise_groups(data, [])[1])
    except CryosviError as error:
        raise CryosviError(f"{data.particles.path}: {error}") from None
    return reference.with_settings(noise_model=noise)


def noise_group_labels(data: ParticleData) -> tuple[int, ...]:
    """The rlnOpticsGroup of each of ``noise_groups``' groups; () for a single group
    without CTF estimates."""
    ctf = data.conditions.ctf
    if ctf is None or ctf.group is None:
        return ()
    return tuple(int(g) for g in group_codes(data.particles)[1])


def noise_groups(data: ParticleData, rows=None) -> tuple[torch.Tensor, int]:
    """((k,) int64, G): the noise model's group of the particles ``rows`` (None: all)
    and the number of groups: the optics group of their CTF (``ParticleData``'s
    conditions, ``group_index``) when the run uses CTF estimates, else 0 (one group, as
    the model's measurement site sees them)."""
    rows = particle_rows(data.particles, rows)
    ctf = data.conditions.ctf
    if ctf is None or ctf.group is None:
        return torch.zeros(len(rows), dtype=torch.long), 1
    return ctf.group[torch.from_numpy(rows)], data.groups.n_groups


def _signal_power(images, group, n_groups, weights, total, cropped) -> torch.Tensor:
    """(G, shells) the particles' mean power per shell beyond the noise, >= 0."""
    power = shell_average(power_spectrum(images.double()), True, cropped)
    summed, count = group_sums(power, group, n_groups, weights)
    return (summed / count.clamp_min(1e-300)[:, None] - total).clamp_min(0)


def estimate_noise_model(data: ParticleData, reference: Reference, seed: int, device="cpu",
                         weights=None) -> NoiseModel:
    """The noise model of the particles before any latent is known (no poses).

    Up to NOISE_IMAGES random particles against as many clean model images drawn from
    the prior with the conditions of random particles (``estimate_levels``' draws; the
    reference's own gray levels, so the contrast is relative to its forward model):

    * the contrast's mean from second moments inside and outside the molecule's mask
      (``physics.graylevels.estimate_gray_levels``, whose equations hold for any
      stationary noise); its spread is not measurable without poses (tau = 0);
    * each group's noise spectrum S from the background, the pixels beyond the mask
      (``mask_radius``: the molecule's radius plus a margin), with the model images'
      background, scaled by the contrast, subtracted (``spectrum_from_background``):
      particles normalised by RELION (each by its own background) are used as they come;
    * the particles' mean signal power P = their mean power spectrum - S;
    * the spread of the particles' own noise levels (``NoiseModel.level_std``) from each
      one's background power against S's (``spectrum.background_levels``; RELION's
      per-particle normalisation leaves it ~0).

    ``weights`` (N,) of every particle (e.g. 1 - p_junk) weigh the spectra and P; the
    gray levels are unweighted. Images Fourier-cropped to an even working box give a
    ``cropped`` model (Nyquist left out). No global random state is touched; a
    CryosviError when the particles' signal is not measurable."""
    generator = torch.Generator().manual_seed(seed + 7919)
    n = min(len(data), NOISE_IMAGES)
    rows = np.sort(torch.randperm(len(data), generator=generator)[:n].numpy())
    images = torch.from_numpy(data.images(rows)).double()
    group, n_groups = noise_groups(data, rows)
    particle_weights = None if weights is None else torch.as_tensor(
        np.asarray(weights, dtype=np.float64)[rows])
    # the bare model: the estimate's B is 0, relative to it
    forward = reference.forward_model(data.groups, envelope=False).to(device)
    devices = [forward.coords.device] if forward.coords.is_cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7919)
        count = max(n, 2)
        conditions = data.draw_conditions(count, device, generator)
        _, clean = sample_prior(forward, reference.priors, count, conditions)
    clean = clean.cpu().double()
    model_group = (torch.zeros(count, dtype=torch.long) if conditions is None
                   or conditions.ctf is None or conditions.ctf.group is None
                   else conditions.ctf.group.cpu())
    radius = mask_radius(reference.coords, reference.optics.pixel_size, data.box)
    levels = estimate_gray_levels(images, clean, radius)
    cropped = data.box < data_box(data.particles)
    noise = spectrum_from_background(images, background_mask(data.box, radius), group,
                                     n_groups, particle_weights, signal=levels.scale * clean,
                                     signal_group=model_group)
    power = _signal_power(images, group, n_groups, particle_weights, noise, cropped)
    spread = level_spread(*background_levels(images, background_mask(data.box, radius),
                                             noise[group]), particle_weights)
    return NoiseModel(data.box, reference.optics.pixel_size, noise, signal_power=power,
                      contrast_mean=levels.scale, contrast_std=0.0, contrast_floor=0.0,
                      level_std=spread, cropped=cropped, groups=noise_group_labels(data),
                      origin=f"background of {n} particles"
                      + (", weighted" if weights is not None else ""))


NOISE_MODELS = ("auto", "reference", "estimate", "white")
"""The noise of a command's likelihood (``cryosvi train`` and ``learn-modes``
--noise-model): 'reference', the reference's own noise model where it has one (``cryosvi
simulate`` records the truth of its coloured noise, ``learn-modes`` its estimate), else
white noise; 'estimate', the particles' coloured noise per optics group from their
background before any latent is known (``estimate_noise_model``); 'white', white noise
of the noise std (the paper's model); 'auto' (``resolve_noise_model``): 'reference' where
the reference knows the noise, else 'estimate'."""


def resolve_noise_model(choice: str, reference: Reference,
                        noise_std: float | None = None) -> str:
    """``choice`` (one of NOISE_MODELS) with 'auto' resolved: 'reference' when the
    reference has a noise model of its own, or the noise std is known (``noise_std``
    given, or the reference's: a cryosvi simulation of white noise); else 'estimate':
    particles from elsewhere, whose gray levels and noise are measured from the images,
    get their own spectrum rather than an assumed white one."""
    if choice not in NOISE_MODELS:
        raise CryosviError(f"unknown noise model {choice!r} (choose from "
                           f"{', '.join(NOISE_MODELS)})")
    if choice != "auto":
        return choice
    known = reference.noise_model is not None or bool(noise_std) or reference.noise.std > 0
    return "reference" if known else "estimate"


def junk_null_model(data: ParticleData, reference: Reference, seed: int) -> NoiseModel:
    """The noise model of the junk nulls (``cryosvi.inference.junk``) of a run: its own
    ``reference.noise_model`` where it has one (the likelihood's); else white noise of
    the run's std in every coefficient but DC (the ``Normal`` likelihood's, which counts
    every pixel: not ``cropped``) with the particles' mean signal power P per optics
    group (``noise_groups``) from up to NOISE_IMAGES particles (a fixed random subset, so
    every chunk and process of a run sees the same model)."""
    if reference.noise_model is not None:
        return reference.noise_model
    generator = torch.Generator().manual_seed(seed + 7919)
    n = min(len(data), NOISE_IMAGES)
    rows = np.sort(torch.randperm(len(data), generator=generator)[:n].numpy())
    images = torch.from_numpy(data.images(rows)).double()
    group, n_groups = noise_groups(data, rows)
    std = float(reference.noise.std)
    white = NoiseModel.white(std, data.box, reference.optics.pixel_size, n_groups)
    power = _signal_power(images, group, n_groups, None, white.total, False)
    return white.replace(signal_power=power, origin=f"white, P from {n} particles")


class NoiseRefinement(NamedTuple):
    """noise: the refined NoiseModel; contrast, contrast_std (k,): each particle's
    least-squares contrast and its standard error (whitened, after the envelope);
    residual_spectrum (G, shells): R, the residual power at those contrasts;
    bfactor_shells: the shells the B-factor fit used (0: not fitted)."""

    noise: NoiseModel
    contrast: torch.Tensor
    contrast_std: torch.Tensor
    residual_spectrum: torch.Tensor
    bfactor_shells: int


def refine_noise_model(noise: NoiseModel, data: ParticleData, reference: Reference, rows,
                       model_images: torch.Tensor, weights=None,
                       fit_bfactor: bool = True) -> NoiseRefinement:
    """The noise model refined from residuals against model images at given latents.

    rows: the particles (indices, k of them); model_images (k, n, n): their clean model
    images as the likelihood sees them (the forward model at the latents, e.g. the
    consensus poses or the posterior means, with ``noise``'s envelope applied), at the
    working box; weights (k,), e.g. 1 - p_junk (a particle whose model image is 0 gets
    weight 0). In the metric of ``noise``'s T:

    1. B (``fit_bfactor``): the per-shell gain of the model images against the data
       (``shell_gain``, linear in the data), a Guinier line from 1/20 Å to Nyquist
       (``spectrum.bfactor_from_gain_sums``); the model images get its envelope and it
       adds to ``noise.bfactor`` (kept when fewer than 3 shells are measurable);
    2. each particle's least-squares contrast a_i, and the prior's mean and std by
       the method of moments (``contrast_prior``), its floor ``contrast_floor``;
    3. R, the spectrum of the residuals x_i - a_i m_i (``spectrum_from_residuals``);
    4. S, the background estimate corrected by the fitted signal a_i m_i, capped at R
       (R estimates S + D, D >= 0, without the background's bias at high SNR) and R
       itself beyond Nyquist, and D = R - S smoothed (``model_error_spectrum``), so
       T = S + k D >= R;
    5. P, the particles' power beyond the new T.
    """
    rows = particle_rows(data.particles, rows)
    images = torch.from_numpy(data.images(rows)).double()
    model = model_images.detach().cpu().double()
    if model.shape != images.shape:
        raise ValueError(f"model_images {tuple(model.shape)} must match the particles' "
                         f"{tuple(images.shape)}")
    group, n_groups = noise_groups(data, rows)
    if n_groups != noise.n_groups:
        raise ValueError(f"the noise model has {noise.n_groups} groups, the data {n_groups}")
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    bfactor, used = noise.bfactor, 0
    if fit_bfactor:
        fitted, used = bfactor_from_gain_sums(
            *shell_gain_sums(images, model, noise.spectra(group, images), w, noise.cropped),
            noise.box, noise.pixel_size)
        if math.isfinite(fitted):
            model = apply_envelope(model, noise.pixel_size, fitted)
            bfactor += fitted
        else:
            used = 0
    contrast, contrast_std = noise.fit_contrast(images, model, group)
    usable = torch.isfinite(contrast) & torch.isfinite(contrast_std)  # a model image of 0
    contrast, contrast_std = contrast.nan_to_num(0.0), contrast_std.nan_to_num(0.0, 0.0)
    contrast_std = torch.where(usable, contrast_std, 0.0)
    w = usable.double() if w is None else w * usable
    if not float(w.sum()) > 0:
        raise CryosviError("no particle has a model image to refine the noise model against")
    mean, std = contrast_prior(contrast, contrast_std, w)
    signal = contrast[:, None, None] * model
    residual = spectrum_from_residuals(images - signal, group, n_groups, w, noise.cropped)
    if not bool((residual[:, 1:] > 0).all()):
        raise CryosviError("an optics group has no particle with weight to refine the noise "
                           "model from")
    radius = mask_radius(reference.coords, reference.optics.pixel_size, data.box)
    background = spectrum_from_background(images, background_mask(data.box, radius), group,
                                          n_groups, w, signal=signal)
    floor_noise = torch.minimum(background, residual)
    # Beyond Nyquist the background estimate rests on few long lags (35 % off on pure
    # noise): the corners' residual power is taken as noise.
    floor_noise[:, data.box // 2 + 1:] = residual[:, data.box // 2 + 1:]
    error = model_error_spectrum(residual, floor_noise)
    refined = noise.replace(noise=floor_noise, error=error, contrast_mean=mean,
                            contrast_std=std, contrast_floor=contrast_floor(mean, std),
                            bfactor=bfactor, origin=f"residuals of {len(rows)} particles"
                            + (", weighted" if weights is not None else ""))
    refined = refined.replace(signal_power=_signal_power(images, group, n_groups, w,
                                                         refined.total, noise.cropped))
    return NoiseRefinement(refined, contrast, contrast_std, residual, used)
