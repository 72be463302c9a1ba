"""``cryosvi simulate``: a particle data set from the forward model."""

from __future__ import annotations

import math

from cryosvi import config
from cryosvi.cli.common import (HelpFormatter, add_structure_arguments, check_device,
                                check_disk, check_memory, device_name, integer_between,
                                number, positive, positive_int, seed_int,
                                validate_settings)
from cryosvi.config import LIMITS, PAPER_PRESET, Imaging, Noise, Optics, Priors
from cryosvi.errors import CryosviError

CHUNK = 256
"""Images simulated at once (``simulate_dataset``'s chunk size)."""


def register(subparsers, summary: str) -> None:
    optics, imaging = PAPER_PRESET["optics"], PAPER_PRESET["imaging"]
    priors, noise = PAPER_PRESET["priors"], PAPER_PRESET["noise"]
    parser = subparsers.add_parser(
        "simulate", help=summary,
        description="Simulate particles (RELION .mrcs + .star) from the Pyro forward model: "
        "ANM-deformed Gaussian pseudo-atoms, uniform poses, CTF, white or coloured noise. "
        "Options not given take the preset's value. The data set is written whole or not "
        "at all.",
        formatter_class=HelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--structure", help="PDB/mmCIF file (default: bundled 1OL5)")
    add_structure_arguments(parser, stride=2, beads="ca")  # the paper's model
    parser.add_argument("--preset", choices=["paper"], default="paper",
                        help="base settings (the paper's data set)")
    parser.add_argument("-n", "--n-particles", type=positive_int, default=10000,
                        help="number of particles")
    parser.add_argument("--box", type=positive_int,
                        help=f"image size, px (default: preset, {optics.box})")
    parser.add_argument("--pixel-size", type=number(*LIMITS["pixel_size"]),
                        help=f"Å (default: preset, {optics.pixel_size})")
    parser.add_argument("--sigma", type=positive, help="pseudo-atom Gaussian std, Å "
                        f"(default: preset, {imaging.sigma}); at least a quarter pixel")
    parser.add_argument("--window", type=positive_int,
                        help="truncation patch side, px, at most the box (default: preset, "
                        f"{imaging.window}; 2 ceil(3 sigma / pixel) + 1 when --sigma or "
                        "--pixel-size is given)")
    parser.add_argument("--snr", type=number(*LIMITS["snr"], allow_inf=True),
                        help="signal variance / noise variance over the data set; 'inf' "
                        f"for noise-free (default: preset, {noise.snr:g})")
    parser.add_argument("--defocus-mean", type=number(*LIMITS["defocus"]),
                        help=f"Å, positive = underfocus (default: preset, "
                        f"{priors.defocus_mean:g})")
    parser.add_argument("--defocus-std", type=number(0.0, LIMITS["defocus"][1], low_open=True),
                        help=f"Å, > 0 (default: preset, {priors.defocus_std:g})")
    parser.add_argument("--voltage", type=number(*LIMITS["voltage"]),
                        help=f"kV (default: preset, {optics.voltage:g})")
    parser.add_argument("--cs", type=number(*LIMITS["spherical_aberration"]),
                        help="spherical aberration, mm (default: preset, "
                        f"{optics.spherical_aberration:g})")
    parser.add_argument("--amp-contrast", type=number(0.0, 0.999),
                        help="amplitude contrast fraction (default: preset, "
                        f"{optics.amplitude_contrast:g})")
    parser.add_argument("--n-modes", type=positive_int,
                        help=f"number of ANM modes (default: preset, {priors.n_modes})")
    parser.add_argument("--mode-std", type=number(0.0, LIMITS["mode_std"][1], low_open=True),
                        help="prior std of each mode amplitude, Å RMS per pseudo-atom "
                        f"(default: preset, {priors.mode_std[0]:g})")
    parser.add_argument("--max-shift", type=number(0.0, 1e4), default=0.0,
                        help="in-plane shifts (rlnOriginXAngst/YAngst) uniform in "
                        "[-max, max] Å per axis")
    parser.add_argument("--astigmatism", type=number(0.0, 1e5), default=0.0,
                        help="|U - V| uniform in [0, this] Å around each particle's "
                        "defocus, rlnDefocusAngle uniform in [0, 180)")
    parser.add_argument("--optics-groups", type=integer_between(1, 100), default=1,
                        help="optics groups (RELION 3.1 data_optics): the first with the "
                        "preset's voltage and Cs, then alternately 200 kV / Cs 2.0 mm and "
                        "the preset's, Cs + 0.3 mm per further pair")
    real = parser.add_argument_group(
        "micrograph effects (default: none, the paper's data; recorded as the truth in "
        "reference.npz's noise model and the STAR's cryosviTrueContrast)")
    real.add_argument("--noise-spectrum", choices=("white", "coloured"), default="white",
                      help="the noise's power spectrum: flat, or per optics group "
                      "(1 + A exp(-nu^2 / 2w^2)) r^((nu / 0.5)^2) at nu cycles/px, scaled "
                      "to the white noise's pixel variance (the SNR keeps its meaning)")
    real.add_argument("--spectrum-excess", type=number(0.0, 1e3), nargs="+", metavar="A",
                      help="A per optics group (one value: every group): power at zero "
                      "frequency over the flat part, 1 + A (default: 3.0, 2.0 in turn)")
    real.add_argument("--spectrum-width", type=number(0.0, 1.0, low_open=True), nargs="+",
                      metavar="W", help="w per optics group: width of the excess, cycles/px "
                      "(default: 0.05, 0.08 in turn)")
    real.add_argument("--spectrum-nyquist", type=number(0.0, 1e3, low_open=True), nargs="+",
                      metavar="R", help="r per optics group: power at Nyquist over the flat "
                      "part (default: 0.4, 0.25 in turn)")
    real.add_argument("--contrast-spread", type=number(0.0, 2.0), default=0.0,
                      help="log-std of each particle's contrast (lognormal, mean 1: ice "
                      "thickness, dose)")
    real.add_argument("--noise-spread", type=number(0.0, 2.0), default=0.0,
                      help="log-std of each particle's noise level (lognormal, mean square "
                      "1: ice thickness)")
    real.add_argument("--bfactor", type=number(0.0, 1e4), default=0.0,
                      help="Å^2: the clean images times the envelope exp(-B s^2 / 4)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed")
    parser.add_argument("--device", type=device_name, default="cpu",
                        help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output directory made by cryosvi "
                        "simulate (never another directory)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def settings_from_args(args) -> dict:
    """The preset's settings with every option the user gave applied on top, checked
    (``config.check``)."""
    preset = PAPER_PRESET
    optics = preset["optics"]
    overrides = {"box": args.box, "pixel_size": args.pixel_size, "voltage": args.voltage,
                 "spherical_aberration": args.cs, "amplitude_contrast": args.amp_contrast}
    optics = Optics(**{**config.asdict(optics),
                       **{k: v for k, v in overrides.items() if v is not None}})
    imaging = preset["imaging"]
    derived = args.sigma is not None or args.pixel_size is not None
    imaging = Imaging(sigma=args.sigma or imaging.sigma,
                      window=args.window or (None if derived else imaging.window),
                      pad_factor=imaging.pad_factor)
    priors = preset["priors"]
    n_modes = args.n_modes or priors.n_modes
    mode_std = args.mode_std or priors.mode_std[0]
    priors = Priors(mode_std=(mode_std,) * n_modes,
                    defocus_mean=args.defocus_mean or priors.defocus_mean,
                    defocus_std=args.defocus_std or priors.defocus_std)
    noise = Noise(snr=args.snr or preset["noise"].snr)
    validate_settings(optics, imaging, priors, noise)
    return dict(optics=optics, imaging=imaging, priors=priors, noise=noise)


def effects_from_args(args):
    """The ``ImageEffects`` of the options; a CryosviError for spectrum options without
    --noise-spectrum coloured or with a count other than 1 or the optics groups'."""
    from cryosvi.simulate import ImageEffects, default_spectra

    groups = args.optics_groups
    given = {name: getattr(args, f"spectrum_{name}") for name in ("excess", "width", "nyquist")}
    spectra = ()
    if args.noise_spectrum == "coloured":
        columns = list(zip(*default_spectra(groups)))
        for k, (name, values) in enumerate(given.items()):
            if values is not None:
                if len(values) not in (1, groups):
                    raise CryosviError(f"--spectrum-{name}: {len(values)} values for "
                                       f"{groups} optics group(s); give 1 or {groups}")
                columns[k] = tuple(values) * (groups if len(values) == 1 else 1)
        spectra = tuple(zip(*columns))
    elif any(values is not None for values in given.values()):
        raise CryosviError("--spectrum-excess/-width/-nyquist need --noise-spectrum coloured")
    return ImageEffects(noise_spectrum=spectra, contrast_spread=args.contrast_spread,
                        bfactor=args.bfactor, noise_spread=args.noise_spread)


def run(args) -> None:
    from cryosvi.io.outputs import check_output_directory
    from cryosvi.reference import build_reference
    from cryosvi.simulate import (DATASET_KIND, Acquisition, group_optics,
                                  simulate_dataset)

    settings = settings_from_args(args)
    effects = effects_from_args(args)
    device = check_device(args.device)
    check_output_directory(args.output, DATASET_KIND, args.force)
    box = settings["optics"].box
    half = box * settings["optics"].pixel_size / 2
    if args.max_shift >= half:  # the particle would leave the box (and wrap around)
        raise CryosviError(f"--max-shift {args.max_shift:g} Å: shifts must stay inside "
                           f"half the box ({half:g} Å)")
    check_memory(min(CHUNK, args.n_particles), settings["optics"], settings["imaging"],
                 device, "use a smaller --box or --window")
    check_disk(args.output, args.n_particles * box * box * 4)
    reference = build_reference(args.structure, args.chain, args.stride, **settings,
                                beads=args.beads)
    acquisition = Acquisition(max_shift=args.max_shift, astigmatism=args.astigmatism,
                              groups=group_optics(settings["optics"], args.optics_groups)
                              if args.optics_groups > 1 else ())
    reference = simulate_dataset(reference, args.n_particles, args.output, seed=args.seed,
                                 force=args.force, device=device, chunk_size=CHUNK,
                                 acquisition=acquisition, progress=not args.quiet,
                                 effects=effects)
    snr = "inf" if math.isinf(reference.noise.snr) else f"{reference.noise.snr:g}"
    extra = "".join([", coloured noise" if effects.noise_spectrum else "",
                     f", contrast spread {effects.contrast_spread:g}"
                     if effects.contrast_spread else "",
                     f", B {effects.bfactor:g} Å^2" if effects.bfactor else "",
                     f", noise spread {effects.noise_spread:g}"
                     if effects.noise_spread else ""])
    print(f"wrote {args.n_particles} particles of {reference.optics.box} px "
          f"({reference.n_atoms} pseudo-atoms, {reference.n_modes} mode(s), SNR {snr}, "
          f"noise std {reference.noise.std:.4g}{extra}) to {args.output}/")
