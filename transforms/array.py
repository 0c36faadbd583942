"""MONAI array transforms for chest radiographs (deterministic; see ``augment`` for random ones).

Arrays are channel-first ``(1, rows, columns)`` float32 torch tensors in [0, 1], larger
brighter. Boxes follow :mod:`dp_transforms.geometry`.
"""

from __future__ import annotations

from os import PathLike

import numpy as np
import torch
from monai.transforms import Transform
from pydicom.dataset import Dataset

from .dicom import WORKING_PIXELS, read_dicom
from .geometry import Letterbox, as_boxes
from .io import load_image, make_square_pixels, model_canvas
from .masks import boxes_to_masks


class LoadChestXray(Transform):
    """Load a radiograph file (DICOM, PNG, JPEG, MHA, ...) or a DICOM dataset.

    Args:
        square_pixels: resample images with non-square pixels (SimpleITK) so that the
            model sees true proportions.

    Returns (from ``__call__``):
        the ``(1, rows, columns)`` image and a meta dict with ``spacing`` (mm or None),
        ``source``, ``original_shape`` and ``box_scale`` (``(x, y)`` factors that carry
        source boxes onto the returned image; 1.0 unless pixels were made square).
    """

    def __init__(self, square_pixels: bool = True) -> None:
        self.square_pixels = square_pixels

    def __call__(self, source: str | PathLike | Dataset) -> tuple[torch.Tensor, dict]:
        image = read_dicom(source) if isinstance(source, Dataset) else load_image(source)
        original = image.original_shape or image.shape
        if self.square_pixels:  # as model_canvas makes them square
            image = make_square_pixels(image, max_pixels=WORKING_PIXELS)
        box_scale = _box_scale(image.shape, original)
        meta = {
            "spacing": image.spacing,
            "source": image.source,
            "original_shape": original,
            "box_scale": box_scale,
        }
        return torch.from_numpy(image.pixels)[None], meta

    @staticmethod
    def boxes_onto(boxes: object, meta: dict) -> np.ndarray:
        """Validate source-pixel ``boxes`` and carry them onto the loaded image (``meta`` of this call)."""
        return _carried(boxes, meta["source"], meta["box_scale"])


def _box_scale(shape: tuple[int, ...], original: tuple[int, ...]) -> tuple[float, float]:
    """``(x, y)`` factors from an image of ``original`` rows and columns to one of ``shape``."""
    return shape[1] / original[1], shape[0] / original[0]


def _carried(boxes: object, source: str, scale: tuple[float, float]) -> np.ndarray:
    """Validated source-pixel ``boxes`` scaled by ``scale`` (:func:`_box_scale`)."""
    sx, sy = scale
    return as_boxes(boxes, source) * np.array([sx, sy, sx, sy], np.float32)


class LetterboxResize(Transform):
    """Fit an image into a ``size x size`` canvas keeping its aspect ratio (antialiased), pad with ``fill``."""

    def __init__(self, size: int, fill: float = 0.0) -> None:
        if size < 8:
            raise ValueError(f"size must be at least 8, got {size}")
        self.size = size
        self.fill = fill

    def geometry(self, image: torch.Tensor) -> Letterbox:
        return Letterbox((int(image.shape[-2]), int(image.shape[-1])), self.size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """The canvas of :meth:`~dp_transforms.geometry.Letterbox.image_to_canvas` (the
        node's, in NumPy), as a tensor."""
        pixels = torch.as_tensor(image, dtype=torch.float32).numpy(force=True)
        return torch.from_numpy(self.geometry(image).image_to_canvas(pixels, self.fill))


class BoxesToMask(Transform):
    """Turn an image's boxes into ``mask+`` of shape ``(1, rows, columns)``.

    Args:
        mask_shape: resolution of the mask; None for the image's own resolution.
    """

    def __init__(self, mask_shape: tuple[int, int] | None = None) -> None:
        self.mask_shape = mask_shape

    def __call__(self, boxes: np.ndarray, image_shape: tuple[int, int]) -> torch.Tensor:
        arr = torch.as_tensor(as_boxes(boxes))[None]
        return boxes_to_masks(arr, image_shape, self.mask_shape)[0]


def load_letterboxed(
    source: str | PathLike | Dataset, size: int, boxes: object = None, square_pixels: bool = True
) -> tuple[torch.Tensor, np.ndarray, Letterbox]:
    """Load an image and fit it to the ``size x size`` model canvas: the file read (or the
    DICOM data set converted), then :func:`~dp_transforms.io.model_canvas`, the preprocessing
    the node's :func:`pacs_node.model.predictor.prepare` calls on a received data set too
    (tests/test_dicom_pixels.py pins that both give the same canvas).

    Returns:
        the ``(1, size, size)`` float32 canvas, ``boxes`` (source pixels) moved onto it as
        ``(N, 4)``, and the :class:`~dp_transforms.geometry.Letterbox` that maps outputs back
        (from the image after any square-pixel resampling).
    """
    image = read_dicom(source) if isinstance(source, Dataset) else load_image(source)
    canvas, geometry = model_canvas(image, size, square_pixels)
    scale = _box_scale(geometry.source_shape, image.original_shape or image.shape)
    on_image = _carried(boxes, image.source, scale)
    return torch.from_numpy(canvas), geometry.boxes_to_canvas(on_image), geometry
