"""A run's test predictions, ``test_predictions.npz``: the report's curves are drawn from them.

Written by the training loop from the same forward pass as the test metrics, so the report needs
no model pass for its curves and its numbers equal ``metrics.json``. Arrays: ``ids`` (sample ids
of the run's ``split.json``, in test order), ``labels`` (int64, N), ``probs`` (float32, N x C,
softmax), ``classes`` and ``source`` (``training``, or ``recomputed`` by ``shpeft report`` for a
run that predates the file). Plain arrays only: loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shpeft.io_utils import atomic_write_bytes

FILE = "test_predictions.npz"


@dataclass
class Predictions:
    """Test-split predictions of a run."""

    ids: list[str]
    labels: np.ndarray  # (N,) int64
    probs: np.ndarray  # (N, C) float32
    classes: list[str]
    source: str = "training"

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def save_predictions(run_dir: str | os.PathLike, pred: Predictions) -> Path:
    """Write ``RUN/test_predictions.npz`` atomically."""
    n, c = pred.probs.shape
    if len(pred.labels) != n or len(pred.ids) != n or len(pred.classes) != c:
        raise ValueError(
            f"predictions do not fit: {len(pred.ids)} ids, {len(pred.labels)} labels, probs "
            f"{pred.probs.shape}, {len(pred.classes)} classes"
        )
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.asarray([str(i) for i in pred.ids], dtype=np.str_),
        labels=np.asarray(pred.labels, dtype=np.int64),
        probs=np.asarray(pred.probs, dtype=np.float32),
        classes=np.asarray([str(c) for c in pred.classes], dtype=np.str_),
        source=np.asarray(pred.source, dtype=np.str_),
    )
    return atomic_write_bytes(Path(run_dir) / FILE, buf.getvalue())


def load_predictions(run_dir: str | os.PathLike) -> Predictions | None:
    """The run's saved test predictions, or None when it has none.

    Raises:
        ValueError: The file exists but is not a consistent predictions file.
    """
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            pred = Predictions(
                ids=[str(i) for i in z["ids"]],
                labels=z["labels"].astype(np.int64),
                probs=z["probs"].astype(np.float32),
                classes=[str(c) for c in z["classes"]],
                source=str(z["source"]),
            )
    except (KeyError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable predictions file: {e}") from e
    n = len(pred.labels)
    if pred.probs.shape != (n, len(pred.classes)) or len(pred.ids) != n:
        raise ValueError(f"{path}: inconsistent shapes (probs {pred.probs.shape}, {n} labels)")
    return pred


def from_arrays(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    ids: Sequence[str] | None = None,
    source: str = "training",
) -> Predictions:
    """Predictions from ``shpeft.evaluate.predict``'s ``(labels, probs)`` (ids default to 0..N-1)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(labels))]
    return Predictions(ids, labels, np.asarray(probs, dtype=np.float32), list(classes), source)
