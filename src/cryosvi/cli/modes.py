"""``cryosvi modes``: ANM normal modes of a structure, to an .npz (and optional movies)."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from cryosvi.cli.common import positive, positive_int
from cryosvi.errors import CryosviError
from cryosvi.io.atomic import save_npz_atomically


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "modes", help=summary,
        description="Compute the lowest ANM normal modes (Atilgan et al. 2001) of the CA "
        "pseudo-atoms of one chain and write them to an .npz: coords (N, 3) Å centred on "
        "their centroid, eigenvalues (K,) in units of gamma, modes (K, N, 3) orthonormal "
        "as 3N-vectors (an amplitude a in Å RMS per pseudo-atom moves the atoms by "
        "a * sqrt(N) * mode), plus centroid (3,) Å, residue_names, residue_numbers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--structure", help="PDB/mmCIF file (default: bundled 1OL5)")
    parser.add_argument("--chain", help="chain ID (default: first protein chain)")
    parser.add_argument("--stride", type=positive_int, default=1, help="keep every k-th CA")
    parser.add_argument("--cutoff", type=positive, default=15.0, help="spring cutoff, Å")
    parser.add_argument("--gamma", type=positive, default=1.0, help="spring constant")
    parser.add_argument("--n-modes", type=positive_int, default=10,
                        help="number of lowest internal modes (< 3N - 6)")
    parser.add_argument("-o", "--output", required=True, help="output .npz file")
    parser.add_argument("--movie", metavar="DIR",
                        help="also write DIR/mode_01.pdb, ...: one multi-model CA PDB per "
                        "mode, a sine sweep of the amplitude (ChimeraX, PyMOL)")
    parser.add_argument("--movie-amplitude", type=positive, default=2.0,
                        help="peak movie amplitude, Å RMS per pseudo-atom")
    parser.add_argument("--movie-frames", type=positive_int, default=20,
                        help="frames per movie (one period)")
    parser.set_defaults(func=run)


def run(args) -> None:
    import numpy as np

    from cryosvi.anm import anm_modes, write_mode_movie
    from cryosvi.structure import default_structure_path, load_pseudo_atoms

    for name in ("cutoff", "gamma", "movie_amplitude"):
        value = getattr(args, name)
        if not math.isfinite(value):
            raise CryosviError(f"--{name.replace('_', '-')} must be finite, got {value}")
    output = Path(args.output)
    if output.is_dir():
        raise CryosviError(f"output {output} is a directory; give a file name (.npz)")
    if not output.parent.is_dir():
        raise CryosviError(f"output directory does not exist: {output.parent}")
    if args.movie and Path(args.movie).exists() and not Path(args.movie).is_dir():
        raise CryosviError(f"--movie {args.movie} exists and is not a directory")
    if args.movie_frames < 2:
        raise CryosviError(f"--movie-frames must be >= 2, got {args.movie_frames}")
    path = Path(args.structure) if args.structure else default_structure_path()
    atoms = load_pseudo_atoms(path, chain=args.chain, stride=args.stride)
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
    save_npz_atomically(
        output, coords=atoms.coords, eigenvalues=modes.eigenvalues, modes=modes.vectors,
        centroid=atoms.centroid, residue_names=np.array(atoms.residue_names),
        residue_numbers=atoms.residue_numbers, chain=np.array(atoms.chain),
        structure=np.array(str(path)), stride=np.array(args.stride),
        cutoff=np.array(args.cutoff), gamma=np.array(args.gamma))
    print(f"{atoms.n_atoms} pseudo-atoms (chain {atoms.chain}, stride {args.stride}), "
          f"{modes.n_modes} modes, eigenvalues {modes.eigenvalues[0]:.4g} .. "
          f"{modes.eigenvalues[-1]:.4g} -> {output}")
    if args.movie:
        paths = write_mode_movie(atoms.coords + atoms.centroid, modes.vectors, args.movie,
                                 amplitude=args.movie_amplitude, n_frames=args.movie_frames,
                                 residue_names=atoms.residue_names,
                                 residue_numbers=atoms.residue_numbers, chain=atoms.chain)
        print(f"{len(paths)} mode movies ({args.movie_frames} frames, "
              f"{args.movie_amplitude:g} Å RMS) -> {args.movie}")
