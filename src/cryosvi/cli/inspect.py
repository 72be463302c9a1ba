"""``cryosvi inspect``: what a particle file holds, before a run."""

from __future__ import annotations

import math
from pathlib import Path

from cryosvi.cli.common import HelpFormatter, add_particle_source_arguments, positive_int
from cryosvi.errors import CryosviError

SOFTWARE = "cryosvi inspect"
"""The PNG's Software text: how inspect knows a file it may replace."""
SOURCES = {"relion3.1": "RELION 3.1+ STAR", "relion3.0": "RELION 3.0 STAR (one table)",
           "cryosparc": "cryoSPARC .cs"}


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "inspect", help=summary,
        description="Read a particle file (RELION STAR 3.0 to 5, or cryoSPARC .cs) as "
        "train and infer would and report: the number of particles, the optics groups "
        "with their values, box and pixel size, which of poses, shifts and CTF are "
        "present, the defocus range and whether every stack is found; with -o, a PNG of "
        "the first particles.",
        formatter_class=HelpFormatter)
    parser.add_argument("file", help="particle file (.star or .cs)")
    add_particle_source_arguments(parser)
    parser.add_argument("-o", "--output", metavar="PNG",
                        help="write the first particles to this PNG (default: no picture)")
    parser.add_argument("--count", type=positive_int, default=16,
                        help="particles shown in the PNG")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing PNG that cryosvi inspect did not write")
    parser.set_defaults(func=run)


def run(args) -> None:
    from cryosvi.io.particles import read_particles

    output = Path(args.output) if args.output is not None else None
    if output is not None:
        check_output(args.output, args.force, inputs=[args.file])
    particles = read_particles(args.file, args.datadir, args.invert)
    for line in describe(particles):
        print(line)
    if output is not None:
        n = min(args.count, len(particles))
        write_png(particles, n, output)
        print(f"wrote the first {n} particle(s) to {output}")


def describe(particles) -> list[str]:
    """The report's lines."""
    import numpy as np

    frame = particles.metadata
    lines = [f"{particles.path}: {SOURCES[particles.source]}, {len(particles)} particles, "
             f"{len(particles.optics)} optics group(s)"]
    missing = particles.check_stacks() if "rlnImageName" in frame else None
    if missing == []:
        particles.ensure_image_size()
    groups = frame["rlnOpticsGroup"].to_numpy()
    for _, group in particles.optics.iterrows():
        number = group["rlnOpticsGroup"]
        rows = frame[groups == number]
        if rows.empty:
            continue
        first = rows.iloc[0]
        box = f"{int(first['rlnImageSize'])} px" if "rlnImageSize" in rows else "box unknown"
        lines.append(f"  group {number}: {len(rows)} particles, {first['rlnVoltage']:g} kV, "
                     f"Cs {first['rlnSphericalAberration']:g} mm, amplitude contrast "
                     f"{first['rlnAmplitudeContrast']:g}, pixel {first['rlnImagePixelSize']:.4g} "
                     f"Å, box {box}")
    present = {"poses": particles.has_poses, "shifts": particles.has_shifts,
               "CTF (defocus)": "rlnDefocusU" in particles.output_columns}
    lines.append("present: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                         for k, v in present.items()))
    if present["CTF (defocus)"]:
        u, v = frame["rlnDefocusU"].to_numpy(float), frame["rlnDefocusV"].to_numpy(float)
        lines.append(f"defocus: U {u.min():.0f} to {u.max():.0f} Å, V {v.min():.0f} to "
                     f"{v.max():.0f} Å, astigmatism |U - V| up to "
                     f"{np.abs(u - v).max():.0f} Å")
    if present["shifts"]:
        shift = np.hypot(frame["rlnOriginXAngst"], frame["rlnOriginYAngst"]).to_numpy(float)
        lines.append(f"shifts: up to {shift.max():.3g} Å")
    if missing is None:
        lines.append("stacks: no rlnImageName column")
    elif missing:
        lines.append(f"stacks: {len(missing)} of {len(particles.stack_names())} not found "
                     f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); give "
                     "--datadir DIR with the folder that holds them")
    else:
        lines.append(f"stacks: all {len(particles.stack_names())} found")
    return lines


def check_output(path: str | Path, force: bool, inputs=()) -> None:
    """Refuse a place that cannot be written (``cryosvi.io.outputs.check_writable``), a
    missing folder, an input, a file that is not a PNG, and a PNG that this command did
    not write unless --force."""
    from cryosvi.io.outputs import check_writable, refuse_inputs

    refuse_inputs(Path(path), inputs)
    path = check_writable(path)
    if path.suffix.lower() != ".png":
        raise CryosviError(f"-o {path}: the picture is a PNG; give a name ending in .png")
    if path.is_dir():
        raise CryosviError(f"-o {path} is a directory")
    if not path.parent.is_dir():
        raise CryosviError(f"-o {path}: folder {path.parent} does not exist")
    if path.exists() and not _written_here(path):
        if not _is_png(path):
            raise CryosviError(f"{path} exists and is not a PNG; --force replaces only a "
                               "PNG, so remove it yourself or choose another -o")
        if not force:
            raise CryosviError(f"{path} exists and was not written by cryosvi inspect; "
                               "choose another -o or use --force")


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _written_here(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return SOFTWARE.encode() in handle.read(4096)
    except OSError:
        return False


def write_png(particles, n: int, path: Path) -> None:
    """A grid of the first ``n`` particles, each scaled to its own 1-99 % range."""
    import numpy as np
    from matplotlib.figure import Figure

    from cryosvi.io.atomic import write_atomically

    images = particles.images(np.arange(n))
    columns = min(n, 8)
    rows = math.ceil(n / columns)
    figure = Figure(figsize=(1.5 * columns, 1.6 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for i, axis in enumerate(axes):
        axis.set_axis_off()
        if i >= n:
            continue
        low, high = np.percentile(images[i], [1, 99])
        axis.imshow(images[i], cmap="gray", vmin=low, vmax=high if high > low else low + 1,
                    origin="lower")
        axis.set_title(str(i + 1), fontsize=7)
    write_atomically(path, lambda temporary: figure.savefig(
        temporary, format="png", dpi=80, metadata={"Software": SOFTWARE}))
