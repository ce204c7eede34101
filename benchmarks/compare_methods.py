"""Methods side by side (default: SH-PEFT 1%, linear probe, full): same backbone, data, seed, schedule.

Usage (CPU, about 30-40 minutes on 2 cores for the defaults):

    python benchmarks/compare_methods.py --out runs/compare_methods
    python benchmarks/compare_methods.py --iterations 40000 --lr 1e-3 --model PATH ...  # paper protocol

Each run is an ordinary ``shpeft train`` run directory under ``--out``; finished runs (with a
metrics.json) are reused, so the script resumes where it stopped. Prints and writes a Markdown
table (``--out``/results.md) and the raw rows as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shpeft.cli import main as shpeft_main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = {
    "busi_256": SHARED / "data" / "busi_256",
    "breastmnist": SHARED / "data" / "breastmnist" / "breastmnist.npz",
}

# Official splits that share an exact image between train and test (found by `shpeft data
# check`); they are the published benchmarks, so they are used as they are and said so.
LEAKY_OFFICIAL_SPLITS = {"breastmnist"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compare_methods")
    p.add_argument("--model", default=str(SHARED / "models" / "vit_mini"))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--methods", default="shpeft,linear,full")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    for ds in args.datasets.split(","):
        for method in args.methods.split(","):
            run = out / ds / method
            if not (run / "metrics.json").is_file():
                argv = [
                    "-q",
                    "train",
                    "--model",
                    args.model,
                    "--data",
                    str(DATASETS.get(ds, ds)),
                    "--method",
                    method,
                    "--iterations",
                    str(args.iterations),
                    "--batch-size",
                    str(args.batch_size),
                    "--lr",
                    str(args.lr),
                    "--seed",
                    str(args.seed),
                    "--threads",
                    str(args.threads),
                    "--out",
                    str(run),
                    "--overwrite",
                    "--no-progress",
                ]
                if ds in LEAKY_OFFICIAL_SPLITS:
                    argv += ["--allow-leakage"]
                if method == "shpeft":
                    argv += ["--ratio", str(args.ratio)]
                if shpeft_main(argv) != 0:
                    raise SystemExit(f"run {run} failed")
            m = json.loads((run / "metrics.json").read_text())
            rows.append(
                {
                    "dataset": ds,
                    "method": method,
                    "trainable_pct": m["trainable"]["backbone_trainable_pct"],
                    "val_f1": m["val"]["macro_f1"] if m.get("val") else None,
                    "f1": m["test"]["macro_f1"],
                    "acc": m["test"]["accuracy"],
                    "auc": m["test"]["auc"],
                    "train_s": m["train_s"],
                    "prepare_s": m["prepare_s"],
                    "delta_bytes": m["delta_bytes"],
                }
            )
    lines = [
        f"model {args.model}, {args.iterations} iterations, batch {args.batch_size}, SGD lr {args.lr} "
        f"momentum 0.9 cosine, seed {args.seed}; test split, best validation checkpoint",
        "",
        "| dataset | method | trainable % | val macro F1 | test macro F1 | test acc | test AUC | train s | delta KB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        val = f"{100 * r['val_f1']:.1f}" if r["val_f1"] is not None else "-"
        auc = f"{100 * r['auc']:.1f}" if r["auc"] is not None else "-"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['trainable_pct']:.3g} | {val} | "
            f"{100 * r['f1']:.1f} | {100 * r['acc']:.1f} | {auc} | {r['train_s']:.0f} | "
            f"{r['delta_bytes'] / 1024:.0f} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
