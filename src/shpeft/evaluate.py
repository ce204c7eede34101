"""Classification metrics, batched prediction and confusion-matrix plots.

All metric arithmetic is delegated to scikit-learn so that the numbers match what reviewers
compute with the standard tools; this module only fixes the conventions (macro averaging over
*all* classes, one-vs-rest AUC, rows = true class) and makes the result JSON-serialisable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "compute_metrics",
    "evaluate",
    "format_metrics",
    "predict",
    "save_confusion_matrix_png",
]


def _auc(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> tuple[float | None, str | None]:
    """ROC AUC, or ``(None, reason)`` where it is undefined instead of raising mid-evaluation."""
    from sklearn.metrics import roc_auc_score

    absent = [c for c in range(n_classes) if not np.any(labels == c)]
    if absent:
        # OvR AUC of a class needs both positives and negatives; an absent class has no positives,
        # and averaging over the remaining classes would silently change the metric's meaning.
        return None, (
            f"AUC undefined: class index(es) {absent} absent from labels "
            f"(one-vs-rest AUC needs positives and negatives for every class)"
        )
    try:
        if n_classes == 2:
            return float(roc_auc_score(labels, probs[:, 1])), None
        # sklearn rejects multiclass scores whose rows do not sum to 1 (np.allclose), which
        # float32 softmax outputs can miss for large C. Renormalise only then: dividing rows that
        # already sum to 1 perturbs the last bit and can break exact ties, changing the AUC.
        p = probs.astype(np.float64)
        if not np.allclose(p.sum(axis=1), 1.0):
            p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
        value = roc_auc_score(
            labels, p, multi_class="ovr", average="macro", labels=list(range(n_classes))
        )
        return float(value), None
    except ValueError as e:  # e.g. non-finite scores
        return None, f"AUC undefined: {e}"


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Compute classification metrics from labels and predicted class probabilities.

    Predictions are ``argmax(probs)``. Macro averages and the confusion matrix cover all
    ``len(classes)`` classes, including classes absent from ``labels`` (which then score 0 F1
    rather than being dropped, so small test sets cannot inflate macro F1).

    Args:
        labels: ``(N,)`` integer true class indices in ``[0, C)``.
        probs: ``(N, C)`` class probabilities (e.g. softmax outputs).
        classes: The ``C`` class names, in index order.

    Returns:
        A JSON-serialisable dict with keys ``macro_f1``, ``accuracy``, ``auc`` (macro one-vs-rest
        AUC; for two classes the ROC AUC of class 1; ``None`` when undefined, with the reason in
        ``auc_note``), ``n``, ``classes``, ``per_class`` (``{name: {precision, recall, f1,
        support}}``) and ``confusion_matrix`` (``C x C`` nested lists, rows = true class,
        columns = predicted class).

    Raises:
        ValueError: On empty input, mismatched shapes or labels outside ``[0, C)``.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    if probs.ndim != 2 or probs.shape != (len(labels), n_classes):
        raise ValueError(
            f"probs must have shape (N, C) = ({len(labels)}, {n_classes}), got {probs.shape}"
        )
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]"
        )

    preds = probs.argmax(axis=1)
    idx = list(range(n_classes))
    report = classification_report(
        labels,
        preds,
        labels=idx,
        target_names=[str(c) for c in classes],
        output_dict=True,
        zero_division=0,
    )
    per_class = {
        str(name): {
            "precision": float(report[str(name)]["precision"]),
            "recall": float(report[str(name)]["recall"]),
            "f1": float(report[str(name)]["f1-score"]),
            "support": int(report[str(name)]["support"]),
        }
        for name in classes
    }
    auc, note = _auc(labels, probs, n_classes)
    metrics: dict[str, Any] = {
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=idx, zero_division=0)),
        "accuracy": float(accuracy_score(labels, preds)),
        "auc": auc,
        "n": int(len(labels)),
        "classes": [str(c) for c in classes],
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, preds, labels=idx).astype(int).tolist(),
    }
    if note is not None:
        metrics["auc_note"] = note
    return metrics


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    *,
    desc: str = "eval",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` over ``loader`` and collect true labels and softmax probabilities.

    The model is put in eval mode (dropout off, norm statistics frozen) for the pass and its
    previous train/eval mode is restored afterwards, even if the pass raises.

    Args:
        model: Classifier returning ``(B, C)`` logits.
        loader: Iterable of ``(x, y)`` batches; ``y`` may be ``(B,)`` or MedMNIST-style ``(B, 1)``.
        device: Device to run on.
        desc: Label of the progress display.
        progress: Show the progress bar.

    Returns:
        ``(labels, probs)``: int64 ``(N,)`` and float32 ``(N, C)`` numpy arrays.

    Raises:
        ValueError: If the loader yields no batches.
    """
    from shpeft.progress import progress_bar

    was_training = model.training
    model.eval()
    all_labels: list[np.ndarray] = []
    all_probs: list[np.ndarray] = []
    try:
        for batch in progress_bar(loader, desc=desc, enabled=progress, leave=False):
            x, y = batch[0], batch[1]
            logits = model(x.to(device))
            # Softmax in float32 even under reduced-precision models, for stable probabilities.
            all_probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            all_labels.append(torch.as_tensor(y).reshape(-1).cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)
    if not all_probs:
        raise ValueError("loader yielded no batches")
    return np.concatenate(all_labels), np.concatenate(all_probs)


def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    classes: list[str],
    device: str | torch.device = "cpu",
    *,
    progress: bool = False,
) -> dict:
    """Predict over ``loader`` and compute :func:`compute_metrics` on the result.

    Args:
        model: Classifier returning ``(B, C)`` logits.
        loader: Iterable of ``(x, y)`` batches.
        classes: Class names in index order.
        device: Device to run on.

    Returns:
        The metrics dict of :func:`compute_metrics`.
    """
    labels, probs = predict(model, loader, device, progress=progress)
    return compute_metrics(labels, probs, classes)


def save_confusion_matrix_png(
    cm: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str | None = None,
    normalize: bool = False,
) -> None:
    """Plot a confusion matrix (rows = true, columns = predicted) to a PNG file.

    Every cell is annotated with its count; with ``normalize`` the colours and the first line of
    each annotation show the row fraction (per-class recall) and the count follows below.
    Uses matplotlib's Agg canvas directly, so it needs no display and never switches the global
    pyplot backend of the caller.

    Args:
        cm: ``C x C`` matrix of counts.
        classes: The ``C`` class names.
        path: Output PNG path (parent folders are created).
        title: Figure title; defaults to "Confusion matrix".
        normalize: Colour by row-normalised fractions instead of counts.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(cm, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"cm must be {n}x{n} for {n} classes, got shape {counts.shape}")
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        # Rows of absent classes stay 0 instead of becoming NaN.
        values = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    else:
        values = counts.astype(np.float64)

    side = max(4.0, 0.7 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(1.0, float(values.max()))
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    labels = [str(c) for c in classes]
    # Long names overlap horizontally; rotate them only when needed so short ones stay upright.
    rotate = max((len(s) for s in labels), default=0) > 4 or n > 8
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(
        labels,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor" if rotate else "default",
    )
    ax.set_yticklabels(labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    default = "Confusion matrix (row-normalised)" if normalize else "Confusion matrix"
    ax.set_title(title or default)

    fontsize = 10 if n <= 10 else max(5, 10 - (n - 10) // 3)
    for i in range(n):
        for j in range(n):
            text = f"{values[i, j]:.2f}\n({counts[i, j]})" if normalize else str(counts[i, j])
            # White text on dark cells keeps the annotation readable.
            color = "white" if values[i, j] > 0.5 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # bbox_inches="tight" as well: tight_layout alone can clip the colorbar's tick labels.
    fig.savefig(path, format="png", bbox_inches="tight")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def format_metrics(metrics: dict) -> str:
    """Render a metrics dict from :func:`compute_metrics` as a short human-readable summary.

    Args:
        metrics: Output of :func:`compute_metrics`.

    Returns:
        A multi-line string: headline macro F1 / accuracy / AUC as percentages, then a
        per-class precision/recall/F1/support table.
    """
    head = (
        f"n={metrics['n']}  macro-F1 {_pct(metrics['macro_f1'])}  "
        f"acc {_pct(metrics['accuracy'])}  AUC {_pct(metrics.get('auc'))}"
    )
    lines = [head]
    if metrics.get("auc") is None and metrics.get("auc_note"):
        lines.append(f"  ({metrics['auc_note']})")
    per_class = metrics.get("per_class", {})
    if per_class:
        width = max(5, *(len(str(k)) for k in per_class))
        lines.append(f"{'class':<{width}}  {'prec':>6}  {'recall':>6}  {'f1':>6}  {'support':>7}")
        for name, m in per_class.items():
            lines.append(
                f"{name:<{width}}  {_pct(m['precision']):>6}  {_pct(m['recall']):>6}  "
                f"{_pct(m['f1']):>6}  {m['support']:>7}"
            )
    return "\n".join(lines)
