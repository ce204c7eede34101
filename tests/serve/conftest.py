"""Tiny real runs for the serving tests, trained once per session on ../shared (vit_pico).

Five tasks on one base: SH-PEFT on two datasets (two and three classes), LoRA, AdaptFormer
(not mergeable: its own modules) and BitFit (a dense switch delta), so every way a task can be
served is covered.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shpeft.data.io import write_dicom
from tests.conftest import SHARED_DATA, SHARED_MODELS

TASKS = {
    # name: (method, data, method config or None)
    "busi": ("shpeft", "busi_small", {"ratio": 0.01}),
    "breast": ("shpeft", "breastmnist/breastmnist.npz", {"ratio": 0.002}),
    "breast-lora": ("lora", "breastmnist/breastmnist.npz", None),
    "breast-adapter": ("adapter", "breastmnist/breastmnist.npz", None),
    "breast-bitfit": ("bitfit", "breastmnist/breastmnist.npz", None),
}


def _need_shared() -> None:
    for path in (SHARED_MODELS / "vit_pico", SHARED_DATA / "busi_256", SHARED_DATA / "breastmnist"):
        if not path.exists():
            pytest.skip(f"{path} is absent (it ships beside the project in CI, not in a clone)")


def busi_small(root: Path, per_class: int = 24) -> Path:
    """An image folder of the first ``per_class`` BUSI images of each class (decodes fast)."""
    for cls in ("benign", "malignant", "normal"):
        (root / cls).mkdir(parents=True)
        for src in sorted((SHARED_DATA / "busi_256" / cls).glob("*.png"))[:per_class]:
            shutil.copy(src, root / cls / src.name)
    return root


def train_task(out: Path, method: str, data: Path, method_kw: dict | None) -> Path:
    """A few iterations of a real run (the tests need real deltas, not good ones)."""
    import shpeft
    from shpeft.methods import get_method

    config = get_method(method).config_cls(**(method_kw or {}))
    if method == "shpeft":
        config.importance_batches = 2
    shpeft.train(
        shpeft.RunConfig(
            backbone=shpeft.BackboneConfig(model=str(SHARED_MODELS / "vit_pico")),
            data=shpeft.DataConfig(data=str(data), allow_leakage=True),
            train=shpeft.TrainConfig(
                out=str(out),
                method=method,
                iterations=8,
                eval_every=8,
                batch_size=16,
                lr=0.05,
                progress=False,
                threads=1,
            ),
            method=config,
        )
    )
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``{task name: run directory}`` of the five trained tasks."""
    _need_shared()
    root = tmp_path_factory.mktemp("serve-runs")
    sources = {"busi_small": busi_small(root / "busi_small")}
    with pytest.warns(UserWarning, match="leakage"):  # BreastMNIST's known duplicate
        return {
            name: train_task(root / name, method, sources.get(data, SHARED_DATA / data), kw)
            for name, (method, data, kw) in TASKS.items()
        }


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Real ultrasound images in every upload format: PNG, JPEG, 16-bit TIFF, DICOM."""
    _need_shared()
    root = tmp_path_factory.mktemp("serve-images")
    out: dict[str, Path] = {}
    for cls in ("benign", "malignant", "normal"):
        src = sorted((SHARED_DATA / "busi_256" / cls).glob("*.png"))[0]
        out[f"{cls}.png"] = Path(shutil.copy(src, root / f"{cls}.png"))
    gray = np.asarray(Image.open(out["benign.png"]).convert("L"))
    Image.fromarray(gray).convert("RGB").save(root / "benign.jpg", quality=90)
    out["benign.jpg"] = root / "benign.jpg"
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "benign16.tif")
    out["benign16.tif"] = root / "benign16.tif"
    out["benign.dcm"] = write_dicom(root / "benign.dcm", gray.astype(np.uint16) * 16)
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
