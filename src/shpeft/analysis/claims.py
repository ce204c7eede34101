"""The paper's claims against a grid's results: one table of claim, measurement and verdict.

Written by ``shpeft bench`` beside Table 1 (``claims_<setting>.md``), so that the verdicts are
computed from the same result files as the tables, never typed by hand. A claim is judged on
the datasets where every run it needs has finished; until all of the grid's datasets are in, the
verdict says "so far" and names them. Differences smaller than the seed standard deviation are
called ties, not wins: the grid has three seeds and test sets of a few hundred images.

Claims checked (Liu, Xu, Liu, Zhang 2024): SH-PEFT has the best average macro F1 of the twelve
methods (Table 1); it beats the others at an equal trainable share (Fig. 4); at about 0.01% of
the backbone it is at least as good as full fine-tuning; the hybrid importance beats either of
its terms (Table 4); lambda = 1 is the best balance (Table 5). Fig. 2 (sparsity, hybridity) is
measured by ``benchmarks/paper_analyses.py`` from the same runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shpeft.analysis import paper
from shpeft.analysis.grid import GridConfig, RunSpec
from shpeft.analysis.tables import Stat, Table, budget_points, importance_settings, stat
from shpeft.methods import METHODS

#: The method whose claims are checked, as named in the registry and the paper's Table 1.
SUBJECT = "shpeft"
#: Two trainable shares count as "equal" within this factor (Fig. 4 compares neighbours on a
#: log axis; the methods' budgets never coincide exactly).
SHARE_FACTOR = 3.0
#: The "about 0.01%" of the abstract: SH-PEFT's budget point closest to it, within this factor.
TINY_SHARE_PCT = 0.01


@dataclass
class Claim:
    """One row: the paper's claim, what this grid measured, and the verdict."""

    claim: str
    ours: str
    verdict: str


def fmt_stat(s: Stat | None) -> str:
    if s is None:
        return "-"
    return f"{s.mean:.1f}" if s.n < 2 else f"{s.mean:.1f} ± {s.std:.1f}"


def compare(a: Stat, b: Stat, at_least: bool = False) -> str:
    """``a`` against ``b``: "yes" (higher by more than the larger seed std; with ``at_least``,
    any ``a >= b``), "no" (lower by more than it), or "within seed std"."""
    noise = max(a.std, b.std)
    if a.mean - b.mean > noise or (at_least and a.mean >= b.mean):
        return "yes"
    if b.mean - a.mean > noise:
        return "no"
    return "within seed std"


def _scope(done: Sequence[str], grid: GridConfig) -> str:
    """ "" when every dataset is in, else " so far (busi of busi, cxr3)"."""
    if list(done) == list(grid.datasets):
        return ""
    return f" so far ({', '.join(done)} of {', '.join(grid.datasets)})"


def complete_datasets(table: Table, rows: Sequence[str]) -> list[str]:
    """The datasets on which every row in ``rows`` has every seed finished."""
    return [
        ds
        for ds in table.datasets
        if all(len(table.values.get((r, ds), {})) >= len(table.seeds) for r in rows)
    ]


def average(table: Table, row: str, datasets: Sequence[str]) -> Stat | None:
    """Mean ± std over seeds of the row's per-seed average over ``datasets``."""
    per_seed = []
    for seed in table.seeds:
        vals = [table.values.get((row, ds), {}).get(seed) for ds in datasets]
        if datasets and all(v is not None for v in vals):
            per_seed.append(sum(vals) / len(vals))
    return stat(per_seed)


def point_label(grid: GridConfig, point: dict[str, Any]) -> str:
    """A Fig. 4 point's method label with its own budget (not the variant's default one)."""
    v = grid.variant(point["method"])
    label = METHODS[v.method].label if v.name == v.method else v.name
    if point.get("budget_field") and point.get("budget") is not None:
        return f"{label} ({point['budget_field']}={point['budget']:g})"
    return label


def paper_rows(grid: GridConfig) -> list[str]:
    """The grid's variants that are the paper's Table 1 rows (a method under its own name)."""
    return [v.name for v in grid.methods if v.name == v.method]


def table1_claim(grid: GridConfig, table: Table) -> Claim | None:
    """SH-PEFT has the highest average macro F1 of all methods in the grid (Table 1)."""
    rows = paper_rows(grid)
    if SUBJECT not in rows or len(rows) < 2:
        return None
    others = [r for r in rows if r != SUBJECT]
    p_avg = {r: paper.paper_f1(grid.variant(r).method, None) for r in rows}
    best_paper = max((r for r in others if p_avg[r] is not None), key=lambda r: p_avg[r])
    claim = (
        f"SH-PEFT has the best average macro F1 of the {len(rows)} methods (Table 1: "
        f"{p_avg[SUBJECT]:.1f}, next {METHODS[best_paper].label} {p_avg[best_paper]:.1f})"
    )
    done = complete_datasets(table, rows)
    if not done:
        return Claim(claim, "no dataset has every method's seeds finished yet", "pending")
    avgs = {r: average(table, r, done) for r in rows}
    ranked = sorted(rows, key=lambda r: -avgs[r].mean)  # type: ignore[union-attr]
    rank = ranked.index(SUBJECT) + 1
    best = ranked[0] if ranked[0] != SUBJECT else ranked[1]
    leaders = ", ".join(
        f"{table.labels[r]} {fmt_stat(avgs[r])}" for r in ranked[:4] if r != SUBJECT
    )
    ours = (
        f"SH-PEFT {fmt_stat(avgs[SUBJECT])}, rank {rank} of {len(rows)}; {leaders}"
        f"{'' if len(done) == len(grid.datasets) else '; datasets: ' + ', '.join(done)}"
    )
    if rank == 1:
        v = compare(avgs[SUBJECT], avgs[best])  # type: ignore[arg-type]
        verdict = "**agrees**" if v == "yes" else f"**no clear winner**: SH-PEFT highest, {v}"
    else:
        v = compare(avgs[best], avgs[SUBJECT])  # type: ignore[arg-type]
        verdict = (
            "**disagrees**"
            if v == "yes"
            else f"**does not show it**: {table.labels[best]} higher, {v}"
        )
    return Claim(claim, ours, verdict + _scope(done, grid))


def budget_claims(
    grid: GridConfig,
    table: Table,
    results: dict[str, dict[str, Any]],
    specs: Sequence[RunSpec],
) -> list[Claim]:
    """Fig. 4: SH-PEFT against every other method at an equal trainable share, and SH-PEFT at
    about 0.01% against full fine-tuning. Points are averages over datasets of seed means."""
    rows = paper_rows(grid)
    if SUBJECT not in rows:
        return []
    done = [
        ds
        for ds in grid.datasets
        if any(s.dataset == ds for s in specs)
        and all(
            (results.get(s.run_id) or {}).get("metrics", {}).get("test")
            for s in specs
            if s.dataset == ds
        )
    ]
    claims = []
    claim = (
        f"SH-PEFT beats every other method at an equal trainable share (Fig. 4; here: within a "
        f"factor {SHARE_FACTOR:g} of its share)"
    )
    points = budget_points(grid, results, specs, done) if done else []
    mine = [p for p in points if p["method"] == SUBJECT]
    if not done:
        claims.append(Claim(claim, "no dataset has all its final and budget runs yet", "pending"))
    elif not mine:
        claims.append(Claim(claim, "SH-PEFT has no budget point", "pending"))
    else:
        lines, verdicts = [], []
        for p in sorted(mine, key=lambda p: p["trainable_pct"]):
            near = [
                q
                for q in points
                if q["method"] != SUBJECT
                and grid.variant(q["method"]).method != SUBJECT
                and q["trainable_pct"] > 0
                and 1 / SHARE_FACTOR <= q["trainable_pct"] / p["trainable_pct"] <= SHARE_FACTOR
            ]
            if not near:
                continue
            top = max(near, key=lambda q: q["avg_macro_f1"])
            lines.append(
                f"{p['trainable_pct']:.3g}%: SH-PEFT {p['avg_macro_f1']:.1f} vs "
                f"{point_label(grid, top)} ({top['trainable_pct']:.3g}%) {top['avg_macro_f1']:.1f}"
            )
            verdicts.append(p["avg_macro_f1"] >= top["avg_macro_f1"])
        if not verdicts:
            claims.append(Claim(claim, "no other method has a point near SH-PEFT's", "pending"))
        else:
            v = "**agrees**" if all(verdicts) else "**disagrees**"
            if any(verdicts) and not all(verdicts):
                v = f"**partly**: ahead at {sum(verdicts)} of {len(verdicts)} shares"
            claims.append(Claim(claim, "; ".join(lines), v + _scope(done, grid)))
    claim = "SH-PEFT at about 0.01% of the backbone beats full fine-tuning (abstract, Fig. 4)"
    tiny = [
        p for p in mine if 1 / SHARE_FACTOR <= p["trainable_pct"] / TINY_SHARE_PCT <= SHARE_FACTOR
    ]
    full = [p for p in points if p["method"] == "full"]
    if not tiny or not full:
        claims.append(
            Claim(claim, "SH-PEFT's 0.01% runs or full fine-tuning not finished", "pending")
        )
    else:
        p = min(tiny, key=lambda p: abs(p["trainable_pct"] - TINY_SHARE_PCT))
        ok = p["avg_macro_f1"] >= full[0]["avg_macro_f1"]
        claims.append(
            Claim(
                claim,
                f"SH-PEFT {p['trainable_pct']:.3g}%: {p['avg_macro_f1']:.1f} ({p['runs']} runs) vs "
                f"full fine-tuning {full[0]['avg_macro_f1']:.1f}",
                ("**agrees**" if ok else "**disagrees**") + _scope(done, grid),
            )
        )
    return claims


def ablation_claims(grid: GridConfig, table: Table) -> list[Claim]:
    """Table 4 (hybrid beats either term) and Table 5 (lambda = 1 is best), at SH-PEFT's ratio."""
    settings = importance_settings(grid)
    base = settings.get(SUBJECT)
    if base is None:
        return []
    ratio = base[2]

    def find(pred: Callable[[tuple[str, float, float]], bool]) -> str | None:
        return next((n for n, s in settings.items() if s[2] == ratio and pred(s)), None)

    claims = []
    hybrid = find(lambda s: s[0] == "l2" and s[1] == 1.0)
    halves = {"td-l2": find(lambda s: s[0] == "td-l2"), "ta": find(lambda s: s[0] == "ta")}
    p4 = paper.PAPER_TABLE4
    claim = (
        f"the hybrid importance beats either of its terms (Table 4: hybrid L2 {p4['l2'][0]:.1f}, "
        f"gradient only {p4['td-l2'][0]:.1f}, magnitude only {p4['ta'][0]:.1f})"
    )
    present = [n for n in halves.values() if n]
    if hybrid is None or not present:
        claims.append(Claim(claim, "no strategy variants in this grid", "not in this grid"))
    else:
        rows = [hybrid, *present]
        done = complete_datasets(table, rows)
        if not done:
            claims.append(Claim(claim, "waiting for runs", "pending"))
        else:
            avgs = {r: average(table, r, done) for r in rows}
            vs = [compare(avgs[hybrid], avgs[r]) for r in present]  # type: ignore[arg-type]
            verdict = (
                "**agrees**"
                if all(v == "yes" for v in vs)
                else "**disagrees**"
                if any(v == "no" for v in vs)
                else "**no clear winner**: within seed std"
            )
            ours = "; ".join(f"{r} {fmt_stat(avgs[r])}" for r in rows)
            claims.append(Claim(claim, ours, verdict + _scope(done, grid)))
    lams = {s[1]: n for n, s in settings.items() if s[0] == "l2" and s[2] == ratio}
    claim = "lambda = 1 balances the terms best (Table 5: 83.9 against 82.4-83.1)"
    if len(lams) < 2 or 1.0 not in lams:
        claims.append(Claim(claim, "no lambda variants in this grid", "not in this grid"))
        return claims
    rows = [lams[k] for k in sorted(lams)]
    done = complete_datasets(table, rows)
    if not done:
        claims.append(Claim(claim, "waiting for runs", "pending"))
        return claims
    avgs = {lam: average(table, n, done) for lam, n in lams.items()}
    best = max(avgs, key=lambda lam: avgs[lam].mean)  # type: ignore[union-attr]
    ours = "; ".join(f"lambda {lam:g}: {fmt_stat(avgs[lam])}" for lam in sorted(avgs))
    if best == 1.0:
        runner = max((lam for lam in avgs if lam != 1.0), key=lambda lam: avgs[lam].mean)  # type: ignore[union-attr]
        v = compare(avgs[1.0], avgs[runner])  # type: ignore[arg-type]
        verdict = "**agrees**" if v == "yes" else "**no clear optimum**: within seed std"
    else:
        v = compare(avgs[best], avgs[1.0])  # type: ignore[arg-type]
        verdict = (
            f"**disagrees**: lambda {best:g} is best"
            if v == "yes"
            else f"**no clear optimum**: lambda {best:g} highest, within seed std"
        )
    claims.append(Claim(claim, ours, verdict + _scope(done, grid)))
    return claims


def check_claims(
    grid: GridConfig,
    table: Table,
    results: dict[str, dict[str, Any]],
    budget_run_specs: Sequence[RunSpec] = (),
) -> list[Claim]:
    """Every claim this grid can speak to, in the paper's order (Table 1, Fig. 4, Tables 4-5)."""
    claims = []
    c = table1_claim(grid, table)
    if c:
        claims.append(c)
    if grid.budgets:
        claims += budget_claims(grid, table, results, budget_run_specs)
    claims += ablation_claims(grid, table)
    return claims


def claims_markdown(grid: GridConfig, claims: Sequence[Claim], desc: str) -> str:
    """The claims table in Markdown (empty string when the grid checks none)."""
    if not claims:
        return ""
    lines = [
        f"### The paper's claims against `{grid.name}` ({desc})",
        "",
        "Test macro F1 (%), mean ± std over seeds of the average over datasets; a difference "
        "within the larger seed std is a tie. Written by `shpeft bench` from the result files.",
        "",
        "| claim (paper) | measured here | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {c.claim} | {c.ours} | {c.verdict} |" for c in claims]
    return "\n".join(lines) + "\n"


__all__ = [
    "Claim",
    "ablation_claims",
    "budget_claims",
    "check_claims",
    "claims_markdown",
    "table1_claim",
]
