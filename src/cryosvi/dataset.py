"""What training and inference take from a particle set (:class:`ParticleSet`): the
optics the forward model can serve, image statistics, priors from the metadata, and the
check against the reference.

Data -> physics adapters (pure functions of a ParticleSet):

* ``optics_groups`` / ``group_index``: every optics group as a ``cryosvi.ctf.OpticsGroups``
  table (voltage kV, Cs mm, amplitude contrast, pixel size Å), indexed 0..G-1 in the
  order of the sorted rlnOpticsGroup values of the particles.
* ``particle_ctf``: per-particle U, V (Å), angle (deg), phase shift (deg), B-factor (Å^2)
  and group index as a ``cryosvi.ctf.ParticleCTF``; ``has_ctf_estimates``.
* ``known_shifts``: (N, 2) Å, RELION's (rlnOriginXAngst, rlnOriginYAngst); ``has_shifts``.
* ``working_box``, ``working_pixel_size``, ``working_images``: the particles Fourier-cropped
  to an even working box n <= L (default min(64, L)), so that the guide's size does not
  depend on the data's box.

All optics groups must share the image box and pixel size (one projection grid and one
working box serve them); they may differ in voltage, Cs and amplitude contrast.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np
import torch

from cryosvi.config import Optics
from cryosvi.ctf import OpticsGroups, ParticleCTF
from cryosvi.errors import CryosviError
from cryosvi.fourier import cropped_pixel_size, fourier_crop
from cryosvi.io.particles import ORIGINS, ParticleSet, numeric_column
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
    values = {name: float(particles.metadata[column].iloc[first])
              for column, name in MODEL_OPTICS.items() if name not in ("box", "pixel_size")}
    return Optics(box=box, pixel_size=pixel_size, **values)


def data_box(particles: ParticleSet) -> int:
    """L (px): the image side every optics group shares, or a CryosviError."""
    particles.ensure_image_size()
    sizes = np.unique(particles.metadata["rlnImageSize"].to_numpy(np.int64))
    if sizes.size > 1:
        raise CryosviError(f"{particles.path}: the optics groups have different image sizes "
                           f"({', '.join(map(str, sizes))} px); cryosvi needs one box "
                           "(re-extract, or split the file by rlnOpticsGroup)")
    return int(sizes[0])


def data_pixel_size(particles: ParticleSet) -> float:
    """The pixel size (Å) every optics group shares, or a CryosviError."""
    pixels = np.unique(particles.metadata["rlnImagePixelSize"].to_numpy(float))
    if not np.allclose(pixels, pixels[0], rtol=1e-4, atol=0):
        raise CryosviError(f"{particles.path}: the optics groups have different pixel sizes "
                           f"({', '.join(f'{p:g}' for p in pixels[:4])} Å); cryosvi needs "
                           "one (rescale the particles, or split the file by rlnOpticsGroup)")
    return float(pixels[0])


# ------------------------------------------------------------------ optics and CTF
def _group_codes(particles: ParticleSet) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N,) int64 in 0..G-1, labels (G,) the sorted rlnOpticsGroup values)."""
    labels, codes = np.unique(particles.metadata["rlnOpticsGroup"].to_numpy(),
                              return_inverse=True)
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
    frame = particles.metadata.iloc[first]
    pixels = frame["rlnImagePixelSize"].to_numpy(float)
    if pixel_size is not None:
        data_pixel_size(particles)
        pixels = np.full(len(labels), float(pixel_size))
    return OpticsGroups(
        voltage=tuple(frame["rlnVoltage"].to_numpy(float).tolist()),
        spherical_aberration=tuple(frame["rlnSphericalAberration"].to_numpy(float).tolist()),
        amplitude_contrast=tuple(frame["rlnAmplitudeContrast"].to_numpy(float).tolist()),
        pixel_size=tuple(pixels.tolist()))


def _rows(particles: ParticleSet, rows) -> np.ndarray:
    """0-based row indices (k,) int64: all rows for None."""
    if rows is None:
        return np.arange(len(particles))
    rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    if rows.size and (rows.min() < 0 or rows.max() >= len(particles)):
        raise IndexError(f"particle index out of range 0..{len(particles) - 1}")
    return rows


def _column(particles: ParticleSet, column: str, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(particles.metadata[column].to_numpy(np.float32)[rows])


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
    if "rlnDefocusU" not in particles.metadata:
        return False
    u = particles.metadata["rlnDefocusU"].to_numpy(float)
    return bool(u[0] != 0) if u.size == 1 else bool((u != u[0]).any())


def known_shifts(particles: ParticleSet, rows=None) -> torch.Tensor:
    """(k, 2) float32 Å: RELION's (rlnOriginXAngst, rlnOriginYAngst) of the particles
    ``rows`` (None = all; 0 where the file has none). The forward model translates the
    centred projection by -origin (``cryosvi.shifts``), as relion_project does."""
    rows = _rows(particles, rows)
    return torch.stack([_column(particles, c, rows) for c in ORIGINS], dim=1)


def mean_defocus(particles: ParticleSet) -> np.ndarray:
    """(N,) float64 Å: each particle's mean defocus (U + V) / 2 (U alone without
    rlnDefocusV)."""
    u = numeric_column(particles, "rlnDefocusU")
    if "rlnDefocusV" not in particles.metadata:
        return u
    return (u + numeric_column(particles, "rlnDefocusV")) / 2


def has_shifts(particles: ParticleSet) -> bool:
    """Whether the file gives in-plane shifts that are not all zero."""
    return particles.has_shifts


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
    (``invert`` honoured) and Fourier-cropped to ``box`` (``cryosvi.fourier``): the centre
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
    if "rlnDefocusU" in particles.metadata:
        defocus = mean_defocus(particles)
        if len(defocus) > 1 and np.isfinite(defocus).all() and defocus.std() > 0:
            priors = replace(priors, defocus_mean=float(defocus.mean()),
                             defocus_std=float(defocus.std(ddof=1)))
    return reference.with_settings(optics=optics, priors=priors)
