"""PNG, JPEG, TIFF, MHA and NRRD inputs go through the same pipeline and the same checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dp_transforms import ImageError, ImageErrorReason, load_image, make_square_pixels
from dp_transforms.dicom import ChestImage

GRADIENT = np.tile(np.arange(256, dtype=np.uint8), (128, 1))


def test_png_8bit_is_scaled_not_rewindowed(tmp_path: Path) -> None:
    Image.fromarray(GRADIENT).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    np.testing.assert_allclose(image.pixels, GRADIENT / 255.0, atol=1e-6)
    assert image.spacing is None


def test_png_16bit_gets_the_automatic_window(tmp_path: Path) -> None:
    values = (np.arange(128 * 128).reshape(128, 128) % 4096).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    pixels = load_image(tmp_path / "a.png").pixels
    low, high = np.percentile(values, [0.5, 99.5])
    np.testing.assert_allclose(pixels, np.clip((values - low) / (high - low), 0, 1), atol=1e-5)


def test_grayscale_saved_as_rgb_jpeg_is_accepted(tmp_path: Path) -> None:
    Image.fromarray(np.stack([GRADIENT] * 3, axis=-1)).save(tmp_path / "a.jpeg", quality=95)
    pixels = load_image(tmp_path / "a.jpeg").pixels
    assert pixels.shape == GRADIENT.shape
    assert float(np.abs(pixels - GRADIENT / 255.0).mean()) < 0.01


def test_colour_image_is_refused(tmp_path: Path) -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "red.png")
    with pytest.raises(ImageError, match="colour image") as caught:
        load_image(tmp_path / "red.png")
    assert caught.value.reason == ImageErrorReason.COLOUR


def test_multipage_tiff_is_refused(tmp_path: Path) -> None:
    pages = [Image.fromarray(GRADIENT), Image.fromarray(GRADIENT[::-1])]
    pages[0].save(tmp_path / "two.tiff", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "two.tiff")
    assert caught.value.reason == ImageErrorReason.MULTI_FRAME


def test_truncated_png_is_corrupt(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "cut.png")
    assert caught.value.reason == ImageErrorReason.CORRUPT


def test_tiny_png_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 400), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(ImageError, match="4 x 400") as caught:
        load_image(tmp_path / "thin.png")
    assert caught.value.reason == ImageErrorReason.GEOMETRY


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_simpleitk_formats_keep_their_spacing(tmp_path: Path, suffix: str) -> None:
    values = np.arange(60 * 80, dtype=np.int16).reshape(60, 80)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.2, 0.3))  # (column, row) in SimpleITK's x, y order
    sitk.WriteImage(image, str(tmp_path / f"a{suffix}"))
    loaded = load_image(tmp_path / f"a{suffix}")
    assert loaded.pixels.shape == (60, 80)
    assert loaded.spacing == pytest.approx((0.3, 0.2))
    assert float(loaded.pixels[0, 0]) == 0.0 and float(loaded.pixels[-1, -1]) == 1.0


def test_dicom_is_recognised_by_content_whatever_its_name(tmp_path: Path, rg1_path: Path) -> None:
    shutil.copy(rg1_path, tmp_path / "misnamed.png")
    assert load_image(tmp_path / "misnamed.png").pixels.shape == (1955, 1841)


def test_unknown_format_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("chest x-ray, pa view")
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "notes.txt")
    assert caught.value.reason == ImageErrorReason.NOT_AN_IMAGE


def test_square_pixels_resampling_keeps_physical_size() -> None:
    pixels = np.zeros((100, 200), np.float32)
    pixels[40:60, 90:110] = 1.0  # a block 20 x 20 pixels, i.e. 10 mm tall and 5 mm wide
    image = ChestImage(pixels, spacing=(0.5, 0.25), source="t")
    square = make_square_pixels(image)
    assert square.spacing == (0.25, 0.25)
    assert square.pixels.shape == (200, 200)
    rows = np.flatnonzero(square.pixels[:, 100] > 0.5)
    cols = np.flatnonzero(square.pixels[100, :] > 0.5)
    assert rows.size == pytest.approx(40, abs=2)  # 10 mm at 0.25 mm
    assert cols.size == pytest.approx(20, abs=2)  # 5 mm at 0.25 mm
    assert rows.mean() == pytest.approx(100, abs=1.5) and cols.mean() == pytest.approx(100, abs=1.5)


def test_square_pixels_leaves_square_and_unknown_spacing_alone() -> None:
    image = ChestImage(np.zeros((10, 20), np.float32), spacing=(0.3, 0.3))
    assert make_square_pixels(image) is image
    unknown = ChestImage(np.zeros((10, 20), np.float32), spacing=None)
    assert make_square_pixels(unknown) is unknown
