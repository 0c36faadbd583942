"""The Grayscale Softcopy Presentation State: the regions and a short result line as graphics
on the source image, which a PACS viewer draws over the original pixels and can switch off.

Pure: the source data set (a :func:`~pacs_node.sanitize.clean_source` one, which carries
Rows and Columns), a :class:`~pacs_node.predictor.Prediction` and the model's contract in,
a GSPS (highdicom) out. A few kilobytes, where the overlay is megabytes; unlike the overlay,
it leaves the diagnostic pixels untouched. Graphics are in the source's pixel units:

* layer "AI" (drawn above anything else): one closed polyline per region, its finding and
  certainty as text at its top-left corner;
* a text line across the top of the image: the banner and the verdict of the overlay, so
  that the marks never appear without what they are.
"""

from __future__ import annotations

from typing import TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dp_model.contract import ModelContract
from dp_transforms.header import number, numbers, text
from pacs_node import codes
from pacs_node.model.predictor import Prediction
from pacs_node.results.base import DICOM, Result, ResultContext
from pacs_node.results.identity import MANUFACTURER, ResultIdentity, contributing_equipment
from pacs_node.results.overlay import BANNER, verdict
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
    graphics, texts = [], [_headline(prediction, model, rows, columns)]
    for index, box in enumerate(np.asarray(prediction.boxes, np.float64).reshape(-1, 4)):
        x0, y0, x1, y1 = (
            float(np.clip(v, 0, limit)) for v, limit in zip(box, (columns, rows, columns, rows))
        )
        outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        graphics.append(
            hd.pr.GraphicObject(
                hd.pr.GraphicTypeValues.POLYLINE,
                outline,
                hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=f"region {index + 1}",
                tracking_uid=identity.tracking_uid(f"pr-region-{index}"),
            )
        )
        texts.append(
            hd.pr.TextObject(
                _region_text(prediction, index),
                hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=(x0, y0),
                anchor_point_visible=False,
            )
        )
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
    state.Laterality = None  # Type 2C: a presentation state of the whole chest, no side
    _outline_overlay(state, prediction.boxes, rows, columns)
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
    width = max(2, max(rows, columns) // 400)
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
    """The received image's own modality LUT, window and polarity, as the GSPS must restate them
    (a presentation state replaces the image's; without them a viewer shows the raw range).
    Values a header holds that are not numbers are left out, as the node's reading leaves them."""
    found: _Grayscale = {}
    slope, intercept = number(received, "RescaleSlope"), number(received, "RescaleIntercept")
    if slope is not None and intercept is not None and slope != 0:
        found["modality_lut_transformation"] = hd.ModalityLUTTransformation(
            rescale_intercept=intercept, rescale_slope=slope, rescale_type="US"
        )
    centres, widths = (
        numbers(received, "WindowCenter") or [],
        numbers(received, "WindowWidth") or [],
    )
    if centres and widths and widths[0] > 0:
        found["voi_lut_transformations"] = [
            hd.pr.SoftcopyVOILUTTransformation(window_center=centres[0], window_width=widths[0])
        ]
    inverse = text(received, "PhotometricInterpretation").upper() == "MONOCHROME1"
    found["presentation_lut_transformation"] = hd.PresentationLUTTransformation(
        presentation_lut_shape="INVERSE" if inverse else "IDENTITY"
    )
    return found


def _headline(
    prediction: Prediction, model: ModelContract, rows: int, columns: int
) -> hd.pr.TextObject:
    """The banner and the verdict, in a box across the top of the image."""
    demo = " (DEMONSTRATION MODEL)" if model.demo else ""
    text = f"{BANNER}{demo}: {verdict(prediction)}"[:1024]
    return hd.pr.TextObject(
        text,
        hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(columns * 0.02, rows * 0.01, columns * 0.98, rows * 0.06),
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
