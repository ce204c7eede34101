"""Fixtures for the data tests: tiny image trees, manifests and npz files built in tmp_path."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_png(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> Path:
    """A small RGB PNG with content that depends on ``seed`` (so files differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def write_png() -> Callable[..., Path]:
    """``write_png(path, seed, size=(12, 10))`` writes a small random RGB PNG."""
    return _write_png


@pytest.fixture
def make_folder() -> Callable[..., Path]:
    """``make_folder(root, {"a": 5, "b": 3})`` writes ``root/<class>/<class>_<i>.png``."""

    def make(root: Path, counts: dict[str, int], start_seed: int = 0) -> Path:
        seed = start_seed
        for cls, n in counts.items():
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _write_png(root / cls / f"{cls}_{i:03d}.png", seed)
                seed += 1
        return root

    return make


@pytest.fixture
def make_csv() -> Callable[..., Path]:
    """``make_csv(path, rows, header=("path", "label"))`` writes a manifest."""

    def make(path: Path, rows: list[tuple], header: tuple[str, ...] = ("path", "label")) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        return path

    return make


@pytest.fixture
def make_npz() -> Callable[..., Path]:
    """``make_npz(path, {"train": labels, ...}, rgb=False, column=True)`` writes a MedMNIST npz."""

    def make(
        path: Path,
        labels: dict[str, list[int]],
        *,
        rgb: bool = False,
        column: bool = True,
        side: int = 8,
    ) -> Path:
        rng = np.random.default_rng(0)
        arrays = {}
        for split, labs in labels.items():
            shape = (len(labs), side, side, 3) if rgb else (len(labs), side, side)
            arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
            lab = np.asarray(labs, dtype=np.uint8)
            arrays[f"{split}_labels"] = lab[:, None] if column else lab
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
        return path

    return make
