"""``shpeft bench``'s summary of a grid: every table, Fig. 4, the claims table and the index page.

Puts together :mod:`shpeft.analysis.tables` (Table 1 in the paper's layout, Tables 4-5, Fig. 4,
cost, lr choices) and :mod:`shpeft.analysis.claims` (the paper's claims against the same
numbers), written to one folder per grid config.
"""

from __future__ import annotations

from pathlib import Path

from shpeft.analysis.claims import check_claims, claims_markdown
from shpeft.analysis.grid import (
    STAGES,
    GridConfig,
    RunSpec,
    budget_specs,
    chosen_lrs,
    final_specs,
    grid_progress,
    progress_text,
    shared_specs,
)
from shpeft.analysis.ledger import LEDGER_NAME, write_ledger
from shpeft.analysis.tables import (
    METRICS,
    ablation_tables,
    budget_points,
    build_table,
    cost_markdown,
    load_results,
    lr_choice_markdown,
    paper_table1_markdown,
    plot_budgets,
    protocol_text,
    write_runs_csv,
)
from shpeft.io_utils import write_csv, write_text
from shpeft.report.index import write_index


def write_summary(grid: GridConfig, out: str | Path, dest: str | Path | None = None) -> dict:
    """Write every table (Markdown + CSV) and Fig. 4 (PNG) to ``dest`` (default OUT/summary_NAME).

    Returns:
        ``{"markdown": path of summary.md, "text": Table 1 (tuned) in Markdown, "files": [...]}``.
    """
    out = Path(out)
    # one folder per grid: several configs (main grid, ablations) may share one run folder
    dest = Path(dest) if dest else out / f"summary_{grid.name}"
    dest.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    choices = chosen_lrs(grid, out)
    settings: list[tuple[str, str, list[RunSpec]]] = []
    if grid.lr_search:
        settings.append(("tuned", "per-method lr chosen on validation", final_specs(grid, choices)))
    else:
        settings.append(
            ("fixed", f"lr {grid.default_lr:g} for every method", final_specs(grid, {}))
        )
    if grid.shared_lr is not None:
        settings.append(("shared", f"the paper's shared lr {grid.shared_lr:g}", shared_specs(grid)))
    files: list[str] = []
    parts = [
        f"# Benchmark grid `{grid.name}`",
        "",
        protocol_text(grid),
        f"Runs finished: {len(results)}. Cells: test split, mean ± sample std over seeds "
        "(`(n=k)` when fewer seeds finished), `-` when missing.",
        "",
    ]
    first_text = ""
    index_tables = []  # (key, desc, Table 1 of macro F1, its runs) for index.html
    for key, desc, specs in settings:
        tables = {}
        for metric, (_, mname) in METRICS.items():
            t = build_table(
                grid, results, specs, metric, f"Table 1 layout, test {mname} (%), {desc}"
            )
            if metric != "f1":
                t.notes.append(
                    "The paper reports ACC and AUC only in its supplementary material (not "
                    "transcribed)."
                )
            tables[metric] = t
            t.write_csv(dest / f"table1_{metric}_{key}.csv")
            write_text(dest / f"table1_{metric}_{key}.md", t.markdown())
            files += [
                str(dest / f"table1_{metric}_{key}.csv"),
                str(dest / f"table1_{metric}_{key}.md"),
            ]
            parts.append(t.markdown())
        if not first_text:
            first_text = tables["f1"].markdown()
        index_tables.append((key, desc, tables["f1"], specs))
        if key == settings[0][0]:  # the claims are judged on the main (tuned) setting
            budget_runs = budget_specs(grid, choices) + list(specs) if grid.budgets else []
            claims = check_claims(grid, tables["f1"], results, budget_runs)
            md = claims_markdown(grid, claims, desc)
            if md:
                write_text(dest / f"claims_{key}.md", md)
                files.append(str(dest / f"claims_{key}.md"))
                parts.append(md)
        for name, md in ablation_tables(grid, tables["f1"], tables["acc"]).items():
            write_text(dest / f"{name}_{key}.md", md)
            files.append(str(dest / f"{name}_{key}.md"))
            parts.append(md)
        cost = cost_markdown(grid, results, specs, desc)
        write_text(dest / f"cost_{key}.md", cost)
        files.append(str(dest / f"cost_{key}.md"))
        parts.append(cost)
    lr_md = lr_choice_markdown(grid, out)
    if lr_md:
        write_text(dest / "lr_choice.md", lr_md)
        files.append(str(dest / "lr_choice.md"))
        parts.append(lr_md)
    if grid.budgets:
        specs = budget_specs(grid, choices) + (
            final_specs(grid, choices) if grid.lr_search else final_specs(grid, {})
        )
        fields = ("method", "budget_field", "budget", "trainable_pct", "avg_macro_f1", "runs")
        # the paper's figure averages over every dataset; one per dataset as well, so that a
        # grid still running shows the datasets it has finished
        views: list[tuple[str, list[str] | None, str]] = [
            ("fig4_budgets", None, "average over the datasets")
        ]
        if len(grid.datasets) > 1:
            views += [(f"fig4_budgets_{ds}", [ds], f"{ds} only") for ds in grid.datasets]
        for name, dss, what in views:
            points = budget_points(grid, results, specs, dss)
            if dss and not points:
                continue
            write_csv(dest / f"{name}.csv", fields, ([p.get(k) for k in fields] for p in points))
            png = plot_budgets(
                points,
                dest / f"{name}.png",
                f"{grid.name}: Fig. 4 layout, {what} ({grid.protocol})",
                grid.raw.get("highlight", ()),
                ylabel="test macro F1 (%)" + (", average over datasets" if dss is None else ""),
            )
            files += [str(dest / f"{name}.csv"), str(png)]
            parts.append(f"### Fig. 4 layout, {what}\n\n![macro F1 vs trainable %]({png.name})\n")
    files.append(str(write_runs_csv(results, dest / "runs.csv")))
    # the finished runs themselves, small enough to commit: `shpeft bench --restore` reads them
    files.append(str(write_ledger(out, dest / LEDGER_NAME)))
    # what is done and what is left, as `shpeft bench --dry-run` counts it: a partial grid says so
    progress = "```\n" + progress_text(grid_progress(grid, out, STAGES, ())) + "```\n"
    write_text(dest / "progress.md", f"### Progress of `{grid.name}`\n\n{progress}")
    files.append(str(dest / "progress.md"))
    parts.insert(5, f"### Progress\n\n{progress}")
    parts.append(paper_table1_markdown())
    md = "\n".join(parts)
    write_text(dest / "summary.md", md)
    files.append(str(dest / "summary.md"))
    fig4 = dest / "fig4_budgets.png" if grid.budgets else None
    index = write_index(grid, out, dest, index_tables, fig4, protocol_text(grid))
    files.append(str(index))
    return {"markdown": str(dest / "summary.md"), "text": first_text, "files": files}
