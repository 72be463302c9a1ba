"""``cryosvi simulate``: a particle data set from the forward model."""

from __future__ import annotations

import argparse
import math

from cryosvi import config
from cryosvi.cli.common import positive, positive_int, validate_settings
from cryosvi.config import PAPER_PRESET, Imaging, Noise, Optics, Priors


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "simulate", help=summary,
        description="Simulate particles (RELION .mrcs + .star) from the Pyro forward model: "
        "ANM-deformed Gaussian pseudo-atoms, uniform poses, CTF, white noise. Options not "
        "given take the preset's value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--structure", help="PDB/mmCIF file (default: bundled 1OL5)")
    parser.add_argument("--chain", help="chain ID (default: first protein chain)")
    parser.add_argument("--stride", type=positive_int, default=2, help="keep every k-th CA")
    parser.add_argument("--preset", choices=["paper"], default="paper",
                        help="base settings (the paper's data set)")
    parser.add_argument("-n", "--n-particles", type=positive_int, default=10000)
    parser.add_argument("--box", type=positive_int, help="image size, px")
    parser.add_argument("--pixel-size", type=positive, help="Å")
    parser.add_argument("--sigma", type=positive, help="pseudo-atom Gaussian std, Å")
    parser.add_argument("--window", type=positive_int, help="truncation patch side, px")
    parser.add_argument("--snr", type=positive, help="signal variance / noise variance "
                        "over the data set; 'inf' for noise-free")
    parser.add_argument("--defocus-mean", type=positive, help="Å, positive = underfocus")
    parser.add_argument("--defocus-std", type=float, help="Å")
    parser.add_argument("--voltage", type=positive, help="kV")
    parser.add_argument("--cs", type=float, help="spherical aberration, mm")
    parser.add_argument("--amp-contrast", type=float, help="amplitude contrast fraction")
    parser.add_argument("--n-modes", type=positive_int, help="number of ANM modes")
    parser.add_argument("--mode-std", type=positive,
                        help="prior std of each mode amplitude, Å RMS per pseudo-atom")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--force", action="store_true", help="overwrite the output directory")
    parser.set_defaults(func=run)


def settings_from_args(args) -> dict:
    """The preset's settings with every option the user gave applied on top."""
    preset = PAPER_PRESET
    optics = preset["optics"]
    overrides = {"box": args.box, "pixel_size": args.pixel_size, "voltage": args.voltage,
                 "spherical_aberration": args.cs, "amplitude_contrast": args.amp_contrast}
    optics = Optics(**{**config.asdict(optics),
                       **{k: v for k, v in overrides.items() if v is not None}})
    imaging = preset["imaging"]
    imaging = Imaging(sigma=args.sigma or imaging.sigma,
                      window=args.window or (None if args.sigma else imaging.window),
                      pad_factor=imaging.pad_factor)
    priors = preset["priors"]
    n_modes = args.n_modes or priors.n_modes
    mode_std = args.mode_std or priors.mode_std[0]
    priors = Priors(mode_std=(mode_std,) * n_modes,
                    defocus_mean=args.defocus_mean or priors.defocus_mean,
                    defocus_std=priors.defocus_std if args.defocus_std is None
                    else args.defocus_std)
    noise = Noise(snr=args.snr or preset["noise"].snr)
    validate_settings(optics, imaging, priors)
    return dict(optics=optics, imaging=imaging, priors=priors, noise=noise)


def run(args) -> None:
    from cryosvi.reference import build_reference
    from cryosvi.simulate import simulate_dataset

    settings = settings_from_args(args)
    reference = build_reference(args.structure, args.chain, args.stride, **settings)
    reference = simulate_dataset(reference, args.n_particles, args.output, seed=args.seed,
                                 force=args.force, device=args.device)
    snr = "inf" if math.isinf(reference.noise.snr) else f"{reference.noise.snr:g}"
    print(f"wrote {args.n_particles} particles of {reference.optics.box} px "
          f"({reference.n_atoms} pseudo-atoms, {reference.n_modes} mode(s), SNR {snr}, "
          f"noise std {reference.noise.std:.4g}) to {args.output}/")
