"""The deterministic forward model: latents -> clean particle image.

    atoms   = M0 + sqrt(N) sum_k alpha_k u_k        (deform; alpha in Å RMS per atom)
    rotated = R(q) atoms                             (rotations)
    image   = truncated Gaussian projection along z  (projection)
    clean   = CTF (*) image                          (ctf, zero-padded FFT)

The same function serves the Pyro model, the simulator and the benchmark.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cryosvi.config import Imaging, Optics, default_window
from cryosvi.ctf import apply_ctf
from cryosvi.projection import project
from cryosvi.rotations import quaternion_to_matrix, rotate


def deform(coords: Tensor, modes: Tensor, amplitudes: Tensor) -> Tensor:
    """Displace pseudo-atoms along normal modes.

    coords (N, 3) Å; modes (K, N, 3) orthonormal as 3N-vectors; amplitudes (B, K) in Å of
    RMS displacement per pseudo-atom (hence the sqrt(N) scaling). Returns (B, N, 3) Å.
    """
    n_atoms = coords.shape[-2]
    return coords + math.sqrt(n_atoms) * torch.einsum("bk,knd->bnd", amplitudes, modes)


class ForwardModel(nn.Module):
    """Pseudo-atoms and their modes plus the imaging settings; no trainable parameters.

    coords (N, 3) Å centred on the rotation centre; modes (K, N, 3).
    ``forward(enm_scale (B, K) Å, rotation (B, 4) unit quaternion w x y z, defocus (B,) Å)``
    returns the clean images (B, box, box), axes [y, x].
    """

    def __init__(self, coords: Tensor, modes: Tensor, optics: Optics, imaging: Imaging):
        super().__init__()
        self.register_buffer("coords", torch.as_tensor(coords, dtype=torch.float32))
        self.register_buffer("modes", torch.as_tensor(modes, dtype=torch.float32))
        self.optics = optics
        self.imaging = imaging
        self.window = imaging.window or default_window(imaging.sigma, optics.pixel_size)

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    def project(self, enm_scale: Tensor, rotation: Tensor) -> Tensor:
        """Projected potential before the CTF, (B, box, box)."""
        atoms = deform(self.coords, self.modes, enm_scale)
        rotated = rotate(atoms, quaternion_to_matrix(rotation))
        return project(rotated, self.optics.box, self.optics.pixel_size,
                       self.imaging.sigma, self.window)

    def forward(self, enm_scale: Tensor, rotation: Tensor, defocus: Tensor) -> Tensor:
        image = self.project(enm_scale, rotation)
        return apply_ctf(image, defocus, defocus, torch.zeros_like(defocus), self.optics,
                         self.imaging.pad_factor)
