"""What each parameter of a timm ViT is: the head or the backbone, its kind and its block.

One place for these name rules, used by the methods (what is the head), the selection
diagnostics and the location analyses (where the budget goes). Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Prefix of the classification head's parameters (timm: ``model.head``).
HEAD_PREFIX = "head"

#: Parameter kinds, in display order (see :func:`parameter_kind`).
KINDS = (
    "patch_embed",
    "pos_embed",
    "cls_token",
    "qkv",
    "proj",
    "fc1",
    "fc2",
    "bias",
    "norm",
    "layerscale",
    "other",
)

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def under(name: str, prefix: str) -> bool:
    """True when ``name`` is ``prefix`` or lies under it (``head`` -> ``head.weight``)."""
    return name == prefix or name.startswith(prefix + ".")


def is_head(name: str) -> bool:
    """True for the head's parameters (``head.weight``, ``head.bias``, ``head.x.y``)."""
    return under(name, HEAD_PREFIX)


def parameter_kind(name: str) -> str:
    """The kind of a timm ViT parameter.

    ``patch_embed`` (the patch projection, its bias included), ``pos_embed``, ``cls_token``
    (and register tokens), ``qkv`` / ``proj`` / ``fc1`` / ``fc2`` (weights of the attention and
    MLP linear layers), ``bias`` (their biases), ``norm`` (LayerNorm scales and shifts),
    ``layerscale`` (LayerScale ``ls1``/``ls2`` gammas, e.g. DINOv2), else ``other``.
    """
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("patch_embed"):
        return "patch_embed"
    if name == "pos_embed":
        return "pos_embed"
    if name in ("cls_token", "reg_token"):
        return "cls_token"
    if "norm" in name:
        return "norm"
    if re.search(r"(?:^|\.)ls\d\.", name) or leaf == "gamma":
        return "layerscale"
    if leaf == "bias":
        return "bias"
    for key in ("qkv", "proj", "fc1", "fc2"):
        if f".{key}." in f".{name}":
            return key
    return "other"


def block_of(name: str) -> str:
    """``"block 3"`` for ``blocks.3.*``; ``"embed"`` before the blocks; ``"final"`` after."""
    m = _BLOCK.search(name)
    if m:
        return f"block {int(m.group(1))}"
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith(
        ("patch_embed", "norm_pre")
    ):
        return "embed"
    return "final"


def block_order(blocks: Iterable[str]) -> list[str]:
    """Blocks in model order: ``embed``, ``block 0`` .. ``block N``, ``final``."""

    def key(b: str) -> tuple[int, int]:
        if b == "embed":
            return (0, 0)
        if b.startswith("block "):
            return (1, int(b.split()[1]))
        return (2, 0)

    return sorted(set(blocks), key=key)


def kind_order(kinds: Iterable[str]) -> list[str]:
    """Kinds in :data:`KINDS` order (unknown ones last, sorted)."""
    kinds = set(kinds)
    return [k for k in KINDS if k in kinds] + sorted(kinds - set(KINDS))
