"""What training and inference take from a particle set (:class:`ParticleSet`): the
optics the forward model can serve, the known values of fixed latents, image statistics,
the noise level, priors from the metadata, and the check against the reference.

The forward model has one optics (box, pixel size, voltage, Cs, amplitude contrast), no
per-particle astigmatism and no in-plane shifts (a later issue): several optics groups
are accepted when they agree on those values; shifts in the file get one warning.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np
import torch

from cryosvi.config import Optics
from cryosvi.errors import CryosviError
from cryosvi.io.particles import MODE_COLUMN, ParticleSet, warn
from cryosvi.reference import Reference

KNOWN_COLUMNS = {
    "defocus": ("rlnDefocusU",),
    "rotation": ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"),
}
SITE_NAMES = {"defocus": "defocus", "rotation": "pose", "enm_scale": "modes"}
MODEL_OPTICS = {"rlnImageSize": "box", "rlnImagePixelSize": "pixel_size",
                "rlnVoltage": "voltage", "rlnSphericalAberration": "spherical_aberration",
                "rlnAmplitudeContrast": "amplitude_contrast"}


def model_optics(particles: ParticleSet) -> Optics:
    """The one :class:`Optics` of every optics group, or a CryosviError saying which
    values differ (per-group optics is not modelled yet)."""
    particles.ensure_image_size()
    frame = particles.metadata
    values = {}
    differ = []
    for column, name in MODEL_OPTICS.items():
        distinct = np.unique(frame[column].to_numpy(float))
        if distinct.size > 1 and not np.allclose(distinct, distinct[0], rtol=1e-4, atol=1e-9):
            differ.append(f"{column} {', '.join(f'{v:g}' for v in distinct[:4])}")
        values[name] = float(distinct[0])
    if differ:
        raise CryosviError(f"{particles.path}: the optics groups differ in "
                           f"{'; '.join(differ)}; per-group optics is not modelled yet "
                           "(split the file by rlnOpticsGroup)")
    values["box"] = int(values["box"])
    return Optics(**values)


def known_values(particles: ParticleSet, sites, n_modes: int) -> dict[str, torch.Tensor]:
    """Values of the fixed (known) sites for every particle, from the metadata:
    defocus (N,) the mean of U and V (Å), rotation (N, 4) unit quaternions, modes (N, K)."""
    from cryosvi.rotations import euler_to_matrix, matrix_to_quaternion

    out = {}
    frame = particles.metadata
    for site in sites:
        if site == "defocus":
            particles.require("rlnDefocusU")
            values = frame["rlnDefocusU"].to_numpy(float)
            if "rlnDefocusV" in frame:
                values = (values + frame["rlnDefocusV"].to_numpy(float)) / 2
            out[site] = torch.tensor(values, dtype=torch.float32)
        elif site == "rotation":
            particles.require(*KNOWN_COLUMNS["rotation"])
            angles = [torch.tensor(frame[c].to_numpy(float), dtype=torch.float64)
                      for c in KNOWN_COLUMNS["rotation"]]
            out[site] = matrix_to_quaternion(euler_to_matrix(*angles)).float()
        else:
            columns = [MODE_COLUMN.format(k + 1) for k in range(n_modes)]
            particles.require(*columns)
            out[site] = torch.tensor(frame[columns].to_numpy(float), dtype=torch.float32)
        if not torch.isfinite(out[site]).all():
            raise CryosviError(f"{particles.path}: non-finite values in the "
                               f"{SITE_NAMES[site]} columns")
    return out


def image_statistics(particles, max_images: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Pixel mean and std of up to ``max_images`` particles (a random subset), and the
    mean power per pixel of their outer Fourier shell (see ``high_frequency_power``).
    ``particles``: anything with ``len`` and ``images(indices)``."""
    n = len(particles)
    index = np.arange(n) if n <= max_images else np.sort(
        np.random.default_rng(seed).choice(n, max_images, replace=False))
    total, total_sq, count, shell = 0.0, 0.0, 0, []
    for i in range(0, len(index), 512):
        chunk = particles.images(index[i:i + 512]).astype(np.float64)
        total += chunk.sum()
        total_sq += np.square(chunk).sum()
        count += chunk.size
        shell.append(high_frequency_power(torch.from_numpy(chunk)) * len(chunk))
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 0.0)), sum(shell) / len(index)


def high_frequency_power(images: torch.Tensor) -> float:
    """Mean |FFT|^2 / L^2 of (B, L, L) images over the Fourier shell 0.8-1 x Nyquist. For
    white noise of std s this is s^2; band-limited signal (Gaussian pseudo-atoms of std
    >~ one pixel) contributes little there."""
    box = images.shape[-1]
    fy = torch.fft.fftfreq(box, dtype=torch.float64)
    fx = torch.fft.rfftfreq(box, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    shell = (radius >= 0.8) & (radius <= 1.0)
    # rfft2 keeps half the plane; interior columns stand for two coefficients each, but a
    # mean over the shell of a flat spectrum is the same either way.
    power = torch.fft.rfft2(images.double()).abs().square() / box**2
    return float(power[..., shell].mean())


def estimate_noise_std(image_shell_power: float, reference: Reference,
                       device: str = "cpu", n: int = 1000) -> float:
    """Noise std of the particles: the power of their outer Fourier shell minus that of
    clean images simulated from the reference (white noise is flat in frequency, the
    pseudo-atom signal is not)."""
    from cryosvi.simulate import sample_prior

    forward = reference.forward_model().to(device)
    devices = [forward.coords.device] if forward.coords.is_cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        _, clean = sample_prior(reference, forward, n)
    signal = high_frequency_power(clean.cpu())
    noise_var = image_shell_power - signal
    if not noise_var > 0.05 * image_shell_power:
        raise CryosviError("cannot estimate the noise level: the particles' high-frequency "
                           "power is not above the reference's; give --noise-std")
    return math.sqrt(noise_var)


def check_compatible(particles: ParticleSet, reference: Reference) -> Optics:
    """Box and pixel size of the particles must match the reference; other optics
    values of the particles replace the reference's (with a note). Returns the
    particles' optics. Warns when the file has in-plane shifts (not modelled yet)."""
    optics = model_optics(particles)
    if particles.has_shifts:
        warn(f"{particles.path.name}: in-plane shifts (rlnOriginXAngst/YAngst) are not "
             "modelled yet; the particles are used as if centred")
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
    frame = particles.metadata
    if "rlnDefocusU" in frame:
        defocus = frame["rlnDefocusU"].to_numpy(float)
        if "rlnDefocusV" in frame:
            defocus = (defocus + frame["rlnDefocusV"].to_numpy(float)) / 2
        if len(defocus) > 1 and np.isfinite(defocus).all() and defocus.std() > 0:
            priors = replace(priors, defocus_mean=float(defocus.mean()),
                             defocus_std=float(defocus.std(ddof=1)))
    return reference.with_settings(optics=optics, priors=priors)


def defocus_output(particles: ParticleSet, mean: np.ndarray) -> dict[str, np.ndarray]:
    """rlnDefocusU/V/Angle for inferred mean defoci ``mean`` (N,) Å that keep each
    particle's astigmatism: U = m + (U_in - V_in) / 2, V = m - (U_in - V_in) / 2, the
    angle kept (0 where the input has no defocus)."""
    frame = particles.metadata
    if "rlnDefocusU" in frame:
        half = (frame["rlnDefocusU"].to_numpy(float) - frame["rlnDefocusV"].to_numpy(float)) / 2
        angle = frame["rlnDefocusAngle"].to_numpy(float)
    else:
        half, angle = np.zeros_like(mean), np.zeros_like(mean)
    return {"rlnDefocusU": mean + half, "rlnDefocusV": mean - half, "rlnDefocusAngle": angle}
