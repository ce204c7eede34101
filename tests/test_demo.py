"""Tests for shpeft.demo: the digits data files and the tiny pretrained backbone folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

from shpeft.demo import make_digits_data, pretrain_backbone

SPLITS = ("train", "val", "test")
KEYS = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")} | {"class_names"}


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> tuple[Path, Path]:
    return make_digits_data(tmp_path_factory.mktemp("digits"), seed=0)


def _load(path: Path) -> dict[str, np.ndarray]:
    # allow_pickle=False: class names must be a plain string array, not pickled objects.
    with np.load(path, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_files_have_medmnist_keys_and_dtypes(digits_files):
    for path in digits_files:
        d = _load(path)
        assert set(d) == KEYS
        for s in SPLITS:
            x, y = d[f"{s}_images"], d[f"{s}_labels"]
            assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (16, 16)
            assert y.dtype == np.uint8 and y.shape == (len(x), 1)
            assert x.max() > 200  # 0-16 counts were scaled to 0-255
        all_labels = np.concatenate([d[f"{s}_labels"].ravel() for s in SPLITS])
        assert sorted(np.unique(all_labels).tolist()) == [0, 1, 2, 3, 4]


def test_class_names(digits_files):
    pre, tra = (_load(p) for p in digits_files)
    assert pre["class_names"].tolist() == ["0", "1", "2", "3", "4"]
    assert tra["class_names"].tolist() == ["5", "6", "7", "8", "9"]


def test_splits_are_stratified_60_20_20(digits_files):
    for path in digits_files:
        d = _load(path)
        totals = sum(np.bincount(d[f"{s}_labels"].ravel(), minlength=5) for s in SPLITS)
        for s, frac in zip(SPLITS, (0.6, 0.2, 0.2), strict=True):
            counts = np.bincount(d[f"{s}_labels"].ravel(), minlength=5)
            assert np.all(np.abs(counts - frac * totals) <= 1), (s, counts, totals)


def _source_rows(digit_set: tuple[int, ...]) -> list[bytes]:
    """Source digits of a task at 8x8, scaled to uint8, each row = image bytes + remapped label."""
    digits = load_digits()
    keep = np.isin(digits.target, digit_set)
    images = np.round(digits.images[keep] * 255.0 / 16.0).astype(np.uint8).reshape(-1, 64)
    labels = (digits.target[keep] - digit_set[0]).astype(np.uint8)
    return sorted(img.tobytes() + bytes([lab]) for img, lab in zip(images, labels, strict=True))


@pytest.fixture(scope="module")
def digits_files_8(tmp_path_factory) -> tuple[Path, Path]:
    return make_digits_data(tmp_path_factory.mktemp("digits8"), seed=0, upscale=8)


def test_splits_partition_the_source_images(digits_files_8):
    """At upscale=8 the pixels are exact, so every source sample must appear in exactly one
    split: the multiset of (image, label) rows over all splits equals the source multiset."""
    for path, digit_set in zip(digits_files_8, ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)), strict=True):
        d = _load(path)
        assert d["train_images"].shape[1:] == (8, 8)
        rows = sorted(
            img.tobytes() + bytes([int(lab)])
            for s in SPLITS
            for img, lab in zip(
                d[f"{s}_images"].reshape(-1, 64), d[f"{s}_labels"].ravel(), strict=True
            )
        )
        assert rows == _source_rows(digit_set)


def test_upscale_changes_resolution_not_split(digits_files, digits_files_8):
    for path16, path8 in zip(digits_files, digits_files_8, strict=True):
        d16, d8 = _load(path16), _load(path8)
        for s in SPLITS:
            np.testing.assert_array_equal(d16[f"{s}_labels"], d8[f"{s}_labels"])
            # Same samples in the same order: the 2x2 mean of each upsampled image is nearest
            # (L1) to its own 8x8 original. Not always exactly: the set has near-duplicates.
            x16 = torch.from_numpy(d16[f"{s}_images"]).float()[:, None]
            down = torch.nn.functional.avg_pool2d(x16, 2).flatten(1)
            x8 = torch.from_numpy(d8[f"{s}_images"]).float().flatten(1)
            nearest = torch.cdist(down, x8, p=1).argmin(1)
            assert (nearest == torch.arange(len(x8))).float().mean() > 0.98


def test_same_seed_same_files_other_seed_other_split(tmp_path, digits_files):
    a = _load(digits_files[1])
    b = _load(make_digits_data(tmp_path / "again", seed=0)[1])
    c = _load(make_digits_data(tmp_path / "other", seed=1)[1])
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["train_images"], c["train_images"])


# threads=1 explicitly: module-scoped fixtures run before conftest pins the thread count, and
# results are only bit-identical for the same number of threads.
TINY = dict(epochs=1, depth=1, embed_dim=16, num_heads=2, batch_size=64, threads=1, progress=False)


@pytest.fixture(scope="module")
def tiny_backbone(digits_files, tmp_path_factory) -> Path:
    return pretrain_backbone(digits_files[0], tmp_path_factory.mktemp("bb") / "vit", **TINY)


def test_backbone_folder_loads_strictly(tiny_backbone, digits_files):
    card = json.loads((tiny_backbone / "card.json").read_text())
    for key in (
        "name",
        "arch",
        "kwargs",
        "param_count",
        "input",
        "dataset",
        "train",
        "test_top1",
        "file",
        "sha256",
    ):
        assert key in card, key
    assert card["arch"] == "timm.models.vision_transformer.VisionTransformer"
    assert set(card["kwargs"]) == {
        "img_size",
        "patch_size",
        "in_chans",
        "num_classes",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
    }
    assert card["kwargs"]["in_chans"] == 3 and card["kwargs"]["num_classes"] == 5
    assert card["input"]["size"] == [3, 16, 16]
    mean, std = card["input"]["mean"], card["input"]["std"]
    assert len(set(mean)) == 1 and len(set(std)) == 1 and 0 < mean[0] < 1 and std[0] > 0
    for key in ("seed", "steps", "wall_s", "epochs", "lr", "batch_size"):
        assert key in card["train"], key
    assert "scikit-learn" in card["dataset"]["dataset"]
    assert 0.0 <= card["test_top1"] <= 1.0

    path = tiny_backbone / card["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"]
    model = VisionTransformer(**card["kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    assert sum(p.numel() for p in model.parameters()) == card["param_count"]

    # The card's normalisation reproduces the recorded test accuracy from the npz alone.
    d = _load(digits_files[0])
    x = (torch.from_numpy(d["test_images"]).float() / 255.0 - mean[0]) / std[0]
    x = x[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).numpy()
    acc = float((pred == d["test_labels"].ravel()).mean())
    assert acc == pytest.approx(card["test_top1"])


def test_pretraining_is_deterministic(tiny_backbone, digits_files, tmp_path):
    again = pretrain_backbone(digits_files[0], tmp_path / "vit", **TINY)
    first = json.loads((tiny_backbone / "card.json").read_text())
    second = json.loads((again / "card.json").read_text())
    assert first["sha256"] == second["sha256"]
    other = pretrain_backbone(digits_files[0], tmp_path / "vit_s1", seed=1, **TINY)
    assert json.loads((other / "card.json").read_text())["sha256"] != first["sha256"]


def test_threads_argument_is_restored(digits_files, tmp_path):
    before = torch.get_num_threads()
    out = pretrain_backbone(digits_files[0], tmp_path / "vit", **{**TINY, "threads": 2})
    assert torch.get_num_threads() == before
    assert json.loads((out / "card.json").read_text())["train"]["threads"] == 2


def test_wrong_image_size_is_rejected(digits_files, tmp_path):
    with pytest.raises(ValueError, match="expected grayscale images"):
        pretrain_backbone(digits_files[0], tmp_path / "vit", img_size=32, **TINY)


@pytest.mark.slow
def test_run_demo_end_to_end(tmp_path):
    from shpeft.demo import run_demo

    rows = run_demo(
        tmp_path, iterations=8, methods=["shpeft", "linear"], pretrain_epochs=1, progress=False
    )
    assert [r["method"] for r in rows] == ["shpeft", "linear"]
    assert (
        rows[0]["trainable_pct"] == pytest.approx(1.0, abs=0.01) and rows[1]["trainable_pct"] == 0
    )
    assert (tmp_path / "results.md").is_file()
    assert (tmp_path / "runs" / "shpeft" / "delta.safetensors").is_file()
