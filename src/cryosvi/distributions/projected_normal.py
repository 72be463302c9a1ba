"""The projected normal family on spheres as Pyro distributions: ProjectedNormal (exact
where Pyro's clamps), its antipodal symmetrisation (the pose family: q and -q are the same
rotation) and mixtures of either, with densities and analytic gradients from the kernel
of ``cryosvi.distributions.normaliser`` (whose notes give the formulas and sources)."""

from __future__ import annotations

import concurrent.futures
import math

import pyro.distributions as pdist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor

from cryosvi.distributions.normaliser import (_COMPUTE_DTYPE, _HEAD_T, _LOG_2PI, _LogNormaliser, _antipodal_terms, _head, _head_limit, _head_scaled, _head_value_at_switch, _tail)

# --------------------------------------------------------------------------------------
# Densities
# --------------------------------------------------------------------------------------


def _unit(x: Tensor) -> Tensor:
    """x / |x| along the last axis; overflow-safe; a zero vector maps to e_1."""
    scale = x.abs().amax(dim=-1, keepdim=True)
    y = x / scale.clamp(min=torch.finfo(x.dtype).tiny)
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    e1 = torch.zeros_like(y)
    e1[..., 0] = 1.0
    return torch.where(norm > 0, y / norm.clamp(min=torch.finfo(x.dtype).tiny), e1)


# On CPU the density is evaluated in blocks of this many values: the ~50 elementwise
# float64 operations per block then run in cache instead of streaming 8 MB arrays
# through memory each time (3x faster for 1e6 values).  On GPUs, one block.
_CPU_BLOCK = 1 << 16


def _blocks(n: int, device: torch.device) -> list[tuple[int, int]]:
    size = _CPU_BLOCK if device.type == "cpu" else max(n, 1)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _map_blocks(fn, n: int, device: torch.device) -> list:
    """[fn(i0, i1) for every block (i0, i1) of n values], in order.

    On CPU the blocks are shared among as many Python threads as torch has intra-op
    threads, and every op runs serially on the thread that issued it (torch releases
    the GIL inside ops).  Intra-op parallelism instead would open a parallel region per
    op on 0.5 MB arrays: ~100 regions per block, each of which waits a scheduler time
    slice for a descheduled worker when the cores are busy (measured 10-15x slower
    than serial on the shared 2-core machine); threads over blocks synchronise once.
    """
    blocks = _blocks(n, device)
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or n < 32768:  # (torch's grain size)
        return [fn(i0, i1) for i0, i1 in blocks]
    per_thread = math.ceil(len(blocks) / threads)
    groups = [blocks[k:k + per_thread] for k in range(0, len(blocks), per_thread)]

    def work(group):
        torch.set_num_threads(1)  # this thread's ops run serially
        with torch.no_grad():  # (grad mode is per thread; the kernels never need it)
            return [fn(i0, i1) for i0, i1 in group]

    torch.set_num_threads(1)
    try:
        if len(groups) == 1:
            return [fn(i0, i1) for i0, i1 in blocks]
        with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
            return [result for part in pool.map(work, groups) for result in part]
    finally:
        torch.set_num_threads(threads)


def _stacked(x: Tensor) -> Tensor:
    """x (m, d), any dtype and strides -> float64 (d, m), rows contiguous; (d, 1) when
    all m rows are the same vector (a broadcast concentration)."""
    if x.shape[0] > 1 and x.stride(0) == 0:
        return x[0].to(_COMPUTE_DTYPE).unsqueeze(-1)
    y = torch.empty((x.shape[1], x.shape[0]), dtype=_COMPUTE_DTYPE, device=x.device)
    return y.copy_(x.t())


def _geometry(c: Tensor, v: Tensor):
    """(1/|v|, t = <c, v/|v|>, c_perp = c - t v/|v|) from float64 c and v, each (d, m)
    or (d, 1); shapes (m,), (m,), (d, m) (m = 1 if both are one vector).
    (Row-wise multiply-adds: faster here than reductions over the leading axis.)"""
    d = v.shape[0]
    norm2 = v[0] * v[0]
    for i in range(1, d):
        norm2 = norm2.addcmul_(v[i], v[i])
    inv_norm = norm2.rsqrt_()  # renormalise in float64: see the module docstring
    t = c[0] * v[0]
    for i in range(1, d):
        t = t.addcmul_(c[i], v[i])
    t = t.mul_(inv_norm)
    # |c|^2 - t^2 cancels when v is close to c / |c|; |c - t v^|^2 does not.
    perp = torch.addcmul(c, v, t * inv_norm, value=-1.0)
    return inv_norm, t, perp


def _flat_pair(concentration: Tensor, value: Tensor):
    """Broadcast (..., d) inputs to (N, d) views (copies only where unavoidable)."""
    shape = torch.broadcast_shapes(concentration.shape[:-1], value.shape[:-1])
    d = concentration.shape[-1]
    n = math.prod(shape)
    return (shape, concentration.expand(shape + (d,)).reshape(n, d),
            value.expand(shape + (d,)).reshape(n, d))


class _LogDensity(torch.autograd.Function):
    """log p(v) for PN_d(c) (or its antipodal symmetrisation) with analytic gradients.

    With v^ = v / |v|, t = <c, v^>, e = c - t v^ (= c_perp) and A the log of the
    radial factor: log p = -|e|^2 / 2 + A(t) - (d - 1)/2 log(2 pi), and

        d log p / dc = A'(t) v^ - e,      d log p / dv = (t + A'(t)) e / |v|

    (the latter is tangent to the sphere, because v enters only through v^).
    t + A' is returned by the kernel without cancellation (in the tail it is
    r_d ~ d / |t| while t and A' are both ~ |t|).  The backward pass reuses A' and
    t + A' from the forward pass and recomputes 1/|v| and e with the same operations.
    """

    @staticmethod
    def forward(ctx, concentration: Tensor, value: Tensor, antipodal: bool,
                check_unit: bool) -> Tensor:
        d = concentration.shape[-1]
        out_dtype = torch.promote_types(concentration.dtype, value.dtype)
        single = torch.finfo(out_dtype).bits <= 32  # float32 (or less) results
        # Pyro's sphere constraint, |1 - |v|| < 10 eps sqrt(d), checked on the norms
        # computed here anyway (torch's separate check took 11 ms per 10^6 float32 values).
        unit_tol = 10.0 * torch.finfo(value.dtype).eps * math.sqrt(d)
        shape, c_flat, v_flat = _flat_pair(concentration, value)
        n = c_flat.shape[0]
        kw = dict(dtype=_COMPUTE_DTYPE, device=c_flat.device)
        terms = torch.empty((3, n), **kw)
        out, dpara, t_plus = terms.unbind(0)  # log density, A'(t), t + A'(t)

        def block(i0, i1):
            """Fills out, dpara, t_plus[i0:i1]."""
            tail = None
            inv_norm, t, perp = _geometry(_stacked(c_flat[i0:i1]), _stacked(v_flat[i0:i1]))
            if t.shape[0] != i1 - i0:  # one vector broadcast over the block: per row
                inv_norm, t = (x.expand(i1 - i0).contiguous() for x in (inv_norm, t))
                perp = perp.expand(d, i1 - i0).contiguous()
            # (1/|v| - 1 = 1 - |v| to first order; NaN fails the comparison)
            if check_unit and not all(abs(x - 1) < unit_tol
                                      for x in torch.aminmax(inv_norm)):
                raise ValueError("the value argument to log_prob must be unit vectors "
                                 f"(the support {constraints.sphere}), got norms off 1 "
                                 f"by more than {unit_tol:.1e} (or NaN)")
            perp2 = perp[0] * perp[0]
            for i in range(1, d):
                perp2 = perp2.addcmul_(perp[i], perp[i])
            if antipodal:
                para, g, tg = _antipodal_terms(t, d)
            else:  # the head formula everywhere; tail values are replaced below
                lo, hi = torch.stack(torch.aminmax(t)).tolist()
                if lo < -_HEAD_T:
                    tail = (t < -_HEAD_T).nonzero().squeeze(-1)
                    s = t[tail].neg_()
                    t = t.clamp_(min=-_HEAD_T)
                if hi > _head_limit(d):
                    para, g, tg = _head_scaled(t, d, 1)
                else:
                    para, g, tg = _head(t, d, 1, check_range=False,
                                        out=(dpara[i0:i1], t_plus[i0:i1]))
            torch.add(para, perp2, alpha=-0.5, out=out[i0:i1])
            if g.data_ptr() != dpara[i0:i1].data_ptr():
                dpara[i0:i1] = g
                t_plus[i0:i1] = tg
            if tail is not None:
                para, g, tg = _tail(s, d, 1, single=single)
                # out holds the head value at the clamp point -T there: swap it out
                para = para.sub_(_head_value_at_switch(d)).add_(out[i0:i1][tail])
                for dest, src in zip((out, dpara, t_plus), (para, g, tg)):
                    dest[i0:i1].index_copy_(0, tail, src)

        _map_blocks(block, n, c_flat.device)
        ctx.antipodal = antipodal
        ctx.save_for_backward(concentration, value, dpara, t_plus)
        out = out.sub_(0.5 * (d - 1) * _LOG_2PI).reshape(shape)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, upstream: Tensor):
        concentration, value, dpara, t_plus = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (Hessians): differentiate the composite expression,
            # which autograd can differentiate again.
            wrt = [x for x in (concentration, value) if x.requires_grad]
            with torch.enable_grad():
                lp = _log_density_autograd(concentration, value, ctx.antipodal)
            grads = iter(torch.autograd.grad(lp, wrt, upstream.to(lp.dtype),
                                             create_graph=True))
            return (next(grads) if concentration.requires_grad else None,
                    next(grads) if value.requires_grad else None, None, None)
        need_c, need_v = ctx.needs_input_grad[:2]
        d = concentration.shape[-1]
        shape, c_flat, v_flat = _flat_pair(concentration, value)
        n = c_flat.shape[0]
        device = c_flat.device
        up_flat = upstream.reshape(n)
        # A concentration whose own batch shape is trivial ((d,), (1, d), ...) is shared by
        # all n values: its gradient is summed block by block.  (An expanded view of
        # shape (n, d) also has stride 0, but needs a gradient per row.)
        shared_c = n > 1 and math.prod(concentration.shape[:-1]) == 1
        grad_c = None if shared_c else torch.empty((n, d), dtype=concentration.dtype,
                                                   device=device)
        grad_v = torch.empty((n, d), dtype=value.dtype, device=device) if need_v else None

        def block(i0, i1):
            """Fills grad_c (unless shared) and grad_v [i0:i1]; returns a shared
            concentration's partial gradient."""
            # The same operations as in the forward pass, so bit-identical values.
            v = _stacked(v_flat[i0:i1])
            inv_norm, _, perp = _geometry(_stacked(c_flat[i0:i1]), v)
            up = up_flat[i0:i1].to(_COMPUTE_DTYPE)
            partial = None
            if need_c:  # up (A' v / |v| - e)
                scale = dpara[i0:i1] * inv_norm
                scale = scale.mul_(up)
                if shared_c:  # v scale - c_perp up, by BLAS
                    partial = torch.mv(v.expand(d, up.shape[0]), scale).sub_(
                        torch.mv(perp, up))
                else:
                    for i in range(d):  # column writes beat a transposing copy
                        torch.mul(v[i], scale, out=grad_c[i0:i1, i])
                        grad_c[i0:i1, i] -= perp[i] * up
            if need_v:  # up (t + A') e / |v|
                scale = t_plus[i0:i1] * inv_norm
                scale = scale.mul_(up)
                for i in range(d):
                    torch.mul(perp[i], scale, out=grad_v[i0:i1, i])
            return partial

        partials = _map_blocks(block, n, device)
        if not need_c:
            grad_c = None
        elif shared_c:
            grad_c = torch.stack(partials).sum(0).to(concentration.dtype).reshape(
                (1,) * (concentration.dim() - 1) + (d,)).sum_to_size(concentration.shape)
        else:
            grad_c = grad_c.reshape(shape + (d,)).sum_to_size(concentration.shape)
        if need_v:
            grad_v = grad_v.reshape(shape + (d,)).sum_to_size(value.shape)
        return grad_c, grad_v, None, None


def _log_density_autograd(concentration: Tensor, value: Tensor, antipodal: bool) -> Tensor:
    """The same log density as :class:`_LogDensity`, composed of differentiable ops
    (used for higher-order derivatives); float64, broadcast batch shape."""
    c = concentration.to(_COMPUTE_DTYPE)
    v = value.to(_COMPUTE_DTYPE)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    t = (c * v).sum(-1)
    perp = c - t.unsqueeze(-1) * v
    d = c.shape[-1]
    para = _LogNormaliser.apply(t, d, antipodal)
    return para - 0.5 * (perp * perp).sum(-1) - 0.5 * (d - 1) * _LOG_2PI


def projected_normal_log_density(concentration: Tensor, value: Tensor,
                                 antipodal: bool = False, check_unit: bool = False) -> Tensor:
    """log p(value) of PN_d(concentration) w.r.t. the surface measure of S^{d-1}.

    concentration: (..., d); value: (..., d) unit vectors (renormalised here in
    float64, so float32 rounding off the sphere does not matter); broadcastable.
    antipodal: score (p(v) + p(-v)) / 2 instead.  Returns the broadcast batch
    shape in the promoted dtype of the inputs (nats); computed in float64;
    differentiable in both arguments (the gradient in value is tangent to the
    sphere), twice differentiable.  check_unit: raise ValueError unless every value is
    a unit vector to Pyro's tolerance (``constraints.sphere``).
    """
    if concentration.shape[-1] != value.shape[-1]:
        raise ValueError(f"event sizes differ: {concentration.shape[-1]} and {value.shape[-1]}")
    return _LogDensity.apply(concentration, value, bool(antipodal), bool(check_unit))


class _ProjectedNormalShared:
    """Parameters, shapes, sampling and summaries shared by the two families."""

    arg_constraints = {"concentration": constraints.real_vector}
    support = constraints.sphere
    has_rsample = True
    _antipodal = False

    def __init__(self, concentration: Tensor, validate_args: bool | None = None):
        if concentration.dim() < 1 or concentration.shape[-1] < 2:
            raise ValueError("concentration must have shape (..., d) with d >= 2, "
                             f"got {tuple(concentration.shape)}")
        self.concentration = concentration
        TorchDistribution.__init__(self, concentration.shape[:-1], concentration.shape[-1:],
                                   validate_args=validate_args)

    @staticmethod
    def infer_shapes(concentration):
        """(batch_shape, event_shape) from the concentration's shape (..., d)."""
        return concentration[:-1], concentration[-1:]

    def _expand_into(self, cls, batch_shape, _instance):
        new = self._get_checked_instance(cls, _instance)
        batch_shape = torch.Size(batch_shape)
        new.concentration = self.concentration.expand(batch_shape + self.event_shape)
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self.__dict__.get("_validate_args")
        return new

    @property
    def mean(self) -> Tensor:
        """Direction c / |c|, shape batch + (d,) (Pyro's convention: the centroid on
        the sphere, not the Euclidean mean E[V]; for the antipodal family, the
        representative +c/|c| of the axis {+-c/|c|}).  e_1 when c = 0."""
        return _unit(self.concentration)

    @property
    def mode(self) -> Tensor:
        """c / |c|, shape batch + (d,) (for the antipodal family -c/|c| is a mode too)."""
        return _unit(self.concentration)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        """(sample_shape + batch + (d,)) unit vectors: normalise(c + N(0, I)), which is
        PN(c) by definition and differentiable in c (the noise is parameter-free)."""
        shape = self._extended_shape(sample_shape)
        x = self.concentration + torch.randn(shape, dtype=self.concentration.dtype,
                                             device=self.concentration.device)
        v = _unit(x)
        if self._antipodal:
            # An exact sampler of (p(v) + p(-v)) / 2: draw from p, flip the sign with
            # probability 1/2.  The sign is parameter-free noise, so still reparametrised.
            sign = torch.randint(0, 2, shape[:-1] + (1,), device=v.device).to(v.dtype)
            v = v * (2.0 * sign - 1.0)
        return v

    def log_prob(self, value: Tensor) -> Tensor:
        """log density w.r.t. the surface measure of S^{d-1}; value (..., d) unit
        vectors broadcastable with batch + (d,); returns the broadcast batch shape.
        Exact for every finite input (float32 or float64); nats."""
        if self._validate_args:  # torch's _validate_sample, the support check fused below
            if not isinstance(value, Tensor):
                raise ValueError(f"The value argument to log_prob must be a Tensor, got "
                                 f"{type(value).__name__}")
            if value.shape[-1:] != self.event_shape:
                raise ValueError(f"Expected event shape {self.event_shape}, "
                                 f"got {value.shape[-1:]}")
            try:
                torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
            except RuntimeError:
                raise ValueError(f"Value batch shape {tuple(value.shape[:-1])} is not "
                                 f"broadcastable with {tuple(self.batch_shape)}") from None
        return projected_normal_log_density(self.concentration, value,
                                            antipodal=self._antipodal,
                                            check_unit=bool(self._validate_args))


class ProjectedNormal(_ProjectedNormalShared, pdist.ProjectedNormal):
    """Projected normal PN_d(c): V = X / |X|, X ~ N(c, I_d) (Hernandez-Stumpfhauser
    et al. 2017), with an exact log_prob for every d >= 2.

    concentration: (..., d), batch shape (...), event shape (d,); direction = the
    location on S^{d-1}, norm = the concentration (0 is uniform).  Drop-in for
    ``pyro.distributions.ProjectedNormal`` (a subclass of it, so Pyro's
    ``ProjectedNormalReparam`` / ``MinimalReparam`` apply), but log_prob neither
    clamps nor cancels: see the module docstring.
    """

    def __init__(self, concentration: Tensor, validate_args: bool | None = None):
        _ProjectedNormalShared.__init__(self, concentration, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return self._expand_into(ProjectedNormal, batch_shape, _instance)


class AntipodalProjectedNormal(_ProjectedNormalShared, TorchDistribution):
    """Antipodally symmetric projected normal, density (p(v) + p(-v)) / 2, p = PN_d(c).

    The default pose family: unit quaternions q and -q are the same rotation, so
    any density of q that represents a distribution of rotations should be
    symmetric.  Same interface as :class:`ProjectedNormal` (concentration (..., d),
    rsample, log_prob, expand).  log_prob scores the radial factor
    (I_d(t) + I_d(-t)) / 2 = E|N(t, 1)|^{d-1} / 2 by an all-positive recurrence
    (``_antipodal_terms``), exact for every t.  rsample draws from PN(c) and
    flips the sign with probability 1/2 (exact, reparametrised).  Note that the
    density is even in c, so c = 0 is a stationary point of any objective: do
    not initialise a guide's concentration at exactly 0.  Deliberately
    not a subclass of Pyro's ProjectedNormal, so that Pyro's
    ProjectedNormalReparam (which would sample the plain family) is never
    applied to it.
    """

    _antipodal = True

    def __init__(self, concentration: Tensor, validate_args: bool | None = None):
        _ProjectedNormalShared.__init__(self, concentration, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return self._expand_into(AntipodalProjectedNormal, batch_shape, _instance)


class ProjectedNormalMixture(pdist.MixtureSameFamily):
    """Mixture of K projected normals sum_k softmax(logits)_k PN(c_k), for
    multi-modal pose posteriors.

    logits: (..., K) unnormalised log weights; concentration: (..., K, d).
    Batch shape (...), event shape (d,).  antipodal=True (default) mixes
    :class:`AntipodalProjectedNormal` components, else :class:`ProjectedNormal`.

    Sampling: draw a component index from Categorical(logits), then a value from
    that component (torch's MixtureSameFamily.sample, under no_grad).  No gradient
    passes through sampling: ``has_rsample = False``, ``rsample`` raises.  In a
    guide, Pyro therefore uses score-function (REINFORCE) gradients for the whole
    site; for low-variance gradients enumerate the component index as its own
    discrete site and sample the reparametrised component.  log_prob is
    logsumexp_k(log_softmax(logits)_k + log p_k(v)), differentiable in logits,
    concentration and value.
    """

    has_rsample = False

    def __init__(self, logits: Tensor, concentration: Tensor, antipodal: bool = True,
                 validate_args: bool | None = None):
        if concentration.dim() < 2 or logits.shape[-1] != concentration.shape[-2]:
            raise ValueError(f"need logits (..., K) and concentration (..., K, d), got "
                             f"{tuple(logits.shape)} and {tuple(concentration.shape)}")
        family = AntipodalProjectedNormal if antipodal else ProjectedNormal
        self.antipodal = bool(antipodal)
        super().__init__(pdist.Categorical(logits=logits), family(concentration),
                         validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ProjectedNormalMixture, _instance)
        new.antipodal = self.antipodal
        return super().expand(batch_shape, _instance=new)

    @property
    def logits(self) -> Tensor:
        """(..., K) normalised log weights."""
        return self.mixture_distribution.logits

    @property
    def concentration(self) -> Tensor:
        """(..., K, d) component concentrations."""
        return self.component_distribution.concentration

    @property
    def mean(self):
        raise NotImplementedError("a weighted sum of directions (and, for the antipodal "
                                  "family, of sign-ambiguous ones) is not a summary on "
                                  "the sphere; use the components' modes and weights")


def pose_distribution(concentration: Tensor, logits: Tensor | None = None,
                      antipodal: bool = True, validate_args: bool | None = None):
    """The default pose family over unit quaternions (scalar first, (..., 4)).

    concentration: (..., 4) for a single component or (..., K, 4) with logits
    (..., K) for a mixture.  antipodal=True (default) scores (p(q) + p(-q)) / 2;
    antipodal=False gives the plain :class:`ProjectedNormal`.
    """
    if logits is not None:
        return ProjectedNormalMixture(logits, concentration, antipodal=antipodal,
                                      validate_args=validate_args)
    family = AntipodalProjectedNormal if antipodal else ProjectedNormal
    return family(concentration, validate_args=validate_args)
