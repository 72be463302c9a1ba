"""``cryosvi learn-modes`` (cryosvi.inference.learnt_modes): the fitting basis, and the recovery of
a conformational change that is no ANM mode and moves the molecule rigidly, from
particles of known pose; the command's refusals."""

import math

import numpy as np
import pytest

from cryosvi.physics.anm import rigid_basis
from cryosvi.cli.main import main
from cryosvi.config import PAPER_PRESET, Noise, Priors
from cryosvi.inference.learnt_modes import fitting_basis, rigid_blocks
from cryosvi.reference import Reference, build_reference
from cryosvi.simulate import Acquisition, simulate_dataset
from cryosvi.physics.structure import default_structure_path

STRIDE = 3


def reference_with(n_modes: int, snr: float = math.inf, beads: str = "residue") -> Reference:
    """Default: the pseudo-atoms learn-modes builds from --structure (residue beads)."""
    return build_reference(None, "A", STRIDE, PAPER_PRESET["optics"],
                           PAPER_PRESET["imaging"], Priors(mode_std=(2.0,) * n_modes),
                           Noise(snr=snr), beads=beads)


def truth_noise_std(data) -> float:
    """The simulation's noise std (its reference.npz)."""
    return Reference.load(data / "reference.npz").noise.std


def test_fitting_basis_is_the_anm_modes_then_the_rigid_motions_orthonormal():
    reference = reference_with(4)
    basis = fitting_basis(reference, blocks=None).reshape(10, -1)
    np.testing.assert_allclose(basis @ basis.T, np.eye(10), atol=1e-10)
    np.testing.assert_allclose(basis[:4], reference.modes.reshape(4, -1), atol=1e-8)
    rigid = rigid_basis(reference.coords)  # (3N, 6): its span is that of the last six
    np.testing.assert_allclose(np.abs(np.linalg.svd(basis[4:] @ rigid)[1]), 1.0, atol=1e-8)


def test_block_basis_spans_each_blocks_and_the_whole_molecules_rigid_motions():
    reference = reference_with(1, beads="ca")
    labels = rigid_blocks(reference.coords, 3)
    assert np.array_equal(labels, rigid_blocks(reference.coords, 3))  # deterministic
    assert set(labels) == {0, 1, 2}
    assert np.bincount(labels).min() >= 3
    basis = fitting_basis(reference, blocks=3).reshape(18, -1)
    np.testing.assert_allclose(basis @ basis.T, np.eye(18), atol=1e-10)
    whole = rigid_basis(reference.coords)
    np.testing.assert_allclose(np.linalg.norm(basis @ whole, axis=0), 1.0, atol=1e-8)
    hinge = hinge_of_block(reference.coords, labels, 1)
    assert np.linalg.norm(basis @ hinge) == pytest.approx(1.0, abs=1e-8)
    assert np.linalg.norm(fitting_basis(reference, blocks=None).reshape(7, -1) @ hinge) < 0.9
    with pytest.raises(ValueError, match="blocks"):
        rigid_blocks(reference.coords, len(reference.coords))


def hinge_of_block(coords, labels, block) -> np.ndarray:
    """(3N,) unit: block ``block`` rotating about an axis through the point of the
    other atoms nearest to its centroid (a hinge), the rest still."""
    inside = labels == block
    centre = coords[inside].mean(0)
    pivot = coords[~inside][np.argmin(np.linalg.norm(coords[~inside] - centre, axis=1))]
    motion = np.zeros_like(coords)
    motion[inside] = np.cross(np.array([0.3, -0.5, 0.8]), coords[inside] - pivot)
    return motion.ravel() / np.linalg.norm(motion)


def simulate_along(tmp_path, direction: np.ndarray, base: Reference):
    truth = base.with_settings(
        modes=direction.reshape(1, -1, 3), eigenvalues=np.ones(1),
        priors=Priors(mode_std=(1.5,), defocus_mean=10000.0, defocus_std=2500.0),
        noise=Noise(snr=2.0))
    data = tmp_path / "data"
    simulate_dataset(truth, 400, data, seed=5, progress=False,
                     acquisition=Acquisition(max_shift=4.0, astigmatism=500.0))
    return data


def test_recovers_a_hinge_of_one_block_by_default(tmp_path, capsys):
    """A domain hinging on the rest (the default basis: rigid blocks)."""
    base = reference_with(1)
    direction = hinge_of_block(base.coords, rigid_blocks(base.coords, 3), 0)
    data = simulate_along(tmp_path, direction, base)
    learnt_path = tmp_path / "learnt.npz"
    assert main(["learn-modes", "--particles", str(data / "particles.star"), "--stride",
                 str(STRIDE), "--structure", str(default_structure_path()), "--chain", "A",
                 "-o", str(learnt_path), "--quiet"]) == 0
    assert "rigid motions of 3 blocks" in capsys.readouterr().out
    learnt = Reference.load(learnt_path)
    assert abs(float(learnt.modes.reshape(-1) @ direction)) > 0.97
    assert learnt.priors.mode_std[0] == pytest.approx(1.5, rel=0.15)


def test_recovers_a_change_that_is_no_anm_mode_and_moves_the_molecule(tmp_path, capsys):
    """Particles whose conformations vary along ANM mode 3 plus a rigid rotation (the
    kind of change a hinge makes in a consensus frame); learn-modes --basis anm from their
    images and poses finds that direction, its spread and the gray levels."""
    base = reference_with(4)
    anm = base.modes.reshape(4, -1)
    rotation = rigid_basis(base.coords)[:, 3]  # about x through the centroid
    direction = anm[2] + 0.8 * rotation
    direction /= np.linalg.norm(direction)
    data = simulate_along(tmp_path, direction, base)
    learnt_path = tmp_path / "learnt.npz"
    assert main(["learn-modes", "--particles", str(data / "particles.star"), "--stride",
                 str(STRIDE), "--structure", str(default_structure_path()), "--chain", "A",
                 "--basis", "anm", "--anm-modes", "4", "-o", str(learnt_path),
                 "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "learnt mode 1" in out and "2 fitting pass(es)" in err
    learnt = Reference.load(learnt_path)
    overlap = abs(float(learnt.modes.reshape(-1) @ direction))
    assert overlap > 0.97
    assert learnt.priors.mode_std[0] == pytest.approx(1.5, rel=0.15)
    assert learnt.imaging.scale == pytest.approx(1.0, rel=0.03)
    assert learnt.noise.std == pytest.approx(truth_noise_std(data), rel=0.03)
    shift = np.sqrt(np.square(learnt.coords - base.coords).sum(1).mean())
    assert shift < 0.3  # the simulated amplitudes have mean 0: the centre barely moves
    assert learnt.source["modes"] == "learnt"
    np.testing.assert_allclose(np.linalg.norm(learnt.modes.reshape(1, -1)), 1.0, rtol=1e-6)


def test_refuses_particles_without_poses_and_non_npz_outputs(tmp_path, capsys):
    data = tmp_path / "data"
    simulate_dataset(reference_with(1, snr=20.0), 8, data, progress=False)
    star = data / "particles.star"
    text = star.read_text()
    unposed = tmp_path / "unposed.star"
    unposed.write_text(text.replace("rlnAngleRot", "cryosviSomethingElse"))
    for argv, message in (
            (["--particles", str(star), "-o", str(tmp_path / "x.txt")], "ending in .npz"),
            (["--particles", str(unposed), "--datadir", str(data), "-o",
              str(tmp_path / "x.npz")], "missing: rlnAngleRot"),
            (["--particles", str(star), "--blocks", "99", "-o", str(tmp_path / "x.npz")],
             "make at most"),
            (["--particles", str(star), "-o", str(data / "reference.npz"), "--force"],
             "inside a cryosvi"),
            (["--particles", str(star), "--blocks", "2", "--n-modes", "13", "-o",
              str(tmp_path / "x.npz")], "has 12 dimensions")):
        assert main(["learn-modes", "--structure", str(default_structure_path()),
                     *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
