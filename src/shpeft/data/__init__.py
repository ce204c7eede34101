"""Data loading for shpeft: image files, CSV manifests and MedMNIST ``.npz`` to torch datasets.

Entry points:

* :func:`load_data` (``DataConfig`` -> :class:`DataBundle`): train/val/test datasets of a source,
  split by the source's official split or by a seeded stratified split, with a JSON-able record.
* :func:`load_eval_data`: a labelled evaluation set mapped onto a trained run's classes.
* :func:`list_images` and :class:`ImageFileDataset`: unlabelled files for prediction.
* :func:`read_image`: one file to an RGB uint8 array (PNG/JPEG/TIFF/... and DICOM).
* :func:`check_dataset` (``shpeft data check``): counts, sizes, unreadable files, exact and near
  duplicates, leakage and imbalance; :func:`check_leakage_cheap`: the pre-training refusal of
  exact train/val/test duplicates.

Formats: ``imagefolder``, ``csv``, ``medmnist`` and the native layouts ``busi``, ``chaoyang``,
``covid-ct``, ``cxr3``, ``oct``, ``limuc`` (see :mod:`shpeft.data.layouts`).

Errors about the data raise :class:`DataError` (a ``ValueError``).
"""

from typing import TYPE_CHECKING, Any

from shpeft.config import DataConfig

from .io import IMAGE_EXTENSIONS, DataError, is_image_file, is_mask_file, read_image

if TYPE_CHECKING:
    from .check import CheckReport, add_check_arguments, check_dataset, run_check
    from .datasets import (
        ArrayImageDataset,
        DataBundle,
        FileImageDataset,
        ImageFileDataset,
        LabelledImageDataset,
    )
    from .leakage import check_leakage_cheap
    from .loading import CACHE_AUTO_LIMIT_BYTES, list_images, load_data, load_eval_data, make_loader
    from .sources import FORMATS, MEDMNIST_CLASSES, NATIVE_FORMATS, read_catalog
    from .splits import grouped_stratified_split, stratified_split

# The datasets and loaders import torch; they are loaded on first use, so that the CLI's
# parser (and `shpeft data check`) need not.
_LAZY = {
    "CheckReport": "check",
    "add_check_arguments": "check",
    "check_dataset": "check",
    "run_check": "check",
    "ArrayImageDataset": "datasets",
    "DataBundle": "datasets",
    "FileImageDataset": "datasets",
    "ImageFileDataset": "datasets",
    "LabelledImageDataset": "datasets",
    "check_leakage_cheap": "leakage",
    "CACHE_AUTO_LIMIT_BYTES": "loading",
    "list_images": "loading",
    "load_data": "loading",
    "load_eval_data": "loading",
    "make_loader": "loading",
    "FORMATS": "sources",
    "MEDMNIST_CLASSES": "sources",
    "NATIVE_FORMATS": "sources",
    "read_catalog": "sources",
    "grouped_stratified_split": "splits",
    "stratified_split": "splits",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CACHE_AUTO_LIMIT_BYTES",
    "IMAGE_EXTENSIONS",
    "MEDMNIST_CLASSES",
    "FORMATS",
    "NATIVE_FORMATS",
    "ArrayImageDataset",
    "CheckReport",
    "DataBundle",
    "DataConfig",
    "DataError",
    "FileImageDataset",
    "ImageFileDataset",
    "LabelledImageDataset",
    "add_check_arguments",
    "check_dataset",
    "check_leakage_cheap",
    "grouped_stratified_split",
    "is_image_file",
    "is_mask_file",
    "list_images",
    "load_data",
    "load_eval_data",
    "make_loader",
    "read_catalog",
    "read_image",
    "run_check",
    "stratified_split",
]
