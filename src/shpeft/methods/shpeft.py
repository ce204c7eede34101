"""SH-PEFT (Liu, Xu, Liu, Zhang 2024): train the top-k% scalars ranked by hybrid importance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shpeft.delta import Delta
from shpeft.importance import STRATEGIES, eligible_parameters, estimate_importance
from shpeft.methods.base import (
    Method,
    MethodConfig,
    PrepareContext,
    freeze_all_but_head,
    head_delta,
    register,
)
from shpeft.selection import masks_to_indices, select_topk
from shpeft.sparse import attach_sparse, merge_sparse, sparse_state


@dataclass
class ShpeftConfig(MethodConfig):
    """SH-PEFT: sparse tuning of the scalars with the highest hybrid importance."""

    ratio: float = field(
        default=0.01,
        metadata={
            "help": "fraction of backbone scalars to train, in (0, 1]: 0.01 is the paper's 1%, 0.0001 is 0.01%"
        },
    )
    strategy: str = field(
        default="l2",
        metadata={
            "help": "importance: l2 (grad^2 + lambda*s*w^2, paper default), l1 (|sum grad| + lambda*s*|w|), "
            "td-l2 / td-l1 (task-dependent only), ta (task-agnostic |w| only)",
            "choices": STRATEGIES,
        },
    )
    lam: float = field(
        default=1.0,
        metadata={
            "help": "lambda, weight of the task-agnostic term (paper: 1.0)",
            "aliases": ("--lambda",),
        },
    )
    importance_batches: int | None = field(
        default=None,
        metadata={
            "help": "B, mini-batches for the importance estimate (default: one epoch of the training split)"
        },
    )
    head_init: str = field(
        default="random",
        metadata={
            "help": "head used while estimating importance: random (fresh head, as in the paper) or "
            "probe (fit the head alone first, for --probe-iterations)",
            "choices": ("random", "probe"),
        },
    )
    probe_iterations: int = field(
        default=200,
        metadata={
            "help": "head-only iterations before estimating importance with --head-init probe"
        },
    )

    def __post_init__(self) -> None:
        if not (0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1] (0.01 means 1%), got {self.ratio}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.importance_batches is not None and self.importance_batches < 1:
            raise ValueError(f"importance_batches must be >= 1, got {self.importance_batches}")
        if self.head_init not in ("random", "probe"):
            raise ValueError(f"head_init must be random or probe, got {self.head_init!r}")


@register
class Shpeft(Method):
    """Estimate importance once, select the global top-k scalars, train only those and the head."""

    name = "shpeft"
    summary = "SH-PEFT: top-k% scalars by hybrid (gradient + magnitude) importance, head"
    config_cls = ShpeftConfig
    config: ShpeftConfig

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        cfg = self.config
        if ctx.saved_state is not None:  # resuming: the selection is fixed once made
            # safetensors sorts keys: restore named_parameters() order (the optimizer's order)
            saved = ctx.saved_state
            indices = {n: saved[n].long() for n, _ in model.named_parameters() if n in saved}
            head = freeze_all_but_head(model)
            return attach_sparse(model, indices) + head
        if ctx.importance_loader is None:
            raise ValueError("SH-PEFT needs training data to estimate importance")
        if cfg.head_init == "probe":
            if ctx.fit_head is None:
                raise ValueError("head_init='probe' needs a head-fitting callback")
            ctx.fit_head(cfg.probe_iterations)
        scores = estimate_importance(
            model,
            ctx.importance_loader(),
            strategy=cfg.strategy,
            lam=cfg.lam,
            num_batches=cfg.importance_batches,
            device=ctx.device,
            progress=ctx.progress,
        )
        masks = select_topk(scores, cfg.ratio)
        indices = masks_to_indices(masks)
        ctx.artifacts["selection"] = selection_summary(model, masks)
        head = freeze_all_but_head(model)
        values = attach_sparse(model, indices)
        return values + head

    def delta(self, model: nn.Module) -> Delta:
        sparse = {n: (i.to(torch.int32), v) for n, (i, v) in sparse_state(model).items()}
        return Delta(sparse=sparse, dense=head_delta(model))

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_sparse(model)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The selected flat indices per tensor (int64)."""
        return {n: i.clone() for n, (i, _) in sparse_state(model).items()}


def selection_summary(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """Selected counts per tensor and per parameter kind (for the run directory and analyses)."""
    sizes = {n: p.numel() for n, p in eligible_parameters(model).items()}
    per_tensor = {n: {"selected": int(m.sum()), "size": sizes[n]} for n, m in masks.items()}
    per_kind: dict[str, dict[str, int]] = {}
    for n, v in per_tensor.items():
        kind = parameter_kind(n)
        agg = per_kind.setdefault(kind, {"selected": 0, "size": 0})
        agg["selected"] += v["selected"]
        agg["size"] += v["size"]
    total = sum(sizes.values())
    k = sum(v["selected"] for v in per_tensor.values())
    return {
        "k": k,
        "eligible": total,
        "ratio": k / total,
        "per_kind": per_kind,
        "per_tensor": per_tensor,
    }


def parameter_kind(name: str) -> str:
    """Coarse type of a timm ViT parameter: qkv, proj, fc1, fc2, norm, bias, embedding, ..."""
    leaf = name.rsplit(".", 1)[-1]
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed"):
        return "embedding"
    if "norm" in name:
        return "norm"
    if leaf == "bias":
        return "bias"
    for key in ("qkv", "proj", "fc1", "fc2"):
        if f".{key}." in f".{name}":
            return key
    return "other"
