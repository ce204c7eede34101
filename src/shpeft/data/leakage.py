"""Cheap exact-duplicate leakage check between train and val/test, run before training.

:func:`check_leakage_cheap` compares one content key per sample across the splits of a
:class:`~shpeft.data.loading.DataBundle`. The key is the cheapest one that is available:

* cached bundles: a hash of each cached, resized ``uint8`` image (what the model sees; the cache
  is already in memory, hashing 1,000 images at 224 px takes a fraction of a second);
* MedMNIST arrays: a hash of each image row;
* uncached files: a hash of the file bytes (no decoding; finds byte-identical copies only).

It finds *exact* duplicates only; near duplicates (re-encoded, brightened, cropped copies) are
the job of ``shpeft data check`` (:mod:`shpeft.data.check`).
"""

from __future__ import annotations

import warnings

from .datasets import ArrayImageDataset, DataBundle, FileImageDataset, LabelledImageDataset
from .io import DataError
from .keys import array_key, file_key

__all__ = ["array_key", "check_leakage_cheap", "dataset_keys", "file_key"]


def dataset_keys(dataset: LabelledImageDataset, by: str) -> list[str]:
    """One content key per sample of ``dataset``.

    Args:
        dataset: A labelled dataset.
        by: ``"resized pixels"`` (needs the cache), ``"pixels"`` (array datasets) or
            ``"file bytes"`` (file datasets).
    """
    if by == "resized pixels":
        return [array_key(dataset.resized(i)) for i in range(len(dataset))]
    if by == "pixels" and isinstance(dataset, ArrayImageDataset):
        return [array_key(image) for image in dataset.images]
    if by == "file bytes" and isinstance(dataset, FileImageDataset):
        return [file_key(p) for p in dataset.paths]
    raise ValueError(f"cannot key a {type(dataset).__name__} by {by!r}")


def _key_kind(datasets: list[LabelledImageDataset]) -> str:
    if all(d.cached for d in datasets):
        return "resized pixels"
    if all(isinstance(d, ArrayImageDataset) for d in datasets):
        return "pixels"
    if all(isinstance(d, FileImageDataset) for d in datasets):
        return "file bytes"
    return "resized pixels"  # mixed/unknown datasets: decode and resize (slow but correct)


def check_leakage_cheap(
    bundle: DataBundle, *, allow_leakage: bool = False, max_examples: int = 5
) -> list[str]:
    """Refuse a bundle whose train split shares an exact duplicate image with val or test.

    The result is also stored in ``bundle.split_record["leakage_check"]`` (so it lands in the
    run's ``split.json``).

    Args:
        bundle: The output of :func:`~shpeft.data.load_data`.
        allow_leakage: Only warn (and return the findings) instead of raising.
        max_examples: How many duplicate pairs each message lists.

    Returns:
        One message per leaking split pair (``train/val``, ``train/test``); empty when clean.

    Raises:
        DataError: Leakage found and ``allow_leakage`` is False; the message lists example pairs.
    """
    splits = {
        name: ds
        for name, ds in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
        if ds is not None and len(ds)
    }
    by = _key_kind(list(splits.values()))
    keys = {name: dataset_keys(ds, by) for name, ds in splits.items()}
    in_train: dict[str, int] = {}
    for i, key in enumerate(keys.get("train", [])):
        in_train.setdefault(key, i)

    messages: list[str] = []
    record: dict[str, object] = {"by": by, "allowed": bool(allow_leakage)}
    train = splits.get("train")
    for name in ("val", "test"):
        if name not in splits or train is None:
            continue
        other = splits[name]
        pairs = []
        for j, key in enumerate(keys[name]):
            if key in in_train:
                i = in_train[key]
                pairs.append(
                    f"train {train.ids[i]!r} ({train.classes[train.labels[i]]}) = {name} "
                    f"{other.ids[j]!r} ({other.classes[other.labels[j]]})"
                )
        record[f"train_{name}_duplicates"] = len(pairs)
        if pairs:
            more = f"; ... ({len(pairs) - max_examples} more)" if len(pairs) > max_examples else ""
            messages.append(
                f"{len(pairs)} {name} image(s) are exact duplicates of train images "
                f"(compared by {by}): " + "; ".join(pairs[:max_examples]) + more
            )
    record["messages"] = messages
    bundle.split_record["leakage_check"] = record
    if messages and not allow_leakage:
        raise DataError(
            "data leakage: "
            + " | ".join(messages)
            + ". The same image in train and in val/test inflates the scores. Remove the "
            "duplicates (`shpeft data check DATA` lists them, near duplicates too), or pass "
            "--allow-leakage (DataConfig.allow_leakage=True) to train anyway, e.g. on an "
            "official split that contains them"
        )
    for message in messages:
        warnings.warn(f"data leakage allowed: {message}", stacklevel=2)
    return messages
