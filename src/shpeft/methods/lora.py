"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) via Hugging Face peft.

A frozen Linear ``W`` (``d_out x d_in``) gains a trainable low-rank update,

    h = W x + (alpha / r) * B A x,    A: r x d_in (Kaiming-uniform),  B: d_out x r (zeros),

so training starts exactly at the pretrained function and adds ``r * (d_in + d_out)`` scalars per
adapted matrix. The LoRA layers are those of Hugging Face ``peft`` (``LoraConfig`` +
``inject_adapter_in_model``): they are injected in place into the timm model, so module names and
the forward stay timm's (no ``PeftModel`` wrapper) and the added tensors are named e.g.
``blocks.0.attn.qkv.lora_A.default.weight``.

Deviation from the paper, forced by timm: the paper adapts ``W_q`` and ``W_v``; timm's ViT fuses
the query, key and value projections into one ``attn.qkv`` Linear (``3D x D``), so the default
targets are that fused matrix and the output projection ``attn.proj`` of every block (the usual
"LoRA on attention" setup of ViT PEFT benchmarks).

The helpers :func:`inject_lora`, :func:`lora_parameters` and :func:`merge_lora` are shared with
``spt-lora`` (SPT-LoRA places LoRA on a data-chosen subset of matrices).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from shpeft.delta import Delta
from shpeft.methods.base import (
    Method,
    PrepareContext,
    freeze_all_but_head,
    head_delta,
    head_parameters,
    register,
)
from shpeft.methods.configs import LORA_TARGETS, LoraMethodConfig

# Short target names (the CLI value) -> module path inside a timm ViT block.


def lora_module_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the backbone Linear layers ``blocks.N.<path>`` for each short target name."""
    paths = tuple(LORA_TARGETS[t] for t in targets)
    pattern = re.compile(r"blocks\.\d+\.(" + "|".join(re.escape(p) for p in paths) + ")")
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and pattern.fullmatch(n) is not None
    ]
    if not names:
        raise ValueError(
            f"no Linear layer blocks.N.{{{','.join(paths)}}} in this model: LoRA targets timm "
            "VisionTransformer blocks"
        )
    return names


def inject_lora(
    model: nn.Module, module_names: Sequence[str], rank: int, alpha: float, dropout: float = 0.0
) -> list[nn.Parameter]:
    """Wrap exactly ``module_names`` (Linear layers) with peft LoRA layers, in place.

    Initialisation is peft's (A Kaiming-uniform from torch's global RNG, B zeros), so it is
    deterministic given the RNG state and the update starts at zero. peft's injection freezes
    every non-LoRA parameter (the head included): the caller re-enables what else it trains.

    Returns:
        The new LoRA parameters, in ``named_parameters()`` order.
    """
    if not module_names:
        raise ValueError("inject_lora needs at least one module name")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        # peft full-matches a string target against every module name: an alternation of the
        # escaped exact names adapts these modules and nothing else (no suffix matching).
        target_modules="(" + "|".join(re.escape(n) for n in module_names) + ")",
    )
    inject_adapter_in_model(config, model)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    missing = sorted(set(module_names) - wrapped)
    if missing:
        raise ValueError(f"peft did not adapt {missing}")
    return list(lora_parameters(model).values())


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every LoRA factor (not the wrapped base layers), model order."""
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for n, p in module.named_parameters():
                if not n.startswith("base_layer."):
                    out[f"{mod_name}.{n}"] = p
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every peft LoRA layer into its base Linear and remove the LoRA modules (in place).

    This is what peft's ``merge_and_unload`` does for a ``PeftModel`` (``BaseTuner.
    _unload_and_optionally_merge``): ``LoraLayer.merge()`` adds ``scaling * B @ A`` to the base
    weight, then the wrapper is replaced by its ``base_layer`` in the parent module, so the
    result has timm's module tree and state-dict keys again.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    # inject_adapter_in_model leaves its config on the model; a merged model is plain timm.
    if "peft_config" in vars(model):
        del model.peft_config
    return model


def lora_delta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the LoRA factors, named as in ``model.named_parameters()``."""
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


@register
class Lora(Method):
    """LoRA factors on the chosen Linear layers of every block (peft) + the head.

    ``prepare`` freezes the backbone and injects peft LoRA layers; the delta holds the LoRA
    factors (dense, with their peft names) and the head; ``build`` injects the same untrained
    structure so that ``apply_delta`` can load them; ``merge`` folds ``W + (alpha/r) B A`` into
    each Linear and returns a plain timm model.
    """

    name = "lora"
    config: LoraMethodConfig

    def _inject(self, model: nn.Module) -> list[nn.Parameter]:
        cfg = self.config
        names = lora_module_names(model, cfg.target_list())
        return inject_lora(model, names, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        freeze_all_but_head(model)
        lora = self._inject(model)
        head = list(head_parameters(model).values())
        for p in head:  # peft's injection froze the head along with the backbone
            p.requires_grad_(True)
        return lora + head

    def delta(self, model: nn.Module) -> Delta:
        return Delta(dense=lora_delta(model) | head_delta(model))

    def build(self, model: nn.Module) -> None:
        self._inject(model)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_lora(model)
