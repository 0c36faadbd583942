"""Chest X-ray image loading and MONAI transforms.

The source folder is ``transforms/``; the package installs as ``dp_transforms`` so that
it can never shadow, or be shadowed by, another top-level ``transforms`` module
(docs/decisions.md). Inside the package every import is relative.

* :func:`load_image` / :func:`read_dicom` / :func:`dicom_to_image`: any file or dataset
  to a :class:`ChestImage` (float32 in [0, 1], larger brighter), the one conversion used
  by training and the node; :func:`model_canvas`: such an image to the model's canvas, the
  one preprocessing of both;
* :class:`ImageError`: the one exception for unusable input, with a reason code;
* geometry: boxes, ``mask+`` / ``mask-`` at any resolution, the letterbox mapping;
* MONAI array transforms and their dictionary wrappers; batched random augmentation
  that runs on the GPU with per-sample randomness.

The image conversion and the geometry import NumPy alone (the node serving an ONNX graph
runs without PyTorch and MONAI); the names of the MONAI and PyTorch modules
(:data:`_TORCH_NAMES`) are imported when first looked up (PEP 562), so that ``import
dp_transforms.dicom`` does not load them.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .dicom import ChestImage, dicom_to_image, read_dicom, window_to_unit
from .errors import ImageError, ImageErrorReason
from .geometry import Letterbox, as_boxes, clip_boxes, xywh_to_xyxy
from .io import load_image, make_square_pixels, model_canvas

if TYPE_CHECKING:
    from .array import BoxesToMask, LetterboxResize, LoadChestXray, load_letterboxed
    from .augment import (
        RandChestAffine,
        RandChestAffined,
        RandChestIntensity,
        RandChestIntensityd,
        SimCLRViews,
        gaussian_blur,
    )
    from .dictionary import BoxesToMaskd, LetterboxResized, LoadChestXrayd
    from .masks import boxes_to_masks, pad_boxes

#: The names that need PyTorch (and MONAI), by the module that defines them.
_TORCH_NAMES = {
    "BoxesToMask": "array",
    "LetterboxResize": "array",
    "LoadChestXray": "array",
    "load_letterboxed": "array",
    "RandChestAffine": "augment",
    "RandChestAffined": "augment",
    "RandChestIntensity": "augment",
    "RandChestIntensityd": "augment",
    "SimCLRViews": "augment",
    "gaussian_blur": "augment",
    "BoxesToMaskd": "dictionary",
    "LetterboxResized": "dictionary",
    "LoadChestXrayd": "dictionary",
    "boxes_to_masks": "masks",
    "pad_boxes": "masks",
}


def __getattr__(name: str) -> Any:
    """A name of :data:`_TORCH_NAMES`, from its module, imported now (PEP 562)."""
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found = getattr(import_module(f".{_TORCH_NAMES[name]}", __name__), name)
    globals()[name] = found
    return found


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
    "model_canvas",
    "pad_boxes",
    "read_dicom",
    "window_to_unit",
    "xywh_to_xyxy",
]
