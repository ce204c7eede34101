"""A grid's finished runs in one committable file, and their restoration into a run folder.

A grid run's folder holds checkpoints and model files (megabytes per run); what the tables and the
lr search need from it is ``result.json`` and the validation curve (the search's tie-break,
:func:`shpeft.analysis.grid.validation_curve_mean`). ``runs.jsonl`` keeps exactly that, plus the
small artefacts the screens read (the linear-probe warm start's ``head_init.json``, SH-PEFT's
``selection.json`` without its per-tensor rows), one line per finished run, a few KB each: small enough to commit beside the tables (``shpeft bench`` writes
it into the summary folder). When run folders are lost (a machine replaced, a scratch disk wiped),
``shpeft bench CONFIG --restore runs.jsonl`` writes them back, so the grid resumes where it was
instead of training its finished runs again.

A restored run has its metrics but no model files: its ``result.json`` says ``"restored"`` (from
which file, when). Everything computed from metrics (Table 1, Fig. 4, claims, cost, lr choices)
works on it. A search run that later needs a test evaluation is trained again by
:func:`shpeft.analysis.grid.run_job`; the analyses that read models (Fig. 2, the selection
locations) skip restored runs with a warning: delete such a run's folder and rerun the grid to
train it again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath
from typing import Any

from shpeft.io_utils import write_json, write_text

LEDGER_NAME = "runs.jsonl"
#: small run artefacts a ledger keeps (name -> keys left out, to stay a few KB a run)
ARTIFACTS = {"head_init.json": (), "selection.json": ("per_tensor",)}


def _artifacts(run_dir: Path) -> dict[str, Any]:
    found = {}
    for name, drop in ARTIFACTS.items():
        try:
            data = json.loads((run_dir / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            found[name] = {k: v for k, v in data.items() if k not in drop}
            if drop:
                found[name]["left_out_by_ledger"] = list(drop)
    return found


def read_val_curve(run_dir: Path) -> list[list[float]]:
    """``[[iteration, validation macro F1], ...]`` from a run's ``train_log.jsonl`` (rows cut
    by a crash are skipped)."""
    path = Path(run_dir) / "train_log.jsonl"
    curve: list[list[float]] = []
    if not path.is_file():
        return curve
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        f1 = (row.get("val") or {}).get("macro_f1")
        if f1 is not None:
            curve.append([int(row.get("iteration", 0)), float(f1)])
    return curve


def ledger_records(out: str | Path) -> list[dict[str, Any]]:
    """One record per finished run under ``OUT/runs``: its ``result.json`` plus ``val_curve``,
    sorted by run id (so that a refreshed ledger's diff shows only the new runs)."""
    runs = Path(out) / "runs"
    records = []
    for path in sorted(runs.rglob("result.json")):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        run_id = result.get("run_id") or path.parent.relative_to(runs).as_posix()
        record = {**result, "run_id": run_id, "val_curve": read_val_curve(path.parent)}
        artifacts = _artifacts(path.parent)
        if artifacts:
            record["artifacts"] = artifacts
        records.append(record)
    return sorted(records, key=lambda r: r["run_id"])


def write_ledger(out: str | Path, path: str | Path) -> Path:
    """Write every finished run of ``out`` to ``path`` (JSON lines)."""
    lines = [json.dumps(r, sort_keys=True) for r in ledger_records(out)]
    return write_text(path, "".join(line + "\n" for line in lines))


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ledger; a malformed line is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no ledger at {path} (shpeft bench writes summary_NAME/runs.jsonl)"
        )
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
            raise ValueError(f"{path}:{n}: a record needs a run_id")
        _check_run_id(record["run_id"], f"{path}:{n}")
        records.append(record)
    return records


def _check_run_id(run_id: str, where: str) -> None:
    # a run id becomes a folder under OUT/runs: never an absolute path or a way out of it
    p = PurePosixPath(run_id)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in run_id:
        raise ValueError(f"{where}: run_id {run_id!r} is not a relative run path")


def restore_runs(ledger: str | Path, out: str | Path, dry_run: bool = False) -> dict[str, int]:
    """Write the ledger's runs into ``OUT/runs`` where they are missing; never overwrite.

    Returns:
        ``{"restored": n, "kept": m}``: runs written (with ``dry_run``: that would be written;
        nothing is), and runs left alone because ``OUT`` already has their ``result.json``.
    """
    records = read_ledger(ledger)
    runs = Path(out) / "runs"
    stamp = {"from": str(ledger), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    counts = {"restored": 0, "kept": 0}
    for record in records:
        run_dir = runs / record["run_id"]
        if (run_dir / "result.json").is_file():
            counts["kept"] += 1
            continue
        if dry_run:
            counts["restored"] += 1
            continue
        result = {k: v for k, v in record.items() if k not in ("val_curve", "artifacts")}
        result["restored"] = result.get("restored") or stamp
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, data in (record.get("artifacts") or {}).items():
            if name in ARTIFACTS:  # only the known names: a ledger never picks file names
                write_json(run_dir / name, data)
        log = [{"iteration": it, "val": {"macro_f1": f1}} for it, f1 in record.get("val_curve", [])]
        write_text(run_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        write_json(run_dir / "result.json", result)  # last: its presence marks the run finished
        counts["restored"] += 1
    return counts


def is_restored(result: dict[str, Any] | None) -> bool:
    """A run written back from a ledger (metrics only, no model files)."""
    return bool(result and result.get("restored"))
