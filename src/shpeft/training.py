"""The training loop shared by every method: data -> model -> head -> method.prepare -> fit -> delta.

Reads top to bottom (after nanoGPT's ``train.py``): the small pieces of the recipe first
(optimizer, schedule, batch order, augmentation), then the phases of one run in the order they
happen (:func:`setup`, :func:`record`, :func:`warm_start`, :func:`prepare`, :func:`fit`,
:func:`finish`), then :func:`train`, which calls them. The paper's recipe is the default: SGD
with momentum 0.9, batch 64, lr 1e-3, cosine annealing over 40k iterations; validation every
``eval_every`` iterations keeps the best trainable state by validation macro F1; the test split is
touched once, at the end, with that best state. What a run writes and how it is read back is
:mod:`shpeft.runs`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from shpeft import distributed
from shpeft._version import __version__
from shpeft.backbones import InputSpec, create_model, hash_backbone, make_head
from shpeft.checkpoint import RunLock, checkpoint_paths, load_latest_checkpoint, save_checkpoint
from shpeft.config import BackboneConfig, DataConfig, RunConfig, TrainConfig, from_dict, to_dict
from shpeft.data import DataBundle, check_leakage_cheap, load_data, make_loader
from shpeft.delta import atomic_save_safetensors
from shpeft.evaluate import compute_metrics, evaluate, predict
from shpeft.io_utils import write_json
from shpeft.linear_probe import warm_start_head
from shpeft.methods import Method, PrepareContext
from shpeft.params import is_head
from shpeft.progress import progress_bar
from shpeft.report.build import peak_memory, report_after_training
from shpeft.runs import (
    environment,
    load_run_config,
    method_from_config,
    prepare_run_dir,
    resolve_device,
    save_test_confusion,
    truncate_log,
)

log = logging.getLogger("shpeft")

# ---------------------------------------------------------------------------------------------
# The recipe's pieces


def make_optimizer(tc: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The run's optimizer over parameter groups (each with its own ``lr``).

    Weight decay applies to the trained tensors only (the optimizer never sees frozen ones);
    for sparse methods those are the k selected values, so optimizer state is O(k).
    """
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)


def lr_lambda(cfg: TrainConfig):
    """Multiplier of the base lr at iteration ``it`` (0-based): warm-up then cosine to 0."""

    def f(it: int) -> float:
        if it < cfg.warmup_iterations:
            return (it + 1) / cfg.warmup_iterations
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.iterations - cfg.warmup_iterations)
        return 0.5 * (1 + math.cos(math.pi * (it - cfg.warmup_iterations) / span))

    return f


class IterationBatchSampler(Sampler[list[int]]):
    """Index batches for iterations ``start+1 .. total``: a pure function of (seed, iteration).

    Epoch e is a seeded permutation of the training set cut into full batches, so the batch of any
    iteration can be recomputed without replaying the ones before it: a resumed run sees exactly
    the batches an uninterrupted one would have seen, with any number of loader workers.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int) -> None:
        if n < 1:
            raise ValueError("the training split is empty")
        self.n, self.bs, self.seed, self.start, self.total = (
            n,
            min(batch_size, n),
            seed,
            start,
            total,
        )
        self.per_epoch = n // self.bs
        self._cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.total - self.start

    def batch(self, it: int) -> list[int]:
        epoch, b = divmod(it - 1, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED))
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1][b * self.bs : (b + 1) * self.bs].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for it in range(self.start + 1, self.total + 1):
            yield self.batch(it)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic across processes, unlike ``hash``)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def augment_batch(
    x: torch.Tensor, kind: str, seed: int, it: int, *, offset: int = 0, total: int | None = None
) -> torch.Tensor:
    """Training augmentation, seeded by (seed, iteration) so that a resumed run repeats it.

    Under DDP, ``x`` is rows ``offset:offset+len(x)`` of a global batch of ``total`` images:
    the draws are made for the whole batch and sliced, as a single process would see them.
    """
    if kind == "none":
        return x
    if kind == "flip":
        g = torch.Generator().manual_seed(_mix(seed, it, 0xF11B))
        draws = torch.rand(total or x.shape[0], generator=g)[offset : offset + x.shape[0]]
        flip = (draws < 0.5).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)
    raise ValueError(f"unknown augmentation {kind!r}")


def backbone_size(model: nn.Module) -> int:
    """Scalars of the backbone (everything but the head), before any method touches it."""
    return sum(p.numel() for n, p in model.named_parameters() if not is_head(n))


def count_trainable(
    model: nn.Module, trainable: list[nn.Parameter], backbone_params: int
) -> dict[str, Any]:
    """Trainable scalars, the head counted apart from the backbone budget (same for every method)."""
    head_ids = {id(p) for n, p in model.named_parameters() if is_head(n)}
    head = sum(p.numel() for p in trainable if id(p) in head_ids)
    backbone = sum(p.numel() for p in trainable) - head
    return {
        "backbone_trainable": backbone,
        "head_trainable": head,
        "backbone_params": backbone_params,
        "backbone_trainable_pct": 100.0 * backbone / max(1, backbone_params),
    }


class RankSlice(Sampler[list[int]]):
    """Rank ``rank``'s equal, contiguous share of every batch of ``sampler`` (DDP)."""

    def __init__(self, sampler: IterationBatchSampler, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            per = len(batch) // self.world
            yield batch[self.rank * per : (self.rank + 1) * per]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for ``bf16`` (and ``auto`` on CUDA), None (float32, no autocast) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def param_groups(
    model: nn.Module,
    trainable: list[nn.Parameter],
    tc: TrainConfig,
    scales: dict[int, float] | None = None,
) -> list[dict]:
    """Optimizer groups: the method's tensors at ``lr`` (times the method's per-parameter
    ``scales``, one group per distinct multiplier), the head at ``head_lr``."""
    head_ids = {id(p) for n, p in model.named_parameters() if is_head(n)}
    scales = scales or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in trainable:
        head = id(p) in head_ids
        groups.setdefault((head, 1.0 if head else scales.get(id(p), 1.0)), []).append(p)
    out = []
    for (head, mult), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.append({"params": params, "lr": (tc.head_lr or tc.lr) if head else tc.lr * mult})
    return out


@dataclass
class Best:
    """The best validation state so far (by macro F1; the earlier one wins ties)."""

    macro_f1: float = -1.0
    iteration: int | None = None
    val: dict[str, Any] | None = None
    state: list[Tensor] | None = None

    def offer(self, it: int, metrics: dict[str, Any], trainable: list[nn.Parameter]) -> bool:
        """Keep ``trainable``'s values if ``metrics`` beat the best; True when they did."""
        if metrics["macro_f1"] <= self.macro_f1:
            return False
        self.macro_f1, self.iteration, self.val = metrics["macro_f1"], it, metrics
        self.state = [p.detach().cpu().clone() for p in trainable]
        return True

    def restore(self, trainable: list[nn.Parameter]) -> None:
        if self.state is not None:
            with torch.no_grad():
                for p, v in zip(trainable, self.state, strict=True):
                    p.copy_(v)

    def to_json(self) -> str:  # the state tensors are checkpointed apart
        return json.dumps({"macro_f1": self.macro_f1, "iteration": self.iteration, "val": self.val})

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> Best:
        b = json.loads(state["best"])
        return cls(b["macro_f1"], b["iteration"], b["val"], state["best_state"])


# ---------------------------------------------------------------------------------------------
# One run, phase by phase


@dataclass
class Job:
    """What one run holds while it trains (built by :func:`setup`)."""

    cfg: RunConfig
    method: Method
    model: nn.Module
    spec: InputSpec
    data: DataBundle
    device: torch.device
    base_hash: str
    run_dir: Path
    """Where this process writes (a throwaway folder on DDP ranks > 0)."""
    src_dir: Path
    """Where a resume reads from (the real run directory on every rank)."""
    resume: bool
    amp: torch.dtype | None = None
    resolved: dict[str, Any] = field(default_factory=dict)

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.train

    @property
    def classes(self) -> list[str]:
        return list(self.data.classes)

    @property
    def main(self) -> bool:
        return distributed.is_main()

    def log_row(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def loader(self, split: str) -> DataLoader | None:
        ds = getattr(self.data, split)
        if ds is None:
            return None
        return make_loader(ds, self.tc.batch_size, num_workers=self.cfg.data.num_workers)


def setup(cfg: RunConfig) -> tuple[RunConfig, Method, nn.Module, InputSpec, DataBundle, str]:
    """Build the method, the model with its new head, and the data; refuse leakage.

    The model comes first: its input spec decides how images are resized and normalised; the
    head is replaced once the classes are known. Augmentation is applied per iteration in
    :func:`fit`, not in the dataset: that keeps it reproducible across resumes and workers.
    """
    tc = cfg.train
    method = cfg.method_obj()
    cfg = replace(cfg, method=method.config)
    torch.manual_seed(tc.seed)
    model, spec = create_model(cfg.backbone, num_classes=2)
    data = load_data(
        replace(cfg.data, augment="none"),
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
    )
    # refuse train/test leakage (exact duplicates across splits) before anything is written
    check_leakage_cheap(data, allow_leakage=cfg.data.allow_leakage)
    torch.manual_seed(tc.seed)
    model.head = make_head(cfg.backbone.head, model.head.in_features, len(data.classes))
    model.num_classes = len(data.classes)
    return cfg, method, model, spec, data, hash_backbone(model)


def record(job: Job) -> int:
    """Write ``config.json`` and ``split.json`` (or check them on resume); the start iteration."""
    job.resolved = {
        "backbone": to_dict(job.cfg.backbone),
        "data": to_dict(job.cfg.data),
        "train": to_dict(job.tc),
        "method": to_dict(job.method.config),
        "classes": job.classes,
        "input": to_dict(job.spec),
        "base_hash": job.base_hash,
        "environment": environment(),
    }
    if job.resume:
        if load_run_config(job.src_dir).get("base_hash") != job.base_hash:
            raise ValueError(
                f"cannot resume {job.src_dir}: its base backbone weights differ from the loaded ones"
            )
    else:
        write_json(job.run_dir / "config.json", job.resolved)
        write_json(job.run_dir / "split.json", job.data.split_record)
    return 0


def warm_start(job: Job, after: str | None = None) -> None:
    """``head_init="linear-probe"``: fit the head on the frozen features first (LP-FT).

    Called before the method prepares (SH-PEFT's importance is estimated with this head), and
    again with ``after="prepare"`` when preparing changed what the model computes (SSF's
    initial scales, VPT's prompts): every method then starts from the linear probe of its own
    initial model. Deterministic (and cached), so a resumed run repeats it exactly before its
    checkpoint restores the trained head.
    """
    if job.tc.head_init != "linear-probe":
        return
    ids = {s: (job.data.split_record["splits"].get(s) or {}).get("ids") for s in ("train", "val")}
    key = {  # what the frozen features depend on (keys the feature cache)
        "base_hash": job.base_hash,
        "input": to_dict(job.spec),
        "source": job.data.split_record.get("source_resolved"),
        "format": job.data.split_record.get("format"),
        "ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "amp": str(job.amp),
        "device": job.device.type,
        "head": job.cfg.backbone.head,
    }
    if after is not None:  # the prepared model's features depend on the method and the seed
        key.update(method=job.method.meta(), seed=job.tc.seed, after=after)
    result = warm_start_head(
        job.model,
        job.data.train,
        job.data.val,
        len(job.classes),
        normalize=job.cfg.backbone.head == "l2norm",
        key_parts=key,
        cache_dir=job.tc.feature_cache or None,
        batch_size=max(job.tc.batch_size, 64),
        device=job.device,
        amp=job.amp,
        progress=job.tc.progress and job.main,
    )
    if not job.resume:
        name = "head_init.json" if after is None else f"head_init_after_{after}.json"
        write_json(job.run_dir / name, result)


@torch.no_grad()
def _probe_output(job: Job) -> Tensor | None:
    """The model's pre-logits features on a few training images (None without linear probe)."""
    if job.tc.head_init != "linear-probe":
        return None
    x = torch.stack([job.data.train[i][0] for i in range(min(4, len(job.data.train)))])
    was = job.model.training
    job.model.eval()
    try:
        f = job.model.forward_head(job.model.forward_features(x.to(job.device)), pre_logits=True)
    finally:
        job.model.train(was)
    return f.float().cpu()


def prepare(job: Job) -> tuple[list[nn.Parameter], dict[str, Any], float]:
    """Let the method freeze / re-parametrise the model: ``(trainable, counts, seconds)``.

    The method's data-driven choices (e.g. SH-PEFT's selection) are saved once and reused on
    resume, never re-estimated.
    """
    tc = job.tc
    saved_path = job.src_dir / "method_state.safetensors"
    saved = load_file(str(saved_path)) if job.resume and saved_path.is_file() else None
    ctx = PrepareContext(
        # one epoch of the training split in a fixed, seeded order (no augmentation)
        importance_loader=lambda: make_loader(
            job.data.train,
            tc.batch_size,
            seed=tc.seed + 1,
            shuffle=True,
            num_workers=job.cfg.data.num_workers,
        ),  # fmt: skip
        # a stream of its own: the training batches' flips are drawn from (seed, iteration)
        importance_augment=lambda x, i: augment_batch(x, job.cfg.data.augment, tc.seed, -1 - i),
        device=job.device,
        run_dir=job.run_dir,
        progress=tc.progress and job.main,
        saved_state=saved,
    )
    n_backbone = backbone_size(job.model)
    t0 = time.perf_counter()
    trainable = job.method.prepare(job.model, ctx)
    seconds = time.perf_counter() - t0
    if saved is None:
        atomic_save_safetensors(
            job.method.state(job.model), job.run_dir / "method_state.safetensors"
        )
        for name, art in ctx.artifacts.items():
            write_json(job.run_dir / f"{name}.json", art)
        # prepare may have settled data-driven settings (e.g. SPT's LoRA modules): record them
        job.resolved["method"] = to_dict(job.method.config)
        write_json(job.run_dir / "config.json", job.resolved)
    counts = count_trainable(job.model, trainable, n_backbone)
    log.info(
        "%s: %d trainable backbone scalars (%.4f%% of %d) + %d head",
        job.method.name, counts["backbone_trainable"], counts["backbone_trainable_pct"],
        counts["backbone_params"], counts["head_trainable"],
    )  # fmt: skip
    return trainable, counts, seconds


def fit(job: Job, trainable: list[nn.Parameter]) -> dict[str, Any]:
    """The optimisation loop, from the newest checkpoint on resume; leaves the best state in.

    Returns the loop's record: ``best`` (:class:`Best`), ``start``, ``skipped`` batches and
    ``train_s``.
    """
    tc, model, device = job.tc, job.model, job.device
    world = distributed.world_size()
    opt = make_optimizer(tc, param_groups(model, trainable, tc, job.method.lr_scales(model)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    best, skipped, start = Best(), 0, 0
    state = load_latest_checkpoint(job.src_dir) if job.resume else None
    if state is not None:
        start = int(state["iteration"])
        with torch.no_grad():
            for p, v in zip(trainable, state["trainable"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        best, skipped = Best.from_checkpoint(state), int(state.get("skipped", 0))
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    truncate_log(job.run_dir / "train_log.jsonl", start)
    val_loader = job.loader("val") if job.main else None

    def validate(it: int) -> None:
        m = evaluate(model, val_loader, job.classes, device)
        job.log_row({"iteration": it, "val": {k: m[k] for k in ("macro_f1", "accuracy", "auc")}})
        best.offer(it, m, trainable)

    def checkpoint(it: int) -> None:
        save_checkpoint(
            job.run_dir,
            {
                "iteration": it,
                "trainable": [p.detach().cpu() for p in trainable],
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "best": best.to_json(),
                "best_state": best.state,
                "skipped": skipped,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        )

    eval_every = tc.eval_every or max(1, tc.iterations // 10)
    ckpt_every = tc.checkpoint_every or eval_every
    sampler = IterationBatchSampler(
        len(job.data.train), tc.batch_size, tc.seed, start, tc.iterations
    )
    # DDP: one equal slice of every global batch per rank; DDP averages the gradients, which
    # equals the gradient of the whole batch's mean loss. Single process: net is model.
    net: nn.Module = model
    batch_sampler: Sampler[list[int]] = sampler
    if world > 1:
        if sampler.bs % world:
            raise ValueError(
                f"batch size {sampler.bs} must be divisible by the number of processes {world}"
            )
        batch_sampler = RankSlice(sampler, distributed.rank(), world)
        net = DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False,  # no running statistics in a ViT; plans are buffers
            static_graph=True,  # the same trainable tensors are used at every step
        )
    loader = DataLoader(
        job.data.train, batch_sampler=batch_sampler, num_workers=job.cfg.data.num_workers
    )
    if val_loader is not None and start == 0 and tc.head_init == "linear-probe":
        validate(0)  # the warm start is a candidate too: the best state may be the linear probe
    model.train()
    t_start, seen = time.perf_counter(), 0
    bar = progress_bar(
        zip(range(start + 1, tc.iterations + 1), loader, strict=False),
        total=len(sampler),
        desc=f"train {job.method.name}",
        enabled=tc.progress and job.main,
    )
    for it, (x, y) in bar:
        x = x.to(device, non_blocking=True)
        off = distributed.rank() * x.shape[0] if world > 1 else 0
        # under DDP, this rank's slice of the global batch's augmentation draws
        x = augment_batch(x, job.cfg.data.augment, tc.seed, it, offset=off, total=sampler.bs)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=job.amp) if job.amp else contextlib.nullcontext():
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if world > 1:
            # one verdict for all ranks, and every rank joins DDP's gradient all-reduce (a
            # skipped backward on one rank would stall the others); the step is skipped below
            finite = distributed.all_true(finite, device)
        if finite or world > 1:
            loss.backward()
            # one reduction, one sync: any NaN/Inf gradient makes the sum non-finite
            finite = finite and bool(
                torch.isfinite(sum(p.grad.float().sum() for p in trainable if p.grad is not None))
            )
        if finite:
            opt.step()
        elif tc.skip_nonfinite:
            skipped += 1
            log.warning("non-finite loss or gradient at iteration %d: batch skipped", it)
        else:
            raise FloatingPointError(
                f"non-finite loss or gradient at iteration {it} (loss {loss.item()}); the last "
                f"good checkpoint in {job.run_dir / 'checkpoints'} can be resumed with --resume, "
                "or rerun with --skip-nonfinite or a lower --lr"
            )
        sched.step()
        seen += x.shape[0] * world
        if it % 10 == 0 or it == tc.iterations:
            rate = seen / (time.perf_counter() - t_start)
            lr = sched.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            job.log_row({"iteration": it, "loss": loss.item(), "lr": lr, "img_per_s": rate})
        if val_loader is not None and (it % eval_every == 0 or it == tc.iterations):
            validate(it)
            model.train()
        if job.main and (it % ckpt_every == 0 or it == tc.iterations):
            checkpoint(it)
    train_s = time.perf_counter() - t_start
    best.restore(trainable)  # the best validation state is what is exported and tested
    return {"best": best, "start": start, "skipped": skipped, "train_s": train_s}


def finish(job: Job, counts: dict[str, Any], prepare_s: float, loop: dict[str, Any]) -> dict:
    """Export the delta, test once (unless ``eval_test`` is off) and write ``metrics.json``."""
    tc, best = job.tc, loop["best"]
    delta = job.method.delta(job.model)
    delta.meta.update(job.method.meta())
    delta.meta.update(
        {
            "base_model": job.cfg.backbone.model,
            "base_hash": job.base_hash,
            "shpeft_version": __version__,
            "classes": job.classes,
            "head": job.cfg.backbone.head,
            "image_size": job.spec.image_size,
            "iteration": tc.iterations if best.iteration is None else best.iteration,
        }
    )
    delta_path = delta.save(job.run_dir / "delta.safetensors")
    metrics: dict[str, Any] = {
        "method": job.method.name,
        "trainable": counts,
        "iterations": tc.iterations,
        "best_iteration": best.iteration,
        "resumed_from": loop["start"] or None,
        "skipped_batches": loop["skipped"],
        "prepare_s": prepare_s,
        "train_s": loop["train_s"],
        "delta_bytes": delta_path.stat().st_size,
        "val": best.val,
    }
    test_loader = job.loader("test") if job.main else None
    test_pred = None  # (labels, probs) of the test pass, saved for the report
    if test_loader is not None and not tc.eval_test:
        metrics["test_skipped"] = True  # read later, once, by runs.evaluate_test() if at all
    elif test_loader is not None:
        test_pred = predict(job.model, test_loader, job.device, progress=False)
        metrics["test"] = compute_metrics(*test_pred, job.classes)
        save_test_confusion(metrics["test"], job.classes, job.run_dir, job.method.name)
    metrics["peak_memory"] = peak_memory(job.device)
    write_json(job.run_dir / "metrics.json", metrics)
    if job.main:  # report.html; a failure there logs a warning and never fails the run
        report_after_training(
            job.run_dir, model=job.model, test_data=job.data.test, test_pred=test_pred
        )
    return metrics


def run_phases(job: Job) -> dict[str, Any]:
    """Every phase of a run in order (with the run directory ready)."""
    record(job)
    warm_start(job)
    before = _probe_output(job)
    trainable, counts, prepare_s = prepare(job)
    after = _probe_output(job)
    if before is not None and not torch.equal(before, after):
        warm_start(job, after="prepare")  # the method changed the initial model: refit
    loop = fit(job, trainable)
    return finish(job, counts, prepare_s, loop)


# ---------------------------------------------------------------------------------------------
# Entry points


def train(cfg: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run one fine-tuning job end to end; returns the metrics written to ``metrics.json``.

    ``cfg`` is not modified (the run works on a copy). Under ``torchrun`` (see
    :mod:`shpeft.distributed`) every process calls this: the model is wrapped in
    DistributedDataParallel, each global batch is split across the ranks, and only rank 0 writes
    the run directory and evaluates.

    Args:
        cfg: the run's configuration.
        resume: continue the run in ``cfg.train.out`` from its newest readable checkpoint (the
            method's saved selection is reused, nothing is re-estimated). The result is
            bit-identical to an uninterrupted run on the same device and thread count.
    """
    cfg = copy.deepcopy(cfg)  # methods may settle data-driven settings in their config
    own_group = distributed.init_from_env(cfg.train.device)
    blas = None
    try:
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
            # numpy / scikit-learn (the linear probe's solver) have BLAS thread pools of their
            # own: --threads caps them too, or parallel runs oversubscribe the cores
            from threadpoolctl import threadpool_limits

            blas = threadpool_limits(tc.threads)
        device = distributed.device_for_rank(resolve_device(tc.device))
        run_dir = Path(tc.out)
        if resume and not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"nothing to resume: {run_dir} has no config.json")
        cfg, method, model, spec, data, base_hash = setup(cfg)
        model.to(device)

        def job(write_to: Path) -> Job:
            return Job(
                cfg, method, model, spec, data, device, base_hash, write_to, run_dir, resume,
                amp=autocast_dtype(tc.precision, device),
            )  # fmt: skip

        if not distributed.is_main():
            # DDP: only rank 0 writes the run directory. The other ranks run the same code but
            # write into a throwaway folder, and read the real one (to resume) through src_dir.
            with tempfile.TemporaryDirectory(prefix=f"shpeft-rank{distributed.rank()}-") as tmp:
                return run_phases(job(Path(tmp)))
        fresh = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(run_dir):
            if not resume:
                prepare_run_dir(run_dir, tc.overwrite)
            try:
                return run_phases(job(run_dir))
            except BaseException:
                # A run that failed before writing anything resumable (e.g. a method's settings
                # do not fit the model) leaves no half-made directory behind.
                resumable = (
                    checkpoint_paths(run_dir) or (run_dir / "method_state.safetensors").exists()
                )
                if fresh and not resume and not resumable:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
    finally:
        if blas is not None:
            blas.restore_original_limits()
        if own_group:
            distributed.cleanup()


def resume_run(run_dir: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """Continue an interrupted run from its directory (``shpeft train --resume RUN``)."""
    conf = load_run_config(run_dir)
    cfg = RunConfig(
        backbone=from_dict(BackboneConfig, conf["backbone"]),
        data=from_dict(DataConfig, conf["data"]),
        train=from_dict(TrainConfig, {**conf["train"], "out": str(run_dir), **overrides}),
        method=method_from_config(conf).config,
    )
    return train(cfg, resume=True)
