"""Every registered method's run gets a complete report: test metrics, explanation maps, and a
selection map exactly when its delta stores selected scalars.

One tiny run per method (a 2-block ViT on 16 px synthetic images, a few iterations) through the
real training loop, so a new method is covered as soon as it is registered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import shpeft
from shpeft.methods import METHODS
from shpeft.report.build import REPORT
from shpeft.report.predictions import load_predictions
from shpeft.report.sections import has_sparse_part

CLASSES = 3


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A model folder (card.json + weights) and a MedMNIST-style .npz of 16 px images."""
    root = tmp_path_factory.mktemp("tiny")
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    model = VisionTransformer(num_classes=CLASSES, **kwargs)
    folder = root / "model"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    card = {
        "arch": "timm.models.vision_transformer.VisionTransformer",
        "kwargs": kwargs,
        "file": "model.safetensors",
        "input": {"size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3},
    }
    (folder / "card.json").write_text(json.dumps(card))
    g = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 48), ("val", 12), ("test", 12)):
        labels = np.arange(n) % CLASSES
        # the class shifts the brightness: learnable, yet noisy enough for some mistakes
        images = g.integers(0, 160, (n, 16, 16)) + 40 * labels[:, None, None]
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    data = root / "tiny.npz"
    np.savez(data, **arrays)
    return folder, data


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_report_builds_for_every_method(method, tiny_setup, tmp_path):
    model_dir, data = tiny_setup
    run = tmp_path / method
    metrics = shpeft.train(
        shpeft.RunConfig(
            backbone=shpeft.BackboneConfig(model=str(model_dir)),
            data=shpeft.DataConfig(data=str(data)),
            train=shpeft.TrainConfig(
                out=str(run),
                method=method,
                iterations=4,
                batch_size=8,
                lr=0.05,
                eval_every=2,
                progress=False,
                threads=1,
            ),  # fmt: skip
        )
    )
    text = (run / REPORT).read_text()
    pred = load_predictions(run)
    assert pred is not None and len(pred.labels) == metrics["test"]["n"] == 12
    assert (
        f'data-key="test.macro_f1" data-value="{json.dumps(metrics["test"]["macro_f1"])}"' in text
    )
    # explanation maps for the method's model (adapters, LoRA, prompts, SSF all keep timm's attention)
    assert "No explanation maps" not in text and text.count('alt="Test image ') >= 4
    sparse = has_sparse_part(run)
    assert sparse == (method in ("shpeft", "spt-lora"))
    assert ('alt="Selection map' in text) == sparse and "No selection map" not in text
