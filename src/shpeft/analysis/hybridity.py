"""Hybridity analysis of the SH-PEFT paper (Fig. 2 right): shared vs task-specific key weights.

For runs on different tasks from the same base backbone, take each run's top-k% positions of
``|W_ft - W_ori|`` (k in {5, 1, 0.1, 0.05}) and measure their overlap ``|A ∩ B| / |A|`` next to
the overlap chance alone gives (``|B| / N``, i.e. k%). Liu, Xu, Liu, Zhang (2024) find that most
key weights differ between tasks (task-specific) while a share well above chance is common to
all (task-agnostic), which motivates the hybrid importance. The same is measured for SH-PEFT's
own selected masks (``mode="mask"``), and the shared (selected by every run) and task-specific
(selected by exactly one run) positions are located per block and per parameter type.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shpeft.analysis.changes import topk_flat, weight_change
from shpeft.analysis.locations import location_counts, marginals, run_positions
from shpeft.analysis.output import save_figure, write_outputs
from shpeft.analysis.paper import PAPER_HYBRIDITY_KS
from shpeft.delta import Delta
from shpeft.params import block_order, kind_order
from shpeft.runs import load_run_config


def overlap(a: Tensor, b: Tensor) -> float:
    """``|A ∩ B| / |A|`` of two flat bool position vectors (0 when A is empty)."""
    if a.shape != b.shape:
        raise ValueError(f"position vectors differ in size: {a.numel()} vs {b.numel()}")
    na = int(a.sum())
    return int((a & b).sum()) / na if na else 0.0


def chance_overlap(b: Tensor) -> float:
    """The expected ``|A ∩ B| / |A|`` when A is placed at random: ``|B| / N``."""
    return int(b.sum()) / b.numel() if b.numel() else 0.0


def overlap_matrix(masks: Sequence[Tensor]) -> list[list[float]]:
    return [[overlap(a, b) for b in masks] for a in masks]


def shared_and_specific(masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Positions selected by every run (shared) and by exactly one run (task-specific)."""
    stack = torch.stack([m.bool() for m in masks])
    count = stack.sum(0)
    return count == len(masks), count == 1


def run_labels(runs: Sequence[str | Path], confs: Sequence[dict[str, Any]]) -> list[str]:
    """``<data>:<method>:s<seed>`` per run (data file stem or folder name), made unique."""
    labels = []
    for conf in confs:
        data = Path(str(conf["data"]["data"]))
        labels.append(f"{data.stem}:{conf['train']['method']}:s{conf['train']['seed']}")
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels[i] = f"{lab}:{Path(runs[i]).name}"
    return labels


def run_hybridity(
    runs: Sequence[str | Path],
    ks: Sequence[float] = PAPER_HYBRIDITY_KS,
    *,
    mode: str = "auto",
    location_k: float | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Overlap matrices of key-weight positions between runs, and where shared ones lie.

    Args:
        runs: two or more run directories on the same base backbone (different datasets).
        ks: top-k% of ``|dW|`` compared (``mode="delta"``).
        mode: ``delta`` (top-k% of ``|W_ft - W_ori|``, any mergeable method), ``mask`` (the
            positions of each run's sparse delta, e.g. SH-PEFT's selection), or ``auto``
            (``mask`` when every run stores sparse positions, else ``delta``).
        location_k: k of the location breakdown in delta mode (default: the first of ``ks``).
        labels: names of the runs in the report (default: from the run and data names).
    """
    if len(runs) < 2:
        raise ValueError("hybridity needs at least two runs (on different datasets)")
    confs = [load_run_config(r) for r in runs]
    hashes = {c.get("base_hash") for c in confs}
    if len(hashes) > 1:
        raise ValueError("the runs were trained on different base backbones; overlap is undefined")
    if mode == "auto":
        mode = "mask" if all(_has_sparse(r) for r in runs) else "delta"
    if mode not in ("delta", "mask"):
        raise ValueError(f"mode must be auto, delta or mask, got {mode!r}")
    labels = list(labels) if labels else run_labels(runs, confs)
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    report: dict[str, Any] = {
        "runs": [str(r) for r in runs],
        "labels": labels,
        "methods": [c["train"]["method"] for c in confs],
        "mode": mode,
        "levels": [],
    }
    if mode == "mask":
        pos = [run_positions(r) for r in runs]
        sizes = pos[0]["sizes"]
        masks = [p["flat"] for p in pos]
        report["levels"].append(_level(masks, label="selected masks"))
        loc_masks = masks
        report["location_source"] = "selected masks"
    else:
        changes = [weight_change(r) for r in runs]
        sizes = changes[0]["sizes"]
        for k in ks:
            masks = [topk_flat(c["flat"], k) for c in changes]
            report["levels"].append(_level(masks, label=f"top {k:g}%", k_percent=k))
        lk = float(location_k if location_k is not None else ks[0])
        loc_masks = [topk_flat(c["flat"], lk) for c in changes]
        report["location_source"] = f"top {lk:g}% |dW|"
    shared, specific = shared_and_specific(loc_masks)
    report["locations"] = _locations(sizes, shared, specific)
    return report


def _has_sparse(run: str | Path) -> bool:
    return bool(Delta.load(Path(run) / "delta.safetensors").sparse)


def _level(masks: list[Tensor], *, label: str, k_percent: float | None = None) -> dict[str, Any]:
    mat = overlap_matrix(masks)
    n = len(masks)
    off = [mat[i][j] for i in range(n) for j in range(n) if i != j]
    chance = [[chance_overlap(b) for b in masks] for _ in masks]
    shared, _ = shared_and_specific(masks)
    return {
        "label": label,
        "k_percent": k_percent,
        "selected": [int(m.sum()) for m in masks],
        "matrix": mat,
        "chance": chance,
        "chance_pct": 100.0 * sum(chance_overlap(m) for m in masks) / n,
        "mean_offdiag": sum(off) / len(off),
        "shared_by_all": int(shared.sum()),
    }


def _locations(sizes: dict[str, int], shared: Tensor, specific: Tensor) -> dict[str, Any]:
    cs = location_counts(sizes, shared)
    cp = location_counts(sizes, specific)
    ns, np_ = max(1, int(shared.sum())), max(1, int(specific.sum()))
    out: dict[str, Any] = {"shared": int(shared.sum()), "specific": int(specific.sum())}
    for axis, key, order in ((0, "per_block", block_order), (1, "per_kind", kind_order)):
        ms, mp = marginals(cs, axis), marginals(cp, axis)
        names = order(ms)
        out[key] = [
            {
                "name": n,
                "size": ms[n][1],
                "shared": ms[n][0],
                "specific": mp[n][0],
                "shared_share_pct": 100.0 * ms[n][0] / ns,
                "specific_share_pct": 100.0 * mp[n][0] / np_,
                "size_share_pct": 100.0 * ms[n][1] / sum(sizes.values()),
            }
            for n in names
        ]
    return out


def hybridity_markdown(report: dict[str, Any]) -> str:
    labels = report["labels"]
    lines = [
        f"### Hybridity (paper Fig. 2 right), mode `{report['mode']}`",
        "",
        "Cell (row A, column B): |A ∩ B| / |A| in %; chance = |B| / N (k% for top-k%).",
        "",
    ]
    for lv in report["levels"]:
        lines += [
            f"**{lv['label']}** (selected per run: {lv['selected']}; chance {lv['chance_pct']:.3g}%; "
            f"mean overlap between different runs {100 * lv['mean_offdiag']:.3g}%; shared by all: "
            f"{lv['shared_by_all']})",
            "",
            "| A \\ B | " + " | ".join(labels) + " | chance % |",
            "|---|" + "---:|" * (len(labels) + 1),
        ]
        for i, row in enumerate(lv["matrix"]):
            cells = [f"{100 * v:.3g}" for v in row]
            lines.append(
                f"| {labels[i]} | " + " | ".join(cells) + f" | {100 * lv['chance'][i][0]:.3g} |"
            )
        lines.append("")
    loc = report["locations"]
    lines += [
        f"**Where the shared ({loc['shared']}) and task-specific ({loc['specific']}) positions lie** "
        f"({report['location_source']}; share of each set in %, beside the group's share of all "
        "scalars)",
        "",
    ]
    for key, title in (("per_kind", "parameter type"), ("per_block", "block")):
        lines += [
            f"| {title} | shared % | task-specific % | share of scalars % |",
            "|---|---:|---:|---:|",
        ]
        for r in loc[key]:
            lines.append(
                f"| {r['name']} | {r['shared_share_pct']:.1f} | {r['specific_share_pct']:.1f} | "
                f"{r['size_share_pct']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_hybridity(report: dict[str, Any], path: Path) -> Path:
    """Overlap against k (mean over pairs, with chance) and shared vs specific locations."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 3, 1)
    levels = report["levels"]
    if report["mode"] == "delta":
        ks = [lv["k_percent"] for lv in levels]
        ax.plot(
            ks,
            [100 * lv["mean_offdiag"] for lv in levels],
            "o-",
            label="overlap between runs (mean)",
        )
        ax.plot(ks, [lv["chance_pct"] for lv in levels], "k--", label="chance (k%)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("top-k% of |dW| (log)")
    else:
        lv = levels[0]
        ax.bar(
            ["between runs", "chance"],
            [100 * lv["mean_offdiag"], lv["chance_pct"]],
            color=["C0", "gray"],
        )
    ax.set_ylabel("|A ∩ B| / |A| (%)")
    ax.set_title(f"overlap of key-weight positions ({report['mode']})", fontsize=9)
    if report["mode"] == "delta":
        ax.legend(fontsize=7)
    loc = report["locations"]
    for pos, key, title in ((2, "per_kind", "per parameter type"), (3, "per_block", "per block")):
        ax = fig.add_subplot(1, 3, pos)
        rows = loc[key]
        x = np.arange(len(rows))
        w = 0.28
        ax.bar(
            x - w,
            [r["shared_share_pct"] for r in rows],
            w,
            label=f"shared by all ({loc['shared']})",
        )
        ax.bar(
            x,
            [r["specific_share_pct"] for r in rows],
            w,
            label=f"task-specific ({loc['specific']})",
        )
        ax.bar(
            x + w,
            [r["size_share_pct"] for r in rows],
            w,
            color="lightgray",
            label="share of scalars",
        )
        ax.set_xticks(x, [r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("% of the set", fontsize=8)
        ax.set_title(f"where they lie: {title} ({report['location_source']})", fontsize=9)
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def write_hybridity(report: dict[str, Any], dest: str | Path) -> dict[str, str]:
    labels = report["labels"]
    rows = (
        [lv["label"], lv["k_percent"], a, b, lv["matrix"][i][j], lv["chance"][i][j]]
        for lv in report["levels"]
        for i, a in enumerate(labels)
        for j, b in enumerate(labels)
    )
    header = ["level", "k_percent", "run_a", "run_b", "overlap", "chance"]
    return write_outputs(
        report, dest, "hybridity", hybridity_markdown(report), plot_hybridity, (header, rows)
    )
