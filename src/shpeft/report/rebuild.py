"""``shpeft report RUN``: rebuild a run's ``report.html``, old runs included.

A run that predates ``test_predictions.npz`` gets its test predictions recomputed from its own
recorded test split (:func:`shpeft.runs.run_split_loader`, exactly the ids of ``split.json``)
and its exported model (:func:`shpeft.runs.load_run`); they are saved with ``source =
recomputed`` and checked against ``metrics.json`` (a disagreement is shown in the report). A run
trained without reading its test split (a learning-rate search run) is never given one here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from shpeft.evaluate import predict
from shpeft.report.build import REPORT, write_report
from shpeft.report.predictions import from_arrays, load_predictions, save_predictions
from shpeft.report.sections import read_run
from shpeft.runs import load_run, run_split_loader

log = logging.getLogger("shpeft")


def rebuild_report(
    run_dir: str | os.PathLike, *, device: str = "cpu", examples: bool = True
) -> Path:
    """Write ``RUN/report.html`` from the run directory (see the module docstring).

    Args:
        device: where the model runs when it is needed (explanation maps, missing predictions).
        examples: draw the explanation maps (needs the model and a few test images).

    Raises:
        FileNotFoundError: Not a finished run directory.
    """
    run_dir = Path(run_dir)
    rec = read_run(run_dir)
    has_test = bool(rec.metrics.get("test"))
    pred = load_predictions(run_dir) if has_test else None
    notes: list[str] = []
    model = test_data = None
    if has_test and (pred is None or examples):
        model, classes, spec, conf = load_run(run_dir, device=device)
        loader = run_split_loader(run_dir, conf, spec, "test")
        test_data = loader.dataset
        if pred is None:
            labels, probs = predict(model, loader, next(model.parameters()).device, progress=False)
            pred = from_arrays(
                labels, probs, classes, ids=getattr(test_data, "ids", None), source="recomputed"
            )
            save_predictions(run_dir, pred)
    if pred is not None and pred.source == "recomputed":
        notes.append(
            "This run predates saved test predictions: they were recomputed by `shpeft report` "
            "from the run's recorded test split and exported model."
        )
    return write_report(
        run_dir,
        predictions=pred,
        model=model if examples else None,
        test_data=test_data if examples else None,
        notes=notes,
    )


def find_runs(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` itself when it is a run directory, else every finished run below it (sorted)."""
    path = Path(path)
    if (path / "config.json").is_file():
        yield path
        return
    if not path.is_dir():
        raise FileNotFoundError(f"not found: {path}")
    found = sorted(
        p.parent for p in path.rglob("metrics.json") if (p.parent / "config.json").is_file()
    )
    if not found:
        raise FileNotFoundError(f"{path} is neither a run directory nor a folder holding runs")
    yield from found


def rebuild_all(
    paths: list[str], *, device: str = "cpu", examples: bool = True, skip_existing: bool = False
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Rebuild the reports of every run found under ``paths``: ``(written, failures)``.

    A run directory named in ``paths`` raises its error; among the runs found below a folder,
    one that fails is recorded in ``failures`` and the others go on.
    """
    written, failed = [], []
    for p in paths:
        for run in find_runs(p):
            if skip_existing and (run / REPORT).is_file():
                continue
            if run == Path(p):
                written.append(rebuild_report(run, device=device, examples=examples))
                continue
            try:
                written.append(rebuild_report(run, device=device, examples=examples))
            except Exception as e:  # one broken run of a folder must not stop the others
                log.error("%s: %s: %s", run, type(e).__name__, e)
                failed.append((run, f"{type(e).__name__}: {e}"))
    return written, failed
