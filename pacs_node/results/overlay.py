"""The Secondary Capture overlay: the source image with the result burned in (highdicom).

What a radiologist sees in any viewer, even one that cannot show a Structured Report:
the radiograph as displayed (VOI and polarity applied), the lesion heat map blended over
it where the model located a finding, the lesion regions as boxes, and, in a black band
above the radiograph (never over it), a banner that says it is an AI result and not for
primary diagnosis (and a demonstration, when the model is one) and the finding in words
(its coded meaning) with its probability. A positive result whose regions the bundle did not
earn (its maps did not beat a fixed prior on held-out images) gets neither heat map nor
boxes, and a line in the band that says so.

What it says of itself is what the source said of the image: the patient and study modules
whole, body part and view, the source's spacing under its own name and scaled to the overlay,
and its lossy compression history (docs/decisions.md, "What the overlay and the presentation
state mean").
"""

from __future__ import annotations

import functools
import re
import warnings

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from dp_model.serving.contract import ModelContract
from dp_transforms import header
from dp_transforms.geometry import resize
from pacs_node import codes
from pacs_node.charsets import fit_character_set
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

#: The overlay's encodings by the node's ``overlay_transfer_syntax``, both lossless (a viewer is
#: never shown pixels the node degraded). Uncompressed by default: encoding RG1's overlay in
#: JPEG-LS took 190 to 290 ms of the node's CPU, its 8 MB more take 70 ms on a 1 Gb/s link and none of
#: the CPU (docs/benchmarks.md, "The overlay's encoding"). JPEG-LS, a third of the bytes, for a
#: slower link; the outbox decompresses it for a destination that does not take it.
TRANSFER_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "jpeg-ls": JPEGLSLossless}
#: Transfer syntaxes whose every image is lossy, and the method each names in Lossy Image
#: Compression Method (PS3.3 C.7.6.1.1.5.1). JPEG 2000 and HTJ2K may be either: for those the
#: header's own Lossy Image Compression decides.
LOSSY_SYNTAXES: dict[str, str] = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
}
#: The defined terms of Lossy Image Compression Method (PS3.3 C.7.6.1.1.5.1).
LOSSY_METHODS = (
    "ISO_10918_1",
    "ISO_14495_1",
    "ISO_15444_1",
    "ISO_15444_15",
    "ISO_13818_2",
    "ISO_14496_10",
    "ISO_23008_2",
    "ISO_18181_1",
)
#: View Position's defined terms for chest radiographs (PS3.3 C.8.11.5.1.1).
VIEW_POSITIONS = ("AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO")
#: Pixel Spacing Calibration Type's enumerated values (PS3.3 10.7.1.3).
CALIBRATION_TYPES = ("GEOMETRY", "FIDUCIAL")

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
    shape = _scaled(pixels.shape, scale)
    radiograph = Image.fromarray(_levels(_resize(pixels, shape)), "L").convert("RGB")
    # The map only where it says something: a positive result whose regions are shown, at their
    # threshold. Elsewhere its opacity is 0 everywhere, and the composite would be the film itself.
    if heat_shown(prediction):
        radiograph = _with_heat(radiograph, _resize(prediction.heatmap, shape))
    _draw_regions(radiograph, prediction, scale)
    return np.asarray(_with_band(radiograph, prediction, demo)), scale


def _levels(values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] as 8-bit levels, rounded (float32 arithmetic in one buffer)."""
    scaled: np.ndarray = np.multiply(values, np.float32(255), dtype=np.float32)
    scaled += np.float32(0.5)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def _with_heat(radiograph: Image.Image, heat: np.ndarray) -> Image.Image:
    """The heat map blended over ``radiograph``: its levels index a 256-entry palette (colour)
    and table (opacity); PIL composites in C, only within the box where the opacity is not 0."""
    level = Image.fromarray(_levels(heat), "L")
    opacity = level.point(HEAT_OPACITY)
    box = opacity.getbbox()
    if box is None:
        return radiograph
    colour = level.crop(box)
    colour.putpalette(HEAT_PALETTE)
    blended = Image.composite(colour.convert("RGB"), radiograph.crop(box), opacity.crop(box))
    radiograph.paste(blended, box[:2])
    return radiograph


def heat_shown(prediction: Prediction) -> bool:
    """Whether the heat map is blended in: a positive result whose regions are shown."""
    return bool(prediction.heatmap.size and prediction.positive and not prediction.regions_withheld)


def drawn(prediction: Prediction) -> str:
    """What the overlay burns in, in words (its Derivation Description, PS3.3 C.7.6.1.1.4):
    the band, and the heat map and regions only where :func:`render` draws them."""
    parts = ["result line"]
    if heat_shown(prediction):
        parts.append("lesion heat map")
    if len(prediction.boxes):
        labelled = " with their findings" if prediction.box_labels else ""
        parts.append(f"{len(prediction.boxes)} lesion region(s){labelled}")
    return f"{BANNER}: {', '.join(parts)} of Deep Pneumonia burned in"


def _scaled(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """The radiograph's ``(rows, columns)`` on the overlay."""
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(resize(np.asarray(array, np.float32)[None], shape)[0])


def name(label: str) -> str:
    """What a class label means, in words (its coded meaning: "Interstitial pneumonia")."""
    return codes.finding_code(label).meaning


def verdict(prediction: Prediction) -> str:
    """The result line burned into the overlay: what the model decided, and no more.

    A single-label model decides pneumonia at its operating point and then names its most
    probable type, which is not itself decided: "Pneumonia - probability 83% (threshold 61%),
    most likely cavitary (47%)". A multi-label model's findings are each decided.
    """
    if not prediction.assessed:
        return "NOT ASSESSED: image outside the model's training distribution"
    flag = " - TRIAGE FLAG" if prediction.triage else ""
    if prediction.multi_label and prediction.positive:
        return "Findings: " + ", ".join(
            f"{name(label)} {100 * p:.0f}%" for label, p in prediction.findings
        )
    percent = f"{100 * prediction.pneumonia_probability:.0f}%"
    if not prediction.positive:
        return f"No pneumonia at the operating point - pneumonia probability {percent}"
    said = f"Pneumonia - probability {percent} (threshold {100 * prediction.operating_point:.0f}%)"
    chosen = prediction.most_probable_type
    if chosen is not None:
        said += f", most likely {type_name(chosen)} ({100 * prediction.probability(chosen):.0f}%)"
    return said + flag


def type_name(label: str) -> str:
    """A pneumonia type as the verdict names it after "most likely": "cavitary",
    "bronchopneumonia" (its coded meaning, lower case, without a trailing "pneumonia")."""
    meaning = name(label)
    short = meaning.removesuffix(" pneumonia") if meaning.lower() != "pneumonia" else meaning
    return short[:1].lower() + short[1:]


def _font(side: int) -> ImageFont.FreeTypeFont:
    return _font_of_size(max(12, side // 45))


@functools.lru_cache(maxsize=64)  # loading parses the font: once per size
def _font_of_size(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    # Pillow falls back to a fixed-size bitmap font only when built without FreeType; its
    # wheels always have it, and a bitmap font could not be sized to the film anyway.
    assert isinstance(font, ImageFont.FreeTypeFont), "Pillow without FreeType"
    return font


def outline_width(side: int) -> int:
    """Pixels across a region's outline on an image whose longer side is ``side`` pixels:
    the secondary capture draws it so, and the presentation state's overlay plane
    (:mod:`pacs_node.results.presentation`) repeats it, so that both show the same line."""
    return max(2, side // 400)


def _draw_regions(image: Image.Image, prediction: Prediction, scale: float) -> None:
    draw = ImageDraw.Draw(image)
    side = max(image.size)
    font, width = _font(side), outline_width(side)
    for i, box in enumerate(prediction.boxes * scale):
        draw.rectangle([float(v) for v in box], outline=BOX_COLOUR, width=width)
        if prediction.box_labels:  # a model that says which finding it located
            draw.text(
                (float(box[0]) + width, float(box[1]) + width),
                name(prediction.box_labels[i]),
                fill=BOX_COLOUR,
                font=font,
            )


@functools.lru_cache(maxsize=512)  # the banners and most verdicts recur, image after image
def _wrapped(text: str, font: ImageFont.FreeTypeFont, width: float) -> tuple[str, ...]:
    """``text`` in lines no wider than ``width`` pixels (a word longer than that keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return tuple(lines)


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
    received: Dataset,
    pixels: np.ndarray,
    prediction: Prediction,
    model: ModelContract,
    identity: ResultIdentity,
    max_side: int,
    modality: str = "source",
    syntax: str = "explicit",
) -> hd.sc.SCImage:
    """The SC for one source image.

    Args:
        source: the cleaned data set (:func:`~pacs_node.intake.sanitize.clean_source`): the
            patient, study and equipment attributes copied.
        received: the data set as it arrived: what the image is (body part, view, spacing,
            lossy history), read tolerantly and carried when valid.
        pixels: the source as displayed, in [0, 1], at most ``max_side`` a side.
        modality: "source" (the radiograph's CR or DX, else OT) or "OT".
        syntax: its transfer syntax, a key of :data:`TRANSFER_SYNTAXES`.
    """
    rgb, scale = render(pixels, prediction, model.demo, max_side)
    written = TRANSFER_SYNTAXES[syntax]
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
        laterality=None,
        patient_orientation=orientation if len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid=written,
        contributing_equipment=[contributing_equipment(model)],
    )
    if len(orientation) != 2:
        sc.PatientOrientation = None  # type: ignore[assignment]  # Type 2: unknown, so empty rather than guessed (mypy infers highdicom's list)
    # highdicom's SC copies a few patient and study attributes; the modules whole (identity
    # removed, de-identification method ...) as for the other outputs (PS3.3 C.7.1.1, C.7.2)
    sc.copy_patient_and_study_information(source)
    _describe(sc, source, identity)
    sc.DerivationDescription = drawn(prediction)[:1024]
    radiograph = _scaled(pixels.shape, scale)
    _spacing(sc, received, _factors(source, radiograph))
    _what_it_shows(sc, received)
    set_laterality(sc, source)  # after the body part, which decides whether it is required
    _lossy(sc, received, written)
    received_modality = str(source.get("Modality", "")).upper()
    # The loop guard knows the node's own objects, whatever their modality.
    sc.Modality = (
        received_modality if modality == "source" and received_modality in ("CR", "DX") else "OT"
    )
    # PS3.3 C.8.6.1: made by software from a digital image, not captured off a modality's interface
    sc.ConversionType = "WSD"
    codes.identify_schemes(sc)
    sc.ImageComments = verdict(prediction)  # the burned-in result line, readable by machines too
    fit_character_set(sc)
    return sc


def _describe(sc: Dataset, source: Dataset, identity: ResultIdentity) -> None:
    """What highdicom leaves to the caller: burned-in flag, description, source reference."""
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SeriesDescription = identity.series_description("overlay")
    if source.get("ImageLaterality"):  # R, L, U or B: sanitize copies only those
        sc.ImageLaterality = source.ImageLaterality
    if source.get("StudyDescription"):
        sc.StudyDescription = source.StudyDescription
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = Sequence([reference])


def _factors(source: Dataset, radiograph: tuple[int, int]) -> tuple[float, float] | None:
    """How much larger a pixel of the overlay's radiograph is than one of the source, by row
    and by column (None when the source's size is unknown)."""
    rows, columns = header.integer(source, "Rows"), header.integer(source, "Columns")
    if not rows or not columns or rows < 0 or columns < 0:
        return None
    return rows / radiograph[0], columns / radiograph[1]


def _spacing(sc: Dataset, received: Dataset, factors: tuple[float, float] | None) -> None:
    """The source's spacings under their own names, scaled by the resampling (PS3.3 10.7.1.3).

    Imager Pixel Spacing is measured at the detector: a distance in the patient is smaller by
    the geometric magnification. Pixel Spacing is calibrated in the patient only where Pixel
    Spacing Calibration Type says so; without it, it means what the source's meant. Carried as
    Pixel Spacing, a detector spacing would make every measurement on the overlay too large by
    the magnification (10 to 20 % on a chest film).
    """
    if factors is None:
        return
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        found = header.numbers(received, keyword)
        if found is None or len(found) != 2 or not all(0 < v < 1e4 for v in found):
            continue
        setattr(sc, keyword, [_ds(found[0] * factors[0]), _ds(found[1] * factors[1])])
        if keyword == "PixelSpacing":
            _calibration(sc, received)


def _calibration(sc: Dataset, received: Dataset) -> None:
    """Pixel Spacing Calibration Type and Description (PS3.3 10.7), when the source was calibrated."""
    kind = header.text(received, "PixelSpacingCalibrationType").upper()
    if kind not in CALIBRATION_TYPES:
        return
    sc.PixelSpacingCalibrationType = kind
    found = header.values(received, "PixelSpacingCalibrationDescription")
    described = re.sub(r"[\x00-\x1f\\]", "", str(found[0])).strip() if found else ""
    # Type 1C with the type: the source's words, or what the type says
    sc.PixelSpacingCalibrationDescription = (described or f"calibrated by {kind.lower()}")[:64]


def _ds(value: float) -> str:
    """A spacing in millimetres as a Decimal String (16 characters at most), to the nanometre."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _what_it_shows(sc: Dataset, received: Dataset) -> None:
    """Body part and view as the source says them, where valid: a hanging protocol places the
    overlay beside the radiograph by them. The view also as a code (View Code Sequence,
    CID 4010: the SC Image module's own place for it, PS3.3 C.8.6.2)."""
    part = body_part(received)
    if part:
        sc.BodyPartExamined = part
    view = header.text(received, "ViewPosition").upper()
    if view in VIEW_POSITIONS:
        # not an SC attribute (a Standard Extended SOP Class): hanging protocols read it
        sc.ViewPosition = view
        if view in codes.VIEW_CODES:
            sc.ViewCodeSequence = [hd.sr.CodedConcept.from_code(codes.VIEW_CODES[view])]


#: Body parts with a left and a right among those the screen lets through (a chest is none).
PAIRED_PARTS = ("LUNG", "LUNGS")


def set_laterality(result: Dataset, source: Dataset, part: str | None = None) -> None:
    """Laterality (PS3.3 C.7.3.1, Type 2C): present for a paired body part (the lungs; a
    chest is none) or one not known (a source without a valid Body Part Examined: nothing
    says the part is unpaired, and dciodvfy asks for it then), when the result carries no
    Image Laterality; then the source's side, R or L, or empty when it is not known.
    ``part``: the body part the result carries (default: its own)."""
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    part = str(result.get("BodyPartExamined", "")) if part is None else part
    if (part in PAIRED_PARTS or not part) and not result.get("ImageLaterality"):
        result.Laterality = laterality if laterality in ("R", "L") else ""
    elif "Laterality" in result:
        del result.Laterality


def body_part(received: Dataset) -> str:
    """The source's Body Part Examined when it is a valid code string (PS3.3 C.7.3.1), else ""."""
    part = header.text(received, "BodyPartExamined").upper()
    return part if re.fullmatch(r"[A-Z0-9_ ]{1,16}", part) else ""


def _lossy(sc: Dataset, received: Dataset, written: str) -> None:
    history = lossy_history(received, written)
    if history is None:
        return
    flag, ratios, methods = history
    sc.LossyImageCompression = flag
    if ratios:
        sc.LossyImageCompressionRatio = [_ds(ratio) for ratio in ratios]
    if methods:
        sc.LossyImageCompressionMethod = methods


def lossy_history(received: Dataset, written: str) -> tuple[str, list[float], list[str]] | None:
    """Lossy Image Compression, its ratios and methods for an image made from ``received`` and
    written in the transfer syntax ``written`` (PS3.3 C.7.6.1.1.5): "01" once any step was
    lossy, and never reset. None when nothing is known either way.

    The steps: what the source's header records, then the source's own transfer syntax where it
    is lossy whatever the header says (JPEG baseline forwarded by a gateway that did not say
    so), then the node's own encoding. Ratios are kept only while each method has its ratio.
    """
    flag = header.text(received, "LossyImageCompression")
    ratios = header.numbers(received, "LossyImageCompressionRatio") or []
    methods = [
        m for m in header.texts(received, "LossyImageCompressionMethod") if m in LOSSY_METHODS
    ]
    if flag != "01":
        ratios, methods = [], []
    meta = getattr(received, "file_meta", None)
    received_syntax = header.text(meta, "TransferSyntaxUID") if isinstance(meta, Dataset) else ""
    for syntax in (received_syntax, written):
        method = LOSSY_SYNTAXES.get(syntax)
        if method is not None and (syntax == written or method not in methods):
            flag, methods = "01", [*methods, method]
    if flag not in ("00", "01"):
        return None
    return flag, ratios if len(ratios) == len(methods) else [], methods


class OverlayWriter:
    """The ``sc`` output: the Secondary Capture with the result burned in."""

    media_type = DICOM
    kind, label, role, fail_reason = "sc", "SC", ROLE, FailReason.OVERLAY

    def build(self, context: ResultContext) -> Result:
        chest = context.prepared.source
        overlay = build_overlay(
            context.source,
            context.received,
            chest.pixels,
            context.prepared.on_source(context.prediction),
            context.model,
            context.identity,
            context.config.overlay_max_side,
            context.config.overlay_modality,
            context.config.overlay_transfer_syntax,
        )
        return Result.of_dataset(overlay, self.kind, self.label)
