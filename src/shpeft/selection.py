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


@torch.no_grad()
def select_topk(scores: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """Keep the k = round(ratio * N) highest-scoring scalars across all tensors of ``scores``.

    Args:
        scores: ``{name: importance tensor}``, e.g. from :func:`shpeft.estimate_importance`.
        ratio: the fraction of scalars to keep, in (0, 1]; 0.01 is the paper's "1%".

    Returns:
        ``{name: bool tensor of the same shape}`` with exactly k True entries in total.
    """
    if not scores:
        raise ValueError("no scores to select from")
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    if not torch.isfinite(flat).all():
        bad = [n for n, s in scores.items() if not torch.isfinite(s).all()]
        raise ValueError(f"non-finite importance scores in {bad[:5]}")
    n = flat.numel()
    k = num_selected(ratio, n)
    # tau is the k-th largest score; everything strictly above it is in, and the remaining
    # places go to the entries equal to tau with the lowest global index.
    tau = torch.kthvalue(flat, n - k + 1).values
    keep = flat > tau
    short = k - int(keep.sum())
    if short > 0:
        ties = torch.nonzero(flat == tau).squeeze(1)[:short]
        keep[ties] = True
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view(s.shape).clone()
        offset += s.numel()
    return masks


def masks_to_indices(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: sorted int64 flat indices}`` of the True entries; tensors without any are dropped."""
    out = {}
    for name, m in masks.items():
        idx = torch.nonzero(m.reshape(-1)).squeeze(1)
        if idx.numel():
            out[name] = idx
    return out
