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
  to an even working box n <= L (default min(64, L)), so that the guide's size does not
  depend on the data's box.
* the images' noise (``cryosvi.physics.noise.NoiseModel``) is measured from the
  particles in ``cryosvi.noise_data``.

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
from cryosvi.errors import CryosviError
from cryosvi.io.particles import ParticleSet, mean_defocus, origins
from cryosvi.latents import known_values
from cryosvi.model import sample_prior
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.physics.fourier import cropped_pixel_size, fourier_crop
from cryosvi.physics.graylevels import estimate_gray_levels, mask_radius
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
def group_codes(particles: ParticleSet) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N,) int64 in 0..G-1, labels (G,) the sorted rlnOpticsGroup values)."""
    labels, codes = np.unique(particles.column("rlnOpticsGroup"), return_inverse=True)
    return codes.reshape(-1).astype(np.int64), labels


def group_index(particles: ParticleSet) -> torch.Tensor:
    """(N,) int64: each particle's optics group as an index into ``optics_groups``
    (the rank of its rlnOpticsGroup among the particles' distinct values, from 0)."""
    return torch.from_numpy(group_codes(particles)[0])


def optics_groups(particles: ParticleSet, pixel_size: float | None = None) -> OpticsGroups:
    """Every optics group the particles use, in ``group_index`` order: voltage (kV), Cs
    (mm), amplitude contrast and pixel size (Å). Groups of the optics table that no
    particle uses are left out. ``pixel_size`` (Å): the pixel size of the images the CTF
    is applied to, e.g. ``working_pixel_size`` for a working box (then every group must
    share one data pixel size)."""
    codes, labels = group_codes(particles)
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


def particle_rows(particles: ParticleSet, rows) -> np.ndarray:
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
    return torch.from_numpy(origins(particles, particle_rows(particles, rows)))


def particle_ctf(particles: ParticleSet, rows=None) -> ParticleCTF:
    """The file's CTF of the particles ``rows`` (indices; None = all), each field (k,):
    defocus_u, defocus_v (Å, rlnDefocusU/V), angle (deg, rlnDefocusAngle), phase_shift
    (deg, rlnPhaseShift), bfactor (Å^2, rlnCtfBfactor) as float32, and group (int64, the
    ``group_index``). read_particles fills absent V/angle/phase/B (V = U, else 0); a
    file without rlnDefocusU is a CryosviError (see ``has_ctf_estimates``)."""
    particles.require("rlnDefocusU")
    rows = particle_rows(particles, rows)
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
    and reference), checked against it (pixel size, CTF estimates): the run's working
    box and the metadata's values of the latents the run does not infer (the noise of
    its optics groups: ``noise_data.matched_noise_model``)."""
    box = check_run_pixel_size(table, config, reference)
    if config.ctf_estimates and not has_ctf_estimates(table):
        raise CryosviError(f"{table.path}: the run uses per-particle CTF estimates "
                           "(rlnDefocusU/V/Angle) and this file has none")
    data = ParticleData(table, box, config.ctf_estimates)
    fixed = [s for s in config.sites if s not in config.latents]
    return data, known_values(table, fixed, config)
