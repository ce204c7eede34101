"""bf16 autocast against fp32 on the CPU, and one machine against another: the same runs, side by side.

Reads the final runs of one grid config (``benchmarks/configs/dinov2_precision.json``: full
fine-tuning and SH-PEFT on BUSI at fixed lrs, 3 seeds) from several output folders, each with a
label (e.g. ``"bf16, machine 1=runs/bench/dinov2_grid-cpu"``), and writes per method:

* each folder's test macro F1 per seed, mean ± std, validation mean and median CPU seconds;
* every folder against the first (the reference): the difference of the means and whether it
  is within the larger seed std (:func:`shpeft.analysis.claims.compare`).

    python benchmarks/precision_check.py benchmarks/configs/dinov2_precision.json \\
        --runs "bf16, machine 1=runs/bench/dinov2_grid-cpu" \\
               "bf16, machine 2=runs/bench/dinov2_precision-bf16-machine2" \\
               "fp32, machine 2=runs/bench/dinov2_grid-fp32" \\
        --out benchmarks/results/dinov2_precision/precision.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from shpeft.analysis.claims import compare, fmt_stat
from shpeft.analysis.grid import chosen_lrs, final_specs, load_grid, read_result
from shpeft.analysis.tables import row_label, stat, test_metric
from shpeft.io_utils import write_text


def folder_rows(grid, out: Path) -> dict[str, dict]:
    """Per variant: test F1 per seed (%), validation F1s, CPU seconds, CPU models."""
    rows: dict[str, dict] = {}
    for spec in final_specs(grid, chosen_lrs(grid, out)):
        r = read_result(out, spec)
        f1 = test_metric(r, "macro_f1")
        if f1 is None:
            continue
        row = rows.setdefault(spec.variant, {"test": {}, "val": [], "cpu_s": [], "cpus": set()})
        row["test"][spec.seed] = f1
        row["val"].append(100 * r["metrics"]["val"]["macro_f1"])
        if r.get("cpu_s") is not None:
            row["cpu_s"].append(r["cpu_s"])
        row["cpus"].add((r.get("environment") or {}).get("cpu") or "not recorded")
    return rows


def markdown(grid, folders: list[tuple[str, Path]]) -> str:
    data = [(label, folder_rows(grid, out)) for label, out in folders]
    lines = [
        f"### Precision and machine check: `{grid.name}`",
        "",
        "Test macro F1 (%) of the same runs (config, seeds, lrs) from each folder; the first "
        "folder is the reference. A difference within the larger seed std is within seed noise.",
        "",
        "| method | runs | test macro F1 per seed | mean ± std | validation mean | CPU s "
        "(median) | CPU | vs first: difference | verdict |",
        "|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for v in grid.methods:
        ref = stat(list(data[0][1].get(v.name, {}).get("test", {}).values()))
        for i, (label, rows) in enumerate(data):
            row = rows.get(v.name)
            if not row:
                lines.append(f"| {row_label(grid, v.name)} | {label} | pending | | | | | | |")
                continue
            s = stat(list(row["test"].values()))
            seeds = ", ".join(f"s{k}: {x:.1f}" for k, x in sorted(row["test"].items()))
            diff, verdict = "", ""
            if i and ref is not None and s is not None:
                diff = f"{s.mean - ref.mean:+.1f}"
                if s.n == ref.n == len(grid.seeds):
                    verdict = {"yes": "higher", "no": "lower"}.get(
                        compare(s, ref), "within seed std"
                    )
                else:
                    verdict = "pending (seeds missing)"
            lines.append(
                f"| {row_label(grid, v.name)} | {label} | {seeds} | {fmt_stat(s)} | "
                f"{statistics.mean(row['val']):.1f} | "
                f"{statistics.median(row['cpu_s']) if row['cpu_s'] else float('nan'):.0f} | "
                f"{'; '.join(sorted(row['cpus']))} | {diff} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", help="grid config (e.g. benchmarks/configs/dinov2_precision.json)")
    ap.add_argument(
        "--runs", nargs="+", required=True, metavar="LABEL=OUT", help="labelled output folders"
    )
    ap.add_argument("--out", help="Markdown file to write (default: print only)")
    args = ap.parse_args(argv)
    folders = []
    for item in args.runs:
        label, sep, out = item.rpartition("=")
        if not sep or not label:
            ap.error(f"--runs wants LABEL=OUT, got {item!r}")
        if not Path(out).is_dir():
            ap.error(f"no output folder {out}")
        folders.append((label, Path(out)))
    md = markdown(load_grid(args.config), folders)
    if args.out:
        write_text(args.out, md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
