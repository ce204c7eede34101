"""Public entry points: ``DataConfig`` -> ``DataBundle`` (train/val/test datasets + split record).

How splits are made:

* The source has an official split (``<root>/{train,val,test}/<class>/...``, a CSV ``split``
  column, a MedMNIST ``.npz``): it is used as is. When it has no val split, a stratified val set
  of ``val_fraction`` of the *train* samples is carved out of train with ``split_seed``; without
  a test split, ``test`` is None.
* Otherwise: a seeded, stratified train/val/test split of all samples with ``val_fraction`` and
  ``test_fraction`` (defaults: the BUSI proportions of the paper, 559/79/160 of 798). A fraction
  of 0 gives None for that split.
* ``split_file``: a ``split_record`` saved by an earlier run is replayed id for id instead.

Seeded splits (and carved val sets) keep related samples together:

* patients, where the layout gives patient ids (LIMUC, Kermany CXR/OCT file names): a
  group-aware stratified split (:func:`~shpeft.data.splits.grouped_stratified_split`), kind
  ``patient-grouped``;
* exact duplicates: samples with identical content are never split apart (BUSI has
  ``benign (433).png`` = ``malignant (145).png``). Content is compared by the resized cached
  image when the bundle is cached (the cache is then built once over the whole pool and sliced),
  by the image row for MedMNIST arrays, else by the file bytes. See ``split_record["grouping"]``.

The ``split_record`` is JSON-serialisable and lists every sample id and label name per split,
the format (e.g. ``busi``, ``cxr3``), the catalog ``layout`` (``flat`` / ``split``) and the
``split_kind`` of every split: ``official``, ``seeded-stratified``, ``patient-grouped`` or
``replayed``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .datasets import ArrayImageDataset, DataBundle, FileImageDataset, LabelledImageDataset
from .io import DataError, is_hidden, is_image_file, is_mask_file
from .keys import array_key, file_key
from .leakage import dataset_keys
from .sources import SPLITS, Catalog, read_catalog
from .splits import Selection, SplitPlan, plan_split, pool_of, pool_train_val
from .transforms import parse_interpolation

__all__ = [
    "CACHE_AUTO_LIMIT_BYTES",
    "DataBundle",
    "DataConfig",
    "SplitPlan",
    "list_images",
    "load_data",
    "load_eval_data",
    "plan_split",
]

# cache="auto" caches when all resized images of the bundle fit in this many bytes.
from shpeft.config import DataConfig

CACHE_AUTO_LIMIT_BYTES = 2 * 1024**3
SPLIT_RECORD_VERSION = 1


# --------------------------------------------------------------------------------------------
# load_data


def load_data(
    cfg: DataConfig,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    classes: list[str] | None = None,
) -> DataBundle:
    """Load a source, split it (or replay a recorded split) and build the datasets.

    Args:
        cfg: Data configuration.
        image_size: Side of the square model input (e.g. the timm model's ``img_size``).
        mean: Normalisation mean per channel (timm ``pretrained_cfg["mean"]``).
        std: Normalisation std per channel.
        interpolation: Resize interpolation (timm ``pretrained_cfg["interpolation"]``).
        classes: Fix the class list (and its order), e.g. when resuming from a checkpoint;
            sample labels are mapped by name onto it. Default: the source's sorted class names.

    Returns:
        The bundle; ``train`` augments per ``cfg.augment``, ``val``/``test`` never do.

    Raises:
        DataError: Missing/unreadable/inconsistent data, a single class, a class absent from
            train, a class name not in ``classes``, or a split record that does not match.
    """
    parse_interpolation(interpolation)  # fail before any scanning
    catalog = read_catalog(cfg.data, cfg.data_format)
    if cfg.resplit_val and not cfg.split_file:
        catalog = pool_train_val(catalog)
    final_classes = _resolve_classes(catalog, classes)
    if len(final_classes) < 2:
        raise DataError(
            f"{catalog.source}: only one class ({final_classes[0]!r}) found; classification "
            "needs at least two"
        )

    kwargs = dict(image_size=image_size, mean=mean, std=std, interpolation=interpolation)
    # Every sample of the catalog is used unless a replayed record leaves some out, so the cache
    # decision can be made before splitting (the pool cache below needs it).
    n_total = sum(len(g) for g in catalog.groups.values())
    use_cache = cfg.cache == "yes" or (
        cfg.cache == "auto" and n_total * 3 * image_size * image_size < CACHE_AUTO_LIMIT_BYTES
    )

    pool_cache: tuple[str, torch.Tensor] | None = None
    if cfg.split_file:
        record = _read_record(cfg.split_file)
        selections, methods = _selections_from_record(catalog, record)
        plan = SplitPlan(selections, methods, dict.fromkeys(selections, "replayed"), {})
    else:
        pool = pool_of(catalog)
        keys, by = None, None
        if pool is not None:
            keys, by, cache = _pool_keys(
                catalog, pool, final_classes, use_cache, cfg.num_workers, kwargs
            )
            if cache is not None:
                pool_cache = (pool, cache)
        plan = plan_split(
            catalog,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            seed=cfg.split_seed,
            duplicate_keys=keys,
            duplicates_by=by,
        )
    selections = plan.selections

    _check_train_classes(catalog, selections, final_classes)

    datasets: dict[str, LabelledImageDataset | None] = {}
    for split in SPLITS:
        sel = selections.get(split)
        if sel is None or not _selection_size(sel):
            datasets[split] = None
            continue
        augment = cfg.augment if split == "train" else "none"
        datasets[split] = _build_dataset(catalog, sel, final_classes, augment=augment, **kwargs)
        if pool_cache is not None and len(sel) == 1 and sel[0][0] == pool_cache[0]:
            # Slice the pool's cache instead of decoding these images a second time.
            datasets[split].adopt_cache(pool_cache[1][torch.from_numpy(sel[0][1])])  # type: ignore[union-attr]
    pool_cache = None  # free the pool cache before building the others

    if use_cache:
        for split, d in datasets.items():
            if d is not None:
                d.build_cache(num_threads=cfg.num_workers, desc=f"caching {split}")

    record = _make_record(catalog, cfg, final_classes, datasets, plan)
    return DataBundle(
        train=datasets["train"],  # type: ignore[arg-type]
        val=datasets["val"],
        test=datasets["test"],
        classes=final_classes,
        split_record=record,
    )


def _selection_size(sel: Selection) -> int:
    return sum(len(idx) for _, idx in sel)


def _pool_keys(
    catalog: Catalog,
    pool: str,
    classes: list[str],
    use_cache: bool,
    num_workers: int,
    kwargs: dict[str, Any],
) -> tuple[list[str], str, torch.Tensor | None]:
    """Content key per pool sample (for keeping exact duplicates together), how it was made,
    and the pool's cache when one was built for it."""
    group = catalog.groups[pool]
    if group.images is not None:
        return [array_key(image) for image in group.images], "pixels", None
    if use_cache:
        ds = _build_dataset(catalog, [(pool, np.arange(len(group)))], classes, **kwargs)
        ds.build_cache(num_threads=num_workers, desc="caching images")
        return dataset_keys(ds, "resized pixels"), "resized pixels", ds.cache
    return [file_key(p) for p in group.paths or []], "file bytes", None


def _resolve_classes(catalog: Catalog, classes: Sequence[str] | None) -> list[str]:
    if classes is None:
        return list(catalog.classes)
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise DataError(f"duplicate class names in {classes}")
    present = {c for g in catalog.groups.values() for c in g.labels}
    unknown = sorted(present - set(classes))
    if unknown:
        raise DataError(
            f"{catalog.source}: class name(s) {unknown} are not among the expected classes "
            f"{classes} (labels are matched by name)"
        )
    return classes


def _check_train_classes(
    catalog: Catalog, selections: dict[str, Selection], classes: list[str]
) -> None:
    def names(sel: Selection | None) -> set[str]:
        if not sel:
            return set()
        return {catalog.groups[g].labels[i] for g, idx in sel for i in idx.tolist()}

    train = names(selections.get("train"))
    if not train:
        raise DataError(f"{catalog.source}: the train split is empty")
    if len(train) < 2:
        raise DataError(
            f"{catalog.source}: the train split holds a single class ({sorted(train)[0]!r}); "
            "classification needs at least two"
        )
    for split in ("val", "test"):
        absent = sorted(names(selections.get(split)) - train)
        if absent:
            raise DataError(
                f"{catalog.source}: class(es) {absent} appear in {split} but not in train"
            )


def _build_dataset(
    catalog: Catalog,
    sel: Selection,
    classes: list[str],
    *,
    augment: str = "none",
    **kwargs: Any,
) -> LabelledImageDataset:
    index = {c: i for i, c in enumerate(classes)}
    ids: list[str] = []
    labels: list[int] = []
    paths: list[str] = []
    arrays: list[np.ndarray] = []
    for key, idx in sel:
        group = catalog.groups[key]
        rows = idx.tolist()
        ids += [group.ids[i] for i in rows]
        labels += [index[group.labels[i]] for i in rows]
        if group.images is not None:
            arrays.append(group.images[idx])
        else:
            paths += [group.paths[i] for i in rows]  # type: ignore[index]
    common = dict(labels=labels, ids=ids, classes=classes, augment=augment, **kwargs)
    if arrays:
        images = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return ArrayImageDataset(np.ascontiguousarray(images), **common)
    return FileImageDataset(paths, **common)


# --------------------------------------------------------------------------------------------
# split record


def _make_record(
    catalog: Catalog,
    cfg: DataConfig,
    classes: list[str],
    datasets: dict[str, LabelledImageDataset | None],
    plan: SplitPlan,
) -> dict:
    splits: dict[str, dict] = {}
    counts: dict[str, dict[str, int]] = {}
    for split, d in datasets.items():
        if d is None:
            continue
        splits[split] = {"ids": list(d.ids), "labels": [classes[y] for y in d.labels.tolist()]}
        counts[split] = d.class_counts()
    return {
        "version": SPLIT_RECORD_VERSION,
        "source": str(cfg.data),
        "source_resolved": str(Path(cfg.data).resolve()),
        "format": catalog.format,
        "layout": catalog.layout,
        "official_split": catalog.has_official_split,
        "seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "split_file": str(cfg.split_file) if cfg.split_file else None,
        "methods": {s: plan.methods[s] for s in splits},
        "split_kind": {s: plan.kinds[s] for s in splits},
        "grouping": plan.grouping,
        "notes": list(catalog.notes),
        "allow_leakage": bool(cfg.allow_leakage),
        "classes": list(classes),
        "skipped": dict(catalog.skipped),
        "sizes": {s: len(v["ids"]) for s, v in splits.items()},
        "counts": counts,
        "splits": splits,
    }


def _read_record(path: str | os.PathLike[str]) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read split record {path}: {e}") from e
    if not isinstance(record, dict) or "splits" not in record:
        raise DataError(f"{path}: not a split record (no 'splits' entry)")
    return record


def _selections_from_record(catalog: Catalog, record: dict) -> tuple[dict[str, Selection], dict]:
    """Map a record's ids back onto the catalog, checking that the labels still agree."""
    if record.get("format") not in (None, catalog.format):
        raise DataError(
            f"split record is for a {record.get('format')} source, but {catalog.source} is "
            f"{catalog.format}"
        )
    where: dict[str, tuple[str, int]] = {}
    for key, group in catalog.groups.items():
        for i, sample_id in enumerate(group.ids):
            where[sample_id] = (key, i)
    selections: dict[str, Selection] = {}
    used: set[str] = set()
    for split, entry in record["splits"].items():
        if split not in SPLITS:
            raise DataError(f"split record has an unknown split {split!r}")
        ids, labels = entry.get("ids", []), entry.get("labels", [])
        if len(ids) != len(labels):
            raise DataError(f"split record: {split} has {len(ids)} ids but {len(labels)} labels")
        missing = [i for i in ids if i not in where]
        if missing:
            raise DataError(
                f"split record lists {len(missing)} {split} sample(s) absent from "
                f"{catalog.source}, e.g. {missing[:3]}"
            )
        keys: list[str] = []
        rows: list[list[int]] = []
        for sample_id, label in zip(ids, labels, strict=True):
            key, i = where[sample_id]
            actual = catalog.groups[key].labels[i]
            if actual != label:
                raise DataError(
                    f"split record: {sample_id} is labelled {label!r} there but {actual!r} in "
                    f"{catalog.source}"
                )
            # Consecutive samples of one group form one segment (arrays stay contiguous).
            if not keys or keys[-1] != key:
                keys.append(key)
                rows.append([])
            rows[-1].append(i)
            used.add(sample_id)
        segments: Selection = [
            (k, np.asarray(r, dtype=np.int64)) for k, r in zip(keys, rows, strict=True)
        ]
        selections[split] = segments
    unused = len(where) - len(used)
    if unused:
        warnings.warn(
            f"{catalog.source}: {unused} sample(s) are in no split of the split record "
            "(new files since it was made?); they are not used",
            stacklevel=3,
        )
    methods = {
        s: f"replayed from split record ({record.get('methods', {}).get(s, '?')})"
        for s in selections
    }
    return selections, methods


# --------------------------------------------------------------------------------------------
# eval / predict


def load_eval_data(
    path: str,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    classes: list[str],
    data_format: str = "auto",
    split: str = "test",
    interpolation: str = "bicubic",
    split_record: dict | None = None,
) -> LabelledImageDataset:
    """Build a labelled evaluation set with labels mapped by name onto a trained run's classes.

    Which samples:

    * ``split="all"``: every sample of the source.
    * ``split="train" | "val" | "test"`` and ``split_record`` given: exactly the ids the record
      lists for that split (e.g. the carved-out test set of a flat folder used in training).
    * Otherwise, a source with an official split: that split (error if it has none such).
    * Otherwise (flat folder, CSV without a split column): all samples.

    Args:
        path: Folder, CSV manifest or MedMNIST ``.npz``.
        image_size: Model input side.
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        classes: The trained run's class names (labels are mapped by name; order kept).
        data_format: ``auto`` | ``imagefolder`` | ``csv`` | ``medmnist``.
        split: ``test`` (default), ``val``, ``train`` or ``all``.
        interpolation: Resize interpolation.
        split_record: Optional ``DataBundle.split_record`` of the trained run.

    Returns:
        A dataset without augmentation and without cache (one pass).

    Raises:
        DataError: A class name of the data not in ``classes``, a requested split the source
            lacks, or any loading problem.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of train/val/test/all, got {split!r}")
    parse_interpolation(interpolation)
    catalog = read_catalog(path, data_format)
    if split == "all":
        sel: Selection = [(k, np.arange(len(g))) for k, g in catalog.groups.items()]
    elif split_record is not None:
        if split not in split_record.get("splits", {}):
            raise DataError(f"the split record has no {split!r} split")
        one = {**split_record, "splits": {split: split_record["splits"][split]}}
        with warnings.catch_warnings():
            # The other splits' samples are unused on purpose here.
            warnings.simplefilter("ignore")
            sel = _selections_from_record(catalog, one)[0][split]
    elif catalog.has_official_split:
        if split not in catalog.groups:
            raise DataError(
                f"{catalog.source} has no {split!r} split (it has {sorted(catalog.groups)}); "
                "pass split='all' to use every sample"
            )
        sel = [(split, np.arange(len(catalog.groups[split])))]
    else:
        sel = [("all", np.arange(len(catalog.groups["all"])))]
    used = {catalog.groups[k].labels[i] for k, idx in sel for i in idx.tolist()}
    unknown = sorted(used - {str(c) for c in classes})
    if unknown:
        raise DataError(
            f"{catalog.source}: class name(s) {unknown} are not among the model's classes "
            f"{list(classes)} (labels are matched by name)"
        )
    if not _selection_size(sel):
        raise DataError(f"{catalog.source}: no samples in the {split!r} split")
    return _build_dataset(
        catalog,
        sel,
        [str(c) for c in classes],
        image_size=image_size,
        mean=mean,
        std=std,
        interpolation=interpolation,
    )


def list_images(path: str | os.PathLike[str], *, skip_masks: bool = True) -> list[str]:
    """All image files under a folder (recursive, sorted), or the single file given.

    Hidden files/folders and non-image files are skipped, and, unless ``skip_masks`` is False,
    BUSI mask files (``*_mask.png``) too.

    Raises:
        DataError: The path does not exist, is not an image file, or holds no images.
    """
    root = Path(path)
    if root.is_file():
        if not is_image_file(root):
            raise DataError(f"{root} is not an image file (known extensions: png, jpg, dcm, ...)")
        return [str(root)]
    if not root.is_dir():
        raise DataError(f"not found: {root}")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        for name in filenames:
            if is_hidden(name) or not is_image_file(name):
                continue
            if skip_masks and is_mask_file(name):
                continue
            found.append(Path(dirpath) / name)
    if not found:
        raise DataError(f"{root}: no image files found")
    return [str(p) for p in sorted(found, key=lambda p: p.relative_to(root).as_posix())]


def make_loader(
    dataset, batch_size: int, *, seed: int = 0, shuffle: bool = False, num_workers: int = 0
):
    """A loader over ``dataset``: fixed order, or one seeded shuffle (evaluation, importance)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers
    )
