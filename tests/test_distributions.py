"""Exact projected normal distributions (cryosvi.distributions).

Every reference is independent of the implementation:

* the radial integral I_d(t) = (2 pi)^{-1/2} int_0^inf x^{d-1} exp(-(x - t)^2 / 2) dx in
  its closed form P_d(t) phi(t) + Q_d(t) Phi(t), evaluated by mpmath with 50 digits
  plus the digits that form cancels for t << 0 (itself checked against the
  parabolic cylinder function and against quadrature);
* derivatives by mpmath's numerical differentiation at that precision, and float64
  finite differences (torch.autograd.gradcheck);
* normalisation by quadrature over the polar angle and by Monte Carlo with uniform
  samples; sampling against moments of the density; an SVI fit.
"""

from __future__ import annotations

import functools
import math

import mpmath as mp
import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.reparam import ProjectedNormalReparam

from cryosvi.distributions import (AntipodalProjectedNormal, ProjectedNormal,
                                   ProjectedNormalMixture, log_projected_normal_normaliser,
                                   pose_distribution, projected_normal_log_density)
from cryosvi.distributions import normaliser, projected_normal
from cryosvi.distributions.projected_normal import _log_density_autograd

DIMS = (2, 3, 4)
ALL_DIMS = (2, 3, 4, 5, 6, 8)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAMILIES = {"plain": ProjectedNormal, "antipodal": AntipodalProjectedNormal}
F32, F64 = torch.float32, torch.float64
# Accuracy required (relative to max(1, |exact|)) ...
SPEC_TOL = {F32: 1e-5, F64: 1e-10}
# ... and what the implementation achieves, with a safety factor of a few, so that a
# loss of digits is noticed long before the specification is violated.  float32 is
# the rounding of a float64 computation (half an ulp, 6e-8; the float32 tail
# recurrence adds < 1e-7); in float64 the closed form near t = -2, where it hands
# over to the recurrence, costs a few ulp times a cancellation that grows with d.
GUARD_TOL = {F32: 2e-7, F64: 5e-14}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machine is shared: with several intra-op threads and busy cores every
    # parallel region can stall on a descheduled thread (Pyro's SVI steps, the large
    # torch evaluations).  One thread keeps this file fast and its timing
    # reproducible; results are identical (test_threads_restored_and_results_identical).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def guard_tol(dtype, d, kind="value"):
    if dtype == F32:
        return 2e-7
    return {"value": 1e-14, "grad": 1e-13, "second": 1e-12}[kind] * 3.0 ** (d - 2)


# --------------------------------------------------------------------------------------
# mpmath references
# --------------------------------------------------------------------------------------


def _extra_digits(t, d):
    """Digits that the closed form cancels (t << 0: ~2 (d-1) log10|t|; the antipodal
    differences I(t) - I(-t) at t ~ 0: ~log10(1/|t|)), plus a margin."""
    a = abs(float(t))
    return int(2 * d * math.log10(max(a, 1.0)) + max(0.0, -math.log10(a)) + 20) if a else 20


def _closed_form(t, d):
    """[phi(t), I_1(t), ..., I_{d+1}(t)] in the current (raised) precision."""
    phi, big_phi = mp.npdf(t), mp.ncdf(t)
    out = [phi, big_phi, phi + t * big_phi]
    for k in range(2, d + 1):
        out.append(t * out[k] + (k - 1) * out[k - 1])
    return out


@functools.lru_cache(maxsize=None)
def _closed_form_at(t, d):
    """_closed_form at a float t (cached: the grid is shared by many tests)."""
    with mp.workdps(50 + _extra_digits(t, d)):
        return _closed_form(mp.mpf(t), d)


def mp_radial(t, d, antipodal=False):
    """(log R, R'/R, (log R)'') with R = I_d(t) or (I_d(t) + I_d(-t)) / 2; t a float
    or an mpf (for mp.diff), evaluated at the current precision + cancelled digits.

    Uses the identities I_k' = (k - 1) I_{k-1}, I_2' = I_1, I_1' = phi, which
    test_reference_derivative_identities checks by numerical differentiation.
    """
    with mp.extradps(_extra_digits(t, d)):
        if isinstance(t, float):
            ip, im = _closed_form_at(t, d), _closed_form_at(-t, d)
        else:
            ip, im = _closed_form(t, d), _closed_form(-t, d)
        if not antipodal:
            r, dr = ip[d], (d - 1) * ip[d - 1]
            d2r = (d - 1) * (d - 2) * ip[d - 2] if d >= 3 else ip[0]
            log_r = mp.log(r)
        else:
            a = [x + y for x, y in zip(ip, im)]
            b = [x - y for x, y in zip(ip, im)]
            r, dr = a[d], (d - 1) * b[d - 1]
            d2r = (d - 1) * (d - 2) * a[d - 2] if d >= 3 else 2 * ip[0]
            log_r = mp.log(r / 2)
        g = dr / r
        return +log_r, +g, +(d2r / r - g * g)


def mp_log_density(c, v, antipodal=False):
    """log p(v) of PN(c) (or its antipodal symmetrisation) from mpf lists; v is
    renormalised, as the implementation does."""
    d = len(c)
    norm = mp.sqrt(mp.fsum(x * x for x in v))
    v = [x / norm for x in v]
    t = mp.fsum(a * b for a, b in zip(c, v))
    perp2 = mp.fsum((a - t * b) ** 2 for a, b in zip(c, v))
    return -perp2 / 2 - (d - 1) * mp.log(2 * mp.pi) / 2 + mp_radial(t, d, antipodal)[0]


def t_grid():
    """float32-representable t: dense on [-50, 50], geometric out to +-1e3, and both
    sides of the implementation's regime switches (t = -2, -4, -10) and a few more."""
    dense = np.arange(-50.0, 50.0 + 1e-9, 0.1)
    far = np.geomspace(50.0, 1e3, 40)
    edges = np.array([2.0, 3.0, 4.0, 6.0, 10.0, 20.0])
    special = np.concatenate([-edges, -edges * (1 + 1e-6), -edges * (1 - 1e-6),
                              [0.0, 1e-30, -1e-30, 1e-3, -1e-3]])
    t = np.concatenate([dense, far, -far, special]).astype(np.float32).astype(np.float64)
    return np.unique(t)


@functools.lru_cache(maxsize=None)
def radial_table(d, antipodal):
    """(t, log R, g, g') on t_grid() as float64 arrays (rounded from 50+ digits)."""
    t = t_grid()
    rows = np.empty((t.size, 3))
    with mp.workdps(50):
        for i, ti in enumerate(t):
            rows[i] = [float(x) for x in mp_radial(float(ti), d, antipodal)]
    return t, rows[:, 0], rows[:, 1], rows[:, 2]


def rel_err(x, ref):
    """max |x - ref| / max(1, |ref|)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.max(np.abs(x - ref) / np.maximum(1.0, np.abs(ref))))


# --------------------------------------------------------------------------------------
# The references themselves
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", ALL_DIMS)
def test_reference_matches_parabolic_cylinder_and_quadrature(d):
    # int_0^inf x^{d-1} exp(-x^2/2 - z x) dx = Gamma(d) exp(z^2/4) D_{-d}(z) (DLMF 12.5.1),
    # so I_d(t) = phi(t) Gamma(d) exp(t^2/4) D_{-d}(-t): an independent special function.
    with mp.workdps(50):
        for t in ["-1000", "-37.5", "-4.5", "-0.5", "0", "0.5", "4.5", "37.5", "1000"]:
            t = mp.mpf(t)
            with mp.extradps(20):
                ref = (mp.log(mp.npdf(t)) + mp.log(mp.gamma(d)) + t * t / 4
                       + mp.log(mp.pcfd(-d, -t)))
            assert abs(mp_radial(t, d)[0] - ref) < mp.mpf(10) ** -40 * max(1, abs(ref))
        for t in ["-3", "0", "2"]:  # plain quadrature where it is accurate
            t = mp.mpf(t)
            quad = mp.quad(lambda x: x ** (d - 1) * mp.npdf(x - t), [0, 5, 20, mp.inf])
            assert abs(mp_radial(t, d)[0] - mp.log(quad)) < mp.mpf(10) ** -30


@pytest.mark.parametrize("antipodal", [False, True])
@pytest.mark.parametrize("d", DIMS)
def test_reference_derivative_identities(d, antipodal):
    with mp.workdps(50):
        for t in ["-30", "-2.5", "0", "0.75", "12"]:
            t = mp.mpf(t)
            log_r, g, h = mp_radial(t, d, antipodal)
            assert abs(mp.diff(lambda x: mp_radial(x, d, antipodal)[0], t) - g) < 1e-30
            assert abs(mp.diff(lambda x: mp_radial(x, d, antipodal)[0], t, 2) - h) < 1e-25


# --------------------------------------------------------------------------------------
# log I_d(t): values and derivatives against mpmath
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("antipodal", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("d", ALL_DIMS)
def test_log_normaliser_matches_mpmath(d, dtype, antipodal, device):
    t, ref, _, _ = radial_table(d, antipodal)
    out = log_projected_normal_normaliser(torch.tensor(t, dtype=dtype, device=device), d,
                                          antipodal=antipodal)
    assert out.dtype == dtype and out.shape == (t.size,)
    err = rel_err(out.cpu(), ref)
    assert err < SPEC_TOL[dtype]
    assert err < guard_tol(dtype, d), err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("antipodal", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("d", ALL_DIMS)
def test_log_normaliser_derivatives_match_mpmath(d, dtype, antipodal, device):
    t, _, ref_g, ref_h = radial_table(d, antipodal)
    x = torch.tensor(t, dtype=dtype, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(log_projected_normal_normaliser(x, d, antipodal).sum(), x,
                               create_graph=True)
    assert torch.isfinite(g).all()
    assert rel_err(g.detach().cpu(), ref_g) < guard_tol(dtype, d, "grad")
    (h,) = torch.autograd.grad(g.sum(), x)  # second derivative, via double backward
    assert torch.isfinite(h).all()
    assert rel_err(h.cpu(), ref_h) < guard_tol(dtype, d, "second")


@pytest.mark.parametrize("d", ALL_DIMS)
def test_tail_recurrence_against_mpmath(d):
    # The backward recurrence on its own (a private function), just above each band
    # edge where it converges slowest, inside the bands and far out, in both
    # precisions: float64 to a few ulp, the float32 variant (used for float32
    # results) to float32 round-off.  Tight enough to notice a recurrence started
    # too shallow, which the head's own round-off near t = -2 would mask above.
    s = [2 * (1 + 1e-9), 2.5, 3.9, 4 * (1 + 1e-9), 7.0, 10 * (1 + 1e-9), 30.0, 1e3, 1e8]
    with mp.workdps(50):
        ref = []
        for si in s:
            log_r, g, _ = mp_radial(-si, d)
            ref.append([float(log_r), float(g), float(g - si)])  # t + g, in 50 digits
    ref = np.array(ref)
    for single, tol in [(False, 1.5e-15), (True, 2e-7)]:
        out = normaliser._tail(torch.tensor(s, dtype=F64), d, 1, single=single)
        for j, o in enumerate(out):
            err = np.abs(o.numpy() - ref[:, j]) / np.maximum(1.0 if j == 0 else 0.0,
                                                             np.abs(ref[:, j]))
            assert err.max() < tol, (single, j, err.max())


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("family", ["plain", "antipodal"])
@pytest.mark.parametrize("d", DIMS)
def test_log_prob_along_the_mode_axis(d, family, dtype):
    # c = t e_1 and v = e_1 leave no perpendicular part: log p = log R(t) - (d-1)/2
    # log(2 pi) and d log p / dc_1 = (log R)'(t), for every t of the mpmath grid.
    # This drives the blocked log_prob (and its float32 tail) through all regimes.
    antipodal = family == "antipodal"
    t, ref, ref_g, _ = radial_table(d, antipodal)
    c = torch.zeros(t.size, d, dtype=dtype)
    c[:, 0] = torch.tensor(t, dtype=dtype)
    c.requires_grad_()
    v = torch.zeros(d, dtype=dtype)
    v[0] = 1.0
    lp = FAMILIES[family](c).log_prob(v)
    (grad,) = torch.autograd.grad(lp.sum(), c)
    exact = ref - 0.5 * (d - 1) * math.log(2 * math.pi)
    assert rel_err(lp.detach(), exact) < GUARD_TOL[dtype]
    assert rel_err(grad[:, 0], ref_g) < guard_tol(dtype, d, "grad")
    assert torch.all(grad[:, 1:] == 0)


@pytest.mark.parametrize("antipodal", [False, True])
@pytest.mark.parametrize("d", DIMS)
def test_log_normaliser_extremes(d, antipodal):
    # Far beyond the mpmath grid: the asymptotics log I_d(t) ~ (d-1) log t (t -> inf)
    # and ~ -t^2/2 - log(2 pi)/2 + log((d-1)!) - d log|t| (t -> -inf) hold to ~d^2/t^2.
    big = torch.tensor([1e6, 1e12, 1e18], dtype=F64)
    for dtype in (F32, F64):
        pos = log_projected_normal_normaliser(big.to(dtype), d, antipodal).double()
        neg = log_projected_normal_normaliser(-big.to(dtype), d, antipodal).double()
        tb = big.to(dtype).double()
        up = (d - 1) * torch.log(tb) - (math.log(2) if antipodal else 0.0)
        down = (-0.5 * tb ** 2 - 0.5 * math.log(2 * math.pi) + math.lgamma(d)
                - d * torch.log(tb))
        torch.testing.assert_close(pos, up, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(neg, up if antipodal else down, rtol=1e-7, atol=1e-9)
    # Out of range only where the exact value is: float32 holds -t^2/2 up to |t| ~ 2.6e19.
    out = log_projected_normal_normaliser(torch.tensor([-1e19, -1e20, math.nan]), d)
    assert math.isfinite(out[0]) and out[1] == -math.inf and math.isnan(out[2])
    x = torch.tensor([-1e30, -1e4, 0.0, 1e4, 1e30], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(log_projected_normal_normaliser(x, d, antipodal).sum(), x)
    assert torch.isfinite(g).all()


# --------------------------------------------------------------------------------------
# log_prob against mpmath: values and gradients
# --------------------------------------------------------------------------------------


def _configurations(d, dtype, seed=0):
    """(concentration, value) pairs (n, d) covering |c| from 0 to 1e4 and values near
    the mode, at the antipode, on the equator (t ~ 0) and uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    cs, vs = [], []
    for kappa in [0.0, 0.3, 3.0, 30.0, 300.0, 1e3, 1e4]:
        mu = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=F64), dim=0)
        w = torch.randn(4, d, generator=g, dtype=F64)
        ortho = w[0] - (w[0] @ mu) * mu
        values = [mu + 0.3 * w[1] / max(kappa, 1.0), -mu + 0.3 * w[2] / max(kappa, 1.0),
                  ortho, w[3], -mu]
        for v in values:
            cs.append(kappa * mu)
            vs.append(torch.nn.functional.normalize(v, dim=0))
    return torch.stack(cs).to(dtype), torch.stack(vs).to(dtype)


def _mp_vector(x):
    return [mp.mpf(float(a)) for a in x]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["plain", "antipodal"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("d", DIMS)
def test_log_prob_matches_mpmath(d, dtype, family, device):
    c, v = _configurations(d, dtype)
    out = FAMILIES[family](c.to(device)).log_prob(v.to(device))
    assert out.dtype == dtype and out.shape == c.shape[:-1]
    with mp.workdps(50):
        ref = np.array([float(mp_log_density(_mp_vector(ci), _mp_vector(vi),
                                             family == "antipodal")) for ci, vi in zip(c, v)])
    err = rel_err(out.cpu(), ref)
    assert err < SPEC_TOL[dtype]
    assert err < GUARD_TOL[dtype], err


@pytest.mark.parametrize("family", ["plain", "antipodal"])
@pytest.mark.parametrize("d", DIMS)
def test_log_prob_gradients_match_mpmath(d, family):
    antipodal = family == "antipodal"
    c64, v64 = _configurations(d, F64, seed=1)
    for dtype in (F64, F32):
        c = c64.to(dtype).clone().requires_grad_()
        v = v64.to(dtype).clone().requires_grad_()
        gc, gv = torch.autograd.grad(FAMILIES[family](c).log_prob(v).sum(), (c, v))
        assert gc.dtype == gv.dtype == dtype
        assert torch.isfinite(gc).all() and torch.isfinite(gv).all()
        for i in range(c.shape[0]):
            ci, vi = _mp_vector(c[i].detach()), _mp_vector(v[i].detach())
            with mp.workdps(50):
                ref = []
                for j, x in enumerate(ci + vi):  # mpmath numerical partial derivatives
                    def f(y, j=j):
                        args = ci + vi
                        args[j] = y
                        return mp_log_density(args[:d], args[d:], antipodal)
                    ref.append(float(mp.diff(f, x)))
            ours = torch.cat([gc[i], gv[i]]).double().numpy()
            err = float(np.max(np.abs(ours - np.array(ref))))
            # Relative to max(1, |grad|), plus the conditioning of the inputs: the
            # Hessian in v is ~|c|^2, so one float64 ulp of v moves the gradient by
            # ~eps |c|^2 (backward stability; it matters only at |c| = 1e4, v = -c/|c|).
            allowed = ({F32: 1e-6, F64: 1e-10}[dtype] * max(1.0, float(np.max(np.abs(ref))))
                       + 10 * torch.finfo(F64).eps * float(c64[i].norm()) ** 2)
            assert err < allowed, (dtype, i, err, allowed)


@pytest.mark.parametrize("family", ["plain", "antipodal"])
@pytest.mark.parametrize("d", [2, 4])
def test_gradcheck_first_and_second_order(d, family):
    # float64 finite differences, including |c| where t crosses the regime switches.
    antipodal = family == "antipodal"
    g = torch.Generator().manual_seed(d)
    for kappa in [0.0, 3.0, 25.0]:
        c = (kappa * torch.randn(2, d, generator=g, dtype=F64)).requires_grad_()
        v = torch.nn.functional.normalize(torch.randn(3, 2, d, generator=g, dtype=F64),
                                          dim=-1).requires_grad_()
        fn = functools.partial(projected_normal_log_density, antipodal=antipodal)
        assert torch.autograd.gradcheck(fn, (c, v))
        assert torch.autograd.gradgradcheck(fn, (c, v))


@pytest.mark.parametrize("family", ["plain", "antipodal"])
def test_gradients_through_broadcast_and_expanded_concentrations(family, monkeypatch):
    # The same numbers reached three ways: a (d,) concentration broadcast against the
    # values, an expanded (n, d) view of it (stride 0, as Pyro's plates make), and an
    # explicit copy; with a non-uniform upstream gradient, over several CPU blocks.
    monkeypatch.setattr(projected_normal, "_CPU_BLOCK", 1000)
    cls = FAMILIES[family]
    g = torch.Generator().manual_seed(7)
    c0 = (6 * torch.randn(4, generator=g, dtype=F64)).requires_grad_()
    v = torch.nn.functional.normalize(torch.randn(2, 5000, 4, generator=g, dtype=F64),
                                      dim=-1)
    weights = torch.rand(2, 5000, generator=g, dtype=F64)
    grads = []
    for c in (c0, c0.expand(2, 5000, 4), c0.expand(2, 5000, 4).clone()):
        (grad,) = torch.autograd.grad((cls(c).log_prob(v) * weights).sum(), c0)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-12, atol=1e-9)
    # and the same as the composite (autograd-through-elementary-ops) expression
    ref = torch.autograd.grad(
        (_log_density_autograd(c0, v, family == "antipodal") * weights).sum(), c0)[0]
    torch.testing.assert_close(grads[0], ref, rtol=1e-10, atol=1e-8)


def test_threads_restored_and_results_identical():
    # Large CPU batches are evaluated block by block on the calling thread
    # (_serial_on_cpu): the thread setting must come back, the numbers not change.
    g = torch.Generator().manual_seed(9)
    c = (5 * torch.randn(50_000, 4, generator=g)).requires_grad_()
    v = torch.nn.functional.normalize(torch.randn(50_000, 4, generator=g), dim=-1)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            lp = ProjectedNormal(c).log_prob(v)
            (grad,) = torch.autograd.grad(lp.sum(), c)
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(1)
        results.append((lp, grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("family", ["plain", "antipodal", "mixture"])
def test_no_nan_up_to_concentration_1e4_float32(family):
    d = 4
    g = torch.Generator().manual_seed(3)
    mu = torch.nn.functional.normalize(torch.randn(6, d, generator=g), dim=-1)
    for kappa in [1e2, 1e3, 1e4]:
        c = (kappa * mu).requires_grad_()
        noise = torch.randn(6, d, generator=g) * 1e-3
        for v in [-mu, torch.nn.functional.normalize(-mu + noise, dim=-1), mu,
                  torch.nn.functional.normalize(torch.randn(6, d, generator=g), dim=-1)]:
            v = v.clone().requires_grad_()
            if family == "mixture":
                logits = torch.zeros(6, 2, requires_grad=True)
                dist = ProjectedNormalMixture(logits, torch.stack([c, -0.5 * c], dim=-2))
                params = (c, v, logits)
            else:
                dist = FAMILIES[family](c)
                params = (c, v)
            lp = dist.log_prob(v)
            grads = torch.autograd.grad(lp.sum(), params)
            assert torch.isfinite(lp).all()
            assert all(torch.isfinite(x).all() for x in grads)
            if family == "plain" and v is not mu:
                with mp.workdps(50):
                    ref = [float(mp_log_density(_mp_vector(ci), _mp_vector(vi)))
                           for ci, vi in zip(c.detach(), v.detach())]
                assert rel_err(lp.detach(), np.array(ref)) < SPEC_TOL[F32]


def test_far_tail_values_and_pyro_clamp():
    # At t = <c, v> = -8 and -20 with v = -c/|c| (no perpendicular part),
    # d = 4, float32, Pyro 1.9.2 returns the clamp value -18.70 for both.  The exact
    # values (mpmath; the parabolic-cylinder check above) are -42.3463 and -213.8916
    # (-214.04 has been quoted for the latter, which mpmath does not reproduce).
    mu = torch.tensor([0.5, 0.5, 0.5, 0.5])
    for kappa, exact in [(8.0, -42.3463), (20.0, -213.8916)]:
        c = (kappa * mu).requires_grad_()
        ours = ProjectedNormal(c).log_prob(-mu)
        with mp.workdps(50):
            ref = float(mp_log_density(_mp_vector(kappa * mu), _mp_vector(-mu)))
        assert abs(ours.item() - ref) < 1e-6 * abs(ref) and round(ref, 4) == exact
        # d log p / dc = g v - c_perp = g v here, |g| ~ |t| + d/|t|: not zero
        (grad,) = torch.autograd.grad(ours, c)
        assert grad.norm() > kappa
        print(f"t = {-kappa:g}: ours {ours.item():.4f}, mpmath {ref:.4f}, "
              f"pyro {pdist.ProjectedNormal(kappa * mu).log_prob(-mu).item():.4f}")


@pytest.mark.parametrize("d", DIMS)
def test_agrees_with_pyro_where_pyro_is_accurate(d):
    # Same normalisation as Pyro (a separately written formula) where Pyro's direct
    # formula does not cancel (t >= 0, float64).
    g = torch.Generator().manual_seed(5)
    c = 5 * torch.randn(200, d, generator=g, dtype=F64)
    v = torch.nn.functional.normalize(torch.randn(200, d, generator=g, dtype=F64), dim=-1)
    v = torch.where(((c * v).sum(-1) >= 0)[:, None], v, -v)
    torch.testing.assert_close(ProjectedNormal(c).log_prob(v),
                               pdist.ProjectedNormal(c).log_prob(v), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------


def _sphere_area(d):
    return 2 * math.pi ** (d / 2) / math.gamma(d / 2)


@functools.lru_cache(maxsize=None)
def _gauss_legendre(nodes):
    return np.polynomial.legendre.leggauss(nodes)


def _polar_integral(fn, d, kappa, nodes=400):
    """int over S^{d-1} of fn(cos a), a the angle to e_1 (fn: (n,) -> (n,) float64):
    area(S^{d-2}) int_0^pi fn(cos a) sin^{d-2} a da by Gauss-Legendre on [0, a0] and
    [a0, pi], a0 ~ 40 widths of a peak of concentration kappa at a = 0."""
    x, w = _gauss_legendre(nodes)
    total = 0.0
    a0 = min(math.pi, 40.0 / max(kappa, 1e-9))
    for lo, hi in [(0.0, a0), (a0, math.pi)]:
        if hi <= lo:
            continue
        a = torch.tensor(0.5 * (hi - lo) * x + 0.5 * (hi + lo), dtype=F64)
        f = fn(torch.cos(a)) * torch.sin(a) ** (d - 2)
        total += 0.5 * (hi - lo) * float((f * torch.tensor(w)).sum())
    return total * (_sphere_area(d - 1) if d > 2 else 2.0)


def _density_of_cos(dist, d):
    """cos -> p(v) at v = (cos, sin, 0, ...), float64."""
    def fn(cos):
        v = torch.zeros(cos.shape + (d,), dtype=F64)
        v[:, 0], v[:, 1] = cos, torch.sqrt(torch.clamp(1 - cos ** 2, min=0.0))
        return dist.log_prob(v).exp()
    return fn


@pytest.mark.parametrize("family", ["plain", "antipodal"])
@pytest.mark.parametrize("d", DIMS)
def test_normalisation_by_quadrature(d, family):
    for kappa in [0.0, 0.5, 5.0, 50.0, 1000.0]:
        c = torch.zeros(d, dtype=F64)
        c[0] = kappa
        total = _polar_integral(_density_of_cos(FAMILIES[family](c), d), d, kappa)
        assert abs(total - 1.0) < 1e-10, kappa


@pytest.mark.parametrize("d, family", [(d, f) for d in DIMS for f in ("plain", "antipodal")]
                         + [(4, "mixture")])
def test_normalisation_by_monte_carlo(d, family):
    # E_uniform[p(V)] * area(S^{d-1}) = 1.  The standard error is required to be small
    # enough (< 1 %) that a wrong constant (a factor 2 or 2 pi) cannot pass.
    torch.manual_seed(d)
    n = 200_000
    u = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)  # float32, as in use
    for kappa in [0.0, 1.0, 2.5]:
        c = kappa * torch.nn.functional.normalize(torch.randn(d), dim=0)
        if family == "mixture":
            dist = ProjectedNormalMixture(torch.tensor([0.3, -0.2]), torch.stack([c, -0.7 * c]))
        else:
            dist = FAMILIES[family](c)
        p = dist.log_prob(u).double().exp() * _sphere_area(d)
        est, se = p.mean().item(), (p.std() / math.sqrt(n)).item()
        print(f"d={d} {family} kappa={kappa}: {est:.5f} +- {se:.5f}")
        assert se < 0.01
        # (+ float32 rounding of log p, which is all there is at kappa = 0)
        assert abs(est - 1.0) < 5 * se + 1e-6, (kappa, est, se)


def test_figure_s1_uniform_samples():
    # The paper's Figure S1: 1e6 uniform unit quaternions scored in float32 at
    # concentrations 3.8 ... 1000.  Every value must be finite, and exact: checked
    # against mpmath on the 5 lowest values and 20 random ones per setting.
    torch.manual_seed(0)
    d = 4
    u = torch.nn.functional.normalize(torch.randn(1_000_000, d), dim=-1)
    mu = torch.tensor([1.0, 0.0, 0.0, 0.0])
    for kappa, families in [(3.8, FAMILIES), (10.0, ["plain"]), (100.0, ["plain"]),
                            (1000.0, FAMILIES)]:
        for family in families:
            cls = FAMILIES[family]
            lp = cls(kappa * mu).log_prob(u)
            assert lp.dtype == F32 and torch.isfinite(lp).all()
            if family == "plain":  # no clamping: the far side reaches ~ -kappa^2 / 2
                assert lp.min() < -0.45 * kappa ** 2
            idx = torch.cat([torch.topk(-lp, 5).indices, torch.randint(0, u.shape[0], (20,))])
            with mp.workdps(50):
                ref = [float(mp_log_density(_mp_vector(kappa * mu), _mp_vector(u[i]),
                                            family == "antipodal")) for i in idx]
            err = rel_err(lp[idx], np.array(ref))
            assert err < SPEC_TOL[F32]
            assert err < GUARD_TOL[F32], err


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["plain", "antipodal"])
@pytest.mark.parametrize("d", [3, 4])
def test_samples_follow_the_density(d, family):
    torch.manual_seed(11)
    kappa, n = 2.0, 200_000
    c = torch.zeros(d, dtype=F64)
    c[0] = kappa
    dist = FAMILIES[family](c)
    v = dist.sample((n,))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(n, dtype=F64))
    x = v[:, 0]
    density = _density_of_cos(dist, d)
    for stat in [lambda x: x.clamp(min=0), lambda x: x ** 2, lambda x: x]:
        expected = _polar_integral(lambda cos: density(cos) * stat(cos), d, kappa)
        se = stat(x).std().item() / math.sqrt(n)
        assert abs(stat(x).mean().item() - expected) < 5 * se
    if family == "antipodal":  # symmetric: P(x > 0) = 1/2
        assert abs((x > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)


def test_rsample_pathwise_gradient():
    # d/d kappa E[<e_1, V>], V ~ PN(kappa e_1): the mean of per-sample pathwise
    # derivatives (autograd through rsample) against a central difference of the
    # expectation computed by quadrature.
    torch.manual_seed(2)
    d, kappa, n = 4, 1.5, 200_000

    def expectation(k):
        c = torch.zeros(d, dtype=F64)
        c[0] = k
        density = _density_of_cos(ProjectedNormal(c), d)
        return _polar_integral(lambda cos: density(cos) * cos, d, k)

    exact = (expectation(kappa + 1e-5) - expectation(kappa - 1e-5)) / 2e-5
    k = torch.full((n,), kappa, dtype=F64, requires_grad=True)
    c = torch.cat([k[:, None], torch.zeros(n, d - 1, dtype=F64)], dim=-1)
    (per_sample,) = torch.autograd.grad(ProjectedNormal(c).rsample()[:, 0].sum(), k)
    se = per_sample.std().item() / math.sqrt(n)
    assert se < 0.01 * abs(exact)
    assert abs(per_sample.mean().item() - exact) < 5 * se


# --------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["plain", "antipodal"])
def test_interface_shapes_and_dtypes(family):
    cls = FAMILIES[family]
    c = torch.randn(3, 2, 4)
    dist = cls(c)
    assert dist.batch_shape == (3, 2) and dist.event_shape == (4,)
    assert dist.support is pdist.constraints.sphere and dist.has_rsample
    assert dist.sample().shape == (3, 2, 4) and dist.rsample((5,)).shape == (5, 3, 2, 4)
    v = dist.sample((5,))
    assert dist.log_prob(v).shape == (5, 3, 2) and dist.log_prob(v).dtype == F32
    assert dist.log_prob(v[0, 0, 0]).shape == (3, 2)  # broadcasting a single value
    v64 = torch.nn.functional.normalize(v.double(), dim=-1)
    assert cls(c.double()).log_prob(v64).dtype == F64
    torch.testing.assert_close(dist.mean.norm(dim=-1), torch.ones(3, 2))
    torch.testing.assert_close(dist.mode, c / c.norm(dim=-1, keepdim=True))
    assert cls(torch.zeros(4)).mean.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert cls.infer_shapes((3, 2, 4)) == ((3, 2), (4,))
    # expand == broadcasting
    one = cls(c[0, 0])
    big = one.expand((3, 2))
    assert isinstance(big, cls) and big.batch_shape == (3, 2)
    torch.testing.assert_close(big.log_prob(v), one.log_prob(v))
    assert big.rsample((2,)).shape == (2, 3, 2, 4)
    # validation
    with pytest.raises(ValueError):
        cls(c, validate_args=True).log_prob(2 * v)
    with pytest.raises(ValueError):
        cls(c, validate_args=True).log_prob(v[..., :3])
    nan_value = v.clone()
    nan_value[4, 2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="unit vectors"):
        cls(c, validate_args=True).log_prob(nan_value)
    with pytest.raises(ValueError, match="broadcastable"):
        cls(c, validate_args=True).log_prob(v[:, :, :1].expand(5, 3, 3, 4))
    off_by_ulps = v64 * (1 + 4 * torch.finfo(F64).eps)  # within Pyro's tolerance
    assert torch.isfinite(cls(c.double(), validate_args=True).log_prob(off_by_ulps)).all()
    with pytest.raises(ValueError):
        cls(torch.ones(3, 1))
    # Pyro's reparametrisers recognise the plain family only (the antipodal one
    # must not be replaced by a plain projected normal).
    assert isinstance(dist, pdist.ProjectedNormal) == (family == "plain")
    assert isinstance(dist, pdist.TorchDistribution)


def test_pose_distribution_defaults_to_antipodal():
    c = torch.randn(5, 4)
    assert type(pose_distribution(c)) is AntipodalProjectedNormal
    assert type(pose_distribution(c, antipodal=False)) is ProjectedNormal
    mix = pose_distribution(torch.randn(5, 3, 4), logits=torch.zeros(5, 3))
    assert isinstance(mix, ProjectedNormalMixture) and mix.antipodal
    assert type(mix.component_distribution) is AntipodalProjectedNormal


def test_antipodal_is_symmetric_and_averages_the_plain_density():
    c = 4 * torch.randn(50, 4, dtype=F64)
    v = torch.nn.functional.normalize(torch.randn(50, 4, dtype=F64), dim=-1)
    anti = AntipodalProjectedNormal(c)
    torch.testing.assert_close(anti.log_prob(v), anti.log_prob(-v), rtol=0, atol=1e-12)
    plain = ProjectedNormal(c)
    mean = torch.logaddexp(plain.log_prob(v), plain.log_prob(-v)) - math.log(2)
    torch.testing.assert_close(anti.log_prob(v), mean, rtol=1e-12, atol=1e-12)


def test_mixture():
    torch.manual_seed(4)
    logits = torch.tensor([[0.2, -1.0, 0.5], [0.0, 0.0, 0.0]], dtype=F64)
    mus = torch.eye(4, dtype=F64)[:3]
    conc = 30 * mus.expand(2, 3, 4)
    for antipodal in (True, False):
        mix = ProjectedNormalMixture(logits, conc, antipodal=antipodal)
        assert isinstance(mix, pdist.MixtureSameFamily)
        assert mix.batch_shape == (2,) and mix.event_shape == (4,) and not mix.has_rsample
        assert mix.mixture_distribution.logits.shape == (2, 3)
        v = mix.sample((4000,))
        assert v.shape == (4000, 2, 4)
        comp = FAMILIES["antipodal" if antipodal else "plain"](conc)
        manual = torch.logsumexp(comp.log_prob(v[:, :, None]) + logits.log_softmax(-1), -1)
        torch.testing.assert_close(mix.log_prob(v), manual)
        # component frequencies: each sample is within ~0.2 of one of +-mu_k
        nearest = (v[:, 0] @ mus.T).abs().argmax(-1)
        freq = torch.bincount(nearest, minlength=3).double() / v.shape[0]
        probs = logits[0].softmax(-1)
        assert torch.all((freq - probs).abs() < 5 * torch.sqrt(probs * (1 - probs) / 4000))
        with pytest.raises(NotImplementedError):
            mix.rsample()
        single = ProjectedNormalMixture(logits[0], conc[0], antipodal=antipodal)
        big = single.expand((5,))
        assert type(big) is ProjectedNormalMixture and big.antipodal == antipodal
        assert big.batch_shape == (5,)
        torch.testing.assert_close(big.log_prob(v[:, :1]),
                                   single.log_prob(v[:, :1]).expand(-1, 5))
    # gradients reach logits and concentrations
    lg = logits.clone().requires_grad_()
    cc = conc.clone().requires_grad_()
    ProjectedNormalMixture(lg, cc).log_prob(v).sum().backward()
    assert torch.isfinite(lg.grad).all() and torch.isfinite(cc.grad).all()
    assert lg.grad.abs().sum() > 0 and cc.grad.abs().sum() > 0


def test_mixture_normalisation_on_the_circle():
    # d = 2: the trapezoidal rule on a periodic integrand is exact to round-off.
    logits = torch.tensor([0.4, -0.3, 1.0], dtype=F64)
    conc = torch.tensor([[40.0, 0.0], [0.0, -3.0], [-200.0, 50.0]], dtype=F64)
    theta = torch.linspace(0, 2 * math.pi, 20_001, dtype=F64)[:-1]
    v = torch.stack([theta.cos(), theta.sin()], dim=-1)
    for antipodal in (True, False):
        mix = ProjectedNormalMixture(logits, conc, antipodal=antipodal)
        integral = mix.log_prob(v).exp().mean().item() * 2 * math.pi
        assert abs(integral - 1.0) < 1e-10


# --------------------------------------------------------------------------------------
# Inside Pyro
# --------------------------------------------------------------------------------------


def test_pyro_model_and_guide_with_plate_and_reparam():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = ProjectedNormal(torch.tensor([0.0, 8.0, 0.0, 0.0])).sample((20,))

    def model():
        with pyro.plate("particles", 20):
            q = pyro.sample("q", ProjectedNormal(torch.tensor([0.0, 2.0, 0.0, 0.0])))
            pyro.sample("obs", AntipodalProjectedNormal(10.0 * q), obs=data)

    def guide():
        loc = pyro.param("loc", torch.tensor([0.1, 1.0, 0.0, 0.0]).expand(20, 4).clone())
        with pyro.plate("particles", 20):
            pyro.sample("q", ProjectedNormal(3.0 * loc))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    # Pyro's own reparametriser accepts the plain family (it is a Pyro ProjectedNormal).
    reparam_model = poutine.reparam(model, config={"q": ProjectedNormalReparam()})
    trace = poutine.trace(reparam_model).get_trace()
    q = trace.nodes["q"]["value"]
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(20))
    assert math.isfinite(trace.log_prob_sum().item())
    # A mixture guide (score-function gradients) runs too.
    pyro.clear_param_store()

    def mixture_guide():
        logits = pyro.param("logits", torch.zeros(20, 2))
        conc = torch.tensor([[0.0, 3.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]).expand(20, 2, 4)
        with pyro.plate("particles", 20):
            pyro.sample("q", ProjectedNormalMixture(logits, conc))

    loss = SVI(model, mixture_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()).step()
    assert math.isfinite(loss)


@pytest.mark.parametrize("family", ["plain", "antipodal"])
def test_svi_learns_a_sharp_pose_posterior(family):
    # Fit a guide PN(c) to a concentrated target PN(200 mu) by maximising the ELBO
    # (= minimising KL(q || target)), starting from a diffuse guide (|c| = 1)
    # orthogonal to mu.  With Pyro 1.9.2's clamped log_prob the same setup converges
    # to the antipode -mu (|c| ~ 200, clamped "KL" 31.8, true KL ~ 8e4): see
    # benchmarks/projected_normal.py, which runs both side by side.  (Not |c| -> 0:
    # c = 0 is a stationary point of the antipodal family, by symmetry.)
    cls = FAMILIES[family]
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    mu = torch.tensor([1.0, 0.0, 0.0, 0.0])

    def model():
        pyro.sample("q", cls(200.0 * mu))

    def guide():
        u = pyro.param("direction", torch.tensor([0.0, 1.0, 0.0, 0.0]))
        log_kappa = pyro.param("log_kappa", torch.tensor(0.0))
        pyro.sample("q", cls(log_kappa.exp() * u / u.norm()))

    elbo = Trace_ELBO(num_particles=128, vectorize_particles=True, max_plate_nesting=0)
    for steps, lr in [(250, 0.1), (100, 0.01)]:
        svi = SVI(model, guide, pyro.optim.Adam({"lr": lr, "betas": (0.9, 0.9)}), elbo)
        for _ in range(steps):
            svi.step()
    kappa = pyro.param("log_kappa").exp().item()
    u = pyro.param("direction").detach()
    cos = (u / u.norm() @ mu).item()
    print(f"{family}: learned concentration {kappa:.2f} (truth 200), cos to mode {cos:+.4f}")
    assert abs(kappa - 200.0) < 0.05 * 200.0
    # the plain target has one mode; the antipodal one identifies +-mu
    assert (cos if family == "plain" else abs(cos)) > 0.999


def test_log_prob_of_one_vector_broadcast_over_a_batch():
    """A value expanded from one vector (stride 0, as the SMC's fixed pose of a single
    particle) and a concentration broadcast alike give each row the contiguous result,
    without torch's "output was resized" warning."""
    import warnings

    value = torch.nn.functional.normalize(torch.randn(1, 4, dtype=torch.float64), dim=-1)
    for concentration in (torch.zeros(4, dtype=torch.float64),
                          torch.tensor([3.0, 0.5, 0.0, -1.0], dtype=torch.float64)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            broadcast = ProjectedNormal(concentration).log_prob(value.expand(16, 4))
        expected = ProjectedNormal(concentration.expand(16, 4).clone()).log_prob(
            value.expand(16, 4).clone())
        torch.testing.assert_close(broadcast, expected)
