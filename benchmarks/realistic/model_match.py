"""How close can cryosvi's model get to RELION's all-atom images? (diagnostics of the
realistic benchmark)

On the noise-free RELION projections of a realistic data set (``make_dataset.py
--save-clean``), with every particle's TRUE pose, CTF, optics group and shift given:

1. model match: the Pearson correlation between each clean RELION image and cryosvi's
   forward model image of the undeformed pseudo-atoms (gray levels fitted by least
   squares), i.e. how much of the image the C-alpha Gaussian model explains;
2. conformation ceiling: for each of the lowest K ANM modes, the amplitude that best
   explains each clean image (a grid scan, one common gray-level fit per amplitude), and
   its |Spearman| with the true conformation. No noise, no network, no sampling: what a
   perfect inference of that mode amplitude would give. The overlap of the true
   displacement (C-alpha atoms at the largest hinge angle) with each mode is printed too;
3. the exact direction: the same scan along the true hinge displacement of the C-alpha
   pseudo-atoms itself (what a perfect conformational basis would give), once with its
   rigid-body part (the hinge also moves the molecule's centre and orientation in the
   map frame, which the given poses do not absorb) and once with it projected out (all
   that ANM modes, orthogonal to rigid motions, can represent); on the clean images with
   the true pose, CTF and shift, and on the noisy particles with the GIVEN (consensus)
   pose, CTF estimate and shift, as the poses-given experiment has them;
4. with ``--learnt R.npz ...`` (references written by ``cryosvi learn-modes``): the same
   scan on the noisy particles along each reference's first learnt mode, from its own
   pseudo-atoms (the particles' mean conformation), and the mode's overlap with the
   hinge displacement.

    python benchmarks/realistic/make_dataset.py -o DATA --n 300 --save-clean --oracle 0
    python benchmarks/realistic/model_match.py DATA [--stride 2] [--beads ca] [--sigma 2]
        [--modes 4]
        [--learnt R.npz ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import torch
from scipy import stats

from cryosvi.config import Imaging, Noise, Optics, Priors
from cryosvi.dataset import optics_groups, particle_ctf
from cryosvi.io.particles import read_particles
from cryosvi.reference import build_reference
from cryosvi.physics.rotations import euler_to_matrix, matrix_to_quaternion
from cryosvi.physics.structure import BEADS

sys.path.insert(0, str(Path(__file__).parent))
import make_dataset  # noqa: E402  (the data set's own geometry: hinge axis, lobes)

TRUE = {"rlnDefocusU": "cryosviTrueDefocusU", "rlnDefocusV": "cryosviTrueDefocusV",
        "rlnDefocusAngle": "cryosviTrueDefocusAngle",
        "rlnOriginXAngst": "cryosviTrueOriginXAngst",
        "rlnOriginYAngst": "cryosviTrueOriginYAngst"}


def hinge_overlaps(reference, settings: dict) -> np.ndarray:
    """|<u_k, d>| of each mode with the unit displacement of the largest hinge."""
    displacement = hinge_displacement(reference, settings).ravel()
    displacement /= np.linalg.norm(displacement)
    return np.abs(reference.modes.reshape(len(reference.modes), -1) @ displacement)


def best_amplitudes(forward, rotation, ctf, shifts, images, n_modes, k, grid):
    """Per image, the grid value of mode k's amplitude (others 0) with the least residual
    after a least-squares gray-level fit."""
    residuals = []
    for value in grid:
        amplitudes = torch.zeros(len(images), n_modes)
        amplitudes[:, k] = value
        with torch.no_grad():
            model = forward(amplitudes, rotation, None, ctf=ctf, shifts=shifts)
        residuals.append(fit_residual(model, images))
    return grid[torch.stack(residuals).argmin(0)].numpy()


def hinge_displacement(reference, settings: dict) -> np.ndarray:
    """(N, 3) Å: the pseudo-atoms' displacement at the largest hinge angle (each
    pseudo-atom moves with the lobe of its nearest C-alpha atom's residue)."""
    structure = make_dataset.load_chain(settings["structure"], "A")
    positions, masses, residues, names = make_dataset.atom_arrays(structure)
    point, direction = make_dataset.hinge_axis(positions, masses, residues, names)
    ca = names == "CA"
    original = reference.coords + reference.centroid
    nearest = np.argmin(np.linalg.norm(positions[ca][None] - original[:, None], axis=-1), 1)
    moved = make_dataset.hinge_conformation(original, residues[ca][nearest], point,
                                            direction, settings["max_angle"])
    return moved - original


def fit_residual(model: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image, the residual sum of squares after a least-squares a * model + b fit."""
    m = model - model.mean((-2, -1), keepdim=True)
    y = images - images.mean((-2, -1), keepdim=True)
    scale = (m * y).sum((-2, -1)) / m.square().sum((-2, -1)).clamp_min(1e-30)
    return (y - scale[..., None, None] * m).square().sum((-2, -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a make_dataset.py output with clean.mrcs")
    parser.add_argument("--stride", type=int, default=2, help="(default: 2)")
    parser.add_argument("--beads", choices=BEADS, default="ca", help="(default: ca)")
    parser.add_argument("--sigma", type=float, default=2.0, help="Å (default: 2)")
    parser.add_argument("--modes", type=int, default=4, help="modes scanned (default: 4)")
    parser.add_argument("--learnt", type=Path, nargs="*", default=[],
                        help="references from cryosvi learn-modes to scan along")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = json.loads((args.data / "truth.json").read_text())["settings"]
    particles = read_particles(args.data / "particles.star")
    for given, true in TRUE.items():  # the truth, not the estimates
        particles.metadata[given] = particles.metadata[true]
    frame = particles.metadata
    with mrcfile.open(args.data / "clean.mrcs", permissive=True) as stack:
        clean = torch.from_numpy(np.array(stack.data, dtype=np.float32))
    box, pixel = clean.shape[-1], float(frame["rlnImagePixelSize"].iloc[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = build_reference(
            settings.get("structure"), "A", args.stride,
            Optics(box=box, pixel_size=pixel), Imaging(sigma=args.sigma),
            Priors(mode_std=(2.0,) * args.modes), Noise(snr=float("inf")), beads=args.beads)
    forward = reference.forward_model(groups=optics_groups(particles))
    ctf = particle_ctf(particles)
    shifts = torch.tensor(frame[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
                          dtype=torch.float32)
    angles = [torch.tensor(frame[f"cryosviTrueAngle{a}"].to_numpy(), dtype=torch.float64)
              for a in ("Rot", "Tilt", "Psi")]
    rotation = matrix_to_quaternion(euler_to_matrix(*angles)).float()
    truth = frame["cryosviTrueConformation"].to_numpy()
    n = len(frame)

    def images_at(amplitudes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return forward(amplitudes, rotation, None, ctf=ctf, shifts=shifts)

    zero = torch.zeros(n, args.modes)
    model = images_at(zero)
    correlation = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
                   for a, b in zip(model.numpy(), clean.numpy())]
    out = {"data": str(args.data), "stride": args.stride, "beads": args.beads,
           "sigma": args.sigma, "particles": n,
           "model_correlation_median": float(np.median(correlation)),
           "model_correlation_p10": float(np.percentile(correlation, 10)),
           "hinge_overlap": hinge_overlaps(reference, settings).round(3).tolist(),
           "modes": []}
    grid = torch.linspace(-6, 6, 49)
    for k in range(args.modes):
        best = best_amplitudes(forward, rotation, ctf, shifts, clean, args.modes, k, grid)
        rho = stats.spearmanr(best, truth).statistic
        out["modes"].append({"mode": k + 1, "abs_spearman_noise_free": abs(float(rho)),
                             "amplitude_range": [float(best.min()), float(best.max())]})

    # 3. The exact direction, with and without its rigid-body part.
    from cryosvi.physics.anm import rigid_basis
    from cryosvi.physics.forward import ForwardModel

    displacement = hinge_displacement(reference, settings).ravel()
    rigid = rigid_basis(reference.coords)
    internal = displacement - rigid @ (rigid.T @ displacement)
    given = read_particles(args.data / "particles.star")
    noisy = torch.from_numpy(np.asarray(given.images(np.arange(n)), dtype=np.float32))
    given_angles = [torch.tensor(given.metadata[c].to_numpy(), dtype=torch.float64)
                    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    given_rotation = matrix_to_quaternion(euler_to_matrix(*given_angles)).float()
    given_shifts = torch.tensor(given.metadata[["rlnOriginXAngst", "rlnOriginYAngst"]]
                                .to_numpy(), dtype=torch.float32)
    out["rigid_fraction_of_displacement"] = float(np.linalg.norm(displacement - internal)
                                                  / np.linalg.norm(displacement))
    out["exact_direction"] = {}
    fine = torch.linspace(-8, 8, 65)
    for name, vector in (("with_rigid_part", displacement), ("internal_only", internal)):
        unit = torch.tensor(vector / np.linalg.norm(vector), dtype=torch.float32)
        exact = ForwardModel(reference.coords, unit.reshape(1, -1, 3), reference.optics,
                             reference.imaging, optics_groups(particles))
        scores = {}
        for label, images, rot, c, sh in (
                ("noise_free_true_pose", clean, rotation, ctf, shifts),
                ("noisy_given_pose", noisy, given_rotation, particle_ctf(given),
                 given_shifts)):
            best = best_amplitudes(exact, rot, c, sh, images, 1, 0, fine)
            scores[label] = abs(float(stats.spearmanr(best, truth).statistic))
        out["exact_direction"][name] = scores

    # 4. Learnt modes: their overlap with the hinge, and the scan along them.
    from cryosvi.reference import Reference

    out["learnt"] = {}
    unit_hinge = displacement / np.linalg.norm(displacement)
    for path in args.learnt:
        learnt = Reference.load(path)
        mode = learnt.modes[:1]
        model = ForwardModel(learnt.coords, mode, reference.optics, reference.imaging,
                             optics_groups(particles))
        best = best_amplitudes(model, given_rotation, particle_ctf(given), given_shifts,
                               noisy, 1, 0, fine)
        out["learnt"][str(path)] = {
            "source": learnt.source.get("fitting_basis"),
            "overlap_with_hinge": abs(float(mode.reshape(-1) @ unit_hinge)),
            "abs_spearman_noisy_given_pose": abs(float(stats.spearmanr(best, truth)
                                                       .statistic))}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
