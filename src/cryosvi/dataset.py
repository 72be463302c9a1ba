"""What training and inference take from a particle set (:class:`ParticleSet`): the
optics the forward model can serve, image statistics, priors from the metadata, and the
check against the reference.

Data -> physics adapters (pure functions of a ParticleSet):

* ``optics_groups`` / ``group_index``: every optics group as a ``cryosvi.physics.optics.OpticsGroups``
  table (voltage kV, Cs mm, amplitude contrast, pixel size Å), indexed 0..G-1 in the
  order of the sorted rlnOpticsGroup values of the particles.
* ``particle_ctf``: per-particle U, V (Å), angle (deg), phase shift (deg), B-factor (Å^2)
  and group index as a ``cryosvi.physics.optics.ParticleCTF``; ``has_ctf_estimates``.
* ``known_shifts``: (N, 2) Å, RELION's (rlnOriginXAngst, rlnOriginYAngst); ``has_shifts``.
* ``working_box``, ``working_pixel_size``, ``working_images``: the particles Fourier-cropped
  to an even working box n <= L (default min(64, L)), the guide's input whatever L is.
* ``estimate_noise_model`` / ``refine_noise_model``: the images' noise
  (``cryosvi.physics.noise.NoiseModel``) from the particles alone, then from residuals
  against model images at given latents.

All optics groups share the image box and pixel size (one projection grid and working
box); voltage, Cs and amplitude contrast may differ.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from cryosvi.config import Optics
from cryosvi.errors import CryosviError
from cryosvi.io.particles import ParticleSet, mean_defocus, origins
from cryosvi.latents import known_values
from cryosvi.model import sample_prior
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.physics.fourier import cropped_pixel_size, fourier_crop
from cryosvi.physics.graylevels import estimate_gray_levels, mask_radius
from cryosvi.physics.contrast import contrast_floor, contrast_prior, level_spread
from cryosvi.physics.noise import NoiseModel
from cryosvi.physics.spectrum import (apply_envelope, background_levels, background_mask,
                                      bfactor_from_gain_sums, group_sums,
                                      model_error_spectrum, power_spectrum, shell_average,
                                      shell_gain_sums, spectrum_from_background,
                                      spectrum_from_residuals)
from cryosvi.reference import Reference

MODEL_OPTICS = {"rlnImageSize": "box", "rlnImagePixelSize": "pixel_size",
                "rlnVoltage": "voltage", "rlnSphericalAberration": "spherical_aberration",
                "rlnAmplitudeContrast": "amplitude_contrast"}
DEFAULT_WORKING_BOX = 64
"""px: the default working box is min(64, the data's box)."""
MIN_WORKING_BOX = 16
"""px: the smallest working box a user may ask for."""


def model_optics(particles: ParticleSet) -> Optics:
    """The one box and pixel size of every optics group, with the voltage, Cs and
    amplitude contrast of the first group (group index 0; the data-set CTF path uses
    these, per-group values come from ``optics_groups``). A CryosviError when the groups
    differ in box or pixel size."""
    box, pixel_size = data_box(particles), data_pixel_size(particles)
    first = int(np.flatnonzero(group_index(particles).numpy() == 0)[0])
    values = {name: float(particles.column(column, [first])[0])
              for column, name in MODEL_OPTICS.items() if name not in ("box", "pixel_size")}
    return Optics(box=box, pixel_size=pixel_size, **values)


def data_box(particles: ParticleSet) -> int:
    """L (px): the image side every optics group shares, or a CryosviError."""
    particles.ensure_image_size()
    sizes = np.unique(particles.column("rlnImageSize").astype(np.int64))
    if sizes.size > 1:
        raise CryosviError(f"{particles.path}: the optics groups have different image sizes "
                           f"({', '.join(map(str, sizes))} px); cryosvi needs one box "
                           "(re-extract, or split the file by rlnOpticsGroup)")
    return int(sizes[0])


def data_pixel_size(particles: ParticleSet) -> float:
    """The pixel size (Å) every optics group shares, or a CryosviError."""
    pixels = np.unique(particles.column("rlnImagePixelSize").astype(float))
    if not np.allclose(pixels, pixels[0], rtol=1e-4, atol=0):
        raise CryosviError(f"{particles.path}: the optics groups have different pixel sizes "
                           f"({', '.join(f'{p:g}' for p in pixels[:4])} Å); cryosvi needs "
                           "one (rescale the particles, or split the file by rlnOpticsGroup)")
    return float(pixels[0])


# ------------------------------------------------------------------ optics and CTF
def _group_codes(particles: ParticleSet) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N,) int64 in 0..G-1, labels (G,) the sorted rlnOpticsGroup values)."""
    labels, codes = np.unique(particles.column("rlnOpticsGroup"), return_inverse=True)
    return codes.reshape(-1).astype(np.int64), labels


def group_index(particles: ParticleSet) -> torch.Tensor:
    """(N,) int64: each particle's optics group as an index into ``optics_groups``
    (the rank of its rlnOpticsGroup among the particles' distinct values, from 0)."""
    return torch.from_numpy(_group_codes(particles)[0])


def optics_groups(particles: ParticleSet, pixel_size: float | None = None) -> OpticsGroups:
    """Every optics group the particles use, in ``group_index`` order: voltage (kV), Cs
    (mm), amplitude contrast and pixel size (Å). Groups of the optics table that no
    particle uses are left out. ``pixel_size`` (Å): the pixel size of the images the CTF
    is applied to, e.g. ``working_pixel_size`` for a working box (then every group must
    share one data pixel size)."""
    codes, labels = _group_codes(particles)
    first = np.unique(codes, return_index=True)[1]  # first row of each group 0..G-1
    def values(column: str) -> tuple:
        return tuple(particles.column(column, first).astype(float).tolist())

    pixels = values("rlnImagePixelSize")
    if pixel_size is not None:
        data_pixel_size(particles)
        pixels = (float(pixel_size),) * len(labels)
    return OpticsGroups(
        voltage=values("rlnVoltage"), spherical_aberration=values("rlnSphericalAberration"),
        amplitude_contrast=values("rlnAmplitudeContrast"), pixel_size=pixels)


def _rows(particles: ParticleSet, rows) -> np.ndarray:
    """0-based row indices (k,) int64: all rows for None."""
    if rows is None:
        return np.arange(len(particles))
    rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    if rows.size and (rows.min() < 0 or rows.max() >= len(particles)):
        raise IndexError(f"particle index out of range 0..{len(particles) - 1}")
    return rows


def _column(particles: ParticleSet, column: str, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(particles.column(column, rows).astype(np.float32))


def known_shifts(particles: ParticleSet, rows=None) -> torch.Tensor:
    """(k, 2) float32 Å: the shifts (``io.particles.origins``) of the particles ``rows``
    (indices; None = all) as a tensor."""
    return torch.from_numpy(origins(particles, _rows(particles, rows)))


def particle_ctf(particles: ParticleSet, rows=None) -> ParticleCTF:
    """The file's CTF of the particles ``rows`` (indices; None = all), each field (k,):
    defocus_u, defocus_v (Å, rlnDefocusU/V), angle (deg, rlnDefocusAngle), phase_shift
    (deg, rlnPhaseShift), bfactor (Å^2, rlnCtfBfactor) as float32, and group (int64, the
    ``group_index``). read_particles fills absent V/angle/phase/B (V = U, else 0); a
    file without rlnDefocusU is a CryosviError (see ``has_ctf_estimates``)."""
    particles.require("rlnDefocusU")
    rows = _rows(particles, rows)
    fields = [_column(particles, c, rows) for c in
              ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
               "rlnCtfBfactor")]
    return ParticleCTF(*fields, group=group_index(particles)[rows])


def has_ctf_estimates(particles: ParticleSet) -> bool:
    """Whether rlnDefocusU holds per-particle estimates: present and not one value for
    every particle (a constant is a placeholder, e.g. simulated without defocus spread;
    a lone particle counts when its U is not 0)."""
    if not particles.has("rlnDefocusU"):
        return False
    u = particles.column("rlnDefocusU").astype(float)
    return bool(u[0] != 0) if u.size == 1 else bool((u != u[0]).any())


# ------------------------------------------------------------------ working box
def working_box(particles: ParticleSet, requested: int | None = None) -> int:
    """n (px), the box the particles are Fourier-cropped to: ``requested``, else
    min(DEFAULT_WORKING_BOX, L) made even (L - 1 for an odd L below it).

    n must be even (the guide's CNN halves the image at each stage, and with even n the
    centre pixel n//2 and the zeroed Nyquist row of ``fourier_crop`` are RELION's even-box
    conventions) and at least MIN_WORKING_BOX px, and never larger than the data's box L
    (no upsampling); else a CryosviError."""
    box = data_box(particles)
    if requested is None:
        n = min(DEFAULT_WORKING_BOX, box)
        return n - n % 2
    n = int(requested)
    if n != requested or n % 2 or not MIN_WORKING_BOX <= n <= box:
        raise CryosviError(f"--box {requested}: the working box must be an even number of "
                           f"pixels from {MIN_WORKING_BOX} to the particles' box {box}")
    return n


def working_pixel_size(particles: ParticleSet, box: int) -> float:
    """Å per pixel of the particles Fourier-cropped to ``box``: pixel * L / box."""
    return cropped_pixel_size(data_pixel_size(particles), data_box(particles), box)


def working_images(particles: ParticleSet, indices, box: int) -> torch.Tensor:
    """float32 (k, box, box): the particles ``indices`` read by ``ParticleSet.images``
    (``invert`` honoured) and Fourier-cropped to ``box`` (``cryosvi.physics.fourier``): the centre
    stays at pixel (box//2, box//2), gray levels are kept (a constant stays the same
    constant), and white noise of std s becomes white noise of std s (box - 1) / L for an
    even box < L (the zeroed Nyquist row and column take (2 box - 1) / box^2 of its
    power; s box / L for an odd box)."""
    return fourier_crop(torch.from_numpy(particles.images(indices)), box)


def image_statistics(particles, max_images: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """Pixel mean and std of up to ``max_images`` particles (a random subset).
    ``particles``: anything with ``len`` and ``images(indices)``."""
    n = len(particles)
    index = np.arange(n) if n <= max_images else np.sort(
        np.random.default_rng(seed).choice(n, max_images, replace=False))
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, len(index), 512):
        chunk = particles.images(index[i:i + 512]).astype(np.float64)
        total += chunk.sum()
        total_sq += np.square(chunk).sum()
        count += chunk.size
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 0.0))


def check_compatible(particles: ParticleSet, reference: Reference) -> Optics:
    """Box and pixel size of the particles (one for every optics group) must match the
    reference; the other optics values of the particles' first group replace the
    reference's (with a note). Returns the particles' optics (``model_optics``)."""
    optics = model_optics(particles)
    ref = reference.optics
    if optics.box != ref.box:
        raise CryosviError(f"{particles.path}: images are {optics.box} px but the reference "
                           f"is for {ref.box} px")
    if not math.isclose(optics.pixel_size, ref.pixel_size, rel_tol=1e-3):
        raise CryosviError(f"{particles.path}: pixel size {optics.pixel_size} Å does not "
                           f"match the reference's {ref.pixel_size} Å")
    for name in ("voltage", "spherical_aberration", "amplitude_contrast"):
        if not math.isclose(getattr(optics, name), getattr(ref, name), rel_tol=1e-3,
                            abs_tol=1e-6):
            print(f"note: {name} {getattr(optics, name)} from {particles.path.name} "
                  f"replaces the reference's {getattr(ref, name)}", file=sys.stderr)
    return optics


def priors_from_particles(particles: ParticleSet, reference: Reference) -> Reference:
    """The reference with the optics of the particles and the defocus prior set to the
    mean and std of their mean defocus (U + V) / 2 (when present and not constant)."""
    optics = model_optics(particles)
    optics = replace(reference.optics, voltage=optics.voltage,
                     spherical_aberration=optics.spherical_aberration,
                     amplitude_contrast=optics.amplitude_contrast)
    priors = reference.priors
    if particles.has("rlnDefocusU"):
        defocus = mean_defocus(particles)
        if len(defocus) > 1 and np.isfinite(defocus).all() and defocus.std() > 0:
            priors = replace(priors, defocus_mean=float(defocus.mean()),
                             defocus_std=float(defocus.std(ddof=1)))
    return reference.with_settings(optics=optics, priors=priors)


# ------------------------------------------------------------------ the particles of a run
class ParticleData:
    """The particles as the model sees them: images Fourier-cropped to the working box
    ``box`` (``working_images``) and every particle's ``Conditions``:
    the file's CTF estimates when ``ctf_estimates`` (else None: the data-set defocus
    prior) and the file's shifts when it has any. ``groups``: the ``OpticsGroups`` at
    the working pixel size (None without CTF estimates)."""

    def __init__(self, particles: ParticleSet, box: int, ctf_estimates: bool):
        self.particles, self.box = particles, int(box)
        ctf, self.groups = None, None
        if ctf_estimates:
            ctf = particle_ctf(particles)
            self.groups = optics_groups(particles, working_pixel_size(particles, self.box))
        shifts = known_shifts(particles) if particles.has_shifts else None
        self.conditions = Conditions(ctf, shifts)

    def __len__(self) -> int:
        return len(self.particles)

    def images(self, indices) -> np.ndarray:
        """float32 (k, box, box) images of the rows ``indices`` at the working box."""
        return working_images(self.particles, indices, self.box).numpy()

    @property
    def has_conditions(self) -> bool:
        return self.conditions.ctf is not None or self.conditions.shifts is not None

    def draw_conditions(self, count: int, device, generator=None) -> Conditions | None:
        """The conditions of ``count`` particles drawn with replacement (the empirical
        distribution of the file's CTFs, optics groups and shifts), or None when the
        particles have none (no random number is drawn then)."""
        if not self.has_conditions:
            return None
        rows = torch.randint(len(self), (count,), generator=generator)
        return self.conditions.take(rows).to(device)


DEFOCUS_PRIORS = ("auto", "particle", "dataset")
"""'particle': the defocus latent is an offset dz ~ N(0, defocus_offset_std) around each
particle's CTF estimate (U + dz, V + dz, angle kept) with every optics group's own
optics; 'dataset': one defocus per particle (U = V) with the data set's prior, the
paper's model; 'auto': 'particle' when the file has per-particle estimates and the
reference does not say they are a simulation's truth (``source['ctf_estimates']``
False: ``cryosvi simulate`` of the paper's model)."""
GRAY_LEVEL_IMAGES = 1000
"""Particles (and as many prior model images) the gray levels are estimated from."""


def uses_ctf_estimates(table, reference: Reference, defocus_prior: str) -> bool:
    """Whether a run uses the particles' CTF estimates (see ``DEFOCUS_PRIORS``)."""
    if defocus_prior not in DEFOCUS_PRIORS:
        raise CryosviError(f"unknown defocus prior {defocus_prior!r} (choose from "
                           f"{', '.join(DEFOCUS_PRIORS)})")
    if defocus_prior == "dataset":
        return False
    has = has_ctf_estimates(table)
    if defocus_prior == "particle" and not has:
        raise CryosviError(f"{table.path}: no per-particle CTF estimates (rlnDefocusU); "
                           "use --defocus-prior dataset")
    return has and (defocus_prior == "particle"
                    or bool(reference.source.get("ctf_estimates", True)))


def working_reference(table, reference: Reference, box: int | None) -> Reference:
    """The reference at the working box (``dataset.working_box``) and the cropped pixel
    size; a reference already there (a run's) is checked, one at the particles' own box
    and pixel size (``dataset.check_compatible``) is cropped."""
    box = working_box(table, box)
    pixel = working_pixel_size(table, box)
    if reference.optics.box == data_box(table) or reference.optics.box != box:
        check_compatible(table, reference)
    elif not math.isclose(reference.optics.pixel_size, pixel, rel_tol=1e-3):
        raise CryosviError(f"{table.path}: {pixel:.4g} Å pixels at the {box} px working box, "
                           f"but the run's are {reference.optics.pixel_size:.4g} Å")
    return reference.at_box(box, pixel)


def estimate_levels(data, reference: Reference, seed: int, device):
    """``cryosvi.physics.graylevels.GrayLevels`` (scale, offset, noise std) of the particles (``cryosvi.physics.graylevels``):
    up to GRAY_LEVEL_IMAGES particles against as many clean model images drawn from the
    prior with the conditions (CTF estimates, optics groups, shifts) of random particles
    of the data. No global random state is touched."""
    unit = reference.with_settings(imaging=replace(reference.imaging, scale=1.0, offset=0.0))
    forward = unit.forward_model(data.groups).to(device)
    n = min(len(data), GRAY_LEVEL_IMAGES)
    generator = torch.Generator().manual_seed(seed + 104_729)
    rows = np.sort(torch.randperm(len(data), generator=generator)[:n].numpy())
    images = torch.from_numpy(data.images(rows))
    devices = [forward.coords.device] if forward.coords.is_cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 104_729)
        conditions = data.draw_conditions(max(n, 2), device, generator)
        _, clean = sample_prior(forward, unit.priors, max(n, 2), conditions)
    radius = mask_radius(reference.coords, reference.optics.pixel_size, data.box)
    return estimate_gray_levels(images, clean.cpu(), radius)


def check_run_pixel_size(table: ParticleSet, config, reference: Reference) -> int:
    """The run's working box for ``table``; a CryosviError unless the particles have
    the run's pixel size there (else they are of another data set)."""
    box = working_box(table, config.box)
    if not math.isclose(working_pixel_size(table, box), reference.optics.pixel_size,
                        rel_tol=1e-3):
        raise CryosviError(f"{table.path}: {working_pixel_size(table, box):.4g} Å pixels at "
                           f"the run's {box} px working box, but the run was trained at "
                           f"{reference.optics.pixel_size:.4g} Å")
    return box


def run_particles(table: ParticleSet, config, reference: Reference):
    """(ParticleData, known values) of ``table`` for a trained run (its ``GuideConfig``
    and reference), checked against it (pixel size, CTF estimates, optics groups): the
    run's working box and the metadata's values of the latents the run does not infer."""
    box = check_run_pixel_size(table, config, reference)
    if config.ctf_estimates and not has_ctf_estimates(table):
        raise CryosviError(f"{table.path}: the run uses per-particle CTF estimates "
                           "(rlnDefocusU/V/Angle) and this file has none")
    data = ParticleData(table, box, config.ctf_estimates)
    noise, groups = reference.noise_model, noise_groups(data, [])[1]
    if noise is not None and groups != noise.n_groups:  # spectra go by the groups' order
        raise CryosviError(f"{table.path}: the particles use {groups} optics group(s), but "
                           f"the run's noise model was measured on {noise.n_groups}; infer "
                           "particles of the training's optics groups, or train on these")
    fixed = [s for s in config.sites if s not in config.latents]
    return data, known_values(table, fixed, config)


# ------------------------------------------------------------------ the noise model
NOISE_IMAGES = 2000
"""Particles (and as many prior model images) a noise model is estimated from: 2 000
gave every shell of a 48 px box within 2 % from residuals."""


def noise_groups(data: ParticleData, rows=None) -> tuple[torch.Tensor, int]:
    """((k,) int64, G): the noise model's group of the particles ``rows`` (None: all)
    and the number of groups: the optics group of their CTF (``ParticleData``'s
    conditions, ``group_index``) when the run uses CTF estimates, else 0 (one group, as
    the model's measurement site sees them)."""
    rows = _rows(data.particles, rows)
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
                      level_std=spread, cropped=cropped,
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
    rows = _rows(data.particles, rows)
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
