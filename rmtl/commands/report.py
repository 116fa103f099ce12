"""`rmtl report RUN_DIR [RUN_DIR ...] [--out report.png]`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="compare runs: final metrics side by side and a PNG of the weights",
        description="Prints one table of the runs' final metrics (AUC, logloss, session logloss, GAUC per "
                    "task; best value starred; columns labelled model/strategy/seed) and plots the strategy weights over training from the "
                    "TensorBoard event files.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="report.png", help="PNG to write (default: report.png)")
    p.add_argument("--no-plot", action="store_true", help="only print the table")
    p.add_argument("--split", default="test", choices=("val", "test"), help="which final metrics (default: test)")
    p.add_argument("--group-seeds", action="store_true",
                   help="pool runs that differ only in the seed: one column of mean +- sd (sample sd) per setting")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rmtl.report import make_report

    table, png = make_report(args.run_dirs, out=None if args.no_plot else args.out, split=args.split,
                             group=args.group_seeds)
    print(table)
    if png is not None:
        print(f"weights plot: {png}")
    return 0
