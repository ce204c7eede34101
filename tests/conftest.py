"""Shared fixtures: paths into ../shared (skip with a reason when a user's clone lacks it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODELS = SHARED / "models"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (it ships beside the project in CI, not in a user's clone)")
    return path


@pytest.fixture
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture
def vit_pico_dir() -> Path:
    return _need(SHARED_MODELS / "vit_pico")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare tensors bit for bit; keep intra-op parallelism fixed and small.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
