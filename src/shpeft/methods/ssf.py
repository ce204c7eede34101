"""SSF: Scaling & Shifting your Features (Lian, Zhou, Feng, Wang; NeurIPS 2022).

SSF follows each operation of the frozen backbone with a learnable per-channel affine
``y = scale * x + shift`` (arXiv:2210.08823, code at github.com/dongzelian/SSF). Because the
affine is linear and sits right after a linear map or a LayerNorm, it folds into that layer's
weights once training is over, so the merged model is a plain timm ViT with no extra cost:

- after a Linear / Conv2d: ``W' = diag(scale) W`` and ``b' = scale * b + shift``;
- after a LayerNorm: ``weight' = scale * weight`` and ``bias' = scale * bias + shift``.

Implementation: each target module ``m`` gets a :class:`ScaleShift` child named ``ssf`` (so its
tensors are ``<m>.ssf.scale`` / ``<m>.ssf.shift``, e.g. ``blocks.0.attn.qkv.ssf.scale``) and a
forward hook that passes ``m``'s output through it. No original tensor is renamed or wrapped, so
the backbone's state-dict keys, its hash and :func:`~shpeft.delta.apply_delta` are unaffected;
:func:`merge_ssf` folds the affines into the weights and removes every hook and child.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm, LayerNorm2d, LayerNorm2dFp32, LayerNormFp32
from timm.layers import Linear as TimmLinear
from torch import Tensor, nn

from shpeft.delta import Delta
from shpeft.methods.base import (
    Method,
    PrepareContext,
    freeze_all_but_head,
    head_parameters,
    register,
)
from shpeft.methods.configs import SsfConfig
from shpeft.params import is_head

SSF_ATTR = "ssf"
"""Name of the :class:`ScaleShift` child attached to every target module."""

SSF_STD = 0.02
"""Standard deviation of the random init, as in SSF's ``init_ssf_scale_shift``."""

# Targets are whitelisted by exact type: folding is only exact when the module's output is an
# affine function of its weight and bias and nothing else. Subclasses that transform the weight
# (timm's StdConv2d standardises it) or the output (LayerNormAct applies an activation after the
# affine) would make the merged model differ, so they are left without SSF.
_LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, TimmLinear, nn.Conv2d)
_CHANNELS_LAST_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, LayerNorm, LayerNormFp32)
_CHANNELS_FIRST_NORMS: tuple[type[nn.Module], ...] = (LayerNorm2d, LayerNorm2dFp32)


class ScaleShift(nn.Module):
    """``y = scale * x + shift`` over one channel dimension of ``x``.

    Args:
        channels: size of the channel dimension.
        shift: whether to learn a shift; it is only added where the target has a bias to fold it
            into, so that the method stays mergeable (see :func:`ssf_targets`).
        channel_dim: -1 for channels-last outputs (Linear, LayerNorm), 1 for NCHW (Conv2d).
        device, dtype: those of the target's weight.
    """

    def __init__(
        self,
        channels: int,
        *,
        shift: bool = True,
        channel_dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        if shift:
            self.shift = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))
        else:
            self.register_parameter("shift", None)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        """Identity (ones/zeros) or SSF's N(1, 0.02) / N(0, 0.02) from torch's global RNG.

        Random values are drawn on the CPU in float32 (scale first, then shift) and then moved,
        so a given seed gives the same init on every device and dtype.
        """
        if init == "identity":
            self.scale.fill_(1.0)
            if self.shift is not None:
                self.shift.zero_()
            return
        n = self.scale.numel()
        self.scale.copy_(torch.empty(n).normal_(1.0, SSF_STD))
        if self.shift is not None:
            self.shift.copy_(torch.empty(n).normal_(0.0, SSF_STD))

    def forward(self, x: Tensor) -> Tensor:
        # Cast to the activation dtype so that under autocast a bf16/fp16 activation stays in
        # that dtype instead of being promoted to float32 by the float32 parameters.
        scale = self.scale.to(x.dtype)
        shift = self.shift.to(x.dtype) if self.shift is not None else None
        if self.channel_dim != -1:
            trailing = x.dim() - self.channel_dim - 1
            scale = scale.view(-1, *([1] * trailing))
            shift = shift.view(-1, *([1] * trailing)) if shift is not None else None
        return x * scale if shift is None else x * scale + shift

    def extra_repr(self) -> str:
        return (
            f"{self.scale.numel()}, shift={self.shift is not None}, channel_dim={self.channel_dim}"
        )


def _ssf_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Forward hook applying the module's :class:`ScaleShift` to its output.

    A module-level function (not a closure) so that hooked models deep-copy and pickle.
    """
    return getattr(module, SSF_ATTR)(output)


def ssf_targets(model: nn.Module) -> list[tuple[str, nn.Module, int, int, bool]]:
    """The modules SSF follows, in ``named_modules`` order (which fixes the init's RNG order).

    Every Linear and Conv2d (the patch projection) and every LayerNorm with affine parameters
    outside the head: in a timm ViT that is ``patch_embed.proj``, ``norm_pre`` (CLIP), each
    block's ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, the final
    ``norm`` (or ``fc_norm`` with average pooling), plus qk/scale norms and attention-pool layers
    where the model has them. SSF's own code applies it after exactly these operations.

    LayerNorms without affine parameters are skipped (there is no tensor to fold into). A target
    without a bias (e.g. CLIP's bias-free patch projection) gets a scale only, because a shift
    there could not be merged into the backbone's tensors.

    Returns:
        ``(name, module, channels, channel_dim, has_shift)`` for each target.
    """
    out = []
    for name, m in model.named_modules():
        if is_head(name) or isinstance(m, ScaleShift):
            continue
        kind = type(m)
        if kind in _LINEAR_TYPES:
            channels = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            channel_dim = 1 if isinstance(m, nn.Conv2d) else -1
        elif kind in _CHANNELS_LAST_NORMS + _CHANNELS_FIRST_NORMS:
            if m.weight is None or len(m.normalized_shape) != 1:
                continue
            channels = m.normalized_shape[0]
            channel_dim = 1 if kind in _CHANNELS_FIRST_NORMS else -1
        else:
            continue
        out.append((name, m, channels, channel_dim, m.bias is not None))
    return out


def attach_ssf(model: nn.Module, init: str = "identity") -> list[nn.Parameter]:
    """Attach a :class:`ScaleShift` and its hook to every target; return their parameters.

    Raises:
        ValueError: if the model already has SSF attached, or has no target.
    """
    if any(isinstance(m, ScaleShift) for m in model.modules()):
        raise ValueError("SSF is already attached to this model")
    targets = ssf_targets(model)
    if not targets:
        raise ValueError("SSF found no Linear, Conv2d or LayerNorm to follow in this model")
    params: list[nn.Parameter] = []
    for _, m, channels, channel_dim, has_shift in targets:
        w = m.weight
        ss = ScaleShift(
            channels, shift=has_shift, channel_dim=channel_dim, device=w.device, dtype=w.dtype
        )
        ss.reset_parameters(init)
        m.add_module(SSF_ATTR, ss)
        m.register_forward_hook(_ssf_hook)
        params.extend(ss.parameters())
    return params


def ssf_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every SSF scale and shift of the model, by its name in ``model.named_parameters()``."""
    out: dict[str, nn.Parameter] = {}
    for name, m in model.named_modules():
        if isinstance(m, ScaleShift):
            out.update({f"{name}.{n}": p for n, p in m.named_parameters(recurse=False)})
    return out


def _remove_ssf_hooks(module: nn.Module) -> None:
    # Hooks are found by identity rather than through stored RemovableHandles, which would not
    # survive a deepcopy or pickling of the model; torch keeps per-hook flags keyed by the same id.
    for hook_id, fn in list(module._forward_hooks.items()):
        if fn is _ssf_hook:
            del module._forward_hooks[hook_id]
            module._forward_hooks_with_kwargs.pop(hook_id, None)
            module._forward_hooks_always_called.pop(hook_id, None)


@torch.no_grad()
def merge_ssf(model: nn.Module) -> nn.Module:
    """Fold every SSF affine into the weights of the module it follows, in place.

    After a Linear/Conv2d ``W' = diag(scale) W`` (output channels are dimension 0), after a
    LayerNorm ``weight' = scale * weight``; in both cases ``b' = scale * b + shift``. Products are
    taken in float32 and cast back, so half-precision weights lose no more than one rounding.

    Returns:
        ``model``, now with the base model's modules, state-dict keys and (up to float rounding)
        the same outputs as with SSF attached.

    Raises:
        ValueError: if the model has no SSF attached (prepare/build + apply_delta first).
    """
    hosts = [m for m in model.modules() if isinstance(m._modules.get(SSF_ATTR), ScaleShift)]
    if not hosts:
        raise ValueError("this model has no SSF modules to merge; prepare or build it first")
    for m in hosts:
        ss: ScaleShift = m._modules[SSF_ATTR]
        scale = ss.scale.detach().float()
        w = m.weight
        w.copy_((w.float() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        if m.bias is not None:
            b = m.bias
            shift = ss.shift.detach().float() if ss.shift is not None else 0.0
            b.copy_((b.float() * scale + shift).to(b.dtype))
        elif ss.shift is not None:  # pragma: no cover - attach_ssf never adds one
            raise ValueError("cannot fold an SSF shift into a module without a bias")
        _remove_ssf_hooks(m)
        del m._modules[SSF_ATTR]
    return model


@register
class Ssf(Method):
    """SSF (Lian et al., NeurIPS 2022): learn a per-channel scale and shift after every operation.

    The backbone is frozen; a scale and a shift (2 x channels scalars) follow the patch
    projection, every Linear (qkv, proj, fc1, fc2) and every LayerNorm (norm1, norm2, norm,
    norm_pre where present); see :func:`ssf_targets` for the exact rule. The head trains too.
    Mergeable: the affines fold into the weights they follow (:func:`merge_ssf`).
    """

    name = "ssf"
    config: SsfConfig

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        head = freeze_all_but_head(model)
        return attach_ssf(model, self.config.ssf_init) + head

    def delta(self, model: nn.Module) -> Delta:
        tensors = ssf_parameters(model) | head_parameters(model)
        return Delta(dense={n: p.detach().clone() for n, p in tensors.items()})

    def build(self, model: nn.Module) -> None:
        # Identity init: the values are overwritten by the delta, and identity keeps a built but
        # unloaded model equal to the base without drawing from the global RNG.
        attach_ssf(model, "identity")

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_ssf(model)
