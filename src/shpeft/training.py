"""The training loop shared by every method: data -> model -> method.prepare -> SGD -> delta.

Reads top to bottom (nanoGPT style). The paper's recipe is the default: SGD with momentum 0.9,
batch 64, lr 1e-3, cosine annealing over 40k iterations; validation every ``eval_every``
iterations keeps the best trainable state by validation macro F1; the test split is touched once,
at the end, with that best state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from shpeft import __version__, distributed
from shpeft.backbones import BackboneConfig, create_model, hash_backbone, make_head
from shpeft.checkpoint import RunLock, checkpoint_paths, load_latest_checkpoint, save_checkpoint
from shpeft.config import from_dict, to_dict
from shpeft.data import DataConfig, check_leakage_cheap, load_data, load_eval_data
from shpeft.delta import atomic_save_safetensors
from shpeft.evaluate import (
    compute_metrics,
    evaluate,
    format_metrics,
    predict,
    save_confusion_matrix_png,
)
from shpeft.linear_probe import warm_start_head
from shpeft.methods import Method, MethodConfig, PrepareContext, get_method
from shpeft.report.build import peak_memory, report_after_training

log = logging.getLogger("shpeft")


@dataclass
class TrainConfig:
    """Optimisation recipe and run bookkeeping (defaults: the paper's recipe)."""

    out: str = field(default="runs/shpeft", metadata={"help": "run directory to create"})
    method: str = field(default="shpeft", metadata={"help": "PEFT method (see `shpeft methods`)"})
    iterations: int = field(default=40000, metadata={"help": "optimizer steps (paper: 40000)"})
    batch_size: int = field(default=64, metadata={"help": "mini-batch size (paper: 64)"})
    optimizer: str = field(
        default="sgd",
        metadata={
            "help": "sgd (the paper: SGD with --momentum) or adamw (AdamW, betas 0.9/0.999; "
            "scale-free per scalar, the usual choice for PEFT of ViTs)",
            "choices": ("sgd", "adamw"),
        },
    )
    lr: float = field(default=1e-3, metadata={"help": "learning rate (paper: 1e-3)"})
    head_lr: float | None = field(
        default=None, metadata={"help": "learning rate of the head (default: --lr)"}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "weight decay (only on trained scalars)"}
    )
    schedule: str = field(
        default="cosine",
        metadata={"help": "learning-rate schedule", "choices": ("cosine", "constant")},
    )
    warmup_iterations: int = field(default=0, metadata={"help": "linear warm-up iterations"})
    eval_every: int = field(
        default=0, metadata={"help": "validate every N iterations (0: ten times per run)"}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the model head, data order and augmentation"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run directory"})
    checkpoint_every: int = field(
        default=0,
        metadata={
            "help": "write a resumable checkpoint every N iterations (0: at each validation)"
        },
    )
    skip_nonfinite: bool = field(
        default=False,
        metadata={"help": "skip batches whose loss or gradient is not finite instead of stopping"},
    )
    eval_test: bool = field(
        default=True,
        metadata={
            "help": "evaluate the test split at the end (off: the test split is not read; "
            "`shpeft.training.evaluate_test` can do it later, e.g. for the lr search's runs)"
        },
    )
    head_init: str = field(
        default="random",
        metadata={
            "help": "how the new head starts: random (the paper) or linear-probe (logistic "
            "regression on the frozen backbone's features, C chosen on validation, before the "
            "method prepares: every method starts from the linear probe's optimum, as LP-FT)",
            "choices": ("random", "linear-probe"),
        },
    )
    feature_cache: str = field(
        default="",
        metadata={
            "help": "folder caching the frozen features of --head-init linear-probe across runs "
            "(empty: no cache)"
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "training precision: auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, or "
            "bf16 (autocast; weights, optimizer state and importance stay float32)",
            "choices": ("auto", "fp32", "bf16"),
        },
    )

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or (self.head_lr is not None and not self.head_lr > 0):
            raise ValueError(
                f"learning rates must be > 0, got lr={self.lr}, head_lr={self.head_lr}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if (
            min(self.weight_decay, self.warmup_iterations, self.eval_every, self.checkpoint_every)
            < 0
        ):
            raise ValueError(
                "weight_decay, warmup_iterations, eval_every and checkpoint_every must be >= 0"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.head_init not in ("random", "linear-probe"):
            raise ValueError(f"head_init must be random or linear-probe, got {self.head_init!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class RunConfig:
    """Everything a run needs; written resolved to ``config.json`` in the run directory."""

    backbone: BackboneConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig | None = None

    def method_obj(self) -> Method:
        return get_method(self.train.method)(self.method)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def environment() -> dict[str, Any]:
    """Versions and the git commit, recorded beside every result."""
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    import timm

    return {
        "shpeft": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


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


def make_loader(
    dataset, batch_size: int, *, seed: int = 0, shuffle: bool = False, num_workers: int = 0
):
    """An evaluation / importance loader (fixed order, or one seeded shuffle)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers
    )


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
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))


def count_trainable(
    model: nn.Module, trainable: list[nn.Parameter], backbone_params: int
) -> dict[str, Any]:
    """Trainable scalars, the head counted apart from the backbone budget (same for every method)."""
    head_ids = {id(p) for n, p in model.named_parameters() if n.startswith("head.")}
    head = sum(p.numel() for p in trainable if id(p) in head_ids)
    backbone = sum(p.numel() for p in trainable) - head
    return {
        "backbone_trainable": backbone,
        "head_trainable": head,
        "backbone_params": backbone_params,
        "backbone_trainable_pct": 100.0 * backbone / max(1, backbone_params),
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a used run directory unless ``overwrite``, then clear what a run writes there.

    Called with the run lock held, so a run in progress is never cleared under its feet.
    """
    used = [p for p in run_dir.iterdir() if p.name != ".lock"]
    if used and not overwrite:
        raise FileExistsError(
            f"run directory {run_dir} exists and is not empty (use --overwrite, or --resume to continue it)"
        )
    for p in used:
        if p.is_file() or p.is_symlink():
            p.unlink()
        elif p.name == "checkpoints":
            shutil.rmtree(p)


def train(cfg: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run one fine-tuning job end to end; returns the metrics written to ``metrics.json``.

    Under ``torchrun`` (see :mod:`shpeft.distributed`) every process calls this: the model is
    wrapped in DistributedDataParallel, each global batch is split across the ranks, and only
    rank 0 writes the run directory and evaluates.

    Args:
        cfg: the run's configuration.
        resume: continue the run in ``cfg.train.out`` from its newest readable checkpoint (the
            method's saved selection is reused, nothing is re-estimated). The result is
            bit-identical to an uninterrupted run on the same device and thread count.
    """
    own_group = distributed.init_from_env(cfg.train.device)
    try:
        return _train(cfg, resume=resume)
    finally:
        if own_group:
            distributed.cleanup()


def _train(cfg: RunConfig, *, resume: bool) -> dict[str, Any]:
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = distributed.device_for_rank(resolve_device(tc.device))
    method = cfg.method_obj()
    cfg.method = method.config
    torch.manual_seed(tc.seed)

    # Model first (its input spec decides how images are resized and normalised); the head is
    # replaced once the classes are known. Augmentation is applied here, per iteration, not in
    # the dataset: that keeps it reproducible across resumes and loader workers.
    model, spec = create_model(cfg.backbone, num_classes=2)
    data = load_data(
        replace(cfg.data, augment="none"),
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
    )
    # Refuse train/test leakage (exact duplicates across splits) before anything is written.
    check_leakage_cheap(data, allow_leakage=cfg.data.allow_leakage)
    classes = list(data.classes)
    torch.manual_seed(tc.seed)
    model.head = make_head(cfg.backbone.head, model.head.in_features, len(classes))
    model.num_classes = len(classes)
    model.to(device)
    base_hash = hash_backbone(model)

    run_dir = Path(tc.out)
    if resume and not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"nothing to resume: {run_dir} has no config.json")
    if not distributed.is_main():
        # DDP: only rank 0 writes the run directory. The other ranks run the same code but
        # write into a throwaway folder, and read the real one (to resume) through src_dir.
        with tempfile.TemporaryDirectory(prefix=f"shpeft-rank{distributed.rank()}-") as tmp:
            return _train_locked(
                cfg, method, model, spec, data, classes, base_hash, device, Path(tmp), resume,
                src_dir=run_dir,
            )  # fmt: skip
    fresh = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        if not resume:
            prepare_run_dir(run_dir, tc.overwrite)
        try:
            return _train_locked(
                cfg, method, model, spec, data, classes, base_hash, device, run_dir, resume
            )
        except BaseException:
            # A run that failed before writing anything resumable (e.g. a method's settings do
            # not fit the model) leaves no half-made directory behind.
            resumable = checkpoint_paths(run_dir) or (run_dir / "method_state.safetensors").exists()
            if fresh and not resume and not resumable:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def _train_locked(
    cfg, method, model, spec, data, classes, base_hash, device, run_dir, resume, src_dir=None
):
    tc = cfg.train
    src_dir = src_dir or run_dir  # where a resume reads from (differs on DDP ranks > 0)
    main, world = distributed.is_main(), distributed.world_size()
    resolved = {
        "backbone": to_dict(cfg.backbone),
        "data": to_dict(cfg.data),
        "train": to_dict(tc),
        "method": to_dict(method.config),
        "classes": classes,
        "input": to_dict(spec),
        "base_hash": base_hash,
        "environment": environment(),
    }
    state = load_latest_checkpoint(src_dir) if resume else None
    if resume:
        saved = load_run_config(src_dir)
        if saved.get("base_hash") != base_hash:
            raise ValueError(
                f"cannot resume {run_dir}: its base backbone weights differ from the loaded ones"
            )
    else:
        _write_json(run_dir / "config.json", resolved)
        _write_json(run_dir / "split.json", data.split_record)
    start = int(state["iteration"]) if state else 0
    log_path = run_dir / "train_log.jsonl"
    _truncate_log(log_path, start)

    def log_row(row: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    nw = cfg.data.num_workers
    val_loader = make_loader(data.val, tc.batch_size, num_workers=nw) if data.val else None
    test_loader = make_loader(data.test, tc.batch_size, num_workers=nw) if data.test else None

    def importance_loader():
        # One epoch of the training split in a fixed, seeded order (no augmentation).
        return make_loader(
            data.train, tc.batch_size, seed=tc.seed + 1, shuffle=True, num_workers=nw
        )

    amp = autocast_dtype(tc.precision, device)
    if tc.head_init == "linear-probe":
        # Deterministic (and cached), so a resumed run repeats it exactly before its checkpoint
        # restores the trained head.
        record = warm_start_head(
            model,
            data.train,
            data.val,
            len(classes),
            normalize=cfg.backbone.head == "l2norm",
            key_parts=_feature_key_parts(cfg, spec, data, base_hash, amp, device),
            cache_dir=tc.feature_cache or None,
            batch_size=max(tc.batch_size, 64),
            device=device,
            amp=amp,
            progress=tc.progress and main,
        )
        if not resume:
            _write_json(run_dir / "head_init.json", record)

    # The method's data-driven choices (e.g. SH-PEFT's selection) are saved once and reused on
    # resume, never re-estimated.
    method_state_path = run_dir / "method_state.safetensors"
    saved_path = src_dir / "method_state.safetensors"
    saved_state = load_file(str(saved_path)) if resume and saved_path.is_file() else None
    ctx = PrepareContext(
        importance_loader=importance_loader,
        device=device,
        run_dir=run_dir,
        progress=tc.progress and main,
        saved_state=saved_state,
    )
    n_backbone = backbone_size(model)
    t0 = time.perf_counter()
    trainable = method.prepare(model, ctx)
    prepare_s = time.perf_counter() - t0
    if saved_state is None:
        atomic_save_safetensors(method.state(model), method_state_path)
        for name, art in ctx.artifacts.items():
            _write_json(run_dir / f"{name}.json", art)
        # prepare may have settled data-driven settings (e.g. SPT's LoRA modules): record them
        resolved["method"] = to_dict(method.config)
        _write_json(run_dir / "config.json", resolved)
    counts = count_trainable(model, trainable, n_backbone)
    log.info(
        "%s: %d trainable backbone scalars (%.4f%% of %d) + %d head",
        method.name,
        counts["backbone_trainable"],
        counts["backbone_trainable_pct"],
        counts["backbone_params"],
        counts["head_trainable"],
    )

    head_ids = {id(p) for n, p in model.named_parameters() if n.startswith("head.")}
    groups = [
        {"params": [p for p in trainable if id(p) not in head_ids], "lr": tc.lr},
        {"params": [p for p in trainable if id(p) in head_ids], "lr": tc.head_lr or tc.lr},
    ]
    opt = make_optimizer(tc, [g for g in groups if g["params"]])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    best: dict[str, Any] = {"macro_f1": -1.0, "iteration": None, "val": None}
    best_state: list[torch.Tensor] | None = None
    skipped = 0
    if state is not None:
        with torch.no_grad():
            for p, v in zip(trainable, state["trainable"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        best = json.loads(state["best"])
        best_state = state["best_state"]
        skipped = int(state.get("skipped", 0))
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def checkpoint(it: int) -> None:
        save_checkpoint(
            run_dir,
            {
                "iteration": it,
                "trainable": [p.detach().cpu() for p in trainable],
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "best": json.dumps(best),
                "best_state": best_state,
                "skipped": skipped,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        )

    eval_every = tc.eval_every or max(1, tc.iterations // 10)
    ckpt_every = tc.checkpoint_every or eval_every
    sampler = IterationBatchSampler(len(data.train), tc.batch_size, tc.seed, start, tc.iterations)
    # --- DDP: one equal slice of every global batch per rank; DDP averages the gradients, which
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
    # --- end DDP
    loader = DataLoader(data.train, batch_sampler=batch_sampler, num_workers=nw)
    if main and val_loader is not None and start == 0 and tc.head_init == "linear-probe":
        # The warm start is a candidate too: the best validation state may be the linear probe.
        m = evaluate(model, val_loader, classes, device)
        log_row({"iteration": 0, "val": {k: m[k] for k in ("macro_f1", "accuracy", "auc")}})
        best = {"macro_f1": m["macro_f1"], "iteration": 0, "val": m}
        best_state = [p.detach().cpu().clone() for p in trainable]
    model.train()
    t_start, seen = time.perf_counter(), 0
    bar = tqdm(
        zip(range(start + 1, tc.iterations + 1), loader, strict=False),
        total=len(sampler),
        initial=0,
        desc=f"train {method.name}",
        disable=not (tc.progress and main),
        dynamic_ncols=True,
    )
    for it, (x, y) in bar:
        x = x.to(device, non_blocking=True)
        if world > 1:  # this rank's slice of the global batch's augmentation draws
            off = distributed.rank() * x.shape[0]
            x = augment_batch(x, cfg.data.augment, tc.seed, it, offset=off, total=sampler.bs)
        else:
            x = augment_batch(x, cfg.data.augment, tc.seed, it)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
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
                f"good checkpoint in {run_dir / 'checkpoints'} can be resumed with --resume, "
                "or rerun with --skip-nonfinite or a lower --lr"
            )
        sched.step()
        seen += x.shape[0] * world
        if it % 10 == 0 or it == tc.iterations:
            rate = seen / (time.perf_counter() - t_start)
            lr = sched.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            log_row({"iteration": it, "loss": loss.item(), "lr": lr, "img_per_s": rate})
        if main and val_loader is not None and (it % eval_every == 0 or it == tc.iterations):
            m = evaluate(model, val_loader, classes, device)
            log_row({"iteration": it, "val": {k: m[k] for k in ("macro_f1", "accuracy", "auc")}})
            if m["macro_f1"] > best["macro_f1"]:
                best = {"macro_f1": m["macro_f1"], "iteration": it, "val": m}
                best_state = [p.detach().cpu().clone() for p in trainable]
            model.train()
        if main and (it % ckpt_every == 0 or it == tc.iterations):
            checkpoint(it)
    train_s = time.perf_counter() - t_start
    if best_state is not None:  # restore the best validation state before export and test
        with torch.no_grad():
            for p, v in zip(trainable, best_state, strict=True):
                p.copy_(v)

    delta = method.delta(model)
    delta.meta.update(method.meta())
    delta.meta.update(
        {
            "base_model": cfg.backbone.model,
            "base_hash": base_hash,
            "shpeft_version": __version__,
            "classes": classes,
            "head": cfg.backbone.head,
            "image_size": spec.image_size,
            "iteration": tc.iterations if best["iteration"] is None else best["iteration"],
        }
    )
    delta_path = delta.save(run_dir / "delta.safetensors")

    metrics: dict[str, Any] = {
        "method": method.name,
        "trainable": counts,
        "iterations": tc.iterations,
        "best_iteration": best["iteration"],
        "resumed_from": start or None,
        "skipped_batches": skipped,
        "prepare_s": prepare_s,
        "train_s": train_s,
        "delta_bytes": delta_path.stat().st_size,
        "val": best.get("val"),
    }
    test_pred = None  # (labels, probs) of the test pass, saved for the report
    if main and test_loader is not None and not tc.eval_test:
        metrics["test_skipped"] = True  # read later, once, by evaluate_test() if at all
    elif main and test_loader is not None:
        test_pred = predict(model, test_loader, device, progress=False)
        metrics["test"] = compute_metrics(*test_pred, classes)
        _save_test_confusion(metrics["test"], classes, run_dir, method.name)
    metrics["peak_memory"] = peak_memory(device)
    _write_json(run_dir / "metrics.json", metrics)
    if main:  # report.html; a failure there logs a warning and never fails the run
        report_after_training(run_dir, model=model, test_data=data.test, test_pred=test_pred)
    return metrics


def _feature_key_parts(cfg: RunConfig, spec, data, base_hash: str, amp, device) -> dict[str, Any]:
    """What the linear probe's frozen features depend on (keys the feature cache)."""
    import hashlib

    ids = {s: (data.split_record["splits"].get(s) or {}).get("ids") for s in ("train", "val")}
    return {
        "base_hash": base_hash,
        "input": to_dict(spec),
        "source": data.split_record.get("source_resolved"),
        "format": data.split_record.get("format"),
        "ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "amp": str(amp),
        "device": device.type,
        "head": cfg.backbone.head,
    }


def _save_test_confusion(test: dict[str, Any], classes, run_dir: Path, name: str) -> None:
    save_confusion_matrix_png(
        test["confusion_matrix"], classes, run_dir / "confusion_matrix_test.png",
        title=f"{name}: test",
    )  # fmt: skip
    log.info("test:\n%s", format_metrics(test))


def run_split_loader(
    run_dir: str | os.PathLike,
    conf: dict[str, Any],
    spec,
    split: str,
    batch_size: int | None = None,
) -> DataLoader:
    """One split of a run's own data, exactly the ids its ``split.json`` records, in fixed order.

    Only that split is read and decoded. ``batch_size`` defaults to the run's training batch size.
    """
    record = Path(run_dir) / "split.json"
    if not record.is_file():
        raise FileNotFoundError(f"{run_dir} has no split.json: its {split} split is unknown")
    ds = load_eval_data(
        conf["data"]["data"],
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
        classes=list(conf["classes"]),
        data_format=conf["data"].get("data_format", "auto"),
        split=split,
        interpolation=spec.interpolation,
        split_record=json.loads(record.read_text()),
    )
    return make_loader(
        ds,
        batch_size or conf["train"]["batch_size"],
        seed=0,
        shuffle=False,
        num_workers=conf["data"].get("num_workers", 0),
    )


def evaluate_test(
    run_dir: str | os.PathLike, *, device: str = "cpu", batch_size: int | None = None
) -> dict[str, Any]:
    """Evaluate a finished run trained with ``eval_test=False`` on its test split, once.

    The test samples are exactly those of the run's ``split.json`` and the model is the exported
    (best-validation) state in ``delta.safetensors``, the same state ``train`` would have tested.
    ``metrics.json`` gains ``test`` (and loses ``test_skipped``); the updated metrics are returned.

    Raises:
        ValueError: the run already has test metrics (the test split is read once per run).
        FileNotFoundError: not a finished run directory.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no metrics.json)")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("test") is not None:
        raise ValueError(f"{run_dir} already has test metrics; the test split is read once")
    model, classes, spec, conf = load_run(run_dir, device=device)
    loader = run_split_loader(run_dir, conf, spec, "test", batch_size)
    test_pred = predict(model, loader, next(model.parameters()).device, progress=False)
    metrics["test"] = compute_metrics(*test_pred, classes)
    metrics.pop("test_skipped", None)
    _save_test_confusion(metrics["test"], classes, run_dir, conf["train"]["method"])
    _write_json(metrics_path, metrics)
    report_after_training(run_dir, model=model, test_data=loader.dataset, test_pred=test_pred)
    return metrics


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


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log rows after ``iteration`` (written after the checkpoint a resume starts from)."""
    if iteration == 0 or not path.is_file():
        path.write_text("")
        return
    rows = [r for r in path.read_text().splitlines() if r.strip()]
    keep = []
    for r in rows:
        try:
            if json.loads(r).get("iteration", 0) <= iteration:
                keep.append(r)
        except json.JSONDecodeError:  # a row cut by the kill
            continue
    path.write_text("".join(r + "\n" for r in keep))


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


def load_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a shpeft run directory (no config.json)")
    return json.loads(path.read_text())


def load_run(run_dir: str | os.PathLike, device: str = "cpu", delta_path: str | None = None):
    """Rebuild a trained model from a run directory: base backbone + the method's delta.

    Returns:
        ``(model, classes, input_spec, config_dict)``. For methods that only change existing
        tensors the model is a plain timm model with the delta written into its weights; methods
        that add modules (adapters, LoRA, prompts) are re-built first (see ``Method.build``).
    """
    from shpeft.delta import Delta, apply_delta

    conf = load_run_config(run_dir)
    bcfg = from_dict(BackboneConfig, conf["backbone"])
    classes = conf["classes"]
    method = method_from_config(conf)
    model, spec = create_model(bcfg, num_classes=len(classes))
    base_hash = hash_backbone(model)
    delta = Delta.load(delta_path or Path(run_dir) / "delta.safetensors")
    method.build(model)
    apply_delta(model, delta, base_hash=base_hash)
    model.to(resolve_device(device)).eval()
    return model, classes, spec, conf


def load_base_model(run_dir: str | os.PathLike) -> nn.Module:
    """The pretrained model a run started from (its backbone config; a fresh, unused head)."""
    conf = load_run_config(run_dir)
    model, _ = create_model(from_dict(BackboneConfig, conf["backbone"]), len(conf["classes"]))
    return model


def method_from_config(conf: dict[str, Any]) -> Method:
    """The run's method object, with the settings recorded in its ``config.json``."""
    cls = get_method(conf["train"]["method"])
    return cls(from_dict(cls.config_cls, conf.get("method") or {}))
