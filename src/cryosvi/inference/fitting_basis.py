"""The fitting bases of ``cryosvi learn-modes``: the spaces in which each particle's
displacement from the structure is fitted before the directions are learnt.

Orthonormal 3N-vectors in the modes' amplitude units (Å RMS per pseudo-atom): the rigid
motions of compact blocks of pseudo-atoms (k-means of their positions, or contiguous
segments of the chain), or a reference's ANM modes and the 6 rigid motions of the whole.
"""

from __future__ import annotations

import numpy as np

from cryosvi.physics.anm import rigid_basis
from cryosvi.reference import Reference

BASES = ("blocks", "segments", "anm")
"""learn-modes' fitting bases: the rigid motions of k-means blocks of pseudo-atoms
(``rigid_blocks``), of segments of the chain (``sequence_blocks``), or the reference's
modes and the rigid motions; its ``--basis auto`` tries each."""


def rigid_blocks(coords: np.ndarray, n_blocks: int, restarts: int = 10) -> np.ndarray:
    """(N,) int labels 0..n_blocks-1: the pseudo-atoms split into ``n_blocks`` compact
    blocks by k-means of their positions (scipy's k-means++, the lowest within-block sum
    of squares of ``restarts`` seeded runs: deterministic, no global random state)."""
    from scipy.cluster.vq import kmeans2

    coords = np.asarray(coords, np.float64)
    if not 1 <= n_blocks <= len(coords) // 3:
        raise ValueError(f"{n_blocks} blocks: the {len(coords)} pseudo-atoms make at most "
                         f"{len(coords) // 3} blocks of 3")
    best, labels = np.inf, None
    for seed in range(restarts):
        centres, found = kmeans2(coords, n_blocks, seed=seed, minit="++")
        spread = float(np.square(coords - centres[found]).sum())
        if spread < best and np.bincount(found, minlength=n_blocks).min() >= 3:
            best, labels = spread, found
    if labels is None:
        raise ValueError(f"no split of the {len(coords)} pseudo-atoms into {n_blocks} "
                         "blocks of at least 3")
    return labels


def sequence_blocks(coords: np.ndarray, n_blocks: int) -> np.ndarray:
    """(N,) int labels 0..n_blocks-1, non-decreasing: the pseudo-atoms, in chain order,
    cut into ``n_blocks`` segments of at least 3 that are contiguous in sequence, with
    the lowest within-segment sum of squares of the positions (exact, by dynamic
    programming over the cut points: Bellman 1961, Commun. ACM 4: 284). Domains are
    mostly stretches of the chain, which k-means of the positions does not know."""
    x = np.asarray(coords, np.float64)
    n = len(x)
    if not 1 <= n_blocks <= n // 3:
        raise ValueError(f"{n_blocks} blocks: the {n} pseudo-atoms make at most "
                         f"{n // 3} blocks of 3")
    sums = np.concatenate([np.zeros((1, 3)), np.cumsum(x, 0)])
    squares = np.concatenate([[0.0], np.cumsum(np.square(x).sum(1))])
    cost = np.full((n_blocks + 1, n + 1), np.inf)  # of the first j atoms in m segments
    cut = np.zeros((n_blocks + 1, n + 1), int)
    cost[0, 0] = 0.0
    for m in range(1, n_blocks + 1):
        for j in range(3 * m, n + 1):
            i = np.arange(3 * (m - 1), j - 2)  # the segment i..j-1
            within = squares[j] - squares[i] - np.square(sums[j] - sums[i]).sum(1) / (j - i)
            total = cost[m - 1, i] + within
            cut[m, j] = i[np.argmin(total)]
            cost[m, j] = total.min()
    labels, end = np.zeros(n, int), n
    for m in range(n_blocks, 0, -1):
        labels[cut[m, end]:end] = m - 1
        end = cut[m, end]
    return labels


def _orthonormal_rows(vectors: np.ndarray, n_atoms: int) -> np.ndarray:
    """(D, N, 3): an orthonormal basis of the span of the rows of ``vectors`` (m, 3N),
    in the order of the rows (Gram-Schmidt by QR), dropping rows in the span of earlier
    ones."""
    q, r = np.linalg.qr(vectors.T)
    diagonal = np.abs(np.diagonal(r))
    keep = diagonal > 1e-8 * diagonal.max()
    q = q * np.sign(np.diagonal(r))  # keep each input vector's orientation
    return q[:, keep].T.reshape(int(keep.sum()), n_atoms, 3)


def fitting_basis(reference: Reference, blocks: int | None = None,
                  contiguous: bool = False) -> np.ndarray:
    """(D, N, 3) float64, orthonormal as 3N-vectors in the modes' amplitude units.

    ``blocks`` None: the reference's K modes and the 6 rigid motions of its pseudo-atoms
    (D = K + 6). ``blocks`` B: the rigid motions of each of B compact blocks of
    pseudo-atoms (``rigid_blocks``, or with ``contiguous`` ``sequence_blocks``; D = 6 B),
    the rotation-translation-block basis of Tama et al. (2000, Proteins 41: 1) with
    blocks from the geometry: a domain moving as a body (a hinge, most open-closed
    changes) is in its span when the blocks follow the domains, and the whole molecule's
    rigid motions are too.
    """
    n_atoms = reference.n_atoms
    if blocks is None:
        rows = [np.asarray(reference.modes, np.float64).reshape(reference.n_modes, -1),
                rigid_basis(reference.coords).T]
    else:
        labels = (sequence_blocks if contiguous else rigid_blocks)(reference.coords, blocks)
        rows = []
        for block in range(blocks):
            inside = labels == block
            motions = rigid_basis(reference.coords[inside])  # (3 n_b, 6)
            full = np.zeros((n_atoms, 3, motions.shape[1]))
            full[inside] = motions.reshape(int(inside.sum()), 3, -1)
            rows.append(full.reshape(3 * n_atoms, -1).T)
    return _orthonormal_rows(np.concatenate(rows), n_atoms)
