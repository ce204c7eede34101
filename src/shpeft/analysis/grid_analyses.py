"""Fig. 2 (sparsity, hybridity) and SH-PEFT's selection locations on a finished grid.

Picks the grid's tuned final runs (each dataset's chosen lr, ``lr_choice_<name>.json``) and calls
the same functions as ``shpeft analyze``:

* sparsity (paper Fig. 2 left): every seed's full fine-tuning run on every dataset, grafted at
  k in {100, 50, 20, 10, 5, 1, 0.1}% and evaluated on its own test split; one table of the share
  of full fine-tuning's macro F1 kept (mean ± std over seeds per dataset);
* hybridity (Fig. 2 right), ``delta`` mode: top-k% |W_ft - W_ori| of the full fine-tuning runs on
  the datasets (seed ``seed``) plus the first dataset's other seeds as a reference (how much two
  runs of one task share); ``mask`` mode: SH-PEFT's selected positions on the datasets, at each
  of its budgets that finished on every dataset;
* locations: SH-PEFT's selection per block and parameter type, per dataset.

Each analysis writes Markdown, CSV, JSON and a PNG into its own folder under ``dest``;
``analyses.md`` collects the Markdown. Missing runs are skipped with a warning, so a partial
grid gets the analyses its finished runs allow. ``shpeft bench`` calls
:func:`write_grid_analyses` after the grid's runs, into ``summary_<name>/analyses``.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable
from pathlib import Path

from shpeft.analysis import grid as G
from shpeft.analysis.hybridity import run_hybridity, write_hybridity
from shpeft.analysis.ledger import is_restored
from shpeft.analysis.locations import run_locations, write_locations
from shpeft.analysis.paper import PAPER_HYBRIDITY_KS, PAPER_SPARSITY_KS
from shpeft.analysis.sparsity import run_sparsity, write_sparsity
from shpeft.io_utils import write_text

log = logging.getLogger("shpeft")

ANALYSES = ("sparsity", "hybridity", "locations")


def tuned_run(grid: G.GridConfig, out: Path, choices, ds: str, name: str, seed: int, budget=None):
    """The finished run directory of (dataset, variant, seed[, budget]) at its tuned lr, or None
    (also for a variant the grid does not have, and for a run restored from a ledger: its model
    files are gone)."""
    if name not in {v.name for v in grid.methods}:
        return None
    lr = G.run_lr(grid, choices, ds, name)
    if lr is None:
        return None
    spec = G.run_spec(grid, grid.variant(name), ds, lr, seed, grid.iterations, budget=budget)
    d = spec.run_dir(out)
    result = G.read_result(out, spec)
    if result is None:
        return None
    if is_restored(result):
        log.warning(
            "%s was restored from a ledger without its model files: skipped (delete %s and "
            "rerun the grid to train it again)",
            spec.run_id,
            d,
        )
        return None
    return d


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
    """Where every SH-PEFT variant's selection lies, per dataset (``locations/<dataset>`` for
    the paper's ``shpeft``, ``locations/<variant>/<dataset>`` for the others)."""
    parts = []
    for v in grid.methods:
        if v.method != "shpeft":
            continue
        for ds in grid.datasets:
            run = tuned_run(grid, out, choices, ds, v.name, seed)
            if run is None:
                continue
            sub = dest / "locations" / (ds if v.name == "shpeft" else f"{v.name}/{ds}")
            write_locations(run_locations(run), sub)
            parts.append((sub / "locations.md").read_text())
    return parts


def write_grid_analyses(
    grid: G.GridConfig,
    out: Path,
    dest: Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    only: Iterable[str] = ANALYSES,
) -> Path:
    """Run the analyses in ``only`` on the grid's finished runs; returns ``dest/analyses.md``."""
    only = set(only)
    bad = only - set(ANALYSES)
    if bad:
        raise ValueError(f"unknown analyses {sorted(bad)}; choose from {', '.join(ANALYSES)}")
    choices = G.chosen_lrs(grid, out)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    parts = [f"# Analyses of grid `{grid.name}` ({grid.protocol} protocol), seed {seed}\n"]
    if "sparsity" in only:
        parts.append(sparsity_section(grid, out, choices, dest, device))
    if "hybridity" in only:
        parts += hybridity_sections(grid, out, choices, dest, seed)
    if "locations" in only:
        parts += locations_sections(grid, out, choices, dest, seed)
    return write_text(dest / "analyses.md", "\n".join(x for x in parts if x))
