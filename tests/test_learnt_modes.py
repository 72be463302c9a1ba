"""``cryosvi learn-modes`` (cryosvi.inference.learnt_modes): the fitting basis, and the recovery of
a conformational change that is no ANM mode and moves the molecule rigidly, from
particles of known pose; the command's refusals."""

import math

import numpy as np
import pytest

from cryosvi.physics.anm import rigid_basis
from cryosvi.cli.main import main
from cryosvi.config import PAPER_PRESET, Noise, Priors
from cryosvi.inference.fitting_basis import fitting_basis, rigid_blocks, sequence_blocks
from cryosvi.reference import Reference, build_reference
from cryosvi.simulate import Acquisition, ImageEffects, simulate_dataset
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


def test_sequence_blocks_are_the_most_compact_cut_of_the_chain():
    """The dynamic programme's segments against every way to cut a random chain of 24
    pseudo-atoms into 2 or 3 segments of at least 3: the same least sum of squares."""
    import itertools

    def spread(x, labels):
        return sum(np.square(x[labels == b] - x[labels == b].mean(0)).sum()
                   for b in range(labels.max() + 1))

    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.normal(size=(24, 3)).cumsum(0)
        for k in (2, 3):
            labels = sequence_blocks(x, k)
            assert (np.diff(labels) >= 0).all() and np.bincount(labels).min() >= 3
            best = min(spread(x, np.searchsorted(np.array(cuts), np.arange(24), "right"))
                       for cuts in itertools.combinations(range(3, 22), k - 1)
                       if min(np.diff((0, *cuts, 24))) >= 3)
            assert spread(x, labels) == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError, match="blocks"):
        sequence_blocks(x, 9)


def hinge_of_block(coords, labels, block) -> np.ndarray:
    """(3N,) unit: block ``block`` rotating about an axis through the point of the
    other atoms nearest to its centroid (a hinge), the rest still."""
    inside = labels == block
    centre = coords[inside].mean(0)
    pivot = coords[~inside][np.argmin(np.linalg.norm(coords[~inside] - centre, axis=1))]
    motion = np.zeros_like(coords)
    motion[inside] = np.cross(np.array([0.3, -0.5, 0.8]), coords[inside] - pivot)
    return motion.ravel() / np.linalg.norm(motion)


def simulate_along(tmp_path, direction: np.ndarray, base: Reference,
                   effects: ImageEffects = ImageEffects(), snr: float = 2.0):
    truth = base.with_settings(
        modes=direction.reshape(1, -1, 3), eigenvalues=np.ones(1),
        priors=Priors(mode_std=(1.5,), defocus_mean=10000.0, defocus_std=2500.0),
        noise=Noise(snr=snr))
    data = tmp_path / "data"
    simulate_dataset(truth, 400, data, seed=5, progress=False,
                     acquisition=Acquisition(max_shift=4.0, astigmatism=500.0),
                     effects=effects)
    return data


@pytest.mark.parametrize("basis, blocks, named", [
    ("blocks", rigid_blocks, "3 blocks"), ("segments", sequence_blocks, "3 chain segments")])
def test_recovers_a_hinge_of_one_block(tmp_path, capsys, basis, blocks, named):
    """A domain hinging on the rest: a k-means block with ``--basis blocks`` (rigid
    blocks; the default noise model: the particles' own estimate, which the learnt
    reference keeps), a stretch of the chain with ``--basis segments``."""
    base = reference_with(1)
    direction = hinge_of_block(base.coords, blocks(base.coords, 3), 0)
    data = simulate_along(tmp_path, direction, base)
    learnt_path = tmp_path / "learnt.npz"
    assert main(["learn-modes", "--particles", str(data / "particles.star"), "--stride",
                 str(STRIDE), "--structure", str(default_structure_path()), "--chain", "A",
                 "--basis", basis, "-o", str(learnt_path),
                 "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"rigid motions of {named}" in captured.out
    assert "noise model: estimate" in captured.err  # a bare structure: 'auto' estimates
    learnt = Reference.load(learnt_path)
    assert abs(float(learnt.modes.reshape(-1) @ direction)) > 0.97
    # the fit whitened by the estimate (with its per-particle levels) keeps the spread
    assert learnt.priors.mode_std[0] == pytest.approx(1.5, rel=0.15)
    assert learnt.noise_model is not None  # kept for train


@pytest.mark.parametrize("change", ["hinge", "anm4"])
def test_the_default_basis_is_the_one_whose_directions_explain_the_particles(
        tmp_path, capsys, change):
    """``--basis auto`` (the default) learns in each basis and keeps the one along whose
    directions the particles' spread explains their images best: for a hinge of a
    k-means block, the rigid blocks (or segments); for particles along ANM mode 4, whose
    projection on the 3-block span has norm 0.37 (the direction learnt there misses
    such a mode: overlap 0.16 measured on a small protein), the ANM basis. Either way
    the change is found (150 of the 400 particles: the chosen basis's evidence is 1.7
    and 7.5 times the next one's)."""
    base = reference_with(1)
    direction = hinge_of_block(base.coords, rigid_blocks(base.coords, 3), 0) \
        if change == "hinge" else reference_with(10).modes[3].reshape(-1)
    data = simulate_along(tmp_path, direction, base)
    learnt_path = tmp_path / "learnt.npz"
    assert main(["learn-modes", "--particles", str(data / "particles.star"), "--stride",
                 str(STRIDE), "--structure", str(default_structure_path()), "--chain", "A",
                 "--max-particles", "150", "-o", str(learnt_path)]) == 0
    out, err = capsys.readouterr()
    learnt = Reference.load(learnt_path)
    evidence = learnt.source["learnt"]["basis_evidence"]
    assert set(evidence) == {"blocks", "segments", "anm"} and "fitting bases" in err
    assert all(f"{kind} basis" in err for kind in evidence)  # the progress bar's labels
    chosen = max(evidence, key=evidence.get)
    assert chosen in (("blocks", "segments") if change == "hinge" else ("anm",))
    assert ("modes of ANM" in out) == (chosen == "anm")
    assert abs(float(learnt.modes.reshape(-1) @ direction)) > 0.97


def test_fits_the_envelope_nobody_states_and_keeps_it_for_train(tmp_path, capsys):
    """Particles with a B = 100 Å^2 envelope and coloured noise that the bare structure
    knows nothing of: the learnt reference's noise model carries B (the Guinier fit of
    the per-shell gain against the model averaged over the learnt conformations), and
    the hinge and its spread are learnt as without an envelope."""
    base = reference_with(1)
    direction = hinge_of_block(base.coords, rigid_blocks(base.coords, 3), 0)
    data = simulate_along(tmp_path, direction, base, ImageEffects(
        noise_spectrum=((3.0, 0.05, 0.4),), bfactor=100.0))
    learnt_path = tmp_path / "learnt.npz"
    assert main(["learn-modes", "--particles", str(data / "particles.star"), "--stride",
                 str(STRIDE), "--structure", str(default_structure_path()), "--chain", "A",
                 "--basis", "blocks", "-o", str(learnt_path), "--quiet"]) == 0
    assert "B envelope" in capsys.readouterr().err
    learnt = Reference.load(learnt_path)
    assert learnt.noise_model.bfactor == pytest.approx(100.0, abs=15.0)
    assert learnt.source["learnt"]["bfactor_shells"] >= 3
    assert abs(float(learnt.modes.reshape(-1) @ direction)) > 0.97
    assert learnt.priors.mode_std[0] == pytest.approx(1.5, rel=0.15)


def test_the_learnt_centre_is_the_particles_mean_conformation_at_low_snr(tmp_path):
    """Particles whose conformations spread (std 1.5 Å RMS) about a mean 3 Å RMS along a
    hinge from the structure, at SNR 0.3: the per-particle fits, started at the
    structure, stop short of it (their PPCA's centre: 2.05), the population's grid
    estimate does not (measured 3.06)."""
    base = reference_with(1)
    direction = hinge_of_block(base.coords, rigid_blocks(base.coords, 3), 0)
    offset = 3.0 * math.sqrt(base.n_atoms) * direction.reshape(-1, 3)
    truth = base.with_settings(
        coords=base.coords + offset, modes=direction.reshape(1, -1, 3),
        eigenvalues=np.ones(1), noise=Noise(snr=0.3),
        priors=Priors(mode_std=(1.5,), defocus_mean=10000.0, defocus_std=2500.0))
    simulate_dataset(truth, 400, tmp_path / "data", seed=5, progress=False,
                     acquisition=Acquisition(max_shift=4.0, astigmatism=500.0))
    learnt_path = tmp_path / "learnt.npz"
    assert main(["learn-modes", "--particles", str(tmp_path / "data" / "particles.star"),
                 "--stride", str(STRIDE), "--structure", str(default_structure_path()),
                 "--chain", "A", "--basis", "blocks", "-o", str(learnt_path),
                 "--quiet"]) == 0
    learnt = Reference.load(learnt_path)
    along = float((learnt.coords - base.coords).reshape(-1) @ direction) \
        / math.sqrt(base.n_atoms)
    assert along == pytest.approx(3.0, abs=0.4)
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
    assert abs(learnt.noise_model.bfactor) < 10.0  # the simulation has no envelope
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


def whole_stack_learn_modes(table, reference, blocks, max_particles, seed, iterations):
    """What learn-modes computed before it read the stack in chunks: every fitted image
    in memory at once, the gray levels by one least-squares fit of the whole arrays
    (``graylevels.fit_scale_with_poses``) against the model images of all of them at
    once, the amplitudes of the whole tensor (and the same junk weights)."""
    import torch
    from dataclasses import replace

    from cryosvi.dataset import ParticleData, priors_from_particles, working_reference
    from cryosvi.inference.junk import junk_weights
    from cryosvi.inference.learnt_modes import (GRAY_LEVEL_IMAGES, REFIT_TOLERANCE,
                                                fit_amplitudes, learnt_reference)
    from cryosvi.inference.population import population_moments
    from cryosvi.inference.ppca import principal_directions
    from cryosvi.latents import BY_NAME
    from cryosvi.physics.forward import ForwardModel
    from cryosvi.physics.graylevels import fit_scale_with_poses

    reference = priors_from_particles(table, working_reference(table, reference, None))
    basis = fitting_basis(reference, blocks)
    data = ParticleData(table, reference.optics.box, ctf_estimates=True)
    rows = np.sort(np.random.default_rng(seed).choice(len(table), max_particles,
                                                      replace=False))
    images = torch.from_numpy(data.images(rows))
    rows = torch.from_numpy(rows)
    rotation = BY_NAME["pose"].known(table, None)[rows]
    ctf, shifts = data.conditions.ctf.take(rows), data.conditions.shifts[rows]

    def model_at(settings):
        return ForwardModel(settings.coords, basis, settings.optics, settings.imaging,
                            data.groups)

    def with_levels(amplitudes):
        count = min(len(images), GRAY_LEVEL_IMAGES)
        unit = reference.with_settings(imaging=replace(reference.imaging, scale=1.0,
                                                       offset=0.0))
        with torch.no_grad():
            clean = model_at(unit)(amplitudes[:count].float(), rotation[:count], None,
                                   ctf=ctf.take(torch.arange(count)), shifts=shifts[:count])
        fitted = fit_scale_with_poses(images[:count], clean)
        return reference.with_settings(
            imaging=replace(reference.imaging, scale=fitted.scale, offset=fitted.offset),
            noise=replace(reference.noise, std=fitted.noise_std))

    def fit():
        return fit_amplitudes(model_at(reference), images, rotation, ctf, shifts,
                              reference.noise.std, 10.0, iterations)

    reference = with_levels(torch.zeros(len(images), len(basis)))
    fitted = fit()
    first_scale = reference.imaging.scale
    reference = with_levels(fitted.means)
    if abs(reference.imaging.scale / first_scale - 1) > REFIT_TOLERANCE:
        fitted = fit()
    fit = None
    for _ in range(2):
        weights = junk_weights(fitted.log_bayes(
            *((None, None) if fit is None else (fit.centre, fit.directions.T * fit.std))))[0]
        fit = principal_directions(fitted.means, fitted.covariances, 1, weights=weights)
    moments = population_moments(learnt_reference(reference, basis, fit, {})[0],
                                 data.groups, images, rotation, ctf, shifts,
                                 chunk_size=len(images), weigh_junk=True)
    fit = replace(fit, centre=fit.centre + torch.from_numpy(moments.mean) @ fit.directions,
                  std=torch.from_numpy(moments.std))
    learnt, summary = learnt_reference(reference, basis, fit, {})
    return learnt, {**summary, "scale": reference.imaging.scale,
                    "offset": reference.imaging.offset, "noise_std": reference.noise.std}


def test_reading_the_stack_in_chunks_gives_the_numbers_of_the_whole_stack(tmp_path,
                                                                          monkeypatch):
    """learn-modes reads the fitted images a chunk at a time (never more than the fit's
    batch of 64 or ``chunk_size``), and computes the gray levels from pooled moments of
    the chunks: the same gray levels (to float64 rounding), amplitudes and learnt mode
    as the whole-stack computation, for the same seed. Particles with shifts,
    astigmatism and two optics groups; a random subset of them; the gray levels from a
    part of it (GRAY_LEVEL_IMAGES made smaller) in several chunks; the small basis of
    the reference's mode and the rigid motions (a fast fit); white noise (the
    whole-stack computation's)."""
    import cryosvi.inference.learnt_modes as learnt_modes
    from cryosvi.dataset import ParticleData
    from cryosvi.io.particles import read_particles
    from cryosvi.simulate import group_optics

    base = reference_with(1)
    direction = hinge_of_block(base.coords, rigid_blocks(base.coords, 3), 0)
    truth = base.with_settings(modes=direction.reshape(1, -1, 3), eigenvalues=np.ones(1),
                               priors=Priors(mode_std=(1.5,)), noise=Noise(snr=2.0))
    simulate_dataset(truth, 60, tmp_path / "data", seed=5, progress=False,
                     acquisition=Acquisition(max_shift=4.0, astigmatism=500.0,
                                             groups=group_optics(base.optics, 2)))
    table = read_particles(tmp_path / "data" / "particles.star")
    monkeypatch.setattr(learnt_modes, "GRAY_LEVEL_IMAGES", 40)
    reads = []
    original = ParticleData.images

    def counted(self, indices):
        reads.append(len(np.atleast_1d(indices)))
        return original(self, indices)

    monkeypatch.setattr(ParticleData, "images", counted)
    learnt, summary = learnt_modes.learn_modes_from_particles(
        table, base, basis="anm", max_particles=48, seed=3, iterations=3, chunk_size=16,
        noise_model="white")
    # the gray levels' 40 images 16 at a time, the fit's batch (up to 64), the gray
    # levels at the fitted amplitudes, a second fit if the scale moved, and the
    # population's grid 16 at a time
    assert reads[:7] == [16, 16, 8, 48, 16, 16, 8]
    assert reads[7:] in ([16, 16, 16], [48, 16, 16, 16])
    monkeypatch.setattr(ParticleData, "images", original)
    old, expected = whole_stack_learn_modes(table, base, None, 48, 3, 3)
    for key in ("scale", "offset", "noise_std"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-10, abs=1e-12), key
    assert summary["mode_std"] == expected["mode_std"]
    assert summary["components"] == expected["components"]
    np.testing.assert_allclose(learnt.modes, old.modes, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(learnt.coords, old.coords, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("snr, overlap", [(2.0, 0.97), (0.1, 0.9)])
def test_junk_does_not_pull_the_learnt_direction(tmp_path, snr, overlap):
    """A quarter of the particles replaced by junk the model cannot explain at their
    poses (pure noise, and particle images with their Fourier phases scrambled: the same
    power, no structure): learn-modes weighs each particle by its own probability of
    holding the molecule (its evidence against an empty image), finds the junk fraction
    and still the hinge, at SNR 2 and at SNR 0.1 (where an evidence with the fit's wide
    prior on every amplitude called half of these particles junk)."""
    import mrcfile

    base = reference_with(1)
    direction = hinge_of_block(base.coords, rigid_blocks(base.coords, 3), 0)
    data = simulate_along(tmp_path, direction, base, snr=snr)
    noise_std = truth_noise_std(data)
    generator = np.random.default_rng(0)
    with mrcfile.open(data / "particles.mrcs", mode="r+") as mrc:
        stack = mrc.data
        box = stack.shape[-1]
        stack[:50] = generator.normal(0.0, noise_std, (50, box, box))
        spectra = np.fft.fft2(stack[50:100])
        phases = np.angle(np.fft.fft2(generator.normal(size=(50, box, box))))
        stack[50:100] = np.fft.ifft2(np.abs(spectra) * np.exp(1j * phases)).real
    learnt_path = tmp_path / "learnt.npz"
    assert main(["learn-modes", "--particles", str(data / "particles.star"), "--stride",
                 str(STRIDE), "--structure", str(default_structure_path()), "--chain", "A",
                 "--basis", "blocks", "-o", str(learnt_path), "--quiet"]) == 0
    learnt = Reference.load(learnt_path)
    assert learnt.source["learnt"]["junk_fraction"] == pytest.approx(0.25, abs=0.04)
    assert abs(float(learnt.modes.reshape(-1) @ direction)) > overlap


def test_evidence_under_a_population_is_the_integral_of_the_quadratic_misfit():
    """``AmplitudeFit.log_bayes`` from a fit's mode, precision and misfits only: for a
    misfit exactly quadratic in the amplitudes (D = 3), the log Bayes factor against the
    empty image equals misfit_empty + log of the misfit's exp(-misfit) integrated over a
    one-direction population N(c, w w^T) (scipy's adaptive quadrature over z), and, with
    no population, misfit_empty - misfit(c) at the structure c = 0."""
    import torch
    from scipy import stats
    from scipy.integrate import quad

    from cryosvi.inference.learnt_modes import AmplitudeFit

    rng = np.random.default_rng(4)
    dim, prior_std, lowest, empty = 3, 10.0, 12.5, 40.0
    root = rng.normal(size=(dim, dim))
    likelihood = root @ root.T + 0.3 * np.eye(dim)  # H_L
    best = rng.normal(0.0, 1.5, dim)  # the likelihood's mode

    def misfit(a):
        return lowest + 0.5 * (a - best) @ likelihood @ (a - best)

    precision = likelihood + np.eye(dim) / prior_std**2
    mode = np.linalg.solve(precision, likelihood @ best)  # the fit's posterior mode
    fit = AmplitudeFit(torch.from_numpy(mode)[None], torch.from_numpy(
        np.linalg.inv(precision))[None], torch.tensor([misfit(mode)]),
        torch.tensor([empty]), prior_std)
    assert float(fit.log_bayes()[0]) == pytest.approx(empty - misfit(np.zeros(dim)),
                                                      rel=1e-10)
    centre, direction = rng.normal(0.0, 1.0, dim), rng.normal(0.0, 1.2, dim)
    integral, _ = quad(lambda z: stats.norm.pdf(z) * np.exp(
        lowest - misfit(centre + z * direction)), -12, 12, epsabs=0, epsrel=1e-12)
    expected = empty - lowest + np.log(integral)
    found = fit.log_bayes(torch.from_numpy(centre), torch.from_numpy(direction)[:, None])
    assert float(found[0]) == pytest.approx(expected, abs=1e-8)
