"""Smoke test of ``benchmarks/perf.py --quick``: it runs and reports every figure (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STEP_KEYS = (
    "step_s",
    "step_vs_full",
    "step_vs_lora",
    "trainable_scalars",
    "trainable_bytes",
    "optimizer_state_bytes",
    "memory_peak_bytes",
    "memory_vs_lora",
)


@pytest.mark.slow
def test_perf_quick_reports_every_figure(tmp_path):
    out = tmp_path / "perf.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "perf.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| shpeft@1.00% |" in proc.stdout  # the printed table
    res = json.loads(out.read_text())
    assert res["environment"]["torch"] and res["environment"]["clock"] in ("wall", "cpu")
    tiny = res["sizes"]["tiny"]
    assert tiny["importance"]["ratio"] > 0
    assert tiny["inference"]["shpeft_ratio"] > 0 and tiny["inference"]["lora_ratio"] > 0
    methods = tiny["methods"]
    want = {"full", "lora", "linear", "naive@1.00%"} | {
        f"{m}@{d}" for m in ("shpeft", "supertuning", "lower_bound") for d in ("1.00%", "0.01%")
    }
    assert want <= set(methods), sorted(methods)
    assert not tiny["skipped"]
    for name, m in methods.items():
        for key in STEP_KEYS:
            assert key in m and m[key] is not None, (name, key)
        if not name.startswith("lower_bound"):
            assert m["delta_bytes"] > 0, name
    for d in ("1.00%", "0.01%"):
        sh = methods[f"shpeft@{d}"]
        for key in ("step_vs_lower_bound", "step_vs_supertuning", "delta_bound_bytes"):
            assert sh[key] is not None, (d, key)
        # optimizer state is O(k): one momentum scalar per trained scalar
        assert sh["optimizer_state_bytes"] == 4 * (sh["k"] + sh["head_scalars"])
        assert sh["trainable_scalars"] == sh["k"] + sh["head_scalars"]
