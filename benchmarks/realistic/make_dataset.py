"""A realistic particle data set made outside cryosvi's own physics, projected by RELION.

    python benchmarks/realistic/make_dataset.py -o DIR [--preset poses-given|ctf-shifts-given]
        [--n 2000] [--snr 0.1] [--seed 0] [--bins 41] [--max-angle 30]
        [--twist 25 --twist-bins 11] ...

What it makes (see benchmarks/realistic/README.md):
1. Structure: all atoms of 1OL5 chain A (Aurora-A kinase domain, residues 123-388 with
   the two phosphothreonines; waters, ADP, Mg and sulphate left out).
2. Conformations: a rigid hinge rotation of the N-lobe (residues <= 210) about an axis
   through the hinge (C-alpha atoms of Glu211-Tyr212-Ala213), normal to the plane of the
   hinge and the two lobes' centres of mass, so that a positive angle opens the cleft
   between the lobes. Not an elastic-network mode. The hinge angle t (degrees) is drawn
   uniformly from the bins 0, dt, ..., max_angle; the bin's exact t is the truth.
   With ``--twist U`` (default 0: off), a second motion, drawn independently of the
   hinge: the C-lobe (residues >= 214) twists rigidly about its own axis, the line from
   the hinge point through its centre of mass, by an angle u uniform over ``--twist-bins``
   bins 0, ..., U (truth ``cryosviTrueConformation2``). The two lobes turn about axes
   through the fixed hinge point and move disjoint atoms, so the motions commute and
   their displacements are orthogonal; a twist of the lobes about the axis that joins
   them is, with the opening and closing of the cleft, one of the two interlobe motions
   of protein kinases. Every pair of bins (t, u) has its map.
3. Maps: gemmi's electron-scattering density (DensityCalculatorE, ITC Vol. C 4.3.2.2
   five-Gaussian form factors, each atom's B plus ``--blur``) on a grid of half the pixel
   size, Fourier-cropped to ``--box`` x ``--pixel`` Å (so the 2 Å map is band-limited
   instead of aliased); the reference conformation's (t = 0) centre of mass sits on the
   centre voxel (L//2, L//2, L//2), RELION's origin.
4. Images: ``relion_project --ctf`` (RELION 3.1), one call per conformation bin over that
   bin's particles: true poses (uniform on SO(3)), true astigmatic defocus, two optics
   groups, shifts rlnOriginXAngst/YAngst uniform in +-max_shift Å. Merged into one stack.
5. White Gaussian noise at the data-set SNR (variance of all clean pixels / noise
   variance), then each image normalised as relion_preprocess --norm --no_ramp does:
   the background (pixels farther than ``--bg-radius`` px from the centre) to mean 0, std 1.
   Micrograph effects (all off by default; ``--realistic`` turns every one on with the
   values of REALISTIC, explicit options win) change step 5, in this order:
   a. ``--bfactor B``: the clean images times the envelope exp(-B s^2 / 4) (RELION's
      CTF B convention), by rfft2 on the L x L grid;
   b. ``--junk-fraction f``: a random fraction f of the images is junk (cryosviTrueJunk
      1), of which ``--scrambled-share`` are phase-scrambled (the particle's own clean
      image with its Fourier phases replaced by those of white noise: the same power
      spectrum, no structure; cryosviTrueJunkKind 2) and the rest empty (kind 1);
   c. ``--contrast-spread c``: each image's signal times a lognormal contrast of mean 1,
      log-std c (ice thickness, dose; cryosviTrueContrast);
   d. the noise std from the SNR: the signal variance over the real particles' pixels
      (after a-c) / SNR;
   e. ``--noise-spectrum coloured``: the same white draws filtered by sqrt(S_g(k)) of
      each image's optics group g, S_g = (1 + A_g exp(-nu^2 / (2 w_g^2))) r_g^((nu /
      0.5)^2) at nu = |k| / L cycles/px (excess A_g at low frequency, power r_g at
      Nyquist relative to the flat part), scaled to a mean of 1 over the L x L grid (the
      pixel variance stays noise_std^2 and the SNR keeps its meaning);
      ``--spectrum-excess/-width/-nyquist`` give A, w, r per group;
   f. ``--noise-spread l``: each image's noise times a lognormal level lambda_i with
      E[lambda_i^2] = 1, log-std l (cryosviTrueNoiseScale);
   then the normalisation. The effects draw from their own random stream, so the
   defaults give the stack of the script without them, bit for bit, and every effect's
   draws happen whether it is on or not (``--junk-fraction`` changes nothing else).
   truth.json["noise"] holds the spectrum per group and shell (shell = round(|k|)); a
   particle's noise spectrum after normalisation is cryosviNoiseStd^2 S_g.
6. particles.star (RELION 3.1: optics + particles) with the "given" columns a user has
   after consensus refinement (poses ~2 deg off, CTF estimates, shifts) and the truth in
   cryosviTrue* columns; truth.star, the truth under RELION's labels (for
   ``cryosvi evaluate``); truth.json with every setting, the command line and the checks.

Two checks are printed and recorded: the sign RELION gives rlnOriginXAngst/YAngst (found
by projecting the reference map with a known origin) and an oracle that knows the true
maps, poses and CTFs and picks, for a few particles, the conformation bin whose noise-free
RELION projection correlates best with the noisy image.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import scipy.stats
import starfile
import torch

from cryosvi.io.atomic import write_atomically
from cryosvi.physics.rotations import (geodesic_angle, matrix_to_euler, quaternion_to_matrix,
                               random_quaternions, rotation_vector_to_quaternion)
from cryosvi.physics.structure import default_structure_path, read_structure

# The two experiments' settings: poses from a consensus refinement (~2 deg off) at SNR
# 0.1, or CTF estimates and shifts given (pose, defocus and mode inferred) at SNR 1.
PRESETS = {
    "poses-given": {"snr": 0.1},
    "ctf-shifts-given": {"snr": 1.0},
}

# Aurora-A (1OL5 chain A) lobes: the N-lobe ends before the hinge Glu211-Tyr212-Ala213
# (Ala213's backbone pairs with the adenine of ATP); the C-lobe starts after it.
N_LOBE_LAST = 210
HINGE_RESIDUES = (211, 212, 213)

# Micrograph effects (``--realistic``): values typical of particles picked from micrographs.
REALISTIC = {"noise_spectrum": "coloured", "bfactor": 100.0, "contrast_spread": 0.25,
             "noise_spread": 0.15, "junk_fraction": 0.1}
# The coloured spectrum per optics group (300 kV, 200 kV): excess power at low frequency
# (x(1 + A) at zero frequency, a Gaussian of width w cycles/px: ice, beam-induced motion)
# and a fall-off to r x the flat level at Nyquist (a detector's MTF^2 / DQE), r^2 in the
# corners.
COLOURED = {"excess": (3.0, 2.0), "width": (0.05, 0.08), "nyquist": (0.4, 0.25)}

# Two optics groups of one data set: same pixel size and box, different microscopes.
OPTICS = [
    {"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnVoltage": 300.0,
     "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1},
    {"rlnOpticsGroup": 2, "rlnOpticsGroupName": "opticsGroup2", "rlnVoltage": 200.0,
     "rlnSphericalAberration": 2.0, "rlnAmplitudeContrast": 0.07},
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="output directory (created)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="one of the two experiments' settings: sets --snr "
                        "(explicit options win)")
    parser.add_argument("--n", type=int, default=2000, help="number of particles")
    parser.add_argument("--snr", type=float, default=None,
                        help="data-set SNR (default 0.1, or the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structure", default=str(default_structure_path()))
    parser.add_argument("--chain", default="A")
    parser.add_argument("--box", type=int, default=48, help="image and map box (px)")
    parser.add_argument("--pixel", type=float, default=2.0, help="pixel size (Å)")
    parser.add_argument("--blur", type=float, default=40.0,
                        help="B (Å^2) added to every atom's B in the density")
    parser.add_argument("--bins", type=int, default=41, help="conformation bins (maps)")
    parser.add_argument("--max-angle", type=float, default=30.0,
                        help="largest hinge angle (degrees); bins span 0..max")
    parser.add_argument("--twist", type=float, default=0.0,
                        help="largest twist of the C-lobe about its own axis (degrees), "
                             "a second motion drawn independently of the hinge; 0: none")
    parser.add_argument("--twist-bins", type=int, default=11,
                        help="with --twist: twist bins spanning 0..twist")
    parser.add_argument("--max-shift", type=float, default=6.0,
                        help="shifts uniform in +-max (Å)")
    parser.add_argument("--defocus-range", type=float, nargs=2, default=(8000.0, 25000.0),
                        help="defocus U uniform in this range (Å)")
    parser.add_argument("--max-astigmatism", type=float, default=1000.0,
                        help="U - V uniform in [0, max] (Å)")
    parser.add_argument("--pose-error", type=float, default=2.0,
                        help="RMS angle (degrees) of the consensus poses' error")
    parser.add_argument("--defocus-error", type=float, default=100.0,
                        help="std (Å) of the CTF estimates' error, common to U and V")
    parser.add_argument("--bg-radius", type=int, default=None,
                        help="normalisation: background beyond this radius (px); "
                             "default round(0.75 * box / 2)")
    parser.add_argument("--oracle", type=int, default=256,
                        help="particles for the oracle check (0: skip)")
    parser.add_argument("--save-clean", action="store_true",
                        help="also write clean.mrcs, the noise-free RELION images")
    add_effect_arguments(parser)
    args = parser.parse_args(argv)
    resolve_effects(args, parser)
    if args.snr is None:
        args.snr = PRESETS[args.preset]["snr"] if args.preset else 0.1
    if args.bg_radius is None:
        args.bg_radius = int(round(0.75 * args.box / 2))
    if args.n < 1 or args.bins < 1 or not args.snr > 0:
        parser.error("--n and --bins must be >= 1 and --snr > 0")
    if args.twist < 0 or args.twist_bins < 1:
        parser.error("--twist must be >= 0 and --twist-bins >= 1")
    if args.twist and args.oracle:
        parser.error("the oracle checks the hinge alone; give --oracle 0 with --twist")
    return args


def add_effect_arguments(parser: argparse.ArgumentParser) -> None:
    """The micrograph effects' options (module notes, step 5 a-f)."""
    real = parser.add_argument_group("micrograph effects (default off; --realistic: all on)")
    real.add_argument("--realistic", action="store_true",
                      help="turn every effect below on with the values of REALISTIC "
                           f"({', '.join(f'{k} {v}' for k, v in REALISTIC.items())}); "
                           "explicit options win")
    real.add_argument("--noise-spectrum", choices=("white", "coloured"), default=None,
                      help="noise power spectrum (default white)")
    real.add_argument("--spectrum-excess", type=float, nargs=2, default=None,
                      help="A per optics group: power excess at zero frequency over the "
                           f"flat part (default {COLOURED['excess']})")
    real.add_argument("--spectrum-width", type=float, nargs=2, default=None,
                      help="w per group: width (cycles/px) of the low-frequency excess "
                           f"(default {COLOURED['width']})")
    real.add_argument("--spectrum-nyquist", type=float, nargs=2, default=None,
                      help="r per group: power at Nyquist relative to the flat part "
                           f"(default {COLOURED['nyquist']})")
    real.add_argument("--bfactor", type=float, default=None,
                      help="B (Å^2) of an envelope exp(-B s^2/4) on the signal (default 0)")
    real.add_argument("--contrast-spread", type=float, default=None,
                      help="log-std of the per-particle contrast (default 0)")
    real.add_argument("--noise-spread", type=float, default=None,
                      help="log-std of the per-particle noise level (default 0)")
    real.add_argument("--junk-fraction", type=float, default=None,
                      help="fraction of junk images (default 0)")
    real.add_argument("--scrambled-share", type=float, default=0.5,
                      help="share of the junk that is phase-scrambled, the rest empty")


def resolve_effects(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the effects' defaults (REALISTIC's with --realistic) and check them."""
    defaults = {"noise_spectrum": "white", "bfactor": 0.0, "contrast_spread": 0.0,
                "noise_spread": 0.0, "junk_fraction": 0.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, REALISTIC[key] if args.realistic else value)
    for key in ("excess", "width", "nyquist"):
        if getattr(args, f"spectrum_{key}") is None:
            setattr(args, f"spectrum_{key}", list(COLOURED[key]))
    if not 0 <= args.junk_fraction < 1 or not 0 <= args.scrambled_share <= 1:
        parser.error("--junk-fraction must be in [0, 1) and --scrambled-share in [0, 1]")
    if min(args.bfactor, args.contrast_spread, args.noise_spread) < 0:
        parser.error("--bfactor, --contrast-spread and --noise-spread must be >= 0")
    if min(args.spectrum_width + args.spectrum_nyquist) <= 0 or min(args.spectrum_excess) < 0:
        parser.error("--spectrum-width and --spectrum-nyquist must be > 0, "
                     "--spectrum-excess >= 0")


def effects_on(args: argparse.Namespace) -> bool:
    return (args.noise_spectrum != "white" or bool(args.bfactor) or bool(args.contrast_spread)
            or bool(args.noise_spread) or bool(args.junk_fraction))


# ---------------------------------------------------------------- structure and hinge

def load_chain(path: str, chain: str) -> gemmi.Structure:
    """A structure holding only the polymer residues of ``chain`` (all atoms, first
    altloc), in a P1 cell (set later), so gemmi places no symmetry copies."""
    structure = read_structure(path)
    model = structure[0]
    polymer = model[chain].get_polymer()
    kept = gemmi.Structure()
    kept.name = structure.name
    new_model = gemmi.Model("1")
    new_chain = gemmi.Chain(chain)
    for residue in polymer:
        new_chain.add_residue(residue)
    new_model.add_chain(new_chain)
    kept.add_model(new_model)
    kept.spacegroup_hm = "P 1"
    kept.setup_entities()
    return kept


def atom_arrays(structure: gemmi.Structure):
    """(N, 3) positions Å, (N,) masses (Da), (N,) author residue numbers, (N,) atom
    names; file order."""
    atoms = [(residue.seqid.num, atom) for residue in structure[0][0] for atom in residue]
    positions = np.array([atom.pos.tolist() for _, atom in atoms])
    masses = np.array([atom.element.weight for _, atom in atoms])
    residues = np.array([number for number, _ in atoms])
    names = np.array([atom.name for _, atom in atoms])
    return positions, masses, residues, names


def lobe_vectors(positions, masses, residues, names):
    """(hinge point, N-lobe centre - hinge, C-lobe centre - hinge), each (3,) Å: the hinge
    point is the hinge residues' C-alpha centroid, the lobe centres are centres of mass."""
    hinge = positions[np.isin(residues, HINGE_RESIDUES) & (names == "CA")].mean(0)
    n_lobe, c_lobe = residues <= N_LOBE_LAST, residues > max(HINGE_RESIDUES)
    to_n = np.average(positions[n_lobe], axis=0, weights=masses[n_lobe]) - hinge
    to_c = np.average(positions[c_lobe], axis=0, weights=masses[c_lobe]) - hinge
    return hinge, to_n, to_c


def hinge_axis(positions, masses, residues, names):
    """(point (3,), unit direction (3,)) of the hinge axis, Å.

    The axis passes through the hinge's C-alpha centroid, normal to the plane of that
    point and the two lobes' centres of mass, oriented so that a positive right-handed
    rotation of the N-lobe increases the angle N-lobe - hinge - C-lobe (opens the cleft).
    """
    hinge, to_n, to_c = lobe_vectors(positions, masses, residues, names)
    direction = np.cross(to_c, to_n)  # a rotation about c x n takes n away from c
    return hinge, direction / np.linalg.norm(direction)


def cleft_angle(positions, masses, residues, names) -> float:
    """Angle (degrees) N-lobe centre - hinge C-alpha centroid - C-lobe centre."""
    _, a, b = lobe_vectors(positions, masses, residues, names)
    return math.degrees(math.acos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))


def rotation_matrix(direction, angle_deg: float) -> np.ndarray:
    """(3, 3) right-handed rotation by ``angle_deg`` about the unit ``direction``."""
    vector = torch.as_tensor(direction * math.radians(angle_deg), dtype=torch.float64)
    return quaternion_to_matrix(rotation_vector_to_quaternion(vector)).numpy()


def hinge_conformation(positions, residues, point, direction, angle_deg) -> np.ndarray:
    """(N, 3) Å: the N-lobe (residues <= N_LOBE_LAST) rotated rigidly about the axis."""
    moved = positions.copy()
    lobe = residues <= N_LOBE_LAST
    moved[lobe] = (positions[lobe] - point) @ rotation_matrix(direction, angle_deg).T + point
    return moved


def twist_axis(positions, masses, residues, names):
    """(point (3,), unit direction (3,)) Å of the C-lobe's own axis: from the hinge's
    C-alpha centroid through the C-lobe's centre of mass."""
    hinge, _, to_c = lobe_vectors(positions, masses, residues, names)
    return hinge, to_c / np.linalg.norm(to_c)


def twist_conformation(positions, residues, point, direction, angle_deg) -> np.ndarray:
    """(N, 3) Å: the C-lobe (residues > max(HINGE_RESIDUES)) rotated rigidly by
    ``angle_deg`` (right-handed) about its axis; the hinge and the N-lobe stay."""
    moved = positions.copy()
    lobe = residues > max(HINGE_RESIDUES)
    moved[lobe] = (positions[lobe] - point) @ rotation_matrix(direction, angle_deg).T + point
    return moved


# ---------------------------------------------------------------------------- maps

def density_map(structure: gemmi.Structure, positions, box: int, pixel: float,
                blur: float) -> np.ndarray:
    """(box, box, box) float32 map [z, y, x] of pixel ``pixel`` Å: gemmi's electron-
    scattering density of the atoms at ``positions`` (Å, box frame: voxel i at i * pixel),
    computed on a grid of pixel / 2 and Fourier-cropped (band-limited at Nyquist).
    Moves ``structure``'s atoms to ``positions`` and sets its cell to the box."""
    fine = 2 * box
    for atom, xyz in zip((a for r in structure[0][0] for a in r), positions):
        atom.pos = gemmi.Position(*xyz)
    structure.cell = gemmi.UnitCell(box * pixel, box * pixel, box * pixel, 90, 90, 90)
    calculator = gemmi.DensityCalculatorE()
    calculator.blur = blur
    calculator.grid.set_unit_cell(structure.cell)
    calculator.grid.spacegroup = gemmi.find_spacegroup_by_name("P 1")
    calculator.grid.set_size(fine, fine, fine)
    calculator.add_model_density_to_grid(structure[0])
    # gemmi's grid is indexed [u, v, w] = [x, y, z]; MRC and RELION want [z, y, x].
    values = np.array(calculator.grid, copy=True).transpose(2, 1, 0)
    return fourier_crop(values, box).astype(np.float32)


def fourier_crop(volume: np.ndarray, size: int) -> np.ndarray:
    """(n, n, n) -> (size, size, size) keeping the frequencies |k| < size / 2 (and the
    -size/2 plane), sample values preserved: the same grid points at a coarser spacing."""
    n = volume.shape[0]
    spectrum = np.fft.fftn(volume)
    keep = np.r_[0:size // 2, n - size // 2:n]
    cropped = spectrum[np.ix_(keep, keep, keep)]
    return np.fft.ifftn(cropped).real * (size / n) ** 3


def write_map(path: Path, data: np.ndarray, pixel: float) -> None:
    def write(temporary: Path) -> None:
        with mrcfile.new(temporary, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            mrc.voxel_size = pixel
    write_atomically(path, write)


def map_centre_of_mass(data: np.ndarray, pixel: float) -> np.ndarray:
    """(x, y, z) Å of the positive density's centre of mass (voxel i at i * pixel)."""
    weights = np.clip(data, 0, None)
    grids = np.meshgrid(*(np.arange(s) for s in data.shape), indexing="ij")
    zyx = np.array([(g * weights).sum() / weights.sum() for g in grids])
    return zyx[::-1] * pixel


# ------------------------------------------------------------------- particle table

def random_rotations(n: int, rng: np.random.Generator) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return quaternion_to_matrix(random_quaternions(n, generator, dtype=torch.float64))


def perturb(matrices: torch.Tensor, rms_deg: float, rng: np.random.Generator) -> torch.Tensor:
    """Each (n, 3, 3) rotation composed with a random small rotation whose rotation vector
    is isotropic Gaussian with RMS angle ``rms_deg`` (each component rms / sqrt 3)."""
    vectors = rng.normal(0.0, math.radians(rms_deg) / math.sqrt(3), size=(len(matrices), 3))
    error = quaternion_to_matrix(rotation_vector_to_quaternion(torch.as_tensor(vectors)))
    return error @ matrices


def sample_particles(args, angles: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """The per-particle truth and the given (estimated) values, RELION 3.1 labels."""
    n = args.n
    bins = rng.integers(len(angles), size=n)
    true = random_rotations(n, rng)
    given = perturb(true, args.pose_error, rng)
    true_euler = [a.numpy() for a in matrix_to_euler(true)]
    given_euler = [a.numpy() for a in matrix_to_euler(given)]
    defocus_u = rng.uniform(*args.defocus_range, size=n)
    defocus_v = defocus_u - rng.uniform(0, args.max_astigmatism, size=n)
    defocus_angle = rng.uniform(0, 180, size=n)
    shift_x, shift_y = rng.uniform(-args.max_shift, args.max_shift, size=(2, n))
    defocus_error = rng.normal(0, args.defocus_error, size=n) if args.defocus_error else 0.0
    groups = rng.integers(1, len(OPTICS) + 1, size=n)
    return pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
        "rlnOpticsGroup": groups,
        "rlnAngleRot": given_euler[0], "rlnAngleTilt": given_euler[1],
        "rlnAnglePsi": given_euler[2],
        "rlnOriginXAngst": shift_x, "rlnOriginYAngst": shift_y,
        "rlnDefocusU": defocus_u + defocus_error, "rlnDefocusV": defocus_v + defocus_error,
        "rlnDefocusAngle": defocus_angle,
        "cryosviTrueAngleRot": true_euler[0], "cryosviTrueAngleTilt": true_euler[1],
        "cryosviTrueAnglePsi": true_euler[2],
        "cryosviTrueOriginXAngst": shift_x, "cryosviTrueOriginYAngst": shift_y,
        "cryosviTrueDefocusU": defocus_u, "cryosviTrueDefocusV": defocus_v,
        "cryosviTrueDefocusAngle": defocus_angle,
        "cryosviTrueOpticsGroup": groups,
        "cryosviTrueConformation": angles[bins],
        "cryosviConformationBin": bins,
        "cryosviPoseError": geodesic_angle(true, given).numpy(),
    })


def optics_table(box: int, pixel: float) -> pd.DataFrame:
    table = pd.DataFrame(OPTICS)
    table["rlnImagePixelSize"] = pixel
    table["rlnImageSize"] = box
    table["rlnImageDimensionality"] = 2
    return table


def truth_for_relion(particles: pd.DataFrame) -> pd.DataFrame:
    """The columns relion_project reads, holding the truth."""
    return pd.DataFrame({
        "rlnAngleRot": particles["cryosviTrueAngleRot"],
        "rlnAngleTilt": particles["cryosviTrueAngleTilt"],
        "rlnAnglePsi": particles["cryosviTrueAnglePsi"],
        "rlnOriginXAngst": particles["cryosviTrueOriginXAngst"],
        "rlnOriginYAngst": particles["cryosviTrueOriginYAngst"],
        "rlnDefocusU": particles["cryosviTrueDefocusU"],
        "rlnDefocusV": particles["cryosviTrueDefocusV"],
        "rlnDefocusAngle": particles["cryosviTrueDefocusAngle"],
        "rlnOpticsGroup": particles["cryosviTrueOpticsGroup"],
    })


# --------------------------------------------------------------------------- RELION

def relion_project(map_path: Path, table: pd.DataFrame, optics: pd.DataFrame,
                   workdir: Path, name: str, pixel: float, ctf: bool = True) -> np.ndarray:
    """(len(table), L, L) float32: ``relion_project --ang`` of ``map_path`` for the rows
    of ``table`` (RELION 3.1 particle columns), in row order."""
    star = workdir / f"{name}_in.star"
    starfile.write({"optics": optics, "particles": table.reset_index(drop=True)}, star,
                   overwrite=True)
    command = ["relion_project", "--i", str(map_path), "--o", str(workdir / name),
               "--ang", str(star), "--angpix", str(pixel)] + (["--ctf"] if ctf else [])
    result = subprocess.run(command, capture_output=True, text=True)
    stack = workdir / f"{name}.mrcs"
    if result.returncode != 0 or not stack.exists():
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    images = mrcfile.read(stack)
    images = images.reshape(-1, *images.shape[-2:])
    for path in (star, stack, workdir / f"{name}.star"):
        path.unlink(missing_ok=True)
    if len(images) != len(table):
        raise RuntimeError(f"relion_project wrote {len(images)} images for {len(table)}")
    return images.astype(np.float32)


def image_centre_of_mass(image: np.ndarray) -> np.ndarray:
    """(x, y) px of an image's positive part."""
    weights = np.clip(image, 0, None)
    y, x = np.mgrid[:image.shape[0], :image.shape[1]]
    return np.array([(x * weights).sum(), (y * weights).sum()]) / weights.sum()


def shift_sign(map_path: Path, optics: pd.DataFrame, workdir: Path, pixel: float,
               shift: float) -> dict:
    """Project the map at identity pose without CTF with origins (0, 0), (s, 0), (0, s)
    Å; return how far (Å) the image's centre of mass moved in x and y."""
    table = pd.DataFrame({"rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0,
                          "rlnOriginXAngst": [0.0, shift, 0.0],
                          "rlnOriginYAngst": [0.0, 0.0, shift],
                          "rlnDefocusU": 10000.0, "rlnDefocusV": 10000.0,
                          "rlnDefocusAngle": 0.0, "rlnOpticsGroup": 1})
    images = relion_project(map_path, table, optics, workdir, "shift_check", pixel, ctf=False)
    centres = [image_centre_of_mass(image) for image in images]
    moved_x = (centres[1] - centres[0]) * pixel
    moved_y = (centres[2] - centres[0]) * pixel
    return {"origin_angst": shift, "moved_x_angst_for_origin_x": float(moved_x[0]),
            "moved_y_angst_for_origin_y": float(moved_y[1]),
            "sign": int(np.sign(moved_x[0])) if abs(moved_x[0]) > shift / 2 else 0}


# ------------------------------------------------------------------ noise and norm

def background_mask(box: int, radius: float) -> np.ndarray:
    """(box, box) bool: pixels farther than ``radius`` px from the centre (L//2, L//2)."""
    y, x = np.mgrid[:box, :box] - box // 2
    return np.hypot(x, y) > radius


def normalise(images: np.ndarray, mask: np.ndarray):
    """Background (``mask``) of each image to mean 0, std 1, as relion_preprocess --norm
    --no_ramp. Returns (normalised (n, L, L), means (n,), stds (n,))."""
    background = images[:, mask]
    means = background.mean(1)
    stds = background.std(1)
    return (images - means[:, None, None]) / stds[:, None, None], means, stds


def correlation(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Pearson correlation of each image (n, L, L) with each reference (n, k, L, L)."""
    a = images.reshape(len(images), 1, -1)
    b = references.reshape(*references.shape[:2], -1)
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


# ------------------------------------------------------------- micrograph effects
# numpy on purpose: the data are made outside cryosvi, whose estimators they test.

def shell_radius(box: int) -> np.ndarray:
    """(L, L//2 + 1) |k| in cycles per box of each rfft2 coefficient."""
    ky = np.fft.fftfreq(box, 1.0 / box)
    kx = np.fft.rfftfreq(box, 1.0 / box)
    return np.hypot(ky[:, None], kx[None, :])


def half_plane_weights(box: int) -> np.ndarray:
    """(L, L//2 + 1) how many full-grid coefficients each rfft2 coefficient stands for."""
    w = np.full((box, box // 2 + 1), 2.0)
    w[:, 0] = 1.0
    if box % 2 == 0:
        w[:, -1] = 1.0
    return w


def noise_shape(box: int, excess: float, width: float, nyquist: float) -> np.ndarray:
    """(L, L//2 + 1) the coloured spectrum at each rfft2 coefficient, scaled to a mean of
    1 over the L x L grid (pixel variance 1)."""
    nu = shell_radius(box) / box  # cycles per pixel
    shape = (1 + excess * np.exp(-nu**2 / (2 * width**2))) * nyquist ** ((nu / 0.5) ** 2)
    return shape / ((half_plane_weights(box) * shape).sum() / box**2)


def per_shell(values: np.ndarray) -> np.ndarray:
    """(L, L//2 + 1) -> (n_shells,): the mean over each shell round(|k|) of the full
    grid."""
    box = values.shape[0]
    index = np.round(shell_radius(box)).astype(int).ravel()
    w = half_plane_weights(box).ravel()
    return np.bincount(index, w * values.ravel()) / np.bincount(index, w)


def filter_images(images: np.ndarray, filt: np.ndarray) -> np.ndarray:
    """(n, L, L) images times ``filt`` ((L, L//2+1) or (n, L, L//2+1)) in rfft2 space."""
    box = images.shape[-1]
    return np.fft.irfft2(np.fft.rfft2(images) * filt, s=(box, box))


def phase_scrambled(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image with its Fourier amplitudes kept and its phases those of a white-noise
    image (Hermitian symmetry kept, so the result is real; DC kept): the same power
    spectrum, no structure."""
    box = images.shape[-1]
    phases = np.fft.rfft2(rng.normal(size=images.shape))
    phases = phases / np.maximum(np.abs(phases), 1e-30)
    phases[:, 0, 0] = 1.0
    return np.fft.irfft2(np.abs(np.fft.rfft2(images)) * phases, s=(box, box))


def signal_effects(clean: np.ndarray, args, effects: np.random.Generator) -> dict:
    """Steps a-c of the module notes on the clean images (in place): the envelope, the
    junk, the contrast. Returns the per-image truth: contrast, noise level (drawn here,
    used by ``noise_with_effects``) and junk kind (0 particle, 1 empty, 2 scrambled)."""
    n = len(clean)
    if args.bfactor:
        envelope = np.exp(-args.bfactor * (shell_radius(args.box) / (args.box * args.pixel))
                          ** 2 / 4)
        clean[:] = filter_images(clean.astype(np.float64), envelope)
    contrast = np.exp(args.contrast_spread * effects.normal(size=n) - args.contrast_spread**2 / 2)
    level = np.exp(args.noise_spread * effects.normal(size=n) - args.noise_spread**2)
    kind = np.zeros(n, int)
    if args.junk_fraction:
        junk = effects.random(n) < args.junk_fraction
        scrambled = junk & (effects.random(n) < args.scrambled_share)
        kind[junk] = 1
        kind[scrambled] = 2
        if scrambled.any():
            clean[scrambled] = phase_scrambled(clean[scrambled].astype(np.float64), effects)
        clean[kind == 1] = 0.0
    if args.contrast_spread:
        clean *= contrast[:, None, None].astype(np.float32)
    return {"contrast": contrast, "level": level, "kind": kind}


def noise_with_effects(shape, noise_std: float, group: np.ndarray, level: np.ndarray,
                       args, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Steps e-f: (noise (n, L, L) float32, each group's spectrum shape (L, L//2+1)).
    The white draws are the script's own (``rng``), whatever is switched on."""
    white = rng.normal(0.0, noise_std, size=shape)
    shapes = [np.ones((args.box, args.box // 2 + 1))] * len(OPTICS)
    if args.noise_spectrum == "coloured":
        shapes = [noise_shape(args.box, args.spectrum_excess[g], args.spectrum_width[g],
                              args.spectrum_nyquist[g]) for g in range(len(OPTICS))]
        white = filter_images(white, np.sqrt(np.stack(shapes))[group])
    if args.noise_spread:
        white = white * level[:, None, None]
    return white.astype(np.float32), shapes


def effect_columns(particles: pd.DataFrame, truth: dict, stds: np.ndarray, args) -> None:
    """The effects' truth columns of the switched-on effects."""
    if args.junk_fraction:
        particles["cryosviTrueJunk"] = (truth["kind"] > 0).astype(int)
        particles["cryosviTrueJunkKind"] = truth["kind"]
    if args.contrast_spread:
        particles["cryosviTrueContrast"] = truth["contrast"]
    if args.noise_spread:
        particles["cryosviTrueNoiseScale"] = truth["level"]
    # the signal's scale in the normalised image, per unit of RELION's projection
    particles["cryosviTrueSignalScale"] = truth["contrast"] / stds


def effects_truth(args, shapes: list, kind: np.ndarray) -> dict:
    """truth.json's record of the effects."""
    return {
        "noise": {
            "spectrum": args.noise_spectrum,
            "definition": "per optics group g, S_g per shell (shell = round(|k|), |k| in "
                          "cycles per box; mean of S over the shell's coefficients), in "
                          "units of the pixel variance (mean of S over the L x L grid = "
                          "1); a particle's noise spectrum is noise_std^2 * lambda_i^2 * "
                          "S_g before normalisation, cryosviNoiseStd^2 * S_g after",
            "shell_frequency_per_angstrom": (per_shell(shell_radius(args.box))
                                             / (args.box * args.pixel)).tolist(),
            "shells": {str(g + 1): per_shell(shapes[g]).tolist() for g in range(len(OPTICS))},
            "parameters": {"excess": args.spectrum_excess,
                           "width_cycles_per_px": args.spectrum_width,
                           "nyquist": args.spectrum_nyquist}
            if args.noise_spectrum == "coloured" else None,
            "noise_spread": args.noise_spread,
        },
        "bfactor": args.bfactor,
        "contrast_spread": args.contrast_spread,
        "junk": {"fraction": args.junk_fraction, "scrambled_share": args.scrambled_share,
                 "empty": int((kind == 1).sum()), "scrambled": int((kind == 2).sum())},
    }


def given_for_relion(particles: pd.DataFrame) -> pd.DataFrame:
    """The columns relion_project reads, holding the given values (consensus poses, CTF
    estimates, shifts)."""
    return particles[list(truth_for_relion(particles.iloc[:0]).columns)]


def oracle(particles, images, maps, angles, optics, workdir, pixel, chosen,
           given=False) -> dict:
    """For the particles ``chosen`` (indices), RELION's noise-free projections through
    every conformation map with the true (or, ``given``, the given) pose, CTF and shift;
    the bin whose projection correlates best with the noisy normalised image is the
    oracle's estimate of the conformation."""
    table = (given_for_relion if given else truth_for_relion)(particles.iloc[chosen])
    references = np.stack([relion_project(path, table, optics, workdir, f"oracle_{k:03d}",
                                          pixel) for k, path in enumerate(maps)], axis=1)
    scores = correlation(images[chosen], references)          # (count, bins)
    true_bin = particles["cryosviConformationBin"].to_numpy()[chosen]
    rows = np.arange(len(chosen))
    best = scores.argmax(1)
    neighbours = [scores[rows, np.clip(true_bin + d, 0, len(maps) - 1)] for d in (-1, 1)]
    far = [scores[rows, np.clip(true_bin + d, 0, len(maps) - 1)] for d in (-5, 5)]
    # Gaussian likelihood with the scale and offset fitted by least squares: the residual
    # is |x - mean x|^2 (1 - r_k^2); the posterior mean of t under the uniform prior.
    centred = images[chosen] - images[chosen].mean((1, 2), keepdims=True)
    energy = (centred.astype(np.float64) ** 2).sum((1, 2))
    noise_var = particles["cryosviNoiseStd"].to_numpy()[chosen] ** 2
    log_like = -energy[:, None] * (1 - scores.astype(np.float64) ** 2) / (2 * noise_var[:, None])
    weights = np.exp(log_like - log_like.max(1, keepdims=True))
    posterior_mean = (weights * angles).sum(1) / weights.sum(1)
    true_angle = angles[true_bin]
    varied = len(np.unique(true_bin)) > 1
    return {
        "particles": len(chosen),
        "true_bin_is_best": float((best == true_bin).mean()),
        "mean_corr_true": float(scores[rows, true_bin].mean()),
        "mean_corr_true_minus_neighbours_1": float((scores[rows, true_bin]
                                                     - np.mean(neighbours, 0)).mean()),
        "mean_corr_true_minus_neighbours_5": float((scores[rows, true_bin]
                                                     - np.mean(far, 0)).mean()),
        "median_abs_error_deg": float(np.median(np.abs(angles[best] - true_angle))),
        "spearman_best_bin": float(scipy.stats.spearmanr(best, true_bin).statistic)
        if varied else float("nan"),
        "spearman_posterior_mean": float(scipy.stats.spearmanr(posterior_mean,
                                                               true_angle).statistic)
        if varied else float("nan"),
    }


# ---------------------------------------------------------------------------- main

def write_star(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    def write(temporary: Path) -> None:
        starfile.write({"optics": optics, "particles": particles}, temporary, overwrite=True,
                       float_format="%.6f")
    write_atomically(path, write)


def write_stack(path: Path, images: np.ndarray, pixel: float) -> None:
    def write(temporary: Path) -> None:
        with mrcfile.new(temporary, overwrite=True) as mrc:
            mrc.set_data(images.astype(np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = pixel
    write_atomically(path, write)


def make_dataset(args) -> dict:
    start = time.perf_counter()
    if shutil.which("relion_project") is None:
        raise SystemExit("make_dataset: error: relion_project is not on PATH (RELION 3.1)")
    output = Path(args.output)
    (output / "maps").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    structure = load_chain(args.structure, args.chain)
    positions, masses, residues, names = atom_arrays(structure)
    point, direction = hinge_axis(positions, masses, residues, names)
    box_centre = np.full(3, (args.box // 2) * args.pixel)
    offset = box_centre - np.average(positions, axis=0, weights=masses)
    angles = np.linspace(0.0, args.max_angle, args.bins) if args.bins > 1 else np.zeros(1)

    timings = {}
    twist_point, twist_direction = twist_axis(positions, masses, residues, names)
    twists = (np.linspace(0.0, args.twist, args.twist_bins) if args.twist_bins > 1
              else np.zeros(1)) if args.twist else None

    tick = time.perf_counter()
    maps, cleft = [], []
    for k, angle in enumerate(angles):
        hinged = hinge_conformation(positions, residues, point, direction, angle)
        cleft.append(cleft_angle(hinged, masses, residues, names))
        for j, twist in enumerate([None] if twists is None else twists):
            # the lobes move disjoint atoms: the two motions commute
            moved = hinged if twist is None else twist_conformation(
                hinged, residues, twist_point, twist_direction, twist)
            data = density_map(structure, moved + offset, args.box, args.pixel, args.blur)
            if k == 0 and j == 0:
                com = map_centre_of_mass(data, args.pixel)
                if np.abs(com - box_centre).max() > 0.5:
                    raise RuntimeError(f"map centre of mass {com} Å is not the box centre")
            name = f"conformation_{k:03d}" + ("" if twists is None else f"_{j:03d}")
            maps.append(output / "maps" / f"{name}.mrc")
            write_map(maps[-1], data, args.pixel)
    timings["maps_s"] = time.perf_counter() - tick

    particles = sample_particles(args, angles, rng)
    if twists is not None:
        # A generator of its own: the hinge angles, poses, CTFs and noise pattern are
        # those of the same settings without --twist (the noise std follows the signal).
        second = np.random.default_rng([args.seed, 2]).integers(len(twists), size=args.n)
        particles["cryosviTrueConformation2"] = twists[second]
        particles["cryosviConformationBin2"] = second
        cell = particles["cryosviConformationBin"].to_numpy() * len(twists) + second
    else:
        cell = particles["cryosviConformationBin"].to_numpy()
    optics = optics_table(args.box, args.pixel)
    relion_truth = truth_for_relion(particles)
    clean = np.empty((args.n, args.box, args.box), np.float32)
    tick = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=output) as scratch:
        workdir = Path(scratch)
        for k, path in enumerate(maps):
            rows = np.flatnonzero(cell == k)
            if len(rows):
                clean[rows] = relion_project(path, relion_truth.iloc[rows], optics, workdir,
                                             f"bin_{k:03d}", args.pixel)
        timings["relion_project_s"] = time.perf_counter() - tick
        shift = shift_sign(maps[0], optics, workdir, args.pixel, args.max_shift)

        # The micrograph effects draw from their own stream (module notes, step 5).
        effects = signal_effects(clean, args, np.random.default_rng([args.seed, 1]))
        real = effects["kind"] == 0
        signal_variance = float(clean[real].astype(np.float64).var())
        noise_std = math.sqrt(signal_variance / args.snr)
        group = particles["cryosviTrueOpticsGroup"].to_numpy() - 1
        noise, shapes = noise_with_effects(clean.shape, noise_std, group, effects["level"],
                                           args, rng)
        noisy = clean + noise
        images, means, stds = normalise(noisy, background_mask(args.box, args.bg_radius))
        particles["cryosviNormMean"] = means
        particles["cryosviNormStd"] = stds
        # the noise pixel std after normalisation
        particles["cryosviNoiseStd"] = noise_std / stds * effects["level"]
        if effects_on(args):
            effect_columns(particles, effects, stds, args)

        tick = time.perf_counter()
        chosen = np.sort(rng.choice(np.flatnonzero(real), size=min(args.oracle, int(real.sum())),
                                    replace=False))
        oracle_result = {kind: oracle(particles, images, maps, angles, optics, workdir,
                                      args.pixel, chosen, given=kind == "given")
                         for kind in ("true", "given")} if args.oracle else None
        timings["oracle_s"] = time.perf_counter() - tick

    write_stack(output / "particles.mrcs", images, args.pixel)
    if args.save_clean:
        write_stack(output / "clean.mrcs", clean, args.pixel)
    write_star(output / "particles.star", optics, particles)
    # The truth under RELION's labels, for `cryosvi evaluate POSTERIOR truth.star`.
    truth_table = truth_for_relion(particles)
    truth_table.insert(0, "rlnImageName", particles["rlnImageName"])
    truth_table["cryosviTrueConformation"] = particles["cryosviTrueConformation"]
    if args.junk_fraction:
        truth_table["cryosviTrueJunk"] = particles["cryosviTrueJunk"]
    if twists is not None:
        truth_table["cryosviTrueConformation2"] = particles["cryosviTrueConformation2"]
    write_star(output / "truth.star", optics, truth_table)
    timings["total_s"] = time.perf_counter() - start

    truth = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "settings": {key: (list(value) if isinstance(value, tuple) else value)
                     for key, value in vars(args).items()
                     if args.twist or key not in ("twist", "twist_bins")},
        "structure": {"path": args.structure, "chain": args.chain,
                      "atoms": int(len(positions)),
                      "residues": [int(residues.min()), int(residues.max())],
                      "centre_of_mass_in_file_angst": (box_centre - offset).tolist(),
                      "density": "gemmi.DensityCalculatorE (electron scattering), "
                                 f"atom B + blur {args.blur} Å^2, grid {args.pixel / 2} Å, "
                                 f"Fourier-cropped to {args.pixel} Å"},
        "conformation": {"kind": "rigid hinge rotation of the N-lobe",
                         "n_lobe_residues": f"<= {N_LOBE_LAST}",
                         "hinge_residues": list(HINGE_RESIDUES),
                         "axis_point_in_file_angst": point.tolist(),
                         "axis_direction": direction.tolist(),
                         "bin_angles_deg": angles.tolist(),
                         "cleft_angle_deg": cleft},
        **({} if twists is None else {"second_motion": {
            "kind": "rigid twist of the C-lobe about its own axis, independent of the hinge",
            "c_lobe_residues": f">= {max(HINGE_RESIDUES) + 1}",
            "axis_point_in_file_angst": twist_point.tolist(),
            "axis_direction": twist_direction.tolist(),
            "bin_angles_deg": twists.tolist(),
            "maps": "maps/conformation_KKK_LLL.mrc: hinge bin KKK, twist bin LLL"}}),
        "optics": OPTICS,
        "snr": args.snr, "signal_variance": signal_variance,
        "noise_std_before_normalisation": noise_std,
        "background_radius_px": args.bg_radius,
        "pose_error_deg": {"rms": float(np.sqrt((particles["cryosviPoseError"] ** 2).mean())),
                           "median": float(particles["cryosviPoseError"].median())},
        "relion_shift_check": shift,
        **effects_truth(args, shapes, effects["kind"]),
        "oracle": oracle_result,
        "timings_s": timings,
        "relion_project": subprocess.run(["relion_project", "--version"], capture_output=True,
                                         text=True).stdout.strip(),
    }
    write_atomically(output / "truth.json",
                     lambda temporary: temporary.write_text(json.dumps(truth, indent=2)))
    return truth


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    truth = make_dataset(args)
    print(f"wrote {args.n} particles to {args.output} (SNR {args.snr}, noise std "
          f"{truth['noise_std_before_normalisation']:.4g} before normalisation)")
    shift = truth["relion_shift_check"]
    print(f"RELION shift sign: rlnOriginXAngst = +{shift['origin_angst']} Å moved the particle "
          f"by {shift['moved_x_angst_for_origin_x']:+.2f} Å in x "
          f"(rlnOriginYAngst: {shift['moved_y_angst_for_origin_y']:+.2f} Å in y)")
    for kind, o in (truth["oracle"] or {}).items():
        print(f"oracle ({o['particles']} particles, true maps, {kind} poses/CTF/shifts): "
              f"true bin best {o['true_bin_is_best']:.2f}, corr true - neighbours(+-1) "
              f"{o['mean_corr_true_minus_neighbours_1']:+.4f}, (+-5) "
              f"{o['mean_corr_true_minus_neighbours_5']:+.4f}, "
              f"median |error| {o['median_abs_error_deg']:.1f} deg, "
              f"Spearman best bin {o['spearman_best_bin']:.3f}, "
              f"posterior mean {o['spearman_posterior_mean']:.3f}")
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in truth["timings_s"].items()))


if __name__ == "__main__":
    main()
