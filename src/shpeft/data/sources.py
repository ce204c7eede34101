"""Discovering the samples of a data source (ImageFolder, CSV manifest, MedMNIST ``.npz``).

A reader returns a :class:`Catalog`: the samples grouped by official split (``train`` / ``val``
/ ``test``) or, when the source has no split, in one group ``all``; each sample has an id, a
class name and either a file path or a row of an in-memory array. Turning a catalog into
datasets (class mapping, seeded split, caching) is the job of :mod:`shpeft.data.loading`.

Layouts:

* ImageFolder, flat: ``<root>/<class>/**/<image>``. Split: ``<root>/<split>/<class>/**/<image>``
  with split folders ``train``, ``val`` (or ``valid`` / ``validation``), ``test``
  (case-insensitive). Class names are the class folder names, sorted. Hidden files and folders,
  non-image files and BUSI masks (``*_mask.png``, ``*_mask_1.png``) are skipped and counted;
  files directly in ``<root>`` (or a split folder) are ignored and counted.
* CSV manifest: header with ``path`` and ``label`` and optionally ``split`` (other columns are
  ignored); relative paths resolve against the CSV's folder. Labels that are all integers are
  sorted numerically (class names are their decimal strings), otherwise sorted as strings.
* Native layouts of the paper's data sets (``busi``, ``chaoyang``, ``covid-ct``, ``cxr3``,
  ``oct``, ``limuc``): read by :mod:`shpeft.data.layouts`, detected in ``auto`` mode by their
  folder and file names.
* MedMNIST ``.npz`` (any 2D set, any size: 28/64/128/224, gray or RGB): keys ``{train,val,test}_images`` / ``_labels``; class names from an optional
  ``class_names`` string array in the file, else from the MedMNIST INFO table when the file name
  starts with a known flag (``breastmnist...``), else ``"0"``, ``"1"``, ...
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from shpeft.config import FORMATS, NATIVE_FORMATS

from .catalog import (
    SPLIT_NAMES,
    SPLITS,
    Catalog,
    Group,
    loose_files,
    read_class_folders,
    visible_subdirs,
)
from .io import DataError
from .layouts import detect_layout, read_layout

__all__ = [
    "FORMATS",
    "MEDMNIST_CLASSES",
    "NATIVE_FORMATS",
    "SPLIT_NAMES",
    "Catalog",
    "Group",
    "detect_format",
    "read_catalog",
]

_ORGAN = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
MEDMNIST_CLASSES: dict[str, list[str]] = {
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    # RetinaMNIST is ordinal regression in MedMNIST; here it is treated as 5-class classification.
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}
_MULTI_LABEL_FLAGS = ("chestmnist",)
_VOLUME_FLAGS = (
    "organmnist3d",
    "nodulemnist3d",
    "adrenalmnist3d",
    "fracturemnist3d",
    "vesselmnist3d",
    "synapsemnist3d",
)

_INT = re.compile(r"^[+-]?\d+$")


def detect_format(path: str | os.PathLike[str], data_format: str = "auto") -> str:
    """Resolve ``"auto"`` to a format name.

    A folder is one of the native layouts when its structure says so unambiguously (see
    :func:`shpeft.data.layouts.detect_layout`: ``train.json`` -> chaoyang, ``Data-split/`` ->
    covid-ct, ``Dataset_BUSI_with_GT`` -> busi, ``chest_xray`` -> cxr3, ``OCT2017`` -> oct,
    ``Mayo 0`` -> limuc), else ``imagefolder``; a ``.csv`` is ``csv``, a ``.npz`` ``medmnist``.
    """
    if data_format not in FORMATS:
        raise ValueError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"data source not found: {path}")
    if data_format != "auto":
        return data_format
    if path.is_dir():
        return detect_layout(path) or "imagefolder"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".npz":
        return "medmnist"
    raise DataError(
        f"cannot tell the format of {path}: expected a folder, a .csv manifest or a .npz file "
        "(or pass data_format explicitly)"
    )


def read_catalog(path: str | os.PathLike[str], data_format: str = "auto") -> Catalog:
    """List every sample of a source without decoding any image.

    Args:
        path: A folder, a ``.csv`` manifest or a MedMNIST ``.npz``.
        data_format: ``auto``, ``imagefolder``, ``csv``, ``medmnist`` or a native layout
            (``busi``, ``chaoyang``, ``covid-ct``, ``cxr3``, ``oct``, ``limuc``).

    Raises:
        DataError: Missing source, unknown layout, empty or inconsistent content.
    """
    fmt = detect_format(path, data_format)
    if fmt in NATIVE_FORMATS:
        return read_layout(Path(path), fmt)
    reader = {"imagefolder": _read_imagefolder, "csv": _read_csv, "medmnist": _read_npz}[fmt]
    return reader(Path(path))


# --------------------------------------------------------------------------------------------
# ImageFolder


def _read_imagefolder(root: Path) -> Catalog:
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    skipped = {"masks": 0, "non_image": 0, "hidden": 0, "outside_class_folders": 0}
    subdirs = visible_subdirs(root)
    if not subdirs:
        raise DataError(f"{root}: empty dataset, no class folders found")
    is_split = [d.name.lower() in SPLIT_NAMES for d in subdirs]
    if all(is_split):
        groups: dict[str, Group] = {}
        for d in subdirs:
            key = SPLIT_NAMES[d.name.lower()]
            if key in groups:
                raise DataError(
                    f"{root}: two folders name the {key!r} split ({groups[key].origin} and {d})"
                )
            groups[key] = read_class_folders(d, root, skipped)
        skipped["outside_class_folders"] += loose_files(root)
        groups = {k: groups[k] for k in SPLITS if k in groups}
        layout = "split"
    elif any(is_split):
        names = [d.name for d in subdirs]
        raise DataError(
            f"{root}: mixes split folders (train/val/test) with other folders {names}; use either "
            "<root>/<class>/... or <root>/<split>/<class>/..."
        )
    else:
        groups = {"all": read_class_folders(root, root, skipped)}
        layout = "flat"
    classes = sorted({c for g in groups.values() for c in g.labels})
    return Catalog(root, "imagefolder", layout, groups, classes, skipped)


# --------------------------------------------------------------------------------------------
# CSV manifest


def _read_csv(path: Path) -> Catalog:
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    base = path.parent
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty manifest (expected a header with path,label)") from None
        columns = [h.strip().lower() for h in header]
        for needed in ("path", "label"):
            if needed not in columns:
                raise DataError(
                    f"{path}: header {header} lacks a {needed!r} column (need path,label[,split])"
                )
        i_path, i_label = columns.index("path"), columns.index("label")
        i_split = columns.index("split") if "split" in columns else None

        rows: list[tuple[int, str, str, str]] = []  # (line, path as written, label, split)
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < len(columns):
                raise DataError(f"{path}, line {line}: expected {len(columns)} fields, got {row}")
            rel, label = row[i_path].strip(), row[i_label].strip()
            if not rel:
                raise DataError(f"{path}, line {line}: empty path")
            if not label:
                raise DataError(f"{path}, line {line}: empty label for {rel}")
            split = "all"
            if i_split is not None:
                value = row[i_split].strip().lower()
                if value not in SPLIT_NAMES:
                    raise DataError(
                        f"{path}, line {line}: split {row[i_split]!r} is not one of "
                        "train/val/valid/validation/test"
                    )
                split = SPLIT_NAMES[value]
            rows.append((line, rel, label, split))
    if not rows:
        raise DataError(f"{path}: empty manifest, no samples listed")

    numeric = all(_INT.match(label) for _, _, label, _ in rows)
    first_line: dict[str, int] = {}
    missing: list[str] = []
    groups: dict[str, Group] = {}
    for line, rel, label, split in rows:
        sample_id = rel.replace("\\", "/")
        if sample_id in first_line:
            raise DataError(
                f"{path}, line {line}: {rel} is listed twice (first on line {first_line[sample_id]})"
            )
        first_line[sample_id] = line
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        if not file.is_file():
            missing.append(f"line {line}: {file}")
            continue
        g = groups.setdefault(split, Group(ids=[], labels=[], paths=[], origin=str(path)))
        g.ids.append(sample_id)
        g.labels.append(str(int(label)) if numeric else label)
        g.paths.append(str(file))  # type: ignore[union-attr]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(
            f"{path}: {len(missing)} listed file(s) not found: " + "; ".join(missing[:5]) + more
        )
    names = {lab for g in groups.values() for lab in g.labels}
    classes = sorted(names, key=int) if numeric else sorted(names)
    if i_split is not None:
        groups = {k: groups[k] for k in SPLITS if k in groups}
    return Catalog(path, "csv", "split" if i_split is not None else "flat", groups, classes, {})


# --------------------------------------------------------------------------------------------
# MedMNIST npz


def medmnist_flag(path: str | os.PathLike[str]) -> str | None:
    """The MedMNIST flag the file name starts with (longest match), if any."""
    stem = Path(path).stem.lower()
    flags = sorted([*MEDMNIST_CLASSES, *_MULTI_LABEL_FLAGS, *_VOLUME_FLAGS], key=len, reverse=True)
    return next((f for f in flags if stem.startswith(f)), None)


def _read_npz(path: Path) -> Catalog:
    flag = medmnist_flag(path)
    if flag in _MULTI_LABEL_FLAGS:
        raise DataError(f"{path}: {flag} is multi-label; multi-label not supported")
    if flag in _VOLUME_FLAGS:
        raise DataError(f"{path}: {flag} holds 3D volumes; only 2D images are supported")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile/pickle/OS errors vary; report them uniformly
        raise DataError(f"{path}: cannot read .npz ({type(e).__name__}: {e})") from e
    with npz:
        keys = set(npz.files)
        raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in SPLITS:
            has_images, has_labels = f"{split}_images" in keys, f"{split}_labels" in keys
            if has_images != has_labels:
                raise DataError(f"{path}: has only one of {split}_images / {split}_labels")
            if has_images:
                raw[split] = (npz[f"{split}_images"], npz[f"{split}_labels"])
        # Optional extension (written by `shpeft demo`): the class names, a string array.
        named = [str(c) for c in npz["class_names"].reshape(-1)] if "class_names" in keys else None
    if not raw:
        raise DataError(
            f"{path}: no MedMNIST keys (expected train_images, train_labels, val_images, ...); "
            f"found {sorted(keys)}"
        )

    checked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (images, labels) in raw.items():
        checked[split] = (_check_images(images, path, split), _check_labels(labels, path, split))
        if len(checked[split][0]) != len(checked[split][1]):
            raise DataError(
                f"{path}: {split}_images has {len(images)} rows but {split}_labels has {len(labels)}"
            )
        if len(images) == 0:
            raise DataError(f"{path}: {split} split is empty")

    max_label = max(int(lab.max()) for _, lab in checked.values())
    if named is not None:
        classes = named
        if max_label >= len(classes):
            raise DataError(
                f"{path}: label {max_label} out of range for its {len(classes)} class_names "
                f"{classes}"
            )
    elif flag is not None:
        classes = list(MEDMNIST_CLASSES[flag])
        if max_label >= len(classes):
            raise DataError(
                f"{path}: label {max_label} out of range for {flag} ({len(classes)} classes: "
                f"{classes})"
            )
    else:
        classes = [str(i) for i in range(max_label + 1)]
    groups = {
        split: Group(
            ids=[f"{split}/{i}" for i in range(len(lab))],
            labels=[classes[y] for y in lab.tolist()],
            images=images,
            origin=f"{path}:{split}",
        )
        for split, (images, lab) in checked.items()
    }
    return Catalog(path, "medmnist", "split", groups, classes, {})


def _check_images(images: np.ndarray, path: Path, split: str) -> np.ndarray:
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise DataError(
            f"{path}: {split}_images has shape {images.shape}; expected (N,H,W) gray or (N,H,W,3)"
            " RGB (3D volumes are not supported)"
        )
    if images.dtype != np.uint8:
        if (
            np.issubdtype(images.dtype, np.integer)
            and images.size
            and images.min() >= 0
            and images.max() <= 255
        ):
            images = images.astype(np.uint8)
        else:
            raise DataError(
                f"{path}: {split}_images has dtype {images.dtype}; expected uint8 pixel values"
            )
    return np.ascontiguousarray(images)


def _check_labels(labels: np.ndarray, path: Path, split: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{path}: {split}_labels has shape {labels.shape} (one column per label): "
            "multi-label not supported"
        )
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise DataError(f"{path}: {split}_labels has shape {labels.shape}; expected (N,) or (N,1)")
    labels = labels.reshape(-1)
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise DataError(f"{path}: {split}_labels has dtype {labels.dtype}; expected integers")
    if np.issubdtype(labels.dtype, np.floating) and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise DataError(f"{path}: {split}_labels holds non-integer values")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: {split}_labels has negative label {labels.min()} (out of range)")
    return labels
