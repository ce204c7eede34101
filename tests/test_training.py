"""The training loop itself: schedule, optimizer groups, best-state restore, warm start."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from shpeft.config import BackboneConfig, DataConfig, RunConfig, TrainConfig
from shpeft.delta import Delta
from shpeft.methods.configs import ShpeftConfig, SptLoraConfig
from shpeft.training import Best, lr_lambda, make_optimizer, param_groups, train
from tests.helpers import tiny_vit


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    tc = TrainConfig(iterations=100, warmup_iterations=10)
    f = lr_lambda(tc)
    assert [f(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    # cosine over the 90 iterations after warm-up: half way at 55, zero at the end
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))
    constant = lr_lambda(TrainConfig(iterations=100, schedule="constant"))
    assert {constant(i) for i in range(100)} == {1.0}


def test_head_gets_its_own_learning_rate_group():
    model = tiny_vit()
    trainable = [model.blocks[0].norm1.weight, model.head.weight, model.head.bias]
    groups = param_groups(model, trainable, TrainConfig(lr=0.01, head_lr=0.5))
    assert [g["lr"] for g in groups] == [0.01, 0.5]
    assert groups[0]["params"] == trainable[:1] and groups[1]["params"] == trainable[1:]
    # without head_lr the head shares lr; a head-only method has one group
    assert [g["lr"] for g in param_groups(model, trainable, TrainConfig(lr=0.01))] == [0.01] * 2
    assert len(param_groups(model, trainable[1:], TrainConfig())) == 1


def test_method_lr_scales_make_one_group_per_multiplier():
    model = tiny_vit()
    a, b, c = model.blocks[0].norm1.weight, model.blocks[0].norm1.bias, model.pos_embed
    trainable = [a, b, c, model.head.weight, model.head.bias]
    groups = param_groups(model, trainable, TrainConfig(lr=0.01), {id(a): 5.0, id(c): 5.0})
    assert [(g["lr"], len(g["params"])) for g in groups] == [(0.01, 1), (0.05, 2), (0.01, 2)]
    assert groups[1]["params"] == [a, c]


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_choice(name, cls):
    p = nn.Parameter(torch.ones(3))
    opt = make_optimizer(TrainConfig(optimizer=name, lr=0.1, weight_decay=0.01), [{"params": [p]}])
    assert isinstance(opt, cls) and opt.param_groups[0]["weight_decay"] == 0.01


def test_best_keeps_the_first_of_equal_scores_and_restores_it():
    p = nn.Parameter(torch.zeros(2))
    best = Best()
    assert best.offer(1, {"macro_f1": 0.5}, [p])
    with torch.no_grad():
        p.fill_(1.0)
    assert not best.offer(2, {"macro_f1": 0.5}, [p])  # a tie: the earlier state stays
    assert best.offer(3, {"macro_f1": 0.6}, [p]) and best.iteration == 3
    with torch.no_grad():
        p.fill_(7.0)
    best.restore([p])
    assert torch.equal(p, torch.ones(2))
    again = Best.from_checkpoint({"best": best.to_json(), "best_state": best.state})
    assert (again.macro_f1, again.iteration) == (0.6, 3)


def _cfg(model_dir, data, out, **kw) -> RunConfig:
    tc = dict(out=str(out), method="shpeft", iterations=12, batch_size=16, lr=0.05,
              eval_every=4, progress=False, threads=1)  # fmt: skip
    tc.update(kw.pop("train", {}))
    return RunConfig(
        backbone=BackboneConfig(model=str(model_dir)),
        data=DataConfig(data=str(data), allow_leakage=True),
        train=TrainConfig(**tc),
        method=kw.pop("method", ShpeftConfig(ratio=0.02, importance_batches=2)),
    )


@pytest.mark.slow
def test_exported_state_is_the_best_validation_state(tmp_path, vit_pico_dir, shared_data):
    """The delta and the test metrics come from the best validation iteration, not the last."""
    data = shared_data / "breastmnist" / "breastmnist.npz"
    metrics = train(_cfg(vit_pico_dir, data, tmp_path / "r", train={"lr": 0.5}))
    log = [
        json.loads(line)
        for line in (tmp_path / "r" / "train_log.jsonl").read_text().split("\n")
        if line
    ]
    vals = [(r["iteration"], r["val"]["macro_f1"]) for r in log if "val" in r]
    best_it, best_f1 = max(vals, key=lambda t: (t[1], -t[0]))
    assert metrics["best_iteration"] == best_it and metrics["val"]["macro_f1"] == best_f1
    assert Delta.load(tmp_path / "r" / "delta.safetensors").meta["iteration"] == best_it


@pytest.mark.slow
def test_train_does_not_modify_its_config_and_runs_twice(tmp_path, vit_pico_dir, shared_data):
    """Regression: SPT-LoRA's prepare settled its LoRA modules into the caller's config, so a
    second train() with the same config raised."""
    data = shared_data / "breastmnist" / "breastmnist.npz"
    cfg = _cfg(vit_pico_dir, data, tmp_path / "a", method=SptLoraConfig(spt_batches=2),
               train={"method": "spt-lora", "iterations": 4})  # fmt: skip
    before = copy.deepcopy(cfg)
    train(cfg)
    assert cfg == before
    train(
        RunConfig(
            cfg.backbone,
            cfg.data,
            TrainConfig(**{**vars(cfg.train), "out": str(tmp_path / "b")}),
            cfg.method,
        )
    )
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["method"]
    assert saved["spt_lora_modules"]  # the settled choice is recorded in the run, not in cfg


@pytest.mark.slow
def test_linear_probe_warm_start(tmp_path, vit_pico_dir, shared_data):
    """The warm start fits the head before training; its validation F1 is iteration 0's."""
    data = shared_data / "breastmnist" / "breastmnist.npz"
    cache = tmp_path / "features"
    cfg = _cfg(vit_pico_dir, data, tmp_path / "lp", method=None,
               train={"method": "linear", "head_init": "linear-probe", "feature_cache": str(cache),
                      "iterations": 4})  # fmt: skip
    from threadpoolctl import threadpool_info

    pools_before = {p["filepath"]: p["num_threads"] for p in threadpool_info()}
    train(cfg)
    pools_after = {p["filepath"]: p["num_threads"] for p in threadpool_info()}
    assert {f: pools_after[f] for f in pools_before} == pools_before  # --threads cap undone
    record = json.loads((tmp_path / "lp" / "head_init.json").read_text())
    first = json.loads((tmp_path / "lp" / "train_log.jsonl").read_text().split("\n")[0])
    assert first["iteration"] == 0 and first["val"]["macro_f1"] == record["val_macro_f1"]
    assert record["feature_cache_hits"] == 0 and not record["fit_from_cache"]
    assert len(list(cache.glob("*.fit.npz"))) == 1 and len(list(cache.glob("*.npz"))) == 3
    assert all(math.isfinite(c["val_macro_f1"]) for c in record["candidates"])
    assert not (tmp_path / "lp" / "head_init_after_prepare.json").exists()  # linear: unchanged
    cfg.train.out = str(tmp_path / "lp2")
    train(cfg)  # the second run reads the cached features and fits the same head
    again = json.loads((tmp_path / "lp2" / "head_init.json").read_text())
    assert again["feature_cache_hits"] == 2 and again["fit_from_cache"]
    assert again["C"] == record["C"] and again["candidates"] == record["candidates"]

    # SSF's initial scales change the model: the head is refitted to the prepared model
    cfg.train.out, cfg.train.method, cfg.method = str(tmp_path / "ssf"), "ssf", None
    train(cfg)
    refit = json.loads((tmp_path / "ssf" / "head_init_after_prepare.json").read_text())
    first = json.loads((tmp_path / "ssf" / "train_log.jsonl").read_text().split("\n")[0])
    assert first["iteration"] == 0 and first["val"]["macro_f1"] == refit["val_macro_f1"]
