"""The Secondary Capture overlay: the source image with the result burned in (highdicom).

What a radiologist sees in any viewer, even one that cannot show a Structured Report:
the radiograph as displayed (VOI and polarity applied), the lesion heat map blended over
it where the model located a finding, the lesion regions as boxes, and, in a black band
above the radiograph (never over it), a banner that says it is an AI result and not for
primary diagnosis (and a demonstration, when the model is one) and the finding in words
(its coded meaning) with its probability. A positive result whose regions the bundle did not
earn (its maps did not beat a fixed prior on held-out images) gets neither heat map nor
boxes, and a line in the band that says so.
"""

from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless

from dp_model.contract import ModelContract
from dp_transforms.geometry import resize
from pacs_node import codes
from pacs_node.model.predictor import REGION_THRESHOLD, Prediction
from pacs_node.results.base import DICOM, Result, ResultContext
from pacs_node.results.identity import MANUFACTURER, ResultIdentity, contributing_equipment
from pacs_node.status import FailReason

#: What this output's UIDs are derived under (:meth:`~pacs_node.results.identity.ResultIdentity.instance_uid`).
ROLE = "sc"

# highdicom checks the person names it copies from the source; a single-component name
# ("ward") is legal DICOM that it merely finds unusual. The node copies source names as
# they are (tolerant when reading), so this one notice is not for the node's users.
warnings.filterwarnings(
    "ignore",
    message=r"The string .* is unlikely to represent the intended person name",
    category=UserWarning,
    module=r"highdicom\.",
)

BANNER = "AI result - not for primary diagnosis"
DEMO_BANNER = "DEMONSTRATION MODEL trained on synthetic images"
#: Heat-map pixels below the regions' threshold are left transparent; above it they are
#: blended in, up to HEAT_ALPHA: the film is tinted only where the model located something.
HEAT_FLOOR = REGION_THRESHOLD
HEAT_ALPHA = 0.45
BOX_COLOUR = (255, 64, 64)
_LEVELS = np.linspace(0.0, 1.0, 256)
HEAT_PALETTE = (colormaps["turbo"](_LEVELS)[:, :3] * 255).round().astype(np.uint8).tobytes()
HEAT_OPACITY = (
    (255 * HEAT_ALPHA * np.clip((_LEVELS - HEAT_FLOOR) / (1 - HEAT_FLOOR), 0, 1))
    .round()
    .astype(int)
    .tolist()
)


def render(
    pixels: np.ndarray, prediction: Prediction, demo: bool, max_side: int
) -> tuple[np.ndarray, float]:
    """The overlay as ``(band + rows, columns, 3)`` uint8 RGB and the scale from source pixels
    to it: a black band with the banner and the verdict above the radiograph (never over it),
    the heat map where the model located a finding, the regions."""
    scale = min(1.0, max_side / max(pixels.shape))
    shape = (max(1, round(pixels.shape[0] * scale)), max(1, round(pixels.shape[1] * scale)))
    gray = _resize(pixels, shape)
    # The map only where it says something: a positive result whose regions are shown, at their threshold.
    shown = prediction.heatmap.size and prediction.positive and not prediction.regions_withheld
    heat = _resize(prediction.heatmap, shape) if shown else np.zeros(shape, np.float32)
    # Heat levels index a 256-entry palette (colour) and table (opacity); PIL composites in C.
    level = Image.fromarray(np.clip(heat * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    colour = level.copy()
    colour.putpalette(HEAT_PALETTE)
    base = Image.fromarray(np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    radiograph = Image.composite(colour.convert("RGB"), base, level.point(HEAT_OPACITY))
    _draw_regions(radiograph, prediction, scale)
    return np.asarray(_with_band(radiograph, prediction, demo)), scale


def _resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return resize(torch.from_numpy(np.ascontiguousarray(array, np.float32))[None], shape)[0].numpy()


def name(label: str) -> str:
    """What a class label means, in words (its coded meaning: "Interstitial pneumonia")."""
    return codes.finding_code(label).meaning


def verdict(prediction: Prediction) -> str:
    """The result line burned into the overlay."""
    if not prediction.assessed:
        return "NOT ASSESSED: image outside the model's training distribution"
    chance = f"pneumonia probability {100 * prediction.pneumonia_probability:.0f}%"
    if prediction.triage:
        chance += " - TRIAGE FLAG"
    if prediction.multi_label and prediction.positive:
        return "Findings: " + ", ".join(
            f"{name(label)} {100 * p:.0f}%" for label, p in prediction.findings
        )
    return (
        f"Finding: {name(prediction.label)} - {chance}"
        if prediction.positive
        else f"No pneumonia at the operating point - {chance}"
    )


def _font(side: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=max(12, side // 45))
    # Pillow falls back to a fixed-size bitmap font only when built without FreeType; its
    # wheels always have it, and a bitmap font could not be sized to the film anyway.
    assert isinstance(font, ImageFont.FreeTypeFont), "Pillow without FreeType"
    return font


def _draw_regions(image: Image.Image, prediction: Prediction, scale: float) -> None:
    draw = ImageDraw.Draw(image)
    side = max(image.size)
    font, width = _font(side), max(2, side // 400)
    for i, box in enumerate(prediction.boxes * scale):
        draw.rectangle([float(v) for v in box], outline=BOX_COLOUR, width=width)
        if prediction.box_labels:  # a model that says which finding it located
            draw.text(
                (float(box[0]) + width, float(box[1]) + width),
                name(prediction.box_labels[i]),
                fill=BOX_COLOUR,
                font=font,
            )


def _wrapped(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a word longer than that keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _with_band(radiograph: Image.Image, prediction: Prediction, demo: bool) -> Image.Image:
    """``radiograph`` below a black band holding the banner and the verdict."""
    font = _font(max(radiograph.size))
    texts = [BANNER, *([DEMO_BANNER] if demo else []), verdict(prediction)]
    if prediction.positive and prediction.regions_withheld:
        texts.append(prediction.regions_withheld)
    # Every sentence wrapped to the film's width: on a narrow image (a 256-px phantom) the
    # verdict would otherwise run off its edge. The banner keeps its colour on each of its lines.
    size = int(font.size)  # the whole number of pixels _font asked for (Pillow types it float)
    lines = [
        (line, i == 0)
        for i, text in enumerate(texts)
        for line in _wrapped(text, font, radiograph.size[0] - size)
    ]
    line_height = size + size // 3
    band = line_height * len(lines) + size // 2
    image = Image.new("RGB", (radiograph.size[0], band + radiograph.size[1]), (0, 0, 0))
    image.paste(radiograph, (0, band))
    draw = ImageDraw.Draw(image)
    for i, (text, banner) in enumerate(lines):
        draw.text(
            (size // 2, size // 4 + i * line_height),
            text,
            fill=(255, 255, 0) if banner else (255, 255, 255),
            font=font,
        )
    return image


def build_overlay(
    source: Dataset,
    pixels: np.ndarray,
    spacing: tuple[float, float] | None,
    prediction: Prediction,
    model: ModelContract,
    identity: ResultIdentity,
    max_side: int,
    modality: str = "source",
) -> hd.sc.SCImage:
    """The SC for one source image; ``pixels`` is the source as displayed, in [0, 1]; ``modality``
    "source" (the radiograph's CR or DX, else OT) or "OT"."""
    rgb, scale = render(pixels, prediction, model.demo, max_side)
    orientation = tuple(source.get("PatientOrientation") or ())
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=identity.series_uid(ROLE),
        series_number=identity.SC_SERIES_NUMBER,
        sop_instance_uid=identity.instance_uid(ROLE),
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=(spacing[0] / scale, spacing[1] / scale) if spacing else None,  # type: ignore[arg-type]  # highdicom 0.28's from_ref_dataset says int, its __init__ float: millimetres
        laterality=None,
        patient_orientation=orientation if len(orientation) == 2 else ("L", "F"),
        # lossless, about a quarter of the size; the outbox decompresses for a destination without
        # it
        transfer_syntax_uid=JPEGLSLossless,
        contributing_equipment=[contributing_equipment(model)],
    )
    if len(orientation) != 2:
        sc.PatientOrientation = None  # type: ignore[assignment]  # Type 2: unknown, so empty rather than guessed (mypy infers highdicom's list)
    _describe(sc, source, identity)
    received = str(source.get("Modality", "")).upper()
    # The loop guard knows the node's own objects, whatever their modality.
    sc.Modality = received if modality == "source" and received in ("CR", "DX") else "OT"
    codes.identify_schemes(sc)
    sc.ImageComments = verdict(prediction)  # the burned-in result line, readable by machines too
    return sc


def _describe(sc: Dataset, source: Dataset, identity: ResultIdentity) -> None:
    """What highdicom leaves to the caller: burned-in flag, description, source reference."""
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SeriesDescription = identity.series_description("overlay")
    sc.DerivationDescription = (
        f"{BANNER}: lesion heat map, regions, class and score of Deep Pneumonia burned in"[:1024]
    )
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    # Type 2C: empty when unpaired or unknown
    sc.Laterality = laterality if laterality in ("R", "L") else None
    if source.get("StudyDescription"):
        sc.StudyDescription = source.StudyDescription
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = Sequence([reference])


class OverlayWriter:
    """The ``sc`` output: the Secondary Capture with the result burned in."""

    media_type = DICOM
    kind, label, role, fail_reason = "sc", "SC", ROLE, FailReason.OVERLAY

    def build(self, context: ResultContext) -> Result:
        chest = context.prepared.source
        overlay = build_overlay(
            context.source,
            chest.pixels,
            chest.spacing,
            context.prepared.on_source(context.prediction),
            context.model,
            context.identity,
            context.config.overlay_max_side,
            context.config.overlay_modality,
        )
        return Result.of_dataset(overlay, self.kind, self.label)
