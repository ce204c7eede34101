"""Where a ViT looked: attention rollout heat maps over the image, for the predicted class.

Two standard attributions for timm ``VisionTransformer`` models (every method's model is one:
LoRA, adapters and SSF wrap layers inside the blocks, VPT inserts its prompts between the prefix
and the patch tokens, so the patch tokens are always the last ``grid_h * grid_w`` tokens):

* ``grad-rollout`` (default, class-specific): Chefer, Gur, Wolf, "Generic Attention-model
  Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021), eq. 5-6:
  per block ``A_bar = mean over heads of relu(grad(A) * A)`` for the chosen class's logit, and
  the relevance ``R <- R + A_bar @ R`` from ``R = I``; the class token's row over the patches.
* ``rollout`` (class-agnostic): Abnar & Zuidema, "Quantifying Attention Flow in Transformers"
  (ACL 2020): ``R <- (0.5 I + 0.5 mean_h A, rows renormalised) @ R``.

Attention probabilities are read by a forward hook on each block's ``attn.attn_drop`` with
timm's fused attention switched off for the pass (it never materialises them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("grad-rollout", "rollout")


@contextlib.contextmanager
def _recording(model: nn.Module) -> Iterator[list[Tensor]]:
    """Record every block's attention probabilities (B, H, N, N), in block order."""
    attns = [b.attn for b in getattr(model, "blocks", [])]
    if not attns or not all(hasattr(a, "attn_drop") for a in attns):
        raise ValueError("explanations need a timm VisionTransformer (blocks[i].attn.attn_drop)")
    maps: list[Tensor] = []
    hooks = []
    fused = [getattr(a, "fused_attn", False) for a in attns]

    def hook(_module, inputs, _output):
        a = inputs[0]
        if a.requires_grad:
            a.retain_grad()
        maps.append(a)

    try:
        for a in attns:
            a.fused_attn = False
            hooks.append(a.attn_drop.register_forward_hook(hook))
        yield maps
    finally:
        for h in hooks:
            h.remove()
        for a, f in zip(attns, fused, strict=True):
            a.fused_attn = f


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the patch tokens for the model's input size."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise ValueError("the model has no patch_embed.grid_size")
    return int(grid[0]), int(grid[1])


def explain(
    model: nn.Module,
    x: Tensor,
    *,
    method: str = "grad-rollout",
    target: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Relevance maps over the patch grid for a batch of normalised images.

    Args:
        model: a timm ViT (any shpeft method's model); its mode and weights are left unchanged.
        x: ``(B, 3, H, W)`` normalised input.
        method: ``grad-rollout`` (class-specific, Chefer et al. 2021) or ``rollout``.
        target: the class to explain per image; default: the predicted class.

    Returns:
        ``(maps, probs)``: ``(B, grid_h, grid_w)`` float32 maps scaled to [0, 1] per image, and the
        ``(B, C)`` softmax probabilities of the same forward pass.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    gh, gw = patch_grid(model)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:  # only the attention maps need a gradient, never the weights
        p.requires_grad_(False)
    try:
        with _recording(model) as maps, torch.enable_grad():
            inp = x.detach().clone().requires_grad_(method == "grad-rollout")
            logits = model(inp).float()
            probs = logits.softmax(-1)
            cls = (
                logits.argmax(-1)
                if target is None
                else torch.as_tensor(list(target), device=logits.device)
            )
            if method == "grad-rollout":
                logits.gather(1, cls[:, None]).sum().backward()
        rel = _rollout(maps, method)
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
    patches = rel[:, 0, -gh * gw :].reshape(-1, gh, gw)
    lo = patches.flatten(1).min(1).values[:, None, None]
    hi = patches.flatten(1).max(1).values[:, None, None]
    patches = (patches - lo) / (hi - lo).clamp_min(1e-12)
    return patches.float().cpu().numpy(), probs.detach().cpu().numpy()


@torch.no_grad()
def _rollout(maps: list[Tensor], method: str) -> Tensor:
    b, _, n, _ = maps[0].shape
    eye = torch.eye(n, dtype=torch.float64, device=maps[0].device).expand(b, n, n)
    rel = eye.clone()
    for a in maps:
        if method == "grad-rollout":
            if a.grad is None:
                raise RuntimeError("no gradient reached the attention maps")
            cam = (a.grad * a).clamp(min=0).mean(1).double()
            rel = rel + cam @ rel
        else:
            avg = 0.5 * eye + 0.5 * a.mean(1).double()
            rel = (avg / avg.sum(-1, keepdim=True)) @ rel
    return rel


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(B, h, w)`` maps to ``size`` (rows, cols), kept in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(maps))[:, None].float()
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0]
    return out.clamp(0, 1).numpy()


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 picture: ``image`` (H, W, 3 uint8) with ``heat`` (h, w in [0, 1]) on top."""
    import matplotlib

    heat = upsample(heat[None], image.shape[:2])[0]
    colour = matplotlib.colormaps["jet"](heat)[..., :3]
    out = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * colour
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def to_display(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the input normalisation of one ``(3, H, W)`` image: (H, W, 3) uint8."""
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    img = (x.detach().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
    return (img * 255).round().astype(np.uint8)
