"""Probabilistic PCA of noisy estimates with a known covariance each. Nothing here knows
about cryo-EM.

Each of n items has an estimate m_i (D,) of an unknown point z_i with a Gaussian error of
known covariance C_i (D, D) (e.g. a Laplace posterior). The points are modelled as
z_i = centre + W a_i with a_i ~ N(0, I_k): a k-dimensional linear subspace. Then

    m_i ~ N(centre, W W^T + C_i),

the probabilistic PCA of Tipping & Bishop (1999, J. R. Stat. Soc. B 61: 611) with the
isotropic noise sigma^2 I replaced by each item's own C_i ("heteroscedastic" PPCA). With
C_i = sigma^2 I for every item the maximum-likelihood W has the closed form W W^T =
U_k (Lambda_k - sigma^2 I) U_k^T (U_k, Lambda_k: the leading eigenvectors and eigenvalues of
the sample covariance); with unequal C_i there is none, and ``principal_directions``
maximises the likelihood numerically (L-BFGS on W and the centre, float64). Items that
say little about a direction (a large C_i along it) then count little for it, which a
PCA of the raw estimates cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal


@dataclass
class PrincipalDirections:
    """directions (k, D): orthonormal rows, by decreasing std; std (k,): the spread of
    the points along each (W W^T = directions^T diag(std^2) directions); centre (D,);
    log_likelihood: of the estimates under the model (float); converged: whether L-BFGS
    stopped on its tolerance rather than its iteration limit."""

    directions: Tensor
    std: Tensor
    centre: Tensor
    log_likelihood: float
    converged: bool

    def coordinates(self, estimates: Tensor, covariances: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean (n, k) and covariance (n, k, k) of each item's a_i (in units
        of std along each direction) given its estimate and covariance."""
        factor = (self.directions.T * self.std).to(estimates)  # W (D, k)
        total = factor @ factor.T + covariances  # (n, D, D)
        gain = torch.linalg.solve(total, factor.expand(len(estimates), *factor.shape))
        # a | m ~ N(W^T S^-1 (m - c), I - W^T S^-1 W)  (S = W W^T + C)
        residual = (estimates - self.centre.to(estimates))[..., None]
        mean = (gain.transpose(1, 2) @ residual)[..., 0]
        covariance = torch.eye(factor.shape[1], dtype=factor.dtype) - factor.T @ gain
        return mean, covariance


def _negative_log_likelihood(factor: Tensor, centre: Tensor, estimates: Tensor,
                             covariances: Tensor, weights: Tensor | None = None) -> Tensor:
    """-sum_i w_i log N(m_i; centre, W W^T + C_i) (w_i = 1 without ``weights``)."""
    total = factor @ factor.T + covariances
    log_p = MultivariateNormal(centre, covariance_matrix=total).log_prob(estimates)
    return -(log_p if weights is None else weights * log_p).sum()


def principal_directions(estimates: Tensor, covariances: Tensor, k: int = 1,
                         max_iterations: int = 500,
                         weights: Tensor | None = None) -> PrincipalDirections:
    """The maximum-likelihood k-dimensional subspace of the points behind ``estimates``
    (n, D) with error covariances ``covariances`` (n, D, D) (symmetric positive definite).
    Starts from the PCA of the estimates with the mean error covariance subtracted.
    Direction signs: the largest component of each is positive. ``weights`` (n,) >= 0:
    each item's log-likelihood counts that much (e.g. 1 - the probability that the item
    is not of the population: a weighted likelihood, so an item of weight 0 has no
    say); None: all 1."""
    m = estimates.detach().double()
    c = covariances.detach().double()
    c = 0.5 * (c + c.transpose(1, 2))
    n, dim = m.shape
    if not 1 <= k <= dim:
        raise ValueError(f"k must be 1..{dim}, got {k}")
    if n < 2 or c.shape != (n, dim, dim):
        raise ValueError(f"need n >= 2 estimates (n, D) and covariances (n, D, D), got "
                         f"{tuple(m.shape)} and {tuple(c.shape)}")
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w is not None and (w.shape != (n,) or not bool(torch.isfinite(w).all())
                          or bool((w < 0).any()) or not float(w.sum()) > 0):
        raise ValueError(f"weights must be (n,) finite, >= 0 and not all 0, got {w}")
    share = torch.full((n,), 1.0 / n, dtype=torch.float64) if w is None else w / w.sum()
    centre = (share[:, None] * m).sum(0)
    spread = (m - centre).T @ (share[:, None] * (m - centre)) \
        - (share[:, None, None] * c).sum(0)
    values, vectors = torch.linalg.eigh(0.5 * (spread + spread.T))
    scale = values.flip(0)[:k].clamp_min(1e-6 * float(values.abs().max()) + 1e-12).sqrt()
    factor = (vectors.flip(1)[:, :k] * scale).contiguous().requires_grad_(True)
    centre = centre.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([factor, centre], max_iter=max_iterations,
                                  tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = _negative_log_likelihood(factor, centre, m, c, w) / n
        loss.backward()
        return loss

    optimiser.step(closure)
    iterations = optimiser.state[factor]["n_iter"]
    with torch.no_grad():
        loss = float(_negative_log_likelihood(factor, centre, m, c, w))
        u, s, _ = torch.linalg.svd(factor, full_matrices=False)  # W = U S V^T
        directions = u.T
        flip = torch.where(directions.gather(1, directions.abs().argmax(1, keepdim=True))
                           < 0, -1.0, 1.0).to(directions)
        directions = directions * flip
    return PrincipalDirections(directions, s, centre.detach(), -loss,
                               iterations < max_iterations)
