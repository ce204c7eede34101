"""Content keys of images: equal keys mean byte-identical pixels (or files).

Used to keep exact duplicates in one split (:mod:`shpeft.data.loading`), to refuse train/test
leakage (:mod:`shpeft.data.leakage`) and to find duplicates (:mod:`shpeft.data.check`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

_CHUNK = 1 << 20


def array_key(array: np.ndarray | Any) -> str:
    """Hash of an image's pixels and shape (equal images give equal keys)."""
    if hasattr(array, "numpy"):  # a torch tensor
        array = array.numpy()
    array = np.ascontiguousarray(array)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((array.shape, array.dtype.str)).encode())
    h.update(array.tobytes())
    return h.hexdigest()


def file_key(path: str | os.PathLike[str]) -> str:
    """Hash of a file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
