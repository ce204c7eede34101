"""stratified_split: stratified, seeded, disjoint, covering."""

from __future__ import annotations

import numpy as np
import pytest

from shpeft.data import stratified_split
from shpeft.data.splits import allocate

# BUSI-like class sizes (benign, malignant, normal).
LABELS = np.repeat([0, 1, 2], [437, 210, 133])
FRACTIONS = {"val_fraction": 0.099, "test_fraction": 0.2005}


def test_disjoint_and_covering() -> None:
    train, val, test = stratified_split(LABELS, seed=0, **FRACTIONS)
    together = np.concatenate([train, val, test])
    assert len(together) == len(LABELS)
    assert set(together.tolist()) == set(range(len(LABELS)))
    for part in (train, val, test):
        assert np.all(np.diff(part) > 0)  # sorted, no repeats


def test_sizes_follow_fractions_and_strata() -> None:
    train, val, test = stratified_split(LABELS, seed=0, **FRACTIONS)
    n = len(LABELS)
    assert abs(len(test) - n * FRACTIONS["test_fraction"]) <= 1
    assert abs(len(val) - n * FRACTIONS["val_fraction"]) <= 1
    for c in range(3):
        n_c = int((c == LABELS).sum())
        assert abs(int((LABELS[test] == c).sum()) - n_c * FRACTIONS["test_fraction"]) < 1
        assert abs(int((LABELS[val] == c).sum()) - n_c * FRACTIONS["val_fraction"]) < 1


def test_same_seed_same_split_other_seed_other_split() -> None:
    a = stratified_split(LABELS, seed=3, **FRACTIONS)
    b = stratified_split(LABELS, seed=3, **FRACTIONS)
    c = stratified_split(LABELS, seed=4, **FRACTIONS)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    assert [len(x) for x in a] == [len(x) for x in c]  # sizes do not depend on the seed


def test_small_classes_reach_every_split() -> None:
    labels = np.repeat([0, 1, 2], [3, 4, 30])
    train, val, test = stratified_split(labels, seed=0, **FRACTIONS)
    for part in (train, val, test):
        assert set(labels[part].tolist()) == {0, 1, 2}
    single = np.array([0, 1, 1, 1, 1, 1])
    train, _, _ = stratified_split(single, seed=0, **FRACTIONS)
    assert 0 in single[train]  # a class of one sample stays in train


def test_zero_fractions_give_empty_splits() -> None:
    train, val, test = stratified_split(LABELS, seed=0, val_fraction=0.0, test_fraction=0.0)
    assert len(train) == len(LABELS) and len(val) == 0 and len(test) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": -0.1, "test_fraction": 0.2, "seed": 0},
        {"val_fraction": 0.5, "test_fraction": 0.5, "seed": 0},
        {"val_fraction": 0.1, "test_fraction": 0.2, "seed": -1},
    ],
)
def test_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        stratified_split(LABELS, **kwargs)


def test_allocate_sums_to_rounded_target() -> None:
    counts = [437, 210, 133]
    for fraction in (0.0, 0.099, 0.2005, 0.5, 0.999):
        alloc = allocate(counts, fraction)
        assert alloc.sum() == int(np.floor(sum(counts) * fraction + 0.5))
        assert np.all(alloc <= counts) and np.all(alloc >= 0)
