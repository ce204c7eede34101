"""The real data sets in ../shared/data load with the documented counts and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from shpeft.data import DataConfig, load_data, load_eval_data

SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def _sizes(bundle) -> list[int]:
    return [len(bundle.train), len(bundle.val), len(bundle.test)]


def _check_items(ds, indices) -> None:
    for i in indices:
        x, y = ds[i]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and -1.0 - 1e-6 <= x.min() <= x.max() <= 1.0 + 1e-6
        assert 0 <= y < len(ds.classes)


def test_busi_256(shared_data: Path) -> None:
    root = shared_data / "busi_256"
    cfg = DataConfig(str(root), cache="no")  # stay fast: read only a few items
    bundle = load_data(cfg, image_size=SIZE, mean=MEAN, std=STD)
    assert bundle.classes == ["benign", "malignant", "normal"]
    expected = {"benign": 437, "malignant": 210, "normal": 133}
    rec = bundle.split_record
    totals = {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in expected}
    assert totals == expected
    # The paper's 559/79/160 of 798, as proportions of the 780 images here.
    n = sum(expected.values())
    for got, paper in zip(_sizes(bundle), (559, 79, 160), strict=True):
        assert abs(got - n * paper / 798) <= 1.5
    for split in ("train", "val", "test"):
        for c, total in expected.items():  # stratified: each class in proportion everywhere
            share = rec["counts"][split][c] / rec["sizes"][split]
            assert abs(share - total / n) < 0.02
    assert rec["skipped"]["masks"] == 0  # all_captions.csv and MANIFEST.txt are not classes
    json.dumps(rec)
    _check_items(bundle.train, [0, len(bundle.train) - 1])
    _check_items(bundle.test, [0])


def test_busi_original_sample_skips_masks(shared_data: Path) -> None:
    root = shared_data / "busi_original_sample"
    bundle = load_data(DataConfig(str(root), cache="no"), image_size=SIZE, mean=MEAN, std=STD)
    ids = [i for ds in (bundle.train, bundle.val, bundle.test) for i in ds.ids]
    assert len(ids) == len(set(ids)) == 24
    assert not any("_mask" in i for i in ids)
    assert bundle.split_record["skipped"]["masks"] == 24
    assert bundle.classes == ["benign", "malignant", "normal"]
    _check_items(bundle.val, range(len(bundle.val)))  # original resolution, ~500x600 RGB


def test_breastmnist(shared_data: Path) -> None:
    path = shared_data / "breastmnist" / "breastmnist.npz"
    bundle = load_data(DataConfig(str(path)), image_size=SIZE, mean=MEAN, std=STD)
    assert bundle.classes == ["malignant", "normal, benign"]
    assert _sizes(bundle) == [546, 78, 156]
    assert bundle.split_record["counts"]["train"] == {"malignant": 147, "normal, benign": 399}
    assert bundle.train.cached  # tiny: cached under cache="auto"
    with np.load(path) as npz:
        assert bundle.test.labels.tolist() == npz["test_labels"].reshape(-1).tolist()
    _check_items(bundle.train, [0, 545])
    ds = load_eval_data(
        str(path), image_size=SIZE, mean=MEAN, std=STD, classes=bundle.classes, split="test"
    )
    assert len(ds) == 156


def test_pneumoniamnist_reconstructed(shared_data: Path) -> None:
    path = shared_data / "pneumoniamnist_reconstructed" / "pneumoniamnist_reconstructed.npz"
    bundle = load_data(DataConfig(str(path), cache="no"), image_size=SIZE, mean=MEAN, std=STD)
    assert bundle.classes == ["normal", "pneumonia"]
    assert _sizes(bundle) == [4708, 524, 624]
    counts = bundle.split_record["counts"]
    assert counts["train"] == {"normal": 1214, "pneumonia": 3494}
    assert counts["test"] == {"normal": 234, "pneumonia": 390}
    _check_items(bundle.val, [0, 523])
