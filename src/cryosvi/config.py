"""Settings shared by every layer: microscope optics, image formation and priors.

Frozen dataclasses with explicit units. They are written to and read from plain dicts
(``asdict`` / ``from_dict``) so a run directory or ``reference.npz`` records everything
needed to reproduce a simulation or a training run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Optics:
    """Microscope and detector settings, RELION's optics-group quantities.

    voltage: kV; spherical_aberration: mm; amplitude_contrast: fraction w in [0, 1);
    pixel_size: Å; box: image side in pixels; phase_shift: degrees; bfactor: Å^2
    (CTF envelope exp(-B s^2 / 4), 0 = none).
    """

    voltage: float = 300.0
    spherical_aberration: float = 2.7
    amplitude_contrast: float = 0.1
    pixel_size: float = 2.5
    box: int = 32
    phase_shift: float = 0.0
    bfactor: float = 0.0


@dataclass(frozen=True)
class Imaging:
    """How pseudo-atoms become an image.

    sigma: std of each isotropic Gaussian pseudo-atom, Å. window: side of the square
    pixel patch each atom is truncated to (None: 2 * ceil(3 sigma / pixel) + 1).
    pad_factor: zero-padding factor of the box before the CTF is applied by FFT.
    """

    sigma: float = 2.0
    window: int | None = None
    pad_factor: int = 2


@dataclass(frozen=True)
class Priors:
    """Prior over the latents of one particle.

    mode_std: std of each normal-mode amplitude, Å of RMS displacement per pseudo-atom
    (one entry per mode). defocus_mean / defocus_std: Å, positive = underfocus.
    rotation_concentration: 0 gives poses uniform on SO(3); > 0 concentrates the
    ProjectedNormal prior around rotation_mean (unit quaternion, w x y z), as in the paper.
    """

    mode_std: tuple[float, ...] = (2.0,)
    defocus_mean: float = 10000.0
    defocus_std: float = 2500.0
    rotation_concentration: float = 0.0
    rotation_mean: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)

    @property
    def n_modes(self) -> int:
        return len(self.mode_std)


@dataclass(frozen=True)
class Noise:
    """White Gaussian noise. std in the units of the clean images; inf SNR = no noise."""

    snr: float = 20.0
    std: float = 0.0


def asdict(settings) -> dict:
    """Dataclass -> plain dict of builtins (tuples become lists), for JSON / npz."""
    return dataclasses.asdict(settings)


def from_dict(cls, values: dict):
    """Inverse of :func:`asdict`; unknown keys are ignored, lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**kept)


def default_window(sigma: float, pixel_size: float) -> int:
    """Odd patch side covering at least +-3 sigma: 2 * ceil(3 sigma / pixel) + 1 pixels."""
    return 2 * math.ceil(3.0 * sigma / pixel_size) + 1


PAPER_PRESET = dict(
    optics=Optics(voltage=300.0, spherical_aberration=2.7, amplitude_contrast=0.1,
                  pixel_size=2.5, box=32),
    imaging=Imaging(sigma=2.0, window=5, pad_factor=2),
    priors=Priors(mode_std=(2.0,), defocus_mean=10000.0, defocus_std=2500.0),
    noise=Noise(snr=20.0),
)
"""The paper's data set as read in PAPER.md: box 32, 2.5 Å pixels, sigma 2 Å, window
5 px, one mode, SNR 20, defocus 10000 +- 2500 Å, uniform poses."""
