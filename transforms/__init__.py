"""Chest X-ray image loading and MONAI transforms.

The source folder is ``transforms/``; the package installs as ``dp_transforms`` so that
it can never shadow, or be shadowed by, another top-level ``transforms`` module
(docs/decisions.md). Inside the package every import is relative.

* :func:`load_image` / :func:`read_dicom` / :func:`dicom_to_image`: any file or dataset
  to a :class:`ChestImage` (float32 in [0, 1], larger brighter), the one conversion used
  by training and the node;
* :class:`ImageError`: the one exception for unusable input, with a reason code;
* geometry: boxes, ``mask+`` / ``mask-`` at any resolution, the letterbox mapping;
* MONAI array transforms and their dictionary wrappers; batched random augmentation
  that runs on the GPU with per-sample randomness.
"""

from .array import BoxesToMask, LetterboxResize, LoadChestXray, load_letterboxed
from .augment import (
    RandChestAffine,
    RandChestAffined,
    RandChestIntensity,
    RandChestIntensityd,
    SimCLRViews,
    gaussian_blur,
)
from .dicom import ChestImage, dicom_to_image, read_dicom, window_to_unit
from .dictionary import BoxesToMaskd, LetterboxResized, LoadChestXrayd
from .errors import ImageError, ImageErrorReason
from .geometry import Letterbox, as_boxes, boxes_to_masks, clip_boxes, pad_boxes, xywh_to_xyxy
from .io import load_image, make_square_pixels

__all__ = [
    "BoxesToMask",
    "BoxesToMaskd",
    "ChestImage",
    "ImageError",
    "ImageErrorReason",
    "Letterbox",
    "LetterboxResize",
    "LetterboxResized",
    "LoadChestXray",
    "LoadChestXrayd",
    "RandChestAffine",
    "RandChestAffined",
    "RandChestIntensity",
    "RandChestIntensityd",
    "SimCLRViews",
    "as_boxes",
    "boxes_to_masks",
    "clip_boxes",
    "dicom_to_image",
    "gaussian_blur",
    "load_image",
    "load_letterboxed",
    "make_square_pixels",
    "pad_boxes",
    "read_dicom",
    "window_to_unit",
    "xywh_to_xyxy",
]
