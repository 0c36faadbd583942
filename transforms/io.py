"""Load any supported image file as a :class:`~dp_transforms.dicom.ChestImage`.

DICOM goes through :func:`~dp_transforms.dicom.dicom_to_image`. PNG, JPEG, TIFF and BMP
(the formats public chest X-ray datasets ship in) go through Pillow, MHA / NRRD / NIfTI
through SimpleITK; all of them end in the same VOI step (an 8-bit image is already
windowed for display and is only scaled; deeper images get the automatic window) and the
same geometry checks. Every failure is an :class:`~dp_transforms.errors.ImageError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from os import PathLike
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import (
    MAX_PIXELS,
    MAX_SPACING_RATIO,
    WORKING_PIXELS,
    ChestImage,
    auto_window,
    check_geometry,
    read_dicom,
)
from .errors import ImageError, ImageErrorReason
from .geometry import Letterbox

logger = logging.getLogger(__name__)

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
SITK_SUFFIXES = {".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}

#: Largest difference between the channels of an RGB file that is still a grayscale
#: radiograph saved in colour (many public JPEGs are), in 8-bit units.
GRAY_RGB_TOLERANCE = 3

# Pillow refuses images above its own bomb limit with a warning first; our bound is
# the geometry check, applied right after the header is read.
Image.MAX_IMAGE_PIXELS = None


def load_image(path: str | PathLike) -> ChestImage:
    """Load a radiograph from a file of any supported format.

    The format is recognised by content (the DICOM preamble, image signatures) before
    the file name, so a DICOM file named ``.png`` or with no suffix still loads.

    Raises:
        ImageError: missing file, unknown format, colour, several frames, no pixels,
            absurd size, or a decoding failure.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(ImageErrorReason.NOT_FOUND, "no such file", str(path))
    kind = sniff_format(path)
    if kind == "dicom":
        return read_dicom(path)
    if kind == "pil":
        return _load_pil(path)
    if kind == "sitk":
        return _load_sitk(path)
    raise ImageError(
        ImageErrorReason.NOT_AN_IMAGE,
        "not a DICOM, PNG, JPEG, TIFF, BMP, MHA, NRRD or NIfTI file",
        str(path),
    )


def sniff_format(path: Path) -> str:
    """'dicom', 'pil', 'sitk' or 'unknown', from the first bytes, then the suffix."""
    with path.open("rb") as handle:
        head = handle.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")):
        return "pil"
    if head.startswith(b"NRRD") or b"ObjectType" in head or b"NDims" in head:
        return "sitk"
    suffix = (
        "".join(path.suffixes[-2:]).lower() if path.name.endswith(".gz") else path.suffix.lower()
    )
    if suffix in SITK_SUFFIXES:
        return "sitk"
    if suffix in DICOM_SUFFIXES:
        return "dicom"  # DICOM without a preamble; read_dicom says if it is not
    return "unknown"


def _load_pil(path: Path) -> ChestImage:
    try:
        with Image.open(path) as im:
            check_geometry(im.height, im.width, str(path))
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                raise ImageError(
                    ImageErrorReason.MULTI_FRAME, f"{n_frames} frames; expected one", str(path)
                )
            im = ImageOps.exif_transpose(im)
            pixels = _pil_to_gray(im, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(ImageErrorReason.CORRUPT, f"unreadable image ({exc})", str(path)) from exc
    return ChestImage(pixels, None, str(path))


def _pil_to_gray(im: Image.Image, source: str) -> np.ndarray:
    """Grayscale float32 in [0, 1] from any Pillow mode, refusing true colour."""
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(im, dtype=np.float64)
        return auto_window(values).astype(np.float32)
    if im.mode == "LA":
        return np.asarray(im.getchannel("L"), dtype=np.float32) / 255.0
    rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    spread = int(np.abs(rgb - rgb[..., :1]).max())
    if spread > GRAY_RGB_TOLERANCE:
        raise ImageError(
            ImageErrorReason.COLOUR,
            f"colour image (mode {im.mode}, channels differ by up to {spread}); "
            "a radiograph is grayscale",
            source,
        )
    return rgb[..., 0].astype(np.float32) / 255.0


def _load_sitk(path: Path) -> ChestImage:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "read failed"
        raise ImageError(
            ImageErrorReason.CORRUPT, f"unreadable image ({first_line})", str(path)
        ) from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            ImageErrorReason.COLOUR,
            f"{image.GetNumberOfComponentsPerPixel()} components per pixel; expected 1",
            str(path),
        )
    size = image.GetSize()
    if image.GetDimension() == 3 and size[2] != 1:
        raise ImageError(ImageErrorReason.MULTI_FRAME, f"{size[2]} slices; expected one", str(path))
    check_geometry(size[1], size[0], str(path))
    values = sitk.GetArrayFromImage(image).reshape(size[1], size[0]).astype(np.float64)
    column, row = image.GetSpacing()[:2]
    pixels = auto_window(values).astype(np.float32)
    return ChestImage(pixels, (float(row), float(column)), str(path))


def make_square_pixels(
    image: ChestImage, tolerance: float = 0.01, max_pixels: int = MAX_PIXELS
) -> ChestImage:
    """Resample with SimpleITK so that rows and columns have the same physical spacing.

    Some CR readers and scanned films have non-square pixels; the model and the overlays
    assume square ones. The finer of the two spacings is kept, so no detail is lost, unless
    the result would exceed ``max_pixels`` (the decode budget by default): then the spacing
    that fills the budget. Images without a known spacing, or already square within
    ``tolerance``, are returned unchanged; so is one whose spacings differ by more than
    :data:`~dp_transforms.dicom.MAX_SPACING_RATIO`, which no radiograph has, with its
    spacing dropped and a warning.
    """
    if image.spacing is None:
        return image
    row, column = image.spacing
    if abs(row - column) <= tolerance * max(row, column):
        return image
    if max(row, column) > MAX_SPACING_RATIO * min(row, column):
        logger.warning(
            "%s: pixel spacing with rows and columns more than %g:1 apart; treated as unknown",
            image.source or "image",
            MAX_SPACING_RATIO,
        )
        return replace(image, spacing=None)
    rows, columns = image.pixels.shape
    target = max(min(row, column), math.sqrt(rows * row * columns * column / max_pixels))
    new_size = (max(1, round(columns * column / target)), max(1, round(rows * row / target)))
    if new_size[0] * new_size[1] > max_pixels:
        new_size = (
            max(1, math.floor(columns * column / target)),
            max(1, math.floor(rows * row / target)),
        )
    source = sitk.GetImageFromArray(image.pixels)
    source.SetSpacing((column, row))
    # Keep the physical extent: the first output pixel's centre sits half a new pixel
    # inside the image's edge, not on the first input pixel's centre.
    origin = (0.5 * (target - column), 0.5 * (target - row))
    resampled = sitk.Resample(
        source,
        new_size,
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        (target, target),
        source.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    del source
    pixels = sitk.GetArrayFromImage(resampled)  # float32, its own copy
    del resampled
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return ChestImage(pixels, (target, target), image.source, image.original_shape or image.shape)


def model_canvas(
    image: ChestImage, size: int, square_pixels: bool = True
) -> tuple[np.ndarray, Letterbox]:
    """The one preprocessing from a decoded image to the model's input, for training, a
    bundle's evaluation and the node alike (:func:`dp_transforms.array.load_letterboxed`
    reads a file and calls it; the node's ``prepare`` decodes a received data set and calls
    it): the pixels made square (:func:`make_square_pixels`, within the node's working size
    :data:`~dp_transforms.dicom.WORKING_PIXELS`), then fitted into the ``size x size`` canvas
    keeping the aspect ratio (:meth:`~dp_transforms.geometry.Letterbox.image_to_canvas`).

    Returns:
        the ``(1, size, size)`` float32 canvas, and the letterbox from the image after any
        square-pixel resampling (its ``source_shape``) to the canvas.
    """
    if square_pixels:
        image = make_square_pixels(image, max_pixels=WORKING_PIXELS)
    geometry = Letterbox((int(image.shape[0]), int(image.shape[1])), size)
    return geometry.image_to_canvas(image.pixels[None]), geometry
