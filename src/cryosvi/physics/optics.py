"""Microscope optics per optics group and CTF parameters per particle, RELION's terms
(its data_optics table and particle columns), and the electron wavelength."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from cryosvi.config import Optics

# CODATA 2018 (h and e exact since the 2019 SI redefinition).
PLANCK = 6.62607015e-34          # J s
ELECTRON_MASS = 9.1093837015e-31  # kg
ELEMENTARY_CHARGE = 1.602176634e-19  # C
SPEED_OF_LIGHT = 299792458.0     # m / s


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength (Å) at accelerating voltage ``voltage_kv`` (kV).

    lambda = h / sqrt(2 m e V (1 + e V / (2 m c^2))) (e.g. Mindell & Grigorieff 2003;
    RELION's 12.2643247 / sqrt(V (1 + 0.978466e-6 V))). 300 kV -> 0.019687 Å.
    Accepts a float or a tensor (returned in kind).
    """
    volts = voltage_kv * 1e3
    energy = ELEMENTARY_CHARGE * volts
    correction = 1 + energy / (2 * ELECTRON_MASS * SPEED_OF_LIGHT**2)
    momentum_sq = 2 * ELECTRON_MASS * energy * correction
    sqrt = torch.sqrt if isinstance(momentum_sq, Tensor) else math.sqrt
    return PLANCK / sqrt(momentum_sq) * 1e10


class OpticsGroups(NamedTuple):
    """RELION's data_optics table: one entry per optics group, in group order.

    voltage: kV; spherical_aberration: mm; amplitude_contrast: fraction w in [0, 1);
    pixel_size: Å (of the images the CTF is applied to: after Fourier cropping, the
    cropped pixel size). Tuples of floats, so a table is hashable and its stacked basis
    is cached like an Optics'. A particle's ``group`` indexes it from 0
    (rlnOpticsGroup - 1).
    """

    voltage: tuple[float, ...]
    spherical_aberration: tuple[float, ...]
    amplitude_contrast: tuple[float, ...]
    pixel_size: tuple[float, ...]

    @classmethod
    def from_optics(cls, optics: Sequence[Optics]) -> "OpticsGroups":
        """One group per Optics (its phase_shift, bfactor and box are per-particle or
        per-image quantities here and are not used)."""
        if not optics:
            raise ValueError("at least one optics group is needed")
        return cls(*(tuple(float(getattr(o, name)) for o in optics) for name in
                     ("voltage", "spherical_aberration", "amplitude_contrast", "pixel_size")))

    @property
    def n_groups(self) -> int:
        return len(self.voltage)

    def pixel_sizes(self, group: Tensor, like: Tensor) -> Tensor:
        """(B,) Å: each particle's pixel size, in the dtype and device of ``like``."""
        table = torch.tensor(self.pixel_size, dtype=like.dtype, device=like.device)
        return table[group]


class ParticleCTF(NamedTuple):
    """Per-particle CTF parameters, RELION's particle columns; every field (B,).

    defocus_u, defocus_v: Å, positive = underfocus (rlnDefocusU, rlnDefocusV).
    angle: degrees from the x axis towards y (rlnDefocusAngle).
    phase_shift: degrees (rlnPhaseShift); None = 0.
    bfactor: Å^2, envelope exp(-B s^2 / 4) (rlnCtfBfactor); None = 0 (no envelope).
    group: int64 index into ``OpticsGroups`` from 0 (rlnOpticsGroup - 1); None = group 0
    (allowed only with one group).
    """

    defocus_u: Tensor
    defocus_v: Tensor
    angle: Tensor
    phase_shift: Tensor | None = None
    bfactor: Tensor | None = None
    group: Tensor | None = None

    def offset(self, dz: Tensor) -> "ParticleCTF":
        """U + dz, V + dz (Å, (B,)), angle and the rest kept: the defocus latent."""
        return self._replace(defocus_u=self.defocus_u + dz, defocus_v=self.defocus_v + dz)

    def take(self, rows) -> "ParticleCTF":
        """The particles ``rows`` (an index, slice, mask or index tensor) of every field."""
        return ParticleCTF(*(None if t is None else t[rows] for t in self))

    def to(self, *args, **kwargs) -> "ParticleCTF":
        """Every float field through ``Tensor.to``; the group index follows to the same
        device and keeps its integer dtype."""
        moved = [None if t is None else t.to(*args, **kwargs) for t in self[:5]]
        group = None if self.group is None else self.group.to(moved[0].device)
        return ParticleCTF(*moved, group)
