"""What the overlay (SC) and the presentation state (GSPS) mean to a PACS and to a radiologist.

Each test reads an output the way a peer does: dcmtk renders the source with and without the
presentation state, dicom3tools checks patient and study consistency across the files, and the
attributes a viewer or a hanging protocol reads are read back from the written file.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from helpers import data_file, run_tool
from node_support import chest_dataset, identity_of
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless

from pacs_node import codes
from pacs_node.intake.sanitize import clean_source
from pacs_node.model.predictor import NodePredictor, Prediction, prepare
from pacs_node.results.base import Result
from pacs_node.results.overlay import build_overlay
from pacs_node.results.presentation import build_presentation_state
from pacs_node.results.report import build_report

CLASSES = ("normal", "lobar", "bronchopneumonia", "interstitial", "cavitary")
LATIN_1_NAME = "Müller^Jürgen"
MAX_SIDE = 2048


def lobar(*boxes: tuple[float, float, float, float]) -> Prediction:
    """A confident lobar pneumonia with ``boxes`` as its regions."""
    found = np.asarray(boxes or [(300, 400, 900, 1200)], np.float32).reshape(-1, 4)
    return Prediction(
        classes=CLASSES,
        probabilities=np.array([0.1, 0.6, 0.1, 0.1, 0.1]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=found,
        box_scores=(0.83,) * len(found),
    )


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def errors_of(check) -> list[str]:
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


def presentation(received: Dataset, predictor: NodePredictor, prediction: Prediction) -> Dataset:
    clean = clean_source(received).dataset
    identity = identity_of(clean, predictor.contract)
    return build_presentation_state(clean, received, prediction, predictor.contract, identity)


def overlay(
    received: Dataset, predictor: NodePredictor, prediction: Prediction, max_side: int = MAX_SIDE
) -> Dataset:
    clean = clean_source(received).dataset
    contract = predictor.contract
    prepared = prepare(received, contract.image_size, max_side=max_side)
    return build_overlay(
        clean,
        received,
        prepared.source.pixels,
        prepared.on_source(prediction),
        contract,
        identity_of(clean, contract),
        max_side,
    )


# --- 6: the presentation state shows the image as the image shows itself ----------------------------


def with_voi_lut(rg1: Dataset) -> Dataset:
    """RG1 with a vendor VOI LUT (a 12-bit square-root curve over its 15 bits) beside its window:
    a viewer shows the LUT (dcmtk, pydicom and the node prefer it), not the window."""
    ds = rg1.copy()
    entries = 2**15
    curve = np.round(4095 * np.sqrt(np.arange(entries) / (entries - 1))).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 12]
    item.LUTExplanation = "VENDOR CURVE"
    item.add_new(0x00283006, "OW", curve.tobytes())  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    return ds


def with_modality_lut(rg1: Dataset) -> Dataset:
    """RG1 with a non-linear Modality LUT Sequence (stored values to a logarithmic 16-bit scale)
    and a window on its output, as some CR readers write them."""
    ds = rg1.copy()
    entries = 2**15
    curve = np.round(65535 * np.log1p(np.arange(entries)) / np.log1p(entries - 1)).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "OW", curve.tobytes())
    ds.ModalityLUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 52000, 16000
    return ds


def with_rescale_and_sigmoid(rg1: Dataset) -> Dataset:
    ds = rg1.copy()
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -1000, "US"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 29000, 30000, "SIGMOID"
    return ds


def rendered(tmp_path: Path, image: Path, name: str, state: Path | None = None) -> np.ndarray:
    """The image as dcmtk displays it: alone (its own VOI, as a viewer applies it by default)
    or through a presentation state."""
    out = tmp_path / f"{name}.pgm"
    options = ["-p", state] if state else []
    run_tool("dcmp2pgm", *options, image, out, cwd=tmp_path)
    return np.asarray(Image.open(out)).astype(int)


def drawn(state: Dataset, rows: int, columns: int) -> np.ndarray:
    mask = np.zeros((rows, columns), bool)
    margin = 2 + max(rows, columns) // 400
    (annotation,) = state.GraphicAnnotationSequence
    for graphic in annotation.get("GraphicObjectSequence", []):
        points = np.asarray(graphic.GraphicData, float).reshape(-1, 2)
        for (xa, ya), (xb, yb) in zip(points[:-1], points[1:]):
            x0, x1 = sorted((xa, xb))
            y0, y1 = sorted((ya, yb))
            mask[
                max(0, int(y0) - margin) : int(y1) + margin,
                max(0, int(x0) - margin) : int(x1) + margin,
            ] = True
    for text in annotation.get("TextObjectSequence", []):
        if "BoundingBoxTopLeftHandCorner" in text:
            (x0, y0), (x1, y1) = (
                text.BoundingBoxTopLeftHandCorner,
                text.BoundingBoxBottomRightHandCorner,
            )
            mask[max(0, int(y0)) : int(y1) + 1, max(0, int(x0)) : int(x1) + 1] = True
    return mask


@pytest.mark.tools
@pytest.mark.parametrize("variant", [with_voi_lut, with_modality_lut, with_rescale_and_sigmoid])
def test_applying_the_presentation_state_leaves_the_radiographs_grey_levels_as_they_were(
    tmp_path: Path, rg1_path: Path, predictor: NodePredictor, variant
) -> None:
    """PS3.3 C.11.8 and C.11.1: a GSPS replaces the image's own grayscale pipeline, and many
    PACS apply the newest GSPS by themselves; it must restate the source's Modality LUT and VOI
    (LUT Sequence, else window and function) so that the film looks as it did without it."""
    source = save(variant(dcmread(rg1_path)), tmp_path / "source.dcm")
    received = dcmread(source)
    state = presentation(received, predictor, lobar())
    state_path = save(state, tmp_path / "pr.dcm")
    check = run_tool("dciodvfy", state_path, check=False)
    assert errors_of(check) == [], check.stdout + check.stderr
    alone = rendered(tmp_path, source, "alone")
    through = rendered(tmp_path, source, "through", state_path)
    outside = ~drawn(state, received.Rows, received.Columns)
    assert outside.mean() > 0.8  # what is compared is most of the film
    assert alone.shape == through.shape and alone.std() > 10  # a real image, not a blank
    differing = np.abs(alone - through)[outside]
    assert differing.max() == 0, (
        f"{(differing > 0).mean():.0%} of pixels differ, by up to {differing.max()}"
    )


def test_a_malformed_voi_lut_costs_the_lut_not_the_presentation_state(
    rg1_path: Path, predictor: NodePredictor
) -> None:
    """Tolerant reading: a LUT whose data is shorter than its descriptor says is left out, and
    the window restated, as the node's own reading of the pixels does."""
    received = with_voi_lut(dcmread(rg1_path))
    received.VOILUTSequence[0].LUTData = received.VOILUTSequence[0].LUTData[:20]
    (voi,) = presentation(received, predictor, lobar()).SoftcopyVOILUTSequence
    assert "VOILUTSequence" not in voi
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (15000, 30000)


def test_the_windows_explanation_is_restated_as_one_value_beside_its_one_window(
    rg1_path: Path, predictor: NodePredictor
) -> None:
    received = dcmread(rg1_path)
    received.WindowCenter, received.WindowWidth = 15000, 30000
    received.WindowCenterWidthExplanation = "center=109.932/width=233.467"
    (voi,) = presentation(received, predictor, lobar()).SoftcopyVOILUTSequence
    assert voi["WindowCenterWidthExplanation"].VM == voi["WindowCenter"].VM == 1
    assert voi.WindowCenterWidthExplanation == "center=109.932/width=233.467"


# --- 7: lossy history ---------------------------------------------------------------------------------


def jpeg_baseline_chest() -> Dataset:
    """A CR chest as a legacy gateway forwards it: JPEG baseline, no Lossy Image Compression."""
    ds = chest_dataset()
    pixels = (np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns) >> 4).astype(
        np.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=80)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def test_an_overlay_of_a_lossy_source_says_it_was_lossy_compressed_and_how(
    predictor: NodePredictor,
) -> None:
    """PS3.3 C.7.6.1.1.5: once lossy, always "01", with every step's ratio and method."""
    received = dcmread(data_file("RG1_UNCI.dcm"))  # JPEG 2000 10:1, decompressed
    sc = overlay(received, predictor, lobar(), max_side=1024)
    assert sc.LossyImageCompression == "01"
    assert [float(v) for v in np.atleast_1d(sc.LossyImageCompressionRatio)] == [10.0]
    assert list(np.atleast_1d(sc.LossyImageCompressionMethod)) == ["ISO_15444_1"]


def test_an_overlay_of_a_jpeg_baseline_source_is_marked_lossy_though_the_header_did_not_say(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    received = dcmread(save(jpeg_baseline_chest(), tmp_path / "jpeg.dcm"))
    assert "LossyImageCompression" not in received
    sc = overlay(received, predictor, lobar((40, 60, 120, 200)))
    assert sc.LossyImageCompression == "01"
    assert list(np.atleast_1d(sc.LossyImageCompressionMethod)) == ["ISO_10918_1"]


def test_an_overlay_of_a_lossless_source_claims_no_lossy_history(
    predictor: NodePredictor, rg1_path: Path
) -> None:
    sc = overlay(dcmread(rg1_path), predictor, lobar(), max_side=1024)
    assert sc.get("LossyImageCompression") in (None, "00")
    # the node's own encoding is lossless (uncompressed by default); were it not, the SC would
    # have to say so
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_a_lossy_step_of_the_nodes_own_is_added_to_the_history() -> None:
    from pacs_node.results.overlay import lossy_history

    received = Dataset()
    received.LossyImageCompression = "01"
    received.LossyImageCompressionRatio = [10]
    received.LossyImageCompressionMethod = ["ISO_15444_1"]
    assert lossy_history(received, JPEGLSLossless) == ("01", [10.0], ["ISO_15444_1"])
    assert lossy_history(received, JPEGBaseline8Bit)[0::2] == (
        "01",
        ["ISO_15444_1", "ISO_10918_1"],
    )
    assert lossy_history(Dataset(), JPEGLSLossless) is None


# --- 8: the patient and study as the source has them -----------------------------------------------


def latin_1_chest() -> Dataset:
    ds = chest_dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = LATIN_1_NAME
    ds.ReferringPhysicianName = "Grünewald^Käthe"
    ds.StudyDescription = "Thorax p.a. (Übersicht)"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Pseudonymisiert - Basisprofil"
    return ds


@pytest.mark.tools
def test_overlay_and_presentation_state_carry_the_patient_as_the_source_names_them(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    """dcentvfy compares the patient and study attributes of files that share a study; a PACS
    that finds them different quarantines the results. Values the source's own character set
    can hold stay in it (PS3.3 C.12.1.1.2); de-identification is carried over (C.7.1.1)."""
    source = save(latin_1_chest(), tmp_path / "source.dcm")
    received = dcmread(source)
    prediction = lobar((40, 60, 120, 200))
    sc = save(overlay(received, predictor, prediction), tmp_path / "sc.dcm")
    pr = save(presentation(received, predictor, prediction), tmp_path / "pr.dcm")
    for path in (sc, pr):
        check = run_tool("dciodvfy", path, check=False)
        assert errors_of(check) == [], check.stdout + check.stderr
        written = dcmread(path)
        assert written.SpecificCharacterSet == "ISO_IR 100"
        assert str(written.PatientName) == LATIN_1_NAME
        assert written.PatientIdentityRemoved == "YES"
        assert written.DeidentificationMethod == received.DeidentificationMethod
    clean = clean_source(received).dataset
    report = build_report(
        clean, prediction, predictor.contract, identity_of(clean, predictor.contract)
    )
    sr = tmp_path / "sr.dcm"
    sr.write_bytes(Result.of_dataset(report, "sr", "SR").data)  # as the node writes it
    consistent = run_tool("dcentvfy", source, sc, pr, sr, check=False)
    assert errors_of(consistent) == [], consistent.stdout + consistent.stderr


def test_an_output_whose_text_the_sources_character_set_cannot_hold_is_written_in_utf8(
    predictor: NodePredictor,
) -> None:
    """Strict when writing: a value is never written in a set that cannot hold it (pydicom
    would put '?' in its place, or raise). A bundle's class label is the model's text, in any
    script; the patient's Latin-1 name then travels in UTF-8, unchanged."""
    received = latin_1_chest()
    prediction = Prediction(
        classes=("normal", "λ-pneumonia"),
        probabilities=np.array([0.2, 0.8]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=np.array([[40, 60, 120, 200]], np.float32),
    )
    for output in (
        overlay(received, predictor, prediction),
        presentation(received, predictor, prediction),
    ):
        back = dcmread(io.BytesIO(Result.of_dataset(output, "x", "X").data))
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == LATIN_1_NAME
        assert "λ-pneumonia" in str(back.get("ImageComments", "")) + "".join(
            str(text.UnformattedTextValue)
            for annotation in back.get("GraphicAnnotationSequence", [])
            for text in annotation.TextObjectSequence
        )


# --- 9: the overlay's pixel spacing means what the source's did -------------------------------------


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"ImagerPixelSpacing": [0.15, 0.15]}, {"ImagerPixelSpacing": 0.3}),
        (
            {
                "ImagerPixelSpacing": [0.15, 0.15],
                "PixelSpacing": [0.125, 0.125],
                "PixelSpacingCalibrationType": "GEOMETRY",
                "PixelSpacingCalibrationDescription": "magnification 1.2 removed",
            },
            {"ImagerPixelSpacing": 0.3, "PixelSpacing": 0.25},
        ),
        ({"PixelSpacing": [0.15, 0.15]}, {"PixelSpacing": 0.3}),
        ({}, {}),
    ],
)
def test_the_overlays_spacing_keeps_the_sources_meaning_scaled_by_the_resampling(
    predictor: NodePredictor, attributes: dict, expected: dict
) -> None:
    """PS3.3 10.7.1.3: Imager Pixel Spacing is at the detector, not in the patient; a Pixel
    Spacing is calibrated only where Pixel Spacing Calibration Type says so. The overlay halves
    the 320 x 288 image here (max side 160)."""
    received = chest_dataset(**attributes)
    sc = overlay(received, predictor, lobar((40, 60, 120, 200)), max_side=160)
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        if keyword in expected:
            assert [float(v) for v in sc[keyword].value] == pytest.approx([expected[keyword]] * 2)
        else:
            assert keyword not in sc, keyword
    calibrated = "PixelSpacingCalibrationType" in attributes
    assert ("PixelSpacingCalibrationType" in sc) == calibrated
    if calibrated:
        assert sc.PixelSpacingCalibrationType == "GEOMETRY"
        assert sc.PixelSpacingCalibrationDescription == "magnification 1.2 removed"


# --- 11: body part, view and modality -----------------------------------------------------------------


@pytest.mark.tools
def test_the_overlay_says_which_body_part_and_view_it_shows(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    """A hanging protocol finds the overlay beside the radiograph by body part and view; the SC
    IOD's own place for the view is View Code Sequence (PS3.3 C.8.6.2, CID 4010)."""
    received = chest_dataset(ImageLaterality="U", ImagerPixelSpacing=[0.15, 0.15])
    sc = overlay(received, predictor, lobar((40, 60, 120, 200)))
    path = save(sc, tmp_path / "sc.dcm")
    check = run_tool("dciodvfy", path, check=False)
    assert errors_of(check) == [], check.stdout + check.stderr
    back = dcmread(path)
    assert (back.BodyPartExamined, back.ViewPosition, back.ImageLaterality) == ("CHEST", "PA", "U")
    (view,) = back.ViewCodeSequence
    assert (view.CodeValue, view.CodingSchemeDesignator) == (
        codes.VIEW_CODES["PA"].value,
        "SCT",
    )
    # PS3.3 C.8.6.1: an SC's Modality names the equipment of the image it was made from, and a
    # derived image made by software is a workstation's conversion
    assert back.Modality == "CR" and back.ConversionType == "WSD"
    state = presentation(received, predictor, lobar((40, 60, 120, 200)))
    assert state.BodyPartExamined == "CHEST"


def test_an_overlay_of_a_source_without_body_part_or_view_invents_none(
    predictor: NodePredictor,
) -> None:
    received = chest_dataset()
    del received.BodyPartExamined, received.ViewPosition
    sc = overlay(received, predictor, lobar((40, 60, 120, 200)))
    assert not {"BodyPartExamined", "ViewPosition", "ViewCodeSequence"} & set(sc.dir())


@pytest.mark.tools
@pytest.mark.parametrize(
    ("part", "side", "state_side"),
    [("LUNG", "", ""), ("LUNG", "R", "R"), ("CHEST", None, None), ("", None, "")],
)
def test_laterality_is_there_for_the_lungs_and_an_unknown_part_and_absent_for_a_chest(
    tmp_path: Path,
    predictor: NodePredictor,
    part: str,
    side: str | None,
    state_side: str | None,
) -> None:
    """Laterality is Type 2C, required of a paired body part (PS3.3 C.7.3.1): the lungs are
    one, a chest is not, and a part not known may be one. The header fuzzer found an SC of a
    LUNG source without it, and one of a source without a valid Body Part Examined."""
    received = chest_dataset(BodyPartExamined=part)
    if side:
        received.ImageLaterality = side
    sc = overlay(received, predictor, lobar((40, 60, 120, 200)))
    state = presentation(received, predictor, lobar((40, 60, 120, 200)))
    # the SC carries Image Laterality where the source has it, which then says the side
    assert sc.get("Laterality") == (None if side else state_side)
    assert state.get("Laterality") == state_side
    for result, name in ((sc, "sc.dcm"), (state, "pr.dcm")):
        check = run_tool("dciodvfy", save(result, tmp_path / name), check=False)
        assert errors_of(check) == [], check.stdout + check.stderr


# --- 11: where the presentation state's text goes -----------------------------------------------------


def text_boxes(state: Dataset) -> list[tuple[float, float, float, float]]:
    (annotation,) = state.GraphicAnnotationSequence
    boxes = []
    for text in annotation.TextObjectSequence:
        assert text.BoundingBoxAnnotationUnits == "PIXEL", text
        (x0, y0), (x1, y1) = (
            text.BoundingBoxTopLeftHandCorner,
            text.BoundingBoxBottomRightHandCorner,
        )
        boxes.append((float(x0), float(y0), float(x1), float(y1)))
    return boxes


def overlapping(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize(
    ("shape", "regions"),
    [
        ((1955, 1841), [(1700, 5, 1840, 150), (1600, 50, 1800, 300), (0, 0, 400, 400)]),
        ((1955, 1841), [(300, 400, 900, 1200), (320, 420, 880, 1150)]),
        ((256, 256), [(200, 0, 256, 40), (10, 200, 60, 256)]),
    ],
)
def test_the_presentation_states_text_stays_inside_the_image_and_clear_of_the_headline(
    predictor: NodePredictor, shape: tuple[int, int], regions: list
) -> None:
    """Each label in a bounding box in PIXEL units (PS3.3 C.10.5), inside the image, overlapping
    neither the headline nor another label, and over its own region's columns."""
    rows, columns = shape
    received = chest_dataset(rows, columns)
    state = presentation(received, predictor, lobar(*regions))
    headline, *labels = text_boxes(state)
    assert len(labels) == len(regions)
    for box in (headline, *labels):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows, box
    for i, label in enumerate(labels):
        assert not overlapping(label, headline), (label, headline)
        assert not any(overlapping(label, other) for other in labels[i + 1 :])
        region = regions[i]
        assert label[0] < region[2] and region[0] < label[2], (label, region)


# --- 10: one region, one tracking UID in the SR and the GSPS -----------------------------------------


def test_a_region_has_the_same_tracking_uid_in_the_report_and_the_presentation_state(
    predictor: NodePredictor, rg1_path: Path
) -> None:
    received = dcmread(rg1_path)
    prediction = lobar((300, 400, 900, 1200), (1000, 400, 1500, 900))
    clean = clean_source(received).dataset
    identity = identity_of(clean, predictor.contract)
    state = presentation(received, predictor, prediction)
    report = build_report(clean, prediction, predictor.contract, identity)
    (annotation,) = state.GraphicAnnotationSequence
    whole_image = identity.tracking_uid("pneumonia")
    in_state = [graphic.TrackingUID for graphic in annotation.GraphicObjectSequence]
    in_report = [
        item.UID
        for item in _walk(report.ContentSequence)
        if item.get("ValueType") == "UIDREF"
        and item.ConceptNameCodeSequence[0].CodeValue == "112040"  # Tracking Unique Identifier
        and whole_image != item.UID
    ]
    assert in_state == [identity.tracking_uid(f"region-{i}") for i in range(2)] == in_report


# --- helpers --------------------------------------------------------------------------------------------


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


# --- 9: the verdict says what the model decided, and the overlay what was drawn ----------------------


def types_below_the_threshold(**change) -> Prediction:
    """A single-label pneumonia at 70 % (threshold 60 %) whose most probable type, cavitary, is
    at 25 %: every type below the threshold, as on the demo bundle's first sample."""
    found = Prediction(
        classes=CLASSES,
        probabilities=np.array([0.3, 0.2, 0.1, 0.15, 0.25]),
        normal_class="normal",
        operating_point=0.6,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=np.asarray([(300, 400, 900, 1200)], np.float32),
        box_scores=(0.83,),
    )
    return dataclasses.replace(found, **change)


def test_the_verdict_names_the_most_probable_type_as_most_likely_not_as_a_finding(
    predictor: NodePredictor,
) -> None:
    """A softmax model decides pneumonia at its operating point and names the most probable
    type; it decides no type. The overlay's and the presentation state's text say so."""
    received = chest_dataset()
    prediction = types_below_the_threshold()
    assert prediction.positive and prediction.label == "cavitary"
    said = str(overlay(received, predictor, prediction).ImageComments)
    assert "most likely cavitary (25%)" in said, said
    assert said.startswith("Pneumonia") and "threshold 60%" in said, said
    assert "Finding" not in said and "Lobar" not in said and "Interstitial" not in said, said
    state = presentation(received, predictor, prediction)
    texts = [
        str(text.UnformattedTextValue)
        for annotation in state.GraphicAnnotationSequence
        for text in annotation.get("TextObjectSequence", [])
    ]
    assert any(said in text for text in texts), texts


@pytest.mark.parametrize("case", ["negative", "not assessed"])
def test_an_overlay_with_only_its_banner_drawn_claims_no_heat_map_or_regions(
    predictor: NodePredictor, case: str
) -> None:
    """PS3.3 C.8.6.2 / C.7.6.1.1.4: the Derivation Description says how the image was derived;
    for a negative or an image not assessed that is the band of text and nothing over the film."""
    change: dict = {"probabilities": np.array([0.8, 0.05, 0.05, 0.05, 0.05])}
    change["boxes"] = np.zeros((0, 4), np.float32)
    if case == "not assessed":
        change |= {"ood_score": 50.0, "ood_threshold": 7.5}
    sc = overlay(chest_dataset(), predictor, types_below_the_threshold(**change))
    described = str(sc.DerivationDescription).lower()
    assert "heat map" not in described and "region" not in described, described
    assert "result line" in described or "verdict" in described, described
    drawn = str(
        overlay(chest_dataset(), predictor, types_below_the_threshold()).DerivationDescription
    )
    assert "heat map" in drawn and "region" in drawn, drawn
