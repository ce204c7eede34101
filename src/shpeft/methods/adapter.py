"""AdaptFormer (Chen et al., NeurIPS 2022): a parallel bottleneck adapter beside every MLP.

Paper: "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition"
(https://arxiv.org/abs/2205.13535); official code: https://github.com/ShoufaChen/AdaptFormer.

Each transformer block becomes::

    x = x + attn(norm1(x))
    h = norm2(x)
    x = x + mlp(h) + s * up(dropout(relu(down(h))))

with ``down`` d -> r, ``up`` r -> d, both with biases. As in the official code (its "lora" init),
``down.weight`` is kaiming-uniform (a = sqrt(5), PyTorch's ``nn.Linear`` default) and ``up`` and
both biases start at zero, so the adapted model starts as exactly the pretrained one.

The paper (Eq. 3) feeds the adapter the same LayerNorm output as the MLP; the official code feeds
it the un-normalised residual stream (``ffn_adapter_layernorm_option="none"``). Both are offered
(``adapter_input``); the default follows the paper.

Implementation: each timm ``Block`` gets a new submodule ``blocks.N.adapter`` (parameters
``blocks.N.adapter.down.{weight,bias}`` and ``blocks.N.adapter.up.{weight,bias}``) and its class
is swapped to :class:`AdaptFormerBlock`, a subclass whose ``forward`` adds the adapter branch.
Every pretrained tensor keeps its name, so the backbone hash and the delta's names are unaffected,
and :meth:`AdaptFormer.build` re-creates the same structure on a fresh model. The adapter cannot
be folded into the weights (ReLU between the projections), so the method is not mergeable.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from shpeft.delta import Delta
from shpeft.methods.base import (
    Method,
    PrepareContext,
    freeze_all_but_head,
    head_delta,
    register,
)
from shpeft.methods.configs import AdapterConfig


class BottleneckAdapter(nn.Module):
    """AdaptFormer's AdaptMLP: ``scale * up(dropout(relu(down(x))))``, zero at initialisation.

    Args:
        dim: token width d.
        bottleneck: hidden width r.
        scale: fixed output scale s (not trained, as in AdaptFormer's default).
        dropout: dropout probability on the bottleneck activations.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        scale: float = 0.1,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        self.scale = scale
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """AdaptFormer's "lora" init: kaiming-uniform ``down``, zero ``up`` and biases."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        # A zero up-projection makes the branch output exactly 0, so training starts from the
        # pretrained function (and down still receives gradient once up moves off zero).
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class AdaptFormerBlock(Block):
    """A timm ``Block`` with AdaptFormer's parallel adapter beside the MLP.

    Never constructed directly: :func:`add_adapters` swaps an existing block's class to this one
    and attaches ``adapter`` and ``adapter_reads_norm``, so the block's own tensors (and their
    state-dict names) are untouched.
    """

    adapter: BottleneckAdapter
    adapter_reads_norm: bool

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        # Same as timm 1.0's Block.forward, plus the adapter branch.
        x = x + self.drop_path1(
            self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        )
        h = self.norm2(x)
        # As in the official code, stochastic depth applies to the MLP branch only; so does
        # timm's layer scale (which that code lacks): the adapter output joins the stream as is.
        a = self.adapter(h if self.adapter_reads_norm else x)
        return x + self.drop_path2(self.ls2(self.mlp(h))) + a


def adapted_blocks(model: nn.Module) -> list[AdaptFormerBlock]:
    return [m for m in model.modules() if isinstance(m, AdaptFormerBlock)]


def add_adapters(model: nn.Module, config: AdapterConfig) -> list[nn.Parameter]:
    """Give every block of ``model.blocks`` an adapter (in place); return the adapters' parameters.

    Raises:
        ValueError: if the model is not a timm ``VisionTransformer`` of plain ``Block``s, or
            already has adapters.
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"adapter needs a timm VisionTransformer, got {type(model).__name__}")
    blocks = model.blocks
    if adapted_blocks(model):
        raise ValueError("this model already has AdaptFormer adapters (prepared or built twice?)")
    for i, blk in enumerate(blocks):
        # Only timm's plain pre-norm Block: its forward is the one AdaptFormerBlock re-implements.
        # Other block types (ResPostBlock, parallel blocks) would silently change meaning.
        if type(blk) is not Block:
            raise ValueError(
                f"adapter supports timm's pre-norm Block only; blocks.{i} is "
                f"{type(blk).__module__}.{type(blk).__qualname__}"
            )
    dim = int(model.embed_dim)
    params = []
    for blk in blocks:
        ref = next(blk.parameters())  # new tensors live where the block's do
        adapter = BottleneckAdapter(
            dim,
            config.adapter_dim,
            scale=config.adapter_scale,
            dropout=config.adapter_dropout,
            device=ref.device,
            dtype=ref.dtype,
        )
        blk.__class__ = AdaptFormerBlock
        blk.adapter = adapter
        blk.adapter_reads_norm = config.adapter_input == "norm"
        params.extend(adapter.parameters())
    return params


@register
class AdaptFormer(Method):
    """AdaptFormer: train a parallel bottleneck adapter in every block, and the head."""

    name = "adapter"
    config: AdapterConfig

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        params = add_adapters(model, self.config)
        head = freeze_all_but_head(model)
        for p in params:
            p.requires_grad_(True)
        return params + head

    def delta(self, model: nn.Module) -> Delta:
        if not adapted_blocks(model):
            raise ValueError("this model has no AdaptFormer adapters (call prepare or build first)")
        dense = head_delta(model)
        for prefix, m in model.named_modules():
            if isinstance(m, BottleneckAdapter):
                for n, p in m.named_parameters():
                    dense[f"{prefix}.{n}"] = p.detach().clone()
        return Delta(dense=dense)

    def build(self, model: nn.Module) -> None:
        add_adapters(model, self.config)
