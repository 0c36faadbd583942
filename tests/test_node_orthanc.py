"""Orthanc as the hospital PACS: it routes chest radiographs to the node and gets the results back."""

from __future__ import annotations

import io
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import data_file
from node_support import Orthanc, free_port, wait_for
from pydicom import dcmread

from pacs_node.config import NodeConfig
from pacs_node.model.predictor import NodePredictor, prepare
from pacs_node.node import Node

pytestmark = pytest.mark.tools


@pytest.fixture
def pacs_and_node(tmp_path: Path, demo_bundle: Path) -> Iterator[tuple[Orthanc, Node]]:
    node_port = free_port()
    orthanc = Orthanc.routing_to(tmp_path / "orthanc", node_port)
    config = NodeConfig(
        port=node_port,
        host="127.0.0.1",
        metrics_port=-1,
        spool=str(tmp_path / "spool"),
        bundle=str(demo_bundle),
        destinations=(f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",),
        device="cpu",
        allow=("ORTHANC",),
    )
    node = Node(config, NodePredictor(demo_bundle, "cpu"))
    node.start()
    orthanc.start()
    try:
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def test_orthanc_routes_the_chest_xray_and_gets_sr_and_sc_in_the_same_study(
    pacs_and_node: tuple[Orthanc, Node],
) -> None:
    orthanc, node = pacs_and_node
    stored = orthanc.upload(data_file("RG1_UNCR.dcm"))
    study = stored["ParentStudy"]
    found = wait_for(
        lambda: (s := orthanc.series_by_modality(study)) and {"SR", "SC"} <= set(s) and s,
        120,
        "the SR and the SC in Orthanc's study",
    )
    time.sleep(3)  # a routing loop would show up as more instances by now
    found = orthanc.series_by_modality(study)
    # the overlay (CR, as its radiograph) is not routed again
    assert sorted(found) == ["CR", "SC", "SR"]
    assert [
        len(series["Instances"]) for modality in ("CR", "SR", "SC") for series in found[modality]
    ] == [1, 1, 1]
    assert "not for primary diagnosis" in found["SR"][0]["MainDicomTags"]["SeriesDescription"]
    processed = [
        json.loads(line)
        for line in node.config.audit_path.read_text().splitlines()
        if '"received"' in line
    ]
    assert [line["status"] for line in processed] == ["processed"] and processed[0][
        "calling_ae"
    ] == "ORTHANC"
    # Sending the same image again (a re-route, a resend) replaces the results, never duplicates them.
    orthanc.get(f"/instances/{stored['ID']}")
    request = urllib.request.Request(
        f"http://127.0.0.1:{orthanc.http_port}/modalities/dpnode/store",
        data=json.dumps({"Resources": [stored["ID"]], "Synchronous": True}).encode(),
        method="POST",
    )
    urllib.request.urlopen(request, timeout=60).read()
    wait_for(
        lambda: (
            sum(
                1
                for line in node.config.audit_path.read_text().splitlines()
                if '"processed"' in line
            )
            == 2
        ),
        60,
        "the second processing",
    )
    wait_for(
        lambda: (
            all(s.stats.backlog == 0 for s in node.senders)
            and not any(s.pending() for s in node.senders)
        ),
        60,
        "delivery",
    )
    again = orthanc.series_by_modality(study)
    assert [
        len(series["Instances"]) for modality in ("CR", "SR", "SC") for series in again[modality]
    ] == [1, 1, 1]


def _coded_values(dataset) -> list[str]:
    """Every coded value's meaning in an SR's content tree, in order."""
    found = []
    for item in dataset.get("ContentSequence", []):
        for code in item.get("ConceptCodeSequence", []):
            found.append(str(code.CodeMeaning))
        found += _coded_values(item)
    return found


def test_a_second_answer_under_other_settings_is_a_second_report_never_the_first_ones_uid(
    tmp_path: Path, demo_bundle: Path
) -> None:
    # The same image through the node at two operating points: the second report says something
    # else, so it must not reuse the first one's SOP Instance UID (a PACS would keep the first).
    node_port = free_port()
    orthanc = Orthanc.routing_to(tmp_path / "orthanc", node_port).start()
    try:
        sample = demo_bundle / "samples" / "sample-1.dcm"
        first = NodePredictor(demo_bundle, "cpu")
        (found,) = first.predict([prepare(dcmread(sample), first.contract.image_size)])
        # the second point above the sample's probability of pneumonia: its answer turns negative
        above = (found.pneumonia_probability + 1.0) / 2
        assert found.positive and above < 1.0
        for count, point in enumerate((0.01, above), start=1):
            config = NodeConfig(
                port=node_port,
                metrics_port=-1,
                spool=str(tmp_path / "spool"),
                bundle=str(demo_bundle),
                destinations=(f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",),
                device="cpu",
                allow=("ORTHANC",),
                operating_point=point,
            )
            node = Node(config, NodePredictor(demo_bundle, "cpu", operating_point=point))
            node.start()
            try:
                if count == 1:  # Orthanc routes what it stores to the node
                    stored = orthanc.upload(sample)
                    study = stored["ParentStudy"]
                else:  # and sends it again to the restarted node
                    request = urllib.request.Request(
                        f"{orthanc.url}/modalities/dpnode/store",
                        data=json.dumps(
                            {"Resources": [stored["ID"]], "Synchronous": True}
                        ).encode(),
                        method="POST",
                    )
                    urllib.request.urlopen(request, timeout=60).read()
                wait_for(
                    lambda count=count, study=study: (
                        len(orthanc.get(f"/studies/{study}/instances")) == 1 + 2 * count
                    ),
                    120,
                    f"the results of processing {count} in Orthanc",
                )
            finally:
                node.stop()
        files = [
            dcmread(io.BytesIO(orthanc.request_bytes(f"/instances/{i['ID']}/file")))
            for i in orthanc.get(f"/studies/{study}/instances")
        ]
        reports = [ds for ds in files if ds.Modality == "SR"]
    finally:
        orthanc.stop()
    assert len(reports) == 2 and reports[0].SOPInstanceUID != reports[1].SOPInstanceUID
    # and the two say different things: the scenario this guards is real
    assert _coded_values(reports[0]) != _coded_values(reports[1])
