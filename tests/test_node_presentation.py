"""The Grayscale Softcopy Presentation State: the regions as graphics a PACS can switch off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import run_tool
from node_support import chest_dataset, identity_of, send, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset

from pacs_node.intake.sanitize import clean_source
from pacs_node.model.predictor import NodePredictor, Prediction
from pacs_node.node import Node
from pacs_node.results.identity import ResultIdentity
from pacs_node.results.presentation import build_presentation_state
from pacs_node.status import StoreStatus

pytestmark = pytest.mark.tools
CLASSES = ("normal", "lobar", "bronchopneumonia", "interstitial", "cavitary")
BOX = (300, 400, 900, 1200)


def lobar(boxes=(BOX,)) -> Prediction:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return Prediction(
        classes=CLASSES,
        probabilities=np.array([0.1, 0.6, 0.1, 0.1, 0.1]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=boxes,
        box_scores=(0.83,) * len(boxes),
    )


@pytest.fixture(scope="module")
def rg1(rg1_path: Path) -> Dataset:
    return dcmread(rg1_path)


def gsps(tmp_path: Path, rg1: Dataset, predictor: NodePredictor, prediction: Prediction) -> Path:
    clean = clean_source(rg1).dataset
    state = build_presentation_state(
        clean, rg1, prediction, predictor.contract, identity_of(clean, predictor.contract)
    )
    path = tmp_path / "pr.dcm"
    state.save_as(path, enforce_file_format=True)
    return path


def test_the_presentation_state_is_valid_small_and_references_its_source(
    tmp_path: Path, rg1: Dataset, predictor: NodePredictor
) -> None:
    path = gsps(tmp_path, rg1, predictor, lobar())
    check = run_tool("dciodvfy", path, check=False)
    assert not [
        line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")
    ], check.stdout + check.stderr
    state = dcmread(path)
    assert (
        state.Modality == "PR"
        and state.StudyInstanceUID == rg1.StudyInstanceUID
        and state.SeriesNumber == ResultIdentity.PR_SERIES_NUMBER
    )
    referenced = state.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert referenced.ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    assert path.stat().st_size < 128 * 1024  # the outline bitmap is cut to the regions' extent


def test_dcmtk_reads_the_regions_text_and_grayscale_pipeline_of_the_presentation_state(
    tmp_path: Path, rg1: Dataset, predictor: NodePredictor
) -> None:
    path = gsps(tmp_path, rg1, predictor, lobar())
    source = tmp_path / "rg1.dcm"
    rg1.save_as(source)
    # it writes overlays into cwd
    rendered = run_tool("dcmp2pgm", "-v", "-p", path, source, tmp_path / "out.pgm", cwd=tmp_path)
    dump = rendered.stdout + rendered.stderr
    assert "Graphic Layer #1 [AI]" in dump
    assert "coordinates: 300\\400, 900\\400, 900\\1200, 300\\1200, 300\\400" in dump
    # as the SR says it: the finding's name, the region's own score and "Finding: Lobar pneumonia"
    # in dump and "not for primary diagnosis" in dump
    assert '"Lobar pneumonia, region score 0.83 (map peak, not a probability)"' in dump
    assert "window center=15000 width=30000" in dump  # RG1's own window, restated
    assert "Number of activated overlays: 1" in dump  # the outlines also as an overlay plane
    # dcmp2pgm renders the activated overlay plane into its own bitmap: the marks, in pixels.
    from PIL import Image

    marks = np.asarray(Image.open(tmp_path / "ovl_0101.pgm"))
    x0, y0, x1, y1 = BOX
    assert (
        marks.shape == (y1 - y0, x1 - x0)
        and marks[0].min() > 0
        and marks[:, -1].min() > 0
        and marks[100:-100, 100:-100].max() == 0
    )


def test_the_outline_overlay_marks_the_box_edges_and_nothing_inside(
    tmp_path: Path, rg1: Dataset, predictor: NodePredictor
) -> None:
    state = dcmread(gsps(tmp_path, rg1, predictor, lobar()))
    rows, columns = state[0x60000010].value, state[0x60000011].value
    origin_row, origin_column = state[0x60000050].value
    bits = np.unpackbits(np.frombuffer(state[0x60003000].value, np.uint8), bitorder="little")[
        : rows * columns
    ].reshape(rows, columns)
    x0, y0, x1, y1 = BOX
    assert (origin_row, origin_column) == (y0 + 1, x0 + 1)
    # the four edges
    assert bits[0, :].all() and bits[:, 0].all() and bits[-1, :].all() and bits[:, -1].all()
    assert not bits[50:-50, 50:-50].any()  # the lesion itself stays visible


def test_an_image_without_regions_gets_the_text_only(
    tmp_path: Path, rg1: Dataset, predictor: NodePredictor
) -> None:
    negative = Prediction(
        classes=CLASSES,
        probabilities=np.array([0.8, 0.05, 0.05, 0.05, 0.05]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=np.zeros((0, 4), np.float32),
    )
    state = dcmread(gsps(tmp_path, rg1, predictor, negative))
    (annotation,) = state.GraphicAnnotationSequence
    assert (
        "GraphicObjectSequence" not in annotation
        and "No pneumonia" in annotation.TextObjectSequence[0].UnformattedTextValue
    )
    assert 0x60000010 not in state


def test_the_node_emits_the_outputs_configured(tmp_path: Path, predictor: NodePredictor) -> None:
    from node_support import start_node

    node: Node = start_node(tmp_path, predictor, outputs=("sr", "gsps"))
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        folder = tmp_path / "out" / ds.StudyInstanceUID
        wait_for(
            lambda: folder.exists() and len(list(folder.glob("*.dcm"))) == 2,
            60,
            "the SR and the GSPS",
        )
        assert sorted(p.name.split(".")[0] for p in folder.glob("*.dcm")) == ["PR", "SR"]
    finally:
        node.stop()
