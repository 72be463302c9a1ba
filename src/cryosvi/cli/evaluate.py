"""``cryosvi evaluate``: metrics and plots of a posterior STAR file against the truth."""

from __future__ import annotations

import argparse


def register(subparsers, summary: str) -> None:
    parser = subparsers.add_parser(
        "evaluate", help=summary,
        description="Compare the posterior written by 'cryosvi infer' with the ground-truth "
        "STAR file (e.g. from 'cryosvi simulate'): Pearson r, RMSE and credible-interval "
        "coverage for defocus and each mode, pose geodesic error (degrees) and its "
        "coverage. Rows are matched by rlnImageName when both files have it, else by "
        "order. Writes metrics.json, truth_vs_prediction.png, pose_error.png and "
        "calibration.png into the output directory (files there are overwritten).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--posterior", required=True, help="posterior STAR file")
    parser.add_argument("--truth", required=True, help="ground-truth STAR file")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.set_defaults(func=run)


def run(args) -> None:
    from cryosvi.evaluate import evaluate_tables, format_table, write_report
    from cryosvi.io.star import read_star

    posterior, truth = read_star(args.posterior), read_star(args.truth)
    metrics = evaluate_tables(posterior, truth)
    write_report(metrics, posterior, truth, args.output)
    print(format_table(metrics))
    print(f"wrote metrics.json and 3 plots to {args.output}/")
