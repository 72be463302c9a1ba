"""Anisotropic network model (ANM) normal modes of pseudo-atoms.

Model (Atilgan et al. 2001, Biophys J 80:505; the paper's appendix): every pair of
pseudo-atoms closer than a cutoff (15 Å) is joined by a Hookean spring of constant gamma,

    U = gamma / 2 * sum_{i<j, |r0_ij| <= cutoff} (|r_ij| - |r0_ij|)^2 .

Its Hessian at the reference structure has, for i != j within the cutoff, the 3x3 block

    H_ij = -gamma * r_ij r_ij^T / |r_ij|^2 ,      r_ij = r_j - r_i (Å),

and H_ii = -sum_{j != i} H_ij, so every block row sums to zero. Its six zero eigenvalues
are rigid translations and rotations; they are dropped. The remaining lowest eigenvectors
u_m (K, N, 3) are orthonormal as 3N-vectors, ascending in eigenvalue (units of gamma).

Amplitudes: cryosvi gives mode amplitudes alpha_m in Å of RMS displacement per
pseudo-atom, so a deformation is coords + sqrt(N) * sum_m alpha_m u_m (a unit 3N-vector
spread over N atoms moves each by 1/sqrt(N) Å RMS).

Solvers. Up to ``DENSE_MAX_ATOMS`` pseudo-atoms: the dense Hessian and LAPACK ``eigh``
on an index subset. Beyond: a block-sparse (BSR) Hessian and ARPACK Lanczos
(``scipy.sparse.linalg.eigsh``, smallest algebraic). In both the rigid-body subspace R,
known in closed form, is lifted out of the way, H' = H + c R R^T with c above the
spectrum, so only internal modes are computed. (Shift-invert eigsh was measured and
rejected for large N: the sparse LU of a 3D network with ~100 neighbours per atom fills
in badly; at 5000 atoms it took 36 s and 1.5 GB, extrapolating to minutes and several GB
at 10^4, while Lanczos on H' takes ~10-20 s and ~0.5 GB there.) Remaining zero
eigenvalues of H' mean extra zero modes of H (a network in disconnected pieces, or
floppy atoms with fewer than 3 springs, as at chain ends when the cutoff is short or
the stride long): they are kept, with a warning, since they are internal motions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
from scipy.spatial import cKDTree

from cryosvi.errors import CryosviError

#: above this many pseudo-atoms the sparse solver is used (a dense 3N x 3N Hessian is
#: 72 MB at N = 1000 and eigh takes ~1 s there; Lanczos is already faster).
DENSE_MAX_ATOMS = 1000

#: eigenvalues below ZERO_TOLERANCE * (spectral bound) count as zero; numerically zero
#: modes come out ~1e-14 of it, the lowest real mode of a 10^4-atom globule ~3e-3.
ZERO_TOLERANCE = 1e-8

#: rigid-body degrees of freedom in 3D
N_RIGID = 6


@dataclass(frozen=True)
class NormalModes:
    """The K lowest internal ANM modes of N pseudo-atoms.

    eigenvalues: (K,) float64, ascending, in the units of gamma (spring constant,
        energy / Å^2; gamma = 1 by default).
    vectors: (K, N, 3) float64, orthonormal as 3N-vectors, sign fixed so that each
        vector's largest-magnitude component is positive. Apply as
        ``coords + sqrt(N) * alpha @ vectors`` with alpha in Å RMS per pseudo-atom.
    """

    eigenvalues: np.ndarray
    vectors: np.ndarray

    @property
    def n_modes(self) -> int:
        return self.eigenvalues.shape[0]


def _check_coords(coords) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] < 3:
        raise CryosviError(f"coordinates must be (N, 3) with N >= 3, got shape {coords.shape}")
    if not np.all(np.isfinite(coords)):
        raise CryosviError("coordinates contain NaN or infinity")
    return coords


def _contact_blocks(coords: np.ndarray, cutoff: float, gamma: float):
    """Pairs i < j with |r_ij| <= cutoff, (P, 2) int, and their off-diagonal Hessian
    blocks -gamma r r^T / |r|^2, (P, 3, 3), plus the diagonal blocks (N, 3, 3)."""
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise CryosviError(f"cutoff must be a finite number > 0 Å, got {cutoff}")
    if not (np.isfinite(gamma) and gamma > 0):
        raise CryosviError(f"gamma must be a finite number > 0, got {gamma}")
    pairs = cKDTree(coords).query_pairs(cutoff, output_type="ndarray")
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # deterministic order
    i, j = pairs[:, 0], pairs[:, 1]
    r = coords[j] - coords[i]
    r2 = np.einsum("pd,pd->p", r, r)
    if np.any(r2 == 0):
        k = int(np.argmax(r2 == 0))
        raise CryosviError(f"pseudo-atoms {i[k]} and {j[k]} have identical coordinates")
    off = -gamma * r[:, :, None] * r[:, None, :] / r2[:, None, None]
    diagonal = np.zeros((coords.shape[0], 3, 3))
    np.add.at(diagonal, i, -off)
    np.add.at(diagonal, j, -off)
    return pairs, off, diagonal


def anm_hessian(coords, cutoff: float = 15.0, gamma: float = 1.0, sparse: bool | None = None):
    """The ANM Hessian (3N, 3N) of ``coords`` (N, 3) Å; see the module docstring.

    ``sparse``: None picks dense for N <= DENSE_MAX_ATOMS; True gives a
    ``scipy.sparse.bsr_array`` with 3x3 blocks (about 9 * (2 * pairs + N) numbers), False
    a dense ndarray. Entries are in the units of gamma; row index 3 i + d is atom i, axis d.
    """
    coords = _check_coords(coords)
    n = coords.shape[0]
    pairs, off, diagonal = _contact_blocks(coords, float(cutoff), float(gamma))
    if sparse is None:
        sparse = n > DENSE_MAX_ATOMS
    if not sparse:
        hessian = np.zeros((n, 3, n, 3))
        # advanced indices on axes 0 and 2 put the pair axis first: (P, 3, 3) per side
        hessian[pairs[:, 0], :, pairs[:, 1], :] = off
        hessian[pairs[:, 1], :, pairs[:, 0], :] = off  # r r^T is symmetric
        hessian[np.arange(n), :, np.arange(n), :] = diagonal
        return hessian.reshape(3 * n, 3 * n)
    # block CSR: both triangles plus the diagonal, sorted by (row, column)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    order = np.lexsort((cols, rows))
    blocks = np.concatenate([off, off, diagonal])[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return scipy.sparse.bsr_array((blocks, cols[order], indptr), shape=(3 * n, 3 * n),
                                  blocksize=(3, 3))


def rigid_basis(coords) -> np.ndarray:
    """Orthonormal basis (3N, r) of the rigid motions of ``coords`` (N, 3): translations
    and infinitesimal rotations about the centroid; r = 6 (5 for collinear atoms)."""
    coords = np.asarray(coords, dtype=np.float64)
    centred = coords - coords.mean(axis=0)
    motions = np.zeros((6, coords.shape[0], 3))
    for axis in range(3):
        motions[axis, :, axis] = 1.0
        motions[3 + axis] = np.cross(np.eye(3)[axis], centred)
    u, s, _ = np.linalg.svd(motions.reshape(6, -1).T, full_matrices=False)
    return u[:, s > 1e-10 * s[0]]


def _spectral_bound(hessian) -> float:
    """An upper bound on the largest eigenvalue (Gershgorin: max absolute row sum)."""
    if scipy.sparse.issparse(hessian):
        return float(abs(hessian).sum(axis=1).max())
    return float(np.abs(hessian).sum(axis=1).max())


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each row so that its largest-magnitude component is positive."""
    largest = vectors[np.arange(vectors.shape[0]), np.argmax(np.abs(vectors), axis=1)]
    return vectors * np.where(largest < 0, -1.0, 1.0)[:, None]


def anm_modes(coords, n_modes: int = 10, cutoff: float = 15.0, gamma: float = 1.0,
              method: str = "auto") -> NormalModes:
    """The ``n_modes`` lowest internal ANM modes of ``coords`` (N, 3) Å.

    cutoff: spring cutoff, Å (pairs with distance <= cutoff are joined). gamma: spring
    constant. method: "auto" (dense up to DENSE_MAX_ATOMS atoms, sparse above), "dense"
    or "sparse". Rigid motions are removed; if the Hessian has other than 6 zero modes a
    RuntimeWarning says so (the extra zero modes, e.g. parts of the structure with no
    spring between them, come first among the returned modes, eigenvalue ~0).
    Raises CryosviError unless 1 <= n_modes <= 3N - 6.
    """
    coords = _check_coords(coords)
    n = coords.shape[0]
    if isinstance(n_modes, bool) or not isinstance(n_modes, (int, np.integer)) or n_modes < 1:
        raise CryosviError(f"number of modes must be an integer >= 1, got {n_modes!r}")
    if n_modes > 3 * n - N_RIGID:
        raise CryosviError(f"{n} pseudo-atoms have only 3N - 6 = {3 * n - N_RIGID} internal "
                           f"modes, {n_modes} requested")
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"method must be 'auto', 'dense' or 'sparse', got {method!r}")
    sparse = n > DENSE_MAX_ATOMS if method == "auto" else method == "sparse"
    hessian = anm_hessian(coords, cutoff, gamma, sparse=sparse)
    rigid = rigid_basis(coords)
    # lift the rigid subspace (an exact null space of H) above the whole spectrum
    # (Gershgorin bound, with a margin so that no internal eigenvalue ties with it)
    lift = 1.5 * max(_spectral_bound(hessian), gamma)
    if not sparse:
        eigenvalues, vectors = scipy.linalg.eigh(
            hessian + lift * rigid @ rigid.T, subset_by_index=[0, n_modes - 1])
    else:
        def matvec(v):
            v = v.ravel()
            return hessian @ v + lift * (rigid @ (rigid.T @ v))

        operator = scipy.sparse.linalg.LinearOperator(hessian.shape, matvec=matvec,
                                                      dtype=np.float64)
        # fixed start vector: reproducible runs; outside the rigid space by construction
        start = np.random.default_rng(0).standard_normal(3 * n)
        start -= rigid @ (rigid.T @ start)
        # a Krylov space larger than the default 2k + 1 means fewer restarts (measured ~2x
        # faster at 10^4 atoms); tol bounds residuals by 1e-10 |lambda|
        ncv = min(3 * n, max(2 * n_modes + 1, n_modes + 40))
        eigenvalues, vectors = scipy.sparse.linalg.eigsh(
            operator, k=n_modes, which="SA", ncv=ncv, v0=start, tol=1e-10)
        order = np.argsort(eigenvalues)
        eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    n_zero = rigid.shape[1] + int(np.sum(eigenvalues < ZERO_TOLERANCE * lift))
    if n_zero != N_RIGID:
        more = " at least" if n_zero - rigid.shape[1] == n_modes else ""
        warnings.warn(
            f"the elastic network has{more} {n_zero} zero modes, expected 6: within the "
            f"{cutoff:g} Å cutoff, parts of the structure are not joined by springs or some "
            "atoms have too few springs to be held (or the atoms are collinear); the "
            "extra zero modes come first among the returned modes; increase the cutoff",
            RuntimeWarning, stacklevel=2)
    vectors = _fix_signs(vectors.T)
    return NormalModes(eigenvalues=eigenvalues, vectors=vectors.reshape(n_modes, n, 3))


def write_mode_movie(coords, vectors, directory, amplitude: float = 2.0, n_frames: int = 20,
                     residue_names=None, residue_numbers=None, chain: str = "A") -> list[Path]:
    """Write one multi-model CA-only PDB per mode, ``directory/mode_01.pdb``, ...

    coords: (N, 3) Å (pass the file frame, ``atoms.coords + atoms.centroid``, to overlay
    the original structure). vectors: (K, N, 3) orthonormal modes. Frame f of mode m is
    coords + a_f sqrt(N) u_m with a_f = amplitude * sin(2 pi f / n_frames): amplitude in
    Å of RMS displacement per pseudo-atom, one smooth period, so the movie loops (ChimeraX:
    ``open mode_01.pdb coordsets true; coordset #1 loop 20``; PyMOL plays the states).
    residue_names / residue_numbers: per atom (default ALA, 1..N). Returns the paths.
    """
    coords = _check_coords(coords)
    vectors = np.asarray(vectors, dtype=np.float64)
    n = coords.shape[0]
    if vectors.ndim == 2:
        vectors = vectors[None]
    if vectors.shape[1:] != (n, 3):
        raise CryosviError(f"mode vectors must be (K, {n}, 3), got {vectors.shape}")
    if not (np.isfinite(amplitude) and amplitude >= 0):
        raise CryosviError(f"movie amplitude must be a finite number >= 0 Å, got {amplitude}")
    if n_frames < 2:
        raise CryosviError(f"a movie needs at least 2 frames, got {n_frames}")
    import gemmi

    names = list(residue_names) if residue_names is not None else ["ALA"] * n
    numbers = (np.asarray(residue_numbers) if residue_numbers is not None
               else np.arange(1, n + 1))
    chain = chain if 1 <= len(chain) <= 2 else "A"  # PDB has room for 2 characters
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    options = gemmi.PdbWriteOptions()
    options.cryst1_record = False  # no unit cell: a fake 1 Å cell confuses viewers
    paths = []
    for m, vector in enumerate(vectors):
        structure = gemmi.Structure()
        for f in range(n_frames):
            a = amplitude * np.sin(2 * np.pi * f / n_frames)
            frame = coords + a * np.sqrt(n) * vector
            model = gemmi.Model(str(f + 1))
            model_chain = gemmi.Chain(chain)
            for i in range(n):
                residue = gemmi.Residue()
                residue.name = names[i]
                residue.seqid = gemmi.SeqId(int(numbers[i]), " ")
                residue.het_flag = "A"
                atom = gemmi.Atom()
                atom.name = "CA"
                atom.element = gemmi.Element("C")
                atom.pos = gemmi.Position(*frame[i])
                atom.occ = 1.0
                atom.b_iso = 0.0
                residue.add_atom(atom)
                model_chain.add_residue(residue)
            model.add_chain(model_chain)
            structure.add_model(model)
        structure.setup_entities()
        path = directory / f"mode_{m + 1:02d}.pdb"
        structure.write_pdb(str(path), options)
        paths.append(path)
    return paths
