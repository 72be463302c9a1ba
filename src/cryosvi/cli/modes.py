"""``cryosvi modes``: ANM normal modes of a structure, to an .npz (and optional movies)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from cryosvi.cli.common import (HelpFormatter, add_structure_arguments, integer_between,
                                number)
from cryosvi.errors import CryosviError
from cryosvi.io.atomic import save_npz_atomically
from cryosvi.io.outputs import (check_output_directory, check_output_file, mark_directory,
                                output_path, provenance_array)

MODES_KIND = "modes"
MOVIE_KIND = "mode movies"


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "modes", help=summary,
        description="Compute the lowest ANM normal modes (Atilgan et al. 2001) of the "
        "pseudo-atoms (a bead per residue, see --beads) of one chain and write them to an "
        ".npz: coords (N, 3) Å centred on their centroid, eigenvalues (K,) in units of "
        "gamma, modes (K, N, 3) orthonormal as 3N-vectors (an amplitude a in Å RMS per "
        "pseudo-atom moves the atoms by a * sqrt(N) * mode), plus centroid (3,) Å, "
        "residue_names, residue_numbers.",
        formatter_class=HelpFormatter)
    parser.add_argument("--structure", help="PDB/mmCIF file (default: bundled 1OL5)")
    add_structure_arguments(parser, stride=1, beads="ca")
    parser.add_argument("--cutoff", type=number(0.0, 1000.0, low_open=True), default=15.0,
                        help="spring cutoff, Å")
    parser.add_argument("--gamma", type=number(0.0, 1e6, low_open=True), default=1.0,
                        help="spring constant")
    parser.add_argument("--n-modes", type=integer_between(1, 1000), default=10,
                        help="number of lowest internal modes (< 3N - 6)")
    parser.add_argument("-o", "--output", required=True, help="output .npz file")
    parser.add_argument("--movie", metavar="DIR",
                        help="also write DIR/mode_01.pdb, ...: one multi-model CA PDB per "
                        "mode, a sine sweep of the amplitude (ChimeraX, PyMOL; default: no "
                        "movies)")
    parser.add_argument("--movie-amplitude", type=number(0.0, 1000.0, low_open=True),
                        default=2.0, help="peak movie amplitude, Å RMS per pseudo-atom")
    parser.add_argument("--movie-frames", type=integer_between(2, 1000), default=20,
                        help="frames per movie (one period)")
    parser.add_argument("--force", action="store_true",
                        help="replace outputs an earlier 'cryosvi modes' wrote (never other "
                        "files)")
    parser.set_defaults(func=run)


def run(args) -> None:
    import numpy as np

    from cryosvi.physics.anm import anm_modes, write_mode_movie
    from cryosvi.physics.structure import default_structure_path, load_pseudo_atoms

    output = output_path(args.output)
    if output.suffix.lower() != ".npz":
        raise CryosviError(f"-o {output}: the modes are an .npz file; give a name ending "
                           "in .npz")
    path = Path(args.structure) if args.structure else default_structure_path()
    check_output_file(output, MODES_KIND, args.force, inputs=[path])
    if args.movie is not None:
        check_output_directory(args.movie, MOVIE_KIND, args.force, inputs=[path, output],
                               option="--movie")
    atoms = load_pseudo_atoms(path, chain=args.chain, stride=args.stride, beads=args.beads)
    limit = 3 * atoms.n_atoms - 6
    if args.n_modes >= limit:
        raise CryosviError(f"--n-modes must be < 3N - 6 = {limit} for the N = "
                           f"{atoms.n_atoms} pseudo-atoms of chain {atoms.chain}, "
                           f"got {args.n_modes}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        modes = anm_modes(atoms.coords, n_modes=args.n_modes, cutoff=args.cutoff,
                          gamma=args.gamma)
    for warning in caught:
        print(f"cryosvi modes: warning: {warning.message}", file=sys.stderr)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomically(
        output, coords=atoms.coords, eigenvalues=modes.eigenvalues, modes=modes.vectors,
        centroid=atoms.centroid, residue_names=np.array(atoms.residue_names),
        residue_numbers=atoms.residue_numbers, chain=np.array(atoms.chain),
        structure=np.array(str(path)), stride=np.array(args.stride),
        beads=np.array(args.beads), cutoff=np.array(args.cutoff), gamma=np.array(args.gamma),
        cryosvi=provenance_array(MODES_KIND))
    print(f"{atoms.n_atoms} pseudo-atoms (chain {atoms.chain}, stride {args.stride}, "
          f"beads {args.beads}), "
          f"{modes.n_modes} modes, eigenvalues {modes.eigenvalues[0]:.4g} .. "
          f"{modes.eigenvalues[-1]:.4g} -> {output}")
    if args.movie is not None:
        Path(args.movie).mkdir(parents=True, exist_ok=True)
        mark_directory(args.movie, MOVIE_KIND)  # first: a killed run leaves it marked
        paths = write_mode_movie(atoms.coords + atoms.centroid, modes.vectors, args.movie,
                                 amplitude=args.movie_amplitude, n_frames=args.movie_frames,
                                 residue_names=atoms.residue_names,
                                 residue_numbers=atoms.residue_numbers, chain=atoms.chain)
        print(f"{len(paths)} mode movies ({args.movie_frames} frames, "
              f"{args.movie_amplitude:g} Å RMS) -> {args.movie}")
