"""Dictionary wrappers (``Foo`` -> ``Food``) of the array transforms, MONAI style.

A sample is a dict such as ``{"image": path, "boxes": (N, 4) array, "label": 2}``. Each
wrapper holds its array transform and applies it to ``keys``; boxes (``box_keys``) are
moved together with the image so that they always describe the current pixels.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection
from monai.transforms import MapTransform

from .array import BoxesToMask, LetterboxResize, LoadChestXray
from .geometry import as_boxes


def _as_tuple(keys: KeysCollection | None) -> tuple[Hashable, ...]:
    if keys is None:
        return ()
    return (keys,) if isinstance(keys, (str, int)) else tuple(keys)


class LoadChestXrayd(MapTransform):
    """Load ``keys`` with :class:`LoadChestXray`; store meta in ``{key}_meta_dict``.

    Boxes in ``box_keys`` are validated and scaled with the image when its pixels are
    made square.
    """

    def __init__(
        self,
        keys: KeysCollection,
        box_keys: KeysCollection | None = None,
        square_pixels: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_keys = _as_tuple(box_keys)
        self.loader = LoadChestXray(square_pixels=square_pixels)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], meta = self.loader(d[key])
            d[f"{key}_meta_dict"] = meta
            for box_key in self.box_keys:
                if box_key in d:
                    d[box_key] = self.loader.boxes_onto(d[box_key], meta)
        return d


class LetterboxResized(MapTransform):
    """Letterbox ``keys`` to ``size x size`` and move ``box_keys`` onto the canvas.

    The :class:`~dp_transforms.geometry.Letterbox` used is stored in ``{key}_letterbox``
    so that model outputs can be mapped back to the source image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: int,
        box_keys: KeysCollection | None = None,
        fill: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_keys = _as_tuple(box_keys)
        self.resizer = LetterboxResize(size, fill)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        geometry = None
        for key in self.key_iterator(d):
            key_geometry = self.resizer.geometry(d[key])
            if geometry is not None and key_geometry != geometry:
                raise ValueError(
                    f"'{key}' has shape {key_geometry.source_shape}, others {geometry.source_shape}"
                )
            geometry = key_geometry
            d[key] = self.resizer(d[key])
            d[f"{key}_letterbox"] = geometry
        if geometry is not None:
            for box_key in self.box_keys:
                if box_key in d:
                    d[box_key] = geometry.boxes_to_canvas(as_boxes(d[box_key]))
        return d


class BoxesToMaskd(MapTransform):
    """Add ``mask+`` (and optionally ``mask-``) computed from ``box_key`` for the image ``keys[0]``.

    Args:
        keys: the image whose shape the boxes refer to.
        box_key: where the boxes are.
        mask_key: where ``mask+`` goes, ``(1, rows, columns)``.
        negative_key: where ``mask- = 1 - mask+`` goes; None to skip it.
        mask_shape: resolution of the masks; None for the image's own.
    """

    def __init__(
        self,
        keys: KeysCollection,
        box_key: str = "boxes",
        mask_key: str = "mask",
        negative_key: str | None = "mask_neg",
        mask_shape: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_key, self.mask_key, self.negative_key = box_key, mask_key, negative_key
        self.rasterise = BoxesToMask(tuple(mask_shape) if mask_shape else None)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        key = next(iter(self.key_iterator(d)))
        mask = self.rasterise(d.get(self.box_key), tuple(d[key].shape[-2:]))
        d[self.mask_key] = mask
        if self.negative_key:
            d[self.negative_key] = 1.0 - mask
        return d
