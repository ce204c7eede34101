"""A data source's samples before any image is decoded: the :class:`Catalog`.

A reader (:mod:`shpeft.data.sources` for the generic formats, :mod:`shpeft.data.layouts` for the
native layouts of the paper's data sets) returns a catalog: the samples grouped by official split
(``train`` / ``val`` / ``test``) or, when the source has no split, in one group ``all``; each
sample has an id, a class name and either a file path or a row of an in-memory array. Also the
folder-scanning helpers both readers share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import DataError, is_hidden, is_image_file, is_mask_file

SPLITS = ("train", "val", "test")
# Accepted spellings of split names (folders and the CSV `split` column), case-insensitive.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}

# Label names of the 2D MedMNIST v2 datasets (medmnist/info.py, "label" entries, in index order).


@dataclass
class Group:
    """Samples of one split (or of the whole source).

    Attributes:
        ids: Sample ids: path relative to the root (folders), path as written (CSV), or
            ``<split>/<row>`` (npz).
        labels: Class name per sample.
        paths: File per sample (folders, CSV), else None.
        images: ``(N, H, W)`` / ``(N, H, W, 3)`` uint8 array (npz), else None.
        origin: Where the samples come from, for error messages (a folder or file).
        patients: Patient (or acquisition) id per sample when the layout provides one (LIMUC,
            Kermany CXR/OCT file names); seeded splits then keep each patient in one split.
    """

    ids: list[str]
    labels: list[str]
    paths: list[str] | None = None
    images: np.ndarray | None = None
    origin: str = ""
    patients: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Catalog:
    """All samples of a source, grouped by official split (or one group ``"all"``)."""

    source: Path
    format: str
    layout: str
    groups: dict[str, Group]
    classes: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def has_official_split(self) -> bool:
        """True when the source itself defines the split (groups are train/val/test)."""
        return "all" not in self.groups


def visible_subdirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)),
        key=lambda p: p.name,
    )


def loose_files(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and not is_hidden(p.name))


def scan_class_folder(folder: Path, root: Path, skipped: dict[str, int]) -> list[Path]:
    """Image files anywhere under ``folder``, sorted by relative path; counts what is skipped."""
    found: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop: do not walk the same folder twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        hidden_dirs = [d for d in dirnames if is_hidden(d)]
        skipped["hidden"] += len(hidden_dirs)
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in filenames:
            if is_hidden(name):
                skipped["hidden"] += 1
            elif not is_image_file(name):
                skipped["non_image"] += 1
            elif is_mask_file(name):
                skipped["masks"] += 1
            else:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_class_folders(folder: Path, root: Path, skipped: dict[str, int]) -> Group:
    class_dirs = visible_subdirs(folder)
    if not class_dirs:
        raise DataError(
            f"{folder}: no class folders found (expected <root>/<class>/<images> or "
            "<root>/<split>/<class>/<images>)"
        )
    skipped["outside_class_folders"] += loose_files(folder)
    ids: list[str] = []
    labels: list[str] = []
    paths: list[str] = []
    for class_dir in class_dirs:
        files = scan_class_folder(class_dir, root, skipped)
        if not files:
            raise DataError(f"class folder {class_dir} contains no images")
        for f in files:
            ids.append(f.relative_to(root).as_posix())
            labels.append(class_dir.name)
            paths.append(str(f))
    return Group(ids=ids, labels=labels, paths=paths, origin=str(folder))
