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

Two variants keep related samples together:

* :func:`grouped_stratified_split` (patients): whole groups are assigned, stratified by each
  group's majority class, filling each class's test and val targets (in samples) greedily in a
  seeded group order. Sizes follow the fractions as closely as the group sizes allow.
* :func:`keep_together` (exact duplicates, few and small): after a plain stratified split, every
  duplicate group that straddles splits is moved whole into the split holding most of it
  (ties: train, then val, then test), so an image never sits in train and in val/test at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["allocate", "grouped_stratified_split", "keep_together", "stratified_split"]


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
    _check_arguments(val_fraction, test_fraction, seed)
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


def _check_arguments(val_fraction: float, test_fraction: float, seed: int) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def grouped_stratified_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[object] | np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sample indices into train/val/test so that no group is in two splits.

    Each group (e.g. a patient) is stratified by its majority label (ties: lowest label). Per
    stratum the groups are permuted with ``numpy.random.default_rng(seed)``; each group goes to
    test if that brings test closer to its target sample count, else to val likewise, else to
    train. A stratum with at least 3 groups gets at least one group in each requested split,
    and train keeps at least one group of every stratum.

    Args:
        labels: Integer class label per sample.
        groups: Group id per sample (any values that ``numpy.unique`` can sort, e.g. strings).
        val_fraction: Fraction of all samples for validation (0 for none).
        test_fraction: Fraction of all samples for test (0 for none).
        seed: Seed of the group permutation.

    Returns:
        ``(train, val, test)`` sorted ``int64`` index arrays; disjoint, covering every index.
    """
    _check_arguments(val_fraction, test_fraction, seed)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), empty.copy()
    _, gid = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if len(gid) != len(labels):
        raise ValueError(f"{len(gid)} group ids for {len(labels)} labels")
    classes, lab = np.unique(labels, return_inverse=True)
    n_groups = int(gid.max()) + 1
    table = np.zeros((n_groups, len(classes)), np.int64)
    np.add.at(table, (gid, lab), 1)
    sizes = table.sum(1)
    dominant = table.argmax(1)
    strata = np.bincount(dominant, weights=sizes, minlength=len(classes)).astype(np.int64)
    want = {2: allocate(strata, test_fraction), 1: allocate(strata, val_fraction)}
    fractions = {2: test_fraction, 1: val_fraction}

    rng = np.random.default_rng(seed)
    assign = np.zeros(n_groups, np.int8)  # 0 train, 1 val, 2 test
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(dominant == c))
        filled = {2: 0, 1: 0}
        for g in members:
            for split in (2, 1):
                target, have = int(want[split][c]), filled[split]
                # Take the group only if that gets closer to the target (big groups stay in train).
                if have < target and abs(have + sizes[g] - target) < target - have:
                    assign[g] = split
                    filled[split] += int(sizes[g])
                    break
        if len(members) >= 3:
            for split in (2, 1):
                if fractions[split] > 0 and not (assign[members] == split).any():
                    spare = members[assign[members] == 0]
                    if len(spare) > 1:
                        assign[spare[np.argmin(sizes[spare])]] = split
        if len(members) and not (assign[members] == 0).any():
            for split in (1, 2):
                taken = members[assign[members] == split]
                if len(taken):
                    assign[taken[np.argmin(sizes[taken])]] = 0
                    break
    per_sample = assign[gid]
    return tuple(np.flatnonzero(per_sample == k).astype(np.int64) for k in (0, 1, 2))  # type: ignore[return-value]


def keep_together(
    train: np.ndarray, val: np.ndarray, test: np.ndarray, keys: Sequence[object]
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """Move samples so that all samples sharing a key end up in one split.

    Args:
        train: Index array of train (as from :func:`stratified_split`).
        val: Index array of val.
        test: Index array of test.
        keys: Key per sample (e.g. a hash of its pixels); samples with equal keys belong together.

    Returns:
        ``((train, val, test), moved)``: sorted index arrays and the number of samples moved.
        A straddling group goes to the split holding most of it; ties prefer train, then val.
    """
    where = np.full(len(keys), -1, np.int64)
    for k, part in enumerate((train, val, test)):
        where[np.asarray(part, dtype=np.int64)] = k
    members: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    moved = 0
    for rows in members.values():
        splits = where[rows]
        if len(rows) < 2 or (splits == splits[0]).all():
            continue
        votes = np.bincount(splits, minlength=3)
        target = int(np.argmax(votes))  # argmax takes the first maximum: train, then val
        moved += int((splits != target).sum())
        where[rows] = target
    parts = tuple(np.flatnonzero(where == k).astype(np.int64) for k in range(3))
    return parts, moved  # type: ignore[return-value]
