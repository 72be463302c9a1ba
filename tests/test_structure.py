"""Structure -> CA pseudo-atoms, checked against ProDy's independent PDB parser and the
paper's counts (1OL5 chain A: 265 CA, 133 pseudo-atoms at stride 2)."""

import gemmi
import numpy as np
import prody
import pytest

from cryosvi.errors import CryosviError
from cryosvi.physics.structure import default_structure_path, load_pseudo_atoms

prody.confProDy(verbosity="none")
UBQ = "/work/shared/data/1ubq.pdb"

# Chain A: altlocs A/B on residue 1 (A listed first), an MSE written as HETATM, residue 5
# in two sequence variants (SER/THR, altlocs A/B), a calcium ion whose atom is named CA, a
# water; model 2 moves everything; chain W is water only.
SYNTHETIC = """\
MODEL        1
ATOM      1  N   ALA A   1       0.000   0.000   0.000  1.00  0.00           N
ATOM      2  CA AALA A   1       1.000   0.000   0.000  0.60  0.00           C
ATOM      3  CA BALA A   1       9.000   9.000   9.000  0.40  0.00           C
ATOM      4  CA  GLY A   2       4.800   0.000   0.000  1.00  0.00           C
HETATM    5  CA  MSE A   3       8.600   0.000   0.000  1.00  0.00           C
HETATM    6 SE   MSE A   3       8.600   2.000   0.000  1.00  0.00          SE
ATOM      7  CA  LEU A   4      12.400   0.000   0.000  1.00  0.00           C
ATOM     11  CA ASER A   5      16.200   0.000   0.000  0.50  0.00           C
ATOM     12  CA BTHR A   5      16.200   3.000   0.000  0.50  0.00           C
TER
HETATM    8 CA    CA A 101      20.000   0.000   0.000  1.00  0.00          CA
HETATM    9  O   HOH A 201      30.000   0.000   0.000  1.00  0.00           O
HETATM   10  O   HOH W 301      40.000   0.000   0.000  1.00  0.00           O
ENDMDL
MODEL        2
ATOM      1  N   ALA A   1      50.000   0.000   0.000  1.00  0.00           N
ATOM      2  CA  ALA A   1      51.000   0.000   0.000  1.00  0.00           C
ATOM      4  CA  GLY A   2      54.800   0.000   0.000  1.00  0.00           C
HETATM    5  CA  MSE A   3      58.600   0.000   0.000  1.00  0.00           C
ATOM      7  CA  LEU A   4      62.400   0.000   0.000  1.00  0.00           C
HETATM   10  O   HOH W 301      40.000   0.000   0.000  1.00  0.00           O
ENDMDL
END
"""


def prody_ca(path, chain):
    return prody.parsePDB(str(path)).select(f"chain {chain} and name CA").getCoords()


def test_paper_counts_for_1ol5():
    atoms = load_pseudo_atoms(default_structure_path(), chain="A")
    assert atoms.n_atoms == 265
    assert load_pseudo_atoms(default_structure_path(), chain="A", stride=2).n_atoms == 133
    # the two phosphothreonines are HETATM records inside the polymer
    tpo = atoms.residue_numbers[np.array(atoms.residue_names) == "TPO"]
    assert tpo.tolist() == [287, 288]


@pytest.mark.parametrize("path,chain,count", [
    (default_structure_path(), "A", 265), (default_structure_path(), "B", 29), (UBQ, "A", 76)])
def test_coordinates_match_prody(path, chain, count):
    reference = prody_ca(path, chain)
    assert len(reference) == count
    for stride in (1, 2, 3):
        atoms = load_pseudo_atoms(path, chain=chain, stride=stride)
        expected = reference[::stride]
        assert atoms.coords.shape == expected.shape and atoms.coords.dtype == np.float64
        np.testing.assert_allclose(atoms.coords.mean(axis=0), 0, atol=1e-10)
        np.testing.assert_allclose(atoms.centroid, expected.mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(atoms.coords + atoms.centroid, expected, atol=1e-9)
        assert len(atoms.residue_names) == len(atoms.residue_numbers) == len(expected)


@pytest.mark.parametrize("path,chain", [(default_structure_path(), "A"), (UBQ, "A")])
def test_residue_beads_are_heavy_atom_centres_of_mass_by_prody(path, chain):
    """--beads residue: one bead per CA residue at the mass-weighted centre of its
    non-hydrogen atoms, computed here with ProDy's own selection and masses."""
    structure = prody.parsePDB(str(path)).select(f"chain {chain} and not hydrogen")
    for stride in (1, 2):
        atoms = load_pseudo_atoms(path, chain=chain, stride=stride, beads="residue")
        expected = []
        for residue in structure.getHierView().iterResidues():
            if residue.select("name CA and element C") is None:
                continue  # ligands, ions, waters
            expected.append(prody.calcCenter(residue, weights=residue.getMasses()))
        expected = np.array(expected)[::stride]
        assert atoms.coords.shape == expected.shape
        np.testing.assert_allclose(atoms.coords + atoms.centroid, expected, atol=1e-3)
        ca = load_pseudo_atoms(path, chain=chain, stride=stride)
        assert atoms.residue_numbers.tolist() == ca.residue_numbers.tolist()
        # a bead is within a residue's reach of its CA (side chains are < 8 Å long)
        distance = np.linalg.norm(atoms.coords + atoms.centroid - ca.coords - ca.centroid,
                                  axis=1)
        assert distance.max() < 8 and distance.mean() > 0.5


def test_default_chain_is_first_protein_chain_and_bundled_file():
    path = default_structure_path()
    assert path.is_file() and path.name == "1ol5.pdb"
    atoms = load_pseudo_atoms(path)
    assert atoms.chain == "A" and atoms.n_atoms == 265 and atoms.path == str(path)


def test_mmcif_gives_the_same_atoms(tmp_path):
    structure = gemmi.read_structure(str(default_structure_path()))
    structure.setup_entities()
    cif = tmp_path / "1ol5.cif"
    structure.make_mmcif_document().write_file(str(cif))
    from_pdb = load_pseudo_atoms(default_structure_path(), stride=2)
    for path in (cif, tmp_path / "1ol5.txt"):  # the format comes from the content
        if not path.exists():
            path.write_text(cif.read_text())
        from_cif = load_pseudo_atoms(path, stride=2)
        assert from_cif.chain == "A" and from_cif.n_atoms == 133
        np.testing.assert_allclose(from_cif.coords, from_pdb.coords, atol=1e-9)
        assert from_cif.residue_names == from_pdb.residue_names


def test_first_model_first_altloc_modified_residues_no_ions(tmp_path):
    path = tmp_path / "synthetic.pdb"
    path.write_text(SYNTHETIC)
    atoms = load_pseudo_atoms(path)
    assert atoms.chain == "A"
    assert atoms.residue_names == ["ALA", "GLY", "MSE", "LEU", "SER"]
    assert atoms.residue_numbers.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(atoms.coords + atoms.centroid,
                               [[1, 0, 0], [4.8, 0, 0], [8.6, 0, 0], [12.4, 0, 0],
                                [16.2, 0, 0]])
    np.testing.assert_allclose(atoms.centroid, [8.6, 0, 0])
    with pytest.raises(CryosviError, match="chain W .*no CA"):
        load_pseudo_atoms(path, chain="W")


def test_errors_are_one_line(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\nthis is not a structure\n")
    binary = tmp_path / "binary.pdb"
    binary.write_bytes(bytes(range(256)) * 4)
    bad_cif = tmp_path / "bad.cif"
    bad_cif.write_text("data_x\nloop_\n_atom_site.id\n")
    waters = tmp_path / "waters.pdb"
    waters.write_text("HETATM    1  O   HOH W 301      40.000   0.000   0.000  1.00  0.00           O\n")
    cases = [
        ((tmp_path / "missing.pdb",), "not found"),
        ((tmp_path,), "not a file"),
        ((junk,), "no atoms"),
        ((binary,), "no atoms|cannot read"),
        ((bad_cif,), "no atoms|cannot read"),
        ((waters,), r"no protein chain .*chains: W"),
        ((default_structure_path(), "C"), r"chain 'C' not in .*available chains: A, B"),
        ((default_structure_path(), "A", 0), "stride"),
        ((default_structure_path(), "A", 1, "all"), "beads must be one of ca, residue"),
    ]
    for arguments, pattern in cases:
        with pytest.raises(CryosviError, match=pattern) as error:
            load_pseudo_atoms(*arguments)
        assert "\n" not in str(error.value)
