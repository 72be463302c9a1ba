"""The noise of particle images: coloured (stationary) Gaussian noise per optics group, a
per-particle contrast and noise level, and the likelihood of them all.

The measurement model (``NoiseModel``), for a particle of optics group g with clean
model image m (the forward model's, gray levels applied):

    x = a m + b + n,   n ~ N(0, lambda^2 C_g),   a ~ N(mu, tau^2) truncated to [floor, inf),
    log lambda^2 ~ N(-s^2 / 2, s^2)   (s = ``NoiseModel.level_std``; 0: lambda = 1),

with C_g circulant of spectrum T_g = S_g + k D_g per radial shell (``physics.spectrum``
for the grid and units): S_g the noise spectrum (RELION's sigma2_noise idea, Scheres
2012, J. Mol. Biol. 415:406), D_g the model-error spectrum (the residual power the model
does not explain) and k = ``ERROR_WEIGHT``. The offset b has a flat prior and is
integrated out exactly by leaving the DC coefficient out of the likelihood (a constant
image is the DC coefficient alone); the contrast a (ice thickness, dose, RELION's
per-particle normalisation) is integrated out in closed form and the level lambda^2 by
Laplace's method (``cryosvi.physics.contrast``).

The Gaussian log density of a residual r with spectrum T, exact for the circulant
covariance (Parseval on the rfft2 half plane, weights w_k of
``spectrum.coefficient_weights``, d of them counted):

    log p(r) = -1/2 sum_k w_k |R_k|^2 / (N T_k) - 1/2 sum_k w_k log T_k - d/2 log 2 pi.

With the DC term left out (d = N - 1) it is the density of r's component orthogonal to
constant images. White noise of std s is the special case T = s^2 in every shell, and
with mu = 1, tau = 0 the likelihood is today's ``Normal(clean, s).to_event(2)`` plus
N rbar^2 / (2 s^2) + 1/2 log(2 pi s^2), rbar the residual's pixel mean (the DC term's
own log density, left out). Images Fourier-cropped to an even working box have their
Nyquist row and column at 0 (``fourier_crop``); a ``NoiseModel`` with ``cropped`` leaves
those 2L - 1 coefficients out as well.

*Whitening* x -> irfft2(X / sqrt(T)) (DC and, when cropped, Nyquist set to 0) turns
the noise into white noise of unit variance, so white-noise code (Gauss-Newton
residuals) applies to whitened data and model images unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryosvi.errors import CryosviError
from cryosvi.physics.contrast import ContrastMarginal, level_marginal, level_mode, truncated_normal
from cryosvi.physics.spectrum import (coefficient_weights, counted_dimensions, expand_shells,
                                      n_shells)

ERROR_WEIGHT = 8.0
"""k in T = S + k D: more than 1 because the misfit is one error repeated in every image
of a view, not independent noise. Measured with ``cryosvi infer``'s defaults on
RELION-projected all-atom particles with a hinge, coloured noise, B 100 and junk (SNR 1,
600 particles; pose, defocus and a learnt mode inferred; benchmarks/results/noise/):
k = 2, 4, 8 gave pose cover95 0.859, 0.887, 0.908 once the frames are aligned
(``cryosvi evaluate``), defocus 0.944, 0.944, 0.955, mode |Spearman| 0.916, 0.910,
0.922; on cryosvi's own coloured simulations (D ~ 0) the pose's 95 % radius grew 1.8 %
(k = 2) and 2.2 % (k = 8) over no model error, pose cover95 0.923 with either; the
realistic poses-given set at SNR 0.1 kept its |Spearman| (0.654 -> 0.653)."""


def noise_std_for_snr(signal_variance: float, snr: float) -> float:
    """Noise std giving ``snr`` for clean images of pixel variance ``signal_variance``
    (the paper's SNR: variance of the clean images over the data set divided by the
    noise variance; SNR = inf means noise-free)."""
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
        self._scratch = torch.empty(0, dtype=torch.float64)  # reused chunk to chunk

    def update(self, values) -> None:
        n = values.numel()
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.float64)
        scratch = self._scratch[:n].view(values.shape)
        scratch.copy_(values)
        mean = scratch.mean().item()
        m2 = scratch.sub_(mean).pow_(2).sum().item()
        delta = mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def variance(self) -> float:
        return self.m2 / max(self.count, 1)


# ------------------------------------------------------------- spectra as filters


def _filter(spectrum: Tensor, box: int, power: float, drop_dc: bool,
            drop_nyquist: bool, like: Tensor) -> Tensor:
    """(..., L, L//2 + 1): the per-shell ``spectrum`` (..., n_shells) to the ``power``,
    with the dropped coefficients at 0, in the real dtype and device of ``like``."""
    values = expand_shells(spectrum.to(like.device, like.dtype), box) ** power
    keep = coefficient_weights(box, drop_dc, drop_nyquist, like.device, like.dtype) > 0
    return values * keep


def chi2_misfit_limit(dimensions: int, sigmas: float) -> float:
    """The largest half squared norm of ``dimensions`` whitened residuals that noise
    alone explains, ``sigmas`` standard deviations above its expectation: |r|^2 is
    chi^2_n, so |r|^2 / 2 has mean n / 2 and std sqrt(n / 2)."""
    return dimensions / 2 + sigmas * math.sqrt(dimensions / 2)


def whiten(images: Tensor, spectrum: Tensor, drop_nyquist: bool = False) -> Tensor:
    """(..., L, L): irfft2(rfft2(x) / sqrt(S)) with DC (and with ``drop_nyquist`` the
    Nyquist row and column) at 0: noise of spectrum S becomes white noise of unit
    variance on the kept coefficients, and |whiten(r)|^2 summed over the pixels is the
    likelihood's quadratic form. spectrum (..., n_shells), broadcast against the images'
    leading dimensions. Linear: whiten(x) - whiten(m) = whiten(x - m)."""
    box = images.shape[-1]
    filt = _filter(spectrum, box, -0.5, True, drop_nyquist, images)
    return torch.fft.irfft2(torch.fft.rfft2(images) * filt, s=(box, box))


def log_det(spectrum: Tensor, box: int, drop_dc: bool = True,
            drop_nyquist: bool = False) -> Tensor:
    """(...,): sum of w_k log S_k over the counted coefficients, log det of the circulant
    covariance on them (its eigenvalues are the S_k). spectrum (..., n_shells)."""
    w = coefficient_weights(box, drop_dc, drop_nyquist, spectrum.device, spectrum.dtype)
    return (w * expand_shells(spectrum, box).log()).sum((-2, -1))


def gaussian_log_likelihood(residuals: Tensor, spectrum: Tensor, drop_dc: bool = True,
                            drop_nyquist: bool = False, level_std: float = 0.0) -> Tensor:
    """(...,): log N(r; 0, C) of residual images r (..., L, L) for the circulant C of
    per-shell spectrum S (..., n_shells), exact (module notes); ``drop_dc``: the density
    of r's component orthogonal to constant images (offset-invariant); ``level_std``:
    each image's noise level integrated out (``level_marginal``, C -> lambda^2 C)."""
    box = residuals.shape[-1]
    metric = _filter(spectrum, box, -1.0, drop_dc, drop_nyquist, residuals) * \
        coefficient_weights(box, drop_dc, drop_nyquist, residuals.device, residuals.dtype)
    quadratic = (metric * torch.fft.rfft2(residuals).abs().square()).sum((-2, -1)) / box**2
    dims = counted_dimensions(box, drop_dc, drop_nyquist)
    determinant = log_det(spectrum.to(residuals), box, drop_dc, drop_nyquist)
    if level_std > 0:
        zero = torch.zeros_like(quadratic)
        return level_marginal(quadratic, zero, zero, determinant, dims, 0.0, 0.0,
                              level_std=level_std).log_likelihood.to(quadratic.dtype)
    return -0.5 * quadratic - 0.5 * determinant - 0.5 * dims * math.log(2 * math.pi)


def coloured_noise(spectrum: Tensor, box: int, generator: torch.Generator | None = None,
                   white: Tensor | None = None, drop_nyquist: bool = False,
                   dtype=torch.float64, device=None) -> Tensor:
    """(..., L, L) stationary Gaussian noise of per-shell spectrum S (..., n_shells):
    white N(0, 1) pixels ``white`` (..., L, L), or drawn from ``generator`` (None: the
    global stream) on its device, filtered by sqrt(S) in Fourier space (S radial, hence
    even: the result is real with E|X_k|^2 = N S_k). ``drop_nyquist``: the Nyquist row
    and column at 0, as in images Fourier-cropped to an even box."""
    if white is None:
        shape = (*spectrum.shape[:-1], box, box)
        where = generator.device if generator is not None else (device or spectrum.device)
        white = torch.randn(shape, generator=generator, dtype=dtype, device=where)
    white = white.to(device or white.device)
    filt = _filter(spectrum, box, 0.5, False, drop_nyquist, white)
    return torch.fft.irfft2(torch.fft.rfft2(white) * filt, s=(box, box))


# ------------------------------------------------------------ inner products


def whitened_products(data: Tensor, model: Tensor, spectrum: Tensor,
                      drop_nyquist: bool = False,
                      mean: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(<r, r>, <u, r>, <u, u>) (each (...,)): inner products of the whitened residual
    r = data - mean * model and model image u in the metric C^-1 of per-shell spectrum
    S (DC left out): sum_k w_k Re(conj(A_k) B_k) / (N S_k). data, model (..., L, L),
    broadcast. The residual is formed in Fourier space, so gradients flow through one
    transform of the model."""
    box = model.shape[-1]
    metric = _filter(spectrum, box, -1.0, True, drop_nyquist, model) * \
        coefficient_weights(box, True, drop_nyquist, model.device, model.dtype) / box**2
    fm = torch.fft.rfft2(model)
    fr = torch.fft.rfft2(data)
    if mean:
        fr = fr - mean * fm
    return ((metric * (fr.real.square() + fr.imag.square())).sum((-2, -1)),
            (metric * (fm.real * fr.real + fm.imag * fr.imag)).sum((-2, -1)),
            (metric * (fm.real.square() + fm.imag.square())).sum((-2, -1)))


# ------------------------------------------------------------------ the noise model


@dataclass(frozen=True, eq=False)
class NoiseModel:
    """The noise of a data set at one box (module notes).

    box: L, the images' side (px), and pixel_size (Å), the box the shells belong to
    (the working box of a run). noise, error, signal_power: (G, n_shells(L)) float64, per
    optics group (``dataset.group_index`` order) and shell, in pixel-variance units: S,
    the noise spectrum; D, the model-error spectrum (default 0); P, the particles' mean
    signal power (for the structureless junk model, ``inference.junk``; default 0).
    error_weight: k in T = S + k D. contrast_mean, contrast_std, contrast_floor: mu, tau
    and the lower bound of the contrast prior, in units of the model images. bfactor:
    Å^2, the envelope exp(-B s^2 / 4) the model images need on top of the forward
    model's CTF (``spectrum.apply_envelope``; ``Reference.forward_model`` adds it to each
    particle's CTF B-factor, so the likelihood and the training simulations see it).
    level_std: s, the spread of the images' own noise levels: image i's noise is
    lambda_i^2 T with log lambda_i^2 ~ N(-s^2 / 2, s^2), integrated out in the likelihood
    (``level_marginal``) and drawn in ``sample`` (0: every image has T). cropped: the
    images are Fourier-cropped to an even box, so their Nyquist
    row and column are 0 and left out. origin: how it was made (free text, provenance).
    groups: the rlnOpticsGroup of each row (G,), or () where unknown (a simulation, a
    run without CTF estimates): then rows go with particles' groups by order alone
    (``for_groups``).
    """

    box: int
    pixel_size: float
    noise: Tensor = dataclasses.field(repr=False)
    error: Tensor | None = dataclasses.field(default=None, repr=False)
    signal_power: Tensor | None = dataclasses.field(default=None, repr=False)
    error_weight: float = ERROR_WEIGHT
    contrast_mean: float = 1.0
    contrast_std: float = 0.0
    contrast_floor: float = 0.0
    bfactor: float = 0.0
    level_std: float = 0.0
    cropped: bool = False
    origin: str = ""
    groups: tuple[int, ...] = ()

    def __post_init__(self):
        noise = torch.as_tensor(self.noise, dtype=torch.float64)
        noise = noise[None] if noise.dim() == 1 else noise
        set_ = object.__setattr__
        set_(self, "noise", noise)
        for name in ("error", "signal_power"):
            value = getattr(self, name)
            set_(self, name, torch.zeros_like(noise) if value is None
                 else torch.as_tensor(value, dtype=torch.float64, device=noise.device))
        for name in ("pixel_size", "error_weight", "contrast_mean", "contrast_std",
                     "contrast_floor", "bfactor", "level_std"):
            set_(self, name, float(getattr(self, name)))
        set_(self, "box", int(self.box))
        set_(self, "cropped", bool(self.cropped) and self.box % 2 == 0)
        set_(self, "groups", tuple(int(g) for g in self.groups))
        self.check()

    def check(self, where: str = "") -> None:
        """Shapes and ranges; a CryosviError naming the problem."""
        shape = (self.noise.shape[0], n_shells(self.box))
        if self.noise.dim() != 2 or self.noise.shape[0] < 1 or self.noise.shape != shape:
            raise CryosviError(f"{where}the noise spectrum must be (groups, {shape[1]}) for "
                               f"a {self.box} px box, got {tuple(self.noise.shape)}")
        for name in ("error", "signal_power"):
            if getattr(self, name).shape != self.noise.shape:
                raise CryosviError(f"{where}the {name.replace('_', ' ')} spectrum must be "
                                   f"{shape}, got {tuple(getattr(self, name).shape)}")
        if not (torch.isfinite(self.noise).all() and (self.noise > 0).all()):
            raise CryosviError(f"{where}the noise spectrum must be finite and > 0")
        for name in ("error", "signal_power"):
            value = getattr(self, name)
            if not (torch.isfinite(value).all() and (value >= 0).all()):
                raise CryosviError(f"{where}the {name.replace('_', ' ')} spectrum must be "
                                   "finite and >= 0")
        checks = {"pixel size": self.pixel_size > 0 and math.isfinite(self.pixel_size),
                  "error weight": 0 <= self.error_weight < math.inf,
                  "contrast mean": math.isfinite(self.contrast_mean),
                  "contrast std": 0 <= self.contrast_std < math.inf,
                  "contrast floor": not math.isnan(self.contrast_floor)
                  and self.contrast_floor < math.inf
                  and (self.contrast_std > 0 or self.contrast_floor <= self.contrast_mean),
                  "B-factor": math.isfinite(self.bfactor),
                  "noise level spread": 0 <= self.level_std < math.inf, "box": self.box >= 2}
        for name, ok in checks.items():
            if not ok:
                raise CryosviError(f"{where}bad noise model {name}")
        if self.groups and (len(self.groups) != self.n_groups
                            or len(set(self.groups)) != len(self.groups)):
            raise CryosviError(f"{where}bad noise model optics groups {self.groups} for "
                               f"{self.n_groups} spectra")

    def for_groups(self, groups: tuple[int, ...], count: int) -> "NoiseModel":
        """The noise model of particles whose ``count`` noise groups are the optics
        groups ``groups`` (rlnOpticsGroup, in the particles' group order; () where they
        have none): each group's spectra taken by its number where both know theirs, else
        by order (then the counts must agree). A CryosviError for a group it has no
        spectrum of."""
        if not (self.groups and groups):
            if count != self.n_groups:
                raise CryosviError(f"the particles use {count} optics group(s), but the "
                                   f"noise model was measured on {self.n_groups}")
            return self
        missing = [g for g in groups if g not in self.groups]
        if missing:
            raise CryosviError(f"optics group {missing[0]} of the particles has no noise "
                               f"spectrum (the noise model's groups: "
                               f"{', '.join(map(str, self.groups))})")
        rows = torch.tensor([self.groups.index(g) for g in groups],
                            device=self.noise.device)
        return self.replace(noise=self.noise[rows], error=self.error[rows],
                            signal_power=self.signal_power[rows], groups=tuple(groups))

    # ---------------------------------------------------------------- construction
    @classmethod
    def white(cls, std: float, box: int, pixel_size: float, n_groups: int = 1,
              **settings) -> "NoiseModel":
        """White noise of pixel std ``std`` in every group (T = std^2 in every shell),
        contrast 1: the likelihood of ``Normal(clean, std)`` but for the DC term."""
        noise = torch.full((n_groups, n_shells(box)), float(std) ** 2, dtype=torch.float64)
        return cls(box, pixel_size, noise, **settings)

    def replace(self, **changes) -> "NoiseModel":
        return dataclasses.replace(self, **changes)

    def to(self, device) -> "NoiseModel":
        return self.replace(noise=self.noise.to(device), error=self.error.to(device),
                            signal_power=self.signal_power.to(device))

    def at_box(self, box: int) -> "NoiseModel":
        """The noise of the same images Fourier-cropped to ``box`` <= L
        (``physics.fourier.fourier_crop``): shells below the new Nyquist keep their
        frequencies, every spectrum scales by (n / L)^2 (cropping keeps gray levels, so
        a coefficient's |X|^2 / N scales by n^2 / L^2), the corners of the new box take
        the old box's rings (the spectra are radial), the pixel grows by L / n and the
        Nyquist row and column of an even n are left out."""
        box = int(box)
        if box == self.box:
            return self
        if not 2 <= box < self.box:
            raise CryosviError(f"a noise model of a {self.box} px box cannot be resampled "
                               f"to {box} px (only cropped)")
        keep, factor = n_shells(box), (box / self.box) ** 2
        return self.replace(box=box, pixel_size=self.pixel_size * self.box / box,
                            noise=factor * self.noise[:, :keep],
                            error=factor * self.error[:, :keep],
                            signal_power=factor * self.signal_power[:, :keep],
                            cropped=box % 2 == 0)

    # ------------------------------------------------------------------- properties
    @property
    def n_groups(self) -> int:
        return self.noise.shape[0]

    @property
    def total(self) -> Tensor:
        """(G, n_shells): T = S + k D, the spectrum the likelihood uses."""
        return self.noise + self.error_weight * self.error

    @property
    def dimensions(self) -> int:
        """The real dimensions an image's likelihood counts (L^2 less DC and Nyquist)."""
        return counted_dimensions(self.box, True, self.cropped)

    def log_det(self) -> Tensor:
        """(G,): log det of each group's covariance on the counted coefficients."""
        return log_det(self.total, self.box, True, self.cropped)

    def spectra(self, group: Tensor | None, like: Tensor) -> Tensor:
        """(..., n_shells): T of each image's group, for images ``like`` (..., L, L);
        group (...) int64 broadcastable to like's leading shape, or None (all group 0)."""
        total = self.total.to(like.device, like.dtype)
        if group is None:
            if self.n_groups != 1:
                raise ValueError(f"the noise model has {self.n_groups} optics groups; "
                                 "give each image's group")
            return total[0]
        return total[group.to(like.device).long()]

    def _log_det_of(self, group: Tensor | None, like: Tensor) -> Tensor:
        values = self.log_det().to(like.device)
        return values[0] if group is None else values[group.to(like.device).long()]

    # ------------------------------------------------------------------ likelihood
    def whiten(self, images: Tensor, group: Tensor | None = None) -> Tensor:
        """(..., L, L): the images whitened with their group's T (``whiten``): the
        residuals of Gauss-Newton are whiten(data) - whiten(model) (linear)."""
        self._check_box(images)
        return whiten(images, self.spectra(group, images), self.cropped)

    def contrast_posterior(self, images: Tensor, clean: Tensor,
                           group: Tensor | None = None) -> ContrastMarginal:
        """The contrast-marginal log-likelihood of ``images`` (..., L, L) given the clean
        model images (..., L, L) (float64, (...,)) and the contrast's posterior mean and
        std (``contrast_marginal``; with ``level_std``, the noise level integrated out
        too: ``level_marginal``)."""
        self._check_box(images)
        like = clean
        spectra = self.spectra(group, like)
        rr, ur, uu = whitened_products(images, clean, spectra, self.cropped,
                                       self.contrast_mean)
        return level_marginal(rr, ur, uu, self._log_det_of(group, like).double(),
                              self.dimensions, self.contrast_mean, self.contrast_std,
                              self.contrast_floor, self.level_std)

    def log_likelihood(self, images: Tensor, clean: Tensor,
                       group: Tensor | None = None) -> Tensor:
        """(...,) log p(images | clean): coloured Gaussian noise of T, the offset
        integrated out (DC left out), the contrast integrated out in closed form; in the
        dtype of ``clean``. Differentiable in both."""
        out = self.contrast_posterior(images, clean, group).log_likelihood
        return out.to(torch.promote_types(images.dtype, clean.dtype))

    def residuals(self, images: Tensor, clean: Tensor, group: Tensor | None = None) -> Tensor:
        """(..., L^2 + 1), or (..., L^2 + 2) with ``level_std``: Gauss-Newton residuals
        whose half squared norm is the likelihood's quadratic part: the whitened residual
        y - a u at the contrast's (untruncated) posterior mean a, flattened, and the
        prior's (a - mu) / tau (0 for tau = 0). Indeed min_a |y - a u|^2 + (a - mu)^2 /
        tau^2 = <r,r> - tau^2 <u,r>^2 / D (``contrast_marginal``), the minimiser being the
        posterior mean; so -log p = |residuals|^2 / 2 + 1/2 log D + const, with 1/2 log D,
        which depends on the model image only through its whitened norm, and the
        truncation left out (negligible for particles whose contrast is well above the
        floor). The posterior mean follows the model image (variable projection, Golub &
        Pereyra 1973), so the Jacobian of these residuals is the reduced problem's.

        With ``level_std`` the noise level is profiled: y and u are divided by each
        image's level lambda at its mode v = log lambda^2 (``level_mode``, held fixed), and
        a last residual (``_level_residual``: sqrt(n v + (v - m)^2 / s^2 + const), n the
        dimensions, m = -s^2 / 2, s = level_std) carries the rest of -2 log p(x, v): the
        log determinant and the level's prior. Without it the half squared norm would be
        about n / 2 whatever the fit (the level absorbs the misfit), and Gauss-Newton's
        steps, judged by it against the latents' priors, would shrink toward the prior.
        At the mode v is stationary, so this residual's derivative through v is 0: its
        Jacobian is 0, as computed with v held fixed."""
        self._check_box(images)
        spectra = self.spectra(group, clean)
        y = whiten(images, spectra, self.cropped)
        u = whiten(clean, spectra, self.cropped)
        tau2 = self.contrast_std**2
        if self.level_std > 0:  # the whitened images over the level at its mode
            r = y - self.contrast_mean * u
            products = [(a * b).sum((-2, -1)) for a, b in ((r, r), (u, r), (u, u))]
            v = level_mode(*products, self._log_det_of(group, clean).double(),
                           self.dimensions, self.contrast_mean, self.contrast_std,
                           self.contrast_floor, self.level_std)
            scale = torch.exp(-0.5 * v).to(y.dtype)[..., None, None]
            y, u = y * scale, u * scale
        r = y - self.contrast_mean * u
        ur, uu = (u * r).sum((-2, -1)), u.square().sum((-2, -1))
        offset = tau2 * ur / (1 + tau2 * uu)  # a - mu
        image = (r - offset[..., None, None] * u).flatten(-2)
        prior = offset / self.contrast_std if tau2 > 0 else torch.zeros_like(offset)
        parts = [image, prior[..., None]]
        if self.level_std > 0:
            parts.append(self._level_residual(v).to(image.dtype)[..., None])
        return torch.cat(parts, -1)

    def _level_residual(self, v: Tensor) -> Tensor:
        """sqrt(f(v) - f(v_low)), f(v) = n v + (v - m)^2 / s^2 (``residuals``), with v_low =
        m - min(n s^2 / 2, 1): f rises from its minimum at m - n s^2 / 2, so this is real
        for v >= v_low, and of the order of n rather than of f's depth n^2 s^2 / 4
        (which float32 sums of squares would not resolve). Below v_low (an image with
        under e^-1 of the noise of its group's spectrum) it is 0."""
        n, s2 = self.dimensions, self.level_std**2
        m = -0.5 * s2

        def f(x):
            return n * x + (x - m) ** 2 / s2

        return (f(v) - f(m - min(0.5 * n * s2, 1.0))).clamp_min(0).sqrt()

    def misfit_limit(self, sigmas: float) -> float:
        """The largest half squared norm of ``residuals`` at a particle's mode that this
        noise explains, ``sigmas`` standard deviations above its expectation
        (``chi2_misfit_limit``); with ``level_std``, a worse fit is explained by a
        higher level (noisier ice), so the limit is that of the level v = m + sigmas
        sqrt(s^2 + 2 / n) (its prior's std and the spread of its estimate from n
        coefficients): n / 2 plus half ``_level_residual(v)``^2."""
        n = self.dimensions
        if not self.level_std > 0:
            return chi2_misfit_limit(n, sigmas)
        v = -0.5 * self.level_std**2 + sigmas * math.sqrt(self.level_std**2 + 2 / n)
        rest = self._level_residual(torch.tensor(v, dtype=torch.float64))
        return n / 2 + 0.5 * float(rest) ** 2

    def fit_contrast(self, images: Tensor, clean: Tensor,
                     group: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(a, std) (...,) float64: each image's least-squares contrast <y, u> / <u, u>
        in the whitened metric and its standard error 1 / |u| (no prior)."""
        spectra = self.spectra(group, clean)
        _, xm, mm = whitened_products(images, clean, spectra, self.cropped)
        return (xm / mm).double(), mm.double().rsqrt()

    # -------------------------------------------------------------------- sampling
    def draw_contrast(self, shape, generator: torch.Generator | None = None) -> Tensor:
        """float64 contrasts from the prior (truncated normal), one uniform each."""
        return truncated_normal(shape, self.contrast_mean, self.contrast_std,
                                self.contrast_floor, generator)

    def sample(self, clean: Tensor, group: Tensor | None = None,
               generator: torch.Generator | None = None, white: Tensor | None = None,
               contrast: Tensor | None = None) -> Tensor:
        """(..., L, L) images a * clean + n: a from the contrast prior (or ``contrast``
        (...)), then (with ``level_std``) each image's level lambda^2, then n of each
        image's lambda^2 T from the white N(0, 1) pixels ``white`` (..., L, L) or drawn,
        all from ``generator`` (None: the global stream) in that order.
        When ``cropped``, the Nyquist row and column of the result are 0, as in the
        data. In the dtype and device of ``clean``."""
        self._check_box(clean)
        shape = clean.shape[:-2]
        if contrast is None:
            contrast = self.draw_contrast(shape, generator)
        contrast = torch.as_tensor(contrast).to(clean.device, clean.dtype)
        spectra = self.spectra(group, clean)
        spectra = spectra.expand(*torch.broadcast_shapes(spectra.shape[:-1], shape),
                                 spectra.shape[-1])
        if self.level_std > 0:
            where = generator.device if generator is not None else None
            v = -0.5 * self.level_std**2 + self.level_std * torch.randn(
                shape, generator=generator, dtype=torch.float64, device=where)
            spectra = spectra * torch.exp(v).to(spectra)[..., None]
        noise = coloured_noise(spectra, self.box, generator, white, self.cropped,
                               clean.dtype, clean.device)
        signal = contrast[..., None, None] * clean
        if self.cropped:
            keep = coefficient_weights(self.box, False, True, clean.device, clean.dtype) > 0
            signal = torch.fft.irfft2(torch.fft.rfft2(signal) * keep, s=(self.box,) * 2)
        return signal + noise

    def _check_box(self, images: Tensor) -> None:
        if images.shape[-2:] != (self.box, self.box):
            raise ValueError(f"the noise model is for {self.box} px images, got "
                             f"{tuple(images.shape[-2:])}")
