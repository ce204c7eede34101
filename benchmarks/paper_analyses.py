"""Fig. 2 (sparsity, hybridity) and the selected-weight locations on a finished grid, in one command.

Usage (from the repository root, after ``shpeft bench benchmarks/configs/cpu_grid.json``):

    python benchmarks/paper_analyses.py benchmarks/configs/cpu_grid.json --dest benchmarks/results/cpu_grid/analyses

``shpeft bench`` runs the same analyses after a grid's runs (into ``summary_<name>/analyses``);
this script reruns them alone, e.g. for another seed. See :mod:`shpeft.analysis.grid_analyses`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shpeft.analysis import grid as G
from shpeft.analysis.grid_analyses import ANALYSES, write_grid_analyses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="the grid config the runs came from")
    p.add_argument("--out", help="the grid's output folder (default: as `shpeft bench`)")
    p.add_argument("--protocol", default=None, help="the protocol the grid ran with")
    p.add_argument("--dest", required=True, help="folder for the analyses' files")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs compared across datasets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=",".join(ANALYSES))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    grid = G.load_grid(args.config, protocol=args.protocol)
    out = Path(args.out) if args.out else G.default_out(grid)
    if not out.is_dir():
        raise SystemExit(f"no grid output at {out}: run `shpeft bench {args.config}` first")
    md = write_grid_analyses(
        grid, out, Path(args.dest), seed=args.seed, device=args.device, only=args.only.split(",")
    )
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
