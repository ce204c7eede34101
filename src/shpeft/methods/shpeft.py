"""SH-PEFT (Liu, Xu, Liu, Zhang 2024): train the top-k% scalars ranked by hybrid importance.

The paper's selection (eq. 1, one global threshold) is the default. Options beyond the paper,
each named and off by default (``benchmarks/README.md`` has their measurements):

* ``zero_grad="skip"``: never spend k on scalars whose gradient is zero up to rounding
  (:func:`shpeft.importance.structural_zeros`; e.g. the key biases, which softmax ignores);
* ``mix="tensor" | "rank"``: put the gradient and magnitude terms on one scale per tensor or by
  rank before adding them (:func:`shpeft.importance.term_parts`);
* ``allocation="row"``: give every output neuron its best scalars first, then fill globally
  (after GPS, Zhang et al. CVPR 2024; :func:`shpeft.selection.select_per_row`);
* ``max_density``: cap the share of any one tensor that may be selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shpeft.delta import Delta
from shpeft.importance import (
    MIXES,
    STRATEGIES,
    ImportanceTerms,
    eligible_parameters,
    importance_terms,
    structural_zeros,
    term_parts,
)
from shpeft.methods.base import (
    Method,
    MethodConfig,
    PrepareContext,
    freeze_all_but_head,
    head_delta,
    register,
)
from shpeft.params import block_of, parameter_kind
from shpeft.selection import masks_to_indices, select_per_row, select_topk
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

    zero_grad: str = field(
        default="keep",
        metadata={
            "help": "keep (paper) or skip scalars whose gradient is zero up to float rounding "
            "(structurally untrainable, e.g. key biases), detected from the gradients",
            "choices": ("keep", "skip"),
        },
    )
    mix: str = field(
        default="paper",
        metadata={
            "help": "how the gradient and magnitude terms are scaled before adding: paper "
            "(eq. 1, one global s), tensor (each term over its tensor's mean), rank (global "
            "quantiles)",
            "choices": MIXES,
        },
    )
    allocation: str = field(
        default="global",
        metadata={
            "help": "global (paper: one threshold) or row (every output neuron's best scalars "
            "first, the rest by one threshold; after GPS)",
            "choices": ("global", "row"),
        },
    )
    max_density: float | None = field(
        default=None,
        metadata={"help": "at most this fraction of any one tensor may be selected (none: no cap)"},
    )

    def __post_init__(self) -> None:
        if self.zero_grad not in ("keep", "skip"):
            raise ValueError(f"zero_grad must be keep or skip, got {self.zero_grad!r}")
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
        if self.allocation not in ("global", "row"):
            raise ValueError(f"allocation must be global or row, got {self.allocation!r}")
        if self.max_density is not None and not 0 < self.max_density <= 1:
            raise ValueError(f"max_density must be in (0, 1], got {self.max_density}")
        if self.max_density is not None and self.allocation == "row":
            raise ValueError("max_density applies to allocation='global' only")
        if not (0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1] (0.01 means 1%), got {self.ratio}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.importance_batches is not None and self.importance_batches < 1:
            raise ValueError(f"importance_batches must be >= 1, got {self.importance_batches}")


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
        # ``ta`` ranks without data, but the structural-zero rule needs the gradients: estimate
        # them with l2 then (its magnitude term w^2 ranks exactly like |w|)
        ta_only = cfg.strategy.startswith("ta")
        estimate = "l2" if ta_only and cfg.zero_grad == "skip" else cfg.strategy
        terms = importance_terms(
            model,
            None if estimate.startswith("ta") else ctx.importance_loader(),
            strategy=estimate,
            num_batches=cfg.importance_batches,
            device=ctx.device,
            progress=ctx.progress,
        )
        parts = term_parts(terms, cfg.strategy, cfg.lam, cfg.mix)
        scores = {n: parts[0][n] + parts[1][n] for n in parts[0]}
        zeros = structural_zeros(terms.grad_sq) if terms.grad_sq is not None else None
        forbid = zeros if cfg.zero_grad == "skip" else None
        if cfg.allocation == "row":
            masks = select_per_row(scores, cfg.ratio, forbid=forbid)
        else:
            masks = select_topk(scores, cfg.ratio, forbid=forbid, max_density=cfg.max_density)
        indices = masks_to_indices(masks)
        ctx.artifacts["selection"] = selection_summary(model, masks, parts, zeros, terms)
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


def selection_summary(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    parts: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    zeros: dict[str, torch.Tensor] | None = None,
    terms: ImportanceTerms | None = None,
) -> dict:
    """Where k went: per tensor, per parameter kind and per block (``selection.json``).

    Each group records ``selected`` and ``size``; with the score ``parts`` also the summed
    task-dependent (``td``) and task-agnostic (``ta``) parts of its selected scalars' scores
    (their shares say which term chose them), and with ``zeros`` how many structural zeros
    (gradient zero up to rounding) it has and how many of them were selected.
    """
    sizes = {n: p.numel() for n, p in eligible_parameters(model).items()}
    per_tensor: dict[str, dict] = {}
    for n, m in masks.items():
        row: dict = {"selected": int(m.sum()), "size": sizes[n]}
        if parts is not None:
            row["td"] = float(parts[0][n][m].double().sum())
            row["ta"] = float(parts[1][n][m].double().sum())
        if zeros is not None:
            row["zero_grad"] = int(zeros[n].sum())
            row["zero_grad_selected"] = int((zeros[n] & m).sum())
        per_tensor[n] = row

    def group(key) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for n, row in per_tensor.items():
            agg = out.setdefault(key(n), {})
            for f, v in row.items():
                agg[f] = agg.get(f, 0) + v
        return out

    k = sum(v["selected"] for v in per_tensor.values())
    summary: dict = {
        "k": k,
        "eligible": sum(sizes.values()),
        "ratio": k / sum(sizes.values()),
        "per_kind": group(parameter_kind),
        "per_block": group(block_of),
        "per_tensor": per_tensor,
    }
    if parts is not None:
        td = sum(v["td"] for v in per_tensor.values())
        ta = sum(v["ta"] for v in per_tensor.values())
        summary["term_share_selected"] = {
            "td": td / (td + ta) if td + ta > 0 else None,
            "ta": ta / (td + ta) if td + ta > 0 else None,
        }
    if zeros is not None:
        summary["zero_grad"] = sum(v["zero_grad"] for v in per_tensor.values())
        summary["zero_grad_selected"] = sum(v["zero_grad_selected"] for v in per_tensor.values())
    if terms is not None:
        summary["importance_batches"] = terms.batches
    return summary
