"""White Gaussian noise at a given signal-to-noise ratio.

SNR follows the paper: variance of the clean images over the whole data set divided by
the noise variance. SNR = inf means noise-free.
"""

from __future__ import annotations

import math

from cryosvi.errors import CryosviError


def noise_std_for_snr(signal_variance: float, snr: float) -> float:
    """Noise std giving ``snr`` for clean images of pixel variance ``signal_variance``."""
    if not snr > 0:
        raise CryosviError(f"SNR must be > 0 (or inf for noise-free images), got {snr}")
    if math.isinf(snr):
        return 0.0
    return math.sqrt(signal_variance / snr)


class RunningMoments:
    """Mean and variance of every value fed in chunks (Chan et al. 1979 pairwise update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values) -> None:
        n = values.numel()
        mean = values.double().mean().item()
        m2 = ((values.double() - mean) ** 2).sum().item()
        delta = mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def variance(self) -> float:
        return self.m2 / max(self.count, 1)
