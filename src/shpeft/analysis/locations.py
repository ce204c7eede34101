"""Where a run's trained (or most-changed) scalars lie: per block and per parameter type.

The SH-PEFT paper (Liu, Xu, Liu, Zhang 2024) argues that the key weights are spread over every
kind of operation, not only the linear layers that SPT tunes; this module measures it for one
run. Positions come from the run's sparse delta (SH-PEFT's selection, SPT's sparse part), or, for
dense methods, from the top-k% of ``|W_ft - W_ori|`` (``k_percent``).

Parameter types and blocks follow :mod:`shpeft.params` (patch / position embedding, class token,
qkv, proj, fc1, fc2, biases, LayerNorm, LayerScale; ``embed`` before the blocks, ``final``
after).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shpeft.analysis.changes import layout, topk_flat, weight_change
from shpeft.analysis.output import save_figure, write_outputs
from shpeft.delta import Delta
from shpeft.params import block_of, block_order, kind_order, parameter_kind
from shpeft.runs import load_base_model, load_run_config

# ---------------------------------------------------------------------------------------------
# Positions as one flat boolean vector over the backbone (eligible parameters, model order)


def flat_from_indices(sizes: dict[str, int], indices: dict[str, Tensor]) -> Tensor:
    """A flat bool vector over ``sizes`` with the given per-tensor flat indices set."""
    out = torch.zeros(sum(sizes.values()), dtype=torch.bool)
    offset = 0
    for name, n in sizes.items():
        if name in indices:
            out[offset + indices[name].long()] = True
        offset += n
    unknown = set(indices) - set(sizes)
    if unknown:
        raise ValueError(
            f"positions name tensors the backbone does not have: {sorted(unknown)[:5]}"
        )
    return out


def location_counts(sizes: dict[str, int], flat: Tensor) -> dict[tuple[str, str], list[int]]:
    """``{(block, kind): [selected, size]}`` of a flat bool vector over ``sizes``."""
    out: dict[tuple[str, str], list[int]] = {}
    offset = 0
    for name, n in sizes.items():
        key = (block_of(name), parameter_kind(name))
        agg = out.setdefault(key, [0, 0])
        agg[0] += int(flat[offset : offset + n].sum())
        agg[1] += n
        offset += n
    return out


def marginals(counts: dict[tuple[str, str], list[int]], axis: int) -> dict[str, list[int]]:
    """Sum ``counts`` over blocks (axis 1: per kind) or kinds (axis 0: per block)."""
    out: dict[str, list[int]] = {}
    for key, (sel, size) in counts.items():
        agg = out.setdefault(key[axis], [0, 0])
        agg[0] += sel
        agg[1] += size
    return out


# ---------------------------------------------------------------------------------------------
# One run


def run_positions(run_dir: str | Path, k_percent: float | None = None) -> dict[str, Any]:
    """The trained positions of a run as a flat bool vector, with its backbone layout.

    Args:
        run_dir: a run directory.
        k_percent: None: the positions stored sparsely in the run's delta (SH-PEFT's selection);
            a number: the top-k% of ``|W_ft - W_ori|`` instead (any mergeable method, e.g. full).
    """

    run_dir = Path(run_dir)
    conf = load_run_config(run_dir)
    if k_percent is not None:
        change = weight_change(run_dir)
        flat = topk_flat(change["flat"], k_percent)
        return {
            "sizes": change["sizes"],
            "flat": flat,
            "source": f"top {k_percent:g}% |dW|",
            "conf": conf,
        }
    delta = Delta.load(run_dir / "delta.safetensors")
    sizes = layout(load_base_model(run_dir))
    indices = {n: idx for n, (idx, _) in delta.sparse.items() if n in sizes}
    if not indices:
        raise ValueError(
            f"{run_dir} ({conf['train']['method']}) has no sparse positions in its delta; pass a "
            "k (top-k% of |W_ft - W_ori|) to analyse a dense run"
        )
    return {
        "sizes": sizes,
        "flat": flat_from_indices(sizes, indices),
        "source": "selected scalars (sparse delta)",
        "conf": conf,
    }


def run_locations(run_dir: str | Path, k_percent: float | None = None) -> dict[str, Any]:
    """Share of selected scalars per block, per parameter type and per (block, type)."""
    pos = run_positions(run_dir, k_percent)
    counts = location_counts(pos["sizes"], pos["flat"])
    total_sel = int(pos["flat"].sum())
    total = int(pos["flat"].numel())

    def rows(d: dict[str, list[int]]) -> list[dict[str, Any]]:
        return [
            {
                "name": k,
                "selected": s,
                "size": n,
                "density_pct": 100.0 * s / n if n else 0.0,
                "share_of_selected_pct": 100.0 * s / total_sel if total_sel else 0.0,
            }
            for k, (s, n) in d.items()
        ]

    per_block = marginals(counts, 0)
    per_kind = marginals(counts, 1)
    blocks = block_order(per_block)
    kinds = kind_order(per_kind)
    return {
        "run": str(run_dir),
        "method": pos["conf"]["train"]["method"],
        "source": pos["source"],
        "selected": total_sel,
        "eligible": total,
        "selected_pct": 100.0 * total_sel / total if total else 0.0,
        "per_block": sorted(rows(per_block), key=lambda r: blocks.index(r["name"])),
        "per_kind": sorted(rows(per_kind), key=lambda r: kinds.index(r["name"])),
        "grid": {
            "blocks": blocks,
            "kinds": kinds,
            "density_pct": [
                [
                    (100.0 * counts[(b, k)][0] / counts[(b, k)][1]) if (b, k) in counts else None
                    for k in kinds
                ]
                for b in blocks
            ],
        },
    }


def locations_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"### Where the selected scalars are: `{report['run']}` ({report['method']})",
        "",
        f"{report['source']}: {report['selected']} of {report['eligible']} backbone scalars "
        f"({report['selected_pct']:.3g}%). density = selected / scalars of that group; share = "
        "group's part of all selected scalars.",
        "",
    ]
    for key, title in (("per_kind", "parameter type"), ("per_block", "block")):
        lines += [
            f"| {title} | selected | scalars | density % | share of selected % |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in report[key]:
            lines.append(
                f"| {r['name']} | {r['selected']} | {r['size']} | {r['density_pct']:.3g} | "
                f"{r['share_of_selected_pct']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_locations(report: dict[str, Any], path: Path) -> Path:
    """Heat map of the density per (block, type); bars: the selection's split by type and block."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = report["grid"]
    data = np.array(
        [[np.nan if v is None else v for v in row] for row in g["density_pct"]], dtype=float
    )
    fig = Figure(figsize=(11, max(3.5, 0.35 * len(g["blocks"]) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 3, 1)
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(g["kinds"])), g["kinds"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(g["blocks"])), g["blocks"], fontsize=8)
    ax.set_title("selected share of each group (%)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2g}", ha="center", va="center", fontsize=6, color="w")
    for pos, key, title in ((2, "per_kind", "per parameter type"), (3, "per_block", "per block")):
        ax = fig.add_subplot(1, 3, pos)
        rows = report[key]
        # the heat map shows density; the bars show where the selection itself lies
        ax.barh([r["name"] for r in rows][::-1], [r["share_of_selected_pct"] for r in rows][::-1])
        ax.set_xlabel("share of all selected scalars (%)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"{report['method']}: {report['source']} ({report['selected_pct']:.3g}% of the backbone)",
        fontsize=10,
    )
    return save_figure(fig, path)


def write_locations(report: dict[str, Any], dest: str | Path) -> dict[str, str]:
    return write_outputs(report, dest, "locations", locations_markdown(report), plot_locations)
