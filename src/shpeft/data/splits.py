"""Seeded, stratified train/val/test splits.

The split is made per class so every split keeps the class proportions of the whole set:

1. Split sizes: ``round(N * fraction)`` for test and for val, shared out over the classes by the
   largest-remainder method (each class gets ``floor(n_c * fraction)`` and the leftover slots go
   to the classes with the largest fractional parts, ties to the lower class index). The totals
   therefore match the requested fractions as closely as integers allow.
2. Tiny classes: a class with at least 3 samples gets at least one sample in each requested split
   (fraction > 0), so per-class validation/test metrics stay defined on very small sets; train
   always keeps at least one sample per class.
3. Membership: ``numpy.random.default_rng(seed)`` permutes each class's indices (classes in
   index order); the first slots go to test, the next to val, the rest to train.

The returned index arrays are sorted. Callers record the resulting sample ids (see
``DataBundle.split_record``) so a split can be reproduced exactly even if NumPy's generator were
ever to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["allocate", "stratified_split"]


def allocate(class_counts: Sequence[int], fraction: float) -> np.ndarray:
    """Share ``round(sum(class_counts) * fraction)`` slots over classes, proportionally.

    Args:
        class_counts: Number of samples per class.
        fraction: Fraction of all samples to allocate, in ``[0, 1]``.

    Returns:
        Integer array, one entry per class, each ``<= class_counts[c]``.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    if fraction <= 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    ideal = counts * float(fraction)
    alloc = np.floor(ideal).astype(np.int64)
    target = int(np.floor(counts.sum() * float(fraction) + 0.5))  # round half up, not to even
    remainder = ideal - alloc
    # Stable sort on -remainder: ties go to the lower class index, deterministically.
    order = np.argsort(-remainder, kind="stable")
    for c in order[: max(0, target - int(alloc.sum()))]:
        alloc[c] += 1
    return np.minimum(alloc, counts)


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sample indices into train/val/test, stratified by label and seeded.

    Args:
        labels: Integer class label per sample.
        val_fraction: Fraction of all samples for validation (0 for none).
        test_fraction: Fraction of all samples for test (0 for none).
        seed: Seed of the permutation; the same labels and seed always give the same split.

    Returns:
        ``(train, val, test)`` sorted ``int64`` index arrays; disjoint, covering every index.

    Raises:
        ValueError: Bad fractions or a negative seed.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), empty.copy()
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes], dtype=np.int64)

    n_test = allocate(counts, test_fraction)
    n_val = allocate(counts, val_fraction)
    for k, n in enumerate(counts):
        # Keep every requested split populated per class when the class can afford it.
        if n >= 3:
            if test_fraction > 0:
                n_test[k] = max(n_test[k], 1)
            if val_fraction > 0:
                n_val[k] = max(n_val[k], 1)
        # Train keeps at least one sample of each class; take back from val first, then test.
        while n_test[k] + n_val[k] > n - 1 and n_val[k] > 0:
            n_val[k] -= 1
        while n_test[k] + n_val[k] > n - 1 and n_test[k] > 0:
            n_test[k] -= 1

    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for k, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        t, v = int(n_test[k]), int(n_val[k])
        test.append(idx[:t])
        val.append(idx[t : t + v])
        train.append(idx[t + v :])
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in (train, val, test))  # type: ignore[return-value]
