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

from .check import CheckReport, add_check_arguments, check_dataset, run_check
from .datasets import ArrayImageDataset, FileImageDataset, ImageFileDataset, LabelledImageDataset
from .io import IMAGE_EXTENSIONS, DataError, is_image_file, is_mask_file, read_image
from .leakage import check_leakage_cheap
from .loading import (
    CACHE_AUTO_LIMIT_BYTES,
    DataBundle,
    DataConfig,
    list_images,
    load_data,
    load_eval_data,
)
from .sources import FORMATS, MEDMNIST_CLASSES, NATIVE_FORMATS, read_catalog
from .splits import grouped_stratified_split, stratified_split

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
    "read_catalog",
    "read_image",
    "run_check",
    "stratified_split",
]
