"""``/health`` tells the truth: results that do not get through, a destination that keeps
failing and a full spool disk each make it say ``degraded`` in plain words, the gauges
follow, and it says ``ok`` again once the problem ends."""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from node_support import FullDisk, chest_dataset, free_port, send, start_node, wait_for
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
)

from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node
from pacs_node.status import StoreStatus

#: Fast retries and a short bound, so that a test sees the node give up hope in seconds.
QUICK_OUTBOX = {"initial_backoff_s": 0.2, "max_backoff_s": 0.5, "stall_after_s": 1.0}


def health(node: Node) -> tuple[int, dict]:
    """``GET /health``: the HTTP code and the JSON answer."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{node.metrics_port}/health", timeout=10
        ) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def degraded_with(node: Node, *words: str) -> str | None:
    """The problem /health names that holds every one of ``words``, if it says degraded."""
    code, state = health(node)
    if code != 503:
        return None
    return next((p for p in state["problems"] if all(w in p for w in words)), None)


def gauge(node: Node, name: str, **labels: str) -> float | None:
    """The value of one sample of ``GET /metrics``."""
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"dp_node_{name}{{{wanted}}} " if labels else f"dp_node_{name} "):
            return float(line.rsplit(" ", 1)[1])
    return None


class PACS:
    """A PACS on a free loopback port that answers each C-STORE with ``status`` (0xA700: out of
    resources, the sender should try again later); nothing listens there until :meth:`start`."""

    def __init__(self, status: StoreStatus = StoreStatus.OUT_OF_RESOURCES) -> None:
        self.port, self.status, self.stored, self.server = free_port(), status, [], None

    def start(self) -> PACS:
        ae = AE(ae_title="PACS")
        for sop_class in (
            Comprehensive3DSRStorage,
            ComprehensiveSRStorage,
            SecondaryCaptureImageStorage,
        ):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _store(self, event) -> int:
        if self.status == StoreStatus.SUCCESS:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return int(self.status)

    @property
    def destination(self) -> str:
        return f"PACS@127.0.0.1:{self.port}"


def test_health_says_degraded_while_results_wait_past_the_bound_and_ok_once_they_are_delivered(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    pacs = PACS().start()
    node = start_node(
        tmp_path,
        predictor,
        destinations=(pacs.destination,),
        outbox=QUICK_OUTBOX | {"max_refusals": 1000},
    )
    try:
        assert health(node)[0] == 200
        send(node.port, [chest_dataset()])
        problem = wait_for(
            lambda: degraded_with(node, pacs.destination, "2 waiting", "0xA700"),
            30,
            "degraded health while the PACS refuses",
        )
        assert re.search(r"the oldest for \d+ s", problem), problem
        assert gauge(node, "outbox_oldest_seconds", destination=pacs.destination) >= 1.0
        assert gauge(node, "outbox_backlog", destination=pacs.destination) == 2.0
        pacs.status = StoreStatus.SUCCESS
        wait_for(
            lambda: len(pacs.stored) == 2 and health(node)[0] == 200,
            30,
            "health back to ok once the results are delivered",
        )
        assert gauge(node, "outbox_oldest_seconds", destination=pacs.destination) == 0.0
        assert health(node)[1]["destinations"][pacs.destination]["oldest_s"] is None
    finally:
        node.stop()
        pacs.stop()


def test_health_says_degraded_while_a_destination_refuses_connections_and_ok_once_it_listens(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    closed = PACS(StoreStatus.SUCCESS)  # nothing listens on its port yet
    node = start_node(tmp_path, predictor, destinations=(closed.destination,), outbox=QUICK_OUTBOX)
    try:
        send(node.port, [chest_dataset()])
        problem = wait_for(
            lambda: degraded_with(node, closed.destination, "failed for", "no connection"),
            30,
            "degraded health while nothing listens",
        )
        assert "2 waiting" in problem, problem
        assert gauge(node, "destination_failing_seconds", destination=closed.destination) > 0.0
        closed.start()
        wait_for(
            lambda: len(closed.stored) == 2 and health(node)[0] == 200,
            30,
            "health back to ok once the destination listens",
        )
        assert gauge(node, "destination_failing_seconds", destination=closed.destination) == 0.0
    finally:
        node.stop()
        closed.stop()


def test_health_names_the_free_space_when_the_spool_disk_runs_low_and_ok_once_it_is_freed(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    disk = FullDisk(tmp_path / "disk", size_mb=64)
    if not disk.mounted:
        pytest.skip("needs a tmpfs of its own (mounting needs root)")
    node = start_node(tmp_path, predictor, spool=str(disk.folder / "spool"), min_free_mb=16)
    try:
        assert health(node)[0] == 200 and gauge(node, "spool_free_bytes") > 16 * 2**20
        disk.fill()
        problem = wait_for(
            lambda: degraded_with(node, "spool", "0 MB free", "min_free_mb (16 MB)", "refused"),
            10,
            "degraded health on a full disk",
        )
        assert health(node)[1]["disk_ok"] is False and gauge(node, "spool_free_bytes") < 2**20, (
            problem
        )
        disk.free()
        wait_for(lambda: health(node)[0] == 200, 10, "health back to ok once the disk has room")
    finally:
        node.stop()
        disk.close()


def test_metrics_open_to_the_network_are_announced_at_start(
    tmp_path: Path, predictor: NodePredictor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pacs_node.node")
    node = start_node(tmp_path / "open", predictor, metrics_host="0.0.0.0")
    node.stop()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "/health" in r.getMessage()
    ]
    assert (
        len(warnings) == 1
        and f"0.0.0.0:{node.metrics_port}" in warnings[0]
        and "/metrics" in warnings[0]
    ), warnings
    caplog.clear()
    node = start_node(tmp_path / "loopback", predictor)
    node.stop()
    assert not [r for r in caplog.records if "/health" in r.getMessage()]
