"""Delivery: backoff, dead letters, and destinations that never wait for each other."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import pytest
from node_support import chest_dataset, free_port, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacs_node.config import Destination, OutboxConfig
from pacs_node.delivery.cstore import RESULT_CLASSES
from pacs_node.delivery.outbox import DestinationSender
from pacs_node.files import atomic_file
from pacs_node.results.report import COMPREHENSIVE_3D_SR, sop_instance_uid_in


class Peer:
    """A storage SCP answering every C-STORE with ``status``; with ``queries``, a PACS that also
    answers Study Root C-FIND at IMAGE level about what it stores."""

    def __init__(
        self,
        status: int = 0x0000,
        queries: bool = False,
        lax: bool = False,
        syntaxes: tuple = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        stall: bool = False,
    ) -> None:
        self.port, self.status, self.stored, self.server, self.queries = (
            free_port(),
            status,
            [],
            None,
            queries,
        )
        self.received: list[Dataset] = []
        self.encoded: list[bytes] = []  # each data set as it came over the wire
        # With ``stall``, each C-STORE waits until the test sets ``go``: the object is on the wire.
        self.go, self.on_wire = threading.Event(), threading.Event()
        if not stall:
            self.go.set()
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
        self.on_wire.set()
        assert self.go.wait(30), "the test never let the C-STORE go on"
        self.encoded.append(event.encoded_dataset(include_meta=False))
        self.received.append(event.dataset)
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

    def callback(destination, uid, source, reason):
        return deliveries.append((destination.port, uid, reason is None))

    return DestinationSender(
        peer.destination,
        tmp_path / "outbox",
        calling_ae="DPNODE",
        config=config,
        on_delivered=callback,
        timeout_s=5,
    )


def test_a_down_destination_never_delays_a_working_one_and_gets_everything_when_back(
    tmp_path: Path,
) -> None:
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
        wait_for(
            lambda: senders[1].stats.failed_associations >= 1,
            10,
            "a failed attempt at the destination that is down",
        )
        assert down.stored == [] and len(senders[1].pending()) == 5
        # it comes back: the backoff is capped, so delivery resumes within about a second
        down.start()
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
        assert [n for n in dead if n.endswith(".dcm")] and "0xA900" in next(
            s.dead.glob("*.why.txt")
        ).read_text()
        assert s.pending() == []
    finally:
        s.stop()
        refusing.stop()


def test_backoff_doubles_up_to_the_cap_between_attempts(tmp_path: Path) -> None:
    down = Peer()  # never listening
    s = sender(tmp_path, down, [], initial_backoff_s=0.1, max_backoff_s=0.4)
    waits: list[float] = []

    def pause(seconds: float) -> None:
        # record the wait instead of sleeping it: no timing in the test
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
    # nothing dropped while waiting
    assert s.stats.failed_associations >= 6 and len(s.pending()) == 1


def test_an_object_in_flight_at_a_crash_is_asked_about_before_it_is_sent_again(
    tmp_path: Path,
) -> None:
    """A kill -9 between the destination storing an object and the sender noting it leaves the
    object in doubt; a destination that answers C-FIND is asked, and gets nothing twice."""
    pacs = Peer(queries=True).start()
    ds, other = result(0), result(1)
    pacs.stored.append(str(ds.SOPInstanceUID))  # it arrived before the crash
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    for item in (ds, other):
        s._sending_marker(s.put(item, "source")).touch()  # both were on the wire
    s.start()
    try:
        wait_for(lambda: len(deliveries) == 2, 20, "both objects accounted for")
        assert (
            pacs.stored.count(str(ds.SOPInstanceUID)) == 1
            and pacs.stored.count(str(other.SOPInstanceUID)) == 1
        )
        assert sorted(pacs.asked) == sorted([str(ds.SOPInstanceUID), str(other.SOPInstanceUID)])
        assert (
            all(ok for _, _, ok in deliveries)
            and s.pending() == []
            and not list(s.ledger.glob("*.sending"))
        )
    finally:
        s.stop()
        pacs.stop()


def test_a_delivery_noted_before_a_crash_is_not_sent_again_whatever_the_destination_answers(
    tmp_path: Path,
) -> None:
    """A kill -9 after the ledger noted a delivery and before the entry was removed: the
    entry (still marked as on the wire) is settled from the note, without a send or a query,
    even by a destination that answers no queries; a corrected result of the same instance
    (another digest) is still sent."""
    import pacs_node.delivery.outbox as outbox

    pacs = Peer().start()  # answers no queries: a query would not settle anything
    ds, corrected = result(0), result(1)
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    entry = s.put(ds, "source", "digest-1")
    s._sending_marker(entry).touch()
    outbox._note(s.ledger / entry.name.split("_")[0], outbox._sidecar_path(entry), "digest-1")
    other = s.put(corrected, "other", "digest-2")
    s.start()
    try:
        wait_for(lambda: len(deliveries) == 2, 20, "both entries accounted for")
        assert pacs.stored == [str(corrected.SOPInstanceUID)]
        assert s.pending() == [] and not entry.exists() and not other.exists()
        # the image processed again: the same result is known as delivered
        assert s.put(ds, "source", "digest-1") is None
    finally:
        s.stop()
        pacs.stop()


def test_a_destination_that_answers_no_queries_gets_an_object_in_doubt_again(
    tmp_path: Path,
) -> None:
    pacs = Peer().start()
    ds = result(0)
    pacs.stored.append(str(ds.SOPInstanceUID))
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    s._sending_marker(s.put(ds, "source")).touch()
    s.start()
    try:
        wait_for(lambda: deliveries, 20, "the delivery")
        # at least once, when the destination cannot say
        assert pacs.stored.count(str(ds.SOPInstanceUID)) == 2
    finally:
        s.stop()
        pacs.stop()


def test_a_pacs_that_answers_queries_with_other_objects_still_gets_the_object_in_doubt(
    tmp_path: Path,
) -> None:
    pacs = Peer(queries=True, lax=True).start()
    pacs.stored.append(str(generate_uid()))  # something else it holds
    ds = result(0)
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    s._sending_marker(s.put(ds, "source")).touch()
    s.start()
    try:
        wait_for(lambda: deliveries, 20, "the delivery")
        assert (
            pacs.asked == [str(ds.SOPInstanceUID)]
            and pacs.stored.count(str(ds.SOPInstanceUID)) == 1
        )
    finally:
        s.stop()
        pacs.stop()


def test_a_result_delivered_before_is_not_sent_again_unless_its_content_changed(
    tmp_path: Path,
) -> None:
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


def test_a_delivery_that_cannot_be_noted_on_a_full_disk_is_not_sent_twice(
    tmp_path: Path, monkeypatch
) -> None:
    """A full disk (no new file can be made) when a delivery is noted: the object is not sent
    again, neither by this sender nor after a crash, when its image is processed again."""
    import errno

    import pacs_node.delivery.outbox as outbox

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
    # The node killed now and the image processed again: the same result, put again by a new
    # sender on the same outbox, is known as delivered (the note took no new room on the disk).
    again = sender(tmp_path, pacs, deliveries)
    try:
        assert again.put(ds, "source", "digest") is None
        assert again.pending() == []
    finally:
        pacs.stop()


@pytest.mark.parametrize("takes_jpeg_ls", [True, False])
def test_a_losslessly_compressed_overlay_reaches_destinations_with_and_without_the_syntax(
    tmp_path: Path, takes_jpeg_ls: bool
) -> None:
    from pydicom.uid import JPEGLSLossless

    syntaxes = (
        (JPEGLSLossless, ExplicitVRLittleEndian)
        if takes_jpeg_ls
        else (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    )
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
        assert pacs.received_syntaxes == [
            JPEGLSLossless if takes_jpeg_ls else ExplicitVRLittleEndian
        ]
    finally:
        s.stop()
        pacs.stop()


def test_a_result_the_destination_takes_as_it_is_leaves_as_the_bytes_of_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overlay whose class and syntax the destination accepted is sent from its outbox file
    as written, neither decoded nor encoded again (each cost the node's one interpreter lock
    about as much as building it): pydicom reads nothing of it, and the bytes on the wire are
    the file's."""
    import pacs_node.delivery.cstore as cstore

    def no_decoding(*args, **kwargs):
        raise AssertionError("the outbox file was decoded to be sent")

    monkeypatch.setattr(cstore, "dcmread", no_decoding)
    # the peer keeps what it receives in memory (a node started in this process before
    # switched pynetdicom, process-wide, to receiving into files)
    monkeypatch.setattr(pynetdicom_config, "STORE_RECV_CHUNKED_DATASET", False)
    pacs = Peer().start()
    deliveries: list = []
    s = sender(tmp_path, pacs, deliveries)
    path = s.put(result(0), "source")
    written = path.read_bytes()
    s.start()
    try:
        wait_for(lambda: deliveries, 20, "the delivery")
        assert all(ok for _, _, ok in deliveries)
        (on_wire,) = pacs.encoded
        assert written.endswith(on_wire) and len(on_wire) > 300 * 300
    finally:
        s.stop()
        pacs.stop()


def stored_uid(ds: Dataset) -> str:
    """The SOP Instance UID a destination that takes Comprehensive 3D SR stores ``ds`` under: a
    report goes in that class, under a UID of its own derived from the first."""
    if ds.SOPClassUID == ComprehensiveSRStorage:
        return sop_instance_uid_in(str(ds.SOPInstanceUID), COMPREHENSIVE_3D_SR)
    return str(ds.SOPInstanceUID)


def report(index: int, findings: int = 3) -> Dataset:
    """A small Comprehensive SR with ``findings`` content items, COMPLETE, as the outbox would hold."""
    ds = Dataset()
    ds.file_meta = result(index).file_meta
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SR"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    items = []
    for number in range(findings):
        item = Dataset()
        item.RelationshipType, item.ValueType, item.TextValue = (
            "CONTAINS",
            "TEXT",
            f"finding {number}",
        )
        items.append(item)
    ds.ContentSequence = Sequence(items)
    return ds


def recording_sender(
    tmp_path: Path, peer: Peer, **settings
) -> tuple[DestinationSender, list[tuple[str, str | None]]]:
    """A sender whose reports are kept as ``(sop_instance_uid, reason)``: reason None when delivered."""
    reports: list[tuple[str, str | None]] = []
    config = OutboxConfig(**{"initial_backoff_s": 0.2, "max_backoff_s": 0.8} | settings)
    s = DestinationSender(
        peer.destination,
        tmp_path / "outbox",
        calling_ae="DPNODE",
        config=config,
        on_delivered=lambda d, uid, source, reason: reports.append((uid, reason)),
        timeout_s=5,
    )
    return s, reports


def test_a_result_corrected_while_the_first_is_on_the_wire_is_delivered_after_it(
    tmp_path: Path,
) -> None:
    """The corrected result has the same SOP Instance UID and another content digest; the
    first's success must not count for it, nor remove it."""
    pacs = Peer(stall=True).start()
    first = result(0)
    corrected = copy.deepcopy(first)
    corrected.PatientName = "Doe^Janet"
    s, reports = recording_sender(tmp_path, pacs)
    s.put(first, "source", "digest-1")
    s.start()
    try:
        assert pacs.on_wire.wait(20), "the first result never went out"
        assert s.put(corrected, "source", "digest-2") is not None
        pacs.go.set()
        wait_for(lambda: len(reports) == 2, 10, "the first result, then the corrected one")
        assert pacs.stored == [str(first.SOPInstanceUID)] * 2 and [
            str(ds.PatientName) for ds in pacs.received
        ] == ["Doe^Jane^Q", "Doe^Janet"]
        assert reports == [(str(first.SOPInstanceUID), None)] * 2 and s.pending() == []
        # the destination has the corrected one now
        assert s.put(corrected, "source", "digest-2") is None
    finally:
        pacs.go.set()
        s.stop()
        pacs.stop()


def test_identical_results_put_again_and_again_while_they_are_sent_reach_the_destination_once(
    tmp_path: Path,
) -> None:
    """An image sent 20 times in quick succession gives the same results 20 times; whatever the
    moment each arrives (before, during or after the delivery of the one before), the
    destination gets each result once."""
    pacs = Peer().start()
    s, reports = recording_sender(tmp_path, pacs)
    s.start()
    rounds = []
    try:
        for round_ in range(12):
            pair = [report(round_), result(round_)]
            rounds.append(pair)
            for _ in range(20):
                for ds in pair:
                    s.put(ds, f"source-{round_}", f"digest-{round_}")
                s.wake()
        wait_for(lambda: s.pending() == [] and s.stats.busy_since is None, 30, "an empty outbox")
        # anything put back by a race would be picked up within the sender's idle second
        time.sleep(0.3)
        wait_for(lambda: s.pending() == [], 5, "an empty outbox")
        expected = sorted(stored_uid(ds) for pair in rounds for ds in pair)
        assert sorted(pacs.stored) == expected, "a result reached the destination twice, or never"
    finally:
        s.stop()
        pacs.stop()


def test_a_truncated_outbox_file_goes_to_dead_letters_and_the_results_behind_it_are_delivered(
    tmp_path: Path,
) -> None:
    pacs = Peer().start()
    s, reports = recording_sender(tmp_path, pacs)
    broken, behind = result(0), [result(1), report(2)]
    path = s.put(broken, "source-0", "digest-0")
    for ds in behind:
        s.put(ds, "source", "digest")
    data = path.read_bytes()
    # the file meta and a few bytes: no SOP Class UID
    path.write_bytes(data[: data.index(b"DICM") + 200])
    s.start()
    try:
        wait_for(
            lambda: len(reports) == 3,
            10,
            "the two results delivered and the broken one accounted for",
        )
        assert sorted(pacs.stored) == sorted(stored_uid(ds) for ds in behind)
        assert (str(broken.SOPInstanceUID), "integrity") in reports and s.pending() == []
        assert next(s.dead.glob("*.why.txt")).read_text().startswith("integrity:")
    finally:
        s.stop()
        pacs.stop()


@pytest.mark.parametrize("damage", ["fewer-content-items", "sidecar-gone", "sidecar-unreadable"])
def test_a_result_changed_after_hand_over_is_never_delivered(tmp_path: Path, damage: str) -> None:
    """An SR cut short that still parses (fewer content items, CompletionFlag COMPLETE) reads
    as a valid report; only the digest recorded at hand-over shows it is not the one written."""
    pacs = Peer().start()
    s, reports = recording_sender(tmp_path, pacs)
    sr = report(0, findings=3)
    path = s.put(sr, "source", "digest")
    if damage == "fewer-content-items":
        truncated = copy.deepcopy(sr)
        truncated.ContentSequence = Sequence(list(sr.ContentSequence)[:1])
        with atomic_file(path) as handle:
            truncated.save_as(handle, enforce_file_format=True)
    elif damage == "sidecar-gone":
        path.with_suffix(".json").unlink()
    else:
        path.with_suffix(".json").write_text("{not json")
    s.start()
    try:
        wait_for(lambda: reports, 10, "the result accounted for")
        assert (
            reports == [(str(sr.SOPInstanceUID), "integrity")]
            and pacs.stored == []
            and s.pending() == []
        )
    finally:
        s.stop()
        pacs.stop()


def test_the_destination_ends_with_the_newest_result_and_superseded_ones_are_never_sent(
    tmp_path: Path,
) -> None:
    """On the wire: the first result. Then a correction, then the first content again: the
    correction, superseded before it was sent, never goes; the destination ends with the newest,
    which it holds already (the ledger notes the first as delivered): it is not sent twice."""
    pacs = Peer(stall=True).start()
    first = result(0)
    corrected = copy.deepcopy(first)
    corrected.PatientName = "Doe^Janet"
    s, reports = recording_sender(tmp_path, pacs)
    s.put(first, "source", "digest-1")
    s.start()
    try:
        assert pacs.on_wire.wait(20), "the first result never went out"
        s.put(corrected, "source", "digest-2")
        s.put(first, "source", "digest-1")
        pacs.go.set()
        wait_for(lambda: len(reports) == 2 and s.pending() == [], 10, "two deliveries")
        assert [str(ds.PatientName) for ds in pacs.received] == ["Doe^Jane^Q"]
    finally:
        pacs.go.set()
        s.stop()
        pacs.stop()


def test_results_in_the_outbox_layout_before_are_delivered_after_an_upgrade(tmp_path: Path) -> None:
    """``<uid>.dcm`` with a sidecar of source and digest, a ``<uid>.sending`` marker for one in
    doubt: each is delivered once, the one in doubt asked about first; one cut short is a dead letter."""
    pacs = Peer(queries=True).start()
    folder = tmp_path / "outbox" / pacs.destination.name
    (folder / ".delivered").mkdir(parents=True)
    waiting, in_doubt, cut = result(0), result(1), result(2)
    pacs.stored.append(str(in_doubt.SOPInstanceUID))  # it arrived before the process died
    for ds in (waiting, in_doubt, cut):
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        (folder / f"{ds.SOPInstanceUID}.json").write_text(
            json.dumps({"source": "source", "digest": "digest"})
        )
    (folder / ".delivered" / f"{in_doubt.SOPInstanceUID}.sending").touch()
    data = (folder / f"{cut.SOPInstanceUID}.dcm").read_bytes()
    (folder / f"{cut.SOPInstanceUID}.dcm").write_bytes(data[: data.index(b"DICM") + 300])
    s, reports = recording_sender(tmp_path, pacs)
    s.start()
    try:
        wait_for(lambda: len(reports) == 3, 10, "every result accounted for")
        assert sorted(reports) == sorted(
            [
                (str(waiting.SOPInstanceUID), None),
                (str(in_doubt.SOPInstanceUID), None),
                (str(cut.SOPInstanceUID), "integrity"),
            ]
        )
        assert sorted(pacs.stored) == sorted(
            [str(waiting.SOPInstanceUID), str(in_doubt.SOPInstanceUID)]
        ) and pacs.asked == [str(in_doubt.SOPInstanceUID)]
        assert (
            s.pending() == []
            and not list(s.ledger.glob("*.sending"))
            and s.put(waiting, "source", "digest") is None
        )
    finally:
        s.stop()
        pacs.stop()


def test_a_node_whose_report_is_cut_short_in_the_outbox_sends_the_overlay_and_audits_the_dead_letter(
    tmp_path: Path, predictor
) -> None:
    """The whole node: its results wait for a destination that is down; the SR is cut short on
    disk meanwhile. When the destination is back, the overlay is delivered and the SR is a dead
    letter with an audit line (reason integrity), never sent."""
    from node_support import audit_lines, send, start_node

    from pacs_node.results.identity import result_kind

    pacs = Peer()  # not listening yet
    node = start_node(
        tmp_path,
        predictor,
        destinations=[f"PEER@127.0.0.1:{pacs.port}"],
        outbox={"initial_backoff_s": 0.2, "max_backoff_s": 0.5},
        metrics_port=-1,
    )
    try:
        assert send(node.port, [chest_dataset(seed=0)]) == [0]
        outbox = node.senders[0]
        entries = wait_for(
            lambda: len(outbox.pending()) == 2 and outbox.pending(),
            30,
            "the SR and the SC in the outbox",
        )
        kinds = {result_kind(dcmread(path)): path for path in entries}
        uids = {kind: str(dcmread(path).SOPInstanceUID) for kind, path in kinds.items()}
        data = kinds["SR"].read_bytes()
        kinds["SR"].write_bytes(data[: len(data) * 2 // 3])
        # the next try finds it (one checked just before the cut may still be failing to connect)
        wait_for(
            lambda: any(line["status"] == "dead-letter" for line in audit_lines(node)),
            20,
            "the SR a dead letter",
        )
        pacs.start()
        lines = wait_for(
            lambda: (
                len([line for line in audit_lines(node) if line["event"] == "delivery"]) == 2
                and audit_lines(node)
            ),
            20,
            "two delivery lines",
        )
        deliveries = {line["status"]: line for line in lines if line["event"] == "delivery"}
        assert deliveries["dead-letter"]["reason"] == "integrity" and deliveries["dead-letter"][
            "outputs"
        ] == [uids["SR"]]
        assert pacs.stored == [uids["SC"]] and outbox.pending() == []
    finally:
        node.stop()
        pacs.stop()


def test_an_image_processed_again_in_another_batch_gives_the_same_content_digest() -> None:
    """Batched inference is not bit-exact: the same image alone and in a batch comes out a few
    1e-8 apart. That is not a correction; a number the results state differently is."""
    import numpy as np

    from pacs_node.intake.sanitize import clean_source
    from pacs_node.model.prediction import Prediction
    from pacs_node.pipeline import _content_digest

    source = clean_source(chest_dataset()).dataset

    def saying(pneumonia: float) -> Prediction:
        probabilities = np.array([1 - pneumonia, pneumonia], dtype=np.float32)
        return Prediction(
            classes=("normal", "pneumonia"),
            probabilities=probabilities,
            normal_class="normal",
            operating_point=0.5,
            heatmap=np.zeros((4, 4)),
            boxes=np.zeros((0, 4)),
        )

    # across a rounding boundary at six decimals
    alone, batched = saying(0.0181415 - 3e-8), saying(0.0181415 + 3e-8)
    assert _content_digest(source, alone) == _content_digest(source, batched)
    # the SR would say 1.82 %, not 1.81 %
    assert _content_digest(source, saying(0.0182)) != _content_digest(source, alone)


# --- parallel associations ---------------------------------------------------------------------------


class CountingPeer(Peer):
    """A stalled peer that counts the C-STOREs it holds at once (one per association)."""

    def __init__(self) -> None:
        super().__init__(stall=True)
        self.lock, self.in_flight, self.most = threading.Lock(), 0, 0

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            return super()._store(event)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_a_destination_gets_results_over_parallel_associations_each_once(tmp_path: Path) -> None:
    peer, deliveries = CountingPeer().start(), []
    s = sender(tmp_path, peer, deliveries, associations=2)
    uids = []
    for i in range(6):
        ds = result(i)
        uids.append(ds.SOPInstanceUID)
        s.put(ds, f"source-{i}")
    s.start()
    s.wake()
    try:
        # Both associations hold a C-STORE while the peer stalls them: the results are not in one line.
        wait_for(lambda: peer.in_flight == 2, 20, "two C-STOREs at once")
        peer.go.set()
        wait_for(lambda: len(deliveries) == 6, 20, "every result delivered")
        assert sorted(peer.stored) == sorted(uids) and peer.most == 2
        assert s.pending() == []
    finally:
        s.stop()
        peer.stop()


def test_a_newer_result_of_an_instance_on_the_wire_waits_for_it_and_arrives_last(
    tmp_path: Path,
) -> None:
    """Two associations never carry the same instance at once: a correction put while the
    first version is on the wire is sent after it is answered, so the destination ends with it."""
    peer, deliveries = CountingPeer().start(), []
    s = sender(tmp_path, peer, deliveries, associations=2)
    first = result(0)
    s.put(first, "source-0")
    s.start()
    s.wake()
    try:
        wait_for(peer.on_wire.is_set, 20, "the first version on the wire")
        corrected = copy.deepcopy(first)
        corrected.SeriesDescription = "corrected"
        s.put(corrected, "source-0", digest="corrected")
        s.wake()
        time.sleep(1.0)  # an idle association would have taken the correction by now
        assert peer.in_flight == 1 and peer.most == 1
        peer.go.set()
        wait_for(lambda: len(peer.received) == 2, 20, "both versions")
        assert [ds.get("SeriesDescription", "") for ds in peer.received][-1] == "corrected"
    finally:
        s.stop()
        peer.stop()
