"""The Grayscale Softcopy Presentation State: the regions and a short result line as graphics
on the source image, which a PACS viewer draws over the original pixels and can switch off.

Pure: the source data set (a :func:`~pacs_node.intake.sanitize.clean_source` one, which carries
Rows and Columns), a :class:`~pacs_node.model.prediction.Prediction` and the model's contract in,
a GSPS (highdicom) out. A few kilobytes, where the overlay is megabytes; unlike the overlay,
it leaves the diagnostic pixels untouched. Graphics are in the source's pixel units:

* layer "AI" (drawn above anything else): one closed polyline per region, with the region's
  Tracking UID of the SR, and its finding and score as a label in a box of its own beside it;
* a text box across the top of the image: the banner and the verdict of the overlay, so
  that the marks never appear without what they are.

Applied, it shows the image as the image shows itself: the source's Modality LUT and VOI are
restated (a presentation state replaces them), and its patient and study are the source's,
in the source's character set where that holds them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi

from dp_model.serving.contract import ModelContract
from dp_transforms.dicom import VOI_FUNCTIONS
from dp_transforms.header import number, numbers, text, values
from pacs_node import codes
from pacs_node.charsets import fit_character_set
from pacs_node.model.predictor import Prediction
from pacs_node.results.base import (
    DICOM,
    Result,
    ResultContext,
    region_outline,
    region_tracking_uid,
)
from pacs_node.results.identity import MANUFACTURER, ResultIdentity, contributing_equipment
from pacs_node.results.overlay import BANNER, body_part, outline_width, set_laterality, verdict
from pacs_node.status import FailReason

#: What this output's UIDs are derived under (:meth:`~pacs_node.results.identity.ResultIdentity.instance_uid`).
ROLE = "pr"

__all__ = ["build_presentation_state"]

#: The GSPS's layer, and its colour (CIELab of a saturated orange-red, as the overlay's boxes).
LAYER = "AI"
LAYER_COLOUR = hd.color.CIELabColor(55.0, 70.0, 60.0)


def build_presentation_state(
    source: Dataset,
    received: Dataset,
    prediction: Prediction,
    model: ModelContract,
    identity: ResultIdentity,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS for one source image: ``source`` the cleaned data set the results copy from,
    ``received`` the data set as it arrived (its grayscale pipeline is kept, so the image looks
    as it does without the presentation state)."""
    rows, columns = int(source.Rows), int(source.Columns)
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER,
        order=1,
        description="Deep Pneumonia regions and result",
        display_color=LAYER_COLOUR,
    )
    headline = _headline(prediction, model, rows, columns)
    graphics, texts, taken = [], [headline], [_box_of(headline)]
    for index, box in enumerate(np.asarray(prediction.boxes, np.float64).reshape(-1, 4)):
        outline = region_outline(box, rows, columns)
        x0, y0, x1, y1 = (float(v) for v in (*outline[0], *outline[2]))
        graphics.append(
            hd.pr.GraphicObject(
                hd.pr.GraphicTypeValues.POLYLINE,
                outline,
                hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=f"region {index + 1}",
                # the region's UID in the SR as well (TID 1410 Tracking Unique Identifier)
                tracking_uid=region_tracking_uid(identity, index),
            )
        )
        label = _label(_region_text(prediction, index), (x0, y0, x1, y1), taken, rows, columns)
        taken.append(_box_of(label))
        texts.append(label)
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts,
    )
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=identity.series_uid(ROLE),
        series_number=identity.PR_SERIES_NUMBER,
        sop_instance_uid=identity.instance_uid(ROLE),
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        device_serial_number=model.device_uid[:64],
        content_label="AI_PNEUMONIA",
        content_description=f"{BANNER}: Deep Pneumonia regions"[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        contributing_equipment=[contributing_equipment(model)],
        **_grayscale(received),
    )
    state.SeriesDescription = identity.series_description("marks")
    codes.identify_schemes(state)
    part = body_part(received)
    if part:  # a hanging protocol finds the marks with the radiograph by it
        state.BodyPartExamined = part
    set_laterality(state, source, part)
    _outline_overlay(state, prediction.boxes, rows, columns)
    fit_character_set(state)
    return state


def _region_text(prediction: Prediction, index: int) -> str:
    """What the SR says of a region: its finding's name and its own score."""
    name, peak = (
        codes.finding_code(prediction.region_label(index)).meaning,
        prediction.region_score(index),
    )
    return (
        f"{name}, region score {peak:.2f} (map peak, not a probability)"
        if np.isfinite(peak)
        else name
    )


def _outline_overlay(state: Dataset, boxes: np.ndarray, rows: int, columns: int) -> None:
    """The region outlines again as an overlay plane (60xx) on the AI layer, cut to the
    regions' extent: software that renders presentation states but not their graphics
    (dcmtk's ``dcmp2pgm``, some PACS) still shows them."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        return
    width = outline_width(max(rows, columns))
    x0, y0 = (max(0, int(np.floor(boxes[:, i].min()))) for i in (0, 1))
    x1, y1 = (
        min(columns, int(np.ceil(boxes[:, 2].max()))),
        min(rows, int(np.ceil(boxes[:, 3].max()))),
    )
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for bx0, by0, bx1, by1 in boxes:
        left, top = int(bx0) - x0, int(by0) - y0
        right, bottom = (
            min(int(np.ceil(bx1)) - x0, mask.shape[1]),
            min(int(np.ceil(by1)) - y0, mask.shape[0]),
        )
        mask[top : top + width, left:right] = mask[
            max(top, bottom - width) : bottom, left:right
        ] = True
        mask[top:bottom, left : left + width] = mask[
            top:bottom, max(left, right - width) : right
        ] = True
    packed = np.packbits(mask.ravel(), bitorder="little").tobytes()
    state.add_new(0x60000010, "US", mask.shape[0])  # Overlay Rows
    state.add_new(0x60000011, "US", mask.shape[1])  # Overlay Columns
    state.add_new(0x60000022, "LO", "AI regions")  # Overlay Description
    state.add_new(0x60000040, "CS", "G")  # Overlay Type: graphics
    state.add_new(0x60000050, "SS", [y0 + 1, x0 + 1])  # Overlay Origin, 1-based row\column
    state.add_new(0x60000100, "US", 1)  # Overlay Bits Allocated
    state.add_new(0x60000102, "US", 0)  # Overlay Bit Position
    state.add_new(0x60001001, "CS", LAYER)  # Overlay Activation Layer
    state.add_new(0x60003000, "OW", packed + b"\0" * (len(packed) % 2))


class _Grayscale(TypedDict, total=False):
    """The grayscale pipeline's arguments of a GSPS, those the received image has."""

    modality_lut_transformation: hd.ModalityLUTTransformation
    voi_lut_transformations: list[hd.pr.SoftcopyVOILUTTransformation]
    presentation_lut_transformation: hd.PresentationLUTTransformation


def _grayscale(received: Dataset) -> _Grayscale:
    """The received image's own Modality LUT, VOI and polarity, as the GSPS must restate them.

    A presentation state replaces the image's grayscale pipeline (PS3.4 N.2), and many PACS apply
    the newest one by themselves: without these a viewer shows the raw range, and with a window
    where the image had a VOI LUT it shows other grey levels. So the GSPS carries what a viewer
    applies to the image alone: the rescale, else the Modality LUT Sequence (PS3.3 C.11.1); the
    first VOI LUT, else the first window with its function and explanation (C.11.8: one VOI
    transformation per item; a VOI LUT before a window, as dcmtk, pydicom and the node's own
    pixels take them, :mod:`dp_transforms.dicom`). Values that are not usable are left out, as
    the node's reading leaves them.
    """
    found: _Grayscale = {}
    modality = _modality_lut(received)
    if modality is not None:
        found["modality_lut_transformation"] = modality
    voi = _voi_lut(received)
    if voi is None:
        voi = _window(received)
    if voi is not None:
        found["voi_lut_transformations"] = [voi]
    inverse = text(received, "PhotometricInterpretation").upper() == "MONOCHROME1"
    found["presentation_lut_transformation"] = hd.PresentationLUTTransformation(
        presentation_lut_shape="INVERSE" if inverse else "IDENTITY"
    )
    return found


def _modality_lut(received: Dataset) -> hd.ModalityLUTTransformation | None:
    slope, intercept = number(received, "RescaleSlope"), number(received, "RescaleIntercept")
    if slope is not None and intercept is not None and slope != 0:
        return hd.ModalityLUTTransformation(
            rescale_intercept=intercept,
            rescale_slope=slope,
            rescale_type=_rescale_type(text(received, "RescaleType")),
        )
    table = _table(received, "ModalityLUTSequence", apply_modality_lut)
    if table is None:
        return None
    item, first, data = table
    lut = hd.ModalityLUT(
        lut_type=_rescale_type(text(item, "ModalityLUTType")),
        first_mapped_value=first,
        lut_data=data,
        lut_explanation=_explanation(item, "LUTExplanation"),
    )
    return hd.ModalityLUTTransformation(modality_lut=lut)


def _voi_lut(received: Dataset) -> hd.pr.SoftcopyVOILUTTransformation | None:
    table = _table(received, "VOILUTSequence", apply_voi)
    if table is None:
        return None
    item, first, data = table
    bits = int(item.LUTDescriptor[2])
    # A viewer reads a LUT's output as a fraction of its bits per entry, which a presentation
    # state may give as 8 or 16 only (PS3.3 C.11.8): a 12-bit LUT is widened to 16 bits
    # (copied as it is, it would show a sixteenth of the brightness).
    if bits not in (8, 16):
        data, bits = _widened(data, bits), 16
    lut = hd.VOILUT(first, data, _explanation(item, "LUTExplanation"))
    lut.LUTDescriptor = [*lut.LUTDescriptor[:2], bits]  # 8-bit entries, in 16-bit words
    return hd.pr.SoftcopyVOILUTTransformation(voi_luts=[lut])


def _widened(data: np.ndarray, bits: int) -> np.ndarray:
    """LUT entries of ``bits`` bits in the high bits of 16: dcmtk renders the two alike, pixel
    for pixel on RG1 (scaling to 65535 instead moved 3 % of them by one grey level); a viewer
    that divides by 2**bits - 1 sees them differ by less than 1/4096 of the range."""
    return (data.astype(np.uint32) << (16 - bits)).astype(np.uint16)


def _window(received: Dataset) -> hd.pr.SoftcopyVOILUTTransformation | None:
    centres, widths = numbers(received, "WindowCenter"), numbers(received, "WindowWidth")
    function = text(received, "VOILUTFunction").upper()
    if not centres or not widths:
        return None
    # C.11.2.1.2: a width of at least 1, or above 0 for LINEAR_EXACT
    usable = widths[0] > 0 if function == "LINEAR_EXACT" else widths[0] >= 1
    if not usable:
        return None
    explanation = _explanation(received, "WindowCenterWidthExplanation")
    # As one-item lists: highdicom 0.28 stores a str explanation as list(str), one value per
    # character (VM 28 beside a WindowCenter of VM 1), which no validator notices.
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=[centres[0]],
        window_width=[widths[0]],
        window_explanation=None if explanation is None else [explanation],
        voi_lut_function=function if function in VOI_FUNCTIONS else None,
    )


def _table(
    received: Dataset, keyword: str, apply: Callable[[np.ndarray, Dataset], np.ndarray]
) -> tuple[Dataset, int, np.ndarray] | None:
    """The first LUT of ``keyword`` (its item, first mapped value and entries as pydicom reads
    them: US or OW, 8 or 16 bits), or None when it cannot be read or does not fit a GSPS."""
    try:
        item = received[keyword][0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16
        data = np.asarray(apply(np.arange(first, first + entries), received))
    except Exception:  # noqa: BLE001 - a malformed LUT costs the LUT, as in the node's reading
        return None
    if not 8 <= bits <= 16 or not 0 <= first < 2**16 or data.shape != (entries,):
        return None
    if data.min() < 0 or data.max() >= 2**bits:
        return None
    return item, first, data.astype(np.uint16)


def _rescale_type(value: str) -> str:
    """The source's Rescale (or Modality LUT) Type where it is a defined term, else US (unspecified)."""
    try:
        return hd.RescaleTypeValues(value).value
    except ValueError:
        return "US"


def _explanation(dataset: Dataset, keyword: str) -> str | None:
    """The first value of a free-text explanation (LO), or None."""
    found = values(dataset, keyword)
    value = re.sub(r"[\x00-\x1f\\]", "", str(found[0])).strip()[:64] if found else ""
    return value or None


def _headline(
    prediction: Prediction, model: ModelContract, rows: int, columns: int
) -> hd.pr.TextObject:
    """The banner and the verdict, in a box across the top of the image, as many lines high as
    the text needs at the film's text size."""
    demo = " (DEMONSTRATION MODEL)" if model.demo else ""
    text = f"{BANNER}{demo}: {verdict(prediction)}"[:1024]
    line, margin = _line_height(rows, columns), _margin(rows, columns)
    _, height = _text_size(text, columns - 2 * margin, line)
    box = (margin, margin, columns - margin, min(rows - margin, margin + height))
    return hd.pr.TextObject(
        text,
        hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=box,
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )


# --- where the text goes --------------------------------------------------------------------------
#
# A viewer draws a text object in its bounding box (PS3.3 C.10.5.1.1): some scale the text to the
# box, others draw it at their own size from its corner. Each box is sized for the text at a line
# height of LINE of the film's smaller side, placed inside the image, clear of the headline and of
# the other labels, over its region's columns: above the region, else inside its top, else below
# it, else at the nearest free height, with a visible anchor line to the region's corner.

#: Line height as a fraction of the image's smaller side (at least MIN_LINE pixels), and the mean
#: width of a character as a fraction of the line height (a proportional sans-serif font).
LINE, MIN_LINE, CHAR = 0.022, 10.0, 0.55


@dataclass(frozen=True)
class _Box:
    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: _Box) -> bool:
        return (
            self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1
        )

    def inside(self, rows: int, columns: int) -> bool:
        return min(self.x0, self.y0) >= 0 and self.x1 <= columns and self.y1 <= rows


def _line_height(rows: int, columns: int) -> float:
    return max(MIN_LINE, LINE * min(rows, columns))


def _margin(rows: int, columns: int) -> float:
    return _line_height(rows, columns) / 2


def _text_size(text: str, width: float, line: float) -> tuple[float, float]:
    """The ``(width, height)`` of ``text`` wrapped to at most ``width`` pixels."""
    per_line = max(1, int(width // (CHAR * line)))
    lines = -(-len(text) // per_line)
    return min(width, len(text) * CHAR * line + line / 2), lines * line * 1.2


def _box_of(text: hd.pr.TextObject) -> _Box:
    (x0, y0), (x1, y1) = text.BoundingBoxTopLeftHandCorner, text.BoundingBoxBottomRightHandCorner
    return _Box(float(x0), float(y0), float(x1), float(y1))


def _label(
    text: str,
    region: tuple[float, float, float, float],
    taken: list[_Box],
    rows: int,
    columns: int,
) -> hd.pr.TextObject:
    """A region's label in a box of its own (see above)."""
    line, margin = _line_height(rows, columns), _margin(rows, columns)
    width, height = _text_size(text, columns - 2 * margin, line)
    rx0, ry0, _, ry1 = region
    x0 = min(max(rx0, margin), columns - margin - width)
    gap = line / 4
    preferred = [ry0 - gap - height, ry0 + gap, ry1 + gap]
    scan = np.arange(margin, rows - margin - height + 1, height / 2).tolist()
    candidates = [
        _Box(x0, y0, x0 + width, y0 + height)
        for y0 in [*preferred, *sorted(scan, key=lambda y: abs(y - ry0))]
    ]
    free = [
        box
        for box in candidates
        if box.inside(rows, columns) and not any(box.overlaps(other) for other in taken)
    ]
    box = free[0] if free else candidates[-1]
    displaced = box not in candidates[: len(preferred)]
    return hd.pr.TextObject(
        text,
        hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(box.x0, box.y0, box.x1, box.y1),
        anchor_point=(rx0, ry0) if displaced else None,
        anchor_point_visible=displaced,
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )


class PresentationWriter:
    """The ``gsps`` output: the regions and the result line as a presentation state over the radiograph."""

    media_type = DICOM
    kind, label, role, fail_reason = "gsps", "PR", ROLE, FailReason.PRESENTATION

    def build(self, context: ResultContext) -> Result:
        return Result.of_dataset(
            build_presentation_state(
                context.source,
                context.received,
                context.prediction,
                context.model,
                context.identity,
            ),
            self.kind,
            self.label,
        )
