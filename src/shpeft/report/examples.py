"""Test images with explanation heat maps: which to show, how to draw them, ``predict --explain``.

The attribution is :func:`shpeft.explain.explain`: gradient-weighted attention rollout for the
predicted class (Chefer, Gur, Wolf, ICCV 2021) by default, or plain attention rollout (Abnar &
Zuidema, ACL 2020). The weights are frozen for the pass: the maps need the gradient of the
attention probabilities only, and without the weights' gradients the pass costs about a forward
(measured on vit_pico: 0.1 s instead of 1.4-2 s for 8 images).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shpeft.explain import explain, overlay, to_display
from shpeft.io_utils import atomic_write_bytes
from shpeft.report.predictions import Predictions

#: Side of the pictures in the report and of ``predict --explain``'s overlays (small inputs
#: such as 32 px are enlarged so that the heat map can be read).
DISPLAY_SIDE = 160


def heat_maps(
    model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None, method: str = "grad-rollout"
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`shpeft.explain.explain` on the model's device: ``(maps (B, h, w), probs (B, C))``."""
    device = next(model.parameters()).device
    return explain(model, x.to(device), method=method, target=targets)


def pick_examples(
    labels: np.ndarray, probs: np.ndarray, n_correct: int = 4, n_wrong: int = 4
) -> list[int]:
    """Indices of test samples to show: confident correct ones, then confident mistakes.

    Each group takes its samples in turn from the true classes (so every class appears when it
    can), each class's most confident first: confident mistakes are the ones worth a look.
    Deterministic: ties keep the test order.
    """
    preds = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    chosen: list[int] = []
    for want, n in ((True, n_correct), (False, n_wrong)):
        queues = []
        for c in np.unique(labels):
            idx = np.flatnonzero((labels == c) & ((preds == labels) == want))
            queues.append(list(idx[np.argsort(-conf[idx], kind="stable")]))
        taken: list[int] = []
        while len(taken) < n and any(queues):
            for q in queues:
                if q and len(taken) < n:
                    taken.append(int(q.pop(0)))
        chosen += taken
    return chosen


def _enlarge(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    if image.shape[0] >= side and image.shape[1] >= side:
        return image
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC))


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """An (H, W, 3) uint8 picture as PNG (lossless) or JPEG (a quarter of the bytes: the report
    embeds its examples as JPEG, a grid writes hundreds of reports)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def overlay_image(
    x: torch.Tensor, heat: np.ndarray, mean: Sequence[float], std: Sequence[float], side: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(input, overlay)``: one normalised ``(3, H, W)`` input as the model saw it, enlarged to
    at least ``side`` pixels, and the same picture with the heat map on top."""
    image = _enlarge(to_display(x, mean, std), side)
    return image, overlay(image, heat)


@dataclass
class Example:
    """One test image shown in the report."""

    index: int
    id: str
    true: str
    predicted: str
    confidence: float
    image: bytes  # the input and its overlay side by side
    mime: str

    @property
    def correct(self) -> bool:
        return self.true == self.predicted


def explained_examples(
    model: nn.Module,
    dataset,
    pred: Predictions,
    indices: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    method: str = "grad-rollout",
    side: int = DISPLAY_SIDE,
) -> list[Example]:
    """Heat maps of the test samples ``pred[indices]``, each for its predicted class.

    The images are looked up in ``dataset`` (items ``(x, y)``) by sample id, so the dataset need
    not list the test split in the predictions' order.

    Raises:
        ValueError: A sample is not in ``dataset``, or its label there differs (another split).
    """
    if not indices:
        return []
    where = {s: k for k, s in enumerate(getattr(dataset, "ids", None) or pred.ids)}
    missing = [pred.ids[i] for i in indices if pred.ids[i] not in where]
    if missing:
        raise ValueError(f"test sample(s) {missing} of the predictions are not in the test data")
    items = [dataset[where[pred.ids[i]]] for i in indices]
    if [int(item[1]) for item in items] != [int(pred.labels[i]) for i in indices]:
        raise ValueError("the test data's labels differ from the predictions' (another split?)")
    x = torch.stack([item[0] for item in items])  # (B, 3, S, S)
    targets = [int(pred.preds[i]) for i in indices]
    maps, _ = heat_maps(model, x, targets, method)
    gap = np.full((max(side, x.shape[-2]), 6, 3), 255, dtype=np.uint8)
    out = []
    for j, i in enumerate(indices):
        image, over = overlay_image(x[j], maps[j], mean, std, side)
        pair = np.concatenate([image, gap[: image.shape[0]], over], axis=1)
        out.append(
            Example(
                index=int(i),
                id=pred.ids[i],
                true=pred.classes[int(pred.labels[i])],
                predicted=pred.classes[targets[j]],
                confidence=float(pred.probs[i].max()),
                image=encode(pair, "JPEG"),
                mime="image/jpeg",
            )
        )
    return out


def explanation_path(out_dir: str | os.PathLike, image_path: str, root: str | os.PathLike) -> Path:
    """``OUT_DIR/<path relative to root>.png`` (the source's full name kept: ``a.jpg.png``)."""
    src, base = Path(image_path), Path(root)
    rel = src.relative_to(base) if src != base and src.is_relative_to(base) else Path(src.name)
    return Path(out_dir) / rel.with_name(rel.name + ".png")


def write_explanations(
    model: nn.Module,
    x: torch.Tensor,
    paths: Sequence[str],
    targets: Sequence[int],
    out_dir: str | os.PathLike,
    root: str | os.PathLike,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    method: str = "grad-rollout",
    side: int = 224,
) -> list[Path]:
    """``shpeft predict --explain``: an overlay PNG per image of what the model attended to for
    ``targets`` (its predicted classes), under ``out_dir`` mirroring the images' folders."""
    maps, _ = heat_maps(model, x, list(targets), method)
    written = []
    for j, path in enumerate(paths):
        _, over = overlay_image(x[j], maps[j], mean, std, side)
        written.append(atomic_write_bytes(explanation_path(out_dir, path, root), encode(over)))
    return written
