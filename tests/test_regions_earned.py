"""Lesion regions on a film only when the bundle earned them: its maps, measured on held-out
boxed images, beat a map that ignores the image (each class's mean training box).

The bundles here are copies of the demo bundle whose contract says how its localization
measured; the node runs the real model and the real region path, and the SR it sends is read
back, as a PACS would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import run_tool
from node_support import LOCALIZING, bundle_with, send, start_node, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset

from pacs_node.model.predictor import NodePredictor, prepare

#: The maps of the review: far below the prior (map+ at 0.00-0.08, the prior at 0.64 / 0.34 / 0.21).
NOT_EARNED = LOCALIZING | {
    "shown": False,
    "validation": {"iou>0.1": 0.08, "iou>0.3": 0.0, "iou>0.5": 0.0, "pointing": 0.1},
    "test": {"iou>0.1": 0.06, "iou>0.3": 0.01, "iou>0.5": 0.0, "pointing": 0.12},
    "difference_low": -0.4,
}


#: Earned regions drawn from Grad-CAM, which is scaled to its peak and so reaches the region
#: threshold on any positive image, whatever the demo model's own ``map+`` reaches (the
#: demonstration bundle's stays below 0.5: docs/benchmarks.md, "Demo model").
EARNED = LOCALIZING | {"source": "grad_cam"}

NOT_EARNED_TEXT = "Lesion regions not shown: this model's localization did not beat a fixed prior on held-out data"


@pytest.fixture(scope="module")
def positive_case(demo_bundle: Path) -> Dataset:
    """A demo sample the model calls pneumonia."""
    return dcmread(demo_bundle / "samples" / "sample-1.dcm")


def region_groups(sr: Dataset) -> int:
    """The lesion region groups (TID 1410, an Image Region of their own) of an SR's Imaging
    Measurements; the image-level group (TID 1501) is not one."""
    found = 0
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in item.ContentSequence:
            found += any(child.ValueType == "SCOORD" for child in group.ContentSequence)
    return found


def comments(sr: Dataset) -> list[str]:
    """The Comment (DCM 121106) texts of the SR's Qualitative Evaluations."""
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations":
            return [
                c.TextValue
                for c in item.ContentSequence
                if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeValue == "121106"
            ]
    return []


def results_of(tmp_path: Path, bundle: Path, ds: Dataset, **settings) -> dict[str, Dataset]:
    """Run ``ds`` through a real node serving ``bundle``: its SR, SC and GSPS by kind."""
    node = start_node(
        tmp_path, NodePredictor(bundle, "cpu"), outputs=("sr", "sc", "gsps"), **settings
    )
    try:
        assert send(node.port, [ds]) == [0]
        folder = tmp_path / "out" / ds.StudyInstanceUID
        wait_for(
            lambda: folder.exists() and len(list(folder.glob("*.dcm"))) == 3,
            60,
            "the SR, SC and GSPS",
        )
    finally:
        node.stop()
    return {path.name.split(".")[0]: dcmread(path) for path in folder.glob("*.dcm")}


def test_a_bundle_whose_maps_do_not_beat_the_prior_draws_no_region_and_says_so(
    tmp_path: Path, demo_bundle: Path, positive_case: Dataset
) -> None:
    bundle = bundle_with(demo_bundle, tmp_path / "bundle", localization=NOT_EARNED)
    found = results_of(tmp_path, bundle, positive_case)
    sr = found["SR"]
    # a positive result: exactly where regions were drawn before
    assert "Present" in str(sr.ContentSequence)
    assert region_groups(sr) == 0
    assert comments(sr) == [NOT_EARNED_TEXT]
    check = run_tool(
        "dciodvfy",
        tmp_path / "out" / positive_case.StudyInstanceUID / f"SR.{sr.SOPInstanceUID}.dcm",
        check=False,
    )
    assert not [
        line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")
    ], check.stdout
    assert (
        "GraphicObjectSequence" not in found["PR"].GraphicAnnotationSequence[0]
        and 0x60000010 not in found["PR"]
    )


def test_a_bundle_whose_maps_beat_the_prior_draws_its_regions(
    tmp_path: Path, demo_bundle: Path, positive_case: Dataset
) -> None:
    bundle = bundle_with(demo_bundle, tmp_path / "bundle", localization=EARNED)
    found = results_of(tmp_path, bundle, positive_case)
    assert region_groups(found["SR"]) >= 1 and not comments(found["SR"])
    assert len(found["PR"].GraphicAnnotationSequence[0].GraphicObjectSequence) == region_groups(
        found["SR"]
    )


def test_an_old_bundle_draws_no_region_and_the_node_says_so_at_start(
    tmp_path: Path, demo_bundle: Path, positive_case: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = bundle_with(demo_bundle, tmp_path / "bundle", localization=None)
    with caplog.at_level(logging.INFO, logger="pacs_node.model.predictor"):
        predictor = NodePredictor(bundle, "cpu")
    assert any("localization: not measured" in record.getMessage() for record in caplog.records)
    (prediction,) = predictor.predict([prepare(positive_case, predictor.contract.image_size)])
    assert (
        prediction.positive
        and len(prediction.boxes) == 0
        and "not measured" in prediction.regions_withheld
    )


def test_regions_are_never_drawn_on_a_negative_or_not_assessed_result(
    tmp_path: Path, demo_bundle: Path, positive_case: Dataset
) -> None:
    earned = bundle_with(demo_bundle, tmp_path / "earned", localization=EARNED)
    served = NodePredictor(earned, "cpu")
    size = served.contract.image_size
    (positive,) = served.predict([prepare(positive_case, size)])
    # a point above the image's probability of pneumonia: the same map, a negative answer
    above = (positive.pneumonia_probability + 1.0) / 2
    assert positive.positive and above < 1.0
    (negative,) = NodePredictor(earned, "cpu", operating_point=above).predict(
        [prepare(positive_case, size)]
    )
    # the map would have given regions
    assert not negative.positive and len(negative.boxes) == 0 and negative.heatmap.max() >= 0.5
    ood = json.loads((earned / "configs" / "metadata.json").read_text())["deep_pneumonia"][
        "ood"
    ] | {"threshold": 0.001}
    (outside,) = NodePredictor(
        bundle_with(demo_bundle, tmp_path / "outside", localization=EARNED, ood=ood), "cpu"
    ).predict([prepare(positive_case, size)])
    assert not outside.assessed and len(outside.boxes) == 0


def test_the_overlay_of_a_positive_result_without_earned_regions_has_no_heat_and_says_why() -> None:
    from pacs_node.model.prediction import Prediction
    from pacs_node.results.overlay import render

    gray = np.tile(np.linspace(0.2, 0.8, 400, dtype=np.float32), (500, 1))
    lobar = Prediction(
        classes=("normal", "lobar"),
        probabilities=np.array([0.1, 0.9]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.ones((7, 7), np.float32),
        boxes=np.zeros((0, 4), np.float32),
    )
    shown, _ = render(gray, lobar, demo=False, max_side=512)
    withheld, _ = render(
        gray, replace(lobar, regions_withheld=NOT_EARNED_TEXT), demo=False, max_side=512
    )
    band = withheld.shape[0] - gray.shape[0]
    assert band > shown.shape[0] - gray.shape[0]  # a line more in the band
    film = withheld[band:].astype(int)
    # gray: no heat anywhere
    assert (film[..., 0] == film[..., 1]).all() and (film[..., 1] == film[..., 2]).all()
    # the earned map tints it
    assert not (
        shown[shown.shape[0] - gray.shape[0] :, ..., 0]
        == shown[shown.shape[0] - gray.shape[0] :, ..., 2]
    ).all()


def test_a_contract_cannot_claim_regions_its_figures_do_not_earn(
    tmp_path: Path, demo_bundle: Path
) -> None:
    from dp_model.serving.bundle import BundleError

    for name, claim in {
        "below the prior": NOT_EARNED | {"shown": True},
        "margin loosened": LOCALIZING
        | {"margin": 0.0, "validation": LOCALIZING["validation"] | {"iou>0.3": 0.35}},
        "too few images to decide": LOCALIZING | {"difference_low": -0.01},
        "unknown source": LOCALIZING | {"source": "saliency"},
    }.items():
        with pytest.raises(BundleError, match="localization"):
            NodePredictor(
                bundle_with(demo_bundle, tmp_path / name.replace(" ", "_"), localization=claim),
                "cpu",
            )
    # A source the network does not offer: the demo network has map+ heads, no class maps.
    with pytest.raises(BundleError, match="not one this network offers"):
        NodePredictor(
            bundle_with(
                demo_bundle,
                tmp_path / "class_maps",
                localization=LOCALIZING | {"source": "class_maps"},
            ),
            "cpu",
        )
