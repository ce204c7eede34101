"""Issue 12's screening table: SH-PEFT selection variants side by side, validation only.

Reads the runs of a screening grid (``benchmarks/configs/dinov2_selection_screen.json``, run with
``--stages search``) and writes, per dataset:

* every variant's options, each candidate lr's validation macro F1, the best one against the
  linear-probe warm start (the state at iteration 0), its best iteration and mean validation F1
  over the run (the lr search's tie-break);
* where each variant spends k (share of the selected scalars per parameter kind, from the run's
  ``selection.json``), the gradient term's share of the selected scores and how many selected
  scalars have a structurally zero gradient.

Only validation metrics are read: the screen chooses finalists, the test split stays unread.

    python benchmarks/selection_screen.py benchmarks/configs/dinov2_selection_screen.json \
        --out runs/bench/dinov2_grid-cpu --dest benchmarks/results/dinov2_selection_screen
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from shpeft.analysis.grid import best_candidate, default_out, load_grid, lr_choices
from shpeft.analysis.ledger import read_val_curve

KINDS = (
    "patch_embed", "pos_embed", "cls_token", "norm", "layerscale", "bias",
    "qkv", "proj", "fc1", "fc2",
)  # fmt: skip


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _options(variant, base: dict[str, Any]) -> str:
    diff = {k: v for k, v in variant.config.items() if base.get(k) != v}
    return ", ".join(f"{k}={v}" for k, v in diff.items()) or "paper (eq. 1)"


def screen_rows(grid, out: Path, dataset: str) -> list[dict[str, Any]]:
    """One row per variant: lr candidates, best validation F1, where k went."""
    choices = lr_choices(grid, out)
    base = grid.variant(grid.methods[0].name).config
    rows = []
    for variant in grid.methods:
        entry = choices.get((dataset, variant.name), {"candidates": [], "complete": False})
        best = best_candidate(entry)
        row: dict[str, Any] = {
            "variant": variant.name,
            "options": _options(variant, base),
            "complete": bool(entry.get("complete")) and best is not None,
            "candidates": {c["lr"]: c["val_macro_f1"] for c in entry["candidates"]},
        }
        if best is not None:
            run = out / "runs" / best["run_id"]
            result = _json(run / "result.json") or {}
            # the warm start as evaluated: the validation F1 of the state at iteration 0
            warm = next((f1 for it, f1 in read_val_curve(run) if it == 0), None)
            row.update(
                best_lr=best["lr"],
                best_val_f1=best["val_macro_f1"],
                warm_start_f1=warm,
                best_iteration=(result.get("metrics") or {}).get("best_iteration"),
                curve_mean=best["val_curve_mean"],
                selection=_json(run / "selection.json"),
            )
        rows.append(row)
    return rows


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def screen_markdown(rows: list[dict[str, Any]], dataset: str) -> str:
    lines = [
        f"#### {dataset}: validation macro F1 (%) per lr (seed 0, 1% of the backbone)",
        "",
        "| variant | options | lr: val F1 | best | vs warm start | best iteration | mean over run |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    ranked = sorted(rows, key=lambda r: -(r.get("best_val_f1") or -1))
    for r in ranked:
        cands = ", ".join(f"{lr:g}: {_pct(f)}" for lr, f in sorted(r["candidates"].items()))
        status = "" if r["complete"] else " (search running)"
        if "best_val_f1" not in r:
            lines.append(
                f"| {r['variant']} | {r['options']} | {cands or '-'}{status} | - | - | - | - |"
            )
            continue
        gain = None if r["warm_start_f1"] is None else r["best_val_f1"] - r["warm_start_f1"]
        lines.append(
            f"| {r['variant']} | {r['options']} | {cands}{status} | {_pct(r['best_val_f1'])} | "
            f"{'-' if gain is None else f'{100 * gain:+.1f}'} | {r['best_iteration']} | "
            f"{_pct(r['curve_mean'])} |"
        )
    lines += [
        "",
        f"#### {dataset}: where k goes (% of the selected scalars per parameter kind)",
        "",
        "| variant | " + " | ".join(KINDS) + " | gradient term's share of the selected score | "
        "selected with zero gradient |",
        "|---|" + "---:|" * (len(KINDS) + 2),
    ]
    for r in rows:
        sel = r.get("selection")
        if not sel:
            continue
        per = sel["per_kind"]
        shares = [_pct(per.get(k, {}).get("selected", 0) / sel["k"]) for k in KINDS]
        td = (sel.get("term_share_selected") or {}).get("td")
        lines.append(
            f"| {r['variant']} | " + " | ".join(shares) + f" | {_pct(td)} | "
            f"{sel.get('zero_grad_selected', '-')} |"
        )
    return "\n".join(lines) + "\n"


def write_screen(rows: list[dict[str, Any]], dataset: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    md = dest / f"screen_{dataset}.md"
    md.write_text(screen_markdown(rows, dataset))
    with open(dest / f"screen_{dataset}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "options", "lr", "val_macro_f1", "best_for_variant", "complete"])
        for r in rows:
            for lr, f1 in sorted(r["candidates"].items()):
                w.writerow(
                    [r["variant"], r["options"], lr, f1, lr == r.get("best_lr"), r["complete"]]
                )
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="screening grid config (JSON)")
    p.add_argument("--out", default=None, help="the grid's output folder (default: the config's)")
    p.add_argument("--dest", required=True, help="folder for screen_<dataset>.md / .csv")
    args = p.parse_args(argv)
    grid = load_grid(args.config)
    out = Path(args.out) if args.out else default_out(grid)
    for ds in grid.datasets:
        path = write_screen(screen_rows(grid, out, ds), ds, Path(args.dest))
        print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
