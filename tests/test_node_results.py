"""The node's pure parts: screening, prediction, the Structured Report and the overlay."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from helpers import run_tool
from node_support import chest_dataset, identity_of
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from dp_model.serving.contract import ModelContract
from pacs_node import codes
from pacs_node.intake.screen import SkipReason, screen
from pacs_node.model.predictor import NodePredictor, Prediction, prepare, regions
from pacs_node.results.base import Result
from pacs_node.results.identity import MANUFACTURER
from pacs_node.results.overlay import BANNER, BOX_COLOUR, build_overlay, render, verdict
from pacs_node.results.report import build_report

CLASSES = ("normal", "lobar", "bronchopneumonia", "interstitial", "cavitary")


@pytest.fixture(scope="module")
def rg1(rg1_path: Path) -> Dataset:
    return dcmread(rg1_path)


def positive(
    heatmap: np.ndarray | None = None, boxes=((300, 400, 900, 1200),), scores=(0.83,)
) -> Prediction:
    """A confident lobar pneumonia with one region, independent of the demo model's weights."""
    heat = np.zeros((7, 7), np.float32) if heatmap is None else heatmap
    return Prediction(
        classes=CLASSES,
        probabilities=np.array([0.1, 0.6, 0.1, 0.1, 0.1]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=heat,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_scores=scores[: len(boxes)],
    )


def negative() -> Prediction:
    return Prediction(
        classes=CLASSES,
        probabilities=np.array([0.8, 0.05, 0.05, 0.05, 0.05]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=np.zeros((0, 4), np.float32),
    )


# --- screening -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({}, None),
        ({"BodyPartExamined": ""}, None),
        ({"ViewPosition": "AP"}, None),
        ({"BodyPartExamined": "EXTREMITY"}, SkipReason.BODY_PART),
        ({"ViewPosition": "LL"}, SkipReason.VIEW),
        ({"Modality": "MG"}, SkipReason.MODALITY),
        ({"ImageType": ["DERIVED", "SECONDARY"]}, SkipReason.IMAGE_TYPE),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, SkipReason.IMAGE_TYPE),
        ({"Rows": 2000, "Columns": 400}, SkipReason.GEOMETRY),
        ({"Rows": 100, "Columns": 100}, SkipReason.GEOMETRY),
    ],
)
def test_screen_passes_frontal_chest_and_names_the_reason_otherwise(
    attributes: dict, reason: SkipReason | None
) -> None:
    ds = chest_dataset()
    for key, value in attributes.items():
        setattr(ds, key, value)
    found = screen(ds)
    assert (found[0] if found else None) == reason
    if found:
        assert "\n" not in found[1]


def test_real_extremity_is_screened_out_and_real_chest_is_not(rg1: Dataset) -> None:
    from helpers import data_file

    assert screen(rg1) is None
    assert (
        screen(dcmread(data_file("RG3_UNCR.dcm"), stop_before_pixels=True))[0]
        == SkipReason.BODY_PART
    )


# --- prediction --------------------------------------------------------------------------------------


def test_decision_follows_the_operating_point() -> None:
    probabilities = np.array([0.55, 0.05, 0.3, 0.05, 0.05])
    at = {
        op: Prediction(
            classes=CLASSES,
            probabilities=probabilities,
            normal_class="normal",
            operating_point=op,
            heatmap=np.zeros((2, 2)),
            boxes=np.zeros((0, 4)),
        )
        for op in (0.4, 0.5)
    }
    assert (
        at[0.4].positive
        and at[0.4].label == "bronchopneumonia"
        and at[0.4].label_probability == pytest.approx(0.3)
    )
    assert not at[0.5].positive and at[0.5].label == "normal"
    assert at[0.5].pneumonia_probability == pytest.approx(0.45)


FINDINGS = CLASSES[1:]


def multi_label(
    probabilities=(0.8, 0.2, 0.6, 0.1),
    boxes=((300, 400, 900, 1200), (1000, 300, 1500, 900)),
    box_labels=("lobar", "interstitial"),
) -> Prediction:
    """A multi-label model's answer: lobar and interstitial present, each with a region."""
    heat, boxes = np.zeros((7, 7), np.float32), np.asarray(boxes, np.float32).reshape(-1, 4)
    return Prediction(
        classes=FINDINGS,
        probabilities=np.array(probabilities),
        normal_class="normal",
        operating_point=0.5,
        heatmap=heat,
        boxes=boxes,
        multi_label=True,
        box_labels=box_labels,
        box_scores=(0.71, 0.64)[: len(boxes)],
    )


def test_multi_label_findings_are_decided_one_by_one() -> None:
    prediction = multi_label()
    assert (
        prediction.positive
        and prediction.pneumonia_probability == pytest.approx(0.8)
        and prediction.label == "lobar"
    )
    assert [prediction.present(c) for c in FINDINGS] == [True, False, True, False]
    assert prediction.findings == [
        ("lobar", pytest.approx(0.8)),
        ("interstitial", pytest.approx(0.6)),
    ]
    assert prediction.probability("normal") == pytest.approx(0.2)
    quiet = multi_label((0.3, 0.4, 0.1, 0.2), boxes=(), box_labels=())
    assert not quiet.positive and quiet.label == "normal" and quiet.findings == []


@pytest.mark.tools
def test_multi_label_report_has_a_decision_per_finding_and_labelled_regions(
    tmp_path: Path, predictor: NodePredictor, rg1: Dataset
) -> None:
    contract = ModelContract(**{**predictor.contract.__dict__, "architecture": "cia_net"})
    assert contract.multi_label and contract.output_classes == FINDINGS
    path = written(
        tmp_path,
        build_report(rg1, multi_label(), contract, identity_of(rg1, contract)),
        "sr.dcm",
    )
    check = run_tool("dciodvfy", path, check=False)
    assert errors_of(check.stdout + check.stderr) == [], check.stdout + check.stderr
    dump = run_tool("dsrdump", path).stdout
    present = [line for line in dump.splitlines() if '(52101004,SCT,"Present")' in line]
    absent = [line for line in dump.splitlines() if '(272519000,SCT,"Absent")' in line]
    # Image level: pneumonia, lobar and interstitial present; bronchopneumonia and cavitary absent.
    # Regions: one lobar, one interstitial, each with its own finding.
    assert (
        sum("Lobar pneumonia" in line for line in present) == 2
        and sum("nterstitial" in line for line in present) == 2
    )
    # the whole image (what the image-level numbers were inferred from), and the two regions
    assert len(absent) == 2 and dump.count("POLYLINE") == 3
    # Each region carries its own score, named after its finding; each finding its probability,
    # and the image-level group the threshold each was decided at (a multi-label model decides
    # each at the operating point).
    assert (
        'NUM:(,,"Lobar pneumonia region score")="0.71"' in dump
        and 'NUM:(,,"Interstitial pneumonia region score")="0.64"' in dump
    )
    assert (
        'NUM:(,,"Probability of lobar pneumonia")="80.0"' in dump
        and 'NUM:(,,"Probability of interstitial pneumonia")="60.0"' in dump
    )
    assert dump.count('NUM:(,,"Threshold Value")="50.0"') == 1


def test_multi_label_overlay_names_every_finding_and_labels_its_boxes() -> None:
    rgb, _ = render(
        np.full((1600, 1600), 0.5, np.float32), multi_label(), demo=False, max_side=2048
    )
    # Each box carries its finding's name, drawn inside its top-left corner in the box colour.
    band = rgb.shape[0] - 1600
    for x0, y0 in ((300, 400), (1000, 300)):
        label_area = rgb[band + y0 + 5 : band + y0 + 30, x0 + 5 : x0 + 120].reshape(-1, 3)
        assert (label_area == BOX_COLOUR).all(axis=1).sum() > 20
    assert verdict(multi_label()) == "Findings: Lobar pneumonia 80%, Interstitial pneumonia 60%"
    assert verdict(multi_label((0.3, 0.4, 0.1, 0.2), boxes=(), box_labels=())).startswith(
        "No pneumonia at the operating point - pneumonia probability 40%"
    )


def test_regions_are_the_largest_blobs_in_map_pixels() -> None:
    heat = np.zeros((40, 50), np.float32)
    heat[5:15, 10:30] = 0.9  # 200 pixels
    heat[20:26, 40:44] = 0.7  # 24 pixels
    heat[35, 2] = 0.9  # 1 pixel: below the minimum region size
    heat[8, 12] = 0.95
    boxes, peaks = regions(heat)
    assert boxes.tolist() == [[10, 5, 30, 15], [40, 20, 44, 26]]
    assert peaks.tolist() == pytest.approx([0.95, 0.7])  # each region's own peak
    assert regions(np.full((8, 8), 0.3, np.float32))[0].shape == (0, 4)


def test_real_radiograph_gets_probabilities_and_a_heatmap_over_the_whole_image(
    predictor: NodePredictor, rg1: Dataset
) -> None:
    prepared = prepare(rg1, predictor.contract.image_size)
    (prediction,) = predictor.predict([prepared])
    assert prediction.probabilities.shape == (len(predictor.contract.classes),)
    assert prediction.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert prediction.heatmap.min() >= 0 and prediction.heatmap.max() <= 1
    # The canvas is letterboxed; the map keeps only the image's part, so its aspect is the source's.
    rows, columns = prediction.heatmap.shape
    assert abs(rows / columns - rg1.Rows / rg1.Columns) < 0.2
    assert (
        ((prediction.boxes[:, 2:] <= [rg1.Columns, rg1.Rows]).all())
        if len(prediction.boxes)
        else True
    )


def test_a_batch_gives_the_same_answers_as_one_by_one(
    predictor: NodePredictor, rg1: Dataset
) -> None:
    images = [chest_dataset(seed=s) for s in range(3)] + [rg1]
    prepared = [prepare(ds, predictor.contract.image_size) for ds in images]
    batched = predictor.predict(prepared)
    for item, expected in zip(prepared, batched):
        (single,) = predictor.predict([item])
        np.testing.assert_allclose(single.probabilities, expected.probabilities, atol=1e-5)
        np.testing.assert_allclose(single.heatmap, expected.heatmap, atol=1e-5)


# --- the Structured Report ---------------------------------------------------------------------------


def written(tmp_path: Path, ds: Dataset, name: str) -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def errors_of(tool_output: str) -> list[str]:
    return [line for line in tool_output.splitlines() if line.startswith("Error")]


@pytest.mark.tools
def test_report_passes_dciodvfy_and_dsrdump_shows_finding_and_score(
    tmp_path: Path, predictor: NodePredictor, rg1: Dataset
) -> None:
    contract = predictor.contract
    sr = build_report(rg1, positive(), contract, identity_of(rg1, contract))
    path = written(tmp_path, sr, "sr.dcm")
    check = run_tool("dciodvfy", path, check=False)
    assert errors_of(check.stdout + check.stderr) == [], check.stdout + check.stderr
    dump = run_tool("dsrdump", path).stdout
    assert 'CODE:(,,"Pneumonia")=(52101004,SCT,"Present")' in dump
    assert 'NUM:(,,"Probability of pneumonia")="90.0" (%,UCUM,"Percent")' in dump
    # a softmax model's type is chosen, not decided: named as the most probable, never Present
    assert 'CODE:(,,"Most probable pneumonia type")=(278516003,SCT,"Lobar pneumonia")' in dump
    assert 'CODE:(,,"Lobar pneumonia")=(52101004,SCT,"Present")' not in dump
    # the region's finding
    assert 'contains CODE:(,,"Finding")=(278516003,SCT,"Lobar pneumonia")' in dump
    assert "SCOORD" in dump and "POLYLINE" in dump
    assert (
        "Preliminary Flag    : PRELIMINARY" in dump
        and "Verification Flag   : UNVERIFIED" in dump
        and "Completion Flag     : COMPLETE" in dump
    )


def test_report_round_trip_carries_study_model_identity_and_a_negative_result(
    tmp_path: Path, predictor: NodePredictor, rg1: Dataset
) -> None:
    contract = predictor.contract
    sr = dcmread(
        written(
            tmp_path,
            build_report(rg1, negative(), contract, identity_of(rg1, contract)),
            "sr.dcm",
        )
    )
    assert sr.StudyInstanceUID == rg1.StudyInstanceUID and sr.PatientID == rg1.PatientID
    assert (
        sr.SeriesInstanceUID != rg1.SeriesInstanceUID
        and "not for primary diagnosis" in sr.SeriesDescription
    )
    (ours,) = [
        item for item in sr.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER
    ]
    assert ours.DeviceUID == contract.device_uid and ours.ManufacturerModelName == contract.name
    # IHE AI Results: the algorithm that made the content
    (purpose,) = ours.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == (
        codes.PROCESSING_ALGORITHM.value,
        "99IHE",
    )
    flat = str(sr.ContentSequence)
    assert contract.device_uid in flat
    assert "111047" not in flat  # "Probability of cancer" is the wrong concept for this score
    # The negative decision is recorded explicitly, not left out.
    assert codes.ABSENT.value in flat and codes.PRESENT.value not in flat
    # no lesion region: only the whole image's outline, what the image-level numbers came from
    assert flat.count("POLYLINE") == 1


def concept(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def containers(sr: Dataset) -> dict[str, Dataset]:
    """The TID 1500 root's containers, by name."""
    return {concept(item): item for item in sr.ContentSequence if item.ValueType == "CONTAINER"}


def outlines(group: Dataset) -> list[Dataset]:
    """A group's SCOORDs: a lesion region's own (TID 1410), or the image-level group's whole
    image, which its first number was INFERRED FROM (TID 300)."""
    return [
        item
        for entry in group.ContentSequence
        for item in (entry, *entry.get("ContentSequence", []))
        if item.ValueType == "SCOORD"
    ]


def group_numbers(group: Dataset) -> dict[str, float]:
    return {
        concept(item): float(item.MeasuredValueSequence[0].NumericValue)
        for item in group.ContentSequence
        if item.ValueType == "NUM"
    }


def group_decisions(group: Dataset) -> dict[str, str]:
    """A group's qualitative evaluations (TID 1501 row 11): finding -> Present / Absent."""
    return {
        concept(item): item.ConceptCodeSequence[0].CodeMeaning
        for item in group.ContentSequence
        if item.ValueType == "CODE" and concept(item) != "Finding"
    }


def test_report_is_what_a_viewer_draws_and_a_machine_reads(
    tmp_path: Path, predictor: NodePredictor, rg1: Dataset
) -> None:
    """What OHIF needs (docs/decisions.md): every measurement group has coordinates on the source
    image, its tracking UID is the group's first UIDREF, and its numbers name the finding; the
    image-level group holds each decision beside the probabilities it was made from."""
    contract = predictor.contract
    sr = dcmread(
        written(
            tmp_path,
            build_report(rg1, positive(), contract, identity_of(rg1, contract)),
            "sr.dcm",
        )
    )
    # Comprehensive SR as written; a destination that takes Comprehensive 3D SR gets that form
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    groups = containers(sr)["Imaging Measurements"].ContentSequence
    assert len(groups) == 2  # the image-level result, then the region
    for group in groups:
        items = group.ContentSequence
        (scoord,) = outlines(group)
        assert (
            scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == rg1.SOPInstanceUID
        )
        points = np.asarray(scoord.GraphicData, float).reshape(-1, 2)
        assert np.isfinite(points).all() and (points[0] == points[-1]).all()  # closed
        assert [concept(item) for item in items if item.ValueType == "UIDREF"][
            0
        ] == "Tracking Unique Identifier"
    image, region = (group_numbers(group) for group in groups)
    # What OHIF labels the image with: the probability of pneumonia first, the threshold, then
    # the probability of each class.
    assert image == {
        "Probability of pneumonia": 90.0,
        "Threshold Value": 50.0,
        "Probability of lobar pneumonia": 60.0,
        "Probability of bronchopneumonia": 10.0,
        "Probability of interstitial pneumonia": 10.0,
        "Probability of cavitary pneumonia": 10.0,
    }
    assert np.asarray(outlines(groups[0])[0].GraphicData).reshape(-1, 2).max(axis=0).tolist() == [
        rg1.Columns,
        rg1.Rows,
    ]
    # The region's own score (the map's peak in it), not a copy of the class probability (60 %).
    # a map peak, no units: not a probability
    assert region == {"Lobar pneumonia region score": 0.83}
    assert group_decisions(groups[0]) == {
        "Pneumonia": "Present",
        "Most probable pneumonia type": "Lobar pneumonia",
    }
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert schemes == {codes.PRIVATE_SCHEME, codes.IHE_SCHEME}


def test_a_negative_report_states_each_decision_beside_its_threshold(
    tmp_path: Path, predictor: NodePredictor, rg1: Dataset
) -> None:
    contract = predictor.contract
    below = Prediction(
        classes=CLASSES,
        probabilities=np.array([0.14, 0.8, 0.02, 0.02, 0.02]),
        normal_class="normal",
        operating_point=0.9,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=np.zeros((0, 4), np.float32),
    )
    sr = dcmread(
        written(tmp_path, build_report(rg1, below, contract, identity_of(rg1, contract)), "sr.dcm")
    )
    # the image-level group only: a viewer opens on it
    (image,) = containers(sr)["Imaging Measurements"].ContentSequence
    # 86 % is below the 90 % operating point: Absent, and the report says both numbers, to a
    # viewer and to a machine.
    numbers = group_numbers(image)
    assert (numbers["Probability of pneumonia"], numbers["Threshold Value"]) == (86.0, 90.0)
    assert group_decisions(image)["Pneumonia"] == "Absent"


def test_result_uids_follow_the_source_the_weights_and_the_settings(
    predictor: NodePredictor, rg1: Dataset
) -> None:
    contract = predictor.contract
    first = build_report(rg1, positive(), contract, identity_of(rg1, contract))
    again = build_report(rg1, positive(), contract, identity_of(rg1, contract))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    retrained = ModelContract(**{**contract.__dict__, "device_uid": "2.25.1234"})
    other = build_report(rg1, positive(), retrained, identity_of(rg1, retrained))
    assert other.SOPInstanceUID != first.SOPInstanceUID
    another_image = chest_dataset()
    assert identity_of(another_image, contract).instance_uid("sr") != first.SOPInstanceUID


def test_unknown_class_labels_get_a_private_code() -> None:
    assert codes.finding_code("lobar") == codes.CLASS_CODES["lobar"]
    private = codes.finding_code("cavitary")
    assert (
        private.scheme_designator == codes.PRIVATE_SCHEME and "pneumonia" in private.meaning.lower()
    )


# --- the overlay ------------------------------------------------------------------------------------


@pytest.mark.tools
def test_overlay_passes_dciodvfy_and_is_consistent_with_its_source(
    tmp_path: Path, predictor: NodePredictor, rg1: Dataset, rg1_path: Path
) -> None:
    contract = predictor.contract
    prepared = prepare(rg1, contract.image_size)
    identity = identity_of(rg1, contract)
    sc = build_overlay(rg1, rg1, prepared.source.pixels, positive(), contract, identity, 2048)
    sr = build_report(rg1, positive(), contract, identity)
    sc_path, sr_path = written(tmp_path, sc, "sc.dcm"), written(tmp_path, sr, "sr.dcm")
    check = run_tool("dciodvfy", sc_path, check=False)
    assert errors_of(check.stdout + check.stderr) == [], check.stdout + check.stderr
    consistent = run_tool("dcentvfy", rg1_path, sr_path, sc_path, check=False)
    assert errors_of(consistent.stdout + consistent.stderr) == [], (
        consistent.stdout + consistent.stderr
    )
    back = dcmread(sc_path)
    assert back.BurnedInAnnotation == "YES" and back.StudyInstanceUID == rg1.StudyInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    assert (
        back.SOPInstanceUID == identity.instance_uid("sc")
        and back.SeriesInstanceUID != sr.SeriesInstanceUID
    )
    # uncompressed unless configured otherwise: no viewer is shown lossy pixels
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.pixel_array.shape == (back.Rows, back.Columns, 3)
    # the band above the full image
    assert (back.Columns, back.SamplesPerPixel) == (rg1.Columns, 3) and back.Rows > rg1.Rows


@pytest.mark.parametrize(
    ("received", "asked", "written"),
    [("CR", "source", "CR"), ("DX", "source", "DX"), ("", "source", "OT"), ("CR", "OT", "OT")],
)
def test_the_overlay_takes_the_radiographs_modality_unless_asked_for_ot(
    rg1: Dataset, predictor: NodePredictor, received: str, asked: str, written: str
) -> None:
    """OHIF opens a cine player on OT series; routing rules that forward every CR would need OT."""
    source = rg1.copy()
    source.Modality = received
    pixels = np.full((64, 64), 0.5, np.float32)
    sc = build_overlay(
        source,
        source,
        pixels,
        negative(),
        predictor.contract,
        identity_of(rg1, predictor.contract),
        256,
        asked,
    )
    assert sc.Modality == written and sc.ImageType == ["DERIVED", "SECONDARY"]
    assert screen(sc)[0] == SkipReason.AI_RESULT  # sent back to the node, it is never scored


def test_overlay_pixels_show_banner_box_and_heat() -> None:
    gray = np.full((600, 500), 0.5, np.float32)
    heat = np.zeros((60, 50), np.float32)
    heat[40:50, 5:15] = 1.0
    rgb, scale = render(
        gray, positive(heat, boxes=((200, 300, 400, 500),)), demo=True, max_side=2048
    )
    band = rgb.shape[0] - 600  # the banner's own band above the radiograph, which stays whole
    assert scale == 1.0 and rgb.shape[1:] == (500, 3) and 30 < band < 150
    assert (rgb[2:20, 400:].reshape(-1, 3) == 0).all()  # the black band behind the text
    assert (rgb[:band, :300] == [255, 255, 0]).all(axis=-1).any()  # the yellow warning line
    assert tuple(rgb[band + 400, 200]) == BOX_COLOUR and tuple(rgb[band + 300, 300]) == BOX_COLOUR
    assert tuple(rgb[band + 250, 250]) == (128, 128, 128)  # untouched gray away from box and heat
    assert tuple(rgb[band + 2, 250]) == (128, 128, 128)  # the radiograph's top rows are not covered
    hot = rgb[band + 450, 100].astype(int)
    assert hot[0] - hot[2] > 40  # blended heat colour where the map is 1
    cool = rgb[band + 250, 250].astype(int)
    assert abs(cool[0] - cool[2]) < 3  # no tint where the map is 0
    assert BANNER.startswith("AI result")


#: SHA-256 of the overlay's pixels for fixed results on RG1 (full size, and at most 1024 a side),
#: a positive one with its heat map and two regions and a negative one, by the demonstration
#: model: what a radiologist is
#: shown changes only on purpose. Pillow draws the text: a new Pillow may change these (it is one
#: of identity.RESULTS_LIBRARIES for that reason).
PINNED_OVERLAYS = {
    # the heat map enlarged by dense products since 2026-12-06: 2 of 11.9 million values of
    # the positive one moved by one level (float rounding at 8 bits)
    (2048, "positive"): "714e6a070b9bb049f05ccbcf8fb8b6d145062d931bcc218dadf8088c958bc2a8",
    (2048, "negative"): "8f37c6529fcff2ac01b89396ca9b955ab3fcf0c62912515ec89a70c78582131b",
    # NumPy's resampling (dp_transforms.geometry.resize) since 2026-12-06: 66 of 3.2 million
    # values of the positive one moved by one level from PyTorch's (rounding at 8 bits); the
    # radiograph's rows resampled before its columns since the second round of that day (the
    # whole image no longer transposed): 21 more moved by one level in each
    (1024, "positive"): "245688480d9a738ba3d884c01c89d55019d4ddbdf9527b2440bae9705a5ccedb",
    (1024, "negative"): "18ce7636cb67c37d8fce362678a68bbf50dcbb954377f75b4e9dffbb94887a4b",
}


@pytest.mark.parametrize(("max_side", "result"), sorted(PINNED_OVERLAYS))
def test_the_overlay_of_a_fixed_result_keeps_its_pixels_and_its_file_carries_them_exactly(
    predictor: NodePredictor, rg1: Dataset, max_side: int, result: str
) -> None:
    contract = predictor.contract
    prepared = prepare(rg1, contract.image_size, max_side=max_side)
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    heat = np.exp(-((xx - 0.3) ** 2 + (yy - 0.55) ** 2) / 0.02).astype(np.float32)
    boxes = ((300, 700, 900, 1300), (1100, 600, 1500, 1000))
    found = positive(heat, boxes=boxes, scores=(0.9, 0.7)) if result == "positive" else negative()
    shown = prepared.on_source(found)
    rgb, _ = render(prepared.source.pixels, shown, demo=contract.demo, max_side=max_side)
    assert hashlib.sha256(rgb.tobytes()).hexdigest() == PINNED_OVERLAYS[max_side, result]
    identity = identity_of(rg1, contract)
    sc = build_overlay(rg1, rg1, prepared.source.pixels, shown, contract, identity, max_side)
    back = dcmread(io.BytesIO(Result.of_dataset(sc, "sc", "SC").data))
    assert np.array_equal(back.pixel_array, rgb)  # lossless, whatever the transfer syntax


@pytest.mark.parametrize(
    ("syntax", "uid"), [("explicit", ExplicitVRLittleEndian), ("jpeg-ls", JPEGLSLossless)]
)
def test_the_overlay_is_written_in_the_configured_syntax_with_the_pixels_drawn(
    predictor: NodePredictor, rg1: Dataset, syntax: str, uid: str
) -> None:
    """Explicit VR Little Endian by default (no encoding on the node's CPU: a LAN carries the
    bytes faster than JPEG-LS encodes them), JPEG-LS lossless for a slow link; both lossless."""
    from pacs_node.config import NodeConfig

    assert NodeConfig().overlay_transfer_syntax == "explicit"
    contract = predictor.contract
    prepared = prepare(rg1, contract.image_size, max_side=512)
    shown = prepared.on_source(positive())
    identity = identity_of(rg1, contract)
    rgb, _ = render(prepared.source.pixels, shown, demo=contract.demo, max_side=512)
    sc = build_overlay(
        rg1, rg1, prepared.source.pixels, shown, contract, identity, 512, syntax=syntax
    )
    back = dcmread(io.BytesIO(Result.of_dataset(sc, "sc", "SC").data))
    assert back.file_meta.TransferSyntaxUID == uid and np.array_equal(back.pixel_array, rgb)
    assert back.get("LossyImageCompression") in (None, "00")


def test_on_a_narrow_film_every_line_of_the_band_is_wrapped_inside_it() -> None:
    """A 256-px phantom: the demo banner and the verdict are wider than the film at the smallest
    font; each is wrapped, so no text reaches the right edge and the band grows instead."""
    gray = np.full((256, 256), 0.5, np.float32)
    heat = np.zeros((16, 16), np.float32)
    rgb, _ = render(gray, positive(heat, boxes=((40, 80, 64, 112),)), demo=True, max_side=2048)
    band = rgb.shape[0] - 256
    # half the smallest font: the text starts this far from the left edge, and stops as far from the
    # right
    margin = 6
    assert not rgb[:band, -margin:].any(), "text runs off the film's right edge"
    assert band > 4 * 16, (
        "the banner, the demonstration line and the verdict need more than three lines here"
    )
    assert (rgb[:band] == [255, 255, 0]).all(axis=-1).any() and (rgb[:band] == [255, 255, 255]).all(
        axis=-1
    ).any()


def test_large_images_are_downscaled_with_their_spacing(
    predictor: NodePredictor, rg1: Dataset
) -> None:
    contract = predictor.contract
    prepared = prepare(rg1, contract.image_size)
    source = rg1.copy()
    source.PixelSpacing = [0.2, 0.2]  # RG1's own is 0\0
    sc = build_overlay(
        source,
        source,
        prepared.source.pixels,
        negative(),
        contract,
        identity_of(rg1, contract),
        1024,
    )
    radiograph_rows = round(rg1.Rows * 1024 / max(rg1.Rows, rg1.Columns))
    # the band comes on top
    assert max(radiograph_rows, sc.Columns) == 1024 and sc.Rows > radiograph_rows
    # and is black where no text is
    assert not sc.pixel_array[: sc.Rows - radiograph_rows, -20:].any()
    assert float(sc.PixelSpacing[1]) == pytest.approx(0.2 * rg1.Columns / sc.Columns, rel=0.01)


def test_metrics_render_in_the_prometheus_text_format() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pacs_node.metrics import Metrics

    metrics = Metrics()
    metrics.inc("skipped_total", reason="body-part")
    metrics.inc("skipped", reason='odd"name')
    metrics.observe("inference_seconds", 0.25)
    metrics.observe("inference_seconds", 0.75)
    metrics.gauge("queue_depth", lambda: {(): 2.0}, "instances waiting")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    skipped = {
        s.labels["reason"]: s.value
        for s in families["dp_node_skipped"].samples
        if s.name == "dp_node_skipped_total"
    }
    assert families["dp_node_skipped"].type == "counter" and skipped == {
        "body-part": 1.0,
        'odd"name': 1.0,
    }
    inference = {
        s.name: s.value for s in families["dp_node_inference_seconds"].samples if not s.labels
    }
    assert families["dp_node_inference_seconds"].type == "histogram"
    assert (
        inference["dp_node_inference_seconds_sum"] == 1.0
        and inference["dp_node_inference_seconds_count"] == 2
    )
    assert (
        families["dp_node_queue_depth"].type == "gauge"
        and families["dp_node_queue_depth"].samples[0].value == 2.0
    )
    assert (
        metrics.value("skipped_total", reason="body-part") == 1
        and metrics.value("inference_seconds_count") == 2
    )
