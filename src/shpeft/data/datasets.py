"""Torch datasets over image files or an in-memory uint8 array.

Every labelled dataset returns ``(x, y)``: ``x`` a float32 tensor ``(3, S, S)`` normalised with the
model's mean/std, ``y`` a Python ``int``. Each exposes ``labels`` (int64 array), ``ids`` (sample
ids as recorded in the split record) and ``classes``. Datasets hold only picklable state
(lists, NumPy arrays, tensors, plain floats), so DataLoader workers can use them.

Caching (:meth:`LabelledImageDataset.build_cache`) decodes and resizes every image once into a
single ``(N, 3, S, S)`` uint8 tensor; afterwards an item costs only the flip and normalisation.
Cached and uncached items are bit-identical because both go through :func:`resize_uint8`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from shpeft.progress import progress_bar

from .io import DataError, read_image
from .transforms import Normalize, parse_interpolation, resize_uint8, to_chw_tensor

__all__ = ["ArrayImageDataset", "FileImageDataset", "ImageFileDataset", "LabelledImageDataset"]


class _ResizingDataset(Dataset):
    """Shared machinery: raw uint8 image -> resized uint8 (optionally cached) -> normalised."""

    def __init__(
        self,
        *,
        ids: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        augment: str = "none",
    ):
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.ids = [str(i) for i in ids]
        self.image_size = int(image_size)
        # Store the mode's name, not the enum, so the pickled state stays plain.
        self.interpolation = parse_interpolation(interpolation).value
        self.normalize = Normalize(mean, std, augment)
        self._cache: torch.Tensor | None = None

    @property
    def augment(self) -> str:
        """``"none"`` or ``"flip"``."""
        return self.normalize.augment

    @property
    def cached(self) -> bool:
        """Whether the resized images are held in memory."""
        return self._cache is not None

    def __len__(self) -> int:
        return len(self.ids)

    def _raw(self, index: int) -> torch.Tensor:
        """The original image as a ``(3, H, W)`` uint8 tensor."""
        raise NotImplementedError

    def resized(self, index: int) -> torch.Tensor:
        """The image resized to ``(3, S, S)`` uint8 (from the cache when built)."""
        if self._cache is not None:
            return self._cache[index]
        return resize_uint8(
            self._raw(index), self.image_size, parse_interpolation(self.interpolation)
        )

    def cache_nbytes(self) -> int:
        """Bytes the cache of this dataset takes (or would take)."""
        return len(self) * 3 * self.image_size * self.image_size

    def build_cache(self, *, num_threads: int = 0, desc: str | None = None) -> None:
        """Decode and resize every image once into one uint8 tensor held by the dataset.

        Args:
            num_threads: Decoding threads (Pillow and torch release the GIL); 0 or 1 for one.
            desc: Progress-bar label (the bar is hidden when stderr is not a terminal).
        """
        if self._cache is not None:
            return
        size = self.image_size
        cache = torch.empty((len(self), 3, size, size), dtype=torch.uint8)
        mode = parse_interpolation(self.interpolation)

        def fill(i: int) -> None:
            cache[i] = resize_uint8(self._raw(i), size, mode)

        with progress_bar(total=len(self), desc=desc or "caching images", leave=False) as bar:
            if num_threads > 1:
                with ThreadPoolExecutor(max_workers=num_threads) as pool:
                    for _ in pool.map(fill, range(len(self))):
                        bar.update()
            else:
                for i in range(len(self)):
                    fill(i)
                    bar.update()
        self._cache = cache

    @property
    def cache(self) -> torch.Tensor | None:
        """The ``(N, 3, S, S)`` uint8 cache, or None when not built."""
        return self._cache

    def adopt_cache(self, cache: torch.Tensor) -> None:
        """Use an already built cache (e.g. rows sliced from a larger dataset's cache).

        Raises:
            ValueError: ``cache`` is not ``(len(self), 3, S, S)`` uint8.
        """
        expected = (len(self), 3, self.image_size, self.image_size)
        if cache.dtype != torch.uint8 or tuple(cache.shape) != expected:
            raise ValueError(
                f"cache must be uint8 {expected}, got {cache.dtype} {tuple(cache.shape)}"
            )
        self._cache = cache.contiguous()

    def drop_cache(self) -> None:
        """Free the cache; items are decoded on the fly again."""
        self._cache = None


class LabelledImageDataset(_ResizingDataset):
    """Base of the labelled datasets: adds ``labels``, ``classes`` and ``(x, y)`` items.

    Args:
        labels: Class index per sample, each in ``[0, len(classes))``.
        ids: Sample id per sample (relative path or ``<split>/<index>``).
        classes: Class names; ``labels`` index into it.
        image_size: Output side length ``S``.
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        interpolation: ``"bicubic"`` (default), ``"bilinear"``, ``"nearest"``, ``"nearest-exact"``.
        augment: ``"none"`` or ``"flip"`` (random horizontal flip; use for training only).
    """

    def __init__(
        self,
        *,
        labels: Sequence[int] | np.ndarray,
        ids: Sequence[str],
        classes: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        augment: str = "none",
    ):
        super().__init__(
            ids=ids,
            image_size=image_size,
            mean=mean,
            std=std,
            interpolation=interpolation,
            augment=augment,
        )
        self.classes = [str(c) for c in classes]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.ids):
            raise ValueError(f"{len(self.labels)} labels for {len(self.ids)} samples")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(
                f"labels must lie in [0, {len(self.classes)}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``), not the number present in this dataset."""
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        """Labels as a list, under torchvision's name."""
        return self.labels.tolist()

    def class_counts(self) -> dict[str, int]:
        """Samples per class name (classes absent here count 0)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.resized(index)), int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, classes={self.classes}, "
            f"image_size={self.image_size}, augment={self.augment!r}, cached={self.cached})"
        )


class FileImageDataset(LabelledImageDataset):
    """Labelled images read from files (ImageFolder and CSV sources).

    Args:
        paths: Image file per sample.
        **kwargs: See :class:`LabelledImageDataset`.
    """

    def __init__(self, paths: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.paths = [str(p) for p in paths]
        if len(self.paths) != len(self.ids):
            raise ValueError(f"{len(self.paths)} paths for {len(self.ids)} samples")

    def _raw(self, index: int) -> torch.Tensor:
        return to_chw_tensor(read_image(self.paths[index]))


class ArrayImageDataset(LabelledImageDataset):
    """Labelled images held in memory as a uint8 array (MedMNIST ``.npz`` sources).

    Args:
        images: ``(N, H, W)`` gray or ``(N, H, W, 3)`` RGB, dtype uint8. Gray stays single-channel
            in memory and is replicated to RGB per item.
        **kwargs: See :class:`LabelledImageDataset`.
    """

    def __init__(self, images: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N,H,W) or (N,H,W,3), got {images.shape}")
        if images.ndim == 4 and images.shape[3] != 3:
            raise ValueError(f"images must be uint8 (N,H,W) or (N,H,W,3), got {images.shape}")
        if len(images) != len(self.ids):
            raise ValueError(f"{len(images)} images for {len(self.ids)} samples")
        self.images = images

    def _raw(self, index: int) -> torch.Tensor:
        return to_chw_tensor(self.images[index])


class ImageFileDataset(_ResizingDataset):
    """Unlabelled image files for prediction: items are ``(x, path)``.

    Args:
        paths: Image files (e.g. from :func:`shpeft.data.list_images`).
        image_size: Output side length ``S``.
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        interpolation: As for :class:`LabelledImageDataset`.
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
    ):
        paths = [str(p) for p in paths]
        super().__init__(
            ids=paths, image_size=image_size, mean=mean, std=std, interpolation=interpolation
        )
        self.paths = paths

    def _raw(self, index: int) -> torch.Tensor:
        return to_chw_tensor(read_image(self.paths[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.normalize(self.resized(index)), self.paths[index]

    def __repr__(self) -> str:
        return f"ImageFileDataset(n={len(self)}, image_size={self.image_size})"


@dataclass
class DataBundle:
    """Datasets of one run plus the record of how they were split.

    Attributes:
        train: Training set (augmented per ``DataConfig.augment``).
        val: Validation set, or None (no augmentation).
        test: Test set, or None (no augmentation).
        classes: Class names; labels index into this list.
        split_record: JSON-serialisable record of source, format, seed, fractions and the ids and
            label names per split; save it with the run (``json.dump``) and pass it back through
            ``DataConfig.split_file`` to replay the split.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]
    split_record: dict

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)
