"""Reading one image file into an RGB ``uint8`` array.

Every supported file becomes a ``numpy.ndarray`` of shape ``(H, W, 3)`` and dtype ``uint8``, so
the rest of the pipeline sees one representation whatever the modality wrote. Conversion rules:

* ``RGB``: as is. ``L`` / ``1`` (gray): replicated to three channels.
* ``LA``, ``RGBA``, ``PA``, ``RGBX``: the alpha channel is **dropped**, not composited. Medical
  exports that carry alpha almost always have it fully opaque, and dropping it keeps the recorded
  intensities of any transparent pixels instead of blacking them out.
* ``P`` (palette), ``CMYK``, ``YCbCr``, ``HSV``: converted by Pillow to ``RGB`` (palette
  transparency is dropped as above).
* 16-bit gray (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): scaled by the full 16-bit range,
  ``round(v * 255 / 65535)``, never clipped. Data with fewer significant bits stored in a 16-bit
  container (e.g. 12-bit) therefore looks dark, exactly as it would in a viewer that ignores
  ``sBIT``; the per-image min-max alternative would destroy absolute intensity, which matters
  for X-ray and CT.
* 32-bit integer gray (``I``): scaled like 16-bit when all values lie in ``[0, 65535]`` (how
  Pillow has historically represented 16-bit files), otherwise min-max scaled.
* Float gray (``F``): min-max scaled to ``[0, 255]`` (a constant image becomes zeros).
* ``.dcm`` / ``.dicom`` (needs ``pydicom``): ``RescaleSlope`` / ``RescaleIntercept`` applied,
  then the first ``WindowCenter`` / ``WindowWidth`` if present (linear window), else min-max;
  ``MONOCHROME1`` is inverted so that high values are bright as in ``MONOCHROME2``.

EXIF orientation is applied, so a photograph (e.g. dermoscopy) is seen upright as in a viewer.
Unreadable, truncated and oversize files raise :class:`DataError` naming the file; Pillow's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is kept at its default.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "write_dicom",
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "DataError",
    "is_hidden",
    "is_image_file",
    "is_mask_file",
    "read_image",
    "read_image_bytes",
]


class DataError(ValueError):
    """A problem with the input data (missing, unreadable or inconsistent files or labels)."""


# Extensions Pillow reads out of the box plus DICOM; compared case-insensitively.
PIL_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm", ".pbm"}
)
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
IMAGE_EXTENSIONS = PIL_EXTENSIONS | DICOM_EXTENSIONS

# BUSI ships segmentation masks beside the images as `<name>_mask.png` and, for lesions with
# several masks, `<name>_mask_1.png`; they are not samples.
_MASK_STEM = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (dot-files such as ``.DS_Store``, ``._x.png``)."""
    return name.startswith(".")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has an image extension this module reads (not whether it decodes)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_mask_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a BUSI-style segmentation mask (stem ends ``_mask`` or ``_mask_N``)."""
    return _MASK_STEM.search(Path(path).stem) is not None


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one image file as an RGB ``uint8`` array.

    Args:
        path: An image file (see :data:`IMAGE_EXTENSIONS`).

    Returns:
        Array of shape ``(H, W, 3)``, dtype ``uint8``, C-contiguous.

    Raises:
        DataError: The file is missing, unreadable, truncated, too large (decompression-bomb
            guard) or in an unsupported mode; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return _read_dicom(path)
    return _read_pil(path)


def read_image_bytes(data: bytes, name: str = "upload", *, dicom: bool | None = None) -> np.ndarray:
    """Decode an image held in memory exactly as :func:`read_image` decodes a file.

    For servers, which must not write uploads to disk: the same Pillow and DICOM code paths and
    conversion rules run on an in-memory buffer.

    Args:
        data: The file's bytes.
        name: Used in error messages in place of a path (e.g. the upload's file name).
        dicom: Read as DICOM; default: when ``name`` has a DICOM extension or ``data`` carries
            the ``DICM`` preamble marker.

    Returns:
        Array of shape ``(H, W, 3)``, dtype ``uint8``, C-contiguous.

    Raises:
        DataError: As :func:`read_image`; the message names ``name``.
    """
    if dicom is None:
        dicom = Path(name).suffix.lower() in DICOM_EXTENSIONS or data[128:132] == b"DICM"
    source = _NamedBuffer(data, name)
    return _read_dicom(source) if dicom else _read_pil(source)  # type: ignore[arg-type]


class _NamedBuffer(io.BytesIO):
    """An in-memory file whose ``str()`` is a name, so read errors name it as they name paths."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._label = name

    def __str__(self) -> str:
        return self._label


# --------------------------------------------------------------------------------------------
# Pillow


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()  # decode now, inside the try, so truncation errors surface here
            img = ImageOps.exif_transpose(img)
            return pil_to_rgb_array(img, name=str(path))
    except Image.DecompressionBombError as e:
        raise DataError(
            f"{path}: image is too large to decode safely ({e}); Pillow's limit "
            f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} guards against decompression bombs"
        ) from e
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not a readable image (Pillow cannot identify it)") from e
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated/corrupt files surface as OSError ("image file is truncated"), SyntaxError
        # (broken headers in some plugins) or ValueError, depending on the format.
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def pil_to_rgb_array(img: Image.Image, name: str = "<image>") -> np.ndarray:
    """Convert a loaded Pillow image to an RGB ``uint8`` array (rules in the module docstring).

    Args:
        img: A Pillow image (already loaded).
        name: Used in error messages.

    Returns:
        Array of shape ``(H, W, 3)``, dtype ``uint8``.
    """
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("L", "1"):
        arr = _gray_to_rgb(np.asarray(img.convert("L")))
    elif mode == "LA":
        arr = _gray_to_rgb(np.asarray(img)[..., 0])
    elif mode in _SIXTEEN_BIT_MODES:
        arr = _gray_to_rgb(_scale_fixed(np.asarray(img).astype(np.float64), 65535.0))
    elif mode == "I":
        values = np.asarray(img).astype(np.float64)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            arr = _gray_to_rgb(_scale_fixed(values, 65535.0))
        else:
            arr = _gray_to_rgb(_scale_minmax(values))
    elif mode == "F":
        arr = _gray_to_rgb(_scale_minmax(np.asarray(img).astype(np.float64)))
    else:
        # RGBA/RGBX/PA/P/CMYK/YCbCr/HSV: Pillow's converter drops alpha and applies palettes.
        try:
            arr = np.asarray(img.convert("RGB"))
        except (ValueError, OSError) as e:
            raise DataError(f"{name}: unsupported image mode {mode!r} ({e})") from e
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{name}: could not convert mode {mode!r} to RGB uint8 (got {arr.shape})")
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        # Pillow's array views are read-only; torch.from_numpy wants writable memory.
        arr = np.array(arr, order="C")
    return arr


# --------------------------------------------------------------------------------------------
# DICOM


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:  # pragma: no cover - pydicom is installed in dev/CI
        raise DataError(
            f"{path}: reading DICOM needs pydicom; install it with `pip install shpeft[dicom]`"
        ) from e
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except InvalidDicomError as e:
        raise DataError(f"{path}: not a valid DICOM file ({e})") from e
    except Exception as e:  # pydicom raises many types (missing decoder plugins, bad lengths, ...)
        raise DataError(f"{path}: cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e

    samples = int(getattr(ds, "SamplesPerPixel", 1))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames) is not supported")
    if samples == 3:
        # pydicom converts YBR colour spaces to RGB in pixel_array.
        if pixels.dtype == np.uint8:
            return np.ascontiguousarray(pixels)
        bits = int(getattr(ds, "BitsStored", 8))
        return np.ascontiguousarray(_scale_fixed(pixels.astype(np.float64), 2.0**bits - 1))
    if samples != 1 or pixels.ndim != 2:
        raise DataError(f"{path}: unsupported DICOM pixel layout {pixels.shape}")

    values = pixels.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    values = values * slope + intercept

    center, width = (
        _first(getattr(ds, "WindowCenter", None)),
        _first(getattr(ds, "WindowWidth", None)),
    )
    if center is not None and width is not None and width > 0:
        low, high = center - width / 2.0, center + width / 2.0
        gray = _scale_fixed(np.clip(values, low, high) - low, high - low)
    else:
        gray = _scale_minmax(values)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 shows low values bright
    return _gray_to_rgb(gray)


def write_dicom(path: str | os.PathLike[str], pixels: np.ndarray, **attrs) -> Path:
    """Write ``pixels`` (2-D, up to 12 bits) as a minimal MONOCHROME2 secondary-capture DICOM
    file: synthetic data, tests and benchmarks of the DICOM path. ``attrs`` set or override
    data elements (``RescaleSlope=3``, ``PhotometricInterpretation="MONOCHROME1"``, ...)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return Path(path)


def _first(value) -> float | None:
    """First element of a possibly multi-valued DICOM number, as float (None if absent)."""
    if value is None:
        return None
    try:
        if isinstance(value, str | bytes):
            raise TypeError
        value = next(iter(value))
    except TypeError:
        pass
    except StopIteration:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# helpers


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _scale_fixed(values: np.ndarray, full_scale: float) -> np.ndarray:
    """Map ``[0, full_scale]`` linearly onto ``[0, 255]`` with rounding."""
    return np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _scale_minmax(values: np.ndarray) -> np.ndarray:
    """Map ``[min, max]`` linearly onto ``[0, 255]``; constant or empty input gives zeros."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return _scale_fixed(values - low, high - low)
