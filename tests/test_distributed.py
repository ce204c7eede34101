"""DDP (torchrun, gloo on CPU) reproduces a single-process run: same mask, same delta.

The ranks score disjoint shards of the importance batches and train on disjoint slices of every
global batch; the gathered importance is bit-identical to one process (so the mask is equal),
and DDP's averaged gradients equal the full batch's up to float summation order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from shpeft import distributed
from shpeft.importance import estimate_importance
from shpeft.training import RankSlice, augment_batch
from tests.helpers import tiny_batches, tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def test_single_process_helpers():
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_true(True) and not distributed.all_true(False)
    assert distributed.init_from_env() is False  # not under torchrun: nothing to join


def test_rank_slices_cover_each_global_batch_and_augmentation_matches():
    from shpeft.training import IterationBatchSampler

    sampler = IterationBatchSampler(50, 8, seed=3, start=0, total=5)
    slices = [list(RankSlice(sampler, r, 2)) for r in range(2)]
    for it, full in enumerate(sampler):
        assert slices[0][it] + slices[1][it] == full
    x = torch.randn(8, 3, 4, 4)
    whole = augment_batch(x, "flip", seed=1, it=7)
    parts = [
        augment_batch(x[4 * r : 4 * r + 4], "flip", 1, 7, offset=4 * r, total=8) for r in (0, 1)
    ]
    assert torch.equal(torch.cat(parts), whole)


def _importance_worker(rank: int, world: int, init: str, strategy: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        scores = estimate_importance(tiny_vit(), tiny_batches(5), strategy=strategy)
        torch.save(scores, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["l2", "l1"])
def test_sharded_importance_is_bit_identical(tmp_path, strategy):
    want = estimate_importance(tiny_vit(), tiny_batches(5), strategy=strategy)
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "scores")
    # 5 batches on 2 ranks: two full rounds and a partial one
    mp.spawn(_importance_worker, args=(2, init, strategy, out), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(f"{out}.{r}")
        assert list(got) == list(want)
        for n in want:
            assert torch.equal(got[n], want[n]), (r, n)


def _train_cmd(out: Path, model: Path, data: Path) -> list[str]:
    return [
        "-m",
        "shpeft.cli",
        "-q",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        "shpeft",
        "--ratio",
        "0.01",
        "--importance-batches",
        "3",
        "--iterations",
        "4",
        "--eval-every",
        "4",  # one validation, at the end: the exported state is the last one in both runs
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--threads",
        "1",
        "--augment",
        "flip",
        "--no-progress",
        "--allow-leakage",  # BreastMNIST's official split has one image in train and test
    ]


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path, shared_data, vit_pico_dir):
    data = shared_data / "breastmnist" / "breastmnist.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    p1 = subprocess.run([sys.executable, *_train_cmd(single, vit_pico_dir, data)], **run)
    assert p1.returncode == 0, p1.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    p2 = subprocess.run(
        [*launcher, "--nproc_per_node=2", *_train_cmd(ddp, vit_pico_dir, data)], **run
    )
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]

    # the selected mask: exactly the same
    m1 = load_file(str(single / "method_state.safetensors"))
    m2 = load_file(str(ddp / "method_state.safetensors"))
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    # the delta: same indices, values equal up to float summation order
    from shpeft.delta import Delta

    # per-tensor view (sparse/<name>/indices|values, dense/<name>) of the packed files
    d1 = Delta.load(single / "delta.safetensors").tensors()
    d2 = Delta.load(ddp / "delta.safetensors").tensors()
    assert d1.keys() == d2.keys()
    for k in d1:
        if k.endswith("/indices"):
            assert torch.equal(d1[k], d2[k]), k
        else:
            torch.testing.assert_close(d2[k], d1[k], rtol=1e-4, atol=1e-6, msg=k)
    # training moved the values (the comparison is not between two untouched copies of the base)
    from shpeft.backbones import BackboneConfig, create_model

    base = dict(create_model(BackboneConfig(model=str(vit_pico_dir)), 2)[0].named_parameters())
    moved = 0
    for k in d1:
        if k.endswith("/values"):
            name = k.removeprefix("sparse/").removesuffix("/values")
            idx = d1[f"sparse/{name}/indices"].long()
            moved += int((d1[k] != base[name].detach().reshape(-1)[idx]).sum())
    assert moved > 0
    # only rank 0 wrote: one run directory, with one metrics file and one log
    assert (ddp / "metrics.json").is_file() and (ddp / "train_log.jsonl").is_file()
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
