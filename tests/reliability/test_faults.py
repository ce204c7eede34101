"""Fault injection: a kill in the middle of writing a checkpoint, and a full disk."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shpeft.checkpoint as checkpoint_mod
from shpeft.checkpoint import checkpoint_paths
from shpeft.training import resume_run, train
from tests.reliability.test_resume import (  # noqa: F401  (reference: a fixture)
    assert_same_delta,
    cli_args,
    reference,
    run_config,
)

KILL_IN_WRITE = r"""
import io, os, signal, sys, torch
import shpeft.checkpoint as ck
calls = {"n": 0}
real_save = torch.save
def dying_save(obj, f, *a, **k):
    calls["n"] += 1
    if calls["n"] == int(os.environ["DIE_AT"]):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])   # half a checkpoint reaches the disk ...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)   # ... then the process dies
    return real_save(obj, f, *a, **k)
ck.torch.save = dying_save
from shpeft.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("die_at", [1, 3, 5])
def test_kill_while_writing_a_checkpoint(reference, tmp_path, die_at):  # noqa: F811
    model_dir, data, ref = reference
    out = tmp_path / "run"
    args = cli_args(model_dir, data, out)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), DIE_AT=str(die_at))
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_WRITE, *args], env=env, capture_output=True
    )
    assert proc.returncode == -9  # SIGKILL
    assert list((out / "checkpoints").glob(".ckpt_*.tmp")), "the cut write left its temporary file"
    assert len(checkpoint_paths(out)) == min(die_at - 1, 2)  # only complete checkpoints count
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_IN_WRITE,
            "-q",
            "train",
            "--resume",
            str(out),
            "--no-progress",
            "--threads",
            "1",
        ],
        env=dict(env, DIE_AT="0"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert not list((out / "checkpoints").glob(".ckpt_*.tmp"))
    assert_same_delta(ref, out)


@pytest.mark.slow
def test_disk_full_stops_cleanly_and_resumes(reference, tmp_path, monkeypatch):  # noqa: F811
    model_dir, data, ref = reference
    out = tmp_path / "run"
    real_save = checkpoint_mod.torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_mod.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(run_config(model_dir, data, out))
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    assert [p.name for p in checkpoint_paths(out)] == ["ckpt_00000008.pt", "ckpt_00000004.pt"]
    assert not list((out / "checkpoints").glob(".ckpt_*.tmp")), "a failed write must clean up"
    resume_run(out, progress=False)
    assert_same_delta(ref, out)
