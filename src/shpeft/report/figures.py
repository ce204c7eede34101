"""The report's figures, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Each function builds its own ``Figure`` without pyplot, so nothing accumulates across the
hundreds of reports a benchmark grid writes in one process (the analyses' plots, reused for
the selection map and the confusion matrix, are pyplot-free too).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shpeft.report.calibration import Reliability

DPI = 90


def _figure(width: float, height: float, **margins: float):
    """A figure with fixed margins: a layout engine or ``bbox_inches="tight"`` would double the
    drawing time, which a grid of hundreds of reports pays on every one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(**margins)
    return fig


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def png_via_file(draw: Callable[[Path], Any]) -> bytes:
    """PNG bytes of a plotting function that insists on writing a file itself."""
    with tempfile.TemporaryDirectory(prefix="shpeft-report-") as tmp:
        path = Path(tmp) / "figure.png"
        draw(path)
        return path.read_bytes()


def training_curves(rows: Sequence[dict[str, Any]], best_iteration: int | None) -> bytes | None:
    """Training loss (and lr) and the validation metrics over iterations; None without a log."""
    loss = [(r["iteration"], r["loss"]) for r in rows if r.get("loss") is not None]
    lr = [(r["iteration"], r["lr"]) for r in rows if r.get("lr") is not None]
    val = [(r["iteration"], r["val"]) for r in rows if isinstance(r.get("val"), dict)]
    if not loss and not val:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 3.6, left=0.07, right=0.92, bottom=0.14, top=0.91, wspace=0.38)
    ax, bx = fig.subplots(1, 2)
    if loss:
        ax.plot(*zip(*loss, strict=True), color="#0969da", lw=1.4, label="training loss")
        ax.set_ylabel("cross-entropy (batch)")
    if lr:
        lx = ax.twinx()
        lx.plot(*zip(*lr, strict=True), color="#8c959f", lw=1, ls="--", label="learning rate")
        lx.set_ylabel("learning rate", color="#57606a")
        lx.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_xlabel("iteration")
    ax.set_title("Training loss (every 10 iterations)")
    ax.grid(alpha=0.3)
    for key, label, colour in (
        ("macro_f1", "macro F1", "#cf222e"),
        ("accuracy", "accuracy", "#1a7f37"),
        ("auc", "AUC", "#8250df"),
    ):
        pts = [(it, v[key]) for it, v in val if v.get(key) is not None]
        if pts:
            bx.plot(*zip(*pts, strict=True), "o-", ms=3, lw=1.3, color=colour, label=label)
    if best_iteration is not None and val:
        bx.axvline(best_iteration, color="black", ls=":", lw=1, label=f"best (it {best_iteration})")
    bx.set_ylim(-0.02, 1.02)
    for axis in (ax.xaxis, bx.xaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    bx.set_xlabel("iteration")
    bx.set_title("Validation metrics")
    bx.grid(alpha=0.3)
    if val:
        bx.legend(fontsize=8, loc="lower right")
    if loss:
        ax.legend(fontsize=8, loc="upper right")
    return png_bytes(fig)


def per_class_auc(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> list[float | None]:
    """One-vs-rest ROC AUC per class (None where a class has no positives or no negatives)."""
    from sklearn.metrics import roc_auc_score

    out: list[float | None] = []
    for c in range(n_classes):
        pos = labels == c
        if pos.all() or not pos.any():
            out.append(None)
            continue
        out.append(float(roc_auc_score(pos, probs[:, c])))
    return out


def roc_curves(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> bytes:
    """One-vs-rest ROC curve of every class that has positives and negatives, AUC in the legend."""
    from sklearn.metrics import roc_curve

    aucs = per_class_auc(labels, probs, len(classes))
    fig = _figure(5.2, 4.8, left=0.13, right=0.97, bottom=0.1, top=0.93)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#8c959f", ls="--", lw=1, label="chance")
    for c, name in enumerate(classes):
        if aucs[c] is None:
            continue
        fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {aucs[c]:.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one class vs the rest")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return png_bytes(fig)


def reliability_diagram(rel: Reliability) -> bytes:
    """Accuracy against confidence per bin (gaps shaded), and how many samples each bin holds."""
    fig = _figure(5.2, 5.0, left=0.14, right=0.97, bottom=0.1, top=0.93, hspace=0.1)
    ax, hx = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = 1.0 / rel.n_bins
    centres = rel.edges[:-1] + width / 2
    filled = rel.count > 0
    ax.plot([0, 1], [0, 1], color="#8c959f", ls="--", lw=1, label="perfect calibration")
    ax.bar(
        centres[filled],
        rel.accuracy[filled],
        width=width * 0.95,
        color="#0969da",
        edgecolor="white",
        label="accuracy",
    )
    gap_lo = np.minimum(rel.accuracy, rel.confidence)[filled]
    gap = np.abs(rel.accuracy - rel.confidence)[filled]
    ax.bar(
        centres[filled],
        gap,
        bottom=gap_lo,
        width=width * 0.95,
        color="#cf222e",
        alpha=0.3,
        hatch="//",
        edgecolor="#cf222e",
        label="gap to mean confidence",
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability: ECE {100 * rel.ece:.1f}% ({rel.n_bins} bins)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    hx.bar(centres, rel.count, width=width * 0.95, color="#8c959f")
    hx.set_xlim(0, 1)
    hx.set_xlabel("confidence (top-class probability)")
    hx.set_ylabel("samples")
    hx.grid(alpha=0.3)
    return png_bytes(fig)


def confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    """The project's confusion-matrix plot (:func:`shpeft.evaluate.save_confusion_matrix_png`)."""
    from shpeft.evaluate import save_confusion_matrix_png

    return png_via_file(lambda p: save_confusion_matrix_png(cm, classes, p, title=title))


def selection_map(selection: dict[str, Any]) -> bytes:
    """:func:`shpeft.analysis.selection.plot_selection` as PNG bytes."""
    from shpeft.analysis.selection import plot_selection

    return png_via_file(lambda p: plot_selection(selection, p))
