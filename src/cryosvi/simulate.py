"""Simulate a particle data set by running the Pyro model from its prior.

Two streamed passes keep memory at one chunk of images whatever the data-set size:
1. the model (noise-free) draws latents and clean images chunk by chunk into a
   memory-mapped ``.mrcs`` while the signal variance is accumulated; with
   ``ImageEffects``, each clean image first gets the B envelope and its particle's
   contrast (their own random stream);
2. noise with std = sqrt(signal variance / SNR) (the paper's data-set SNR) is added in
   place: white, or the same white draws filtered to each optics group's coloured
   spectrum (pixel variance kept). The defaults make the paper's data, bit for bit as
   before these effects existed.
Everything is written to a marked staging directory that is renamed at the end, so an
interrupted run leaves no half-written data set behind (and the next run removes the
staging directory a killed one left).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from cryosvi.errors import CryosviError
from cryosvi.io.mrc import StackWriter
from cryosvi.io.outputs import check_output_directory, staged_directory
from cryosvi.io.star import optics_table, write_star
from cryosvi.config import Optics
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.latents import REGISTRY, model_sites
from cryosvi.model import sample_prior
from cryosvi.physics.conditions import Conditions
from cryosvi.randomness import preserved_rng
from cryosvi.physics.noise import NoiseModel, RunningMoments, coloured_noise, noise_std_for_snr
from cryosvi.physics.spectrum import (apply_envelope, coloured_spectrum, group_sums, n_shells,
                                      power_spectrum, shell_average)
from cryosvi.reference import Reference

STACK_NAME = "particles.mrcs"
DATASET_KIND = "dataset"


def check_fits_in_box(reference: Reference) -> None:
    """Refuse a box in which some rotation would put atoms outside the image."""
    radius = float(np.linalg.norm(reference.coords, axis=1).max())
    half_box = reference.optics.box * reference.optics.pixel_size / 2
    if radius > half_box:
        needed = int(np.ceil(2 * radius / reference.optics.pixel_size))
        raise CryosviError(
            f"box of {reference.optics.box} px x {reference.optics.pixel_size} Å is too small "
            f"for the molecule (radius {radius:.1f} Å): use --box {needed} or more")


def particles_table(latents: dict[str, np.ndarray]) -> pd.DataFrame:
    """RELION particle rows (1-based image names) from the true latents (each latent's
    ``value_columns``), centred, in optics group 1."""
    n = len(next(iter(latents.values())))
    table = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{STACK_NAME}" for i in range(n)]})
    for site, latent in REGISTRY.items():
        if site in latents:
            for column, values in latent.value_columns(torch.as_tensor(latents[site]), None,
                                                        None).items():
                table[column] = values
    for column in ("rlnOriginXAngst", "rlnOriginYAngst"):
        if column not in table:
            table[column] = np.zeros(n)
    table["rlnOpticsGroup"] = np.ones(n, dtype=int)
    return table


@dataclass(frozen=True)
class Acquisition:
    """What real particles have beyond the paper's model, for ``simulate_dataset``.

    max_shift: Å; each particle's (rlnOriginXAngst, rlnOriginYAngst) uniform in
    [-max_shift, max_shift]. astigmatism: Å; |U - V| uniform in [0, astigmatism] around
    the particle's defocus (drawn from the prior), rlnDefocusAngle uniform in [0, 180).
    groups: the optics groups (voltage, Cs, amplitude contrast; box and pixel size of the
    reference), particles assigned uniformly at random. The defaults are the paper's
    data (centred, U = V, one group)."""

    max_shift: float = 0.0
    astigmatism: float = 0.0
    groups: tuple = ()

    @property
    def is_paper(self) -> bool:
        return self.max_shift == 0 and self.astigmatism == 0 and len(self.groups) <= 1


COLOURED = ((3.0, 0.05, 0.4), (2.0, 0.08, 0.25))
"""(excess A, width w cycles/px, power r at Nyquist) of ``coloured_spectrum`` for the
optics groups in turn (4x and 3x the flat power at zero frequency, 0.4 and 0.25 at
Nyquist: a 300 kV and a 200 kV detector, as benchmarks/realistic/make_dataset.py)."""


@dataclass(frozen=True)
class ImageEffects:
    """What micrographs add to the model's images, for ``simulate_dataset``.

    noise_spectrum: () for white noise, else one (excess, width, nyquist) per optics group
    (``physics.spectrum.coloured_spectrum``; a single entry serves every group), pixel
    variance that of the white noise; contrast_spread: c, each particle's signal times a
    lognormal contrast of mean 1 and log-std c (cryosviTrueContrast); bfactor: Å^2, every
    clean image times the envelope exp(-B s^2 / 4); noise_spread: n, each particle's noise
    times a lognormal level lambda of log-std n and E lambda^2 = 1 (ice thickness;
    cryosviTrueNoiseScale). The defaults add nothing."""

    noise_spectrum: tuple = ()
    contrast_spread: float = 0.0
    bfactor: float = 0.0
    noise_spread: float = 0.0

    @property
    def is_default(self) -> bool:
        return not (self.noise_spectrum or self.contrast_spread or self.bfactor
                    or self.noise_spread)

    def check(self, n_groups: int) -> None:
        """A CryosviError for values out of range or spectra that do not fit the groups."""
        if len(self.noise_spectrum) not in (0, 1, n_groups):
            raise CryosviError(f"{len(self.noise_spectrum)} coloured spectra for {n_groups} "
                               "optics groups: give one for all or one per group")
        for excess, width, nyquist in self.noise_spectrum:
            if not (0 <= excess < 1e3 and 0 < width <= 1 and 0 < nyquist <= 1e3):
                raise CryosviError(f"coloured spectrum (excess {excess}, width {width}, "
                                   f"Nyquist {nyquist}): need excess >= 0, 0 < width <= 1 "
                                   "cycle/px and Nyquist > 0")
        if not 0 <= self.contrast_spread <= 2:
            raise CryosviError(f"contrast spread must be in [0, 2], got {self.contrast_spread}")
        if not 0 <= self.noise_spread <= 2:
            raise CryosviError(f"noise spread must be in [0, 2], got {self.noise_spread}")
        if not 0 <= self.bfactor <= 1e4:
            raise CryosviError(f"B-factor must be in [0, 1e4] Å^2, got {self.bfactor}")

    def shapes(self, box: int, n_groups: int) -> torch.Tensor:
        """(G, n_shells) float64 each group's noise spectrum at pixel variance 1."""
        if not self.noise_spectrum:
            return torch.ones(n_groups, n_shells(box), dtype=torch.float64)
        spectra = self.noise_spectrum * n_groups if len(self.noise_spectrum) == 1 \
            else self.noise_spectrum
        return torch.stack([coloured_spectrum(box, *values) for values in spectra[:n_groups]])


def default_spectra(n_groups: int) -> tuple:
    """``COLOURED`` in turn for ``n_groups`` optics groups."""
    return tuple(COLOURED[k % len(COLOURED)] for k in range(n_groups))


def group_optics(optics: Optics, n_groups: int) -> tuple[Optics, ...]:
    """``n_groups`` optics groups for a simulation: the reference's optics first, then
    alternately 200 kV / Cs 2.0 mm and the reference's voltage and Cs with Cs + 0.3 mm
    per further pair (different wavelengths and aberrations, one box and pixel size)."""
    groups = []
    for k in range(n_groups):
        voltage, cs = (200.0, 2.0) if k % 2 else (optics.voltage, optics.spherical_aberration)
        groups.append(dataclasses.replace(optics, voltage=voltage,
                                          spherical_aberration=cs + 0.3 * (k // 2)))
    return tuple(groups)


def optics_groups_table(groups) -> pd.DataFrame:
    """RELION 3.1's data_optics table of ``groups`` (Optics), numbered from 1."""
    return pd.concat([optics_table(o) for o in groups], ignore_index=True).assign(
        rlnOpticsGroupName=[f"opticsGroup{k + 1}" for k in range(len(groups))],
        rlnOpticsGroup=np.arange(1, len(groups) + 1))


def draw_acquisition(reference: Reference, acquisition: Acquisition, count: int,
                     device) -> tuple[Conditions, dict[str, np.ndarray]]:
    """Per-particle CTF (defocus from the prior, astigmatism, angle, group) and shifts
    of ``count`` particles (global torch RNG), and their STAR columns."""
    priors = reference.priors
    n_groups = max(len(acquisition.groups), 1)
    group = torch.randint(n_groups, (count,))
    mean = priors.defocus_mean + priors.defocus_std * torch.randn(count)
    half = acquisition.astigmatism * torch.rand(count) / 2
    angle = 180.0 * torch.rand(count)
    shifts = acquisition.max_shift * (2 * torch.rand(count, 2) - 1)
    ctf = ParticleCTF(mean + half, mean - half, angle, group=group)
    columns = {"rlnDefocusU": ctf.defocus_u.double().numpy(),
               "rlnDefocusV": ctf.defocus_v.double().numpy(),
               "rlnDefocusAngle": angle.double().numpy(),
               "rlnOriginXAngst": shifts[:, 0].double().numpy(),
               "rlnOriginYAngst": shifts[:, 1].double().numpy(),
               "rlnOpticsGroup": group.numpy() + 1}
    conditions = Conditions(ctf, shifts if acquisition.max_shift > 0 else None)
    return conditions.to(device), columns


@preserved_rng()
def simulate_dataset(reference: Reference, n_particles: int, output: str | Path,
                     seed: int = 0, force: bool = False, chunk_size: int = 256,
                     device: str = "cpu",
                     acquisition: Acquisition = Acquisition(),
                     progress: bool = True,
                     effects: ImageEffects = ImageEffects()) -> Reference:
    """Write ``output/particles.mrcs``, ``particles.star``, ``reference.npz`` and the
    ``.cryosvi`` marker. ``acquisition``: shifts, astigmatism and optics groups
    (default: the paper's data). ``effects``: coloured noise, contrast spread, B envelope,
    noise levels (default: none), recorded as the reference's ``noise_model`` (the truth:
    the noise spectra per optics group, the contrast's mean 1 and std sqrt(exp(c^2) - 1)
    of the lognormal, the B-factor, the levels' log lambda^2 std 2 n, the signal's power
    per shell) unless the images are
    noise-free. ``progress``: tqdm bars on stderr.

    The data set is built in a hidden staging folder beside ``output`` (marked with this
    process id) and renamed into place only when complete and finite; staging folders
    that a killed run left are removed first. An existing ``output`` is replaced only with
    ``force`` and only when it is a cryosvi data set (``cryosvi.io.outputs``).
    Returns the reference with the noise std that was used.
    """
    output = Path(output)
    if n_particles < 1:
        raise CryosviError(f"the number of particles must be >= 1, got {n_particles}")
    replace = check_output_directory(output, DATASET_KIND, force)
    reference.check()
    check_fits_in_box(reference)
    effects.check(max(len(acquisition.groups), 1))
    with staged_directory(output, DATASET_KIND, replace, "simulate") as staging:
        reference = _simulate_into(reference, n_particles, staging, seed, chunk_size, device,
                                   acquisition, progress, effects)
    return reference


def _apply_effects(clean: torch.Tensor, effects: ImageEffects, pixel_size: float,
                   generator: torch.Generator, metadata: dict) -> torch.Tensor:
    """The clean images (B, L, L) with the B envelope and each particle's contrast (drawn
    from ``generator``, recorded in ``metadata``); the same tensor without effects."""
    if effects.bfactor:
        clean = apply_envelope(clean, pixel_size, effects.bfactor)
    if effects.contrast_spread:
        spread = effects.contrast_spread
        contrast = torch.exp(spread * torch.randn(clean.shape[0], generator=generator,
                                                  dtype=torch.float64) - spread**2 / 2)
        metadata.setdefault("cryosviTrueContrast", []).append(contrast.numpy())
        clean = clean * contrast.to(clean.device, clean.dtype)[:, None, None]
    return clean


def _simulate_into(reference: Reference, n: int, directory: Path, seed: int,
                   chunk_size: int, device: str, acquisition: Acquisition,
                   progress: bool = True, effects: ImageEffects = ImageEffects()) -> Reference:
    box = reference.optics.box
    paper = acquisition.is_paper
    groups = acquisition.groups or (reference.optics,)
    # the bare model: the effects (the B envelope among them) are added below
    forward = reference.forward_model(OpticsGroups.from_optics(groups),
                                      envelope=False).to(device)
    pyro.set_rng_seed(seed)
    moments = RunningMoments()
    latents: dict[str, list] = {}
    metadata: dict[str, list] = {}
    stack = StackWriter(directory / STACK_NAME, n, box, reference.optics.pixel_size)
    statistics = (np.nan,) * 4
    effects_generator = torch.Generator().manual_seed(seed + 2)  # draws nothing else moves
    truth: dict[str, list] = {}
    starts = range(0, n, chunk_size)
    try:
        with torch.no_grad():
            for start in tqdm(starts, desc="simulating", unit="chunk", leave=False,
                              disable=not progress):
                stop = min(start + chunk_size, n)
                count = stop - start
                conditions, given = None, None
                if not paper:
                    conditions, columns = draw_acquisition(reference, acquisition, count,
                                                           device)
                    for column, values in columns.items():
                        metadata.setdefault(column, []).append(values)
                    like = torch.zeros((), device=device)
                    given = {latent.site: value for latent in model_sites()
                             if (value := latent.implied_value(conditions, count, like))
                             is not None}
                chunk_latents, clean = sample_prior(forward, reference.priors, count,
                                                    conditions, given=given)
                for site in given or ():  # the acquisition's values, not latents
                    del chunk_latents[site]
                clean = _apply_effects(clean, effects, reference.optics.pixel_size,
                                       effects_generator, truth)
                moments.update(clean)
                stack.write(start, clean.cpu().numpy())
                for site, value in chunk_latents.items():
                    latents.setdefault(site, []).append(value.cpu().numpy())
            if not (moments.variance > 0 and math.isfinite(moments.variance)):
                raise CryosviError(
                    f"the clean images have pixel variance {moments.variance:g}: the "
                    "molecule leaves no signal at these settings (sigma "
                    f"{reference.imaging.sigma:g} Å, pixel {reference.optics.pixel_size:g} "
                    f"Å, box {box} px, mode std {reference.priors.mode_std[0]:g} Å)")
            noise_std = noise_std_for_snr(moments.variance, reference.noise.snr)
            generator = torch.Generator().manual_seed(seed + 1)
            levels_generator = torch.Generator().manual_seed(seed + 3)  # its own draws
            noisy_moments, low, high = RunningMoments(), np.inf, -np.inf
            group = (np.concatenate(metadata["rlnOpticsGroup"]) - 1 if "rlnOpticsGroup"
                     in metadata else np.zeros(n, dtype=np.int64))
            shapes = effects.shapes(box, len(groups))
            power = torch.zeros(len(groups), n_shells(box), dtype=torch.float64)
            # Chunk buffers reused pass after pass: the process's memory stays flat
            # (fresh chunk-sized arrays fragment glibc's heap; ``StackWriter.read``).
            noise_buffer = torch.empty((min(chunk_size, n), box, box))
            clean_buffer = np.empty((min(chunk_size, n), box, box), np.float32)
            for start in tqdm(starts, desc="adding noise", unit="chunk", leave=False,
                              disable=not progress):
                stop = min(start + chunk_size, n)
                noise = torch.randn((stop - start, box, box), generator=generator,
                                    out=noise_buffer[:stop - start])
                clean = stack.read(start, stop, out=clean_buffer[:stop - start])
                rows = torch.from_numpy(group[start:stop]).long()
                if not effects.is_default:
                    power += group_sums(shell_average(power_spectrum(
                        torch.from_numpy(clean).double())), rows, len(groups))[0]
                if effects.noise_spectrum:
                    noise = coloured_noise(shapes[rows], box, white=noise.double()).float()
                if effects.noise_spread:
                    spread = effects.noise_spread
                    level = torch.exp(spread * torch.randn(
                        stop - start, generator=levels_generator, dtype=torch.float64)
                        - spread**2)  # E level^2 = 1
                    truth.setdefault("cryosviTrueNoiseScale", []).append(level.numpy())
                    noise = noise * level.float()[:, None, None]
                if effects.noise_spectrum or effects.noise_spread:
                    noisy = clean + noise_std * noise.numpy()
                else:  # the same float32 operations, in place
                    noisy = np.add(clean, np.multiply(noise.numpy(), np.float32(noise_std),
                                                      out=noise.numpy()), out=clean)
                stack.write(start, noisy)
                if not np.isfinite(noisy).all():
                    raise CryosviError(f"non-finite pixel values in particles {start + 1}.."
                                       f"{stop}; the settings overflow float32 (noise std "
                                       f"{noise_std:g})")
                noisy_moments.update(torch.from_numpy(noisy))
                low, high = min(low, float(noisy.min())), max(high, float(noisy.max()))
            # Header statistics from the streamed moments: mrcfile's own would load the
            # whole stack into memory.
            statistics = (low, high, noisy_moments.mean, noisy_moments.variance ** 0.5)
    finally:
        stack.close(*statistics)
    latents = {site: np.concatenate(values) for site, values in latents.items()}
    table = particles_table(latents)
    for column, parts in {**metadata, **truth}.items():
        table[column] = np.concatenate(parts)
    write_star(directory / "particles.star", table, optics_groups_table(groups))
    noise = type(reference.noise)(snr=reference.noise.snr, std=noise_std)
    # Whether rlnDefocusU/V are CTF estimates a run may use, or the paper's defocus
    # latent that it must infer with the data set's prior (``train.DEFOCUS_PRIORS``).
    source = {**reference.source, "ctf_estimates": not paper}
    reference = reference.with_settings(noise=noise, source=source)
    if not effects.is_default and noise_std > 0:
        count = np.bincount(group, minlength=len(groups)).clip(1)[:, None]
        spread = effects.contrast_spread
        reference = reference.with_settings(noise_model=NoiseModel(
            box, reference.optics.pixel_size, noise_std**2 * shapes,
            signal_power=power / torch.from_numpy(count), contrast_mean=1.0,
            contrast_std=float(np.sqrt(np.expm1(spread**2))), contrast_floor=0.0,
            bfactor=effects.bfactor, level_std=2 * effects.noise_spread,
            origin="cryosvi simulate (the truth)"))
    reference.save(directory / "reference.npz")
    return reference
