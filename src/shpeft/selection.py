"""Global top-k selection of SH-PEFT: one threshold tau over every eligible scalar of the model.

k = round(ratio * N) scalars with the largest importance are kept. Ties at tau are broken by the
lowest *global* flat index (parameters concatenated in the order of ``scores``, each flattened in
row-major order), so the result does not depend on the sort algorithm or the device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_selected(ratio: float, total: int) -> int:
    """k = round(ratio * N), with a clear error for ratios outside (0, 1] or that select nothing."""
    if not (isinstance(ratio, float | int) and math.isfinite(ratio) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be a fraction in (0, 1] (0.01 means 1%), got {ratio!r}")
    k = round(ratio * total)
    if k < 1:
        raise ValueError(
            f"ratio {ratio} of {total} eligible scalars selects no weight (k = round(ratio * N) = 0)"
        )
    return k


def _top_flat(flat: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest entries of ``flat``; ties at the threshold to the lowest index."""
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    # tau is the k-th largest score; everything strictly above it is in, and the remaining
    # places go to the entries equal to tau with the lowest index.
    tau = torch.kthvalue(flat, n - k + 1).values
    keep = flat > tau
    short = k - int(keep.sum())
    if short > 0:
        ties = torch.nonzero(flat == tau).squeeze(1)[:short]
        keep[ties] = True
    return keep


def _flatten(scores: dict[str, Tensor], forbid: dict[str, Tensor] | None) -> tuple[Tensor, int]:
    """Scores as one float32 vector (forbidden entries at -inf) and the number allowed."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    if not torch.isfinite(flat).all():
        bad = [n for n, s in scores.items() if not torch.isfinite(s).all()]
        raise ValueError(f"non-finite importance scores in {bad[:5]}")
    allowed = flat.numel()
    if forbid:
        unknown = set(forbid) - set(scores)
        if unknown:
            raise ValueError(f"forbid names tensors without scores: {sorted(unknown)[:5]}")
        mask = torch.cat(
            [
                forbid[n].reshape(-1).cpu()
                if n in forbid
                else torch.zeros(s.numel(), dtype=torch.bool)
                for n, s in scores.items()
            ]
        )
        flat[mask] = -math.inf
        allowed -= int(mask.sum())
    return flat, allowed


def _split(keep: Tensor, scores: dict[str, Tensor]) -> dict[str, Tensor]:
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view(s.shape).clone()
        offset += s.numel()
    return masks


@torch.no_grad()
def select_topk(
    scores: dict[str, Tensor],
    ratio: float,
    *,
    forbid: dict[str, Tensor] | None = None,
    max_density: float | None = None,
) -> dict[str, Tensor]:
    """Keep the k = round(ratio * N) highest-scoring scalars across all tensors of ``scores``.

    Args:
        scores: ``{name: importance tensor}``, e.g. from :func:`shpeft.estimate_importance`.
        ratio: the fraction of scalars to keep, in (0, 1]; 0.01 is the paper's "1%".
        forbid: ``{name: bool mask}`` of scalars never to select (e.g. structural zeros); k is
            still ``round(ratio * N)`` of all N scalars.
        max_density: at most ``floor(max_density * numel)`` scalars of any one tensor (a cap,
            e.g. so that one large-gradient tensor cannot take most of k). The places a capped
            tensor cannot take go to the next-best scalars of the other tensors (water-filling:
            the cap binds only where it must).

    Returns:
        ``{name: bool tensor of the same shape}`` with exactly k True entries in total.

    Raises:
        ValueError: k exceeds what ``forbid`` and ``max_density`` allow, or non-finite scores.
    """
    if not scores:
        raise ValueError("no scores to select from")
    flat, allowed = _flatten(scores, forbid)
    k = num_selected(ratio, flat.numel())
    if max_density is not None and not 0 < max_density <= 1:
        raise ValueError(f"max_density must be in (0, 1], got {max_density}")
    sizes = [s.numel() for s in scores.values()]
    caps = [n if max_density is None else math.floor(max_density * n) for n in sizes]
    finite = torch.isfinite(flat)
    reachable = sum(
        min(c, int(finite[o : o + n].sum()))
        for c, n, o in zip(caps, sizes, _offsets(sizes), strict=True)
    )
    if min(allowed, reachable) < k:
        raise ValueError(
            f"cannot select k = {k} scalars: only {min(allowed, reachable)} are allowed "
            "(forbidden scalars and the per-tensor cap max_density leave too few)"
        )
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    pool = torch.ones(flat.numel(), dtype=torch.bool)  # tensors not yet fixed at their cap
    need = k
    while True:
        cand = torch.where(pool, flat, torch.full_like(flat, -math.inf))
        top = _top_flat(cand, need)
        over = [
            (o, n, c)
            for o, n, c in zip(_offsets(sizes), sizes, caps, strict=True)
            if pool[o] and int(top[o : o + n].sum()) > c
        ]
        if not over:
            keep |= top
            return _split(keep, scores)
        for o, n, c in over:  # fix each over-full tensor at its own top-c
            keep[o : o + n] = _top_flat(flat[o : o + n], c)
            pool[o : o + n] = False
            need -= c


def _offsets(tensors: dict[str, Tensor] | list[int]) -> list[int]:
    """Start of each tensor (or size) in the concatenated flat vector."""
    sizes = [t.numel() for t in tensors.values()] if isinstance(tensors, dict) else tensors
    out, o = [], 0
    for n in sizes:
        out.append(o)
        o += n
    return out


def _rows(s: Tensor) -> int:
    """Rows a tensor splits into for per-row allocation: dim 0 of matrices and conv kernels."""
    return s.shape[0] if s.dim() >= 2 and s.shape[0] > 1 else 0


@torch.no_grad()
def select_per_row(
    scores: dict[str, Tensor], ratio: float, *, forbid: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Spread k over every output neuron first, then fill the rest globally.

    After GPS (Zhang et al., "Gradient-based Parameter Selection for Efficient Fine-Tuning",
    CVPR 2024), which gives every neuron of the network its top input connections. Each row
    (dim 0: one output neuron of a linear layer or patch-embedding filter) of every matrix gets
    its r = k // R best-scoring scalars, R being the number of rows; the remaining places go to
    the best of everything else by one global threshold, LayerNorm, biases and embeddings
    included. When k < R, the k rows with the largest best score get one scalar each. Ties go to
    the lowest index; k = round(ratio * N) exactly.
    """
    if not scores:
        raise ValueError("no scores to select from")
    flat, allowed = _flatten(scores, forbid)
    k = num_selected(ratio, flat.numel())
    if allowed < k:
        raise ValueError(f"cannot select k = {k} scalars: only {allowed} are allowed")
    parts = [
        (o, s.numel(), _rows(s)) for o, s in zip(_offsets(scores), scores.values(), strict=True)
    ]
    rows_total = sum(r for _, _, r in parts)
    per_row = k // rows_total if rows_total else 0
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    best_vals, best_idx = [], []
    for o, n, r in parts:
        if not r:
            continue
        block = flat[o : o + n].view(r, -1)
        if per_row:
            take = min(per_row, block.shape[1])
            # per row: top-`take` (a stable sort keeps the lowest index first among ties)
            order = torch.sort(-block, dim=1, stable=True).indices[:, :take]
            chosen = torch.zeros_like(block, dtype=torch.bool).scatter_(1, order, True)
            keep[o : o + n] = (chosen & torch.isfinite(block)).reshape(-1)
        else:  # fewer places than rows: the rows with the best single scalar get one each
            v, i = torch.max(block, dim=1)  # the first maximum: lowest index
            best_vals.append(v)
            best_idx.append(i + torch.arange(r) * block.shape[1] + o)
    if best_vals:
        vals, idx = torch.cat(best_vals), torch.cat(best_idx)
        keep[idx[_top_flat(vals, min(k, int(torch.isfinite(vals).sum())))]] = True
    rest = k - int(keep.sum())
    if rest > 0:
        keep |= _top_flat(torch.where(keep, torch.full_like(flat, -math.inf), flat), rest)
    return _split(keep, scores)


def masks_to_indices(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: sorted int64 flat indices}`` of the True entries; tensors without any are dropped."""
    out = {}
    for name, m in masks.items():
        idx = torch.nonzero(m.reshape(-1)).squeeze(1)
        if idx.numel():
            out[name] = idx
    return out
