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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .catalog import SPLITS, Catalog, Group
from .io import DataError

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


# --------------------------------------------------------------------------------------------
# Planning the split of a catalog

# A selection is a list of (group key, row indices into that group), concatenated in order.
Selection = list[tuple[str, np.ndarray]]


def _labels_of(catalog: Catalog, group: str) -> np.ndarray:
    """Integer labels of a group in the catalog's own class order (for stratification)."""
    index = {c: i for i, c in enumerate(catalog.classes)}
    return np.array([index[c] for c in catalog.groups[group].labels], dtype=np.int64)


@dataclass
class SplitPlan:
    """How a catalog is split (see :func:`plan_split`).

    Attributes:
        selections: Per split, ``[(group key, row indices)]``.
        methods: Per split, a sentence saying how it was made.
        kinds: Per split: ``official``, ``seeded-stratified``, ``patient-grouped`` or
            ``replayed``.
        grouping: What was kept together (patients, exact duplicates), JSON-able.
    """

    selections: dict[str, Selection]
    methods: dict[str, str]
    kinds: dict[str, str]
    grouping: dict[str, Any]


def pool_train_val(catalog: Catalog) -> Catalog:
    """The catalog with its official val merged into train (``DataConfig.resplit_val``).

    A seeded val is then carved from the pooled train like for sources without a val split.
    Sample ids are unchanged, so recorded splits replay against the unmerged catalog too.
    """
    groups = catalog.groups
    if "train" not in groups or "val" not in groups:
        return catalog
    tr, va = groups["train"], groups["val"]
    merged = Group(
        ids=tr.ids + va.ids,
        labels=tr.labels + va.labels,
        paths=tr.paths + va.paths if tr.paths is not None and va.paths is not None else None,
        images=(
            np.concatenate([tr.images, va.images])
            if tr.images is not None and va.images is not None
            else None
        ),
        origin=tr.origin,
        patients=(
            tr.patients + va.patients
            if tr.patients is not None and va.patients is not None
            else None
        ),
    )
    if merged.paths is None and merged.images is None:
        raise DataError(f"{catalog.source}: cannot pool train and val stored in different ways")
    new = {k: g for k, g in groups.items() if k != "val"}
    new["train"] = merged
    note = f"official val ({len(va)}) pooled with train ({len(tr)}); val carved from the pool"
    return replace(catalog, groups=new, notes=[*catalog.notes, note])


def pool_of(catalog: Catalog) -> str | None:
    """The group a seeded split is made of: all samples, the official train (val carved from
    it), or None (fully official split)."""
    if not catalog.has_official_split:
        return "all"
    if "train" in catalog.groups and "val" not in catalog.groups:
        return "train"
    return None


def _union_groups(patients: Sequence[str] | None, keys: Sequence[str] | None, n: int) -> list[str]:
    """One group id per sample: patients, merged where exact duplicates link two of them."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    nodes = [f"p:{patients[i]}" if patients is not None else f"s:{i}" for i in range(n)]
    if keys is not None:
        for i, key in enumerate(keys):
            a, b = find(nodes[i]), find(f"d:{key}")
            if a != b:
                parent[b] = a
    return [find(x) for x in nodes]


def _split_pool(
    catalog: Catalog,
    pool: str,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    keys: Sequence[str] | None,
    by: str | None,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], str, dict[str, Any]]:
    group = catalog.groups[pool]
    labels = _labels_of(catalog, pool)
    grouping: dict[str, Any] = {"patients": None, "duplicates_by": by}
    if keys is not None:
        counts: dict[str, int] = {}
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        dup_groups = [n for n in counts.values() if n > 1]
        grouping["duplicate_groups"] = len(dup_groups)
        grouping["duplicate_samples"] = sum(dup_groups)
        if not dup_groups:
            keys = None  # nothing to keep together
    fractions = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if group.patients is not None:
        ids = _union_groups(group.patients, keys, len(group))
        parts = grouped_stratified_split(labels, ids, **fractions)
        grouping["patients"] = len(set(group.patients))
        return parts, "patient-grouped", grouping
    parts = stratified_split(labels, **fractions)
    if keys is not None:
        parts, moved = keep_together(*parts, keys)
        grouping["moved_to_keep_duplicates_together"] = moved
    return parts, "seeded-stratified", grouping


def plan_split(
    catalog: Catalog,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    duplicate_keys: Sequence[str] | None = None,
    duplicates_by: str | None = None,
) -> SplitPlan:
    """Decide the train/val/test split of a catalog (official, or seeded as documented above).

    Args:
        catalog: The source's samples.
        val_fraction: Val fraction (of all samples; of train when carving val from train).
        test_fraction: Test fraction when the source has no official split.
        seed: Seed of the seeded part.
        duplicate_keys: Optional content key per sample of the pool that is split (all samples,
            or the official train when val is carved); equal keys stay in one split.
        duplicates_by: How the keys were made (recorded).

    Raises:
        DataError: An official split without train.
    """
    pool = pool_of(catalog)
    if pool == "all":
        (train, val, test), kind, grouping = _split_pool(
            catalog,
            "all",
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            keys=duplicate_keys,
            by=duplicates_by,
        )
        how = (
            "seeded stratified split of all samples, grouped by patient"
            if kind == "patient-grouped"
            else "seeded stratified split of all samples"
        )
        selections = {"train": [("all", train)], "val": [("all", val)], "test": [("all", test)]}
        return SplitPlan(
            selections, dict.fromkeys(SPLITS, how), dict.fromkeys(SPLITS, kind), grouping
        )
    if "train" not in catalog.groups:
        raise DataError(
            f"{catalog.source}: has an official split but no train split "
            f"(found {sorted(catalog.groups)})"
        )
    selections: dict[str, Selection] = {}
    methods: dict[str, str] = {}
    kinds: dict[str, str] = {}
    grouping: dict[str, Any] = {}
    if pool is None:
        selections["train"] = [("train", np.arange(len(catalog.groups["train"])))]
        selections["val"] = [("val", np.arange(len(catalog.groups["val"])))]
        methods["train"] = methods["val"] = "official"
        kinds["train"] = kinds["val"] = "official"
    else:
        (train, val, _), kind, grouping = _split_pool(
            catalog,
            "train",
            val_fraction=val_fraction,
            test_fraction=0.0,
            seed=seed,
            keys=duplicate_keys,
            by=duplicates_by,
        )
        selections["train"] = [("train", train)]
        selections["val"] = [("train", val)]
        methods["train"] = "official, minus the carved val"
        methods["val"] = f"seeded stratified carve of val_fraction of the official train ({kind})"
        kinds["train"] = "official"
        kinds["val"] = kind
    if "test" in catalog.groups:
        selections["test"] = [("test", np.arange(len(catalog.groups["test"])))]
        methods["test"] = kinds["test"] = "official"
    return SplitPlan(selections, methods, kinds, grouping)
