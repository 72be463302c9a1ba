"""Argument types and checks shared by the commands."""

from __future__ import annotations

import argparse
import math

from cryosvi.config import Imaging, Optics, Priors
from cryosvi.errors import CryosviError


def positive(text: str) -> float:
    """A float > 0 ('inf' allowed), for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _integer_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return parse


positive_int = _integer_at_least(1)
"""An integer >= 1, for argparse."""
non_negative_int = _integer_at_least(0)
"""An integer >= 0, for argparse."""


def add_threads_argument(parser) -> None:
    """--threads N: torch's CPU threads, set by ``cryosvi.cli.main`` before the command."""
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads for torch (default: torch's own choice)")


def validate_settings(optics: Optics, imaging: Imaging, priors: Priors) -> None:
    """Physical sanity of settings that argparse types cannot check alone."""
    if not 0 <= optics.amplitude_contrast < 1:
        raise CryosviError(f"amplitude contrast must be in [0, 1), got {optics.amplitude_contrast}")
    if optics.spherical_aberration < 0:
        raise CryosviError(f"spherical aberration must be >= 0 mm, got {optics.spherical_aberration}")
    if priors.defocus_std < 0:
        raise CryosviError(f"defocus std must be >= 0 Å, got {priors.defocus_std}")
    if optics.box < 8:
        raise CryosviError(f"box must be at least 8 px, got {optics.box}")
    for name, value in (("pixel size", optics.pixel_size), ("sigma", imaging.sigma),
                        ("voltage", optics.voltage)):
        if not (value > 0 and math.isfinite(value)):
            raise CryosviError(f"{name} must be a finite number > 0, got {value}")
