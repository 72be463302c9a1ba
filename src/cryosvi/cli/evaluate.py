"""``cryosvi evaluate``: metrics and plots of a posterior STAR file against the truth."""

from __future__ import annotations

from pathlib import Path

from cryosvi.cli.common import HelpFormatter, add_particle_source_arguments
from cryosvi.io.outputs import check_output_directory, directory_kind, mark_directory

REPORT_KIND = "report"


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "evaluate", help=summary,
        description="Compare the posterior written by 'cryosvi infer' with the ground-truth "
        "file (e.g. from 'cryosvi simulate', or a RELION refinement): Pearson r, RMSE and "
        "credible-interval coverage for defocus and each mode, pose geodesic error "
        "(degrees) and its coverage, also after aligning the two files' molecule frames "
        "(one rotation, plus one per unit of the truth's conformation columns), for the "
        "latents the truth has columns for; rows whose cryosviTrueJunk is 1 are left out "
        "and score cryosviJunkProbability's AUC. Rows are matched by rlnImageName; by "
        "row order only with --match-by-order. Writes "
        "metrics.json, truth_vs_prediction.png, pose_error.png and calibration.png into "
        "the output directory: a new or empty one, or with --force one an earlier "
        "'cryosvi evaluate' wrote.",
        formatter_class=HelpFormatter)
    parser.add_argument("--posterior", required=True, help="posterior STAR file (or .cs)")
    parser.add_argument("--truth", required=True, help="ground-truth STAR file (or .cs)")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the report in an output directory an earlier "
                        "'cryosvi evaluate' made (never another directory)")
    parser.add_argument("--match-by-order", action="store_true",
                        help="pair the particles by row order when a file has no "
                        "rlnImageName (default: refuse)")
    add_particle_source_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> None:
    from cryosvi.evaluate import evaluate_tables, format_table, write_report
    from cryosvi.io.particles import read_particles

    check_output_directory(args.output, REPORT_KIND, args.force)

    posterior, truth = (read_particles(path, args.datadir, args.invert)
                        for path in (args.posterior, args.truth))
    metrics = evaluate_tables(posterior, truth, match_by_order=args.match_by_order)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    if directory_kind(args.output) is None:
        mark_directory(args.output, REPORT_KIND)
    write_report(metrics, posterior, truth, args.output)
    print(format_table(metrics))
    print(f"wrote metrics.json and 3 plots to {args.output}/")
