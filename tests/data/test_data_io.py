"""read_image: every mode to RGB uint8, DICOM, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shpeft.data import DataError, is_image_file, is_mask_file, read_image
from shpeft.data.io import write_dicom


def _check_rgb(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (*shape, 3)
    assert arr.flags.writeable and arr.flags.c_contiguous


def test_rgb_png_round_trips(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    _check_rgb(out, (7, 9))
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_is_replicated(tmp_path: Path) -> None:
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    _check_rgb(out, (4, 5))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_sixteen_bit_scales_by_full_range_without_clipping(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000], [32896, 65000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode.startswith("I;16")  # the case under test
    out = read_image(tmp_path / "d.png")
    _check_rgb(out, (2, 3))
    expected = np.rint(values / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.max() == 255 and len(np.unique(out)) == 6  # monotone, nothing clipped together


def test_sixteen_bit_big_endian_mode() -> None:
    from shpeft.data.io import pil_to_rgb_array

    values = np.array([[0, 65535], [257, 514]], dtype=">u2")
    im = Image.frombytes("I;16B", (2, 2), values.tobytes())
    np.testing.assert_array_equal(pil_to_rgb_array(im)[..., 0], [[0, 255], [1, 2]])


def test_int32_and_float_modes(tmp_path: Path) -> None:
    from shpeft.data.io import pil_to_rgb_array

    small = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert small.mode == "I"
    np.testing.assert_array_equal(pil_to_rgb_array(small)[..., 0], [[0, 255]])
    wide = Image.fromarray(np.array([[-5, 5, 15]], dtype=np.int32))
    np.testing.assert_array_equal(pil_to_rgb_array(wide)[..., 0], [[0, 128, 255]])

    f = np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(out[..., 0], [[0, 64, 255]])
    constant = Image.fromarray(np.full((2, 2), 7.0, np.float32))
    assert pil_to_rgb_array(constant).max() == 0


def test_alpha_is_dropped(tmp_path: Path) -> None:
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 0  # fully transparent: the colour must survive
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    _check_rgb(out, (3, 3))
    assert (out == (10, 20, 30)).all()

    la = Image.new("LA", (2, 2), (100, 0))
    la.save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png") == 100).all()


def test_palette_and_cmyk(tmp_path: Path) -> None:
    p = Image.new("P", (4, 2))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (0, 0, 255)

    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))
    cmyk.save(tmp_path / "c.jpg")
    out = read_image(tmp_path / "c.jpg")
    _check_rgb(out, (3, 3))
    assert out[..., 0].mean() > 200 and out[..., 1:].mean() < 60  # red stays red


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (6, 4), (50, 60, 70))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    img.save(tmp_path / "o.jpg", exif=exif)
    _check_rgb(read_image(tmp_path / "o.jpg"), (6, 4))


RAW = np.array([[0, 100], [200, 300]], dtype=np.uint16)


def test_dicom_rescale_and_window(tmp_path: Path) -> None:
    # Rescaled values -100, 100, 300, 500; window [-100, 300] -> 0, ~128, 255, 255 (clipped).
    path = write_dicom(
        tmp_path / "w.dcm",
        RAW,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=100,
        WindowWidth=400,
    )
    out = read_image(path)
    _check_rgb(out, (2, 2))
    assert out[0, 0, 0] == 0 and abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[1, 0, 0] == 255 and out[1, 1, 0] == 255


def test_dicom_minmax_without_window(tmp_path: Path) -> None:
    out = read_image(write_dicom(tmp_path / "m.dcm", RAW, RescaleSlope=3, RescaleIntercept=7))
    np.testing.assert_array_equal(out[..., 0], [[0, 85], [170, 255]])


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", RAW))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", RAW, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(m1.astype(int), 255 - m2.astype(int))
    assert m1[0, 0, 0] == 255  # the lowest value is brightest in MONOCHROME1


def test_not_a_dicom(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(DataError, match="bad.dcm"):
        read_image(bad)


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.png"):
        read_image(tmp_path / "t.png")


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "g.png").write_text("hello")
    with pytest.raises(DataError, match="g.png"):
        read_image(tmp_path / "g.png")
    with pytest.raises(DataError, match="nope.png"):
        read_image(tmp_path / "nope.png")


def test_decompression_bomb_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    # Pillow raises (rather than warns) above twice the limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"big\.png.*too large"):
        read_image(tmp_path / "big.png")


def test_default_bomb_limit_is_kept() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 10**7


@pytest.mark.parametrize(
    ("name", "mask"),
    [
        ("benign (1)_mask.png", True),
        ("benign (1)_mask_1.png", True),
        ("x_MASK.PNG", True),
        ("benign (1).png", False),
        ("masked.png", False),
        ("mask_of_x.png", False),
    ],
)
def test_mask_names(name: str, mask: bool) -> None:
    assert is_mask_file(name) is mask


def test_image_extensions() -> None:
    assert is_image_file("a.PNG") and is_image_file("b.dcm") and is_image_file("c.jpeg")
    assert not is_image_file("all_captions.csv") and not is_image_file("MANIFEST.txt")
