"""Which received images the model may read: frontal chest radiographs only.

The model was trained on frontal (PA or AP) chest radiographs. Anything else gets no AI
result, and the reason is recorded in the audit log. Attributes that are absent or empty
do not disqualify an image (many modalities leave them out); present and different ones do.
"""

from __future__ import annotations

from enum import StrEnum

from pydicom.dataset import Dataset

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


def screen(ds: Dataset) -> tuple[SkipReason, str] | None:
    """None for a frontal chest radiograph, else the reason and a one-line detail."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality and modality not in MODALITIES:
        return SkipReason.MODALITY, f"Modality {modality} is not CR or DX"
    part = str(ds.get("BodyPartExamined", "") or "").upper()
    if part and part not in CHEST_PARTS:
        return SkipReason.BODY_PART, f"BodyPartExamined {part} is not a chest"
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view and view not in FRONTAL_VIEWS:
        return SkipReason.VIEW, f"ViewPosition {view} is not frontal (PA or AP)"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or image_type[1:2] == ["SECONDARY"]:
        return SkipReason.IMAGE_TYPE, f"ImageType {'/'.join(image_type)} is not an acquired radiograph"
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows and columns and (min(rows, columns) < MIN_SIDE or max(rows, columns) > MAX_ASPECT * min(rows, columns)):
        return SkipReason.GEOMETRY, f"{rows} x {columns} pixels is not the shape of a chest radiograph"
    return None
