"""Exact posteriors of low-dimensional latents by adaptive grid quadrature, for a batch of
independent problems at once. Nothing here knows about cryo-EM.

A problem b has an unnormalised log density log p(x, z) of a latent z in R^d (d = 1 or 2
in practice: the cost grows as n^d). The caller supplies it as one batched function
``log_density(points (G, B', d), rows) -> (G, B')``, ``rows`` None for all B problems
or the (B',) indices of the problems the points belong to.

``grid_posterior``: the midpoint rule on a window (a parallelepiped centre + A u, u in
[-1, 1]^d, per problem) cut into n^d equal cells. Each node (cell centre) carries its
cell's posterior mass w_g = p(x, z_g) / sum_g' p(x, z_g'): a deterministic weighted
sample. Means and covariances are the nodes' weighted moments; for a density smooth on
the cells' scale the midpoint rule's error is exponentially small, about
exp(-2 pi^2 r^2) with r the posterior std in cells (the aliasing term of the
Euler-Maclaurin / Poisson summation formula; Trefethen & Weideman, "The exponentially
convergent trapezoidal rule", SIAM Review 56, 2014), which ``GridPosterior.resolution``
reports per problem. The evidence is the sum times the cell volume;
``GridPosterior.intervals`` gives equal-tailed marginal credible intervals.

``adaptive_grid_posterior``: level 0 covers the prior (a box of a few prior stds); each
next level is a window on the previous level's posterior (the range that holds all but
``tail`` of the mass, widened by one coarse cell on each side: a narrow peak may sit
anywhere in its cell), cut into finer cells; problems whose posterior is still narrower
than its cells (``resolution`` < 1) take more levels, each ~n/3 times finer, until
resolved or the window stops shrinking.

``split_grid_posterior``: level 0 as above, then rounds in which each problem's heaviest
cells are split into 3^d children (the middle child keeps the parent's node): cells end
up small where the mass is, whatever its shape, e.g. a wide posterior made of narrow
peaks (greedy adaptive midpoint quadrature; cf. the adaptive cubature of Genz & Malik,
J. Comput. Appl. Math. 6, 1980, here with a fixed budget per problem).

Neither draws a random number, and no problem's result depends on another's: the only
decisions (extra levels, which cells to split) are taken per problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

LogDensity = Callable[[Tensor, Tensor | None], Tensor]
"""(points (G, B', d), rows) -> (G, B'): the unnormalised log density of the problems
``rows`` ((B',) indices, or None for all B) at the points."""


@dataclass
class GridPosterior:
    """The posterior of B problems on their last grid level.

    nodes (G, B, d): cell centres; log_density (G, B) float64: the caller's log p(x, z)
    there (-inf allowed); weights (G, B): each cell's posterior mass (sums to 1 over G);
    cell (B, d, d): the edge vectors of a cell (columns; the smallest cell of a split
    grid); log_evidence (B,) float64: log of the integral of p(x, z) over the window
    (midpoint rule); mean (B, d), cov (B, d, d), std (B, d): the nodes' weighted
    moments; evaluations (B,): log-density evaluations per problem, all levels;
    resolution (B,): how finely the cells sample the posterior (``_resolution``; in 1-D
    the posterior std over the cell width; >= ~0.75: resolved); half_widths (G, B, d):
    every cell's half-width where the cells differ (``split_grid_posterior``), None on a
    lattice (then ``cell`` is every cell).
    """

    nodes: Tensor
    log_density: Tensor
    weights: Tensor
    cell: Tensor
    log_evidence: Tensor
    mean: Tensor
    cov: Tensor
    std: Tensor
    evaluations: Tensor
    resolution: Tensor
    half_widths: Tensor | None = None

    def intervals(self, levels=(0.68, 0.95)) -> Tensor:
        """Equal-tailed marginal credible intervals (B, d, len(levels), 2)."""
        probabilities = []
        for level in levels:
            probabilities += [(1 - level) / 2, (1 + level) / 2]
        return self.quantiles(probabilities).unflatten(-1, (len(levels), 2))

    def quantiles(self, probabilities) -> Tensor:
        """Marginal quantiles (B, d, P) of each coordinate at ``probabilities`` (P,). On
        an axis-aligned lattice: ``lattice_quantiles`` (the log marginal interpolated by
        parabolas, exact for a Gaussian); on cells of several sizes or a rotated lattice:
        each cell's mass spread uniformly over its extent (``marginal_quantiles``, an
        O(cell) approximation)."""
        p = torch.as_tensor(probabilities, dtype=torch.float64, device=self.nodes.device)
        diagonal = torch.diag_embed(torch.diagonal(self.cell, dim1=-2, dim2=-1))
        if self.half_widths is None and bool((self.cell == diagonal).all()):
            return lattice_quantiles(self.nodes, self.weights, self.cell, p)
        return marginal_quantiles(self.nodes, self.weights, self.half_extents(), p)

    def effective_cells(self) -> Tensor:
        """(B,) 1 / sum_g w_g^2: how many cells effectively carry the mass (the Kish
        effective sample size of the nodes as a weighted sample; for a resolved 1-D
        Gaussian of std s on cells of width h about 2 sqrt(pi) s / h)."""
        return 1.0 / self.weights.double().square().sum(0)

    def cells(self, u: Tensor) -> Tensor:
        """(n, B) the cell of each uniform u (n, B) in [0, 1) by the inverse of the cells'
        cumulative mass: a cell drawn by its mass."""
        cumulative = self.weights.double().cumsum(0)
        cumulative = cumulative / cumulative[-1:]
        cumulative[-1] = 1.0  # rounding must not leave the last draw unassigned
        index = torch.searchsorted(cumulative.T.contiguous(), u.double().T.contiguous()).T
        return index.clamp(max=self.nodes.shape[0] - 1)

    def half_extents(self) -> Tensor:
        """(G, B, d) each cell's half-width along every axis (of the box about it)."""
        if self.half_widths is not None:
            return self.half_widths
        return (0.5 * self.cell.abs().sum(-1))[None].expand_as(self.nodes)

    def draws(self, n: int) -> Tensor:
        """(n, B, d) equally weighted draws without randomness: systematic resampling of
        the nodes with the fixed offset 1/2 (node g gets n w_g copies, rounded; Kitagawa
        1996), so the same problem always gives the same draws."""
        batch = self.nodes.shape[1]
        points = (torch.arange(n, dtype=torch.float64, device=self.nodes.device) + 0.5) / n
        index = self.cells(points[:, None].expand(n, batch))
        columns = torch.arange(batch, device=index.device).expand(n, -1)
        return self.nodes[index, columns]


def unit_nodes(n: int, dim: int, dtype=torch.float32, device=None) -> Tensor:
    """(n^dim, dim): the cell centres of [-1, 1]^dim cut into n^dim equal cells (the
    first coordinate varies slowest)."""
    line = -1 + (2 * torch.arange(n, dtype=dtype, device=device) + 1) / n
    grids = torch.meshgrid(*([line] * dim), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], -1)


def _finite(log_p: Tensor) -> Tensor:
    """log densities in float64 with NaN and +inf (a broken evaluation) as -inf."""
    return torch.nan_to_num(log_p.double(), nan=-math.inf, posinf=-math.inf)


def _moments(nodes: Tensor, log_mass: Tensor):
    """(weights (G, B), log total (B,), mean (B, d), cov (B, d, d), std (B, d)) of nodes
    (G, B, d) with unnormalised log masses (G, B). A problem whose masses are all zero
    (every evaluation -inf) gets equal weights: the window's own moments."""
    total = torch.logsumexp(log_mass, 0)
    weights = torch.nan_to_num(torch.exp(log_mass - total), nan=1.0 / nodes.shape[0])
    w = weights.to(nodes.dtype)
    mean = (w[..., None] * nodes).sum(0)
    centred = nodes - mean
    # No within-cell spread is added: for a density smooth on the cells' scale the
    # nodes' weighted moments are the accurate ones (the midpoint rule); a posterior
    # narrower than a cell shows as a resolution below 1 instead.
    cov = torch.einsum("gb,gbi,gbj->bij", w, centred, centred)
    std = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    return w, total, mean, cov, std


def grid_posterior(log_density: LogDensity, centre: Tensor, axes: Tensor, n: int,
                   rows: Tensor | None = None) -> GridPosterior:
    """The posterior of B problems by the midpoint rule on the windows centre + axes u,
    u in [-1, 1]^d (centre (B, d); axes (B, d, d): the half-edge vectors as columns),
    n cells per axis: n^d evaluations of ``log_density`` per problem (``rows`` passed
    on to it)."""
    batch, dim = centre.shape
    u = unit_nodes(n, dim, centre.dtype, centre.device)  # (G, d)
    nodes = centre[None] + torch.einsum("bij,gj->gbi", axes, u)  # (G, B, d)
    log_p = _finite(log_density(nodes, rows))
    cell = axes * (2.0 / n)
    w, total, mean, cov, std = _moments(nodes, log_p)
    log_cell = torch.linalg.slogdet(cell.double())[1]
    evaluations = torch.full((batch,), nodes.shape[0], device=centre.device)
    return GridPosterior(nodes, log_p, w, cell, total + log_cell, mean, cov, std,
                         evaluations, _resolution(cov, cell))


def _resolution(cov: Tensor, cell: Tensor) -> Tensor:
    """(B,) how finely the lattice samples the posterior: the smallest sqrt(k^T S k)
    over the small integer vectors k (the axes e_i and the diagonals e_i +- e_j), S the
    posterior covariance in cell units (cell^-1 cov cell^-T). The midpoint rule's
    aliasing error for a Gaussian is about exp(-2 pi^2 resolution^2): 3e-9 at 1, 7e-3
    at 0.5 (1-D: std / cell width)."""
    inverse = torch.linalg.inv(cell.double())
    scaled = inverse @ cov.double() @ inverse.transpose(1, 2)
    dim = cov.shape[-1]
    eye = torch.eye(dim, dtype=torch.float64, device=cov.device)
    vectors = [eye[i] for i in range(dim)]
    for i in range(dim):
        for j in range(i + 1, dim):
            vectors += [eye[i] + eye[j], eye[i] - eye[j]]
    k = torch.stack(vectors)  # (V, d)
    quadratic = torch.einsum("vi,bij,vj->bv", k, scaled, k)
    return quadratic.clamp_min(0).sqrt().min(-1).values.to(cov.dtype)


SUBCELLS = 16
"""Points per cell at which ``lattice_quantiles`` integrates the interpolated marginal."""


def lattice_quantiles(nodes: Tensor, weights: Tensor, cell: Tensor,
                      probabilities: Tensor) -> Tensor:
    """Quantiles (B, d, P) of each coordinate of an axis-aligned lattice posterior
    (nodes (G, B, d) in ``unit_nodes``' order, n = G^(1/d) per axis; cells ``cell``
    (B, d, d) diagonal): the marginal masses m_i on the coordinate's n nodes, log m
    interpolated by the parabola through each node and its two neighbours (one-sided at
    the ends; exact for a Gaussian), integrated on ``SUBCELLS`` midpoints per cell; the
    quantile is read off that fine CDF by linear interpolation."""
    count, batch, dim = nodes.shape
    n = round(count ** (1.0 / dim))
    shaped = weights.double().reshape(*([n] * dim), batch)
    step = torch.diagonal(cell, dim1=-2, dim2=-1).double()  # (B, d)
    device = nodes.device
    within = (torch.arange(SUBCELLS, dtype=torch.float64, device=device) + 0.5) \
        / SUBCELLS - 0.5  # offsets inside a cell, in cells
    target = probabilities.double().expand(batch, -1).contiguous()
    out = []
    for j in range(dim):
        other = [a for a in range(dim) if a != j]
        marginal = shaped.sum(other) if other else shaped  # (n, B)
        log_m = torch.log(marginal.clamp_min(1e-300)).T  # (B, n)
        centre = torch.arange(n, device=device).clamp(1, max(n - 2, 1))
        if n >= 3:
            left, mid, right = log_m[:, centre - 1], log_m[:, centre], log_m[:, centre + 1]
        else:  # too few nodes for a parabola: a step function
            left = mid = right = log_m
        # each fine point's place relative to its stencil's centre, in cells
        offset = (torch.arange(n, device=device) - centre).double()[:, None] + within
        slope, curve = (right - left) / 2, (right - 2 * mid + left) / 2
        fine = mid[..., None] + slope[..., None] * offset + curve[..., None] * offset ** 2
        mass = torch.softmax(fine.reshape(batch, n * SUBCELLS), -1)
        cdf = torch.cat([mass.new_zeros(batch, 1), mass.cumsum(-1)], -1)  # at fine edges
        first = nodes[0, :, j].double() - step[:, j] / 2  # the lattice's lower edge
        edges = first[:, None] + step[:, j, None] * torch.arange(
            n * SUBCELLS + 1, dtype=torch.float64, device=device) / SUBCELLS
        index = torch.searchsorted(cdf.contiguous(), target).clamp(1, n * SUBCELLS)
        c0, c1 = cdf.gather(1, index - 1), cdf.gather(1, index)
        e0, e1 = edges.gather(1, index - 1), edges.gather(1, index)
        fraction = ((target - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
        out.append(e0 + fraction * (e1 - e0))
    return torch.stack(out, 1).to(nodes.dtype)


def marginal_quantiles(nodes: Tensor, weights: Tensor, half_extent: Tensor,
                       probabilities: Tensor, iterations: int = 50) -> Tensor:
    """Quantiles (B, d, P) of each coordinate of a cell posterior: node g's mass w_g
    spread uniformly over [x_g - h, x_g + h] (h: ``half_extent`` (B, d), or (G, B, d)
    for cells of their own sizes), so the marginal CDF is piecewise linear; bisection on
    it for each probability (P,)."""
    x = nodes.double().permute(1, 2, 0)  # (B, d, G)
    h = (half_extent.permute(1, 2, 0) if half_extent.dim() == 3
         else half_extent[..., None]).double().clamp_min(1e-30)
    w = weights.double().T[:, None, None, :]  # (B, 1, 1, G)
    shape = (*x.shape[:2], probabilities.numel())
    low = (x - h).min(-1).values[..., None].expand(shape).clone()
    high = (x + h).max(-1).values[..., None].expand(shape).clone()
    target = probabilities.double()
    lower, width = (x - h)[:, :, None, :], (2 * h)[:, :, None, :]

    def cdf(t: Tensor) -> Tensor:  # (B, d, P) -> (B, d, P)
        return (w * ((t[..., None] - lower) / width).clamp(0, 1)).sum(-1)

    for _ in range(iterations):
        middle = (low + high) / 2
        below = cdf(middle) < target
        low = torch.where(below, middle, low)
        high = torch.where(below, high, middle)
    return ((low + high) / 2).to(nodes.dtype)


def refined_window(posterior: GridPosterior, tail: float = 1e-4,
                   margin: float = 1.0) -> tuple[Tensor, Tensor]:
    """(centre (B, d), axes (B, d, d)) of the next level's window, along the coordinate
    axes: the range of all but ``tail`` of the posterior's mass (``tail`` / 2 each side;
    each cell's mass spread over its extent), widened on each side by ``margin`` cells
    (a peak narrower than a cell may sit anywhere in it)."""
    extent = 0.5 * posterior.cell.abs().sum(-1)  # (B, d) half a cell along each axis
    p = torch.tensor([tail / 2, 1 - tail / 2], dtype=torch.float64,
                     device=posterior.nodes.device)
    q = marginal_quantiles(posterior.nodes, posterior.weights, extent, p)  # (B, d, 2)
    low = q[..., 0] - 2 * margin * extent
    high = q[..., 1] + 2 * margin * extent
    return (low + high) / 2, torch.diag_embed((high - low) / 2)


def adaptive_grid_posterior(log_density: LogDensity, centre: Tensor, half_width: Tensor,
                            sizes=(32, 24), tail: float = 1e-4, margin: float = 1.0,
                            min_resolution: float = 1.0,
                            max_levels: int = 8) -> GridPosterior:
    """The posterior of B problems by a grid of ``len(sizes)`` levels, and more where a
    problem needs them.

    Level 0: the box centre +- half_width (B, d) (e.g. the prior's mean +- 4 stds),
    sizes[0] cells per axis. Level l: ``refined_window`` of level l - 1's posterior,
    sizes[l] cells per axis. Then, up to ``max_levels`` in all, the problems whose
    ``resolution`` is below ``min_resolution`` (a posterior narrower than the cells)
    take further levels of sizes[-1] cells per axis while the others keep theirs; each
    such level zooms by about sizes[-1] / 3. A level that does not at least halve a
    problem's cell volume (an axis-aligned window cannot shrink across a strongly
    correlated posterior) is that problem's last. Returns the last level of each
    problem, with its ``evaluations``.
    """
    post = grid_posterior(log_density, centre, torch.diag_embed(half_width), sizes[0])
    for n in sizes[1:]:
        evaluations = post.evaluations
        post = grid_posterior(log_density, *refined_window(post, tail, margin), n)
        post.evaluations = post.evaluations + evaluations
    stalled = torch.zeros(centre.shape[0], dtype=torch.bool, device=centre.device)
    for _ in range(len(sizes), max_levels):
        rows = ((post.resolution < min_resolution) & ~stalled).nonzero()[:, 0]
        if not len(rows):
            break
        part = _take(post, rows)
        finer = grid_posterior(log_density, *refined_window(part, tail, margin),
                               sizes[-1], rows)
        finer.evaluations = finer.evaluations + part.evaluations
        shrink = (torch.linalg.det(finer.cell.double()).abs()
                  / torch.linalg.det(part.cell.double()).abs())
        stalled[rows] = shrink > 0.5
        _put(post, finer, rows)
    return post


_PER_PROBLEM = ("cell", "log_evidence", "mean", "cov", "std", "evaluations", "resolution")
_PER_NODE = ("nodes", "log_density", "weights")


def _take(post: GridPosterior, rows: Tensor) -> GridPosterior:
    """The problems ``rows`` of a lattice level."""
    return GridPosterior(**{k: getattr(post, k)[:, rows] for k in _PER_NODE},
                         **{k: getattr(post, k)[rows] for k in _PER_PROBLEM})


def _put(post: GridPosterior, part: GridPosterior, rows: Tensor) -> None:
    """Write the problems ``rows`` of ``part`` into ``post`` (same node count)."""
    for key in _PER_NODE:
        getattr(post, key)[:, rows] = getattr(part, key)
    for key in _PER_PROBLEM:
        getattr(post, key)[rows] = getattr(part, key)


def split_grid_posterior(log_density: LogDensity, centre: Tensor, half_width: Tensor,
                         n: int = 8, rounds: int = 2, splits: int = 4) -> GridPosterior:
    """The posterior of B problems on cells refined where the mass is: level 0 is the
    box centre +- half_width (B, d) cut into n^d cells; then each of ``rounds`` rounds
    splits, per problem, the ``splits`` cells of largest posterior mass into 3^d
    children each (a third of the width; the middle child keeps the parent's node, so a
    split costs 3^d - 1 evaluations). Cells end up small where the mass is, whatever its
    shape (several narrow peaks included), and large in the tails. Cost: n^d + rounds
    splits (3^d - 1) evaluations, the same for every problem. Returns a
    ``GridPosterior`` whose ``cell`` is the smallest cell (B, d, d) and whose
    ``half_widths`` (G, B, d) are every cell's."""
    batch, dim = centre.shape
    nodes = centre[None] + unit_nodes(n, dim, centre.dtype, centre.device)[:, None] \
        * half_width[None]  # (G, B, d)
    widths = (half_width / n)[None].expand_as(nodes).clone()  # every cell's half-width
    log_p = _finite(log_density(nodes, None))
    # The children of a cell of half-width h at c: c + o 2h/3 for o in {-1, 0, 1}^d
    # except o = 0 (the parent's node), half-width h / 3.
    offsets = unit_nodes(3, dim, centre.dtype, centre.device) * 1.5
    offsets = offsets[(offsets != 0).any(-1)]  # (3^d - 1, d)
    columns = torch.arange(batch, device=centre.device)
    for _ in range(rounds):
        log_mass = log_p + torch.log(2 * widths.double()).sum(-1)
        top = log_mass.topk(min(splits, log_mass.shape[0]), dim=0).indices  # (M, B)
        parent, child = nodes[top, columns], widths[top, columns] / 3  # (M, B, d)
        children = (parent[:, None] + offsets[None, :, None, :] * (2 * child)[:, None])
        children = children.reshape(-1, batch, dim)  # (M (3^d - 1), B, d)
        widths[top, columns] = child
        nodes = torch.cat([nodes, children])
        widths = torch.cat([widths, child[:, None].expand(-1, len(offsets), -1, -1)
                            .reshape(-1, batch, dim)])
        log_p = torch.cat([log_p, _finite(log_density(children, None))])
    log_mass = log_p + torch.log(2 * widths.double()).sum(-1)
    w, total, mean, cov, std = _moments(nodes, log_mass)
    smallest = torch.diag_embed(2 * widths.min(0).values)
    evaluations = torch.full((batch,), nodes.shape[0], device=centre.device)
    return GridPosterior(nodes, log_p, w, smallest, total, mean, cov, std, evaluations,
                         _resolution(cov, smallest), widths)
