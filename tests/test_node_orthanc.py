"""Orthanc as the hospital PACS: it routes chest radiographs to the node and gets the results back."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import data_file
from node_support import Orthanc, free_port, wait_for

from pacs_node.config import NodeConfig
from pacs_node.model.predictor import NodePredictor
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
