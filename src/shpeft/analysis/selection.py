"""Where a sparse run's budget went, which term chose it, and whether it learned.

``shpeft analyze selection --run RUN`` for a run whose delta stores selected scalars (SH-PEFT
and its variants, the sparse part of SPT-LoRA):

* the share of k per parameter kind, per block and per (block, kind) (the selection map);
* per kind, the share of the selected scores that came from the gradient (task-dependent) term
  and from the magnitude (task-agnostic) term, and the structural zeros (gradient zero up to
  rounding) that were selected (from the run's ``selection.json``, SH-PEFT only);
* how many selected scalars never moved: their trained value equals the pretrained one bit for
  bit (compared with the base weights the run was trained from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shpeft.analysis.output import save_figure, write_outputs
from shpeft.checkpoint import checkpoint_paths
from shpeft.delta import Delta
from shpeft.params import block_of, block_order, kind_order, parameter_kind
from shpeft.runs import load_base_model


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.float().view(torch.int32) == b.float().view(torch.int32)


def last_values(run_dir: str | Path, delta: Delta) -> tuple[dict[str, torch.Tensor], int] | None:
    """The selected scalars' values at the run's newest checkpoint (normally its last
    iteration), by tensor, with that iteration; None without a readable matching checkpoint."""
    paths = checkpoint_paths(Path(run_dir))
    if not paths:
        return None
    try:
        state = torch.load(paths[0], map_location="cpu", weights_only=True)
    except Exception:  # an unreadable checkpoint only means no "last state" diagnostics
        return None
    trained = list(state.get("trainable", []))
    out = {}
    # the checkpoint lists the sparse values tensor by tensor in the delta's order, then the head
    for (name, (idx, _)), values in zip(delta.sparse.items(), trained, strict=False):
        if values.numel() != idx.numel():
            return None
        out[name] = values
    return (out, int(state["iteration"])) if len(out) == len(delta.sparse) else None


def never_moved(run_dir: str | Path) -> dict[str, dict[str, int]]:
    """``{tensor: {"selected", "unchanged", "unchanged_last"}}``: selected scalars whose value
    equals the base value bit for bit, in the exported (best-validation) delta and, when the run
    has a checkpoint, at its last iteration (``unchanged_last``, else absent)."""
    run_dir = Path(run_dir)
    delta = Delta.load(run_dir / "delta.safetensors")
    base = dict(load_base_model(run_dir).named_parameters())
    last = last_values(run_dir, delta)
    out = {}
    for name, (idx, values) in delta.sparse.items():
        ref = base[name].detach().reshape(-1)[idx.long()]
        out[name] = {"selected": int(idx.numel()), "unchanged": int(_same_bits(ref, values).sum())}
        if last is not None:
            out[name]["unchanged_last"] = int(_same_bits(ref, last[0][name]).sum())
    return out


def _rows(groups: dict[str, dict[str, Any]], k: int, order: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in order:
        g = groups[name]
        sel = g.get("selected", 0)
        score = g.get("td", 0.0) + g.get("ta", 0.0)
        rows.append(
            {
                "name": name,
                "selected": sel,
                "size": g.get("size", 0),
                "share_of_k_pct": 100.0 * sel / k if k else 0.0,
                "density_pct": 100.0 * sel / g["size"] if g.get("size") else 0.0,
                "td_share_pct": 100.0 * g["td"] / score if "td" in g and score > 0 else None,
                "zero_grad_selected": g.get("zero_grad_selected"),
                "unchanged": g.get("unchanged"),
                "unchanged_last": g.get("unchanged_last"),
            }
        )
    return rows


def run_selection(run_dir: str | Path) -> dict[str, Any]:
    """The selection diagnostics of one run (see the module docstring)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "selection.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    moved = never_moved(run_dir)
    if not moved:
        raise ValueError(f"{run_dir}: its delta has no sparse part (not a sparse-selection run)")
    per_tensor: dict[str, dict[str, Any]] = {}
    for name, m in moved.items():
        row = dict((summary or {}).get("per_tensor", {}).get(name, {}))
        row.setdefault("selected", m["selected"])
        row["unchanged"] = m["unchanged"]
        if "unchanged_last" in m:
            row["unchanged_last"] = m["unchanged_last"]
        per_tensor[name] = row
    if summary is not None:  # tensors without any selected scalar still count for sizes
        for name, row in summary.get("per_tensor", {}).items():
            per_tensor.setdefault(name, {**row, "unchanged": 0})

    def group(key) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for n, row in per_tensor.items():
            agg = out.setdefault(key(n), {})
            for f, v in row.items():
                if isinstance(v, int | float):
                    agg[f] = agg.get(f, 0) + v
        return out

    k = sum(r["selected"] for r in per_tensor.values())
    per_kind, per_block = group(parameter_kind), group(block_of)
    cells = group(lambda n: f"{block_of(n)}|{parameter_kind(n)}")
    blocks, kinds = block_order(per_block), kind_order(per_kind)
    conf = json.loads((run_dir / "config.json").read_text())
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    report = {
        "run": str(run_dir),
        "method": conf["train"]["method"],
        "method_config": conf.get("method"),
        "k": k,
        "eligible": (summary or {}).get("eligible"),
        "unchanged": sum(r["unchanged"] for r in per_tensor.values()),
        "unchanged_last": (
            sum(r.get("unchanged_last", 0) for r in per_tensor.values())
            if all("unchanged_last" in m for m in moved.values())
            else None
        ),
        # the delta holds the best validation state: at iteration 0 (the warm-started head)
        # nothing of the backbone has moved, whatever the selection
        "best_iteration": metrics.get("best_iteration"),
        "zero_grad_selected": (summary or {}).get("zero_grad_selected"),
        "zero_grad": (summary or {}).get("zero_grad"),
        "term_share_selected": (summary or {}).get("term_share_selected"),
        "per_kind": _rows(per_kind, k, kinds),
        "per_block": _rows(per_block, k, blocks),
        "map": {
            "blocks": blocks,
            "kinds": kinds,
            "share_of_k_pct": [
                [100.0 * cells.get(f"{b}|{c}", {}).get("selected", 0) / max(1, k) for c in kinds]
                for b in blocks
            ],
        },
    }
    return report


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def selection_markdown(report: dict[str, Any]) -> str:
    k = report["k"]
    lines = [
        f"# Selection of {report['run']} ({report['method']})",
        "",
        f"k = {k:,} selected scalars"
        + (f" of {report['eligible']:,}" if report.get("eligible") else "")
        + f"; **{report['unchanged']:,} ({100.0 * report['unchanged'] / max(1, k):.2f}%) never "
        "moved** (trained value equals the base bit for bit)"
        + (
            f"; the exported state is the best validation iteration, {report['best_iteration']}"
            + (
                " (the warm start: no backbone scalar had trained yet)"
                if report["best_iteration"] == 0
                else ""
            )
            if report.get("best_iteration") is not None
            else ""
        ),
    ]
    if report.get("unchanged_last") is not None:
        lines.append(
            f"; at the last iteration, {report['unchanged_last']:,} "
            f"({100.0 * report['unchanged_last'] / max(1, k):.2f}%) had still not moved"
        )
    if report.get("zero_grad") is not None:
        lines.append(
            f"; structural zeros (gradient zero up to rounding): {report['zero_grad']:,} in the "
            f"backbone, {report['zero_grad_selected']:,} of them selected"
        )
    share = report.get("term_share_selected")
    if share and share.get("td") is not None:
        lines.append(
            f"; share of the selected scalars' scores from the gradient term: "
            f"{100 * share['td']:.1f}%, from the magnitude term: {100 * share['ta']:.1f}%"
        )
    lines += ["", "| kind | selected | share of k % | density % | gradient-term share % | "
              "structural zeros selected | never moved (exported) | not moved at the end |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["per_kind"]:
        lines.append(
            f"| {r['name']} | {r['selected']:,} | {r['share_of_k_pct']:.1f} | "
            f"{r['density_pct']:.2f} | {_pct(r['td_share_pct'])} | "
            f"{'-' if r['zero_grad_selected'] is None else format(r['zero_grad_selected'], ',')} | "
            f"{r['unchanged'] or 0:,} | "
            f"{'-' if r['unchanged_last'] is None else format(r['unchanged_last'], ',')} |"
        )
    lines += ["", "| block | selected | share of k % | never moved |", "|---|---:|---:|---:|"]
    for r in report["per_block"]:
        lines.append(
            f"| {r['name']} | {r['selected']:,} | {r['share_of_k_pct']:.1f} | {r['unchanged'] or 0:,} |"
        )
    return "\n".join(lines) + "\n"


def plot_selection(report: dict[str, Any], path: Path) -> Path:
    """Selection map (share of k per block x kind) beside per-kind bars of share and terms."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = report["map"]
    grid = np.array(m["share_of_k_pct"])
    fig = Figure(figsize=(12, 0.32 * len(m["blocks"]) + 2.5))  # no pyplot: no global state
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2, width_ratios=[3, 2])
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(m["kinds"])), m["kinds"], rotation=45, ha="right")
    ax.set_yticks(range(len(m["blocks"])), m["blocks"])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if grid[i, j] >= 0.05:
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < grid.max() * 0.6 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, label="share of k (%)")
    ax.set_title(f"Where k = {report['k']:,} went ({report['method']})")
    kinds = [r["name"] for r in report["per_kind"]]
    share = [r["share_of_k_pct"] for r in report["per_kind"]]
    td = [
        r["share_of_k_pct"] * (r["td_share_pct"] or 0) / 100 if r["td_share_pct"] is not None else 0
        for r in report["per_kind"]
    ]
    y = np.arange(len(kinds))
    bx.barh(y, share, color="#9ecae1", label="share of k")
    if any(r["td_share_pct"] is not None for r in report["per_kind"]):
        bx.barh(y, td, color="#08519c", label="... chosen by the gradient term")
    still = "unchanged_last" if report.get("unchanged_last") is not None else "unchanged"
    unchanged = [100.0 * (r[still] or 0) / max(1, report["k"]) for r in report["per_kind"]]
    bx.barh(y, unchanged, color="#d62728", height=0.3, label="... not moved at the end")
    bx.set_yticks(y, kinds)
    bx.invert_yaxis()
    bx.set_xlabel("% of k")
    bx.legend(loc="lower right", fontsize=8)
    bx.set_title("Per kind")
    return save_figure(fig, path)


def write_selection(report: dict[str, Any], dest: str | Path) -> dict[str, str]:
    header = ("kind", "selected", "share_of_k_pct", "density_pct", "td_share_pct",
              "zero_grad_selected", "unchanged", "unchanged_last")  # fmt: skip
    rows = [[r[h if h != "kind" else "name"] for h in header] for r in report["per_kind"]]
    return write_outputs(
        report, dest, "selection", selection_markdown(report), plot_selection, (header, rows)
    )
