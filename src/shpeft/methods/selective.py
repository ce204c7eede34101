"""Selective baselines: train whole existing tensors of the backbone (plus the head).

Each method here only chooses *which* pretrained tensors train; nothing is added to the network,
so the delta is dense (the chosen tensors whole) and merging is the identity. The choice is made
from the model itself (module types or parameter names), so the same method works on every timm
``VisionTransformer`` variant (CLIP's ``norm_pre``, ``fc_norm`` with average pooling, qk-norm, ...).
"""

from __future__ import annotations

import re

from torch import nn

from shpeft.delta import Delta
from shpeft.methods.base import PrepareContext, SelectiveMethod, register
from shpeft.params import is_head


def layernorm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the weights and biases of every ``nn.LayerNorm`` outside the head.

    Chosen by module type rather than by name (``norm1``, ``norm_pre``, ``fc_norm``, ``q_norm``,
    ``attn_pool.norm``, ... all qualify whatever they are called); timm's own ``LayerNorm`` /
    ``LayerNormFp32`` subclass ``nn.LayerNorm`` and are included.
    """
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        if is_head(mod_name) or not isinstance(module, nn.LayerNorm):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        # recurse=False: only the LayerNorm's own affine tensors (weight, bias when present)
        names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
    return names


@register
class LayerNormTuning(SelectiveMethod):
    """FT-LN: every LayerNorm's weight and bias in the backbone trains, with the head.

    Basu et al., "Strong Baselines for Parameter Efficient Few-Shot Fine-tuning" (AAAI 2024,
    arXiv:2304.01917) show that tuning only the LayerNorm affine parameters is a strong
    baseline; the SH-PEFT paper (Liu, Xu, Liu, Zhang 2024) reports it as "LayerNorm tuning".
    Every ``nn.LayerNorm`` of the backbone is included: ``norm1``/``norm2`` of each block, the
    final ``norm`` and, where the model has them as LayerNorms, ``norm_pre`` (CLIP), ``fc_norm``
    (average pooling) and the qk/scale norms.
    """

    name = "ln"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._names: set[str] = set()

    def selects(self, name: str, param: nn.Parameter) -> bool:
        return name in self._names

    # ``selects`` only sees a parameter's name, so the LayerNorm names of the model at hand are
    # collected (by module type) before the base class asks.
    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        self._names = layernorm_parameter_names(model)
        return super().prepare(model, ctx)

    def delta(self, model: nn.Module) -> Delta:
        self._names = layernorm_parameter_names(model)
        return super().delta(model)


@register
class BitFit(SelectiveMethod):
    """BitFit: every bias term of the backbone trains, with the head.

    Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models" (ACL 2022). BitFit trains *all* bias terms, so the
    LayerNorm biases are included along with those of the patch projection, qkv, proj, fc1 and fc2
    (the LayerNorm *weights* are not: they are scales, not biases). Parameters whose last name
    component is ``bias`` qualify, and also ``*_bias`` ones (``q_bias``/``v_bias`` of BEiT/EVA-style
    attention, which timm stores apart from a bias-free qkv); the head is trained anyway.
    """

    name = "bitfit"

    def selects(self, name: str, param: nn.Parameter) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return not is_head(name) and (leaf == "bias" or leaf.endswith("_bias"))


_ATTN_PARAM = re.compile(r"blocks\.\d+\.attn\..+")


@register
class AttentionTuning(SelectiveMethod):
    """FT-Att: the weights and biases of every block's self-attention train, with the head.

    Touvron, Cord, El-Nouby, Verbeek, Jégou, "Three things everyone should know about Vision
    Transformers" (ECCV 2022), section "fine-tuning attention is all you need": only the MHSA
    layers' weights are fine-tuned. Here that is every parameter under ``blocks.N.attn``: the qkv
    and output projections (weights and biases) and, where the model has them, q/k/scale norms
    inside the attention module. The pre-attention ``norm1`` is *not* included: it belongs to the
    block, not to the MHSA layer, and keeping it frozen keeps FT-Att disjoint from FT-LN so the two
    baselines measure different things.
    """

    name = "attn"

    def selects(self, name: str, param: nn.Parameter) -> bool:
        return _ATTN_PARAM.fullmatch(name) is not None


__all__ = ["AttentionTuning", "BitFit", "LayerNormTuning", "layernorm_parameter_names"]
