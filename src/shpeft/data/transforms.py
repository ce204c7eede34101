"""Tensor transforms: resize (uint8), optional flip, scale to ``[0, 1]``, normalise.

The pipeline is split in two so that caching is possible: :func:`resize_uint8` is the expensive,
deterministic part (done once per image when the dataset caches), :class:`Normalize` the cheap
per-epoch part (random flip for training, float conversion, normalisation).

Images are resized to a square ``(size, size)`` directly, **without preserving the aspect ratio**
and without cropping: lesions near the border of an ultrasound or X-ray must not be cut off, and
the pretrained ViTs expect a fixed square input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from shpeft.config import AUGMENTATIONS

__all__ = ["AUGMENTATIONS", "Normalize", "parse_interpolation", "resize_uint8", "to_chw_tensor"]


# Modes that torchvision can apply to tensors (box/hamming/lanczos are PIL-only).
_TENSOR_MODES = {
    "nearest": InterpolationMode.NEAREST,
    "nearest-exact": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def parse_interpolation(interpolation: str | InterpolationMode) -> InterpolationMode:
    """Turn ``"bicubic"`` etc. (as in timm's ``pretrained_cfg``) into an ``InterpolationMode``.

    Raises:
        ValueError: For a mode torchvision cannot apply to tensors.
    """
    if isinstance(interpolation, InterpolationMode):
        key = interpolation.value
    else:
        key = str(interpolation).lower()
    if key not in _TENSOR_MODES:
        raise ValueError(
            f"unsupported interpolation {interpolation!r}; choose one of {sorted(_TENSOR_MODES)}"
        )
    return _TENSOR_MODES[key]


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` or ``(H, W)`` uint8 array -> ``(3, H, W)`` uint8 tensor."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def resize_uint8(
    image: torch.Tensor, size: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC
) -> torch.Tensor:
    """Resize a ``(3, H, W)`` uint8 tensor to ``(3, size, size)`` uint8 with antialiasing.

    Bicubic overshoot is rounded and clamped back into ``[0, 255]`` by torchvision.
    """
    if image.shape[-2:] == (size, size):
        return image
    return F.resize(image, [size, size], interpolation=interpolation, antialias=True)


class Normalize:
    """Per-sample tail of the pipeline: optional random horizontal flip, ``/255``, normalise.

    Picklable (plain floats only), so datasets holding it work with DataLoader workers. The flip
    draws from torch's global RNG, which DataLoader seeds per worker.

    Args:
        mean: Per-channel mean (length 3, or 1 to broadcast).
        std: Per-channel std (same length rules).
        augment: ``"none"`` or ``"flip"`` (random horizontal flip with probability 0.5).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: str = "none"):
        self.mean = _three(mean, "mean")
        self.std = _three(std, "std")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.augment = augment

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``(3, S, S)`` uint8 -> ``(3, S, S)`` float32, normalised."""
        if self.augment == "flip" and torch.rand(()) < 0.5:
            image = F.horizontal_flip(image)
        x = F.to_dtype(image, torch.float32, scale=True)
        return F.normalize(x, list(self.mean), list(self.std))

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std}, augment={self.augment!r})"


def _three(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{name} must have 1 or 3 values, got {values}")
    return values  # type: ignore[return-value]
