"""The change a fine-tune made: ``W_ft`` against ``W_ori``, and the top-k% of it.

Shared by the sparsity (Fig. 2 left), hybridity (Fig. 2 right) and location analyses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shpeft.importance import eligible_parameters
from shpeft.runs import load_base_model, load_run, method_from_config
from shpeft.selection import select_topk


def layout(model: torch.nn.Module) -> dict[str, int]:
    """``{name: numel}`` of the backbone parameters (everything but the head), in model order."""
    return {n: p.numel() for n, p in eligible_parameters(model).items()}


def finetuned_model(run_dir: str | Path, device: str = "cpu"):
    """The run's model as a plain timm model (delta merged) plus its base backbone weights.

    Returns:
        ``(model, base, conf, spec)``: ``model`` has the fine-tuned backbone and head, ``base``
        is ``{name: tensor}`` of the pretrained backbone (same names as the model's backbone).

    Raises:
        ValueError: for methods that add modules which cannot be folded into the weights
            (adapters, prompts): they have no ``W_ft`` of the base's shape.
    """
    from shpeft.importance import eligible_parameters

    model, classes, spec, conf = load_run(run_dir, device=device)
    model = method_from_config(conf).merge(model)
    base_model = load_base_model(run_dir)
    base = {n: p.detach().to(device) for n, p in eligible_parameters(base_model).items()}
    ft_names = set(eligible_parameters(model))
    if ft_names != set(base):
        raise ValueError(
            f"{run_dir}: the merged model's backbone tensors differ from the base's "
            f"({sorted(ft_names ^ set(base))[:3]}...)"
        )
    return model, base, conf, spec


def weight_change(run_dir: str | Path) -> dict[str, Any]:
    """``|W_ft - W_ori|`` of a run as one flat float32 vector with the backbone layout."""
    model, base, conf, _ = finetuned_model(run_dir)
    ft = eligible_parameters(model)
    sizes = {n: p.numel() for n, p in ft.items()}
    flat = torch.cat([(ft[n].detach().float() - base[n].float()).abs().reshape(-1) for n in sizes])
    return {"sizes": sizes, "flat": flat, "conf": conf}


def topk_flat(scores: Tensor, k_percent: float) -> Tensor:
    """The top-k% entries of a flat score vector (global threshold, ties to the lowest index).

    k = 0 (or a k that rounds to no scalar) selects nothing; k = 100 selects everything.
    """
    n = scores.numel()
    if k_percent >= 100:
        return torch.ones(n, dtype=torch.bool)
    if round(k_percent / 100 * n) < 1:
        return torch.zeros(n, dtype=torch.bool)
    return select_topk({"all": scores}, k_percent / 100)["all"]
