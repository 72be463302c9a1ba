"""Projected normal distributions on spheres, exact in float32 and float64.

The projected normal PN_d(c) is the law of V = X / |X| with X ~ N(c, I_d): a
distribution on the unit sphere S^{d-1} whose direction is c / |c| and whose
concentration grows with |c| (|c| = 0 is uniform).  Unit quaternions (d = 4)
parametrise rotations, and PN_4 is the pose family of cryosvi.

Density
-------
Writing x = r v in polar coordinates (dx = r^{d-1} dr dS(v)) and t = <c, v>,
|r v - c|^2 = (r - t)^2 + (|c|^2 - t^2), so the density with respect to the
surface measure dS of S^{d-1} (total mass 2 pi^{d/2} / Gamma(d/2)) is

    p(v) = (2 pi)^{-d/2} exp(-|c_perp|^2 / 2) int_0^inf r^{d-1} exp(-(r - t)^2 / 2) dr
         = (2 pi)^{-(d-1)/2} exp(-|c_perp|^2 / 2) I_d(t),

    I_d(t) = (2 pi)^{-1/2} int_0^inf x^{d-1} exp(-(x - t)^2 / 2) dx,

with c_perp = c - t v the part of c perpendicular to v, |c_perp|^2 = |c|^2 - t^2
(Hernandez-Stumpfhauser, Breidt & van der Woerd 2017, "The general projected
normal distribution of arbitrary dimension: modeling and Bayesian inference",
Bayesian Analysis 12(1):113-133, eq. 2.2 with identity covariance).  This is
the normalisation Pyro uses, so log-probabilities agree with
``pyro.distributions.ProjectedNormal`` wherever Pyro's are accurate.

Evaluating log I_d(t)
---------------------
Integration by parts gives the three-term recurrence

    I_1 = Phi(t),  I_2 = phi(t) + t Phi(t),  I_{k+1} = t I_k + (k - 1) I_{k-1},
    d/dt I_k = (k - 1) I_{k-1}   (k >= 2),

so I_d = P_d(t) phi(t) + Q_d(t) Phi(t) with polynomials P_d, Q_d (e.g.
I_4 = (t^2 + 2) phi + (t^3 + 3 t) Phi).  For t >= 0 every term is positive; for
t << 0 the two terms cancel almost exactly (I_d ~ (d-1)! phi(t) / |t|^d), which
is why a direct evaluation loses all digits and Pyro has to clamp.

Two regimes, both free of cancellation:

* head, t >= -T (T = 2): the recurrence above in float64 (on I_k / t^{k-1} where
  I_d would overflow).  Its cancellation is worst at t = -T: a factor ~100 for
  d = 4, leaving ~1e-14 relative error.
* tail, t < -T, s = -t: I_d(t) = phi(s) J_d(s) with the all-positive integral
  J_d(s) = int_0^inf x^{d-1} exp(-x^2 / 2 - s x) dx.  J_k(s) is the minimal
  solution of J_{k+1} = -s J_k + (k - 1) J_{k-1}, so its ratios
  r_k = J_{k+1} / J_k obey the backward recurrence
  r_{k-1} = (k - 1) / (s + r_k), and J_1 = 1 / (s + r_1) is the Mills ratio
  (Laplace's continued fraction, Abramowitz & Stegun 26.2.14; Gautschi 1967,
  "Computational aspects of three-term recurrence relations", SIAM Review
  9(1):24-82, on backward recurrence for minimal solutions; J_d is a scaled
  repeated integral of erfc, A&S 7.2).  Every step adds and divides positive
  numbers and damps the error of its start (a Laplace estimate of r_N at depth
  N); N per band of s is chosen so that the truncation error is below float64
  round-off (below float32 round-off, with a much shallower recurrence run in
  float32, when the result is float32).  Then
  log I_d = -s^2/2 - log(2 pi)/2 + log(J_1 r_1 ... r_{d-1}).

The antipodal radial factor (I_d(t) + I_d(-t)) / 2 = E|N(t, 1)|^{d-1} / 2 needs
no tail at all: with B_k = I_k(t) - I_k(-t) the pair (A_k, B_k) obeys a forward
recurrence whose terms are all >= 0 when run at |t| (``_antipodal_terms``).

The derivative d/dt log I_d = (d - 1) I_{d-1} / I_d (= s + r_d in the tail), and
t + d/dt log I_d (= r_d, which the value gradient needs and which would cancel if
formed as a sum), come out of the same quantities: the backward pass is a few
multiplications (custom autograd functions; twice differentiable, the second
order through an autograd-composable form of the same expression).

Precision.  Everything runs in float64 whatever the input dtype, except the tail
recurrence for float32 results; float32 outputs are then correct to about one
ulp, float64 outputs to ~1e-14 relative (tests/test_distributions.py, against
mpmath, for 2 <= d <= 8; larger d work but lose digits in the head, whose
cancellation grows like |t|^{2(d-1)}).  The value is also renormalised in float64
before scoring: a float32 "unit" vector is off the sphere by ~1e-7, which at
|c| = 1e4 would move |c|^2 - t^2 by ~10; so the gradient in the value is tangent.

Performance.  On CPU the log density is evaluated in blocks of 65536 values that
stay in cache, shared among one Python thread per torch intra-op thread, each running
its ops serially (``_map_blocks``); the backward pass
keeps A' and t + A' and recomputes 1/|v| and c_perp block by block (a dozen ops in
cache: measured as fast as saving them, with d + 1 fewer float64 numbers kept per value).
On CUDA it is one block; the head/tail split synchronises with the host once.

Pose family
-----------
q and -q are the same rotation, so the pose posterior on S^3 is antipodally
symmetric.  :class:`AntipodalProjectedNormal`, density (p(q) + p(-q)) / 2, is
the default pose family (:func:`pose_distribution`);
:class:`ProjectedNormal` stays available.  :class:`ProjectedNormalMixture` is a
K-component mixture of either for multi-modal pose posteriors.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)

# Head/tail switch: I_d(t) from the forward recurrence for t >= -_HEAD_T, where its
# cancellation costs at most ~1e-14 (relative, d = 4; ~3e-13 for d = 8).
_HEAD_T = 2.0
# Tail bands (s_low, s_high, extra depth M): the backward recurrence starts at
# k = d + 1 + M.  M was measured against mpmath (50 digits) so that r_1 ... r_{d+1}
# are within 3e-16 (relative) for d <= 8 at the low end of each band, where the
# recurrence converges slowest (minimum M at s = 2, 4, 10: 69, 30, 13, with the
# start value of _laplace_start); tests/test_distributions.py checks the band edges.
_TAIL_BANDS = ((2.0, 4.0, 72), (4.0, 10.0, 33), (10.0, math.inf, 15))
# The same for float32 round-off (relative 2e-8): at most 13 at s = 2, for d <= 8.
_TAIL_DEPTH_SINGLE = 16

_COMPUTE_DTYPE = torch.float64


# --------------------------------------------------------------------------------------
# log I_d(t): the kernel
# --------------------------------------------------------------------------------------


def _gauss_density(t: Tensor) -> Tensor:
    """phi(t) = exp(-t^2/2) / sqrt(2 pi); the exponent is floored at -700 (phi <
    1e-304 instead of 0, negligible wherever it is added to the terms ~ t^k it
    accompanies) because exp is ~8x slower on arguments that underflow."""
    return (t * t).mul_(-0.5).sub_(0.5 * _LOG_2PI).clamp_(min=-700.0).exp_()


def _head_limit(d: int) -> float:
    """Largest t for which the unscaled recurrence stays below ~1e250 (t^{d-1})."""
    return 10.0 ** (250.0 / max(d - 1, 1))


def _head(t: Tensor, d: int, order: int, check_range: bool = True,
          out: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    """Forward recurrence for t >= -_HEAD_T; float64 tensors of shape (n,).

    Returns [log I_d, g, t + g] and, for order 2, also g' (g = (log I_d)').
    check_range=False: the caller guarantees t <= _head_limit(d).  out: buffers
    for (g, t + g).
    """
    if check_range and t.numel() and bool(t.max() > _head_limit(d)):
        return _head_scaled(t, d, order)
    phi = _gauss_density(t)
    big_phi = torch.erfc(t * -_INV_SQRT_2).mul_(0.5)  # (torch.special.ndtr is 3x slower)
    i = [phi, big_phi, torch.addcmul(phi, t, big_phi)]  # i[k] = I_k, i[0] = phi = I_1'
    for k in range(2, d):  # I_{k+1} = t I_k + (k - 1) I_{k-1}
        i.append(torch.addcmul(i[k - 1] if k == 2 else i[k - 1] * (k - 1), t, i[k]))
    # g = (log I_d)' = (d - 1) I_{d-1} / I_d; t + g loses at most a factor ~3 (t = -2).
    g = torch.div(i[d - 1], i[d], out=None if out is None else out[0]).mul_(d - 1)
    result = [torch.log(i[d]), g, torch.add(t, g, out=None if out is None else out[1])]
    if order >= 2:
        # g' = I_d'' / I_d - g^2 with I_d'' = (d-1)(d-2) I_{d-2} (d >= 3), phi (d = 2)
        second = i[0] / i[2] if d == 2 else (d - 1) * (d - 2) * i[d - 2] / i[d]
        result.append(second - g * g)
    return result


@functools.lru_cache(maxsize=None)
def _head_value_at_switch(d: int) -> float:
    """log I_d(-_HEAD_T), as computed by :func:`_head`."""
    return _head(torch.tensor([-_HEAD_T], dtype=_COMPUTE_DTYPE), d, 1)[0].item()


def _head_scaled(t: Tensor, d: int, order: int) -> list[Tensor]:
    """:func:`_head` on I_k / max(1, t)^{k-1}, for t so large that I_d would overflow."""
    m = t.clamp(min=1.0)
    u = m.reciprocal()
    tu = t * u
    u2 = u * u
    phi = _gauss_density(t)
    big_phi = torch.erfc(t * -_INV_SQRT_2).mul_(0.5)
    scaled = [None, big_phi, (phi + t * big_phi) * u]  # scaled[k] = I_k / m^{k-1}
    for k in range(2, d):
        scaled.append(tu * scaled[k] + (k - 1) * u2 * scaled[k - 1])
    i_d = scaled[d]
    g = (d - 1) * scaled[d - 1] / (m * i_d)
    out = [torch.log(i_d) + (d - 1) * torch.log(m), g, t + g]
    if order >= 2:
        if d == 2:
            second = phi / (m * i_d)
        else:
            second = (d - 1) * (d - 2) * scaled[d - 2] * u2 / i_d
        out.append(second - g * g)
    return out


def _laplace_start(w: Tensor, top: int) -> Tensor:
    """y_N = 1 + w rh_N, N = top, from Laplace's method for rh_N = s J_{N+1} / J_N.

    J_{N+1} / J_N is the mean of the density ~ x^{N-1} exp(-x^2/2 - s x) = exp(f);
    its mode is x* = (sqrt(s^2 + 4m) - s) / 2 (m = N - 1), and mean - mode is
    -f'''/(2 f''^2) = m x* / (m + x*^2)^2 to leading order.  Scaled by s and written
    without cancellation: rh* = 2m / (1 + sqrt(1 + 4 m w)), rh = rh* (1 + m / (m +
    w rh*^2)^2).  Relative error ~1e-5 at N = 50 (1e-3 for the mode alone), damped
    by every later step.
    """
    m = float(top - 1)
    rh = torch.mul(w, 4.0 * m).add_(1.0).sqrt_().add_(1.0).reciprocal_().mul_(2.0 * m)
    skew = torch.mul(rh, rh).mul_(w).add_(m).square_().reciprocal_().mul_(m).add_(1.0)
    return rh.mul_(skew).mul_(w).add_(1.0)


def _recur(y: Tensor, w: Tensor, top: int, stop: int, ones: Tensor | None = None) -> Tensor:
    """y_top -> y_stop in place: y_{k-1} = 1 + (k - 1) w / y_k (one addcdiv a step)."""
    ones = torch.ones_like(w) if ones is None else ones
    for k in range(top, stop, -1):
        torch.addcdiv(ones, w, y, value=float(k - 1), out=y)
    return y


def _y_at(s: Tensor, w: Tensor, stop: int, levels: list[tuple[float, int]]) -> Tensor:
    """y_stop for every s, each element started at the depth its band needs.

    levels: (s_high, top) by increasing s_high; the last one covers every s given.
    Elements in a lower band start deeper; they are run down to the next band's
    top on their own, then join the others (one gather and one scatter per band,
    instead of a full evaluation per band)."""
    (_, top), deeper = levels[-1], levels[:-1]
    y = _laplace_start(w, top)
    if deeper:
        sub = (s <= deeper[-1][0]).nonzero().squeeze(-1)
        if sub.numel():
            y[sub] = _y_at(s[sub], w[sub], top, deeper)
    return _recur(y, w, top, stop)


def _tail(s: Tensor, d: int, order: int, single: bool = False) -> list[Tensor]:
    """Backward recurrence for s = -t > _HEAD_T; float64 tensors of shape (n,).

    With w = 1 / s^2 and the scaled ratios rh_k = s r_k = s J_{k+1} / J_k (which tend
    to k as s grows), y_k = 1 + w rh_k obeys

        y_{k-1} = 1 + (k - 1) w / y_k,    rh_{k-1} = (k - 1) / y_k,

    one fused addcdiv per step; each step is a contraction and every term is
    positive, so y keeps a relative error of ~1 ulp.  From s J_1 = 1 / y_1,
    s^d J_d = (s J_1) rh_1 ... rh_{d-1} = (d - 1)! / (y_1 ... y_d).

    single: run the recurrence in float32 (for float32 results; the truncation
    depth then only has to reach float32 round-off, _TAIL_DEPTH_SINGLE steps for
    every s, and the y's carry ~1e-7 relative error, i.e. ~1 float32 ulp in the
    final log density).  The assembly (s^2 / 2, logs) stays in float64.
    Returns the same list as :func:`_head`.
    """
    s2 = s * s
    extra = d + 1 + 3 * max(0, d - 8)
    stop = d + 2 if order >= 2 else d + 1
    if single:
        s_r = s.to(torch.float32)
        w = (s_r * s_r).reciprocal_()  # 0 where s^2 overflows float32: then y = 1
        levels = [(math.inf, _TAIL_DEPTH_SINGLE + extra)]
    else:
        s_r, w = s, s2.reciprocal()
        levels = [(hi, depth + extra) for _, hi, depth in _TAIL_BANDS]
    y = _y_at(s_r, w, stop, levels)  # y_stop
    ones = torch.ones_like(w)
    kept = {stop: y.clone()}
    if order >= 2:
        y = _recur(y, w, d + 2, d + 1, ones)
        kept[d + 1] = y.clone()
    y = _recur(y, w, d + 1, d, ones)
    prod = y.clone()
    for k in range(d, 1, -1):  # y holds y_k; replace it by y_{k-1}
        y = _recur(y, w, k, k - 1, ones)
        prod = prod.mul_(y)  # y_1 ... y_d after the last step
    y_next = kept[d + 1].to(s.dtype)
    # log I_d = log phi(s) + log J_d(s) = -s^2/2 - log(2 pi)/2 + log((d-1)!) - log(prod) - d log s
    # (prod is O(1): its log in the recurrence's precision costs nothing in accuracy)
    value = torch.log(prod).to(s.dtype).neg_().sub_(torch.log(s), alpha=float(d))
    value = value.sub_(s2, alpha=0.5)
    value = value.add_(math.lgamma(d) - 0.5 * _LOG_2PI)
    # d/dt = -d/ds and d/ds log J_d = -J_{d+1} / J_d = -r_d, so g = s + r_d, and
    # t + g = r_d = rh_d / s = d / (s y_{d+1}) exactly, with no cancellation.
    t_plus_g = torch.mul(s, y_next).reciprocal_().mul_(float(d))
    out = [value, s + t_plus_g, t_plus_g]
    if order >= 2:
        # g' = -1 - r_d'(s) = -1 + r_d (r_{d+1} - r_d)
        w = w.to(s.dtype)
        rh_d = d / y_next
        rh_next = (d + 1) / kept[d + 2].to(s.dtype)
        out.append(-1.0 + w * rh_d * (rh_next - rh_d))
    return out


def _log_normaliser_terms(t: Tensor, d: int, order: int = 1) -> list[Tensor]:
    """[log I_d(t), g, t + g] (and g' for order 2), g = d/dt log I_d, elementwise.

    t: any shape, float64.  Returns float64 tensors of t's shape.  The head formula
    runs on every element (clamped to t >= -_HEAD_T, so it is harmless where it is
    not used, and NaN propagates); tail elements are then overwritten.
    """
    if d < 2:
        raise ValueError(f"dimension must be >= 2, got {d}")
    flat = t.reshape(-1)
    outs = _head(flat.clamp(min=-_HEAD_T), d, order)
    tail_idx = (flat < -_HEAD_T).nonzero().squeeze(-1)
    if tail_idx.numel():
        for o, v in zip(outs, _tail(-flat[tail_idx], d, order)):
            o[tail_idx] = v
    return [o.reshape(t.shape) for o in outs]


def _antipodal_terms(t: Tensor, d: int, order: int = 1) -> list[Tensor]:
    """[log(A_d(t) / 2), g, t + g] (and g' for order 2) with A_d(t) = I_d(t) + I_d(-t).

    A_d(t) = int_R |x|^{d-1} phi(x - t) dx = E|N(t, 1)|^{d-1}, an absolute moment
    of the normal distribution (Winkelbauer 2012, "Moments and absolute moments of
    the normal distribution", arXiv:1209.4340).  With B_k(t) = I_k(t) - I_k(-t),
    the recurrence for I_k gives the coupled pair

        A_1 = 1, B_1 = erf(t / sqrt 2), A_2 = 2 phi + t erf(t / sqrt 2), B_2 = t,
        A_{k+1} = t B_k + (k - 1) A_{k-1},   B_{k+1} = t A_k + (k - 1) B_{k-1},
        A_k' = (k - 1) B_{k-1},               B_k' = (k - 1) A_{k-1}  (k >= 2),

    e.g. A_3 = 1 + t^2, A_4 = 2 (t^2 + 2) phi + (t^3 + 3 t) erf(t / sqrt 2).  A is
    even and B odd, and for t >= 0 every term is >= 0: evaluated at |t| there is no
    cancellation anywhere and no tail regime is needed.  float64, t any shape.
    """
    if d < 2:
        raise ValueError(f"dimension must be >= 2, got {d}")
    x = t.abs()
    sign = torch.sign(t)
    scaled = x.numel() > 0 and bool(x.max() > _head_limit(d))
    # A_k, B_k divided by m^{k-1}, m = max(1, |t|), only where A_d could overflow
    m = x.clamp(min=1.0) if scaled else None
    u = m.reciprocal() if scaled else None
    xu = x * u if scaled else x
    u2 = u * u if scaled else None
    phi = _gauss_density(x)
    erf = torch.erf(x * _INV_SQRT_2)
    a = [None, torch.ones_like(x), torch.addcmul(2.0 * phi, x, erf)]
    b = [None, erf, xu]
    if scaled:
        a[2] = a[2] * u
    for k in range(2, d):
        lower_a = a[k - 1] if k == 2 else a[k - 1] * (k - 1)
        lower_b = b[k - 1] if k == 2 else b[k - 1] * (k - 1)
        if scaled:
            lower_a, lower_b = lower_a * u2, lower_b * u2
        a.append(torch.addcmul(lower_a, xu, b[k]))
        b.append(torch.addcmul(lower_b, xu, a[k]))
    value = torch.log(a[d]).sub_(_LOG_2)
    g_abs = torch.div(b[d - 1], a[d]).mul_(d - 1)  # (log A_d)' at |t|, >= 0
    if scaled:
        value = value.add_(torch.log(m), alpha=float(d - 1))
        g_abs = g_abs.mul_(u)
    out = [value, sign * g_abs, sign * (x + g_abs)]
    if order >= 2:
        # (log A_d)'' = A_d'' / A_d - g^2, A_d'' = (d-1)(d-2) A_{d-2} (d >= 3), 2 phi (d = 2)
        if d == 2:
            second = 2.0 * phi / (a[d] * m if scaled else a[d])
        else:
            second = (d - 1) * (d - 2) * a[d - 2] / a[d]
            if scaled:
                second = second * u2
        out.append(second - g_abs * g_abs)
    return out


def _terms(t: Tensor, d: int, antipodal: bool, order: int = 1) -> list[Tensor]:
    """Dispatch to the plain or the antipodal radial factor (same return list)."""
    return (_antipodal_terms if antipodal else _log_normaliser_terms)(t, d, order)


class _LogNormaliser(torch.autograd.Function):
    """log I_d(t) (or log((I_d(t) + I_d(-t)) / 2)) with a closed-form derivative."""

    @staticmethod
    def forward(ctx, t: Tensor, d: int, antipodal: bool) -> Tensor:
        value, grad, _ = _terms(t, d, antipodal)
        ctx.save_for_backward(t, grad)
        ctx.d, ctx.antipodal = d, antipodal
        return value

    @staticmethod
    def backward(ctx, upstream: Tensor):
        t, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: keep the derivative differentiable
            grad = _LogNormaliserGrad.apply(t, grad, ctx.d, ctx.antipodal)
        return upstream * grad, None, None


class _LogNormaliserGrad(torch.autograd.Function):
    """The derivative g(t) (precomputed) with its own derivative g'(t)."""

    @staticmethod
    def forward(ctx, t: Tensor, grad: Tensor, d: int, antipodal: bool) -> Tensor:
        ctx.save_for_backward(t)
        ctx.d, ctx.antipodal = d, antipodal
        return grad.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream: Tensor):
        (t,) = ctx.saved_tensors
        second = _terms(t, ctx.d, ctx.antipodal, order=2)[3]
        return upstream * second, None, None, None


def log_projected_normal_normaliser(t: Tensor, dim: int, antipodal: bool = False) -> Tensor:
    """log I_d(t), I_d(t) = (2 pi)^{-1/2} int_0^inf x^{d-1} exp(-(x - t)^2 / 2) dx.

    t: tensor of any shape (dimensionless, t = <concentration, value>), any float
    dtype; dim: d >= 2, the ambient dimension (S^{d-1} lives in R^d).
    antipodal: return log((I_d(t) + I_d(-t)) / 2) instead, the radial factor of
    the antipodally symmetric density.
    Returns a tensor of t's shape and dtype, computed in float64 without
    cancellation for every finite t (module docstring), differentiable twice in t
    (d/dt log I_d = (d - 1) I_{d-1} / I_d).  -inf only where the true value is
    below the dtype's range (t < -1.3e154 in float64, t < -2.6e19 in float32).
    """
    dtype = t.dtype
    return _LogNormaliser.apply(t.to(_COMPUTE_DTYPE), int(dim), bool(antipodal)).to(dtype)
