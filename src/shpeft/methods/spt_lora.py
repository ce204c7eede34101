"""SPT-LoRA (He, Zhang, Zhang, Zhuang, "Sensitivity-Aware Visual Parameter-Efficient
Fine-Tuning", ICCV 2023; code: github.com/ziplab/SPT).

SPT spends a parameter budget where the task needs it, mixing unstructured and structured tuning:

1. **Sensitivity.** The score of a weight is its squared gradient of the task loss at the
   pretrained weights, accumulated over a few mini-batches (shpeft's ``td-l2`` importance). We
   rank the weight *matrices* of the backbone's Linear layers only (every ``nn.Linear`` outside
   the head: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of a timm ViT), the ones SPT
   may tune structurally.
2. **Top-tau selection.** The tau most sensitive scalars over all those matrices are selected
   with :func:`shpeft.selection.select_topk` (one global threshold, ties broken by lowest index).
3. **Structured where it pays.** A matrix ``W`` (``d_out x d_in``) whose number of selected
   scalars reaches ``sigma = r * (d_in + d_out) / alpha`` is tuned with a rank-r LoRA (peft, as
   in ``lora``) instead: SPT's rule (``grad_sum >= lora_params / alpha`` in its ``engine.py``)
   with SPT's default ``alpha = 10`` (``--alpha``, used by all its released VTAB configs); with
   ``alpha = 1`` a matrix goes LoRA only once its sensitive scalars outnumber LoRA's own.
4. **Unstructured elsewhere.** The selected scalars of the other matrices are tuned in place
   (:func:`shpeft.sparse.attach_sparse`), as SH-PEFT does.

Budget accounting (SPT's: a structured matrix costs its LoRA parameters, not its selected count).
The budget is ``B = round(spt_budget * N)`` scalars with ``N`` *all* backbone scalars (the same
basis as shpeft's ``ratio``, so equal budgets are comparable). For a tau, the cost is

    cost(tau) = sum over LoRA matrices of r * (d_in + d_out) + number of selected scalars
                in the other (sparse) matrices,

and tau is the one with the largest cost not above ``B`` (the smallest such tau on ties). SPT
sweeps tau on a 20k grid and keeps the cost closest to the target on either side; here every tau
is evaluated exactly (one sort) and the budget is a hard cap, so ``spt-lora`` never trains more
backbone scalars than ``shpeft`` at the same fraction. The head is always trained and not counted.

Other differences from SPT's code, all forced by or chosen for this library: timm's fused
``qkv`` matrix is ranked and adapted as one matrix (SPT splits q, k, v); biases, LayerNorms
and the class token are neither ranked nor tuned (SPT's code also ranks the bias / norm vectors,
tunes them sparsely or, with ``--structured_vector``, whole, and always tunes the class token);
sensitivity uses ``eval()`` mode (no dropout / drop-path; SPT's uses ``train()``) over
``spt_batches`` batches (default one epoch; SPT: 8-16); the LoRA branch has no drop-path and its
scaling is ``spt_lora_alpha / spt_lora_rank`` (default 1, as SPT's unscaled LoRA).

The chosen LoRA modules are written into ``config.spt_lora_modules`` by ``prepare`` so that
``build`` can re-create the LoRA structure from the run's saved config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shpeft.delta import Delta
from shpeft.importance import eligible_parameters, estimate_importance
from shpeft.methods.base import (
    Method,
    PrepareContext,
    freeze_all_but_head,
    head_delta,
    head_parameters,
    register,
)
from shpeft.methods.configs import SptLoraConfig
from shpeft.methods.lora import inject_lora, lora_delta, merge_lora
from shpeft.selection import masks_to_indices, num_selected, select_topk
from shpeft.sparse import attach_sparse, merge_sparse, sparse_state


def linear_weights(model: nn.Module, head: str = "head") -> dict[str, nn.Linear]:
    """``{weight name: Linear}`` for every backbone ``nn.Linear`` (the matrices SPT ranks)."""
    return {
        f"{n}.weight": m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != head and not n.startswith(head + ".")
    }


def lora_cost(linear: nn.Linear, rank: int) -> int:
    """Scalars of a rank-r LoRA on ``linear``: A is r x d_in, B is d_out x r."""
    return rank * (linear.in_features + linear.out_features)


@dataclass
class SptPlan:
    """What SPT-LoRA trains for a given sensitivity and budget."""

    k: int
    """tau: the number of top-sensitivity scalars selected."""
    lora: list[str]
    """Weight names of the matrices tuned with LoRA (model order)."""
    sparse: dict[str, Tensor]
    """``{weight name: sorted int64 flat indices}`` of the unstructured part."""
    selected: dict[str, int]
    """Selected scalars per ranked matrix (before the LoRA decision)."""
    lora_params: int
    sparse_params: int
    budget: int

    @property
    def total(self) -> int:
        return self.lora_params + self.sparse_params

    def summary(self) -> dict:
        """JSON-serialisable record for the run directory."""
        return {
            "budget": self.budget,
            "k": self.k,
            "trainable": self.total,
            "lora_params": self.lora_params,
            "sparse_params": self.sparse_params,
            "lora_modules": [w.removesuffix(".weight") for w in self.lora],
            "selected": self.selected,
        }


def goes_lora(selected: int, cost: int, structured_alpha: float) -> bool:
    """SPT's rule: structured (LoRA) tuning once the selected count reaches cost / alpha."""
    return selected >= cost / structured_alpha


@torch.no_grad()
def plan_spt(
    scores: dict[str, Tensor],
    costs: dict[str, int],
    budget: int,
    structured_alpha: float,
    device: torch.device | str = "cpu",
) -> SptPlan:
    """Choose tau and the LoRA / sparse split (see the module docstring for the rule).

    Every tau is evaluated at once: one stable sort of all scores gives the selection order, and
    a cumulative sum of per-scalar cost increments gives the cost of every top-tau selection.

    Args:
        scores: ``{weight name: sensitivity}`` of the ranked matrices, in model order.
        costs: ``{weight name: LoRA parameters}`` for the same names.
        budget: the maximum number of trainable backbone scalars.
        structured_alpha: SPT's alpha.
        device: where to sort (ViT-B/16: 85M scores, ~40 s on two CPU cores, well under a
            second on a GPU; ~3.5 GB of scratch memory).
    """
    if not scores:
        raise ValueError("SPT-LoRA found no Linear weight matrix to rank in this model")
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    device = torch.device(device)
    flat = torch.cat([scores[n].detach().reshape(-1).float().to(device) for n in names])
    n_total = flat.numel()
    # Global order of selection: by score descending, ties by lowest global index (a stable sort
    # of the concatenation), which is exactly select_topk's order, so top-k of it is its mask.
    order = torch.sort(flat, descending=True, stable=True).indices
    del flat
    owner = torch.repeat_interleave(
        torch.arange(len(names), dtype=torch.int32, device=device),
        torch.tensor(sizes, device=device),
    )
    owner_sorted = owner[order]
    del order, owner
    # by_matrix: positions in the selection order, grouped by matrix (stable: ascending within
    # each group), so group m's (s-1)-th entry is where matrix m gets its s-th selected scalar.
    by_matrix = torch.argsort(owner_sorted, stable=True)
    del owner_sorted
    # inc[j]: how the cost changes when the j-th scalar of the order is added. By default +1
    # (a sparse scalar); the scalar that makes its matrix reach the threshold s adds the LoRA
    # cost minus the s - 1 sparse scalars it replaces; later ones in that matrix add nothing.
    inc = torch.ones(n_total, dtype=torch.int32, device=device)
    start = 0
    for m, name in enumerate(names):
        s = max(1, math.ceil(costs[name] / structured_alpha))  # first count with goes_lora()
        if s <= sizes[m]:  # else this matrix can never reach the threshold
            pos = by_matrix[start : start + sizes[m]]
            inc[pos[s - 1]] = costs[name] - (s - 1)
            inc[pos[s:]] = 0
        start += sizes[m]
    del by_matrix
    cost = torch.cumsum(inc, 0, dtype=torch.int64)  # cost[k - 1]: what the top-k trains
    del inc
    if not bool((cost <= budget).any()):
        raise ValueError(
            f"SPT-LoRA budget of {budget} scalars is too small: the most sensitive scalar already "
            f"sends its matrix to a LoRA costing {int(cost[0])}; raise spt_budget, or lower "
            "spt_lora_rank or spt_structured_alpha"
        )
    # the largest cost within budget; argmax returns the first maximum, i.e. the smallest tau
    k = int(torch.argmax(cost.masked_fill_(cost > budget, -1))) + 1
    planned = int(cost[k - 1])
    del cost

    masks = select_topk(scores, k / n_total)  # the same top-k, through the shared machinery
    selected = {n: int(masks[n].sum()) for n in names}
    if sum(selected.values()) != k:
        raise AssertionError(f"select_topk kept {sum(selected.values())} scalars, planned {k}")
    lora = [n for n in names if goes_lora(selected[n], costs[n], structured_alpha)]
    sparse = masks_to_indices({n: masks[n] for n in names if n not in lora})
    plan = SptPlan(
        k=k,
        lora=lora,
        sparse=sparse,
        selected=selected,
        lora_params=sum(costs[n] for n in lora),
        sparse_params=sum(int(i.numel()) for i in sparse.values()),
        budget=budget,
    )
    if plan.total != planned:
        raise AssertionError(f"SPT-LoRA plan trains {plan.total} scalars, expected {planned}")
    return plan


# state() key marking a LoRA module (parameter names never contain "/")
STATE_LORA_PREFIX = "lora/"


@register
class SptLora(Method):
    """Sensitivity-aware mix of peft LoRA (on the most sensitive matrices) and sparse scalars.

    ``prepare`` estimates the sensitivity, plans the split (:func:`plan_spt`), records the LoRA
    modules in ``config.spt_lora_modules``, injects LoRA and attaches the sparse values. The
    delta holds the sparse part (indices + values), the LoRA factors (dense) and the head.
    """

    name = "spt-lora"
    config: SptLoraConfig

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        if ctx.saved_state is not None:  # resuming: the split is fixed once made
            modules, sparse = self._from_state(model, ctx.saved_state)
        else:
            modules, sparse = self._plan(model, ctx)
        preset = self.config.lora_module_list()
        if preset and preset != modules:
            raise ValueError(
                f"spt_lora_modules is chosen from the data by training (leave it empty); it was "
                f"set to {preset}, but the sensitivity chose {modules}"
            )
        # build() reads this back from the run's saved config to re-create the LoRA layers
        self.config.spt_lora_modules = ",".join(modules)

        freeze_all_but_head(model)
        lora = self._inject(model)
        values = attach_sparse(model, sparse)
        head = list(head_parameters(model).values())
        for p in head:  # peft's injection froze the head along with the backbone
            p.requires_grad_(True)
        return lora + values + head

    def _plan(self, model: nn.Module, ctx: PrepareContext) -> tuple[list[str], dict[str, Tensor]]:
        cfg = self.config
        if ctx.importance_loader is None:
            raise ValueError("SPT-LoRA needs training data to estimate the sensitivity")
        linears = linear_weights(model)
        if not linears:
            raise ValueError("SPT-LoRA found no Linear weight matrix to rank in this model")
        # only the matrices are ranked: excluding everything else also spares their gradients
        exclude = [n for n, _ in model.named_parameters() if n not in linears]
        scores = estimate_importance(
            model,
            ctx.importance_loader(),
            strategy="td-l2",
            num_batches=cfg.spt_batches,
            exclude=exclude,
            device=ctx.device,
            progress=ctx.progress,
        )
        costs = {n: lora_cost(m, cfg.spt_lora_rank) for n, m in linears.items()}
        budget = num_selected(
            cfg.spt_budget, sum(p.numel() for p in eligible_parameters(model).values())
        )
        plan = plan_spt(scores, costs, budget, cfg.spt_structured_alpha, device=ctx.device)
        ctx.artifacts["selection"] = plan.summary()
        return [w.removesuffix(".weight") for w in plan.lora], plan.sparse

    @staticmethod
    def _from_state(
        model: nn.Module, saved: dict[str, Tensor]
    ) -> tuple[list[str], dict[str, Tensor]]:
        # safetensors sorts keys: restore model order (the optimizer's parameter order)
        modules = [n for n, _ in model.named_modules() if STATE_LORA_PREFIX + n in saved]
        sparse = {n: saved[n].long() for n, _ in model.named_parameters() if n in saved}
        return modules, sparse

    def state(self, model: nn.Module) -> dict[str, Tensor]:
        """The sparse indices per weight (int64) and one marker per LoRA module."""
        out = {n: i.clone() for n, (i, _) in sparse_state(model).items()}
        for m in self.config.lora_module_list():
            out[STATE_LORA_PREFIX + m] = torch.tensor([self.config.spt_lora_rank])
        return out

    def _inject(self, model: nn.Module) -> list[nn.Parameter]:
        cfg = self.config
        modules = cfg.lora_module_list()
        if not modules:
            return []
        return inject_lora(model, modules, cfg.spt_lora_rank, cfg.spt_lora_alpha)

    def delta(self, model: nn.Module) -> Delta:
        sparse = {n: (i.to(torch.int32), v) for n, (i, v) in sparse_state(model).items()}
        return Delta(sparse=sparse, dense=lora_delta(model) | head_delta(model))

    def build(self, model: nn.Module) -> None:
        self._inject(model)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_lora(merge_sparse(model))
