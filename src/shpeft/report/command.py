"""The ``shpeft report`` subcommand (parser and handler; registered by :mod:`shpeft.cli`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``shpeft report RUN [RUN ...]`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "report",
        help="(re)build the self-contained report.html of runs, old runs included",
        description="Write RUN/report.html: training curves, test metrics, confusion matrix, ROC "
        "curves, reliability diagram with ECE, explanation heat maps, selection map (sparse "
        "methods), config and cost. Open it from disk in any browser. A RUN may be a folder "
        "holding runs (e.g. a `shpeft bench` output): every finished run below it is reported.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory, or a folder of runs")
    p.add_argument("--device", default="cpu", help="device for the model when it is needed")
    p.add_argument(
        "--no-examples", action="store_true", help="leave out the explanation heat maps (faster)"
    )
    p.add_argument(
        "--skip-existing", action="store_true", help="only runs that have no report.html yet"
    )
    return p


def run_report_command(args: argparse.Namespace) -> int:
    """Build the reports; print each path. Exit status 1 when some run failed."""
    from shpeft.report.rebuild import rebuild_all

    written, failed = rebuild_all(
        args.runs,
        device=args.device,
        examples=not args.no_examples,
        skip_existing=args.skip_existing,
    )
    for path in written:
        print(path)
    for run, error in failed:
        print(f"shpeft report: {run}: {error}", file=sys.stderr)
    return 1 if failed else 0
