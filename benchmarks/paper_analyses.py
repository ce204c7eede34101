"""Fig. 2 (sparsity, hybridity) and the selected-weight locations on a finished grid, in one command.

Usage (from the repository root, after ``shpeft bench benchmarks/configs/cpu_grid.json``):

    python benchmarks/paper_analyses.py benchmarks/configs/cpu_grid.json --dest benchmarks/results/cpu_grid/analyses

It picks the grid's tuned final runs (each dataset's chosen lr, see ``lr_choice_<name>.json``) and
calls the same functions as ``shpeft analyze``:

* sparsity (paper Fig. 2 left): every seed's full fine-tuning run on every dataset, grafted at
  k in {100, 50, 20, 10, 5, 1, 0.1}% and evaluated on its own test split; one table of the share
  of full fine-tuning's macro F1 kept (mean ± std over seeds per dataset);
* hybridity (Fig. 2 right), ``delta`` mode: top-k% |W_ft - W_ori| of the full fine-tuning runs on
  the datasets (seed ``--seed``) plus the same dataset's other seeds as a reference (how much two
  runs of one task share); ``mask`` mode: SH-PEFT's selected positions on the datasets, at each
  of its budgets that finished on every dataset;
* locations (item 5 of the issue): SH-PEFT's selection per block and parameter type, per dataset.

Each analysis writes Markdown, CSV, JSON and a PNG into its own folder under ``--dest``;
``analyses.md`` collects the Markdown.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

from shpeft.analysis import grid as G
from shpeft.analysis.hybridity import run_hybridity, write_hybridity
from shpeft.analysis.locations import run_locations, write_locations
from shpeft.analysis.paper import PAPER_HYBRIDITY_KS, PAPER_SPARSITY_KS
from shpeft.analysis.sparsity import run_sparsity, write_sparsity

log = logging.getLogger("shpeft")


def tuned_run(grid: G.GridConfig, out: Path, choices, ds: str, name: str, seed: int, budget=None):
    """The finished run directory of (dataset, variant, seed[, budget]) at its tuned lr, or None."""
    lr = G.run_lr(grid, choices, ds, name)
    if lr is None:
        return None
    spec = G.run_spec(grid, grid.variant(name), ds, lr, seed, grid.iterations, budget=budget)
    d = spec.run_dir(out)
    return d if (d / "result.json").is_file() else None


def sparsity_section(grid, out, choices, dest: Path, device: str) -> str:
    shares: dict[str, dict[float, list[float]]] = {}
    f1s: dict[str, list[float]] = {}
    for ds in grid.datasets:
        for seed in grid.seeds:
            run = tuned_run(grid, out, choices, ds, "full", seed)
            if run is None:
                log.warning("no tuned full fine-tuning run for %s seed %d", ds, seed)
                continue
            report = run_sparsity(run, PAPER_SPARSITY_KS, device=device)
            write_sparsity(report, dest / "sparsity" / f"{ds}-s{seed}")
            f1s.setdefault(ds, []).append(100 * report["full_macro_f1"])
            for row in report["rows"]:
                if row["share_of_full_f1"] is not None:
                    shares.setdefault(ds, {}).setdefault(row["k_percent"], []).append(
                        100 * row["share_of_full_f1"]
                    )
    if not shares:
        return ""
    dss = list(shares)
    lines = [
        "### Sparsity (Fig. 2 left): share of full fine-tuning's test macro F1 kept (%)",
        "",
        "The top k% of |W_ft - W_ori| of each tuned full fine-tuning run grafted into the "
        "pretrained backbone (the run's head kept), evaluated on the run's test split; mean ± std "
        "over seeds. The paper: keeping about 10% of the change keeps about 95%.",
        "",
        "| k % | " + " | ".join(dss) + " | mean |",
        "|---:|" + "---:|" * (len(dss) + 1),
    ]

    def cell(xs: list[float]) -> str:
        if not xs:
            return "-"
        return f"{statistics.mean(xs):.1f}" + (
            f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
        )

    for k in PAPER_SPARSITY_KS:
        per = [shares[ds].get(k, []) for ds in dss]
        means = [statistics.mean(x) for x in per if x]
        mean = f"{statistics.mean(means):.1f}" if means else "-"
        lines.append(f"| {k:g} | " + " | ".join(cell(x) for x in per) + f" | {mean} |")
    lines.append("| full FT macro F1 | " + " | ".join(cell(f1s.get(ds, [])) for ds in dss) + " | |")
    return "\n".join(lines) + "\n"


def hybridity_sections(grid, out, choices, dest: Path, seed: int) -> list[str]:
    parts = []
    dss = list(grid.datasets)
    runs, labels = [], []
    for ds in dss:
        run = tuned_run(grid, out, choices, ds, "full", seed)
        if run is not None:
            runs.append(run)
            labels.append(f"{ds}:s{seed}")
    ref_ds = dss[0]  # the same task's other seeds: what "shared by chance of training" looks like
    for other in grid.seeds:
        run = tuned_run(grid, out, choices, ref_ds, "full", other) if other != seed else None
        if run is not None:
            runs.append(run)
            labels.append(f"{ref_ds}:s{other}")
    if len(runs) >= 2:
        report = run_hybridity(runs, PAPER_HYBRIDITY_KS, mode="delta", labels=labels)
        write_hybridity(report, dest / "hybridity_full_delta")
        parts.append((dest / "hybridity_full_delta" / "hybridity.md").read_text())
    if "shpeft" in [v.name for v in grid.methods] and len(dss) >= 2:
        ratios = sorted(
            {*grid.budgets.get("shpeft", []), G.default_budget(grid.variant("shpeft"))[1]}
        )
        for ratio in ratios:
            runs = [tuned_run(grid, out, choices, ds, "shpeft", seed, budget=ratio) for ds in dss]
            if any(r is None for r in runs):
                continue
            report = run_hybridity(runs, mode="mask", labels=[f"{ds}:s{seed}" for ds in dss])
            sub = dest / f"hybridity_shpeft_mask_{ratio:g}"
            write_hybridity(report, sub)
            parts.append(f"SH-PEFT ratio {ratio:g}:\n\n" + (sub / "hybridity.md").read_text())
    return parts


def locations_sections(grid, out, choices, dest: Path, seed: int) -> list[str]:
    parts = []
    for ds in grid.datasets:
        run = tuned_run(grid, out, choices, ds, "shpeft", seed)
        if run is None:
            continue
        report = run_locations(run)
        write_locations(report, dest / "locations" / ds)
        parts.append((dest / "locations" / ds / "locations.md").read_text())
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="the grid config the runs came from")
    p.add_argument("--out", help="the grid's output folder (default: as `shpeft bench`)")
    p.add_argument("--protocol", default=None, help="the protocol the grid ran with")
    p.add_argument("--dest", required=True, help="folder for the analyses' files")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs compared across datasets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default="sparsity,hybridity,locations")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    grid = G.load_grid(args.config, protocol=args.protocol)
    out = Path(args.out) if args.out else G.default_out(grid)
    if not out.is_dir():
        raise SystemExit(f"no grid output at {out}: run `shpeft bench {args.config}` first")
    choices = G.chosen_lrs(grid, out)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    parts = [f"# Analyses of grid `{grid.name}` ({grid.protocol} protocol), seed {args.seed}\n"]
    if "sparsity" in only:
        parts.append(sparsity_section(grid, out, choices, dest, args.device))
    if "hybridity" in only:
        parts += hybridity_sections(grid, out, choices, dest, args.seed)
    if "locations" in only:
        parts += locations_sections(grid, out, choices, dest, args.seed)
    (dest / "analyses.md").write_text("\n".join(x for x in parts if x))
    print(f"wrote {dest / 'analyses.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
