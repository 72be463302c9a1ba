"""ANM Hessian and modes against independent references: ProDy's ANM (Hessian, eigenvalues,
eigenvectors), the autograd Hessian of the spring energy, and the dense solver for the
sparse one. The 10^4-atom timing is marked slow."""

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import prody
import pytest
import scipy.sparse
import torch

from cryosvi.physics.anm import (DENSE_MAX_ATOMS, anm_hessian, anm_modes, rigid_basis,
                         write_mode_movie)
from cryosvi.errors import CryosviError
from cryosvi.physics.structure import default_structure_path, load_pseudo_atoms

prody.confProDy(verbosity="none")
UBQ = "/work/shared/data/1ubq.pdb"


def globule(n, spacing=5.0, seed=0):
    """A protein-like compact blob of n points (N, 3) Å: a jittered cubic lattice inside an
    ellipsoid. Spacing 5 Å gives 0.008 atoms / Å^3, ~110 neighbours within 15 Å, a bit
    denser than the CA atoms of 1OL5's core (~0.007 / Å^3, <= 91 neighbours)."""
    rng = np.random.default_rng(seed)
    m = int(np.ceil((n * 3 / (4 * np.pi)) ** (1 / 3))) + 3
    grid = np.arange(-m, m + 1) * spacing
    points = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    radius = np.linalg.norm(points / [1.0, 1.2, 0.8], axis=1)
    points = points[np.argsort(radius, kind="stable")[:n]]
    return points + rng.uniform(-0.8, 0.8, points.shape)


def cubic_lattice(side=6, spacing=4.0):
    """A perfect cube of side^3 points: its modes come in degenerate pairs and triples."""
    grid = np.arange(side) * spacing
    return np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)


def prody_modes(coords, n_modes, cutoff=15.0, gamma=1.0):
    anm = prody.ANM()
    anm.buildHessian(coords, cutoff=cutoff, gamma=gamma)
    anm.calcModes(n_modes=n_modes, zeros=False)
    return anm.getEigvals(), anm.getEigvecs().T, anm.getHessian()


def assert_same_modes(values, vectors, ref_values, ref_vectors, rtol=1e-6, overlap=0.999):
    """Eigenvalues to rtol; eigenvectors by |u . u_ref| > overlap, or, within a group of
    degenerate eigenvalues, every singular value of U^T U_ref > overlap (same subspace).
    ref_* may hold more modes than values/vectors, so a group cut off at the end of the
    compared list is still matched against its whole reference subspace."""
    k = len(values)
    vectors = vectors.reshape(k, -1)
    np.testing.assert_allclose(values, ref_values[:k], rtol=rtol)
    start = 0
    while start < k:
        stop = start + 1
        while stop < k and ref_values[stop] - ref_values[start] < 1e-7 * ref_values[start]:
            stop += 1
        group = np.abs(ref_values - ref_values[start]) < 1e-7 * ref_values[start]
        singular = np.linalg.svd(vectors[start:stop] @ ref_vectors[group].T, compute_uv=False)
        assert singular.min() > overlap, (start, stop, singular)
        start = stop


@pytest.fixture(scope="module")
def ol5():
    return load_pseudo_atoms(default_structure_path(), chain="A", stride=2).coords


@pytest.fixture(scope="module")
def ol5_full():
    return load_pseudo_atoms(default_structure_path(), chain="A", stride=1).coords


def spring_energy(flat, reference, cutoff, gamma):
    x = flat.reshape(-1, 3)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    r0 = torch.linalg.norm(reference[j] - reference[i], dim=1)
    r = torch.linalg.norm(x[j] - x[i], dim=1)
    keep = r0 <= cutoff
    return gamma / 2 * torch.sum((r[keep] - r0[keep]) ** 2)


def test_hessian_is_the_second_derivative_of_the_spring_energy():
    coords = load_pseudo_atoms(UBQ, stride=3).coords  # 26 atoms: springs in and out
    reference = torch.tensor(coords)
    for cutoff, gamma in ((15.0, 1.0), (9.0, 2.5)):
        expected = torch.autograd.functional.hessian(
            lambda flat: spring_energy(flat, reference, cutoff, gamma), reference.flatten())
        dense = anm_hessian(coords, cutoff, gamma, sparse=False)
        np.testing.assert_allclose(dense, expected.numpy(), atol=1e-10)
        sparse = anm_hessian(coords, cutoff, gamma, sparse=True)
        assert scipy.sparse.issparse(sparse)
        np.testing.assert_allclose(sparse.toarray(), dense, atol=1e-14)
        # rigid motions cost nothing
        np.testing.assert_allclose(dense @ rigid_basis(coords), 0, atol=1e-10)


@pytest.mark.parametrize("cutoff,gamma", [(15.0, 1.0), (10.0, 2.5)])
def test_hessian_matches_prody(ol5, cutoff, gamma):
    _, _, reference = prody_modes(ol5, 3, cutoff, gamma)
    np.testing.assert_allclose(anm_hessian(ol5, cutoff, gamma), reference, atol=1e-12)


def test_hessian_switches_to_sparse_for_large_systems(ol5):
    assert isinstance(anm_hessian(ol5), np.ndarray)
    large = anm_hessian(globule(DENSE_MAX_ATOMS + 1))
    assert scipy.sparse.issparse(large) and large.shape == (3 * DENSE_MAX_ATOMS + 3,) * 2


@pytest.mark.parametrize("structure,stride,cutoff,gamma", [
    ("1ol5", 2, 15.0, 1.0), ("1ol5", 1, 15.0, 1.0), ("1ubq", 1, 15.0, 1.0),
    ("1ol5", 1, 10.0, 2.5)])
def test_modes_match_prody(structure, stride, cutoff, gamma):
    path = default_structure_path() if structure == "1ol5" else UBQ
    coords = load_pseudo_atoms(path, stride=stride).coords
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a connected protein: no zero-mode warning
        modes = anm_modes(coords, n_modes=20, cutoff=cutoff, gamma=gamma)
    ref_values, ref_vectors, _ = prody_modes(coords, 26, cutoff, gamma)
    assert modes.vectors.shape == (20, len(coords), 3)
    assert_same_modes(modes.eigenvalues, modes.vectors, ref_values, ref_vectors)


def test_degenerate_modes_match_prody_as_subspaces():
    coords = cubic_lattice()
    ref_values, ref_vectors, _ = prody_modes(coords, 30, cutoff=9.0)
    assert np.sum(np.diff(ref_values[:20]) < 1e-9) >= 8  # the test needs degeneracy
    for method in ("dense", "sparse"):
        modes = anm_modes(coords, n_modes=20, cutoff=9.0, method=method)
        assert_same_modes(modes.eigenvalues, modes.vectors, ref_values, ref_vectors)


def test_sparse_path_agrees_with_dense(ol5_full):
    dense = anm_modes(ol5_full, n_modes=12, method="dense")
    sparse = anm_modes(ol5_full, n_modes=12, method="sparse")
    np.testing.assert_allclose(sparse.eigenvalues, dense.eigenvalues, rtol=1e-9)
    # same sign convention, so the vectors themselves agree, not only up to sign
    np.testing.assert_allclose(sparse.vectors, dense.vectors, atol=1e-7)


def test_modes_are_orthonormal_ascending_eigenvectors_with_fixed_sign(ol5):
    modes = anm_modes(ol5, n_modes=15)
    flat = modes.vectors.reshape(15, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(15), atol=1e-12)
    assert np.all(np.diff(modes.eigenvalues) > 0) and modes.eigenvalues[0] > 1e-3
    hessian = anm_hessian(ol5)
    np.testing.assert_allclose(hessian @ flat.T, flat.T * modes.eigenvalues, atol=1e-10)
    np.testing.assert_allclose(flat @ rigid_basis(ol5), 0, atol=1e-10)
    largest = flat[np.arange(15), np.argmax(np.abs(flat), axis=1)]
    assert np.all(largest > 0)
    # same answer whichever way the molecule is turned: eigenvalues are invariant
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    turned = anm_modes(ol5 @ rotation.T, n_modes=15)
    np.testing.assert_allclose(turned.eigenvalues, modes.eigenvalues, rtol=1e-9)
    for method in ("dense", "sparse"):
        first = anm_modes(ol5, 5, method=method)
        again = anm_modes(ol5, 5, method=method)
        np.testing.assert_array_equal(first.vectors, again.vectors)


def test_disconnected_network_warns_and_keeps_internal_zero_modes():
    one = load_pseudo_atoms(UBQ, stride=2).coords
    two = np.concatenate([one, one + [200.0, 0, 0]])  # far beyond the 15 Å cutoff
    with pytest.warns(RuntimeWarning, match="12 zero modes, expected 6"):
        modes = anm_modes(two, n_modes=10)
    np.testing.assert_allclose(modes.eigenvalues[:6], 0, atol=1e-9)
    flat = modes.vectors.reshape(10, -1)
    np.testing.assert_allclose(flat @ rigid_basis(two), 0, atol=1e-9)  # not global rigid
    single = anm_modes(one, n_modes=2).eigenvalues
    np.testing.assert_allclose(modes.eigenvalues[6:], np.repeat(single, 2), rtol=1e-8)


def test_bad_input_raises(ol5):
    n = len(ol5)
    for kwargs, pattern in [
        (dict(n_modes=0), ">= 1"), (dict(n_modes=3 * n - 5), "3N - 6"),
        (dict(cutoff=0.0), "cutoff"), (dict(gamma=-1.0), "gamma")]:
        with pytest.raises(CryosviError, match=pattern):
            anm_modes(ol5, **kwargs)
    with pytest.raises(CryosviError, match="identical"):
        anm_modes(np.concatenate([ol5, ol5[:1]]))
    with pytest.raises(CryosviError, match="shape"):
        anm_modes(ol5[:, :2])
    assert anm_modes(globule(10), n_modes=24).n_modes == 24  # 3N - 6 is the most there is


def test_mode_movie_amplitude_in_angstrom_rms(tmp_path, ol5):
    modes = anm_modes(ol5, n_modes=2)
    names = ["GLY"] * len(ol5)
    paths = write_mode_movie(ol5 + 100.0, modes.vectors, tmp_path / "movie", amplitude=3.0,
                             n_frames=8, residue_names=names)
    assert [p.name for p in paths] == ["mode_01.pdb", "mode_02.pdb"]
    for path, vector in zip(paths, modes.vectors):
        movie = prody.parsePDB(str(path))  # an independent reader
        frames = movie.getCoordsets()
        assert frames.shape == (8, len(ol5), 3) and set(movie.getResnames()) == {"GLY"}
        np.testing.assert_allclose(frames[0], ol5 + 100.0, atol=1e-3)
        displacement = frames[2] - frames[0]  # sin(2 pi 2 / 8) = 1: the peak
        rms = np.sqrt(np.mean(np.sum(displacement ** 2, axis=1)))
        assert abs(rms - 3.0) < 2e-3
        np.testing.assert_allclose(displacement / (3.0 * np.sqrt(len(ol5))), vector, atol=1e-3)
        np.testing.assert_allclose(frames[6] - frames[0], -displacement, atol=2e-3)
    assert "CRYST1" not in paths[0].read_text()
    # and our own reader takes the first model back
    back = load_pseudo_atoms(paths[0])
    np.testing.assert_allclose(back.coords + back.centroid, ol5 + 100.0, atol=1e-3)


SLOW_SCRIPT = textwrap.dedent("""
    import json, re, sys, time, warnings
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_anm import globule
    from cryosvi.physics.anm import anm_hessian, anm_modes
    coords = globule(10_000)
    warnings.simplefilter("error")
    start = time.perf_counter()
    modes = anm_modes(coords, n_modes=10)
    seconds = time.perf_counter() - start
    # VmHWM: this process's own peak (ru_maxrss after vfork + exec may hold pytest's)
    status = open("/proc/self/status").read()
    peak = int(re.search(r"^VmHWM:\\s+(\\d+) kB", status, re.M).group(1)) / 1024
    flat = modes.vectors.reshape(10, -1)
    residual = anm_hessian(coords) @ flat.T - flat.T * modes.eigenvalues
    print(json.dumps(dict(seconds=seconds, peak_mb=peak,
        eigenvalues=modes.eigenvalues.tolist(),
        residual=float(np.max(np.linalg.norm(residual, axis=0) / modes.eigenvalues)),
        orthonormality=float(np.abs(flat @ flat.T - np.eye(10)).max()))))
""")


@pytest.mark.slow
def test_ten_thousand_atoms_in_bounded_memory():
    """In a fresh process, so that its peak is this computation's (the time is printed,
    not asserted: speed belongs to benchmarks)."""
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", SLOW_SCRIPT, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert result["peak_mb"] < 2000
    assert result["residual"] < 1e-6 and result["orthonormality"] < 1e-10
    assert 0 < result["eigenvalues"][0] and np.all(np.diff(result["eigenvalues"]) > 0)
