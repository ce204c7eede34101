"""The reproduction grid of the SH-PEFT paper from one config file (thin wrapper of `shpeft bench`).

Usage (from the repository root):

    python benchmarks/grid.py benchmarks/configs/cpu_grid.json --workers 2 --threads 1
    python benchmarks/grid.py benchmarks/configs/cpu_grid.json --summary-only
    python benchmarks/grid.py benchmarks/configs/paper_grid.json --device cuda      # on a GPU
    python benchmarks/grid.py analyze sparsity --run RUN_DIR                         # analyses

Everything is in :mod:`shpeft.analysis` (see its docstrings); this file only parses flags.
"""

from __future__ import annotations

import argparse
import logging
import sys

from shpeft.analysis import add_subcommands


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = any(a in ("-q", "--quiet") for a in argv)  # accepted anywhere on the line
    argv = [a for a in argv if a not in ("-q", "--quiet")]
    if not argv or argv[0] not in ("bench", "analyze"):
        argv = ["bench", *argv]
    parser = argparse.ArgumentParser(prog="benchmarks/grid.py", description=__doc__.split("\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    argv = (["-q"] if quiet else []) + argv
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
