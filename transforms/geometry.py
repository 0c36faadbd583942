"""Boxes, masks and the letterbox mapping between a source image and the model's canvas.

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

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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


def boxes_to_masks(
    boxes: torch.Tensor,
    canvas_shape: tuple[int, int],
    mask_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Rasterise boxes into ``mask+`` at any resolution, exactly and on any device.

    Each mask pixel gets the fraction of its area covered by the box (the union of
    several boxes is approximated by their maximum, exact where they do not overlap),
    which equals area-downsampling a full-resolution mask, without ever building one.

    Args:
        boxes: ``(B, N, 4)`` boxes in canvas pixel coordinates; padding rows with zero
            area contribute nothing, so images with fewer boxes pad with zeros.
        canvas_shape: ``(rows, columns)`` of the image the boxes refer to.
        mask_shape: ``(rows, columns)`` of the masks; defaults to ``canvas_shape``.

    Returns:
        ``(B, 1, rows, columns)`` float32 ``mask+`` in [0, 1].
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (B, N, 4), got {tuple(boxes.shape)}")
    rows, columns = mask_shape or canvas_shape
    scale_y, scale_x = rows / canvas_shape[0], columns / canvas_shape[1]
    b = boxes.to(torch.float32)
    x0, x1 = b[..., 0:1] * scale_x, b[..., 2:3] * scale_x  # (B, N, 1)
    y0, y1 = b[..., 1:2] * scale_y, b[..., 3:4] * scale_y
    xs = torch.arange(columns, device=b.device, dtype=torch.float32)
    ys = torch.arange(rows, device=b.device, dtype=torch.float32)
    cover_x = (torch.minimum(x1, xs + 1) - torch.maximum(x0, xs)).clamp(0, 1)  # (B, N, W)
    cover_y = (torch.minimum(y1, ys + 1) - torch.maximum(y0, ys)).clamp(0, 1)  # (B, N, H)
    mask = torch.zeros(b.shape[0], rows, columns, device=b.device)
    for n in range(b.shape[1]):  # N is small (a few boxes); avoids a (B, N, H, W) tensor
        mask = torch.maximum(mask, cover_y[:, n, :, None] * cover_x[:, n, None, :])
    return mask[:, None]


def pad_boxes(boxes: list[np.ndarray], max_boxes: int | None = None) -> torch.Tensor:
    """Stack per-image ``(N_i, 4)`` boxes into ``(B, N, 4)``, zero-padded (zero area)."""
    n = max([len(b) for b in boxes] + [1]) if max_boxes is None else max_boxes
    out = torch.zeros(len(boxes), n, 4)
    for i, b in enumerate(boxes):
        k = min(len(b), n)
        if k:
            out[i, :k] = torch.as_tensor(np.asarray(b[:k], np.float32))
    return out


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

    def image_to_canvas(self, image: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``(C, H, W)`` source image to ``(C, size, size)``: antialiased resize, then pad."""
        resized = resize(image, self.content_shape)
        (top, left), (rows, columns) = self.offset, self.content_shape
        canvas = image.new_full((image.shape[0], self.size, self.size), fill)
        canvas[:, top : top + rows, left : left + columns] = resized
        return canvas

    def canvas_crop(self, canvas_map: torch.Tensor) -> torch.Tensor:
        """The part of a ``(C, h, w)`` map over the canvas (any resolution) that covers the source image."""
        factor = canvas_map.shape[-1] / self.size
        (top, left), (rows, columns) = self.offset, self.content_shape
        return canvas_map[
            :,
            round(top * factor) : round((top + rows) * factor),
            round(left * factor) : round((left + columns) * factor),
        ]

    def canvas_to_source(self, canvas_map: torch.Tensor) -> torch.Tensor:
        """``(C, h, w)`` map over the canvas (any resolution) back to ``(C, H, W)`` of the source."""
        return resize(self.canvas_crop(canvas_map), self.source_shape)


def resize(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(C, H, W)`` float image to ``shape``: bilinear, antialiased when shrinking."""
    if not image.dtype.is_floating_point:
        raise TypeError(f"resize needs a floating point image, got {image.dtype}")
    if tuple(image.shape[-2:]) == tuple(shape):
        return image
    downscale = shape[0] < image.shape[-2] or shape[1] < image.shape[-1]
    return F.interpolate(
        image[None], size=shape, mode="bilinear", align_corners=False, antialias=downscale
    )[0]
