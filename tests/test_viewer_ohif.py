"""A radiologist opens the node's results in OHIF: the SR's regions drawn on the radiograph, the SC shown.

Orthanc routes each radiograph to the node and gets the SR and the SC back, as in
test_node_orthanc.py; it also serves them over DICOMweb, and OHIF 3.13.2 itself, to
Debian's chromium (headless, WebGL in SwiftShader), which ``tests/viewer/ohif_check.mjs``
drives. For each study the check opens the SR, the source image alone and the SC in
OHIF's viewport and fails on a page error or a broken page (React's "Error Boundary"),
on a black viewport, and when a region of the SR is not among OHIF's annotations at its
place or not drawn there.

Set ``DP_VIEWER_SHOTS=docs`` to keep the screenshots of RG1 (with a valid spacing) and of the
phantom as ``docs/ohif_{rg1,phantom}_{sr,sc}.png``; every screenshot is in the test's tmp dir.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import IN_CI, data_file, require_tool
from node_support import LOCALIZING, Orthanc, audit_lines, bundle_with, free_port, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from viewer_support import OHIF_DIST, VIEWER, ViewerOrigin, orthanc_settings

from pacs_node.config import NodeConfig
from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node

pytestmark = [pytest.mark.tools, pytest.mark.slow]

CHECK = VIEWER / "ohif_check.mjs"


def require_viewer() -> tuple[str, str]:
    """node and chromium, and OHIF with puppeteer-core from ``make viewer-deps``; missing, fail in CI, skip elsewhere."""
    node, chromium = require_tool("node", "nodejs"), require_tool("chromium", "chromium")
    if (
        not (OHIF_DIST / "index.html").exists()
        or not (VIEWER / "node_modules" / "puppeteer-core").exists()
    ):
        message = "OHIF and puppeteer-core are not installed in tests/viewer (`make viewer-deps`)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return node, chromium


@dataclass
class Site:
    """Orthanc with OHIF in front, the node behind, and what was sent to them."""

    orthanc: Orthanc
    node: Node
    origin: ViewerOrigin
    uploads: dict[str, dict] = field(default_factory=dict)


def rg1_with_valid_spacing(folder: Path) -> Path:
    """RG1 as a correctly configured modality would send it: its PixelSpacing of 0\\0 (which
    OHIF turns into a black image) left out, its ImagerPixelSpacing kept; a study of its own."""
    ds = dcmread(data_file("RG1_UNCR.dcm"))
    del ds.PixelSpacing
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / "rg1_spaced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def synthetic_positive(bundle: Path, folder: Path) -> Path:
    """A phantom from the bundle's samples that the demo model finds pneumonia in, with lesion
    regions, as the bundle ships it (with no VOI LUT Function: OHIF 3.13.2 reads a stated
    LINEAR as "L" and breaks on the source image, "Invalid VOI LUT function")."""
    return bundle / "samples" / "sample-1.dcm"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path) -> Iterator[Site]:
    require_viewer()
    folder = tmp_path_factory.mktemp("viewer")
    node_port = free_port()
    orthanc = Orthanc.routing_to(
        folder / "orthanc",
        node_port,
        plugins=("libOrthancDicomWeb.so", "libServeFolders.so"),
        **orthanc_settings(folder / "orthanc"),
    )
    config = NodeConfig(
        port=node_port,
        host="127.0.0.1",
        metrics_port=-1,
        spool=str(folder / "spool"),
        bundle=str(demo_bundle),
        destinations=(f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",),
        device="cpu",
        allow=("ORTHANC",),
    )
    # The demo model's maps do not beat the prior map, so it draws no regions; what is tested
    # here is how OHIF draws regions, so the node serves a copy whose contract says they are earned.
    node = Node(
        config,
        NodePredictor(bundle_with(demo_bundle, folder / "bundle", localization=LOCALIZING), "cpu"),
    )
    node.start()
    orthanc.start()
    origin = ViewerOrigin(orthanc.http_port).start()
    running = Site(orthanc, node, origin)
    try:
        # Both go in at once: the node works on one while the browser looks at the other.
        images = {
            "rg1": data_file("RG1_UNCR.dcm"),
            "rg1_spaced": rg1_with_valid_spacing(folder),
            "synthetic": synthetic_positive(demo_bundle, folder),
        }
        running.uploads = {
            case: running.orthanc.upload(path) | {"path": str(path)}
            for case, path in images.items()
        }
        yield running
    finally:
        origin.stop()
        node.stop()
        orthanc.stop()


def results_in_orthanc(site: Site, case: str, timeout: float = 120) -> dict[str, str]:
    """Series Instance UIDs of the study's source, SR and SC once the node's results are in Orthanc."""
    study = site.uploads[case]["ParentStudy"]
    uid = site.orthanc.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]

    def arrived() -> dict | None:
        found = site.orthanc.series_by_modality(study)
        if {"SR", "SC"} <= set(found):
            return found
        said = [
            (line["status"], line.get("reason"), line.get("detail"))
            for line in audit_lines(site.node)
            if line["event"] == "received" and line.get("study_instance_uid") == uid
        ]
        if any(status != "processed" for status, *_ in said):
            pytest.fail(f"the node made no results for {case}: its audit says {said}")
        return None

    found = wait_for(arrived, timeout, f"the SR and the SC of {case} in Orthanc")
    uids = {
        modality: found[modality][0]["MainDicomTags"]["SeriesInstanceUID"]
        for modality in ("CR", "SR", "SC")
    }
    return {"study": uid, **uids, "sr_id": found["SR"][0]["Instances"][0]}


def stored_sr(site: Site, instance: str) -> Dataset:
    with urllib.request.urlopen(
        f"{site.orthanc.url}/instances/{instance}/file", timeout=30
    ) as response:
        return dcmread(io.BytesIO(response.read()))


def sr_verdict(sr: Dataset) -> str:
    """The verdict in words: the Comment of the SR's image-level group (TID 1501, no region)."""
    (measurements,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    return next(
        item.TextValue
        for group in measurements.ContentSequence
        if not any(child.ValueType == "SCOORD" for child in group.ContentSequence)
        for item in group.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    )


def sr_regions(sr: Dataset) -> list[list[list[float]]]:
    """The SR's lesion region outlines (SCOORD polylines of its TID 1410 groups), in the
    source image's pixels; the image-level group has no region of its own."""
    found: list[list[list[float]]] = []
    for container in sr.ContentSequence:
        for group in (
            container.get("ContentSequence", []) if container.ValueType == "CONTAINER" else []
        ):
            names = {
                item.ConceptNameCodeSequence[0].CodeMeaning: item
                for item in group.get("ContentSequence", [])
            }
            if "Image Region" not in names:
                continue
            data = [float(v) for v in names["Image Region"].GraphicData]
            found.append([data[i : i + 2] for i in range(0, len(data), 2)])
    return found


def run_check(node: str, chromium: str, spec: dict, folder: Path) -> dict:
    (folder / "spec.json").write_text(json.dumps(spec, indent=1))
    started = time.monotonic()
    result = subprocess.run(
        [node, str(CHECK), str(folder / "spec.json")],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | {"CHROMIUM": chromium},
    )
    (folder / "report.json").write_text(result.stdout)
    if result.returncode != 0:
        pytest.fail(f"ohif_check.mjs failed ({result.returncode}):\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    return report


CASES = ("rg1", "rg1_spaced", "synthetic")


@dataclass
class Checked:
    """One run of ``ohif_check.mjs`` over every case's study (one browser for all of them)."""

    report: dict
    reports: dict[str, Dataset]
    regions: dict[str, list[list[list[float]]]]
    folder: Path


@pytest.fixture(scope="module")
def checked(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Checked:
    node, chromium = require_viewer()
    folder = tmp_path_factory.mktemp("ohif")
    studies, reports, regions = [], {}, {}
    for case in CASES:
        series = results_in_orthanc(site, case)
        reports[case] = stored_sr(site, series["sr_id"])
        regions[case] = sr_regions(reports[case])
        studies.append(
            {
                "name": case,
                "study": series["study"],
                "source": series["CR"],
                "sr": series["SR"],
                "sc": series["SC"],
                "regions": regions[case],
            }
        )
    spec = {"origin": site.origin.url, "out": str(folder), "studies": studies}
    return Checked(run_check(node, chromium, spec, folder), reports, regions, folder)


@pytest.mark.parametrize("case", CASES)
def test_ohif_shows_the_nodes_results(checked: Checked, case: str) -> None:
    sr, regions, folder = checked.reports[case], checked.regions[case], checked.folder
    assert all(math.isfinite(v) for region in regions for point in region for v in point), (
        f"the SR's outlines hold values that are not numbers: {regions}"
    )
    (study,) = [s for s in checked.report["studies"] if s["name"] == case]
    problems = [p for p in checked.report["problems"] if p.startswith(f"{case}: ")]
    shots = os.environ.get("DP_VIEWER_SHOTS")
    if shots and case != "rg1":
        Path(shots).mkdir(parents=True, exist_ok=True)
        name = {"rg1_spaced": "ohif_rg1", "synthetic": "ohif_phantom"}[case]
        for kind in ("sr", "sc"):
            shutil.copyfile(folder / f"{case}_{kind}.png", Path(shots) / f"{name}_{kind}.png")
    for note in checked.report.get("notes", []):
        if note.startswith(f"{case}: "):
            warnings.warn(f"OHIF: {note}", stacklevel=1)
    assert not problems, (
        f"OHIF does not show the node's results for {case} (screenshots and report.json in {folder}):\n"
        + "\n".join(problems)
    )
    # OHIF labels the image with the image-level result, the verdict in words first, and each
    # region with its finding and score.
    labels = study["views"]["sr"]["viewport"]["labels"]
    verdict = sr_verdict(sr)
    # RG1 is unlike the demo's phantoms
    if case == "synthetic":
        expected = "Probability of pneumonia"
        assert verdict.startswith("Pneumonia - probability"), verdict
    else:
        expected = "Out-of-distribution score"
        assert verdict.startswith("NOT ASSESSED"), verdict
    assert sum(verdict in label for label in labels) == 1, (verdict, labels)
    assert sum(expected in label for label in labels) == 1, labels
    assert sum("region score" in label for label in labels) == len(regions), labels
    if case == "synthetic":
        assert regions, (
            "the demo model found no lesion region in the synthetic positive: nothing to look for in OHIF"
        )
