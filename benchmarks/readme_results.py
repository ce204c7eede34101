"""The README's DINOv2 results table, written from the committed result files.

Table 1's tuned test macro F1 (``results/dinov2_grid/table1_f1_tuned.csv``, as ``shpeft bench``
writes it) with issue 12's selection options at 1% beside it
(``results/dinov2_selection_ablation/ablation.csv``): mean ± std over seeds per dataset, and the
average over the datasets once a row has all of them. Rows are ordered by that average, or, while
a dataset is still missing somewhere, by the mean over the datasets every row has. The table
replaces what stands between its two markers in ``README.md``, so the README never quotes a
number the result files do not hold (``--check`` only compares; the test suite runs it).

    python benchmarks/readme_results.py            # rewrite the block in README.md
    python benchmarks/readme_results.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "benchmarks" / "results" / "dinov2_grid" / "table1_f1_tuned.csv"
ABLATION = ROOT / "benchmarks" / "results" / "dinov2_selection_ablation" / "ablation.csv"
BEGIN = "<!-- dinov2-table1: written by benchmarks/readme_results.py from the result files -->"
END = "<!-- /dinov2-table1 -->"
NAMES = {"busi": "BUSI", "cxr3": "CXR3", "breastmnist": "BreastMNIST"}


def _num(x: str) -> float | None:
    return float(x) if x not in ("", None) else None


def flags(selection: str) -> str:
    """``"mix=rank, zero_grad=skip"`` -> ``"--mix rank --zero-grad skip"`` (the CLI's spelling)."""
    pairs = (part.split("=", 1) for part in selection.split(", "))
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in pairs)


def rows(table1: Path = TABLE1, ablation: Path = ABLATION) -> tuple[list[str], list[dict]]:
    """(datasets, rows); a row: label, trainable %, {dataset: (mean, std, n)}."""
    with open(table1, newline="") as f:
        t1 = list(csv.DictReader(f))
    datasets = [c[: -len("_mean")] for c in t1[0] if c.endswith("_mean") and c != "avg_mean"]
    out = [
        {
            "label": "SH-PEFT (eq. 1, as published)" if r["method"] == "shpeft" else r["label"],
            "pct": float(r["trainable_pct"]),
            "cells": {
                ds: (_num(r[f"{ds}_mean"]), _num(r[f"{ds}_std"]), int(r[f"{ds}_n"] or 0))
                for ds in datasets
            },
        }
        for r in t1
    ]
    if ablation.is_file():
        with open(ablation, newline="") as f:
            ab = [r for r in csv.DictReader(f) if float(r["budget"]) == 0.01]
        for sel in dict.fromkeys(r["selection"] for r in ab if r["selection"] != "paper (eq. 1)"):
            mine = {r["dataset"]: r for r in ab if r["selection"] == sel}
            out.append(
                {
                    "label": f"SH-PEFT `{flags(sel)}` (issue 12)",
                    "pct": float(next(iter(mine.values()))["trainable_pct"]),
                    "cells": {
                        ds: (
                            (_num(mine[ds]["mean"]), _num(mine[ds]["std"]), int(mine[ds]["n"]))
                            if ds in mine
                            else (None, None, 0)
                        )
                        for ds in datasets
                    },
                }
            )
    return datasets, out


def markdown(datasets: list[str], table: list[dict]) -> str:
    done = [ds for ds in datasets if all(r["cells"][ds][2] for r in table)]
    for r in table:
        means = [r["cells"][ds][0] for ds in datasets if r["cells"][ds][2]]
        r["avg"] = statistics.fmean(means) if len(means) == len(datasets) else None
        r["key"] = statistics.fmean(r["cells"][ds][0] for ds in done) if done else 0.0
    table = sorted(table, key=lambda r: -(r["avg"] if r["avg"] is not None else r["key"]))
    best = {
        ds: max((r["cells"][ds][0] for r in table if r["cells"][ds][2]), default=None)
        for ds in datasets
    }
    best_avg = max((r["avg"] for r in table if r["avg"] is not None), default=None)

    def cell(mean, std, n, top) -> str:
        if not n:
            return "-"
        text = f"{mean:.1f} ± {std:.1f}"
        return f"**{text}**" if mean == top else text

    head = ["method", "trainable %", *(NAMES.get(ds, ds) for ds in datasets), "average"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in table:
        cells = [cell(*r["cells"][ds], best[ds]) for ds in datasets]
        avg = "-" if r["avg"] is None else f"{r['avg']:.1f}"
        if r["avg"] is not None and r["avg"] == best_avg:
            avg = f"**{avg}**"
        lines.append(f"| {r['label']} | {r['pct']:.3g} | " + " | ".join(cells) + f" | {avg} |")
    order = (
        "the average"
        if len(done) == len(datasets)
        else ("the mean over " + ", ".join(NAMES.get(d, d) for d in done) if done else "the config")
    )
    lines += [
        "",
        f"Test macro F1 (%), mean ± std over seeds; best per column in bold; rows by {order}.",
    ]
    return "\n".join(lines)


def render(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if out of date")
    args = ap.parse_args(argv)
    text = args.readme.read_text()
    new = render(text, markdown(*rows()))
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date: run python benchmarks/readme_results.py")
            return 1
        return 0
    args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
