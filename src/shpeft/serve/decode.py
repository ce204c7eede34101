"""An uploaded file to a model input, through the training pipeline's own decoding.

``shpeft predict`` reads a file with :func:`shpeft.data.io.read_image` and prepares it as
:class:`shpeft.data.ImageFileDataset` does: ``to_chw_tensor`` -> ``resize_uint8`` (the run's size
and filter) -> ``Normalize`` (the run's mean and std). The server runs the very same functions on
the upload's bytes (:func:`~shpeft.data.io.read_image_bytes`, in memory), so a served image and
the same file given to ``shpeft predict`` reach the model as the same tensor.

Two limits come first, checked on the header before any pixel is decoded: the pixel count
(decompression bombs: a few kilobytes of PNG can claim gigabytes of pixels) and a readable
format. Every failure is a :class:`RequestError` with an HTTP status and one sentence.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from shpeft.backbones import InputSpec
from shpeft.data.io import DICOM_EXTENSIONS, DataError, read_image_bytes
from shpeft.data.transforms import Normalize, parse_interpolation, resize_uint8, to_chw_tensor

FORMATS = "PNG, JPEG, TIFF, BMP or DICOM"


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one sentence for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, filename: str, *, max_pixels: int) -> np.ndarray:
    """The upload as an RGB ``uint8`` array ``(H, W, 3)``, decoded as in training.

    Raises:
        RequestError: 413 for an image over ``max_pixels``, 415 for a file that is not an image
            this server reads, 422 for an image that is truncated or corrupt.
    """
    name = Path(filename or "upload").name
    if not data:
        raise RequestError(422, f"the uploaded file {name!r} is empty")
    dicom = Path(name).suffix.lower() in DICOM_EXTENSIONS or data[128:132] == b"DICM"
    limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)  # Pillow refuses beyond twice its own
    width, height = _dicom_size(data, name) if dicom else _pil_size(data, name, limit)
    if width * height > limit:
        raise RequestError(
            413,
            f"the image {name!r} is {width}x{height} pixels, over this server's limit of "
            f"{limit:,} pixels",
        )
    try:
        return read_image_bytes(data, name, dicom=dicom)
    except DataError as e:
        raise _status_of(e, name, limit) from e


def to_input(image: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> the ``(3, S, S)`` normalised float32 input a run was trained on.

    The steps of :class:`shpeft.data.ImageFileDataset` (``_raw`` -> ``resized`` -> ``normalize``).
    """
    resized = resize_uint8(
        to_chw_tensor(image), spec.image_size, parse_interpolation(spec.interpolation)
    )
    return Normalize(spec.mean, spec.std)(resized)


def _pil_size(data: bytes, name: str, limit: int) -> tuple[int, int]:
    """Width and height from the header only (Pillow opens lazily)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Image.DecompressionBombError as e:
        raise _bomb(name, limit) from e
    except UnidentifiedImageError as e:
        raise RequestError(415, f"the file {name!r} is not an image ({FORMATS})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise RequestError(422, f"the image {name!r} is corrupt ({_short(e)})") from e


def _dicom_size(data: bytes, name: str) -> tuple[int, int]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except InvalidDicomError as e:
        raise RequestError(415, f"the file {name!r} is not a valid DICOM file") from e
    except Exception as e:  # pydicom raises many types on damaged headers
        raise RequestError(422, f"the DICOM file {name!r} is corrupt ({_short(e)})") from e
    return cols, rows * frames


def _bomb(name: str, limit: int) -> RequestError:
    return RequestError(
        413, f"the image {name!r} has more pixels than this server's limit of {limit:,}"
    )


def _status_of(e: DataError, name: str, limit: int) -> RequestError:
    cause = e.__cause__
    if isinstance(cause, Image.DecompressionBombError):
        return _bomb(name, limit)
    if isinstance(cause, UnidentifiedImageError):
        return RequestError(415, f"the file {name!r} is not an image ({FORMATS})")
    detail = str(e).removeprefix(f"{name}: ")
    # Pillow: "image file is truncated"; pydicom: "... bytes of pixel data is less than expected"
    if "truncated" in str(cause) or "less than expected" in str(cause):
        return RequestError(422, f"the image {name!r} is truncated or incomplete")
    return RequestError(422, f"the image {name!r} cannot be decoded ({_short(detail)})")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
