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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shpeft import distributed
from shpeft.methods.configs import MIXES, STRATEGIES
from shpeft.params import under
from shpeft.progress import progress_bar

log = logging.getLogger(__name__)


def is_excluded(name: str, exclude: Sequence[str]) -> bool:
    """True when ``name`` is one of ``exclude`` or lies under one of them (``head`` -> ``head.weight``)."""
    return any(under(name, e) for e in exclude)


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


@dataclass
class ImportanceTerms:
    """The two ingredients of eq. 1, per eligible scalar, before they are mixed.

    Attributes:
        td: task-dependent term: ``sum_b g^2`` (L2) or ``|sum_b g|`` (L1); None for ``ta``.
        ta: task-agnostic term: ``w^2`` (L2) or ``|w|`` (L1, ``ta``).
        grad_sq: ``sum_b g^2`` (the L2 ``td``; accumulated beside L1 too): the evidence for the
            structural-zero test (:func:`structural_zeros`). None for ``ta``.
        batches: B, the number of mini-batches the gradients were summed over.
    """

    td: dict[str, Tensor] | None
    ta: dict[str, Tensor]
    grad_sq: dict[str, Tensor] | None
    batches: int


def importance_terms(
    model: nn.Module,
    loader: Iterable | None,
    *,
    strategy: str = "l2",
    num_batches: int | None = None,
    exclude: Sequence[str] = ("head",),
    device: torch.device | str | None = None,
    progress: bool = False,
) -> ImportanceTerms:
    """Accumulate the gradient statistics and the magnitude term of ``strategy`` (see module doc).

    Gradients are of the mean cross-entropy at the current weights, in float32, in ``eval()``
    mode, over ``num_batches`` batches of ``loader`` (all of it when None); the model's weights,
    ``.grad`` fields, ``requires_grad`` flags and train/eval mode are left as they were.
    """
    strategy = _norm(strategy)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    params = eligible_parameters(model, exclude)
    if not params:
        raise ValueError("no eligible parameters: every parameter matched `exclude`")
    if device is None:
        device = next(iter(params.values())).device
    device = torch.device(device)
    l2 = strategy.endswith("l2")

    # Task-agnostic scores need no data at all.
    ta = {n: p.detach().to(device=device, dtype=torch.float32).abs() for n, p in params.items()}
    if l2:
        ta = {n: t.square_() for n, t in ta.items()}
    if strategy == "ta":
        return ImportanceTerms(None, {n: t.cpu() for n, t in ta.items()}, None, 0)
    if loader is None:
        raise ValueError(f"strategy {strategy!r} needs data (a loader) for its gradient term")

    names, tensors = list(params), list(params.values())
    # accumulators: sum g^2 (L2) or sum g (L1), and for L1 also sum g^2 (structural zeros)
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in tensors]
    acc_sq = [] if l2 else [torch.zeros_like(a) for a in acc]
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
        bar = progress_bar(batches, total=total, desc="importance", enabled=progress)
        for images, labels in bar:
            if world > 1 and seen % world != me:  # another rank's batch
                seen += 1
                if seen % world == 0:
                    _add_round_(acc + acc_sq, mine)
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
            # unused by the forward (e.g. a pooled-away token): zero evidence; adding +0 to the
            # accumulators changes no bit
            gs = [
                torch.zeros_like(a) if g is None else g.float()
                for a, g in zip(acc, grads, strict=True)
            ]
            contrib = [g.square() for g in gs] if l2 else gs + [g.square() for g in gs]
            if world > 1:
                mine = contrib
                seen += 1
                if seen % world == 0:
                    _add_round_(acc + acc_sq, mine)
                    mine = None
                continue
            for a, c in zip(acc + acc_sq, contrib, strict=True):
                a.add_(c)
            seen += 1
        if world > 1 and seen % world:  # the last, partial round
            _add_round_(acc + acc_sq, mine)
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    if seen == 0:
        raise ValueError("the importance loader yielded no batches")
    td = {n: (a if l2 else a.abs_()).cpu() for n, a in zip(names, acc, strict=True)}
    grad_sq = td if l2 else {n: a.cpu() for n, a in zip(names, acc_sq, strict=True)}
    return ImportanceTerms(td, {n: t.cpu() for n, t in ta.items()}, grad_sq, seen)


def term_parts(
    terms: ImportanceTerms, strategy: str = "l2", lam: float = 1.0, mix: str = "paper"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The two summands of each scalar's score, ``(task-dependent part, task-agnostic part)``.

    * ``paper`` (eq. 1): ``td`` and ``lam * s * ta`` with ``s = sum(td) / sum(ta)`` over all
      eligible scalars;
    * ``tensor``: each term divided by its mean over the scalar's own tensor, the second times
      ``lam``: every tensor's scores average ``1 + lam``, so no tensor (a large-gradient patch
      embedding, large-magnitude LayerNorm scales) dominates by scale alone;
    * ``rank``: each term replaced by its global quantile in [0, 1] (ties share the lower
      quantile), the second times ``lam``: the mix depends on the orders only.

    ``td-*`` strategies have a zero task-agnostic part and ``ta`` a zero task-dependent part;
    their one term is scaled the same way (``tensor``: per tensor; ``rank``: by quantile, which
    orders like the raw term).
    """
    strategy = _norm(strategy)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    ta = terms.ta
    if strategy == "ta":
        return {n: torch.zeros_like(t) for n, t in ta.items()}, _scaled(ta, mix)
    td = terms.td
    assert td is not None
    if strategy.startswith("td"):
        return _scaled(td, mix), {n: torch.zeros_like(t) for n, t in td.items()}
    if mix == "tensor":
        return {n: _by_mean(td[n]) for n in td}, {n: lam * _by_mean(ta[n]) for n in td}
    if mix == "rank":
        q_td, q_ta = _quantiles(td), _quantiles(ta)
        return q_td, {n: lam * q_ta[n] for n in td}
    scale = importance_scale(td, ta)
    if scale == 0.0:
        log.warning("all task-dependent scores are zero (zero gradients): ranking by |w| alone")
        scale, lam = 1.0, 1.0
    return dict(td), {n: (lam * scale) * ta[n] for n in td}


def combine_terms(
    terms: ImportanceTerms, strategy: str = "l2", lam: float = 1.0, mix: str = "paper"
) -> dict[str, Tensor]:
    """One score per scalar: the sum of the two :func:`term_parts` (``paper``: eq. 1)."""
    a, b = term_parts(terms, strategy, lam, mix)
    return {n: a[n] + b[n] for n in a}


def _scaled(term: dict[str, Tensor], mix: str) -> dict[str, Tensor]:
    """One term alone, scaled as ``mix`` scales each term (``paper``: as it is)."""
    if mix == "tensor":
        return {n: _by_mean(t) for n, t in term.items()}
    if mix == "rank":
        return _quantiles(term)
    return dict(term)


def _by_mean(t: Tensor) -> Tensor:
    m = t.double().mean()
    return (t / m).float() if m > 0 else torch.zeros_like(t)


def _quantiles(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Global quantile in [0, 1] of every scalar (rank / (N - 1)); equal values share one."""
    flat = torch.cat([t.reshape(-1) for t in terms.values()])
    uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    # the quantile of a value is the share of scalars strictly below it
    below = torch.cumsum(torch.bincount(inverse, minlength=len(uniq)), 0) - torch.bincount(
        inverse, minlength=len(uniq)
    )
    q = (below.double() / max(1, flat.numel() - 1)).float()[inverse]
    out, offset = {}, 0
    for n, t in terms.items():
        out[n] = q[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
    return out


#: float32 machine epsilon: rounding noise of a sum of float32 terms is a small multiple of it.
EPS32 = float(torch.finfo(torch.float32).eps)
#: A scalar whose root-sum-square gradient is below ``ZERO_RTOL`` x the root-mean-square of its
#: tensor's is "zero up to rounding" (64 eps, about 7.6e-6).
ZERO_RTOL = 64 * EPS32


def structural_zeros(grad_sq: dict[str, Tensor], rtol: float = ZERO_RTOL) -> dict[str, Tensor]:
    """``{name: bool mask}`` of scalars whose gradient is zero up to float rounding.

    A gradient that is zero in exact arithmetic (the key part of every ``qkv.bias``: a constant
    added to all keys shifts each query's attention logits by one constant, which softmax
    ignores; any parameter the forward does not use) comes out of float32 arithmetic as rounding
    noise, about eps (1.2e-7) times the size of the terms it cancels, far below any gradient
    that carries a signal. Measured on DINOv2 ViT-S/14: key biases sit at 1e-7 x their tensor's
    RMS gradient, the next-smallest entries at >= 1e-4. The test is relative to the scalar's
    own tensor (``sqrt(sum g^2) <= rtol * sqrt(mean over the tensor of sum g^2)``), so it does
    not depend on the loss scale, and a tensor whose gradient is exactly zero everywhere is all
    structural zeros. Detected from the gradients, never from parameter names.
    """
    out = {}
    for n, g2 in grad_sq.items():
        mean = g2.double().mean()
        out[n] = (
            (g2.double() <= (rtol * rtol) * mean)
            if mean > 0
            else torch.ones_like(g2, dtype=torch.bool)
        )
    return out


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
    mix: str = "paper",
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
        mix: how the two terms are put on one scale (:func:`combine_terms`; ``paper``: eq. 1).

    Returns:
        ``{name: float32 tensor shaped like the parameter}`` for every eligible parameter, keyed
        and ordered like ``model.named_parameters()`` (excluded names are absent), on the CPU.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    terms = importance_terms(
        model,
        loader,
        strategy=strategy,
        num_batches=num_batches,
        exclude=exclude,
        device=device,
        progress=progress,
    )
    return combine_terms(terms, strategy, lam, mix)


def importance_scale(td: dict[str, Tensor], ta: dict[str, Tensor]) -> float:
    """The paper's s = sum(I_td) / sum(I_ta) over all eligible scalars (0 when either is 0)."""
    # float64 sums: ViT-B has 86M terms, a float32 running sum would lose digits.
    sum_td = sum(t.double().sum() for t in td.values())
    sum_ta = sum(t.double().sum() for t in ta.values())
    return float(sum_td / sum_ta) if sum_ta > 0 else 0.0
