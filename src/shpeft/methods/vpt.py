"""Visual Prompt Tuning (Jia et al., ECCV 2022): learnable tokens in the input sequence.

Paper: "Visual Prompt Tuning" (https://arxiv.org/abs/2203.12119); official code:
https://github.com/KMnP/vpt (``src/models/vit_prompt/vit.py``).

``vpt_tokens`` learnable prompts are inserted after the class token (and any register tokens) and
before the patch tokens, after the position embedding (prompts get none) and ``norm_pre``:

- **vpt-shallow**: one set of prompts at the input of the first block; later blocks carry the
  prompts' outputs along like any other token;
- **vpt-deep**: a fresh set at the input of every block, replacing the previous block's prompt
  outputs (so only the patch and prefix tokens flow from block to block).

After the last block the prompt tokens are dropped, before ``model.norm`` and pooling, so the
sequence the head sees is the backbone's own: with ``global_pool='token'`` the class token is
still at index 0, and with ``'avg'`` the prompts do not enter the average (VPT's "original" pool).

Initialisation follows VPT: uniform(-v, v) with v = sqrt(6 / (fan_in + dim)), the xavier-uniform
bound with the patch embedding's fan-in (3 * patch^2 for RGB). Prompt dropout defaults to 0.0, the
default of VPT's config (its example commands set 0.1).

Implementation: the prompts are one parameter ``vpt.prompts`` of shape (depth or 1, tokens, dim)
in a new submodule ``model.vpt``, and the model's class is swapped to
:class:`PromptedVisionTransformer`, whose ``forward_features`` inserts and removes them. Every
pretrained tensor keeps its name; ``build`` re-creates the same structure on a fresh model. The
prompts change the attention's inputs, so nothing can be folded into the weights: not mergeable.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.utils.checkpoint
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from shpeft.delta import Delta
from shpeft.methods.base import (
    Method,
    PrepareContext,
    freeze_all_but_head,
    head_delta,
    register,
)
from shpeft.methods.configs import VptConfig


class VisualPrompts(nn.Module):
    """The prompt tokens: ``prompts[i]`` is inserted before block i (deep) or block 0 only.

    Args:
        layers: number of prompt sets: the model's depth for VPT-deep, 1 for VPT-shallow.
        tokens: prompts per set.
        dim: token width.
        bound: half-width v of the uniform(-v, v) initialisation.
        dropout: dropout probability on the prompts during training.
    """

    def __init__(
        self,
        layers: int,
        tokens: int,
        dim: int,
        bound: float,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(layers, tokens, dim, device=device, dtype=dtype))
        self.drop = nn.Dropout(dropout)
        self.bound = bound
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.prompts.shape[1]

    @property
    def deep(self) -> bool:
        return self.prompts.shape[0] > 1

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.uniform_(self.prompts, -self.bound, self.bound)

    def forward(self, layer: int, batch: int) -> torch.Tensor:
        """The prompts for ``layer``, expanded to (batch, tokens, dim), after dropout."""
        return self.drop(self.prompts[layer : layer + 1].expand(batch, -1, -1))

    def extra_repr(self) -> str:
        return f"layers={self.prompts.shape[0]}, tokens={self.num_tokens}, bound={self.bound:.4g}"


class PromptedVisionTransformer(VisionTransformer):
    """A timm ``VisionTransformer`` whose ``forward_features`` inserts VPT's prompts.

    Never constructed directly: :func:`add_prompts` swaps an existing model's class to this one
    and attaches ``vpt``, so the model's own tensors (and their state-dict names) are untouched.
    ``forward_head`` (pooling, ``fc_norm``, head) is timm's, unchanged.
    """

    vpt: VisualPrompts

    def forward_features(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            # A mask made for the backbone's sequence would not cover the prompt tokens.
            raise ValueError("VPT models do not support attention masks")
        # Same embedding steps as timm 1.0's VisionTransformer.forward_features.
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)

        n, t, b = self.num_prefix_tokens, self.vpt.num_tokens, x.shape[0]
        for i, blk in enumerate(self.blocks):
            if i == 0:
                # [prefix (cls, registers), prompts, patches], as in VPT's incorporate_prompt.
                x = torch.cat([x[:, :n], self.vpt(0, b), x[:, n:]], dim=1)
            elif self.vpt.deep:
                # VPT-deep: the previous block's prompt outputs are discarded and replaced.
                x = torch.cat([x[:, :n], self.vpt(i, b), x[:, n + t :]], dim=1)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        # Drop the prompts so norm and pooling see the backbone's layout (num_prefix_tokens
        # stays right, and 'avg' pooling averages patch tokens only).
        x = torch.cat([x[:, :n], x[:, n + t :]], dim=1)
        return self.norm(x)

    def forward_intermediates(self, *args, **kwargs):
        # timm's version would run the blocks without the prompts, silently giving other features.
        raise NotImplementedError("forward_intermediates is not supported with VPT prompts")


def prompt_init_bound(model: VisionTransformer) -> float:
    """VPT's bound sqrt(6 / (fan_in + dim)), fan_in = in_chans * patch_h * patch_w."""
    proj = getattr(model.patch_embed, "proj", None)
    weight = getattr(proj, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        fan_in = weight[0].numel()
    else:
        fan_in = 3 * math.prod(model.patch_embed.patch_size)  # VPT's formula assumes RGB
    return math.sqrt(6.0 / (fan_in + model.embed_dim))


def add_prompts(model: nn.Module, config: VptConfig, deep: bool) -> nn.Parameter:
    """Give ``model`` VPT prompts (in place); return the prompt parameter.

    Raises:
        ValueError: if the model is not a plain timm ``VisionTransformer`` or already has prompts.
    """
    if isinstance(model, PromptedVisionTransformer):
        raise ValueError("this model already has VPT prompts (prepared or built twice?)")
    # Only the exact class: PromptedVisionTransformer re-implements its forward_features, and a
    # subclass could have changed it.
    if type(model) is not VisionTransformer:
        raise ValueError(
            f"VPT supports timm's VisionTransformer only, got {type(model).__module__}."
            f"{type(model).__qualname__}"
        )
    ref = model.pos_embed if model.pos_embed is not None else next(model.parameters())
    prompts = VisualPrompts(
        len(model.blocks) if deep else 1,
        config.vpt_tokens,
        model.embed_dim,
        prompt_init_bound(model),
        dropout=config.vpt_dropout,
        device=ref.device,
        dtype=ref.dtype,
    )
    model.__class__ = PromptedVisionTransformer
    model.vpt = prompts
    return prompts.prompts


class _VisualPromptTuning(Method):
    """Shared code of VPT-deep and VPT-shallow (not registered itself)."""

    config: VptConfig
    deep: ClassVar[bool]

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        prompts = add_prompts(model, self.config, self.deep)
        head = freeze_all_but_head(model)
        prompts.requires_grad_(True)
        return [prompts, *head]

    def delta(self, model: nn.Module) -> Delta:
        if not isinstance(model, PromptedVisionTransformer):
            raise ValueError("this model has no VPT prompts (call prepare or build first)")
        return Delta(dense={**head_delta(model), "vpt.prompts": model.vpt.prompts.detach().clone()})

    def build(self, model: nn.Module) -> None:
        add_prompts(model, self.config, self.deep)


@register
class VptDeep(_VisualPromptTuning):
    """VPT-deep: a fresh set of prompt tokens at every block's input, and the head."""

    name = "vpt-deep"
    deep = True


@register
class VptShallow(_VisualPromptTuning):
    """VPT-shallow: prompt tokens at the first block's input only, and the head."""

    name = "vpt-shallow"
    deep = False
