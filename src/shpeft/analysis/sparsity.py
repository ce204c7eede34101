"""Sparsity analysis of the SH-PEFT paper (Fig. 2 left): how few weight changes carry a fine-tune.

From a pretrained backbone ``W_ori`` and a fine-tuned one ``W_ft`` (normally a ``full`` run),
keep the top k% of ``|W_ft - W_ori|`` entries from ``W_ft`` and the rest from ``W_ori`` (one
global threshold over every backbone tensor, ties to the lowest flat index, as in
:func:`shpeft.selection.select_topk`), evaluate the grafted model with the run's own head on the
run's recorded split, and report the share of the fine-tune's macro F1 that is kept, for k in
{100, 50, 20, 10, 5, 1, 0.1} (Liu, Xu, Liu, Zhang 2024, sec. 2.1: "keeping around 10% of the
changes could maintain around 95% of the full fine-tune performance").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shpeft.analysis.changes import finetuned_model, topk_flat
from shpeft.analysis.output import save_figure, write_outputs
from shpeft.analysis.paper import PAPER_SPARSITY_CLAIM, PAPER_SPARSITY_KS
from shpeft.evaluate import evaluate
from shpeft.importance import eligible_parameters
from shpeft.runs import run_split_loader


@torch.no_grad()
def graft(base: dict[str, Tensor], ft: dict[str, Tensor], k_percent: float) -> dict[str, Tensor]:
    """``W_ori <- W_ft @ k%``: the top-k% changed entries from ``ft``, every other from ``base``.

    k = 100 returns ``ft`` exactly, k = 0 (or a k that rounds to no scalar) ``base`` exactly.
    """
    names = list(base)
    diff = torch.cat([(ft[n].float() - base[n].float()).abs().reshape(-1).cpu() for n in names])
    keep = topk_flat(diff, k_percent)
    out, offset = {}, 0
    for n in names:
        m = keep[offset : offset + base[n].numel()].view(base[n].shape).to(base[n].device)
        out[n] = torch.where(m, ft[n], base[n])
        offset += base[n].numel()
    return out


@torch.no_grad()
def run_sparsity(
    run_dir: str | Path,
    ks: Sequence[float] = PAPER_SPARSITY_KS,
    *,
    split: str = "test",
    device: str = "cpu",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Graft the top-k% changes for every k and evaluate; the share is relative to k = 100.

    Returns:
        ``{"run", "method", "split", "rows": [{k_percent, scalars, macro_f1, accuracy, auc,
        share_of_full_f1}], ...}``; metrics are fractions as in ``metrics.json``.
    """
    model, base, conf, spec = finetuned_model(run_dir, device=device)
    params = eligible_parameters(model)
    ft = {n: p.detach().clone() for n, p in params.items()}
    # the run's own batch size by default, so that k = 100 repeats its test evaluation exactly
    loader = run_split_loader(run_dir, conf, spec, split, batch_size)
    classes = list(conf["classes"])
    n_total = sum(t.numel() for t in base.values())
    rows = []
    for k in sorted({100.0, *map(float, ks)}, reverse=True):
        for n, t in graft(base, ft, k).items():
            params[n].copy_(t)
        m = evaluate(model, loader, classes, device)
        changed = sum(int((params[n] != base[n]).sum()) for n in base)
        rows.append(
            {
                "k_percent": k,
                "kept_changes": min(n_total, round(k / 100 * n_total)),
                "changed_scalars": changed,
                "macro_f1": m["macro_f1"],
                "accuracy": m["accuracy"],
                "auc": m.get("auc"),
            }
        )
    full = rows[0]["macro_f1"]
    for r in rows:
        r["share_of_full_f1"] = r["macro_f1"] / full if full else None
    for n, t in ft.items():  # leave the model as it was
        params[n].copy_(t)
    wanted = {float(k) for k in ks}
    return {
        "run": str(run_dir),
        "method": conf["train"]["method"],
        "split": split,
        "backbone": conf["backbone"]["model"],
        "backbone_scalars": n_total,
        "rows": [r for r in rows if r["k_percent"] in wanted],
        "full_macro_f1": full,
        "paper_claim": PAPER_SPARSITY_CLAIM,
    }


def sparsity_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"### Sparsity (paper Fig. 2 left): `{report['run']}` ({report['method']}), {report['split']} split",
        "",
        f"Top k% of |W_ft - W_ori| over all {report['backbone_scalars']} backbone scalars grafted "
        f"into the pretrained backbone; share = macro F1 / macro F1 at k = 100 "
        f"({100 * report['full_macro_f1']:.1f}%). The paper: about "
        f"{100 * report['paper_claim']['share_of_full_ft']:.0f}% kept at k = "
        f"{report['paper_claim']['k_percent']:g}% (CLIP ViT-B/16, six datasets).",
        "",
        "| k % | changed scalars | macro F1 % | accuracy % | AUC % | share of full FT F1 % |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        auc = "-" if r["auc"] is None else f"{100 * r['auc']:.1f}"
        share = "-" if r["share_of_full_f1"] is None else f"{100 * r['share_of_full_f1']:.1f}"
        lines.append(
            f"| {r['k_percent']:g} | {r['changed_scalars']} | {100 * r['macro_f1']:.1f} | "
            f"{100 * r['accuracy']:.1f} | {auc} | {share} |"
        )
    return "\n".join(lines) + "\n"


def plot_sparsity(report: dict[str, Any], path: Path) -> Path:
    """Share of full fine-tuning's macro F1 against k (log x), with the paper's claim marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in report["rows"] if r["k_percent"] > 0 and r["share_of_full_f1"] is not None]
    fig = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(
        [r["k_percent"] for r in rows],
        [100 * r["share_of_full_f1"] for r in rows],
        "o-",
        label="this run",
    )
    c = report["paper_claim"]
    ax.plot([c["k_percent"]], [100 * c["share_of_full_ft"]], "r*", ms=12, label="paper (about)")
    ax.set_xscale("log")
    ax.set_xlabel("k: top-k% of |W_ft - W_ori| kept (log scale)")
    ax.set_ylabel("share of full fine-tuning macro F1 (%)")
    ax.set_title(f"sparsity: {report['method']} run, {report['split']} split", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_sparsity(report: dict[str, Any], dest: str | Path) -> dict[str, str]:
    header = list(report["rows"][0])
    rows = ([r[k] for k in header] for r in report["rows"])
    return write_outputs(
        report, dest, "sparsity", sparsity_markdown(report), plot_sparsity, (header, rows)
    )
