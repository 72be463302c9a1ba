"""The deterministic forward model: latents -> clean particle image.

    atoms   = M0 + sqrt(N) sum_k alpha_k u_k        (deform; alpha in Å RMS per atom)
    rotated = R(q) atoms                             (rotations)
    image   = truncated Gaussian projection along z  (projection)
    clean   = CTF (*) image, translated by -shifts   (ctf + shifts, one zero-padded FFT)
              (the CTF times exp(-B s^2 / 4), B = the particle's B-factor plus the
              model's ``envelope_bfactor``: RELION's convention, src/ctf.h)
    output  = scale * clean + offset                 (the data's gray levels, Imaging)

Two ways to give the CTF: a data-set defocus (B,) Å with the one ``Optics`` (no
astigmatism; the paper's model), or per particle a ``ParticleCTF`` (U, V, angle, phase
shift, B-factor, optics group; the file's estimates) with ``defocus`` an offset dz added
to U and V, and the per-group voltage, Cs, amplitude contrast and pixel size of an
``OpticsGroups`` table.

The same function serves the Pyro model, the simulator and the benchmark.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from cryosvi.config import Imaging, Optics, default_window
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.physics.ctf import apply_ctf, apply_particle_ctf
from cryosvi.physics.projection import project
from cryosvi.physics.rotations import quaternion_to_matrix, rotate


def deform(coords: Tensor, modes: Tensor, amplitudes: Tensor) -> Tensor:
    """Displace pseudo-atoms along normal modes.

    coords (N, 3) Å; modes (K, N, 3) orthonormal as 3N-vectors; amplitudes (B, K) in Å of
    RMS displacement per pseudo-atom (hence the sqrt(N) scaling). Returns (B, N, 3) Å.
    """
    n_atoms = coords.shape[-2]
    return coords + math.sqrt(n_atoms) * torch.einsum("bk,knd->bnd", amplitudes, modes)


class ForwardModel(nn.Module):
    """Pseudo-atoms and their modes plus the imaging settings; no trainable parameters.

    coords (N, 3) Å centred on the rotation centre; modes (K, N, 3). optics: the box and,
    without per-particle CTFs, the one optics group. groups: the optics-group table
    used with per-particle CTFs (default: ``optics`` as the only group); its pixel sizes
    are those of the images (the cropped ones for a working box).

    ``forward(enm_scale (B, K) Å, rotation (B, 4) unit quaternion w x y z, defocus (B,) Å,
    *, ctf=None, shifts=None)`` returns the clean images (B, box, box), axes [y, x]:

    * ``ctf`` None: U = V = defocus, angle 0, with ``optics`` (bit-identical to before
      these keywords existed when ``shifts`` is None too).
    * ``ctf`` a ``ParticleCTF`` of (B,) tensors: each particle's own U + dz, V + dz
      (dz = ``defocus``, or None for no offset), angle, phase shift and B-factor, with
      its group's optics; each particle is projected at its group's pixel size.
    * ``shifts`` (B, 2) Å: RELION's (rlnOriginXAngst, rlnOriginYAngst); the image is
      translated by -shifts (a phase ramp in the CTF's FFT; ``cryosvi.physics.shifts``).

    envelope_bfactor: Å^2, an envelope exp(-B s^2 / 4) every image gets on top of its
    CTF's own (the optics' B-factor, or each particle's rlnCtfBfactor): the B a run's
    ``NoiseModel`` fits relative to the model (``NoiseModel.bfactor``). It is added to
    the CTF's B-factor, so it costs nothing; 0 (the default) leaves every path as it
    was, bit for bit.

    The result is in the data's gray levels: ``imaging.scale`` times the image plus
    ``imaging.offset``.
    """

    def __init__(self, coords: Tensor, modes: Tensor, optics: Optics, imaging: Imaging,
                 groups: OpticsGroups | None = None, envelope_bfactor: float = 0.0):
        super().__init__()
        self.register_buffer("coords", torch.as_tensor(coords, dtype=torch.float32))
        self.register_buffer("modes", torch.as_tensor(modes, dtype=torch.float32))
        self.optics = optics
        self.imaging = imaging
        self.window = imaging.window or default_window(imaging.sigma, optics.pixel_size)
        self.groups = OpticsGroups.from_optics([optics]) if groups is None else groups
        self.envelope_bfactor = float(envelope_bfactor)
        # The one optics' CTF with the envelope added (hashable: the CTF basis cache).
        self._ctf_optics = optics if not self.envelope_bfactor else dataclasses.replace(
            optics, bfactor=optics.bfactor + self.envelope_bfactor)

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    def project(self, enm_scale: Tensor, rotation: Tensor,
                pixel_size: float | None = None) -> Tensor:
        """Projected potential before the CTF, (B, box, box), at ``pixel_size`` Å
        (default ``optics.pixel_size``)."""
        atoms = deform(self.coords, self.modes, enm_scale)
        rotated = rotate(atoms, quaternion_to_matrix(rotation))
        if pixel_size is None:
            return project(rotated, self.optics.box, self.optics.pixel_size,
                           self.imaging.sigma, self.window)
        window = self.imaging.window or default_window(self.imaging.sigma, pixel_size)
        return project(rotated, self.optics.box, pixel_size, self.imaging.sigma, window)

    def _project_groups(self, enm_scale: Tensor, rotation: Tensor, group) -> Tensor:
        """(B, box, box): each particle projected at its optics group's pixel size (one
        projection per distinct pixel size of the table)."""
        pixel_sizes = sorted(set(self.groups.pixel_size))
        if len(pixel_sizes) == 1:
            return self.project(enm_scale, rotation, pixel_sizes[0])
        if group is None:
            raise ValueError("ParticleCTF.group is needed with several optics groups")
        image = None
        for pixel in pixel_sizes:
            members = [g for g, p in enumerate(self.groups.pixel_size) if p == pixel]
            members = torch.tensor(members, device=rotation.device)
            rows = torch.isin(group.to(rotation.device), members).nonzero()[:, 0]
            part = self.project(enm_scale[rows], rotation[rows], pixel)
            if image is None:
                image = part.new_zeros(rotation.shape[0], *part.shape[1:])
            image = image.index_copy(0, rows, part)
        return image

    def forward(self, enm_scale: Tensor, rotation: Tensor, defocus: Tensor | None, *,
                ctf: ParticleCTF | None = None, shifts: Tensor | None = None) -> Tensor:
        if ctf is None:
            image = self.project(enm_scale, rotation)
            clean = apply_ctf(image, defocus, defocus, torch.zeros_like(defocus),
                              self._ctf_optics, self.imaging.pad_factor, shifts=shifts)
        else:
            if defocus is not None:
                ctf = ctf.offset(defocus)
            if self.envelope_bfactor:
                own = 0.0 if ctf.bfactor is None else ctf.bfactor
                ctf = ctf._replace(bfactor=torch.zeros_like(ctf.defocus_u) + own
                                   + self.envelope_bfactor)
            image = self._project_groups(enm_scale, rotation, ctf.group)
            clean = apply_particle_ctf(image, ctf, self.groups, self.imaging.pad_factor,
                                       shifts=shifts)
        if not torch.is_grad_enabled() and (self.imaging.scale, self.imaging.offset) != (1, 0):
            # clean is this call's own: no second image-sized buffer
            return clean.mul_(self.imaging.scale).add_(self.imaging.offset)
        return self.gray_levels(clean)

    def gray_levels(self, clean: Tensor) -> Tensor:
        """scale * clean + offset (``Imaging``); the images unchanged at 1 and 0."""
        if self.imaging.scale == 1.0 and self.imaging.offset == 0.0:
            return clean
        return clean * self.imaging.scale + self.imaging.offset
