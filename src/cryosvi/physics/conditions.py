"""What a batch of particles is imaged with besides its latents: the per-particle CTF
estimates (with each particle's optics group) and the known in-plane shifts."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Conditions(NamedTuple):
    """What a batch of particles is imaged with besides its latents, per particle.

    ctf: a :class:`cryosvi.physics.optics.ParticleCTF` of (B,) tensors (the file's CTF estimates
    and optics group) or None (the data-set defocus prior, one optics group, no
    astigmatism: the paper's model). shifts: (B, 2) Å, the file's
    (rlnOriginXAngst, rlnOriginYAngst), or None (centred particles).
    """

    ctf: object = None
    shifts: Tensor | None = None

    def take(self, rows) -> "Conditions":
        """The particles ``rows`` (an index array or tensor) of every field."""
        rows = torch.as_tensor(np.asarray(rows)) if not torch.is_tensor(rows) else rows
        return Conditions(None if self.ctf is None else self.ctf.take(rows.to(
                              self.ctf.defocus_u.device)),
                          None if self.shifts is None else self.shifts[rows.to(
                              self.shifts.device)])

    def to(self, device) -> "Conditions":
        return Conditions(None if self.ctf is None else self.ctf.to(device),
                          None if self.shifts is None else self.shifts.to(device))

    def expand(self, n_samples: int) -> "Conditions":
        """Each particle's conditions repeated for S samples, (S * B,) in (S, B) order."""
        def tile(t):
            return None if t is None else t.repeat(n_samples, *([1] * (t.dim() - 1)))
        ctf = None if self.ctf is None else type(self.ctf)(*(tile(t) for t in self.ctf))
        return Conditions(ctf, tile(self.shifts))

    def quarter_turned(self, turns: int) -> "Conditions":
        """The conditions of the particles' images turned by ``turns`` quarter turns
        (``rotations.quarter_turn_images``): the shifts turned with them. The CTF is kept:
        the guide's heads see only its mean defocus, which a turn leaves alone."""
        if not turns or self.shifts is None:
            return self
        from cryosvi.physics.rotations import quarter_turn_shifts

        return self._replace(shifts=quarter_turn_shifts(self.shifts, turns))

    def defocus_estimate(self) -> Tensor | None:
        """(B,) Å: each particle's mean defocus estimate (U + V) / 2, or None."""
        if self.ctf is None:
            return None
        return (self.ctf.defocus_u + self.ctf.defocus_v) / 2
