"""The report goes first: each result is handed over as soon as it is built, the SR before
everything else whatever the order of ``outputs``, so that the SR is on its way to the
destination while the overlay (hundreds of milliseconds of drawing and JPEG-LS) is still
being made. The image leaves the spool only when every result is handed over, and nothing
reaches a destination twice, also when the worker dies between the SR and the overlay."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from node_support import (
    audit_lines,
    chest_dataset,
    final_lines,
    free_port,
    send,
    start_node,
    wait_for,
)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from pacs_node.delivery.cstore import RESULT_CLASSES
from pacs_node.model.predictor import NodePredictor
from pacs_node.results.base import Result, ResultContext
from pacs_node.results.identity import RESULT_KINDS
from pacs_node.results.overlay import OverlayWriter
from pacs_node.results.report import COMPREHENSIVE_3D_SR
from pacs_node.status import StoreStatus


class ArrivalSCP:
    """A destination that notes what it stores, in the order it arrives: (``SR``/``SC``, UID).
    It takes the Comprehensive SR, not the 3D form, so the UIDs it notes are the audit's."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrived: list[tuple[str, str]] = []
        ae = AE(ae_title="RESULTS")
        for sop_class in (c for c in RESULT_CLASSES if c != COMPREHENSIVE_3D_SR):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        request = event.request
        kind = RESULT_KINDS.get(str(request.AffectedSOPClassUID), "OT")
        self.arrived.append((kind, str(request.AffectedSOPInstanceUID)))
        return 0x0000

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.arrived]

    @property
    def destination(self) -> str:
        return f"RESULTS@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()


class Crash(BaseException):
    """What no ``except Exception`` catches: the worker thread dies, as in a ``kill``."""


@pytest.fixture
def pacs():
    scp = ArrivalSCP()
    yield scp
    scp.stop()


def overlay_behind(monkeypatch: pytest.MonkeyPatch, before) -> None:
    """Every overlay is built after ``before()`` returns (it may block, or raise)."""
    build = OverlayWriter.build

    def behind(self: OverlayWriter, context: ResultContext) -> Result:
        before()
        return build(self, context)

    monkeypatch.setattr(OverlayWriter, "build", behind)


def test_the_report_reaches_the_destination_before_the_overlay_is_even_built(
    tmp_path: Path, predictor: NodePredictor, pacs: ArrivalSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``outputs`` lists the overlay first; the overlay waits until the test has seen the SR
    stored at the destination. Only then is the image processed and out of the spool."""
    entered, released = threading.Event(), threading.Event()

    def gate() -> None:
        entered.set()
        assert released.wait(30), "the test never released the overlay"

    overlay_behind(monkeypatch, gate)
    node = start_node(tmp_path, predictor, outputs=("sc", "sr"), destinations=[pacs.destination])
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        wait_for(lambda: "SR" in pacs.kinds(), 15, "the SR at the destination, the overlay held")
        assert entered.is_set() and pacs.kinds() == ["SR"]
        assert final_lines(node) == [] and node.spool.count() == 1, (
            "the image stays in the spool until every result is handed over"
        )
        released.set()
        wait_for(lambda: pacs.kinds() == ["SR", "SC"], 30, "the overlay after the SR")
        (line,) = wait_for(lambda: final_lines(node, "processed"), 30, "the processed line")
        uids = dict(pacs.arrived)
        # the audit line lists the results in the order of outputs
        assert line["outputs"] == [uids["SC"], uids["SR"]]
        assert line["delivery"] == f"queued for {pacs.destination}"
    finally:
        released.set()
        node.stop()


def test_an_overlay_that_fails_after_the_report_fails_the_image_and_the_report_is_delivered(
    tmp_path: Path, predictor: NodePredictor, pacs: ArrivalSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image fails with the overlay's reason and stays in spool/failed; the SR, handed over
    before the overlay failed, is delivered once, and the failed line names it."""

    def broken() -> None:
        raise ValueError("the overlay could not be drawn")

    overlay_behind(monkeypatch, broken)
    node = start_node(tmp_path, predictor, destinations=[pacs.destination])
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        (line,) = wait_for(lambda: final_lines(node, "failed"), 30, "the failed line")
        wait_for(lambda: pacs.kinds() == ["SR"], 30, "the SR at the destination")
        assert line["reason"] == "overlay-error" and line["outputs"] == [pacs.arrived[0][1]]
        assert len(list(node.spool.failed.glob("*.dcm"))) == 1 and node.spool.count() == 0
        wait_for(
            lambda: [a for a in audit_lines(node) if a["event"] == "delivery"],
            30,
            "the SR's delivery line",
        )
        assert node.senders[0].pending() == [] and pacs.kinds() == ["SR"]
    finally:
        node.stop()


def test_a_worker_that_dies_between_the_report_and_the_overlay_sends_each_result_once(
    tmp_path: Path, predictor: NodePredictor, pacs: ArrivalSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SR is handed over, then the worker dies building the overlay. The restarted worker
    processes the image again: the same SR (deterministic UID, same content) is not queued
    again, the overlay is; the destination holds one of each."""
    deaths = [Crash("the worker fell over between the SR and the overlay")]

    def dies_once() -> None:
        if deaths:
            raise deaths.pop()

    overlay_behind(monkeypatch, dies_once)
    node = start_node(tmp_path, predictor, destinations=[pacs.destination])
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        (line,) = wait_for(
            lambda: final_lines(node, "processed"), 60, "the image, after the restart"
        )
        wait_for(lambda: sorted(pacs.kinds()) == ["SC", "SR"], 30, "the SR and the SC")
        wait_for(lambda: node.senders[0].pending() == [], 30, "an empty outbox")
        assert sorted(pacs.kinds()) == ["SC", "SR"], f"each result once, got {pacs.arrived}"
        assert node.metrics.value("thread_restarts_total", thread="worker") == 1
        assert sorted(line["outputs"]) == sorted(uid for _, uid in pacs.arrived)
    finally:
        node.stop()
