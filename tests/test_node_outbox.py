"""Delivery: backoff, dead letters, and destinations that never wait for each other."""

from __future__ import annotations

import time

import pytest
from pathlib import Path

from node_support import chest_dataset, free_port, wait_for
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacs_node.config import Destination, OutboxConfig
from pacs_node.cstore import RESULT_CLASSES
from pacs_node.outbox import DestinationSender


class Peer:
    """A storage SCP answering every C-STORE with ``status``; with ``queries``, a PACS that also
    answers Study Root C-FIND at IMAGE level about what it stores."""

    def __init__(self, status: int = 0x0000, queries: bool = False, lax: bool = False, syntaxes: tuple = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)) -> None:
        self.port, self.status, self.stored, self.server, self.queries = free_port(), status, [], None, queries
        self.lax = lax  # answers every query with whatever it holds, matching or not
        self.syntaxes, self.received_syntaxes = list(syntaxes), []
        self.asked: list[str] = []

    def start(self) -> Peer:
        ae = AE(ae_title="PEER")
        for sop_class in RESULT_CLASSES:
            ae.add_supported_context(sop_class, self.syntaxes)
        handlers = [(evt.EVT_C_STORE, self._store)]
        if self.queries:
            ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
            handlers.append((evt.EVT_C_FIND, self._find))
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def _store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        self.received_syntaxes.append(str(event.context.transfer_syntax))
        return self.status

    def _find(self, event: evt.Event):
        uid = str(event.identifier.SOPInstanceUID)
        self.asked.append(uid)
        for held in self.stored if self.lax else [uid] if uid in self.stored else []:
            found = Dataset()
            found.QueryRetrieveLevel, found.SOPInstanceUID = "IMAGE", held
            yield 0xFF00, found
        yield 0x0000, None

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()

    @property
    def destination(self) -> Destination:
        return Destination("PEER", "127.0.0.1", self.port)


def result(index: int) -> Dataset:
    """A small Secondary Capture, as the outbox would hold."""
    ds = chest_dataset(rows=300, columns=300, seed=index, Modality="OT")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def sender(tmp_path: Path, peer: Peer, deliveries: list, **settings) -> DestinationSender:
    config = OutboxConfig(**{"initial_backoff_s": 0.2, "max_backoff_s": 0.8} | settings)
    callback = lambda destination, uid, source, reason: deliveries.append((destination.port, uid, reason is None))  # noqa: E731
    return DestinationSender(peer.destination, tmp_path / "outbox", "DPNODE", config, callback, timeout_s=5)


def test_a_down_destination_never_delays_a_working_one_and_gets_everything_when_back(tmp_path: Path) -> None:
    good, down = Peer().start(), Peer()  # `down` is not listening yet
    deliveries: list = []
    senders = [sender(tmp_path, good, deliveries), sender(tmp_path, down, deliveries)]
    uids = []
    for i in range(5):
        ds = result(i)
        uids.append(ds.SOPInstanceUID)
        for s in senders:
            s.put(ds, f"source-{i}")
    for s in senders:
        s.start()
        s.wake()
    try:
        wait_for(lambda: len(good.stored) == 5, 20, "the working destination")
        wait_for(lambda: senders[1].stats.failed_associations >= 1, 10, "a failed attempt at the destination that is down")
        assert down.stored == [] and len(senders[1].pending()) == 5
        down.start()  # it comes back: the backoff is capped, so delivery resumes within about a second
        wait_for(lambda: len(down.stored) == 5, 20, "the destination that was down")
        assert sorted(down.stored) == sorted(uids) == sorted(good.stored)
        # The peer stores before its response reaches the sender, which then reports the delivery.
        wait_for(lambda: len(deliveries) == 10, 10, "every delivery reported")
        assert all(ok for _, _, ok in deliveries)
        assert senders[0].pending() == [] and senders[1].pending() == []
    finally:
        for s in senders:
            s.stop()
        good.stop()
        down.stop()


def test_objects_a_destination_keeps_refusing_go_to_dead_letters(tmp_path: Path) -> None:
    refusing = Peer(status=0xA900).start()
    deliveries: list = []
    s = sender(tmp_path, refusing, deliveries, max_refusals=2)
    s.put(result(0), "source-0")
    s.start()
    try:
        wait_for(lambda: deliveries, 20, "a dead letter")
        dead = sorted(p.name for p in s.dead.iterdir())
        assert len(refusing.stored) == 2 and deliveries[0][2] is False
        assert [n for n in dead if n.endswith(".dcm")] and "0xA900" in next(s.dead.glob("*.why.txt")).read_text()
        assert s.pending() == []
    finally:
        s.stop()
        refusing.stop()


def test_backoff_doubles_up_to_the_cap_between_attempts(tmp_path: Path) -> None:
    down = Peer()  # never listening
    s = sender(tmp_path, down, [], initial_backoff_s=0.1, max_backoff_s=0.4)
    waits: list[float] = []

    def pause(seconds: float) -> None:  # record the wait instead of sleeping it: no timing in the test
        waits.append(seconds)
        time.sleep(0.01)

    s._pause = pause
    s.put(result(0), "source-0")
    s.start()
    try:
        wait_for(lambda: len(waits) >= 6, 30, "six failed attempts")
    finally:
        s.stop()
    assert waits[:6] == [0.1, 0.2, 0.4, 0.4, 0.4, 0.4]
    assert s.stats.failed_associations >= 6 and len(s.pending()) == 1  # nothing dropped while waiting


def test_an_object_in_flight_at_a_crash_is_asked_about_before_it_is_sent_again(tmp_path: Path) -> None:
    """A kill -9 between the destination storing an object and the sender noting it leaves the
    object in doubt; a destination that answers C-FIND is asked, and gets nothing twice."""
    pacs = Peer(queries=True).start()
    ds, other = result(0), result(1)
    pacs.stored.append(str(ds.SOPInstanceUID))  # it arrived before the crash
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    for item in (ds, other):
        s.put(item, "source")
        s._sending_marker(s.folder / f"{item.SOPInstanceUID}.dcm").touch()  # both were on the wire
    s.start()
    try:
        wait_for(lambda: len(deliveries) == 2, 20, "both objects accounted for")
        assert pacs.stored.count(str(ds.SOPInstanceUID)) == 1 and pacs.stored.count(str(other.SOPInstanceUID)) == 1
        assert sorted(pacs.asked) == sorted([str(ds.SOPInstanceUID), str(other.SOPInstanceUID)])
        assert all(ok for _, _, ok in deliveries) and s.pending() == [] and not list(s.ledger.glob("*.sending"))
    finally:
        s.stop()
        pacs.stop()


def test_a_destination_that_answers_no_queries_gets_an_object_in_doubt_again(tmp_path: Path) -> None:
    pacs = Peer().start()
    ds = result(0)
    pacs.stored.append(str(ds.SOPInstanceUID))
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    s.put(ds, "source")
    s._sending_marker(s.folder / f"{ds.SOPInstanceUID}.dcm").touch()
    s.start()
    try:
        wait_for(lambda: deliveries, 20, "the delivery")
        assert pacs.stored.count(str(ds.SOPInstanceUID)) == 2  # at least once, when the destination cannot say
    finally:
        s.stop()
        pacs.stop()


def test_a_pacs_that_answers_queries_with_other_objects_still_gets_the_object_in_doubt(tmp_path: Path) -> None:
    pacs = Peer(queries=True, lax=True).start()
    pacs.stored.append(str(generate_uid()))  # something else it holds
    ds = result(0)
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    s.put(ds, "source")
    s._sending_marker(s.folder / f"{ds.SOPInstanceUID}.dcm").touch()
    s.start()
    try:
        wait_for(lambda: deliveries, 20, "the delivery")
        assert pacs.asked == [str(ds.SOPInstanceUID)] and pacs.stored.count(str(ds.SOPInstanceUID)) == 1
    finally:
        s.stop()
        pacs.stop()


def test_a_result_delivered_before_is_not_sent_again_unless_its_content_changed(tmp_path: Path) -> None:
    """Processed again after a crash: same content, nothing sent. Sent again with corrected
    patient data: another digest, so the corrected result goes out under the same UID."""
    pacs = Peer().start()
    ds = result(0)
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    s.start()
    try:
        assert s.put(ds, "source", "digest-1") is not None
        wait_for(lambda: len(deliveries) == 1, 20, "the first delivery")
        assert s.put(ds, "source", "digest-1") is None
        assert s.put(ds, "source", "digest-2") is not None
        wait_for(lambda: len(deliveries) == 2, 20, "the corrected result")
        assert pacs.stored == [str(ds.SOPInstanceUID)] * 2 and s.pending() == []
    finally:
        s.stop()
        pacs.stop()


def test_a_delivery_that_cannot_be_noted_on_a_full_disk_is_not_sent_twice(tmp_path: Path, monkeypatch) -> None:
    import errno

    import pacs_node.outbox as outbox

    def full(path, text) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outbox, "_write", full)
    pacs = Peer().start()
    ds = result(0)
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    s.put(ds, "source", "digest")
    s.start()
    try:
        wait_for(lambda: deliveries, 20, "the delivery")
        time.sleep(1.5)  # a retry would come after the 0.2 s backoff
        assert pacs.stored == [str(ds.SOPInstanceUID)] and s.pending() == []
    finally:
        s.stop()
        pacs.stop()


@pytest.mark.parametrize("takes_jpeg_ls", [True, False])
def test_a_losslessly_compressed_overlay_reaches_destinations_with_and_without_the_syntax(tmp_path: Path, takes_jpeg_ls: bool) -> None:
    from pydicom.uid import JPEGLSLossless

    syntaxes = (JPEGLSLossless, ExplicitVRLittleEndian) if takes_jpeg_ls else (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    pacs = Peer(syntaxes=syntaxes).start()
    ds = result(0)
    ds.compress(JPEGLSLossless)
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    s.put(ds, "source")
    s.start()
    try:
        wait_for(lambda: deliveries, 20, "the delivery")
        assert pacs.stored == [str(ds.SOPInstanceUID)] and all(ok for _, _, ok in deliveries)
        assert pacs.received_syntaxes == [JPEGLSLossless if takes_jpeg_ls else ExplicitVRLittleEndian]
    finally:
        s.stop()
        pacs.stop()
