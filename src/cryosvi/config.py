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
    scale, offset: the data set's gray levels: images are scale * (CTF-filtered
    projection of unit-peak Gaussians) + offset (1 and 0 for the project's own
    simulations; estimated from real particles, ``cryosvi.physics.graylevels``).
    """

    sigma: float = 2.0
    window: int | None = None
    pad_factor: int = 2
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True)
class Priors:
    """Prior over the latents of one particle.

    mode_std: std of each normal-mode amplitude, Å of RMS displacement per pseudo-atom
    (one entry per mode). defocus_mean / defocus_std: Å, positive = underfocus.
    rotation_concentration: 0 gives poses uniform on SO(3); > 0 concentrates the
    ProjectedNormal prior around rotation_mean (unit quaternion, w x y z), as in the paper.
    defocus_offset_std: Å, std of the defocus offset dz around each particle's CTF
    estimate (used when the particles have them). shift_std: Å, std of inferred in-plane
    shifts around the file's (or 0) per axis.
    """

    mode_std: tuple[float, ...] = (2.0,)
    defocus_mean: float = 10000.0
    defocus_std: float = 2500.0
    rotation_concentration: float = 0.0
    rotation_mean: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)
    defocus_offset_std: float = 500.0
    shift_std: float = 2.0

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


SIM_EPOCHS = 320
"""Default epochs of simulation training (``cryosvi train``, ``cryosvi demo``), each of
``SIM_EPOCH_SIZE`` simulated particles in steps of ``SIM_BATCH``: the paper preset (32 px)
trains in 746 s (843 s wall for ``cryosvi train`` on its 10 000 particles) on a 2-core
CPU with bf16 arithmetic (sized for <= 15 minutes; about 21 without bf16 hardware). The guide alone on held-out particles (with ``SIM_LR`` and the mode's loss
weight 4): pose median 1.90 deg, mode r 0.905 after 320 epochs, against 2.01 deg and
0.894 after 265; 265 epochs at 2e-3 with weight 1 gave 2.05 deg and 0.871, 160 fp32
epochs of 128 2.35 deg and 0.81 (benchmarks/results/ablations.md)."""

SIM_BATCH = 256
"""Default particles per simulation step: per image the bf16 trunk is 1.2x faster at
256 than at 128 on the 2-core CPU, and the mode head learnt faster per second (measured,
benchmarks/results/ablations.md)."""

SIM_EPOCH_SIZE = 10_000
"""Default simulated particles per epoch of simulation training (``cryosvi train
--epoch-size``), whatever the number of particles in the file: what the guide needs
does not grow with the data set, only the priors, optics and conditions come from it.
10 000 is the size of the demo's and the paper preset's training sets, whose epochs were
one simulated particle per particle before this was a constant, so their runs keep their
numbers (40 steps of ``SIM_BATCH`` per epoch)."""

SIM_LR = 1.5e-3
"""Default peak learning rate of simulation training (cosine decay to 1 % after 50
warm-up steps). Measured with 265 epochs of the default batch (benchmarks/results/
ablations.md): 1.5e-3 gave the guide alone pose median 1.98 deg and mode r 0.878
against 2.05 deg and 0.871 with 2e-3 (the default at batches of 128), while with 3e-3
the mode head had learnt nothing after 107 epochs."""

ELBO_LR = 1e-4
"""Default peak learning rate of ELBO training (constant)."""

PRECISIONS = ("auto", "bf16", "fp32")
"""What the guide's conv trunk computes in (``cryosvi train --precision``; 'auto': bf16
where the device has it in hardware, ``cryosvi.guide.trunk_bf16``)."""

LIMITS = dict(voltage=(10.0, 3000.0), spherical_aberration=(0.0, 100.0),
              pixel_size=(0.01, 1000.0), box=(8, 4096), defocus=(1.0, 1e6),
              mode_std=(0.0, 1e3), snr=(1e-6, math.inf), pad_factor=(1, 8))
"""Ranges of the settings, wide enough for any microscope and molecule and narrow enough
that no intermediate (wavelength, CTF phase, noise std in float32) overflows."""


def check(optics: Optics, imaging: Imaging, priors: Priors, noise: Noise | None = None,
          where: str = "") -> None:
    """Refuse settings that are not finite or out of their physical range (CryosviError
    naming the setting; ``where`` prefixes the message, e.g. the file they came from)."""
    from cryosvi.errors import CryosviError

    def fail(text):
        raise CryosviError(f"{where}{text}")

    def number(name, value, low, high, low_open=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{name} must be a number, got {value!r}")
        inside = (low < value if low_open else low <= value) and value <= high
        if math.isnan(value) or not inside:
            bracket = "(" if low_open else "["
            fail(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}")

    number("voltage (kV)", optics.voltage, *LIMITS["voltage"])
    number("spherical aberration (mm)", optics.spherical_aberration,
           *LIMITS["spherical_aberration"])
    if not (isinstance(optics.amplitude_contrast, (int, float))
            and 0 <= optics.amplitude_contrast < 1):
        fail(f"amplitude contrast must be in [0, 1), got {optics.amplitude_contrast}")
    number("pixel size (Å)", optics.pixel_size, *LIMITS["pixel_size"])
    if isinstance(optics.box, bool) or not isinstance(optics.box, int):
        fail(f"box must be an integer, got {optics.box!r}")
    number("box (px)", optics.box, *LIMITS["box"])
    number("phase shift (degrees)", optics.phase_shift, -360.0, 360.0)
    number("B-factor (Å^2)", optics.bfactor, 0.0, 1e5)
    if not (isinstance(imaging.sigma, (int, float)) and math.isfinite(imaging.sigma)
            and imaging.sigma >= 0.25 * optics.pixel_size):
        fail(f"sigma must be a finite number of at least a quarter pixel "
             f"({0.25 * optics.pixel_size:g} Å; a narrower Gaussian falls between the "
             f"pixel centres), got {imaging.sigma}")
    window = imaging.window
    if window is None:
        window = default_window(imaging.sigma, optics.pixel_size)
        if window > optics.box:
            fail(f"sigma {imaging.sigma:g} Å gives a {window} px window (+-3 sigma), "
                 f"larger than the {optics.box} px box")
    elif isinstance(window, bool) or not isinstance(window, int) or \
            not 1 <= window <= optics.box:
        fail(f"window must be an integer from 1 to the box ({optics.box} px), got {window}")
    if isinstance(imaging.pad_factor, bool) or not isinstance(imaging.pad_factor, int):
        fail(f"pad factor must be an integer, got {imaging.pad_factor!r}")
    number("pad factor", imaging.pad_factor, *LIMITS["pad_factor"])
    number("gray-level scale", imaging.scale, 0.0, 1e30, low_open=True)
    number("gray-level offset", imaging.offset, -1e30, 1e30)
    if not priors.mode_std:
        fail("at least one mode is needed")
    for value in priors.mode_std:
        number("mode std (Å)", value, *LIMITS["mode_std"], low_open=True)
    number("defocus mean (Å)", priors.defocus_mean, *LIMITS["defocus"])
    number("defocus std (Å)", priors.defocus_std, 0.0, LIMITS["defocus"][1], low_open=True)
    number("rotation concentration", priors.rotation_concentration, 0.0, 1e6)
    number("defocus offset std (Å)", priors.defocus_offset_std, 0.0, LIMITS["defocus"][1],
           low_open=True)
    number("shift std (Å)", priors.shift_std, 0.0, 1e4, low_open=True)
    if len(priors.rotation_mean) != 4 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in priors.rotation_mean) \
            or not any(priors.rotation_mean):
        fail(f"rotation mean must be 4 finite numbers, not all 0, got {priors.rotation_mean}")
    if noise is not None:
        number("SNR", noise.snr, *LIMITS["snr"])
        number("noise std", noise.std, 0.0, 1e30)


GUIDE_TRAINING_BYTES_PER_PIXEL = 256
"""Peak memory of a training step per simulated image and pixel of its box, beyond the
forward model's ``bytes_per_image``: the guide's activations and their gradients.
Measured: one epoch of 64 against 1 024 simulations per batch at box 32 (the paper's
guide, one thread): 327 MB more peak RSS, 349 KB per image, of which the forward model's
estimate is 138 KB and the rest 206 bytes per pixel (rounded up)."""


def bytes_per_image(optics: Optics, imaging: Imaging) -> int:
    """Rough peak memory of the forward model per image in flight, bytes: the projection
    canvas (box + 2 window)^2 float32 and a few complex64 copies of the padded box for the
    CTF (the projection's per-atom work is chunked to a fixed budget)."""
    window = imaging.window or default_window(imaging.sigma, optics.pixel_size)
    padded = imaging.pad_factor * optics.box
    return 4 * (optics.box + 2 * window) ** 2 + 4 * 8 * padded**2
