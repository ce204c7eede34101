"""Sparse training of selected scalars (paper eq. 2): w <- w - eta * dL/dw * M.

Rather than masking dense gradients, each touched tensor keeps its pretrained values frozen and
gains a 1-D trainable ``values`` vector for its k_i selected scalars, scattered in at forward time:

    W_eff = W_base.flatten().index_put(indices, values).view_as(W_base)

so the optimizer (momentum, weight decay) only ever sees the k selected scalars: O(k) state, and
nothing else can move, not even by rounding, because every other entry is a copy of the frozen
base. This mirrors the storage of peft's Super-Tuning (int flat indices + 1-D values); the
scatter is done with ``torch.nn.utils.parametrize`` so that every parameter kind (Linear, Conv2d,
LayerNorm, position embedding, class token) is handled the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class SparseUpdate(nn.Module):
    """Parametrization that overwrites ``indices`` of the frozen base tensor with ``values``."""

    def __init__(self, base: Tensor, indices: Tensor) -> None:
        super().__init__()
        indices = indices.to(device=base.device, dtype=torch.long)
        self.register_buffer("indices", indices, persistent=False)
        self.values = nn.Parameter(base.detach().reshape(-1)[indices].clone())

    def forward(self, base: Tensor) -> Tensor:
        flat = base.reshape(-1).index_put((self.indices,), self.values)  # out of place
        return flat.view(base.shape)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def attach_sparse(model: nn.Module, indices: dict[str, Tensor]) -> list[nn.Parameter]:
    """Make only ``indices`` of the named parameters trainable; return the new ``values`` params.

    Parameters not in ``indices`` are not frozen here: the caller decides (the head stays
    trainable). Each touched base tensor gets ``requires_grad=False`` so it never receives a
    gradient, and tensors without selected scalars get no weight gradient at all.
    """
    params = dict(model.named_parameters())
    trainable = []
    for name, idx in indices.items():
        if name not in params:
            raise KeyError(f"no parameter named {name!r} in the model")
        base = params[name]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= base.numel()):
            raise IndexError(f"indices for {name!r} out of range [0, {base.numel()})")
        owner, attr = _owner(model, name)
        base.requires_grad_(False)
        update = SparseUpdate(base, idx)
        parametrize.register_parametrization(owner, attr, update, unsafe=True)
        trainable.append(update.values)
    return trainable


def iter_sparse(model: nn.Module) -> Iterator[tuple[str, SparseUpdate]]:
    """``(parameter name, SparseUpdate)`` for every sparse parametrization in ``model``."""
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparseUpdate):
                    yield (f"{mod_name}.{attr}" if mod_name else attr), p


def sparse_state(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (int64 indices, values)}`` of the sparse parametrizations, detached, on the CPU."""
    return {n: (u.indices.cpu(), u.values.detach().cpu()) for n, u in iter_sparse(model)}


@torch.no_grad()
def merge_sparse(model: nn.Module) -> nn.Module:
    """Write the trained values into the base tensors and remove the parametrizations (in place).

    The result is a plain model whose state dict has the original keys; the merged tensors are
    bit-identical to the parametrized forward's weights (the scatter copies values exactly).
    """
    for name, _ in list(iter_sparse(model)):
        owner, attr = _owner(model, name)
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
        getattr(owner, attr).requires_grad_(False)
    return model
