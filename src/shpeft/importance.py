"""Weight importance of SH-PEFT (Liu, Xu, Liu, Zhang 2024, eq. 1).

    I = I_td + lambda * s * I_ta,    s = sum(I_td) / sum(I_ta)

where the sums run over *all* eligible scalars of the backbone. The task-dependent part is
estimated from gradients of the mean cross-entropy at the pretrained weights over B mini-batches;
the task-agnostic part from the weights themselves:

| strategy | I_td                      | I_ta   | lambda        |
|----------|---------------------------|--------|---------------|
| ``l2``   | sum_b (dE_b/dw)^2         | w^2    | ``lam``       |
| ``l1``   | abs(sum_b dE_b/dw)        | abs(w) | ``lam``       |
| ``td-l2``| sum_b (dE_b/dw)^2         | -      | 0             |
| ``td-l1``| abs(sum_b dE_b/dw)        | -      | 0             |
| ``ta``   | -                         | abs(w) | ranks by I_ta |

``ta-l1`` and ``ta-l2`` are accepted as aliases of ``ta``: abs(w) and w^2 rank identically.
The squared-gradient sensitivity follows SPT (He et al., ICCV 2023); the magnitude term follows
magnitude pruning (Han et al. 2015). See ``../shared/paper/METHOD.md`` for the settled open points.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from shpeft import distributed

log = logging.getLogger(__name__)

STRATEGIES = ("l2", "l1", "td-l2", "td-l1", "ta", "ta-l1", "ta-l2")


def is_excluded(name: str, exclude: Sequence[str]) -> bool:
    """True when ``name`` is one of ``exclude`` or lies under one of them (``head`` -> ``head.weight``)."""
    return any(name == e or name.startswith(e + ".") for e in exclude)


def eligible_parameters(
    model: nn.Module, exclude: Sequence[str] = ("head",)
) -> dict[str, nn.Parameter]:
    """Every backbone parameter, in ``named_parameters()`` order, minus ``exclude`` prefixes."""
    return {n: p for n, p in model.named_parameters() if not is_excluded(n, exclude)}


def _norm(strategy: str) -> str:
    strategy = strategy.lower()
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown importance strategy {strategy!r}; choose from {', '.join(STRATEGIES)}"
        )
    return "ta" if strategy.startswith("ta") else strategy


@torch.no_grad()
def _add_round_(acc: list[Tensor], mine: list[Tensor] | None) -> None:
    # Under torchrun, rank r scores batches r, r+W, ... (one per rank and "round"). Gather the
    # round's per-batch contributions and add them in batch order on every rank: the same
    # additions in the same order as one process, so the accumulators (and the selected mask)
    # are bit-identical to a single-process run. A sum all-reduce would round differently.
    for contrib in distributed.gather_in_order(mine if mine is not None else acc, mine is not None):
        if contrib is not None:
            for a, c in zip(acc, contrib, strict=True):
                a.add_(c)


def estimate_importance(
    model: nn.Module,
    loader: Iterable,
    *,
    strategy: str = "l2",
    lam: float = 1.0,
    num_batches: int | None = None,
    exclude: Sequence[str] = ("head",),
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Score every eligible scalar of ``model`` (paper eq. 1).

    Args:
        model: maps images to logits; evaluated in ``eval()`` mode (no dropout / drop-path), its
            weights and ``.grad`` fields are left untouched.
        loader: yields ``(images, labels)``; its order is the caller's (seed it for determinism).
        strategy: one of ``l2`` (default), ``l1``, ``td-l2``, ``td-l1``, ``ta`` (see module doc).
        lam: weight of the task-agnostic term after rescaling by ``s``; ignored by td/ta strategies.
        num_batches: B, the number of mini-batches; ``None`` uses the whole loader (one epoch).
        exclude: parameter-name prefixes that are never ranked (the new head).
        device: where to run; defaults to the device of the model's first parameter.
        progress: show a progress bar.

    Returns:
        ``{name: float32 tensor shaped like the parameter}`` for every eligible parameter, keyed
        and ordered like ``model.named_parameters()`` (excluded names are absent), on the CPU.
    """
    strategy = _norm(strategy)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    params = eligible_parameters(model, exclude)
    if not params:
        raise ValueError("no eligible parameters: every parameter matched `exclude`")
    if device is None:
        device = next(iter(params.values())).device
    device = torch.device(device)

    # Task-agnostic scores need no data at all.
    ta = {n: p.detach().to(device=device, dtype=torch.float32).abs() for n, p in params.items()}
    if strategy == "ta":
        return {n: t.cpu() for n, t in ta.items()}
    if strategy.endswith("l2"):
        ta = {n: t.square_() for n, t in ta.items()}

    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    names, tensors = list(params), list(params.values())
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    seen = 0
    world, me = distributed.world_size(), distributed.rank()
    mine: list[Tensor] | None = None  # this rank's contribution to the current round
    try:
        batches = itertools.islice(loader, num_batches) if num_batches else loader
        total = num_batches or (len(loader) if hasattr(loader, "__len__") else None)
        bar = tqdm(batches, total=total, desc="importance", disable=not progress)
        for images, labels in bar:
            if world > 1 and seen % world != me:  # another rank's batch
                seen += 1
                if seen % world == 0:
                    _add_round_(list(acc.values()), mine)
                    mine = None
                continue
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, enabled=False):  # importance is float32 by spec
                loss = F.cross_entropy(model(images.float()), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} in importance batch {seen}"
                )
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            if world > 1:
                # zeros for unused tensors: adding +0 to the accumulators changes no bit
                mine = [
                    torch.zeros_like(acc[n])
                    if g is None
                    else (g.float().square() if strategy.endswith("l2") else g.float())
                    for n, g in zip(names, grads, strict=True)
                ]
                seen += 1
                if seen % world == 0:
                    _add_round_(list(acc.values()), mine)
                    mine = None
                continue
            for n, g in zip(names, grads, strict=True):
                if g is None:  # unused by the forward (e.g. a pooled-away token): zero evidence
                    continue
                g = g.float()
                acc[n].add_(g.square() if strategy.endswith("l2") else g)
            seen += 1
        if world > 1 and seen % world:  # the last, partial round
            _add_round_(list(acc.values()), mine)
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    if seen == 0:
        raise ValueError("the importance loader yielded no batches")

    td = acc if strategy.endswith("l2") else {n: a.abs_() for n, a in acc.items()}
    if strategy.startswith("td"):
        return {n: t.cpu() for n, t in td.items()}
    scale = importance_scale(td, ta)
    if scale == 0.0:
        log.warning("all task-dependent scores are zero (zero gradients): ranking by |w| alone")
        scale, lam = 1.0, 1.0
    return {n: (td[n] + (lam * scale) * ta[n]).cpu() for n in names}


def importance_scale(td: dict[str, Tensor], ta: dict[str, Tensor]) -> float:
    """The paper's s = sum(I_td) / sum(I_ta) over all eligible scalars (0 when either is 0)."""
    # float64 sums: ViT-B has 86M terms, a float32 running sum would lose digits.
    sum_td = sum(t.double().sum() for t in td.values())
    sum_ta = sum(t.double().sum() for t in ta.values())
    return float(sum_td / sum_ta) if sum_ta > 0 else 0.0
