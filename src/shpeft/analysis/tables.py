"""Summaries of a benchmark grid in the SH-PEFT paper's layout, next to the paper's numbers.

Table 1 (Liu, Xu, Liu, Zhang 2024): rows are the methods in the paper's order, columns the
datasets and their average, each cell the test macro F1 (%) as mean ± sample std over seeds.
Datasets that the paper also used (``"paper_name"`` in the grid config) get the paper's number
in a parallel column, and the paper's own six-dataset average sits beside ours. The same layout
is written for accuracy and AUC (the paper keeps those in its supplement, not transcribed here),
for the tuned setting (per-method lr chosen on validation) and for the paper's shared setting.
Table 4 / 5 (importance strategy, lambda) come from SH-PEFT variants in the grid; Fig. 4 plots
macro F1 against the trainable share of the backbone for every budgeted method.

Every table is written as Markdown and CSV; missing cells are ``-``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shpeft.analysis import paper
from shpeft.analysis.grid import (
    GridConfig,
    RunSpec,
    default_budget,
    lr_choices,
    unique,
)
from shpeft.analysis.output import save_figure
from shpeft.io_utils import write_csv
from shpeft.methods import METHODS

METRICS = {"f1": ("macro_f1", "macro F1"), "acc": ("accuracy", "accuracy"), "auc": ("auc", "AUC")}


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof 1) of a cell, over ``n`` seeds, in percent."""

    mean: float
    std: float
    n: int

    def text(self, expected: int | None = None) -> str:
        s = f"{self.mean:.1f}" if self.n < 2 else f"{self.mean:.1f} ± {self.std:.1f}"
        if expected is not None and self.n < expected:
            s += f" (n={self.n})"
        return s


def stat(values: Sequence[float]) -> Stat | None:
    """Mean ± sample std of ``values`` (None when empty; std 0 for a single value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return Stat(mean, std, len(vals))


def test_metric(result: dict[str, Any] | None, key: str) -> float | None:
    """A test metric of a run's ``result.json`` in percent (None when absent)."""
    if not result:
        return None
    v = ((result.get("metrics") or {}).get("test") or {}).get(key)
    return 100.0 * float(v) if v is not None else None


def load_results(out: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``result.json`` under ``OUT/runs``, keyed by run id."""
    results = {}
    for path in sorted((Path(out) / "runs").rglob("result.json")):
        try:
            r = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        results[r.get("run_id") or str(path.parent.relative_to(Path(out) / "runs"))] = r
    return results


def ordered_variants(grid: GridConfig) -> list[str]:
    """Variant names in the paper's row order; variants of one method stay together."""
    order = paper.PAPER_METHOD_ORDER

    def key(item: tuple[int, Any]) -> tuple[int, int]:
        i, v = item
        return (order.index(v.method) if v.method in order else len(order), i)

    return [v.name for _, v in sorted(enumerate(grid.methods), key=key)]


def row_label(grid: GridConfig, name: str) -> str:
    v = grid.variant(name)
    label = METHODS[v.method].label if v.name == v.method else v.name
    fname, value = default_budget(v)
    return f"{label} ({fname}={value:g})" if fname else label


@dataclass
class Table:
    """One results table: per (row, dataset) the per-seed values, plus the paper's numbers."""

    title: str
    datasets: list[str]
    rows: list[str]
    labels: dict[str, str]
    values: dict[tuple[str, str], dict[int, float]]  # (row, dataset) -> {seed: value}
    seeds: list[int]
    paper_columns: dict[str, str] = field(default_factory=dict)  # dataset -> paper dataset
    paper_values: dict[tuple[str, str], float] = field(default_factory=dict)
    paper_avg: dict[str, float] = field(default_factory=dict)
    trainable_pct: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def cell(self, row: str, ds: str) -> Stat | None:
        return stat(list(self.values.get((row, ds), {}).values()))

    def avg(self, row: str) -> Stat | None:
        """Mean ± std over seeds of the per-seed average over all datasets (complete seeds only)."""
        per_seed = []
        for seed in self.seeds:
            vals = [self.values.get((row, ds), {}).get(seed) for ds in self.datasets]
            if all(v is not None for v in vals):
                per_seed.append(sum(vals) / len(vals))
        return stat(per_seed)

    def header(self) -> list[str]:
        cols = ["method", "trainable %"]
        for ds in self.datasets:
            cols.append(ds)
            if ds in self.paper_columns:
                cols.append(f"{ds} paper ({self.paper_columns[ds]})")
        cols.append("avg")
        if self.paper_avg:
            cols.append("paper avg (6 datasets)")
        return cols

    def text_rows(self) -> list[list[str]]:
        out = []
        for row in self.rows:
            pct = self.trainable_pct.get(row)
            cells = [self.labels[row], "-" if pct is None else f"{pct:.3g}"]
            for ds in self.datasets:
                c = self.cell(row, ds)
                cells.append(c.text(len(self.seeds)) if c else "-")
                if ds in self.paper_columns:
                    p = self.paper_values.get((row, ds))
                    cells.append("-" if p is None else f"{p:.1f}")
            a = self.avg(row)
            cells.append(a.text(len(self.seeds)) if a else "-")
            if self.paper_avg:
                p = self.paper_avg.get(row)
                cells.append("-" if p is None else f"{p:.1f}")
            out.append(cells)
        return out

    def markdown(self) -> str:
        head = self.header()
        lines = [f"### {self.title}", ""] + [f"{n}" for n in self.notes]
        if self.notes:
            lines.append("")
        lines += [
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self.text_rows()]
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> None:
        """Machine-readable: per row, per dataset mean/std/n and the paper's value."""
        cols = ["method", "label", "trainable_pct"]
        for ds in self.datasets:
            cols += [f"{ds}_mean", f"{ds}_std", f"{ds}_n"]
            if ds in self.paper_columns:
                cols.append(f"{ds}_paper")
        cols += ["avg_mean", "avg_std", "avg_n"] + (["paper_avg"] if self.paper_avg else [])
        rows = []
        for row in self.rows:
            line: list[Any] = [row, self.labels[row], _num(self.trainable_pct.get(row))]
            for ds in self.datasets:
                c = self.cell(row, ds)
                line += [
                    _num(c.mean if c else None),
                    _num(c.std if c else None),
                    c.n if c else 0,
                ]
                if ds in self.paper_columns:
                    line.append(_num(self.paper_values.get((row, ds))))
            a = self.avg(row)
            line += [_num(a.mean if a else None), _num(a.std if a else None), a.n if a else 0]
            if self.paper_avg:
                line.append(_num(self.paper_avg.get(row)))
            rows.append(line)
        write_csv(path, cols, rows)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def build_table(
    grid: GridConfig,
    results: dict[str, dict[str, Any]],
    specs: Sequence[RunSpec],
    metric: str,
    title: str,
    *,
    with_paper: bool = True,
) -> Table:
    """Table 1 layout from the runs in ``specs`` (one lr per (dataset, method) row cell)."""
    key, _ = METRICS[metric]
    rows = ordered_variants(grid)
    values: dict[tuple[str, str], dict[int, float]] = {}
    pcts: dict[str, list[float]] = {}
    for spec in specs:
        # Table 1 uses each method's default budget; budget sweeps are Fig. 4's business
        if spec.budget != default_budget(grid.variant(spec.variant))[1]:
            continue
        r = results.get(spec.run_id)
        v = test_metric(r, key)
        if v is not None:
            values.setdefault((spec.variant, spec.dataset), {})[spec.seed] = v
        if r and r.get("trainable"):
            pcts.setdefault(spec.variant, []).append(r["trainable"]["backbone_trainable_pct"])
    table = Table(
        title=title,
        datasets=list(grid.datasets),
        rows=rows,
        labels={r: row_label(grid, r) for r in rows},
        values=values,
        seeds=list(grid.seeds),
        trainable_pct={k: sum(v) / len(v) for k, v in pcts.items()},
    )
    if with_paper and metric == "f1":
        for ds, info in grid.dataset_info.items():
            if info.get("paper_name") in paper.PAPER_DATASETS:
                table.paper_columns[ds] = info["paper_name"]
        for row in rows:
            v = grid.variant(row)
            if v.name != v.method:  # an ablation variant is not the paper's row
                continue
            for ds, pname in table.paper_columns.items():
                p = paper.paper_f1(v.method, pname)
                if p is not None:
                    table.paper_values[(row, ds)] = p
            p = paper.paper_f1(v.method, None)
            if p is not None:
                table.paper_avg[row] = p
    return table


def paper_table1_markdown() -> str:
    """The paper's Table 1 verbatim (its six datasets), for the page next to ours."""
    head = ["method", *paper.PAPER_DATASETS, "avg"]
    lines = [
        "### The paper's Table 1 (macro F1 %, CLIP ViT-B/16, 40k iterations, batch 64, 224 px, "
        "lr 1e-3 for every method)",
        "",
        f"Source: {paper.PAPER}; transcribed from {paper.PAPER_SOURCE}.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for m in paper.PAPER_METHOD_ORDER:
        lines.append(
            "| "
            + " | ".join([METHODS[m].label, *(f"{x:.1f}" for x in paper.PAPER_TABLE1_F1[m])])
            + " |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Ablations (Table 4, Table 5)


def importance_settings(grid: GridConfig) -> dict[str, tuple[str, float, float]]:
    """variant name -> (strategy, lambda, budget) for every variant of the grid whose method
    ranks by an importance ``strategy`` with a weight ``lam`` (Tables 4 and 5)."""
    out = {}
    for v in grid.methods:
        info = METHODS[v.method]
        fields = {f.name for f in dataclasses.fields(info.config_cls)}
        if {"strategy", "lam"} <= fields and info.budget_field:
            c = info.config_cls(**v.config)
            strategy = "ta" if c.strategy.startswith("ta") else c.strategy
            out[v.name] = (strategy, float(c.lam), float(getattr(c, info.budget_field)))
    return out


def ablation_tables(grid: GridConfig, table: Table, acc_table: Table) -> dict[str, str]:
    """Tables 4 and 5 in Markdown from the SH-PEFT variants of ``table`` (the F1 table).

    A row is filled only when the grid has a variant with that setting and the same ratio as the
    plain ``shpeft`` variant (or the first SH-PEFT variant).
    """
    settings = importance_settings(grid)
    if len(settings) < 2:
        return {}
    plain = [v.name for v in grid.methods if v.name == v.method and v.name in settings]
    base = settings[plain[0]] if plain else next(iter(settings.values()))
    ratio = base[2]

    def find(pred) -> str | None:
        return next((n for n, s in settings.items() if s[2] == ratio and pred(s)), None)

    out = {}
    t4 = []
    for strategy, (pf1, pacc) in paper.PAPER_TABLE4.items():
        hybrid = strategy in ("l1", "l2")
        name = find(lambda s, st=strategy, h=hybrid: s[0] == st and (not h or s[1] == 1.0))
        t4.append((paper.PAPER_TABLE4_LABELS[strategy], name, pf1, pacc))
    t5 = []
    for lam, (pf1, pacc) in paper.PAPER_TABLE5.items():
        name = find(lambda s, lam=lam: s[0] == "l2" and s[1] == lam)
        t5.append((f"lambda = {lam:g}", name, pf1, pacc))
    for key, title, rows in (
        ("table4", "Table 4: importance estimation strategies (SH-PEFT)", t4),
        ("table5", "Table 5: the balancing weight lambda (SH-PEFT, L2)", t5),
    ):
        if sum(1 for r in rows if r[1]) < 2:
            continue
        head = ["setting", "variant", *table.datasets, "avg F1", "avg ACC", "paper F1", "paper ACC"]
        lines = [
            f"### {title}",
            "",
            f"ratio {ratio:g}; test macro F1 / accuracy (%), mean ± std over seeds; the paper's "
            "columns are its averages over its six datasets (CLIP ViT-B/16).",
            "",
            "| " + " | ".join(head) + " |",
            "|---|---|" + "---:|" * (len(head) - 2),
        ]
        for label, name, pf1, pacc in rows:
            cells = [label, name or "-"]
            for ds in table.datasets:
                c = table.cell(name, ds) if name else None
                cells.append(c.text(len(table.seeds)) if c else "-")
            a = table.avg(name) if name else None
            b = acc_table.avg(name) if name else None
            cells += [a.text() if a else "-", b.text() if b else "-", f"{pf1:.1f}", f"{pacc:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        out[key] = "\n".join(lines) + "\n"
    return out


# ---------------------------------------------------------------------------------------------
# Fig. 4: macro F1 against the trainable share


def budget_points(
    grid: GridConfig,
    results: dict[str, dict[str, Any]],
    specs: Sequence[RunSpec],
    datasets: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per (method, budget): mean trainable % and the average over datasets of the seed-mean F1.

    A point needs every dataset (of ``datasets``, default the grid's) to have at least one
    finished run. A run listed twice (the default budget's run is both a final and a budget
    run) counts once.
    """
    wanted = set(grid.datasets if datasets is None else datasets)
    groups: dict[tuple[str, Any], dict[str, Any]] = {}
    for spec in unique(specs):
        if spec.dataset not in wanted:
            continue
        r = results.get(spec.run_id)
        f1 = test_metric(r, "macro_f1")
        if f1 is None:
            continue
        g = groups.setdefault((spec.variant, spec.budget), {"f1": {}, "pct": []})
        g["f1"].setdefault(spec.dataset, []).append(f1)
        g["pct"].append(r["trainable"]["backbone_trainable_pct"])
    points = []
    for (name, budget), g in groups.items():
        if set(g["f1"]) != wanted:
            continue
        means = [sum(v) / len(v) for v in g["f1"].values()]
        points.append(
            {
                "method": name,
                "budget_field": default_budget(grid.variant(name))[0],
                "budget": budget,
                "trainable_pct": sum(g["pct"]) / len(g["pct"]),
                "avg_macro_f1": sum(means) / len(means),
                "runs": len(g["pct"]),
            }
        )
    return sorted(points, key=lambda p: (p["method"], p["trainable_pct"]))


def plot_budgets(
    points: list[dict[str, Any]],
    path: Path,
    title: str,
    highlight: Sequence[str] = (),
    ylabel: str = "test macro F1 (%), average over datasets",
) -> Path:
    """Fig. 4: average macro F1 vs trainable % of the backbone (log x); a line per method, the
    ``highlight`` ones (the grid config's ``highlight``) drawn thicker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_method.setdefault(p["method"], []).append(p)
    for name, pts in sorted(by_method.items()):
        pts = sorted(pts, key=lambda p: p["trainable_pct"])
        # the linear probe trains no backbone scalar: a log axis has no place for 0%
        if all(p["trainable_pct"] <= 0 for p in pts):
            ax.axhline(pts[0]["avg_macro_f1"], ls="--", lw=1, color="gray", label=f"{name} (0%)")
            continue
        pts = [p for p in pts if p["trainable_pct"] > 0]
        style = "o-" if len(pts) > 1 else "s"
        lw = 2.5 if name in highlight else 1.2
        ax.plot(
            [p["trainable_pct"] for p in pts],
            [p["avg_macro_f1"] for p in pts],
            style,
            lw=lw,
            label=name,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable backbone scalars (% of the backbone, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if points:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Everything together


RUN_FIELDS = (
    "run_id", "dataset", "variant", "method", "budget_field", "budget", "lr", "iterations", "seed",
    "backbone_trainable", "backbone_trainable_pct", "val_macro_f1", "test_macro_f1",
    "test_accuracy", "test_auc", "best_iteration", "wall_s", "cpu_s", "train_s", "prepare_s",
    "peak_rss_mb", "peak_cuda_mb", "delta_bytes", "git_commit", "cpu", "finished_at",
)  # fmt: skip


def run_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per finished run (every stage), the grid's raw data in one CSV."""
    rows = []
    for run_id, r in sorted(results.items()):
        m = r.get("metrics") or {}
        val, test, tr = m.get("val") or {}, m.get("test") or {}, r.get("trainable") or {}
        row = {k: r.get(k) for k in RUN_FIELDS}
        row.update(
            run_id=run_id,
            backbone_trainable=tr.get("backbone_trainable"),
            backbone_trainable_pct=tr.get("backbone_trainable_pct"),
            val_macro_f1=val.get("macro_f1"),
            test_macro_f1=test.get("macro_f1"),
            test_accuracy=test.get("accuracy"),
            test_auc=test.get("auc"),
            best_iteration=m.get("best_iteration"),
            git_commit=(r.get("environment") or {}).get("git_commit"),
            # seeded CPU runs differ across CPU models: say which machine each run had
            cpu=(r.get("environment") or {}).get("cpu"),
        )
        rows.append(row)
    return rows


def write_runs_csv(results: dict[str, dict[str, Any]], path: Path) -> Path:
    rows = run_rows(results)
    return write_csv(path, RUN_FIELDS, ([r.get(k) for k in RUN_FIELDS] for r in rows))


def cost_markdown(
    grid: GridConfig, results: dict[str, dict[str, Any]], specs: Sequence[RunSpec], desc: str
) -> str:
    """What each method's Table 1 runs cost: trainable scalars, delta file, time, memory."""

    def mean(xs: list[float]) -> float | None:
        xs = [float(x) for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    per: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        r = results.get(spec.run_id)
        if r and spec.budget == default_budget(grid.variant(spec.variant))[1]:
            per.setdefault(spec.variant, []).append(r)
    lines = [
        f"### Cost per run, {desc}",
        "",
        "Means over the finished runs of every dataset and seed. CPU s: the run's process CPU "
        "time (what it costs on an idle core; includes importance estimation, validation and "
        "test). Peak RSS: the run's own process, for runs trained in a fresh process (`--workers` > 1); "
        "runs trained one after another in one process (`--workers 1`) share its peak and are left out.",
        "",
        "| method | runs | trainable backbone scalars | % | delta KB | CPU s | wall s "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ordered_variants(grid):
        rs = per.get(name, [])
        if not rs:
            continue
        tr = [r.get("trainable") or {} for r in rs]
        vals = {
            "n": mean([t.get("backbone_trainable") for t in tr]),
            "pct": mean([t.get("backbone_trainable_pct") for t in tr]),
            "kb": mean([(r.get("delta_bytes") or 0) / 1024 for r in rs]),
            "cpu": mean([r.get("cpu_s") for r in rs]),
            "wall": mean([r.get("wall_s") for r in rs]),
            # a sequential grid's runs share one process, whose peak covers all of them
            "rss": mean([r.get("peak_rss_mb") for r in rs if r.get("peak_rss_scope") == "run"]),
        }
        fmt = {"n": "{:,.0f}", "pct": "{:.3g}", "kb": "{:.1f}", "cpu": "{:.1f}", "wall": "{:.1f}",
               "rss": "{:.0f}"}  # fmt: skip
        cells = ["-" if v is None else fmt[k].format(v) for k, v in vals.items()]
        lines.append(f"| {row_label(grid, name)} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def protocol_text(grid: GridConfig) -> str:
    t = grid.train
    b = grid.backbone
    optimizer = (
        "AdamW" if t.get("optimizer") == "adamw" else f"SGD momentum {t.get('momentum', 0.9)}"
    )
    lines = [
        f"Protocol `{grid.protocol}`: backbone `{b.get('model')}` at "
        f"{b.get('image_size') or 'its native'} px; {t.get('iterations', 40000)} iterations, "
        f"batch {t.get('batch_size', 64)}, {optimizer}, {t.get('schedule', 'cosine')} schedule"
        f"{', warm-up ' + str(t['warmup_iterations']) if t.get('warmup_iterations') else ''}; "
        f"head start: {t.get('head_init', 'random')}; precision {t.get('precision', 'auto')}; "
        f"seeds {grid.seeds}.",
    ]
    if grid.lr_search:
        s = grid.lr_search
        starts = "".join(f"; {k}: {list(v)}" for k, v in s.per_method.items())
        extend = (
            f", extended by up to {s.extend} step(s) beyond an end of the grid while the best "
            "lr lies there"
            if s.extend
            else ""
        )
        lines.append(
            f"Tuned setting: every method gets the same lr search (starting grid "
            f"{list(s.lrs)}{starts}{extend}; {s.iterations} iterations, seed {s.seed}), chosen "
            "by validation macro F1; the test split is read once per final run."
        )
    if grid.shared_lr is not None:
        lines.append(f"Shared setting: lr {grid.shared_lr:g} for every method (the paper's way).")
    p = paper.PAPER_PROTOCOL
    lines.append(
        f"Paper protocol: {p['backbone']}, {p['image_size']} px, {p['iterations']} iterations, "
        f"batch {p['batch_size']}, {p['optimizer']}, lr {p['lr']:g} {p['schedule']} for every "
        "method (`shpeft bench CONFIG --protocol paper`)."
    )
    if grid.note:
        lines.append(f"Note: {grid.note}")
    for ds, info in grid.dataset_info.items():
        if info.get("note"):
            lines.append(f"Dataset `{ds}`: {info['note']}")
    return "\n".join(f"- {x}" for x in lines) + "\n"


def lr_choice_markdown(grid: GridConfig, out: Path) -> str:
    table = lr_choices(grid, out)
    if not table:
        return ""
    lines = [
        "### Learning rates chosen on the validation split (tuned setting)",
        "",
        "cell: chosen lr (validation macro F1 % of each candidate lr, lr: F1)",
        "",
        "| method | " + " | ".join(grid.datasets) + " |",
        "|---|" + "---|" * len(grid.datasets),
    ]
    for name in ordered_variants(grid):
        cells = []
        src = grid.lr_source(name)
        for ds in grid.datasets:
            e = table.get((ds, src)) if src else None
            if not e:
                cells.append(f"fixed {grid.default_lr:g}")
                continue
            if src != name:
                cells.append(f"as {src}")
                continue
            vals = ", ".join(
                f"{c['lr']:g}: "
                + ("-" if c["val_macro_f1"] is None else f"{100 * c['val_macro_f1']:.1f}")
                for c in sorted(e["candidates"], key=lambda c: c["lr"])
            )
            if e["chosen"] is not None:
                chosen = f"{e['chosen']:g}"
            else:
                chosen = "all failed" if e["complete"] else "pending"
            cells.append(f"{chosen} ({vals})")
        lines.append(f"| {row_label(grid, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
