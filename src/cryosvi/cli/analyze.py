"""``cryosvi analyze``: from a posterior to the landscape, an atomic ensemble, particle
subsets and maps."""

from __future__ import annotations

from cryosvi.cli.common import HelpFormatter, integer_between


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "analyze", help=summary,
        description="Turn the posterior of 'cryosvi infer' into structures. Writes into "
        "the output folder: landscape.png and landscape.csv (each conformational "
        "coordinate cryosviModeAmplitudeK as the histogram of the posterior means and as "
        "the sum of the particles' posteriors, Normal(mean, std) each, so that uncertain "
        "particles spread their weight; 2-D for two coordinates; the bins' edges drawn); "
        "ensemble.pdb and ensemble.cif (a model per bin centre along the chosen "
        "coordinate, the others at their mean, with every atom of the structure's chain: "
        "blocks of modes learnt by 'cryosvi learn-modes' in blocks or segments move "
        "rigidly, other modes move each atom with its residue's pseudo-atom) and "
        "ensemble.png (their C-alpha traces); view.cxc (ChimeraX: "
        "the ensemble as a trajectory, the maps as a volume series); bins/bin_K.star "
        "(RELION 3.1 subsets: the posterior's columns and optics table, image names made "
        "absolute; also bin_K.cs when the posterior has a .cs beside it), and with "
        "--reconstruct bins/bin_K.mrc (relion_reconstruct --ctf at the posterior-mean "
        "poses); summary.json (bins, ranges, posterior widths, map-to-map correlations). "
        "The output folder is new or empty, or with --force one an earlier 'cryosvi "
        "analyze' made.",
        formatter_class=HelpFormatter)
    parser.add_argument("--posterior", required=True,
                        help="posterior STAR file of 'cryosvi infer'")
    parser.add_argument("--run", required=True,
                        help="the run directory the posterior was inferred with")
    parser.add_argument("--structure",
                        help="PDB/mmCIF file whose atoms the ensemble moves (default: the "
                        "structure the run's reference was built from, where it recorded "
                        "one)")
    parser.add_argument("--chain",
                        help="chain ID (default: the chain the reference was built from)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--bins", type=integer_between(1, 1000), default=5,
                        help="bins along the coordinate (models, subsets and maps)")
    parser.add_argument("--coordinate", type=integer_between(1, 100), default=1,
                        help="the coordinate to bin along: K of cryosviModeAmplitudeK")
    parser.add_argument("--equal-width", action="store_true",
                        help="bins of equal width between the smallest and largest "
                        "posterior mean (default: equal numbers of particles)")
    parser.add_argument("--reconstruct", action="store_true",
                        help="reconstruct each bin with RELION's relion_reconstruct (needs "
                        "RELION 3.1 or later on PATH and the particle stacks)")
    parser.add_argument("--datadir", metavar="DIR",
                        help="folder holding the particle stacks named in the posterior "
                        "(default: the posterior's folder)")
    parser.add_argument("--force", action="store_true",
                        help="replace an output folder an earlier 'cryosvi analyze' made "
                        "(never another folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> None:
    from cryosvi.analysis.driver import analyze

    summary = analyze(args.posterior, args.run, args.output, structure=args.structure,
                      chain=args.chain, bins=args.bins, coordinate=args.coordinate,
                      equal_width=args.equal_width, reconstruct_maps=args.reconstruct,
                      force=args.force, datadir=args.datadir, progress=not args.quiet)
    print(report(summary, args.output))


def report(summary: dict, output) -> str:
    """What ``analyze`` prints: the coordinate, a line per bin, the files."""
    chosen = summary["coordinate"]
    bins = summary["bins"]
    correlations = summary["map_correlations"]
    low, high = chosen["range"]
    lines = [f"{chosen['column']}: {summary['particles']} particles, posterior means "
             f"{low:+.3g} .. {high:+.3g} Å, mean posterior std "
             f"{chosen['mean_posterior_std']:.3g} Å; {len(bins['counts'])} "
             f"{summary['binning']} bins",
             f"{'bin':>4} {'from':>9} {'to':>9} {'centre':>9} {'particles':>10}"
             + (f" {'map r (next bin)':>17}" if correlations else "")]
    maps = iter(range(len(bins["maps"])))
    for k, count in enumerate(bins["counts"]):
        line = (f"{k + 1:>4} {bins['edges'][k]:>+9.3f} {bins['edges'][k + 1]:>+9.3f} "
                f"{bins['centres'][k]:>+9.3f} {count:>10}")
        if correlations and count:
            m = next(maps)
            line += f" {correlations[m][m + 1]:>17.3f}" if m + 1 < len(correlations) else ""
        lines.append(line)
    ensemble = summary["ensemble"]
    extra = " and .mrc" if bins["maps"] else ""
    cs = any(str(f).endswith(".cs") for files in bins["files"] for f in files)
    lines.append(f"wrote {output}/: landscape.png, landscape.csv, ensemble.pdb, .cif and .png "
                 f"({ensemble['models']} models of {ensemble['atoms']} atoms, "
                 f"{ensemble['motion']}), view.cxc, bins/bin_K.star"
                 f"{' and .cs' if cs else ''}{extra}, summary.json")
    return "\n".join(lines)
