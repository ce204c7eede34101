"""Dense baselines: full fine-tuning and the linear probe."""

from __future__ import annotations

from torch import nn

from shpeft.delta import Delta
from shpeft.methods.base import Method, PrepareContext, freeze_all_but_head, head_delta, register


@register
class FullFinetune(Method):
    """Every backbone weight and the head train (the paper's "Full finetune")."""

    name = "full"

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())

    def delta(self, model: nn.Module) -> Delta:
        return Delta(dense={n: p.detach().clone() for n, p in model.named_parameters()})


@register
class LinearProbe(Method):
    """Only the new head trains (the paper's "Linear probe")."""

    name = "linear"

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        return freeze_all_but_head(model)

    def delta(self, model: nn.Module) -> Delta:
        return Delta(dense=head_delta(model))
