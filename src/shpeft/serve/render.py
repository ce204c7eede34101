"""Heat maps as PNG data URLs: the image the model saw, with the relevance map on top."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from shpeft.backbones import InputSpec
from shpeft.data.transforms import resize_uint8
from shpeft.explain import overlay, to_display


def heatmap_data_url(x: torch.Tensor, heat: np.ndarray, spec: InputSpec, size: int = 224) -> str:
    """``data:image/png;base64,...`` of ``heat`` over the de-normalised input ``x``.

    Args:
        x: the ``(3, S, S)`` normalised input the map explains.
        heat: ``(rows, cols)`` map in [0, 1] over the patch grid.
        spec: the run's input spec (to undo the normalisation).
        size: side of the picture in pixels (small model inputs are scaled up to be seen).
    """
    picture = torch.from_numpy(to_display(x, spec.mean, spec.std)).permute(2, 0, 1)  # (3, S, S)
    picture = resize_uint8(picture, size, InterpolationMode.BILINEAR).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(overlay(np.ascontiguousarray(picture), heat)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
