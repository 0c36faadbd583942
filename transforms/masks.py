"""Boxes as lesion masks, batched in PyTorch (training draws them on the GPU).

Boxes follow the conventions of :mod:`dp_transforms.geometry`; a lesion mask ``mask+`` is 1
inside any box and 0 elsewhere, and at a coarser resolution each mask pixel holds the
fraction of its area inside a box.
"""

from __future__ import annotations

import numpy as np
import torch


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
