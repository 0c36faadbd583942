"""pacs_node.dimse_reactor: pynetdicom's association loops wait for work instead of polling,
and an association still stores, releases, aborts and times out as with pynetdicom's own loops."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pynetdicom
import pytest
from helpers import p_data_tf_lengths
from node_support import StoreSCP
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from pacs_node import dimse_reactor

IDLE_S = 2.0


@pytest.fixture
def patched() -> Iterator[None]:
    was = dimse_reactor.installed()
    assert dimse_reactor.install()
    yield
    if not was:
        dimse_reactor.uninstall()


@pytest.fixture
def unpatched() -> Iterator[None]:
    was = dimse_reactor.installed()
    dimse_reactor.uninstall()
    yield
    if was:
        dimse_reactor.install()


def server(
    network_timeout: float | None = 60, acse_timeout: float = 30
) -> tuple[AE, object, int, list[str]]:
    """An SCP of Verification and Secondary Capture on a free port; the events it saw."""
    seen: list[str] = []
    ae = AE(ae_title="SCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.network_timeout = network_timeout
    ae.acse_timeout = acse_timeout

    def store(event: evt.Event) -> int:
        seen.append("stored " + event.request.AffectedSOPInstanceUID)
        return 0x0000

    handlers = [
        (evt.EVT_C_STORE, store),
        (evt.EVT_RELEASED, lambda event: seen.append("released")),
        (evt.EVT_ABORTED, lambda event: seen.append("aborted")),
        (evt.EVT_CONN_CLOSE, lambda event: seen.append("closed")),
    ]
    scp = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    return ae, scp, scp.server_address[1], seen


def associate(port: int) -> Association:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
    assert assoc.is_established
    return assoc


def until(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` held; fails past ``timeout``."""
    start = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - start < timeout, "not within the time allowed"
        time.sleep(0.005)
    return time.perf_counter() - start


def secondary_capture() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Test^Reactor"
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(64 * 64)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def idle_cpu_s() -> float:
    """This process's CPU seconds while one association (both ends in this process) sits idle."""
    _, scp, port, _ = server()
    try:
        assoc = associate(port)
        time.sleep(0.2)  # negotiation's work is done
        before = time.process_time()
        time.sleep(IDLE_S)
        used = time.process_time() - before
        assoc.release()
        return used
    finally:
        scp.shutdown()


def test_an_idle_association_costs_a_fraction_of_pynetdicoms_polling() -> None:
    """Measured against pynetdicom's own loops in the same test, on the same machine."""
    was = dimse_reactor.installed()
    dimse_reactor.uninstall()
    try:
        polling = idle_cpu_s()
        assert dimse_reactor.install()
        waiting = idle_cpu_s()
    finally:
        if not was:
            dimse_reactor.uninstall()
    assert waiting < 0.25 * polling, (waiting, polling)


def test_the_dul_loop_wakes_a_few_times_a_second_when_idle(patched: None) -> None:
    _, scp, port, _ = server()
    try:
        assoc = associate(port)
        wakeup = assoc.dul.__dict__["_dp_wakeup"]
        before = wakeup.count
        time.sleep(IDLE_S)
        woke = wakeup.count - before
        assoc.release()
    finally:
        scp.shutdown()
    # pynetdicom's loop: one wake-up a millisecond, 2000 here
    assert woke <= 2 * IDLE_S / dimse_reactor.MAX_WAIT_S, woke


#: The backstop wait of the tests that look for a missed signal: long, so that one missed
#: signal shows however loaded the machine is.
SLOW_BACKSTOP_S = 2.0


def test_stores_echoes_and_releases_without_waiting_for_a_timeout(
    patched: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal missed anywhere would cost the backstop wait (SLOW_BACKSTOP_S) at least once."""
    monkeypatch.setattr(dimse_reactor, "MAX_WAIT_S", SLOW_BACKSTOP_S)
    _, scp, port, seen = server()
    try:
        assoc = associate(port)
        datasets = [secondary_capture() for _ in range(20)]
        start = time.perf_counter()
        for ds in datasets:
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_store(ds).Status == 0x0000
        took = time.perf_counter() - start
        released = time.perf_counter()
        assoc.release()
        assert assoc.is_released
        release_s = time.perf_counter() - released
        until(lambda: "released" in seen, 2)
    finally:
        scp.shutdown()
    assert [s for s in seen if s.startswith("stored")] == [
        "stored " + ds.SOPInstanceUID for ds in datasets
    ]
    assert took < SLOW_BACKSTOP_S, took
    assert release_s < SLOW_BACKSTOP_S / 2, release_s


def test_an_abort_reaches_the_peer_at_once(patched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dimse_reactor, "MAX_WAIT_S", SLOW_BACKSTOP_S)
    _, scp, port, seen = server()
    try:
        assoc = associate(port)
        assoc.abort()
        assert assoc.is_aborted
        assert until(lambda: "aborted" in seen, 2 * SLOW_BACKSTOP_S) < SLOW_BACKSTOP_S / 2
    finally:
        scp.shutdown()


def test_network_timeout_still_ends_an_idle_association(patched: None) -> None:
    _, scp, port, seen = server(network_timeout=0.5)
    try:
        assoc = associate(port)
        took = until(lambda: "aborted" in seen and not assoc.is_established, 3)
        assert 0.4 < took < 1.5, took
    finally:
        scp.shutdown()


def test_artim_timer_still_closes_a_connection_that_never_asks(patched: None) -> None:
    """The acceptor's ARTIM timer (acse_timeout) runs from the connection to the A-ASSOCIATE-RQ."""
    _, scp, port, _ = server(acse_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            start = time.perf_counter()
            assert raw.recv(1) == b""  # closed by the node
            took = time.perf_counter() - start
        assert 0.4 < took < 1.5, took
    finally:
        scp.shutdown()


def test_associations_built_before_install_keep_pynetdicoms_loops(unpatched: None) -> None:
    _, scp, port, seen = server()
    try:
        assoc = associate(port)  # built, and running, with pynetdicom's loops
        assert dimse_reactor.install()
        try:
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
            assert assoc.is_released
        finally:
            dimse_reactor.uninstall()
    finally:
        scp.shutdown()


def test_install_refuses_another_pynetdicom(
    unpatched: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    before = (Association._run_reactor, DULServiceProvider.run_reactor)
    assert dimse_reactor.install() is False
    assert not dimse_reactor.installed()
    assert (Association._run_reactor, DULServiceProvider.run_reactor) == before


def test_importing_the_node_changes_nothing(unpatched: None) -> None:
    import pacs_node.node  # noqa: F401 - the import is the test

    assert not dimse_reactor.installed()
    assert "_kill_thread" not in vars(DULServiceProvider)  # the waking flag
    assert Association._run_reactor.__module__ == "pynetdicom.association"


def c_store_seconds(ae: AE, port: int, count: int = 20) -> float:
    """The median seconds of a C-STORE of a small object over one association from ``ae``
    (the median: a moment of load on a shared machine moves it little)."""
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RESULTS")
    assert assoc.is_established
    try:
        datasets = [secondary_capture() for _ in range(count)]
        seconds = []
        for ds in datasets:
            start = time.perf_counter()
            assert assoc.send_c_store(ds).Status == 0x0000
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)
    finally:
        assoc.release()


def test_a_c_store_to_a_peer_with_nagle_on_waits_for_no_delayed_ack(
    patched: None, tmp_path: Path
) -> None:
    """dcmtk's storescp leaves Nagle's algorithm on, as pynetdicom does: with pynetdicom's
    socket each C-STORE waits for two delayed ACKs (about 90 ms here), with PromptSocket none."""
    with StoreSCP(tmp_path / "scp") as scp:
        prompt = c_store_seconds(dimse_reactor.PromptAE(ae_title="SCU"), scp.port)
    # one delayed ACK alone is 40 ms (Linux's minimum): a median under it has none
    assert prompt < 0.035, prompt


class _SlowCheckpoint(threading.Event):
    """An association's reactor checkpoint after which its loop is held up 60 ms (longer than
    a response takes, delayed ACK included), as a loop descheduled there on a loaded machine is."""

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        time.sleep(0.06)
        return passed


def test_a_send_never_loses_its_response_to_the_association_loop(
    patched: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-ECHO that finds the association's loop paused gets its own response, even when the
    loop is held up right after its checkpoint and the caller is slow to take the response off
    the queue; the loop must never take it ("Received
    unexpected C-ECHO service message", then a DIMSE timeout: for a C-STORE, a result sent again
    and stored twice, as a soak once saw)."""
    monkeypatch.setattr(dimse_reactor, "MAX_WAIT_S", 0.001)  # the loop awake all the time
    _, scp, port, _ = server()
    try:
        assoc = associate(port)
        assoc.dimse_timeout = 1
        checkpoint = _SlowCheckpoint()
        checkpoint.set()
        assoc._reactor_checkpoint = checkpoint
        # and the caller slow to take its response off the queue, so that it sits there
        taking = assoc.dimse.get_msg

        def slowly(block: bool = False):
            if block:
                time.sleep(0.02)
            return taking(block)

        assoc.dimse.get_msg = slowly
        answered = [getattr(assoc.send_c_echo(), "Status", None) for _ in range(30)]
        assoc.release()
    finally:
        scp.shutdown()
    assert answered.count(0x0000) == len(answered), f"{answered.count(None)} echoes unanswered"


def test_a_send_to_a_peer_killed_under_it_ends_at_once_not_at_its_dimse_timeout(
    patched: None, tmp_path: Path
) -> None:
    """A peer killed with ``kill -9`` closes the connection; pynetdicom's DUL then puts the
    "connection closed" marker for a caller waiting on a response, runs the EVT_CONN_CLOSE
    handlers and only then queues the A-P-ABORT for the association's loop. A C-STORE sent in
    between (the caller had not yet seen the abort) must get that marker and end at once; a
    loop that took the marker off the queue left the caller waiting its whole DIMSE timeout
    (a sender held up for a minute after each node restart)."""
    closing = threading.Event()

    def slow_close(event: evt.Event) -> None:
        closing.set()
        time.sleep(1.0)  # between the marker and the abort, as a loaded machine may be

    with StoreSCP(tmp_path / "scp") as scp:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        ae.dimse_timeout = 20
        assoc = ae.associate(
            "127.0.0.1",
            scp.port,
            ae_title="RESULTS",
            evt_handlers=[(evt.EVT_CONN_CLOSE, slow_close)],
        )
        assert assoc.is_established
        assert scp.process is not None
        scp.process.kill()
        assert closing.wait(10), "the connection close was never seen"
        time.sleep(0.3)  # the association's loop has woken on the marker by now
        started = time.monotonic()
        status = assoc.send_c_store(secondary_capture())
        seconds = time.monotonic() - started
    assert "Status" not in status and seconds < 5, f"the send took {seconds:.1f} s"


def test_a_send_whose_association_aborts_on_a_broken_pdu_ends_at_once(patched: None) -> None:
    """When the DUL aborts an association on a broken PDU (AA-8, as when a peer is killed in
    the middle of one), it tells the association (an A-P-ABORT) but not a caller waiting for
    its response; the loop passes it on, and the caller ends at once, not at its DIMSE timeout."""
    from pynetdicom.pdu_primitives import A_P_ABORT

    held = threading.Event()
    ae = AE(ae_title="SCP")
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)

    def store(event: evt.Event) -> int:
        held.wait(30)  # never answers while the test runs
        return 0x0000

    scp = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        assoc = associate(scp.server_address[1])
        assoc.dimse_timeout = 20

        def broken_pdu() -> None:
            time.sleep(0.5)  # the C-STORE is on the wire, its caller waiting
            abort = A_P_ABORT()
            abort.provider_reason = 0x05
            assoc.dul.to_user_queue.put(abort)  # what AA-8 issues

        threading.Thread(target=broken_pdu, daemon=True).start()
        started = time.monotonic()
        status = assoc.send_c_store(secondary_capture())
        seconds = time.monotonic() - started
    finally:
        held.set()
        scp.shutdown()
    assert "Status" not in status and seconds < 5, f"the send took {seconds:.1f} s"


def test_a_caller_that_sends_again_at_once_after_an_abort_is_told_it_is_over(
    patched: None,
) -> None:
    """A caller that goes straight on to its next message after a send ended by an abort
    (as a modality sending a batch does) finds the association no longer established, rather
    than keeping the association's loop paused with the abort unhandled, one DIMSE timeout
    after another."""
    from pynetdicom.pdu_primitives import A_P_ABORT

    held = threading.Event()
    ae = AE(ae_title="SCP")
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    scp = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda event: held.wait(30) and 0x0000)],
    )
    try:
        assoc = associate(scp.server_address[1])
        assoc.dimse_timeout = 3

        def broken_pdu() -> None:
            time.sleep(0.5)
            abort = A_P_ABORT()
            abort.provider_reason = 0x05
            assoc.dul.to_user_queue.put(abort)  # what AA-8 issues

        threading.Thread(target=broken_pdu, daemon=True).start()
        started, sends = time.monotonic(), 0
        while assoc.is_established and time.monotonic() - started < 20:
            assoc.send_c_store(secondary_capture())  # at once, as a batch goes on
            sends += 1
        seconds = time.monotonic() - started
    finally:
        held.set()
        scp.shutdown()
    assert not assoc.is_established and sends == 1 and seconds < 2.5, (sends, seconds)


def _stream_of_one_large_c_store(ds: Dataset) -> tuple[bytes, int, int, bytes]:
    """What the requestor wrote while storing ``ds`` on one association to a peer that takes
    16 kB PDUs: the bytes, in how many writes, how many PDUs it reported sent, and the pixel
    data the peer received."""
    received: list[bytes] = []
    peer = AE(ae_title="SCP")
    peer.maximum_pdu_size = 16384
    peer.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)

    def store(event: evt.Event) -> int:
        received.append(bytes(event.dataset.PixelData))
        return 0x0000

    scp = peer.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    writes: list[bytes] = []
    pdus = [0]
    try:
        ae = dimse_reactor.PromptAE(ae_title="SCU")
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        handlers = [
            (evt.EVT_DATA_SENT, lambda event: writes.append(bytes(event.data))),
            (evt.EVT_PDU_SENT, lambda event: pdus.__setitem__(0, pdus[0] + 1)),
        ]
        assoc = ae.associate(
            "127.0.0.1", scp.server_address[1], ae_title="SCP", evt_handlers=handlers
        )
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        scp.shutdown()
    return b"".join(writes), len(writes), pdus[0], received[0]


def test_a_large_message_leaves_as_pynetdicoms_pdus_byte_for_byte_in_few_writes() -> None:
    """A 3 MB object to a peer taking 16 kB PDUs: pynetdicom writes about 190 PDUs one by one;
    bundled, the same bytes (association, every P-DATA-TF, release) leave in a handful of
    writes, each PDU still reported sent, and the peer stores the same pixels."""
    ds = secondary_capture()
    ds.Rows = ds.Columns = 1774  # 3.1 MB of pixels
    ds.PixelData = bytes(range(256)) * (1774 * 1774 // 256) + bytes(1774 * 1774 % 256)
    was = dimse_reactor.installed()
    dimse_reactor.uninstall()
    try:
        plain, plain_writes, plain_pdus, plain_pixels = _stream_of_one_large_c_store(ds)
        assert dimse_reactor.install()
        bundled, bundled_writes, bundled_pdus, bundled_pixels = _stream_of_one_large_c_store(ds)
    finally:
        if not was:
            dimse_reactor.uninstall()
    assert plain_pixels == bundled_pixels == ds.PixelData
    assert bundled == plain  # the same PDUs, in the same order, byte for byte
    assert plain_pdus == bundled_pdus > 190  # every P-DATA-TF still reported
    assert plain_writes > 190 and bundled_writes < 10, (plain_writes, bundled_writes)


def test_data_sent_while_the_peer_asks_to_release_keeps_to_the_peers_pdu_length(
    patched: None,
) -> None:
    """A peer that asks to release just as a large C-STORE is queued puts the requestor in
    Sta8, where its P-DATA requests go out through AR-7, not DT-1: every PDU on the wire still
    holds at most the 16 kB the peer announced (a bundle once left there as one 1 MB PDU)."""
    peer = AE(ae_title="SCP")
    peer.maximum_pdu_size = 16384
    peer.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    accepted: list[Association] = []
    scp = peer.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[
            (evt.EVT_C_STORE, lambda event: 0x0000),
            (evt.EVT_ESTABLISHED, lambda event: accepted.append(event.assoc)),
        ],
    )
    written: list[bytes] = []
    states: list[str] = []

    def release_asked(event: evt.Event) -> None:
        if type(event.message).__name__ == "C_STORE_RQ":
            accepted[0].dul.socket.socket.sendall(A_RELEASE_RQ().encode())
            until(lambda: event.assoc.dul.state_machine.current_state == "Sta8", 5)
            states.append(event.assoc.dul.state_machine.current_state)

    ae = dimse_reactor.PromptAE(ae_title="SCU")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = 3
    assoc = ae.associate(
        "127.0.0.1",
        scp.server_address[1],
        ae_title="SCP",
        evt_handlers=[
            (evt.EVT_DATA_SENT, lambda event: written.append(bytes(event.data))),
            (evt.EVT_DIMSE_SENT, release_asked),
        ],
    )
    try:
        assert assoc.is_established
        ds = secondary_capture()
        ds.Rows = ds.Columns = 1774
        ds.PixelData = bytes(1774 * 1774)
        assoc.send_c_store(ds)
    finally:
        assoc.abort()
        scp.shutdown()
    assert states == ["Sta8"]
    lengths = p_data_tf_lengths(b"".join(w for w in written if w[:1] == b"\x04"))
    assert len(lengths) > 190 and max(lengths) <= 16384, (len(lengths), max(lengths))
