"""Which received images the model may read: frontal chest radiographs only.

The model was trained on frontal (PA or AP) chest radiographs. Anything else gets no AI
result, and the reason is recorded in the audit log. Attributes that are absent, empty or
unreadable do not disqualify an image (many modalities leave them out, some fill them
with junk); present and different ones do. Secondary Capture images are read when their
Modality says they are radiographs (CR or DX), as the RSNA challenge files and many
digitisers store them.

Loop guard: an image that an AI made (this node's own overlays included) is never scored
again: it carries this node's manufacturer, an algorithm among its contributing
equipment, or annotations burned into its pixels.

Reasons are stable codes; details are fixed sentences and numbers, never a value of the
data set (a broken modality can put a patient's name anywhere).
"""

from __future__ import annotations

from enum import StrEnum

from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from dp_transforms.header import integer, text, texts
from pacs_node import codes
from pacs_node.codes import MANUFACTURER

MODALITIES = ("CR", "DX")
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS")
FRONTAL_VIEWS = ("PA", "AP", "POSTERO_ANTERIOR", "ANTERO_POSTERIOR")
#: Chest radiographs are between about 1:1.5 and 1.5:1; beyond this is not one.
MAX_ASPECT = 2.0
MIN_SIDE = 256


class SkipReason(StrEnum):
    """Why an image got no result; stable values, used in the audit log and metrics."""

    MODALITY = "modality"
    BODY_PART = "body-part"
    VIEW = "view-position"
    IMAGE_TYPE = "image-type"
    GEOMETRY = "geometry"
    AI_RESULT = "ai-result"


def screen(ds: Dataset) -> tuple[SkipReason, str] | None:
    """None for a frontal chest radiograph, else the reason and a one-line detail."""
    for check in (_made_by_ai, _modality, _body_part, _view, _image_type, _geometry):
        found = check(ds)
        if found is not None:
            return found
    return None


def _made_by_ai(ds: Dataset) -> tuple[SkipReason, str] | None:
    if text(ds, "Manufacturer") == MANUFACTURER.upper():
        return SkipReason.AI_RESULT, "made by this node (loop guard)"
    if text(ds, "BurnedInAnnotation") == "YES":
        return (
            SkipReason.AI_RESULT,
            "annotations are burned into its pixels: a derived image, not a radiograph",
        )
    if any(_is_algorithm(item) for item in _items(ds, "ContributingEquipmentSequence")):
        return SkipReason.AI_RESULT, "an algorithm is among its contributing equipment"
    return None


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    try:
        return [item for item in (ds.get(keyword) or []) if isinstance(item, Dataset)]
    except Exception:  # noqa: BLE001 - an unreadable sequence holds nothing usable
        return []


def _is_algorithm(item: Dataset) -> bool:
    if text(item, "Manufacturer") == MANUFACTURER.upper():
        return True
    purposes = _items(item, "PurposeOfReferenceCodeSequence")
    return any(
        text(code, "CodeValue") == codes.PROCESSING_EQUIPMENT.value.upper() for code in purposes
    )


def _modality(ds: Dataset) -> tuple[SkipReason, str] | None:
    modality = text(ds, "Modality")
    secondary = str(ds.get("SOPClassUID", "")).strip(" \x00") == SecondaryCaptureImageStorage
    if (modality or secondary) and modality not in MODALITIES:
        what = "a Secondary Capture whose Modality is not" if secondary else "Modality is not"
        return SkipReason.MODALITY, f"{what} CR or DX"
    return None


def _body_part(ds: Dataset) -> tuple[SkipReason, str] | None:
    part = text(ds, "BodyPartExamined")
    if part and part not in CHEST_PARTS:
        return SkipReason.BODY_PART, "Body Part Examined is not the chest"
    return None


def _view(ds: Dataset) -> tuple[SkipReason, str] | None:
    view = text(ds, "ViewPosition")
    if view and view not in FRONTAL_VIEWS:
        return SkipReason.VIEW, "View Position is not frontal (PA or AP)"
    return None


def _image_type(ds: Dataset) -> tuple[SkipReason, str] | None:
    image_type = texts(ds, "ImageType")
    if "LOCALIZER" in image_type or image_type[1:2] == ["SECONDARY"]:
        return SkipReason.IMAGE_TYPE, "Image Type says it is not an acquired radiograph"
    return None


def _geometry(ds: Dataset) -> tuple[SkipReason, str] | None:
    rows, columns = integer(ds, "Rows") or 0, integer(ds, "Columns") or 0
    if (
        rows
        and columns
        and (min(rows, columns) < MIN_SIDE or max(rows, columns) > MAX_ASPECT * min(rows, columns))
    ):
        return (
            SkipReason.GEOMETRY,
            f"{rows} x {columns} pixels is not the shape of a chest radiograph",
        )
    return None
