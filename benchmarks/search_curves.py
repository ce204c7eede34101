"""Validation curves of a grid's lr search: macro F1 against iteration, one line per method.

For each dataset and method of a grid, the seed-0 search run at the method's best lr so far
(by validation macro F1, the search's own rule) is read from its ``train_log.jsonl``; iteration 0
is the linear-probe warm start. One PNG per dataset, plus the numbers as CSV. Validation only:
these are the curves the protocol (iterations, evaluation interval, lrs) was judged on.

    python benchmarks/search_curves.py benchmarks/configs/dinov2_grid.json \
        --out runs/bench/dinov2_grid-cpu --dest benchmarks/results/dinov2_grid
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from shpeft.analysis.grid import best_candidate, default_out, load_grid, lr_choices


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["iteration"]), float(r["val"]["macro_f1"])) for r in rows if "val" in r]


def best_curves(grid, out: Path, dataset: str) -> dict[str, tuple[float, list[tuple[int, float]]]]:
    """Per method: (lr, curve) of its best finished search run on ``dataset``."""
    curves = {}
    for (ds, name), entry in lr_choices(grid, out).items():
        best = best_candidate(entry) if ds == dataset else None
        if best is not None:
            curves[name] = (best["lr"], val_curve(out / "runs" / best["run_id"]))
    return curves


def plot(curves, dataset: str, path: Path, highlight: tuple[str, ...] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, (lr, pts) in sorted(curves.items()):
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        bold = any(name.startswith(h) for h in highlight)
        ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, lw=2.4 if bold else 1.1,
                label=f"{name} (lr {lr:g})")  # fmt: skip
    ax.set_xlabel("iteration (0 = linear-probe warm start)")
    ax.set_ylabel("validation macro F1 (%)")
    ax.set_title(f"{dataset}: lr search, best lr per method (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--out", default=None, help="the grid's output folder (default: the config's)")
    p.add_argument("--dest", required=True)
    args = p.parse_args(argv)
    grid = load_grid(args.config)
    out = Path(args.out) if args.out else default_out(grid)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for ds in grid.datasets:
        curves = best_curves(grid, out, ds)
        if not curves:
            continue
        plot(curves, ds, dest / f"search_curves_{ds}.png", ("shpeft",))
        with open(dest / f"search_curves_{ds}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "lr", "iteration", "val_macro_f1"])
            for name, (lr, pts) in sorted(curves.items()):
                w.writerows([name, lr, it, f"{y:.4f}"] for it, y in pts)
        print(dest / f"search_curves_{ds}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
