"""SH-PEFT (Liu, Xu, Liu, Zhang 2024): train the top-k% scalars ranked by hybrid importance.

The paper's selection (eq. 1, one global threshold) is the default. Options beyond the paper,
each named and off by default (``benchmarks/README.md`` has their measurements):

* ``zero_grad="skip"``: never spend k on scalars whose gradient is zero up to rounding
  (:func:`shpeft.importance.structural_zeros`; e.g. the key biases, which softmax ignores);
* ``mix="tensor" | "rank"``: put the gradient and magnitude terms on one scale per tensor or by
  rank before adding them (:func:`shpeft.importance.term_parts`);
* ``allocation="row"``: give every output neuron its best scalars first, then fill globally
  (after GPS, Zhang et al. CVPR 2024; :func:`shpeft.selection.select_per_row`);
* ``density_cap``: no tensor denser than this multiple of the overall ratio;
* ``step_scale="rms"``: each selected tensor's lr scaled by its pretrained RMS (relative steps,
  after the trust ratios of LARS/LAMB, You et al. 2017/2019, fixed at the pretrained weights);
* ``importance_augment="train"``: estimate importance on the run's augmented training batches,
  the data the selected scalars are then trained on.
"""

from __future__ import annotations

import torch
from torch import nn

from shpeft.delta import Delta
from shpeft.importance import (
    ImportanceTerms,
    eligible_parameters,
    importance_terms,
    structural_zeros,
    term_parts,
)
from shpeft.methods.base import (
    Method,
    PrepareContext,
    freeze_all_but_head,
    head_delta,
    register,
)
from shpeft.methods.configs import ShpeftConfig
from shpeft.params import block_of, parameter_kind
from shpeft.selection import masks_to_indices, select_per_row, select_topk
from shpeft.sparse import attach_sparse, iter_sparse, merge_sparse, sparse_state


@register
class Shpeft(Method):
    """Estimate importance once, select the global top-k scalars, train only those and the head."""

    name = "shpeft"
    config: ShpeftConfig

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        cfg = self.config
        self._rms = tensor_rms_scales(model) if cfg.step_scale == "rms" else {}
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
        loader = None if estimate.startswith("ta") else ctx.importance_loader()
        if loader is not None and cfg.importance_augment == "train":
            if ctx.importance_augment is None:
                raise ValueError("importance_augment='train' needs the run's augmentation")
            loader = Augmented(loader, ctx.importance_augment)
        terms = importance_terms(
            model,
            loader,
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
            cap = None if cfg.density_cap is None else min(1.0, cfg.density_cap * cfg.ratio)
            masks = select_topk(scores, cfg.ratio, forbid=forbid, max_density=cap)
        indices = masks_to_indices(masks)
        ctx.artifacts["selection"] = selection_summary(model, masks, parts, zeros, terms)
        head = freeze_all_but_head(model)
        values = attach_sparse(model, indices)
        return values + head

    def lr_scales(self, model: nn.Module) -> dict[int, float]:
        rms = getattr(self, "_rms", {})
        return {id(u.values): rms[n] for n, u in iter_sparse(model) if n in rms}

    def delta(self, model: nn.Module) -> Delta:
        sparse = {n: (i.to(torch.int32), v) for n, (i, v) in sparse_state(model).items()}
        return Delta(sparse=sparse, dense=head_delta(model))

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_sparse(model)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The selected flat indices per tensor (int64)."""
        return {n: i.clone() for n, (i, _) in sparse_state(model).items()}


class Augmented:
    """``loader`` with ``augment(images, i)`` applied to its ``i``-th batch (length kept)."""

    def __init__(self, loader, augment) -> None:
        self.loader, self.augment = loader, augment

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, (images, labels) in enumerate(self.loader):
            yield self.augment(images, i), labels


@torch.no_grad()
def tensor_rms_scales(model: nn.Module, floor: float = 0.1) -> dict[str, float]:
    """Per eligible tensor: its RMS over the RMS of all the backbone's weight matrices
    (at least ``floor``), from the weights as they are now (the pretrained ones, before
    training); the lr multipliers of ``step_scale="rms"``."""
    params = eligible_parameters(model)
    mats = [p.detach().double() for p in params.values() if p.dim() >= 2 and p.shape[0] > 1]
    ref = torch.sqrt(sum(m.square().sum() for m in mats) / sum(m.numel() for m in mats))
    return {
        n: max(floor, float(p.detach().double().square().mean().sqrt() / ref))
        for n, p in params.items()
    }


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
