"""``report.html`` of one run: what it learned, how well, how sure, where it looks, what it cost.

Built from what the run directory records (``config.json``, ``split.json``, ``train_log.jsonl``,
``metrics.json``, ``test_predictions.npz``, the delta and, for grid runs, ``result.json``), one
section per topic (:mod:`shpeft.report.sections`):

* training loss and validation metrics over iterations;
* the test metrics of ``metrics.json`` (macro F1, accuracy, AUC, per-class precision / recall /
  F1), the confusion matrix, one-vs-rest ROC curves per class with their AUC, and a reliability
  diagram with the expected calibration error (:mod:`shpeft.report.calibration`);
* a few test images, correct and wrong, with the heat map of what the model attended to for its
  predicted class (:mod:`shpeft.report.examples`);
* for sparse methods, where the budget k went and which selected scalars never moved
  (:func:`shpeft.analysis.selection.run_selection`);
* the cost (time, peak memory, trainable share, delta size) and the configuration.

The training loop calls :func:`report_after_training` at the end of every run; a report that
cannot be built logs a warning and never fails the run. ``shpeft report RUN`` rebuilds it
(:mod:`shpeft.report.rebuild`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shpeft._version import __version__
from shpeft.io_utils import atomic_write_bytes
from shpeft.report import sections
from shpeft.report.calibration import DEFAULT_BINS, reliability
from shpeft.report.html import esc, page
from shpeft.report.predictions import Predictions, from_arrays, save_predictions
from shpeft.report.sections import read_run

log = logging.getLogger("shpeft")

REPORT = "report.html"


def write_report(
    run_dir: str | os.PathLike,
    *,
    predictions: Predictions | None = None,
    model: Any = None,
    test_data: Any = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``RUN/report.html`` and return its path.

    Args:
        run_dir: a finished run directory.
        predictions: the run's test predictions (None: no ROC, calibration or examples).
        model: the trained model, for the explanation maps (None: left out).
        test_data: the test dataset, items ``(x, y)`` in the order of ``predictions``.
        notes: remarks shown atop the test section (e.g. how the predictions were obtained).

    Raises:
        FileNotFoundError: Not a finished run directory.
    """
    rec = read_run(run_dir)
    notes = list(notes)
    if not rec.test:
        predictions = None  # a run that never read its test split shows none
    elif predictions is not None:
        issues = sections.consistency(rec, predictions)
        if issues:
            notes.append(
                "The test predictions disagree with metrics.json (" + "; ".join(issues) + "); "
                "the table shows metrics.json, the curves are drawn from the predictions."
            )
    rel = reliability(predictions.labels, predictions.probs, DEFAULT_BINS) if predictions else None
    body = [
        "<header>" + sections.header(rec, rel) + "</header><main>",
        sections.training(rec),
        sections.test_metrics(rec, predictions, notes),
        sections.examples(rec, predictions, model, test_data),
        sections.selection(rec),
        sections.cost(rec),
        sections.config(rec),
        '</main><footer><p class="muted small">Generated '
        f"{esc(time.strftime('%Y-%m-%d %H:%M:%S'))} by shpeft {esc(__version__)}; rebuild with "
        f"<code>shpeft report {esc(rec.run_dir)}</code>.</p></footer>",
    ]
    text = page(f"shpeft report: {rec.run_dir.name} ({rec.method})", "\n".join(body))
    return atomic_write_bytes(rec.run_dir / REPORT, text.encode("utf-8"))


def peak_memory(device: Any = "cpu") -> dict[str, Any]:
    """This process's peak memory so far: resident set and, on CUDA, allocated tensors (MB)."""
    rss = None
    with contextlib.suppress(ImportError):  # no resource module on Windows
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = kb / 2**20 if sys.platform == "darwin" else kb / 1024  # macOS counts bytes
    cuda = None
    if str(device).startswith("cuda"):
        import torch

        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"rss_mb": rss, "cuda_mb": cuda, "scope": "process"}


def report_after_training(
    run_dir: str | os.PathLike,
    *,
    model: Any,
    test_data: Any = None,
    test_pred: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path | None:
    """End of a run: save its test predictions, then write ``report.html``. Never raises.

    Args:
        model: the trained model (for the explanation maps).
        test_data: the test dataset (its ``ids`` name the saved predictions).
        test_pred: ``(labels, probs)`` of the pass that gave the test metrics, or None when
            the test split was not read; saved as ``test_predictions.npz``.
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    try:
        pred = None
        if test_pred is not None:
            classes = json.loads((run_dir / "config.json").read_text())["classes"]
            pred = from_arrays(*test_pred, classes, ids=getattr(test_data, "ids", None))
            save_predictions(run_dir, pred)
        path = write_report(run_dir, predictions=pred, model=model, test_data=test_data)
    except Exception as e:  # the run itself is complete: its report must never fail it
        log.warning(
            "report of %s not written (%s: %s); `shpeft report %s` retries",
            run_dir, type(e).__name__, e, run_dir,
        )  # fmt: skip
        return None
    log.info("report written to %s (%.1f s)", path, time.perf_counter() - t0)
    return path
