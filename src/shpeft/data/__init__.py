"""Data loading for shpeft: image files, CSV manifests and MedMNIST ``.npz`` to torch datasets.

Entry points:

* :func:`load_data` (``DataConfig`` -> :class:`DataBundle`): train/val/test datasets of a source,
  split by the source's official split or by a seeded stratified split, with a JSON-able record.
* :func:`load_eval_data`: a labelled evaluation set mapped onto a trained run's classes.
* :func:`list_images` and :class:`ImageFileDataset`: unlabelled files for prediction.
* :func:`read_image`: one file to an RGB uint8 array (PNG/JPEG/TIFF/... and DICOM).

Errors about the data raise :class:`DataError` (a ``ValueError``).
"""

from .datasets import ArrayImageDataset, FileImageDataset, ImageFileDataset, LabelledImageDataset
from .io import IMAGE_EXTENSIONS, DataError, is_image_file, is_mask_file, read_image
from .loading import (
    CACHE_AUTO_LIMIT_BYTES,
    DataBundle,
    DataConfig,
    list_images,
    load_data,
    load_eval_data,
)
from .sources import MEDMNIST_CLASSES
from .splits import stratified_split

__all__ = [
    "CACHE_AUTO_LIMIT_BYTES",
    "IMAGE_EXTENSIONS",
    "MEDMNIST_CLASSES",
    "ArrayImageDataset",
    "DataBundle",
    "DataConfig",
    "DataError",
    "FileImageDataset",
    "ImageFileDataset",
    "LabelledImageDataset",
    "is_image_file",
    "is_mask_file",
    "list_images",
    "load_data",
    "load_eval_data",
    "read_image",
    "stratified_split",
]
