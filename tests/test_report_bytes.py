"""The SR's exact bytes, pinned: what :func:`~pacs_node.results.report.build_report` writes
for a fixed source, model and identity, for each kind of answer (positive with regions,
negative, not assessed, multi-label, regions withheld), is compared byte for byte with the
files in ``tests/data/sr/``.

The files were written by the report code before it was made faster (the content built
once, highdicom's repeated work skipped), so a change meant to speed the report up cannot
change what it says, nor how. A change meant to change the report updates them, on purpose
and in the same commit: ``python tests/test_report_bytes.py`` writes them again.

The creation and contribution dates and times (highdicom stamps the clock) are set to a
fixed value before writing, and the identity's settings digest is fixed; nothing else is
touched.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from node_support import chest_dataset
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from dp_model.serving.contract import ModelContract
from pacs_node.intake.sanitize import clean_source
from pacs_node.model.prediction import Prediction
from pacs_node.results.identity import ResultIdentity
from pacs_node.results.report import build_report

REFERENCES = Path(__file__).parent / "data" / "sr"
CLASSES = ("normal", "lobar", "bronchopneumonia", "interstitial", "cavitary")
#: The clock's share of the SR, fixed so that the rest can be compared.
STAMPED = {
    "InstanceCreationDate": "20261205",
    "InstanceCreationTime": "120000",
    "ContentDate": "20261205",
    "ContentTime": "120000",
}
#: The settings' share of the UIDs, fixed: the live one digests the results code itself
#: (identity.results_format), so that any change to it gives new UIDs.
RENDITION = "0123456789abcdef"


def contract(**fields) -> ModelContract:
    """A model as a bundle describes it, independent of any trained weights."""
    base = {
        "classes": CLASSES,
        "image_size": 224,
        "attention_stages": (3, 4),
        "normal_class": "normal",
        "name": "Deep Pneumonia demo",
        "version": "2026.12.05",
        "device_uid": "2.25.31415926535897932384626433832795028841",
        "demo": True,
        "synthetic": True,
    }
    return ModelContract(**(base | fields))


def source(**attributes) -> Dataset:
    """A chest radiograph with fixed UIDs, cleaned as the node cleans what it receives."""
    fixed = {
        "SOPInstanceUID": "2.25.100000000000000000000000000000000001",
        "StudyInstanceUID": "2.25.100000000000000000000000000000000002",
        "SeriesInstanceUID": "2.25.100000000000000000000000000000000003",
    }
    return clean_source(chest_dataset(rows=320, columns=288, **(fixed | attributes))).dataset


def single_label(probabilities, boxes=(), scores=(), **fields) -> Prediction:
    return Prediction(
        classes=CLASSES,
        probabilities=np.array(probabilities),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_scores=tuple(scores),
        **fields,
    )


def multi_label() -> Prediction:
    return Prediction(
        classes=CLASSES[1:],
        probabilities=np.array([0.8, 0.2, 0.6, 0.1]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=np.array([[30, 40, 120, 200], [150, 50, 250, 180]], np.float32),
        multi_label=True,
        box_labels=("lobar", "interstitial"),
        box_scores=(0.71, 0.64),
    )


#: name: (prediction, source attributes)
CASES = {
    "positive-two-regions": (
        single_label(
            (0.1, 0.6, 0.1, 0.1, 0.1),
            boxes=((30, 40, 120, 200), (150, 50, 250, 180)),
            scores=(0.83, float("nan")),
            triage_point=0.7,
            ood_score=0.2,
            ood_threshold=0.9,
        ),
        {},
    ),
    "negative": (single_label((0.8, 0.05, 0.05, 0.05, 0.05)), {}),
    "not-assessed": (
        single_label((0.2, 0.5, 0.1, 0.1, 0.1), ood_score=3.5, ood_threshold=0.9),
        {"Modality": "DX"},
    ),
    "multi-label": (multi_label(), {}),
    "regions-withheld": (
        single_label(
            (0.2, 0.1, 0.5, 0.1, 0.1),
            triage_point=0.4,
            regions_withheld="Regions are not shown: the bundle's localization was not measured.",
        ),
        {"PatientName": "Müller^Jürgen", "SpecificCharacterSet": "ISO_IR 100"},
    ),
}


def report_bytes(name: str) -> bytes:
    """The SR of case ``name`` as a PS3.10 file, its creation time fixed."""
    prediction, attributes = CASES[name]
    model = contract()
    src = source(**attributes)
    sr = build_report(src, prediction, model, ResultIdentity.of(src, model, RENDITION))
    for keyword, value in STAMPED.items():
        setattr(sr, keyword, value)
    for equipment in sr.ContributingEquipmentSequence:
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = STAMPED["ContentDate"] + STAMPED["ContentTime"]
    buffer = io.BytesIO()
    dcmwrite(buffer, sr, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_report_is_byte_for_byte_what_it_was(name: str) -> None:
    expected = (REFERENCES / f"{name}.dcm").read_bytes()
    assert report_bytes(name) == expected, (
        f"the SR of {name} differs from tests/data/sr/{name}.dcm; if the report was meant to "
        "change, write the references again: python tests/test_report_bytes.py"
    )


def test_building_a_report_leaves_the_next_one_unchanged() -> None:
    """Whatever is built once and reused between reports is never changed by a report."""
    first = {name: report_bytes(name) for name in CASES}
    assert {name: report_bytes(name) for name in reversed(list(CASES))} == first


def test_highdicoms_iod_tables_are_searched_once_per_question() -> None:
    """Whether an IOD has pixel data, or a content date: asked of highdicom's tables once per
    SOP class, not on every report (the bytes stay those of the references, above)."""
    import highdicom.base
    import highdicom.base_content

    asked = (highdicom.base_content.does_iod_have_pixel_data, highdicom.base.is_attribute_in_iod)
    report_bytes("negative")
    searched = [lookup.cache_info().misses for lookup in asked]
    report_bytes("negative")
    report_bytes("multi-label")
    assert [lookup.cache_info().misses for lookup in asked] == searched
    assert all(lookup.cache_info().hits > 0 for lookup in asked)


def test_the_built_report_reads_as_its_whole_content() -> None:
    """highdicom's view of the object built (``sr.content``) is the whole measurement report:
    the image-level group, both regions, the evaluations; the items the document holds."""
    import highdicom as hd

    prediction, attributes = CASES["positive-two-regions"]
    model, src = contract(), source(**attributes)
    sr = build_report(src, prediction, model, ResultIdentity.of(src, model, RENDITION))
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert len(sr.content.get_planar_roi_measurement_groups()) == 2
    assert len(sr.content.get_image_measurement_groups()) == 1
    assert sr.content[0].ContentSequence is sr.ContentSequence


if __name__ == "__main__":
    REFERENCES.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        (REFERENCES / f"{case}.dcm").write_bytes(report_bytes(case))
        print(f"wrote {REFERENCES / case}.dcm")
