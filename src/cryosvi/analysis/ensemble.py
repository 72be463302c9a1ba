"""Atomic models along the conformational coordinates: every atom of a structure's chain
moved as the reference's pseudo-atoms move.

The reference has one pseudo-atom per residue of one chain (every ``stride``-th;
``cryosvi.physics.structure``) and moves them linearly, coords + sqrt(N) sum_k a_k u_k
(amplitudes a_k in Å RMS per pseudo-atom). The atoms follow:

* modes learnt in a basis of rigid blocks or chain segments (``Reference.blocks``:
  ``cryosvi learn-modes --basis blocks|segments``, or ``auto`` choosing one): the atoms
  of each block move rigidly, by the finite rotation R = exp([w]_x) (angle |w| about
  w / |w|) about the block's centre c and the translation t, where (w, t) is the
  block's infinitesimal rigid motion at the amplitudes (linear in them, offset
  included); x -> x + (R - I)(x - c) + t. To first order this is the pseudo-atoms'
  linear displacement; beyond it the rotation keeps every distance within the block,
  where the linear displacement stretches the block (a 30 deg hinge moves an atom 20 Å
  from the axis 10.4 Å along the chord, where the tangent of the linear model ends 2.6
  Å farther from the axis);
* other modes (ANM, or learnt in the ANM basis): each atom moves with the displacement
  of its residue's pseudo-atom from its place in the structure (the reference's coords
  at the amplitudes minus the structure's pseudo-atoms).

Atoms of residues without a pseudo-atom of their own (every other residue at stride 2,
residues without a CA, and the chain's ligands, ions and waters) follow the pseudo-atom
nearest to the residue's centroid. Coordinates stay in the structure's own frame
(``Reference.centroid`` + the reference's frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
import torch
from scipy.spatial import cKDTree

from cryosvi.errors import CryosviError
from cryosvi.io.atomic import write_atomically
from cryosvi.physics.rotations import quaternion_to_matrix, rotation_vector_to_quaternion
from cryosvi.physics.structure import load_pseudo_atoms, read_structure
from cryosvi.reference import Reference

MATCH_TOLERANCE = 0.05
"""Å: the largest distance between a pseudo-atom of the structure given to ``analyze``
and the reference's, for the structure to be the one the reference was made from (PDB
files round coordinates to 0.001 Å)."""


@dataclass
class ChainAtoms:
    """Every atom of one chain of a structure, and the pseudo-atom each follows.

    structure: the structure read (first model, first alternative conformation);
    chain: the chain's name; path: the file; positions (A, 3) float64 Å, file frame, in
    the order of the chain's residues and atoms; follows (A,) int: the pseudo-atom each
    atom moves with; beads (N, 3): the structure's pseudo-atoms in the reference's frame;
    trace (A,) bool: the C-alpha atoms of the polymer residues (the chain's trace).
    """

    structure: gemmi.Structure
    chain: str
    path: str
    positions: np.ndarray
    follows: np.ndarray
    beads: np.ndarray
    trace: np.ndarray

    @property
    def n_atoms(self) -> int:
        return len(self.positions)

    def chains(self) -> list[gemmi.Chain]:
        """The gemmi chains of this name in the first model (an mmCIF chain may come in
        several parts: polymer, ligands, waters)."""
        return [chain for chain in self.structure[0] if chain.name == self.chain]


def _residues(chains: list[gemmi.Chain]):
    for chain in chains:
        yield from chain


def chain_atoms(reference: Reference, structure: str | Path | None = None,
                chain: str | None = None) -> ChainAtoms:
    """The atoms of ``chain`` of ``structure`` (default: the chain and the file the
    reference records in ``source``), checked against the reference's pseudo-atoms
    (same count, each within MATCH_TOLERANCE; built with the reference's stride and
    beads). CryosviError for a missing file, an unknown chain or a structure that is not
    the reference's."""
    source = reference.source or {}
    if structure is None:
        if not source.get("structure"):
            raise CryosviError("the run's reference records no structure it was built from; "
                               "give the atomic model with --structure (and --chain)")
        structure = source["structure"]
        if not Path(structure).is_file():
            raise CryosviError(f"the run's reference was built from {structure}, which is not "
                               "there (from this folder); give it with --structure")
    chain = chain or source.get("chain")
    stride, beads = int(source.get("stride", 1)), str(source.get("beads", "ca"))
    pseudo = load_pseudo_atoms(structure, chain=chain, stride=stride, beads=beads)
    found = pseudo.coords + pseudo.centroid - np.asarray(reference.centroid, np.float64)
    where = f"{structure} chain {pseudo.chain} (stride {stride}, {beads} beads)"
    if len(found) != reference.n_atoms:
        raise CryosviError(f"{where} gives {len(found)} pseudo-atoms but the run's reference "
                           f"has {reference.n_atoms}: not the structure (or chain) the "
                           "reference was built from")
    _check_match(found, reference, where)
    model = read_structure(structure)
    chains = [c for c in model[0] if c.name == pseudo.chain]
    keys = _bead_residues(chains, stride)
    residues = list(_residues(chains))
    numbers = [residues[r].seqid.num for r in keys]
    if numbers != pseudo.residue_numbers.tolist():  # the same selection as structure.py's
        raise RuntimeError(f"{where}: the pseudo-atoms' residues differ from "
                           "cryosvi.physics.structure's")
    positions, residue_of, trace = [], [], []
    carbon = gemmi.Element("C")
    for r, residue in enumerate(residues):
        for atom in residue:
            positions.append(atom.pos.tolist())
            residue_of.append(r)
            trace.append(atom.name == "CA" and atom.element == carbon)
    positions = np.array(positions, np.float64).reshape(-1, 3)
    residue_of = np.array(residue_of, np.int64)
    bead_of_residue = np.full(len(residues), -1)
    bead_of_residue[list(keys)] = list(keys.values())
    missing = np.flatnonzero(bead_of_residue < 0)
    if len(missing):  # no pseudo-atom of their own: the one nearest their centroid
        sums = np.zeros((len(residues), 3))
        np.add.at(sums, residue_of, positions - np.asarray(reference.centroid, np.float64))
        centroids = sums / np.maximum(np.bincount(residue_of, minlength=len(residues)),
                                      1)[:, None]
        bead_of_residue[missing] = cKDTree(found).query(centroids[missing])[1]
    return ChainAtoms(model, pseudo.chain, str(structure), positions,
                      bead_of_residue[residue_of], found, np.array(trace, bool))


def _bead_residues(chains: list[gemmi.Chain], stride: int) -> dict[int, int]:
    """{residue index in the chain's residues: its pseudo-atom}: every ``stride``-th
    polymer residue with a carbon CA, as ``cryosvi.physics.structure`` picks them."""
    carbon = gemmi.Element("C")
    keys, count, r = {}, 0, 0
    for chain in chains:
        polymer = {(str(residue.seqid), residue.name) for residue in chain.get_polymer()
                   if any(a.name == "CA" and a.element == carbon for a in residue)}
        for residue in chain:
            if (str(residue.seqid), residue.name) in polymer:
                if count % stride == 0:
                    keys[r] = count // stride
                count += 1
            r += 1
    return keys


def _check_match(found: np.ndarray, reference: Reference, where: str) -> None:
    """The structure's pseudo-atoms ``found`` are the reference's: within MATCH_TOLERANCE
    of ``structure_beads``; for a learnt reference of an earlier version, which kept no
    structure_coords, at the RMS distance the learnt mean conformation moved them."""
    deviation = np.linalg.norm(found - reference.structure_beads, axis=1)
    if deviation.max() <= MATCH_TOLERANCE:
        return
    learnt = (reference.source or {}).get("learnt") or {}
    rms = float(np.sqrt(np.mean(deviation ** 2)))
    if reference.structure_coords is None and "centre_rms" in learnt and \
            abs(rms - learnt["centre_rms"]) <= MATCH_TOLERANCE:
        return
    raise CryosviError(f"{where} does not match the run's reference: its pseudo-atoms are "
                       f"up to {deviation.max():.2f} Å (RMS {rms:.2f} Å) from the "
                       "reference's; give the structure the reference was built from")


def _rotation_matrices(vectors: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vectors (rad) -> (..., 3, 3) matrices, float64."""
    vectors = torch.as_tensor(vectors, dtype=torch.float64)
    return quaternion_to_matrix(rotation_vector_to_quaternion(vectors)).numpy()


def block_displacements(positions: np.ndarray, block: np.ndarray, centres: np.ndarray,
                        rotations: np.ndarray, translations: np.ndarray) -> np.ndarray:
    """(A, 3) Å: atoms at ``positions`` (A, 3) of blocks ``block`` (A,) moved rigidly,
    block b by the finite rotation of rotation vector ``rotations[b]`` (rad) about
    ``centres[b]`` and the translation ``translations[b]``: (R_b - I)(x - c_b) + t_b.
    Exactly 0 for a block whose rotation and translation are 0."""
    matrices = _rotation_matrices(rotations) - np.eye(3)  # (B, 3, 3)
    arm = positions - centres[block]
    return np.einsum("aij,aj->ai", matrices[block], arm) + translations[block]


def displacements(atoms: ChainAtoms, reference: Reference,
                  amplitudes: np.ndarray) -> np.ndarray:
    """(M, A, 3) Å: how far every atom moves from the structure at each of M amplitude
    vectors ``amplitudes`` (M, K) of the reference's modes (module docstring)."""
    amplitudes = np.atleast_2d(np.asarray(amplitudes, np.float64))
    if amplitudes.shape[1] != reference.n_modes:
        raise ValueError(f"amplitudes of {amplitudes.shape[1]} modes for a reference of "
                         f"{reference.n_modes}")
    frame = atoms.positions - np.asarray(reference.centroid, np.float64)
    blocks = reference.blocks
    out = np.empty((len(amplitudes), atoms.n_atoms, 3))
    if blocks is not None:
        structure = reference.structure_beads
        labels = blocks.labels
        centres = np.stack([structure[labels == b].mean(0) for b in range(blocks.n_blocks)])
        for m, a in enumerate(amplitudes):
            rotation = blocks.offset_rotation + np.einsum("k,kbd->bd", a, blocks.rotations)
            translation = blocks.offset_translation + np.einsum("k,kbd->bd", a,
                                                                 blocks.translations)
            out[m] = block_displacements(frame, labels[atoms.follows], centres, rotation,
                                         translation)
        return out
    scale = math.sqrt(reference.n_atoms)
    for m, a in enumerate(amplitudes):
        moved = reference.coords + scale * np.einsum("k,knd->nd", a, reference.modes)
        out[m] = (moved - atoms.beads)[atoms.follows]
    return out


def ensemble_structure(atoms: ChainAtoms, positions: np.ndarray) -> gemmi.Structure:
    """A structure of M models (numbered 1..M), each the chain with the atoms at
    ``positions`` (M, A, 3) Å (file frame, the order of ``ChainAtoms.positions``); no
    unit cell (the models are not a crystal)."""
    out = gemmi.Structure()
    out.name = atoms.structure.name or Path(atoms.path).stem
    for m, frame in enumerate(positions):
        model = gemmi.Model(str(m + 1))
        for chain in atoms.chains():
            model.add_chain(chain)
        flat = iter(frame)
        for chain in model:
            for residue in chain:
                for atom in residue:
                    atom.pos = gemmi.Position(*next(flat))
        out.add_model(model)
    out.setup_entities()
    return out


def write_ensemble(structure: gemmi.Structure, pdb: str | Path, cif: str | Path) -> None:
    """The ensemble as a multi-model PDB (MODEL/ENDMDL records) and mmCIF, atomically."""
    options = gemmi.PdbWriteOptions()
    options.cryst1_record = False  # no unit cell: a fake 1 Å cell confuses viewers
    write_atomically(pdb, lambda temporary: structure.write_pdb(str(temporary), options))
    document = structure.make_mmcif_document()
    write_atomically(cif, lambda temporary: document.write_file(str(temporary)))


def plot_ensemble(atoms: ChainAtoms, positions: np.ndarray, path: str | Path,
                  title: str) -> None:
    """``path`` (PNG): the C-alpha trace of every model of ``positions`` (M, A, 3),
    coloured from the first to the last, seen along the structure's smallest and middle
    principal axes (two panels, Å)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    trace = positions[:, atoms.trace]  # (M, C, 3)
    centred = trace - trace[0].mean(0)
    axes = np.linalg.svd(centred[0], full_matrices=False)[2]  # rows: principal axes
    # a gap in the trace: consecutive C-alphas farther apart than a peptide bond allows
    gaps = np.linalg.norm(np.diff(trace[0], axis=0), axis=1) > 4.5
    pieces = np.split(np.arange(trace.shape[1]), np.flatnonzero(gaps) + 1)
    colours = colormaps["coolwarm"](np.linspace(0, 1, len(trace)))
    figure = Figure(figsize=(10, 4.8), layout="constrained")
    panels = figure.subplots(1, 2)
    for panel, (u, v) in zip(panels, ((0, 1), (0, 2))):
        for m, model in enumerate(centred):
            plane = model @ axes[[u, v]].T
            for piece in pieces:
                panel.plot(*plane[piece].T, color=colours[m], lw=0.9,
                           label=f"model {m + 1}" if piece is pieces[0] else None)
        panel.set_aspect("equal")
        panel.set_xlabel(f"principal axis {u + 1} (Å)")
        panel.set_ylabel(f"principal axis {v + 1} (Å)")
    panels[0].legend(fontsize=7, loc="best")
    figure.suptitle(title, fontsize=10)
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png",
                                                            dpi=110))


def chimerax_script(ensemble: str, maps: list[str], coordinate: str, box: int | None,
                    pixel_size: float | None, centre: np.ndarray) -> str:
    """The text of ``view.cxc``: the ensemble as one model with a coordinate set per bin
    (``coordset``) and the bins' maps, if any, as a volume series, their voxel L/2 (the
    particles' rotation centre, as RELION reconstructs it) on the reference's centroid
    ``centre`` (Å, file frame) so that maps and models overlap. Paths relative to the
    script's folder (ChimeraX runs a .cxc from its own folder)."""
    lines = [f"# cryosvi analyze: models and maps along {coordinate}, one per bin",
             f"open {ensemble} coordsets true",
             "coordset slider #1"]
    if maps:
        origin = np.asarray(centre) - (box // 2) * pixel_size
        lines += [f"open {' '.join(maps)} vseries true",
                  f"volume #2 origin {origin[0]:.3f},{origin[1]:.3f},{origin[2]:.3f}",
                  "vseries slider #2"]
    return "\n".join(lines) + "\n"
