"""Tiny models and batches for unit tests (a few thousand parameters, 16x16 images)."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(num_classes: int = 3, seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = dict(
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=num_classes
    )
    args.update(kw)
    return VisionTransformer(**args)


def tiny_batches(n_batches: int = 3, batch: int = 8, num_classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, 16, 16, generator=g),
            torch.randint(0, num_classes, (batch,), generator=g),
        )
        for _ in range(n_batches)
    ]
