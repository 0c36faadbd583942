"""Boxes, masks and the letterbox mapping between a source image and the model's canvas.

It imports no PyTorch: the node letterboxes received images with it alone. The masks of
boxes, which training draws on the GPU, are :mod:`dp_transforms.masks`.

Conventions, used everywhere in the project:

* a box is ``(x_min, y_min, x_max, y_max)`` in pixel units of the image it belongs to,
  x to the right (columns), y down (rows); pixel ``i`` covers ``[i, i + 1)``, so a box
  around the whole of an ``H x W`` image is ``(0, 0, W, H)``;
* boxes of one image are an ``(N, 4)`` float32 array, ``N = 0`` for an image without
  lesions;
* a lesion mask ``mask+`` is 1 inside any box and 0 elsewhere, ``mask- = 1 - mask+``;
  at a coarser resolution each mask pixel holds the fraction of its area inside a box.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from scipy.sparse import csr_matrix

#: A map NumPy slices or a tensor: :meth:`Letterbox.canvas_crop` only slices it.
ArrayT = TypeVar("ArrayT", bound=Any)

BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def as_boxes(boxes: object, source: str = "") -> np.ndarray:
    """Validate and convert boxes to an ``(N, 4)`` float32 xyxy array.

    Raises:
        ValueError: wrong shape, non-finite values, or a box with max < min.
    """
    arr = np.asarray(boxes if boxes is not None else [], dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, 4), np.float32)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    prefix = f"{source}: " if source else ""
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{prefix}boxes must have shape (N, 4), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{prefix}boxes contain non-finite values: {arr.tolist()}")
    bad = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if bad.any():
        raise ValueError(
            f"{prefix}box with max < min (x_min, y_min, x_max, y_max): {arr[bad][0].tolist()}"
        )
    return arr


def xywh_to_xyxy(boxes: object) -> np.ndarray:
    """Convert ``(x, y, width, height)`` boxes (RSNA, NIH) to ``(x_min, y_min, x_max, y_max)``."""
    arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([arr[:, :2], arr[:, :2] + arr[:, 2:]], axis=1)


def clip_boxes(boxes: np.ndarray, shape: tuple[int, int], min_size: float = 1.0) -> np.ndarray:
    """Clip boxes to an image of ``shape = (rows, columns)`` and drop those left smaller than ``min_size``."""
    rows, columns = shape
    out = boxes.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, columns)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, rows)
    keep = ((out[:, 2] - out[:, 0]) >= min_size) & ((out[:, 3] - out[:, 1]) >= min_size)
    return out[keep]


@dataclass(frozen=True)
class Letterbox:
    """Scale an image to fit a square canvas, keeping its aspect ratio, and pad the rest.

    The mapping is kept so that boxes go to the canvas and model outputs (heat maps,
    predicted boxes) come back to the source image exactly.

    Attributes:
        source_shape: ``(rows, columns)`` of the source image.
        size: side of the square canvas.
    """

    source_shape: tuple[int, int]
    size: int

    def __post_init__(self) -> None:
        rows, columns = self.source_shape
        if rows < 1 or columns < 1 or self.size < 1:
            raise ValueError(f"invalid letterbox {self.source_shape} -> {self.size}")

    @property
    def content_shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the scaled image inside the canvas."""
        rows, columns = self.source_shape
        scale = self.size / max(rows, columns)
        return max(1, round(rows * scale)), max(1, round(columns * scale))

    @property
    def offset(self) -> tuple[int, int]:
        """``(top, left)`` padding before the content."""
        rows, columns = self.content_shape
        return (self.size - rows) // 2, (self.size - columns) // 2

    @property
    def scale(self) -> tuple[float, float]:
        """``(y, x)`` factors from source pixels to canvas pixels."""
        return (
            self.content_shape[0] / self.source_shape[0],
            self.content_shape[1] / self.source_shape[1],
        )

    def boxes_to_canvas(self, boxes: np.ndarray) -> np.ndarray:
        (sy, sx), (top, left) = self.scale, self.offset
        return (
            boxes * np.array([sx, sy, sx, sy], np.float32)
            + np.array([left, top, left, top], np.float32)
        ).astype(np.float32)

    def boxes_to_source(self, boxes: np.ndarray) -> np.ndarray:
        (sy, sx), (top, left) = self.scale, self.offset
        out = (
            np.asarray(boxes, np.float32) - np.array([left, top, left, top], np.float32)
        ) / np.array([sx, sy, sx, sy], np.float32)
        return clip_boxes(out.astype(np.float32), self.source_shape, min_size=0.0)

    def image_to_canvas(self, image: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """``(C, H, W)`` source image to ``(C, size, size)`` float32: antialiased resize, then pad."""
        resized = resize(image, self.content_shape)
        (top, left), (rows, columns) = self.offset, self.content_shape
        canvas = np.full((image.shape[0], self.size, self.size), fill, np.float32)
        canvas[:, top : top + rows, left : left + columns] = resized
        return canvas

    def canvas_crop(self, canvas_map: ArrayT) -> ArrayT:
        """The part of a ``(C, h, w)`` map over the canvas (any resolution) that covers the
        source image (a NumPy array or a tensor: only sliced)."""
        factor = canvas_map.shape[-1] / self.size
        (top, left), (rows, columns) = self.offset, self.content_shape
        return canvas_map[
            :,
            round(top * factor) : round((top + rows) * factor),
            round(left * factor) : round((left + columns) * factor),
        ]

    def canvas_to_source(self, canvas_map: np.ndarray) -> np.ndarray:
        """``(C, h, w)`` map over the canvas (any resolution) back to ``(C, H, W)`` of the source."""
        return resize(self.canvas_crop(canvas_map), self.source_shape)


#: Multiply-adds under which :func:`resize` enlarges by dense weights (BLAS) rather than sparse ones.
DENSE_PRODUCTS = 100_000_000


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(C, H, W)`` float image to ``shape``, float32: bilinear, antialiased when shrinking.

    The one resampling of the project's images and maps: the letterbox of training (through
    the MONAI transform) and of the node, the overlay and the heat maps. It is PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=shrinking)``, computed
    the way PyTorch computes it (a separable triangle filter whose support widens with the
    reduction, each output pixel's weights normalised to one), so that the canvases of
    bundles trained before are the same (tests/test_geometry.py compares the two).
    """
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"resize needs a floating point image, got {image.dtype}")
    rows, columns = int(shape[0]), int(shape[1])
    if tuple(image.shape[-2:]) == (rows, columns):
        return image.astype(np.float32, copy=False)
    height, width = image.shape[-2:]
    shrinking = rows < height or columns < width
    across = _weights(width, columns, shrinking)  # (columns, W)
    down = _weights(height, rows, shrinking)  # (rows, H)
    out = np.empty((image.shape[0], rows, columns), np.float32)
    planes = np.asarray(image, np.float32)
    # A heat map or a canvas enlarged: dense BLAS products, 2 to 8 times faster than sparse
    # ones there (measured on the 2-core machine); shrinking and large products stay sparse.
    dense = rows * height * width + rows * width * columns  # (down @ plane) @ across.T
    if not shrinking and dense <= DENSE_PRODUCTS:
        down_dense = _dense_weights(height, rows, shrinking)
        across_dense = _dense_weights(width, columns, shrinking)
        for c, plane in enumerate(planes):
            np.matmul(down_dense @ plane, across_dense.T, out=out[c])
        return out
    # the axis that leaves less to do for the other first: the products, and the copies the
    # transposed operands take (across first transposes the whole plane: 10 ms of a 15-bit
    # radiograph's 26 ms letterbox, on the 2-core machine)
    down_first = down.nnz * width + across.nnz * rows + rows * (
        width + columns
    ) <= across.nnz * height + down.nnz * columns + height * (width + columns)
    for c, plane in enumerate(planes):
        out[c] = (across @ (down @ plane).T).T if down_first else down @ (across @ plane.T).T
    return out


@functools.lru_cache(maxsize=32)
def _dense_weights(size: int, target: int, antialias: bool) -> np.ndarray:
    """:func:`_weights` as a dense array (read-only: it is shared)."""
    weights = _weights(size, target, antialias).toarray()
    weights.flags.writeable = False
    return weights


@functools.lru_cache(maxsize=32)
def _weights(size: int, target: int, antialias: bool) -> csr_matrix:
    """The ``(target, size)`` sparse matrix of one axis's resampling (PyTorch's
    ``_upsample_bilinear2d_aa`` weights; without ``antialias``, or when enlarging, they are
    plain bilinear interpolation's)."""
    scale = size / target
    widened = antialias and scale >= 1.0
    support = scale if widened else 1.0
    invscale = 1.0 / scale if widened else 1.0
    centre = scale * (np.arange(target) + 0.5)
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centre + support + 0.5).astype(np.int64), size)
    span = int((last - first).max())
    taps = first[:, None] + np.arange(span)[None]
    weight = np.clip(1.0 - np.abs((taps - centre[:, None] + 0.5) * invscale), 0.0, None)
    weight[taps >= last[:, None]] = 0.0
    weight /= weight.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(target), span)
    inside = taps.ravel() < size
    return csr_matrix(
        (weight.ravel()[inside].astype(np.float32), (rows[inside], taps.ravel()[inside])),
        shape=(target, size),
    )
