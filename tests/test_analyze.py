"""``cryosvi analyze`` (cryosvi.analysis): the landscape's densities against quadrature
of the Normal densities, bins that partition the particles, rigid-block motions against
scipy's rotations, a learnt reference's block motions against its own modes, the
ensemble against the structure; end to end on a tiny run of 1OL5, with the outputs
read back by gemmi, starfile, RELION's relion_star_handler and mrcfile; the refusals."""

import dataclasses
import json
import math
import shutil
import subprocess

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from scipy import integrate, stats
from scipy.spatial.transform import Rotation

from cryosvi.analysis import landscape as landscape_module
from cryosvi.analysis.ensemble import (block_displacements, chain_atoms, displacements,
                                       ensemble_structure, write_ensemble)
from cryosvi.analysis.landscape import (grid_edges, make_bins, width_density,
                                        width_density_2d)
from cryosvi.cli.main import main
from cryosvi.config import PAPER_PRESET, Noise, Priors
from cryosvi.errors import CryosviError
from cryosvi.inference.driver import infer
from cryosvi.inference.fitting_basis import fitting_basis, rigid_blocks
from cryosvi.inference.learnt_modes import learnt_reference
from cryosvi.inference.ppca import principal_directions
from cryosvi.physics.structure import default_structure_path, read_structure
from cryosvi.reference import Reference, build_reference
from cryosvi.simulate import simulate_dataset
from cryosvi.training.loop import train
from cryosvi.training.setup import TrainOptions

from test_train import TINY, tiny_schedule

RELION = shutil.which("relion_reconstruct") is not None


# ------------------------------------------------------------------------ landscape
def test_width_density_integrates_to_n_and_is_the_cell_mean_of_the_normals(monkeypatch):
    rng = np.random.default_rng(0)
    means, stds = rng.normal(0, 2, 40), rng.uniform(0.1, 1.5, 40)
    edges = grid_edges(means, stds, 240)
    density = width_density(means, stds, edges)
    assert (density * np.diff(edges)).sum() == pytest.approx(40, rel=1e-6)

    def total(x):
        return stats.norm.pdf(x, means, stds).sum()

    for j in (5, 60, 120, 200, 239):  # the cell mean of the sum of Normal densities
        mean = integrate.quad(total, edges[j], edges[j + 1], epsabs=1e-13)[0] / \
            (edges[j + 1] - edges[j])
        assert density[j] == pytest.approx(mean, rel=1e-7, abs=1e-12)
    monkeypatch.setattr(landscape_module, "CHUNK", 7)  # sums in blocks: the same
    np.testing.assert_allclose(width_density(means, stds, edges), density, rtol=1e-12)


def test_width_density_2d_integrates_to_n_and_is_the_product_of_normals(monkeypatch):
    rng = np.random.default_rng(1)
    means, stds = rng.normal(0, 2, (30, 2)), rng.uniform(0.2, 1.0, (30, 2))
    x_edges = grid_edges(means[:, 0], stds[:, 0], 50)
    y_edges = grid_edges(means[:, 1], stds[:, 1], 60)
    density = width_density_2d(means, stds, x_edges, y_edges)
    assert density.shape == (50, 60)
    area = np.outer(np.diff(x_edges), np.diff(y_edges))
    assert (density * area).sum() == pytest.approx(30, rel=1e-6)

    def total(y, x):
        return (stats.norm.pdf(x, means[:, 0], stds[:, 0])
                * stats.norm.pdf(y, means[:, 1], stds[:, 1])).sum()

    for i, j in ((25, 30), (10, 40)):
        mass = integrate.dblquad(total, x_edges[i], x_edges[i + 1], y_edges[j],
                                 y_edges[j + 1], epsabs=1e-13)[0]
        assert density[i, j] == pytest.approx(mass / area[i, j], rel=1e-6, abs=1e-12)
    monkeypatch.setattr(landscape_module, "CHUNK", 4)
    np.testing.assert_allclose(width_density_2d(means, stds, x_edges, y_edges), density,
                               rtol=1e-12)


def test_equal_count_bins_partition_the_particles_in_order():
    rng = np.random.default_rng(2)
    values = np.round(rng.normal(0, 1, 1003), 1)  # with ties
    bins = make_bins(values, 7)
    assert bins.kind == "equal-count" and bins.index.shape == (1003,)
    assert set(np.unique(bins.index)) == set(range(7))
    assert bins.counts.sum() == 1003 and bins.counts.max() - bins.counts.min() <= 1
    assert sorted(np.concatenate([bins.rows(k) for k in range(7)])) == list(range(1003))
    for k in range(7):
        inside = values[bins.rows(k)]
        assert bins.edges[k] <= inside.min() and inside.max() <= bins.edges[k + 1]
        assert bins.centres[k] == np.median(inside)
        if k < 6:
            assert inside.max() <= values[bins.rows(k + 1)].min()
    assert bins.edges[0] == values.min() and bins.edges[-1] == values.max()


def test_equal_width_bins_and_refusals():
    values = np.array([0.0, 0.1, 0.2, 0.5, 0.9, 1.0, 1.0])
    bins = make_bins(values, 4, equal_width=True)
    np.testing.assert_allclose(bins.edges, [0, 0.25, 0.5, 0.75, 1.0])
    assert bins.index.tolist() == [0, 0, 0, 2, 3, 3, 3]
    assert bins.counts.tolist() == [3, 0, 1, 3]
    np.testing.assert_allclose(bins.centres, [0.125, 0.375, 0.625, 0.875])
    with pytest.raises(CryosviError, match="more bins than the 7 particles"):
        make_bins(values, 8)
    with pytest.raises(CryosviError, match="same value"):
        make_bins(np.ones(5), 2)


# ------------------------------------------------------------------- rigid blocks
def test_a_block_moves_by_the_rotation_scipy_applies():
    rng = np.random.default_rng(3)
    positions = rng.normal(0, 10, (50, 3))
    block = rng.integers(0, 3, 50)
    centres = rng.normal(0, 5, (3, 3))
    rotations = rng.normal(0, 0.4, (3, 3))
    translations = rng.normal(0, 2, (3, 3))
    moved = positions + block_displacements(positions, block, centres, rotations,
                                            translations)
    for b in range(3):
        inside = block == b
        by_hand = (Rotation.from_rotvec(rotations[b]).apply(positions[inside] - centres[b])
                   + centres[b] + translations[b])
        np.testing.assert_allclose(moved[inside], by_hand, atol=1e-12)
    still = block_displacements(positions, block, centres, np.zeros((3, 3)),
                                np.zeros((3, 3)))
    assert not still.any()  # exactly zero, not merely small


def _learnt(beads: str = "ca", n_modes: int = 2, blocks: int | None = 3):
    """A reference learnt by ``learnt_reference`` from synthetic fitted amplitudes: 400
    particles spread along ``n_modes`` random directions of the fitting basis."""
    reference = build_reference(None, "A", 3, PAPER_PRESET["optics"], PAPER_PRESET["imaging"],
                                Priors(mode_std=(2.0,)), Noise(snr=20.0), beads=beads)
    basis = fitting_basis(reference, blocks)
    rng = np.random.default_rng(4)
    directions = np.linalg.qr(rng.normal(size=(len(basis), n_modes)))[0]
    means = (0.3 + rng.normal(0, [3.0, 1.5][:n_modes], (400, n_modes)) @ directions.T
             + rng.normal(0, 0.05, (400, len(basis))))
    covariances = np.broadcast_to(0.0025 * np.eye(len(basis)), (400, len(basis), len(basis)))
    fit = principal_directions(torch.as_tensor(means), torch.as_tensor(covariances.copy()),
                               n_modes)
    learnt, _ = learnt_reference(reference, basis, fit, {})
    return reference, learnt


def _arm_motion(coords, labels, rotation, translation):
    """t_b + w_b x (r_i - c_b) with c_b the block's centroid of ``coords``."""
    centres = np.stack([coords[labels == b].mean(0) for b in range(labels.max() + 1)])
    return translation[labels] + np.cross(rotation[labels], coords - centres[labels])


def test_learnt_reference_stores_block_motions_that_are_its_modes():
    reference, learnt = _learnt()
    blocks = learnt.blocks
    assert blocks is not None and blocks.n_blocks == 3
    labels = rigid_blocks(reference.coords, 3)  # the same partition, other numbers
    assert len({(a, b) for a, b in zip(labels, blocks.labels)}) == 3
    np.testing.assert_array_equal(learnt.structure_coords, reference.coords)
    scale = math.sqrt(reference.n_atoms)
    for k in range(2):  # each mode is exactly the blocks' infinitesimal motions
        np.testing.assert_allclose(
            _arm_motion(reference.coords, blocks.labels, blocks.rotations[k],
                        blocks.translations[k]), scale * learnt.modes[k], atol=1e-10)
    np.testing.assert_allclose(  # and so is the move to the particles' mean conformation
        _arm_motion(reference.coords, blocks.labels, blocks.offset_rotation,
                    blocks.offset_translation), learnt.coords - reference.coords,
        atol=1e-10)
    assert np.abs(learnt.coords - reference.coords).max() > 0.1


def test_reference_keeps_the_new_arrays_and_reads_older_files(tmp_path):
    _, learnt = _learnt()
    learnt.save(tmp_path / "learnt.npz")
    back = Reference.load(tmp_path / "learnt.npz")
    np.testing.assert_array_equal(back.structure_coords, learnt.structure_coords)
    for name in ("labels", "rotations", "translations", "offset_rotation",
                 "offset_translation"):
        np.testing.assert_array_equal(getattr(back.blocks, name),
                                      getattr(learnt.blocks, name))
    with np.load(tmp_path / "learnt.npz") as data:  # a file of an earlier version
        older = {k: data[k] for k in data.files
                 if k != "structure_coords" and not k.startswith("block_")}
    np.savez(tmp_path / "older.npz", **older)
    back = Reference.load(tmp_path / "older.npz")
    assert back.structure_coords is None and back.blocks is None
    np.testing.assert_array_equal(back.modes, learnt.modes)


def test_modes_learnt_in_the_anm_basis_have_no_blocks():
    reference, learnt = _learnt(n_modes=1, blocks=None)
    assert learnt.blocks is None
    np.testing.assert_array_equal(learnt.structure_beads, reference.coords)


# ------------------------------------------------------------------------ ensemble
def _chain_atom_count(chain: str = "A") -> int:
    structure = read_structure(default_structure_path())
    return sum(len(residue) for c in structure[0] if c.name == chain for residue in c)


def test_anm_ensemble_at_zero_is_the_structure_and_moves_with_the_beads():
    reference = build_reference(None, "A", 3, PAPER_PRESET["optics"],
                                PAPER_PRESET["imaging"], Priors(mode_std=(2.0, 2.0)),
                                Noise(snr=20.0), beads="ca")
    atoms = chain_atoms(reference)
    assert atoms.n_atoms == _chain_atom_count() and atoms.chain == "A"
    zero = displacements(atoms, reference, np.zeros((1, 2)))
    assert not zero.any()
    amplitudes = np.array([[1.5, -0.7]])
    moved = displacements(atoms, reference, amplitudes)[0]
    expected = math.sqrt(reference.n_atoms) * np.einsum("k,knd->nd", amplitudes[0],
                                                        reference.modes)
    # the C-alpha of a bead's residue is the bead; its residue moves with it
    beads_frame = atoms.positions - reference.centroid
    for i, bead in enumerate(reference.coords):
        at = np.flatnonzero(np.linalg.norm(beads_frame - bead, axis=1) < 1e-6)
        assert len(at) == 1  # the bead's C-alpha
        np.testing.assert_allclose(moved[at[0]], expected[i], atol=1e-12)
        same = atoms.follows == atoms.follows[at[0]]
        np.testing.assert_allclose(moved[same], np.broadcast_to(expected[i],
                                                                 moved[same].shape))


def test_block_ensemble_moves_each_block_rigidly_by_hand():
    reference, learnt = _learnt()
    atoms = chain_atoms(learnt)
    assert atoms.n_atoms == _chain_atom_count()
    blocks = learnt.blocks
    amplitudes = np.array([1.2, -2.0])
    moved = atoms.positions + displacements(atoms, learnt, amplitudes[None])[0]
    frame = atoms.positions - learnt.centroid
    block = blocks.labels[atoms.follows]
    for b in range(3):
        centre = reference.coords[blocks.labels == b].mean(0)
        rotation = blocks.offset_rotation[b] + amplitudes @ blocks.rotations[:, b]
        translation = blocks.offset_translation[b] + amplitudes @ blocks.translations[:, b]
        inside = block == b
        by_hand = (Rotation.from_rotvec(rotation).apply(frame[inside] - centre) + centre
                   + translation + learnt.centroid)
        np.testing.assert_allclose(moved[inside], by_hand, atol=1e-9)
    # about the structure (no offset), the beads' C-alphas follow the model's linear
    # displacement to first order: the error is second order in the amplitudes
    still = learnt.with_settings(coords=reference.coords, blocks=dataclasses.replace(
        blocks, offset_rotation=0 * blocks.offset_rotation,
        offset_translation=0 * blocks.offset_translation))
    at = [int(np.argmin(np.linalg.norm(frame - bead, axis=1))) for bead in reference.coords]
    errors = []
    for size in (1e-2, 1e-3):
        step = displacements(atoms, still, size * amplitudes[None])[0][at]
        linear = math.sqrt(learnt.n_atoms) * np.einsum("k,knd->nd", size * amplitudes,
                                                       learnt.modes)
        errors.append(np.abs(step - linear).max())
        assert errors[-1] < 1e-2 * np.abs(linear).max()
    assert errors[1] == pytest.approx(errors[0] / 100, rel=0.05)


def test_ensemble_files_hold_every_atom_of_every_model(tmp_path):
    reference = build_reference(None, "A", 3, PAPER_PRESET["optics"],
                                PAPER_PRESET["imaging"], Priors(mode_std=(2.0,)),
                                Noise(snr=20.0))
    atoms = chain_atoms(reference)
    frames = atoms.positions + displacements(atoms, reference, np.array([[-2.0], [0], [2]]))
    write_ensemble(ensemble_structure(atoms, frames), tmp_path / "e.pdb", tmp_path / "e.cif")
    for name, tolerance in (("e.pdb", 1e-3), ("e.cif", 1e-3)):
        back = gemmi.read_structure(str(tmp_path / name))
        assert len(back) == 3
        for model, frame in zip(back, frames):
            positions = np.array([a.pos.tolist() for c in model for r in c for a in r])
            assert positions.shape == (atoms.n_atoms, 3)
            np.testing.assert_allclose(positions, frame, atol=tolerance)


def test_structure_refusals(tmp_path):
    reference = build_reference(None, "A", 3, PAPER_PRESET["optics"],
                                PAPER_PRESET["imaging"], Priors(mode_std=(2.0,)),
                                Noise(snr=20.0))
    with pytest.raises(CryosviError, match="chain 'Z' not in .*available chains: A, B"):
        chain_atoms(reference, chain="Z")
    with pytest.raises(CryosviError, match="gives 10 pseudo-atoms but the run's reference "
                                           "has 89"):
        chain_atoms(reference, chain="B")
    moved = read_structure(default_structure_path())
    for residue in moved[0]["A"]:
        for atom in residue:
            atom.pos = gemmi.Position(atom.pos.x + 0.5, atom.pos.y, atom.pos.z)
    moved.write_pdb(str(tmp_path / "moved.pdb"))
    with pytest.raises(CryosviError, match="does not match the run's reference"):
        chain_atoms(reference, tmp_path / "moved.pdb")
    unknown = reference.with_settings(source={})
    with pytest.raises(CryosviError, match="records no structure"):
        chain_atoms(unknown)
    gone = reference.with_settings(source={**reference.source,
                                           "structure": str(tmp_path / "gone.pdb")})
    with pytest.raises(CryosviError, match="not there"):
        chain_atoms(gone)


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """1OL5 at stride 3 (ANM modes 1 and 2), 48 simulated particles, a run inferring the
    modes alone (one tiny epoch) and one inferring the defocus alone, and the posterior
    of the first (the guide alone)."""
    root = tmp_path_factory.mktemp("analyze")
    reference = build_reference(None, "A", 3, PAPER_PRESET["optics"], PAPER_PRESET["imaging"],
                                Priors(mode_std=(2.0, 1.0)), Noise(snr=20.0))
    simulate_dataset(reference, 48, root / "data", seed=0, progress=False)
    particles = root / "data" / "particles.star"
    reference = Reference.load(root / "data" / "reference.npz")
    for name, latents in (("run", ("enm_scale",)), ("defocus_run", ("defocus",))):
        train(particles, reference, root / name,
              TrainOptions(latents=latents, schedule=tiny_schedule(epochs=1), **TINY),
              progress=False)
    infer(root / "run", particles, root / "posterior.star", importance=0, progress=False)
    return root


def analyze_args(root, output, *more):
    return ["analyze", "--posterior", str(root / "posterior.star"), "--run",
            str(root / "run"), "-o", str(output), "--datadir", str(root / "data"),
            "--quiet", *more]


@pytest.mark.skipif(not RELION, reason="RELION's relion_reconstruct is not installed")
def test_end_to_end_outputs_read_back(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(analyze_args(tiny_run, out, "--bins", "3", "--reconstruct")) == 0
    printed = capsys.readouterr().out
    assert "cryosviModeAmplitude1: 48 particles" in printed and "map r" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cryosvi"] and summary["kind"] == "analysis"
    assert summary["bins"]["counts"] == [16, 16, 16]
    posterior = starfile.read(tiny_run / "posterior.star", always_dict=True)["particles"]
    means = posterior["cryosviModeAmplitude1"].to_numpy()
    assert summary["range"] == pytest.approx([means.min(), means.max()])
    assert summary["mean_posterior_std"] == pytest.approx(
        posterior["cryosviModeAmplitudeStd1"].mean())

    # subsets: RELION 3.1 STARs with the posterior's columns, every particle once
    names = []
    for k in (1, 2, 3):
        star = starfile.read(out / "bins" / f"bin_{k}.star", always_dict=True)
        assert set(star) == {"optics", "particles"}
        table = star["particles"]
        assert list(table.columns) == list(posterior.columns)
        values = table["cryosviModeAmplitude1"].to_numpy()
        assert summary["bins"]["edges"][k - 1] <= values.min()
        assert values.max() <= summary["bins"]["edges"][k]
        stacks = table["rlnImageName"].str.partition("@")[2]
        assert all(path.startswith("/") and shutil.os.path.isfile(path) for path in stacks)
        names += list(table["rlnImageName"].str.partition("@")[0].astype(int))
    assert sorted(names) == list(range(1, 49))
    combined = subprocess.run(
        ["relion_star_handler", "--combine", "--i",
         " ".join(str(out / "bins" / f"bin_{k}.star") for k in (1, 2, 3)),
         "--check_duplicates", "rlnImageName", "--o", str(tmp_path / "all.star")],
        capture_output=True, text=True)
    assert combined.returncode == 0, combined.stderr
    assert len(starfile.read(tmp_path / "all.star", always_dict=True)["particles"]) == 48

    # maps, their correlations, the ensemble and the ChimeraX script
    for k in (1, 2, 3):
        with mrcfile.open(out / "bins" / f"bin_{k}.mrc") as mrc:
            assert mrc.data.shape == (32, 32, 32)
            assert float(mrc.voxel_size.x) == pytest.approx(2.5)
            assert np.isfinite(mrc.data).all() and mrc.data.std() > 0
    correlations = np.array(summary["map_correlations"])
    assert correlations.shape == (3, 3)
    np.testing.assert_allclose(np.diag(correlations), 1.0)
    np.testing.assert_allclose(correlations, correlations.T)
    ensemble = gemmi.read_structure(str(out / "ensemble.pdb"))
    assert len(ensemble) == 3 and summary["ensemble"]["atoms"] == _chain_atom_count()
    assert all(model.count_atom_sites() == _chain_atom_count() for model in ensemble)
    assert len(gemmi.read_structure(str(out / "ensemble.cif"))) == 3
    script = (out / "view.cxc").read_text()
    assert "open ensemble.pdb coordsets true" in script
    assert "open bins/bin_1.mrc bins/bin_2.mrc bins/bin_3.mrc vseries true" in script

    # the landscape: each panel of its table holds the particles
    table = pd.read_csv(out / "landscape.csv")
    for name in ("cryosviModeAmplitude1", "cryosviModeAmplitude2"):
        panel = table[table["panel"] == name]
        width = np.diff(panel["x"].to_numpy()).mean()
        assert (panel["density"].sum() * width) == pytest.approx(48, rel=1e-4)
        assert (panel["histogram"].sum() * width) == pytest.approx(48, rel=1e-6)
    surface = table[table["panel"] == "cryosviModeAmplitude1 x cryosviModeAmplitude2"]
    assert len(surface) == 96 * 96
    area = np.ptp(surface["x"]) / 95 * np.ptp(surface["y"]) / 95
    assert surface["density"].sum() * area == pytest.approx(48, rel=1e-4)
    assert surface["histogram"].sum() * area == pytest.approx(48, rel=1e-6)
    assert (out / "landscape.png").stat().st_size > 10000
    assert (out / "ensemble.png").stat().st_size > 10000
    assert (out / ".cryosvi").is_file()


def test_force_replaces_only_an_analysis(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(analyze_args(tiny_run, out, "--bins", "2", "--equal-width")) == 0
    assert main(analyze_args(tiny_run, out, "--bins", "2")) == 2
    assert "exists; use --force" in capsys.readouterr().err
    assert main(analyze_args(tiny_run, out, "--bins", "4", "--coordinate", "2",
                             "--force")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bins"]["counts"] == [12] * 4
    assert summary["coordinate"]["column"] == "cryosviModeAmplitude2"
    second = starfile.read(out / "bins" / "bin_4.star", always_dict=True)["particles"]
    first = starfile.read(out / "bins" / "bin_1.star", always_dict=True)["particles"]
    assert first["cryosviModeAmplitude2"].max() <= second["cryosviModeAmplitude2"].min()
    amplitudes = np.array(summary["ensemble"]["amplitudes"])  # the other at its mean
    np.testing.assert_allclose(amplitudes[:, 1], summary["bins"]["centres"])
    np.testing.assert_allclose(amplitudes[:, 0], summary["coordinates"][0]["mean"])
    assert not (out / "bins" / "bin_1.mrc").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(analyze_args(tiny_run, foreign, "--force")) == 2
    assert "not made by cryosvi" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".out.cryosvi-staging") for p in tmp_path.iterdir())


@pytest.mark.parametrize("change, message", [
    (["--bins", "49"], "more bins than the 48 particles"),
    (["--coordinate", "3"], "--coordinate 3: the posterior has 2 coordinate"),
    (["--chain", "Z"], "chain 'Z' not in"),
    (["--chain", "B"], "not the structure (or chain)"),
    (["--posterior", "TRUTH"], "not a posterior of cryosvi infer"),
    (["--run", "DEFOCUS"], "does not infer the conformation"),
    (["--posterior", "OTHER"], "but the run was trained at"),
])
def test_refusals_are_one_line_before_any_work(tiny_run, tmp_path, capsys, change,
                                               message):
    if "OTHER" in change:  # the posterior of particles of another pixel size
        tables = starfile.read(tiny_run / "posterior.star", always_dict=True)
        tables["optics"]["rlnImagePixelSize"] *= 1.2
        starfile.write(tables, tmp_path / "other.star")
    change = [str(tiny_run / "data" / "particles.star") if c == "TRUTH" else
              str(tiny_run / "defocus_run") if c == "DEFOCUS" else
              str(tmp_path / "other.star") if c == "OTHER" else c for c in change]
    assert main(analyze_args(tiny_run, tmp_path / "out", *change)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("cryosvi analyze: error:") and message in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_reconstruct_without_relion_says_what_to_install(tiny_run, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(analyze_args(tiny_run, tmp_path / "out", "--reconstruct")) == 2
    error = capsys.readouterr().err
    assert "apt-get install relion" in error and not (tmp_path / "out").exists()


def test_subsets_of_a_posterior_with_a_cs_beside_it(tmp_path):
    from cryosvi.analysis.subsets import absolute_image_names, companion_cs, write_subsets
    from cryosvi.io.particles import read_particles, write_particles

    from particle_files import quiet, write_cs

    path, array, _ = write_cs(tmp_path, n=6)
    source = quiet(read_particles, path, datadir=tmp_path)
    frame = source.metadata.copy()
    frame["cryosviModeAmplitude1"] = [0.5, -1.0, 2.0, 0.0, -0.5, 1.0]
    frame["cryosviModeAmplitudeStd1"] = 0.3
    (tmp_path / "out").mkdir()
    write_particles(tmp_path / "out" / "post.star", source, frame,
                    ["cryosviModeAmplitude1", "cryosviModeAmplitudeStd1"])
    posterior = quiet(read_particles, tmp_path / "out" / "post.star", datadir=tmp_path)
    records = companion_cs(posterior)
    np.testing.assert_array_equal(records["uid"], array["uid"])
    bins = make_bins(frame["cryosviModeAmplitude1"].to_numpy(), 2)
    names, missing = absolute_image_names(posterior)
    assert not missing
    stack = str((tmp_path / "J3" / "extract" / "s.mrcs").resolve())
    assert all(name.endswith("@" + stack) for name in names)
    written = write_subsets(posterior, bins, tmp_path / "out", records, names)
    uids = []
    for k, paths in enumerate(written):
        assert [p.name for p in paths] == [f"bin_{k + 1}.star", f"bin_{k + 1}.cs"]
        subset = np.load(paths[1], allow_pickle=False)
        star = starfile.read(paths[0], always_dict=True)["particles"]
        np.testing.assert_array_equal(subset["uid"], array["uid"][bins.rows(k)])
        np.testing.assert_allclose(star["cryosviModeAmplitude1"],
                                   frame["cryosviModeAmplitude1"].to_numpy()[bins.rows(k)])
        np.testing.assert_array_equal(subset["blob/path"], array["blob/path"][bins.rows(k)])
        uids += list(subset["uid"])
    assert sorted(uids) == sorted(array["uid"])
    other = array[::-1].copy()
    with open(tmp_path / "out" / "post.cs", "wb") as handle:
        np.save(handle, other, allow_pickle=False)
    with pytest.raises(CryosviError, match="does not hold its particles"):
        companion_cs(posterior)


def test_stacks_not_found_keep_their_names_with_a_warning(tiny_run, tmp_path, capsys):
    argv = [a for a in analyze_args(tiny_run, tmp_path / "out", "--bins", "2")
            if a not in ("--datadir", str(tiny_run / "data"))]
    assert main(argv) == 0
    assert "warning: 1 particle stack(s) not found" in capsys.readouterr().err
    table = starfile.read(tmp_path / "out" / "bins" / "bin_1.star",
                          always_dict=True)["particles"]
    posterior = starfile.read(tiny_run / "posterior.star", always_dict=True)["particles"]
    assert set(table["rlnImageName"]) <= set(posterior["rlnImageName"])
    assert main([*argv, "--reconstruct", "-o", str(tmp_path / "maps")]) == 2
    assert "--reconstruct: particle stack particles.mrcs not found" in \
        capsys.readouterr().err


def test_the_reference_records_its_structure_wherever_it_is_used_from(tmp_path,
                                                                     monkeypatch):
    """A structure given by a relative path is recorded absolute, so that analyze run
    from another folder still finds it."""
    shutil.copy(default_structure_path(), tmp_path / "model.pdb")
    monkeypatch.chdir(tmp_path)
    reference = build_reference("model.pdb", "A", 3, PAPER_PRESET["optics"],
                                PAPER_PRESET["imaging"], Priors(mode_std=(2.0,)),
                                Noise(snr=20.0))
    assert reference.source["structure"] == str(tmp_path / "model.pdb")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert len(chain_atoms(reference).positions) > 0
