"""Tasks on one shared backbone: aliasing, apply/revert under interleaving, refusals."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from shpeft.backbones import hash_backbone
from shpeft.delta import Delta
from shpeft.runs import load_run
from shpeft.serve.engine import Engine
from shpeft.serve.registry import RunRef, load_registry


@pytest.fixture(scope="module")
def registry(runs):
    return load_registry([RunRef(name, path) for name, path in runs.items()])


@pytest.fixture(scope="module")
def references(runs):
    """Each run as ``shpeft.load_run`` (and so ``shpeft predict``) builds it, on its own."""
    return {name: load_run(path)[0] for name, path in runs.items()}


def base_tensors(registry) -> dict[int, torch.Tensor]:
    base = registry.bases[0].model
    return {id(t): t for t in [*base.parameters(), *base.buffers()]}


def test_every_task_runs_on_one_backbone_without_copying_it(registry, runs):
    assert len(registry.bases) == 1 and registry.bases[0].tasks == list(runs)
    shared = base_tensors(registry)
    for task in registry.tasks.values():
        view = {id(t) for t in [*task.model.parameters(), *task.model.buffers()]}
        assert set(shared) <= view, f"{task.name} does not use every base tensor"
    # N tasks cost one backbone plus at most their delta files (which also hold a header)
    memory = registry.memory()
    assert memory["backbones"] == sum(t.nbytes for t in shared.values())
    assert memory["tasks"] <= sum((p / "delta.safetensors").stat().st_size for p in runs.values())


def test_each_method_is_served_the_way_it_can_be(registry):
    served = {t.method: t.served_as for t in registry.tasks.values()}
    assert served == {
        "shpeft": "switch delta",
        "bitfit": "switch delta",
        "lora": "own modules",
        "adapter": "own modules",
    }


def test_interleaved_requests_match_load_run_and_leave_the_base_intact(registry, references):
    base = registry.bases[0]
    assert hash_backbone(base.model) == base.hash
    names = list(registry.tasks)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(96, 3, 32, 32, generator=g)
    # four clients, each cycling through the tasks from a different start: same-task runs are
    # batched and the base switches between tasks many times
    plan = [[(names[(c + i) % len(names)], xs[24 * c + i]) for i in range(24)] for c in range(4)]
    results: dict[int, list] = {}
    engine = Engine(registry, max_batch=4)
    try:

        def client(c: int) -> None:
            futures = [engine.predict(registry.tasks[n], x) for n, x in plan[c]]
            results[c] = [f.result(timeout=60) for f in futures]

        threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()[0]
    finally:
        engine.close()
    for c, jobs in enumerate(plan):
        for (name, x), got in zip(jobs, results[c], strict=True):
            with torch.no_grad():
                want = references[name](x[None])[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert stats["images"] == 96 and stats["switches"] >= len(names)
    assert hash_backbone(base.model) == base.hash


def test_same_task_requests_that_arrive_together_run_as_one_batch(
    registry, references, monkeypatch
):
    busy, task = registry.tasks["breast-lora"], registry.tasks["breast"]
    release = threading.Event()
    forward = busy.model.forward

    def slow(x):  # holds the worker while the other requests queue up
        release.wait(timeout=60)
        return forward(x)

    monkeypatch.setattr(busy.model, "forward", slow)
    xs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    engine = Engine(registry, max_batch=32)
    try:
        first = engine.predict(busy, xs[0])
        futures = [engine.predict(task, x) for x in xs]
        release.set()
        first.result(timeout=60)
        got = torch.stack([f.result(timeout=60) for f in futures])
        stats = engine.stats()[0]
    finally:
        engine.close()
    assert (stats["batches"], stats["images"], stats["switches"]) == (2, 9, 1)
    with torch.no_grad():
        torch.testing.assert_close(got, references["breast"](xs), atol=1e-5, rtol=0)


def test_a_failing_batch_restores_the_base_and_fails_alone(registry, references, monkeypatch):
    base = registry.bases[0]
    bad, good = registry.tasks["breast"], registry.tasks["breast-bitfit"]

    def broken(_x):
        raise RuntimeError("simulated failure inside the forward pass")

    monkeypatch.setattr(bad.model, "forward", broken)
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    engine = Engine(registry)
    try:
        failing, passing = engine.predict(bad, x), engine.predict(good, x)
        with pytest.raises(RuntimeError, match="simulated failure"):
            failing.result(timeout=60)
        got = passing.result(timeout=60)
    finally:
        engine.close()
    with torch.no_grad():
        torch.testing.assert_close(got, references["breast-bitfit"](x[None])[0], atol=1e-5, rtol=0)
    assert hash_backbone(base.model) == base.hash


def test_one_engine_per_registry(registry):
    engine = Engine(registry)
    try:
        with pytest.raises(RuntimeError, match="already served by an engine"):
            Engine(registry)
    finally:
        engine.close()


def test_corrupt_foreign_and_missing_runs_are_refused_and_the_others_served(runs, tmp_path):
    corrupt = Path(shutil.copytree(runs["breast"], tmp_path / "corrupt"))
    raw = bytearray((corrupt / "delta.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (corrupt / "delta.safetensors").write_bytes(bytes(raw))
    foreign = Path(shutil.copytree(runs["breast-bitfit"], tmp_path / "foreign"))
    delta = Delta.load(foreign / "delta.safetensors")
    delta.meta["base_hash"] = "f" * 64  # another backbone's hash
    delta.save(foreign / "delta.safetensors")
    missing = tmp_path / "missing"
    reg = load_registry(
        [
            RunRef("good", runs["busi"]),
            RunRef("corrupt", corrupt),
            RunRef("foreign", foreign),
            RunRef("missing", missing),
        ]
    )
    assert list(reg.tasks) == ["good"]
    base = reg.bases[0].hash
    reasons = {name: r.reason for name, r in reg.refused.items()}
    assert reasons == {
        "corrupt": f"{corrupt / 'delta.safetensors'}: content checksum mismatch: the file is "
        "corrupted or was modified",
        "foreign": f"the delta was trained on base ffffffffffff..., but the run's backbone "
        f"({reg.tasks['good'].base.model_name}) loads base {base[:12]}...; serve it with the "
        "weights it was trained on",
        "missing": f"{missing} is not a shpeft run directory (no config.json)",
    }


def test_nothing_to_serve_and_name_clashes_are_errors(runs, tmp_path):
    with pytest.raises(ValueError, match=r"no run could be served \(x: .* \(no config\.json\)\)"):
        load_registry([RunRef("x", tmp_path)])
    with pytest.raises(ValueError, match="two runs are served as 'busi'"):
        load_registry([RunRef("busi", runs["busi"]), RunRef("busi", runs["breast"])])


def test_run_names(tmp_path):
    assert RunRef.parse(f"ultrasound={tmp_path}") == RunRef("ultrasound", tmp_path)
    assert RunRef.parse(str(tmp_path)).name == tmp_path.name
    with pytest.raises(ValueError, match="task name 'two words' must be"):
        RunRef.parse(f"two words={tmp_path}")


def test_merged_baseline_matches_and_costs_a_backbone_per_task(runs, references, registry):
    merged = load_registry([RunRef(n, runs[n]) for n in ("breast", "breast-lora")], share=False)
    backbone = registry.memory()["backbones"]
    assert len(merged.bases) == 2 and merged.memory()["backbones"] == 0
    assert all(t.memory["own"] > backbone for t in merged.tasks.values())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for name, task in merged.tasks.items():
        with torch.no_grad():
            torch.testing.assert_close(task.model(x), references[name](x), atol=1e-5, rtol=0)
