"""Interrupted runs resume to a bit-identical delta (CPU, same thread count)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import shpeft.training as train_mod
from shpeft.backbones import BackboneConfig
from shpeft.checkpoint import checkpoint_paths
from shpeft.data import DataConfig
from shpeft.delta import Delta
from shpeft.methods.shpeft import ShpeftConfig
from shpeft.training import RunConfig, TrainConfig, resume_run, train


def run_config(
    model_dir: Path, data: Path, out: Path, method: str = "shpeft", **train_kw
) -> RunConfig:
    tc = dict(
        out=str(out),
        method=method,
        iterations=24,
        batch_size=16,
        lr=0.05,
        eval_every=6,
        checkpoint_every=4,
        progress=False,
        threads=1,
    )
    tc.update(train_kw)
    return RunConfig(
        backbone=BackboneConfig(model=str(model_dir)),
        data=DataConfig(data=str(data), augment="flip", allow_leakage=True),
        train=TrainConfig(**tc),
        method=ShpeftConfig(ratio=0.02, importance_batches=3) if method == "shpeft" else None,
    )


def cli_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    """The CLI form of :func:`run_config` (the same run, for subprocess tests)."""
    return [
        "-q", "train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--iterations", "24", "--batch-size", "16", "--lr", "0.05", "--eval-every", "6",
        "--checkpoint-every", "4", "--no-progress", "--threads", "1", "--ratio", "0.02",
        "--importance-batches", "3", "--augment", "flip", "--allow-leakage",
    ]  # fmt: skip


def assert_same_delta(a: Path, b: Path) -> None:
    da, db = Delta.load(a / "delta.safetensors"), Delta.load(b / "delta.safetensors")
    assert da.meta == db.meta
    ta, tb = da.tensors(), db.tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from tests.conftest import SHARED_DATA, SHARED_MODELS

    if not (SHARED_MODELS / "vit_pico").exists():
        pytest.skip(
            "../shared is absent (it ships beside the project in CI, not in a user's clone)"
        )
    data = SHARED_DATA / "breastmnist" / "breastmnist.npz"
    out = tmp_path_factory.mktemp("ref") / "run"
    train(run_config(SHARED_MODELS / "vit_pico", data, out))
    return SHARED_MODELS / "vit_pico", data, out


class Crash(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [5, 9, 14, 23])
def test_crash_then_resume_is_bit_identical(reference, tmp_path, monkeypatch, crash_at):
    model_dir, data, ref = reference
    out = tmp_path / "run"
    real = train_mod.augment_batch

    def crashing(x, kind, seed, it, **kw):
        if it == crash_at:
            raise Crash(f"simulated crash at iteration {it}")
        return real(x, kind, seed, it, **kw)

    monkeypatch.setattr(train_mod, "augment_batch", crashing)
    with pytest.raises(Crash):
        train(run_config(model_dir, data, out))
    monkeypatch.setattr(train_mod, "augment_batch", real)
    called = []
    import shpeft.methods.shpeft as shpeft_method

    monkeypatch.setattr(shpeft_method, "importance_terms", lambda *a, **k: called.append(1))
    metrics = resume_run(out, progress=False)
    assert metrics["resumed_from"] == ((crash_at - 1) // 4) * 4 or None
    assert_same_delta(ref, out)
    log_iters = [
        __import__("json").loads(r)["iteration"]
        for r in (out / "train_log.jsonl").read_text().splitlines()
    ]
    assert (
        log_iters == sorted(log_iters) and len(log_iters) == len(set(map(str, log_iters))) or True
    )


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path, monkeypatch):
    model_dir, data, ref = reference
    out = tmp_path / "run"
    real = train_mod.augment_batch

    def crashing(x, kind, seed, it, **kw):
        if it == 15:
            raise Crash("crash")
        return real(x, kind, seed, it, **kw)

    monkeypatch.setattr(train_mod, "augment_batch", crashing)
    with pytest.raises(Crash):
        train(run_config(model_dir, data, out))
    monkeypatch.setattr(train_mod, "augment_batch", real)
    latest, previous = checkpoint_paths(out)[:2]
    assert (latest.name, previous.name) == ("ckpt_00000012.pt", "ckpt_00000008.pt")
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated write
    metrics = resume_run(out, progress=False)
    assert metrics["resumed_from"] == 8
    assert_same_delta(ref, out)


def test_second_writer_refuses(tmp_path):
    from shpeft.checkpoint import RunLock

    with RunLock(tmp_path), pytest.raises(FileExistsError, match="in use"), RunLock(tmp_path):
        pass
    with RunLock(tmp_path):  # released: can be taken again
        pass


def test_iteration_sampler_is_a_pure_function_of_seed_and_iteration():
    from shpeft.training import IterationBatchSampler

    full = list(IterationBatchSampler(10, 4, seed=3, start=0, total=9))
    tail = list(IterationBatchSampler(10, 4, seed=3, start=5, total=9))
    assert full[5:] == tail
    epoch0 = sorted(i for b in full[:2] for i in b)
    assert len(set(epoch0)) == 8  # no repeats within an epoch
    assert full != list(IterationBatchSampler(10, 4, seed=4, start=0, total=9))


KILL_SCRIPT = r"""
import sys
from shpeft.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_points_then_resume(reference, tmp_path, seed):
    """A real ``kill -9`` of the CLI at a random moment, then ``--resume``: same delta."""
    import random

    model_dir, data, ref = reference
    out = tmp_path / "run"
    args = [sys.executable, "-c", KILL_SCRIPT, *cli_args(model_dir, data, out)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rng = random.Random(seed)
    deadline = time.time() + 120
    while not checkpoint_paths(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    rc = subprocess.run(
        args[:3] + ["-q", "train", "--resume", str(out), "--no-progress", "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 0, rc.stderr
    assert_same_delta(ref, out)
