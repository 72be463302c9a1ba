"""A data set whose map frame is off the structure's centre, as a real refinement's often is.

cryosvi rotates the pseudo-atoms about their centroid; a consensus refinement's particles
are centred (after their shifts) on the refined map's origin, which need not be there. A
frame offset d (Å, in the molecule's frame) moves each particle's image by the projection
of A d (A: the particle's rotation); writing the given shifts moved by that much is the
same data set seen from a frame offset by -d (exact for a rigid offset). The copy
(OUTPUT/particles.star, the stack linked) is scored with the same truth.

    python benchmarks/realistic/frame_offset.py DATA OUTPUT [--offset 3 -2 2]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import starfile
import torch

from cryosvi.physics.rotations import euler_to_matrix


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a make_dataset.py output")
    parser.add_argument("output", type=Path, help="a new folder")
    parser.add_argument("--offset", type=float, nargs=3, default=(3.0, -2.0, 2.0),
                        metavar=("X", "Y", "Z"), help="Å (default: 3 -2 2, 4.1 Å)")
    args = parser.parse_args(argv)
    if args.output.exists():
        parser.error(f"{args.output} exists; give a new folder")
    args.output.mkdir(parents=True)
    star = starfile.read(args.data / "particles.star")
    particles = star["particles"]
    angles = [torch.tensor(particles[f"cryosviTrueAngle{a}"].to_numpy(), dtype=torch.float64)
              for a in ("Rot", "Tilt", "Psi")]
    moved = (euler_to_matrix(*angles) @ torch.tensor(args.offset, dtype=torch.float64))
    moved = moved[:, :2].numpy()
    particles["rlnOriginXAngst"] -= moved[:, 0]
    particles["rlnOriginYAngst"] -= moved[:, 1]
    starfile.write(star, args.output / "particles.star")
    (args.output / "particles.mrcs").symlink_to((args.data / "particles.mrcs").resolve())
    shutil.copy(args.data / "truth.star", args.output / "truth.star")
    print(f"wrote {args.output}/particles.star: given shifts moved by up to "
          f"{np.hypot(*moved.T).max():.2f} Å (offset {np.linalg.norm(args.offset):.2f} Å)")


if __name__ == "__main__":
    main()
