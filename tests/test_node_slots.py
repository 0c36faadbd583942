"""No idle, trickling or crowding peer can hold the node's association slots or its HTTP threads.

The peers here speak the DICOM upper layer (PS3.8 9.3) byte by byte over real loopback
sockets, from several source addresses (127.0.0.2 ...), so that they can stop anywhere: after
A-ASSOCIATE-AC, inside a PDU, in the middle of a data set.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from node_support import audit_lines, chest_dataset, send, start_node, wait_for
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node
from pacs_node.status import StoreStatus

A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x02, 0x03
#: PS3.8 9.3.4: rejected-transient (2), by the service provider's presentation side (3),
#: local limit exceeded (2): "busy, try later".
TRANSIENT_LIMIT = (2, 3, 2)


def association_request(
    calling: str = "TESTSCU",
    called: str = "DPNODE",
    contexts=((Verification, ExplicitVRLittleEndian),),
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), encoded by pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    for context_id, (abstract, syntax) in enumerate(contexts, start=0):
        context = build_context(abstract, [syntax])
        context.context_id = 2 * context_id + 1
        primitive.presentation_context_definition_list.append(context)
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = 16382
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.0"
    primitive.user_information = [length, implementation]
    return A_ASSOCIATE_RQ(primitive).encode()


class RawPeer:
    """A peer that writes the upper layer's PDUs itself, from ``source`` (a loopback address)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )

    def associate(self, **request) -> bytes:
        """Send an A-ASSOCIATE-RQ; the whole reply PDU, or b"" when the node just closed the connection."""
        self.sock.sendall(association_request(**request))
        return self.read_pdu()

    def read_pdu(self) -> bytes:
        head = self._read(6)
        if len(head) < 6:
            return b""
        return head + self._read(struct.unpack(">I", head[2:])[0])

    def _read(self, count: int) -> bytes:
        data = b""
        try:
            while len(data) < count and (chunk := self.sock.recv(count - len(data))):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return data

    def closed_by_node(self, timeout: float) -> bool:
        """Whether the node ends the connection within ``timeout`` (anything it sends first is read)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(4096):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


def established(reply: bytes) -> bool:
    return reply[:1] == bytes([A_ASSOCIATE_AC])


def rejection(reply: bytes) -> tuple[int, int, int] | None:
    """(result, source, reason) of an A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return (
        (reply[7], reply[8], reply[9])
        if reply[:1] == bytes([A_ASSOCIATE_RJ]) and len(reply) == 10
        else None
    )


def store_pdus(ds, context_id: int = 1) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ carrying ``ds`` (Explicit VR Little Endian)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = io.BytesIO(buffer.getvalue())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return [P_DATA_TF(primitive).encode() for primitive in message.encode_msg(context_id, 16382)]


def association_lines(node: Node, status: str) -> list[dict]:
    return [
        line
        for line in audit_lines(node)
        if line["event"] == "association" and line["status"] == status
    ]


# --- idle and trickling peers ---------------------------------------------------------------------


def test_an_idle_association_is_aborted_and_recorded_while_an_active_one_stays(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(tmp_path, predictor, idle_timeout_s=1.0)
    idle = RawPeer(node.port, "127.0.0.2")
    try:
        assert established(idle.associate())
        active = verification_association(node.port)
        for _ in range(6):  # 2.4 s of C-ECHO, each well within the idle timeout
            assert active.send_c_echo().Status == 0
            time.sleep(0.4)
        assert active.is_established
        active.release()
        assert idle.closed_by_node(5), "an idle association still holds its slot"
        (line,) = wait_for(
            lambda: [
                x for x in association_lines(node, "aborted") if x["reason"] == "idle-timeout"
            ],
            10,
            "the audit line",
        )
        assert (
            line["peer"] == "127.0.0.2"
            and node.metrics.value("associations_aborted_total", reason="idle-timeout") == 1
        )
    finally:
        idle.close()
        node.stop()


def verification_association(port: int):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DPNODE")
    assert assoc.is_established
    return assoc


def command_fragment_pdu(data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV: a fragment of a command set, not the last (PS3.8 9.3.5, E.2)."""
    pdv = struct.pack(">I", 2 + len(data)) + b"\x01\x01" + data
    return b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv


@pytest.mark.parametrize("how", ["bytes-into-one-pdu", "one-byte-pdus"])
def test_a_peer_trickling_bytes_is_cut(tmp_path: Path, predictor: NodePredictor, how: str) -> None:
    """One byte every 2 s: inside one PDU (its header announces 1000 bytes), or as complete
    one-byte PDUs of a command set that never ends. At 1 kB/s after a 1 s grace, either is cut
    within seconds, whatever the network timeout (60 s, restarted by every byte)."""
    node = start_node(
        tmp_path, predictor, receive_grace_s=1.0, min_receive_kb_s=1.0, idle_timeout_s=60.0
    )
    peer = RawPeer(node.port, "127.0.0.3")
    try:
        assert established(peer.associate())
        start = time.monotonic()
        if how == "bytes-into-one-pdu":
            peer.sock.sendall(b"\x04\x00" + struct.pack(">I", 1000))
        cut = False
        while not cut and time.monotonic() - start < 15:
            try:
                peer.sock.sendall(
                    b"\x00" if how == "bytes-into-one-pdu" else command_fragment_pdu(b"\x00")
                )
            except (BrokenPipeError, ConnectionResetError):
                break
            cut = peer.closed_by_node(2.0)
        assert time.monotonic() - start < 8, "a trickling peer held its slot"
        wait_for(
            lambda: node.metrics.value("associations_aborted_total", reason="slow-transfer") == 1,
            10,
            "the cut counted",
        )
        assert [
            x
            for x in association_lines(node, "aborted")
            if x["reason"] == "slow-transfer" and x["peer"] == "127.0.0.3"
        ]
    finally:
        peer.close()
        node.stop()


# --- per-host limits and the reserve ----------------------------------------------------------------


def test_the_ninth_association_from_one_address_is_rejected_transient_not_dropped(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    """PS3.8 9.3.4: a router carrying a whole PACS's traffic from one address is told "busy, try
    later" (A-ASSOCIATE-RJ, rejected-transient, local limit exceeded), not shown a network failure."""
    node = start_node(tmp_path, predictor)  # max_associations_per_host: 8
    peers = [RawPeer(node.port, "127.0.0.2") for _ in range(9)]
    try:
        assert all(established(peer.associate()) for peer in peers[:8])
        assert rejection(peers[8].associate()) == TRANSIENT_LIMIT
        other = RawPeer(node.port, "127.0.0.3")
        peers.append(other)
        assert established(other.associate())
        (line,) = wait_for(
            lambda: association_lines(node, "rejected"), 10, "the rejection's audit line"
        )
        assert line["reason"] == "per-host-limit" and line["peer"] == "127.0.0.2"
        assert node.metrics.value("associations_rejected_total", reason="per-host-limit") == 1
    finally:
        for peer in peers:
            peer.close()
        node.stop()


def test_the_reserved_slots_go_to_peers_not_already_holding_many(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    """8 slots, the last 2 reserved for addresses holding fewer than half their limit (4 of 8)."""
    node = start_node(
        tmp_path, predictor, max_associations=8, reserved_associations=2, reclaim_idle_s=60.0
    )
    crowd = [RawPeer(node.port, "127.0.0.2") for _ in range(7)]
    others = [RawPeer(node.port, source) for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5")]
    try:
        assert all(established(peer.associate()) for peer in crowd[:6])
        # 6 held: only the reserve is left
        assert rejection(crowd[6].associate()) == TRANSIENT_LIMIT
        assert established(others[0].associate()) and established(others[1].associate())
        assert rejection(others[2].associate()) == TRANSIENT_LIMIT  # every slot in use
        wait_for(
            lambda: len(association_lines(node, "rejected")) == 2, 10, "the rejections' audit lines"
        )
        assert [x["reason"] for x in association_lines(node, "rejected")] == [
            "reserved-slots",
            "limit",
        ]
    finally:
        for peer in crowd + others:
            peer.close()
        node.stop()


# --- the Done-when check -------------------------------------------------------------------------------


def health(node: Node) -> dict:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{node.metrics_port}/health", timeout=10
        ) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def stores(port: int, ds) -> bool:
    try:
        return send(port, [ds]) == [StoreStatus.SUCCESS]
    except AssertionError:  # turned away (A-ASSOCIATE-RJ): try again
        return False


def test_a_sender_stores_within_10_s_while_16_idle_or_trickling_peers_hold_every_slot(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    """Every slot held by peers from four addresses, half of them silent, half trickling into a
    PDU (within the 30 s grace): /health says so while it lasts, and a legitimate sender stores."""
    node = start_node(
        tmp_path, predictor, reclaim_idle_s=3.0, idle_timeout_s=30.0, receive_grace_s=30.0
    )
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    peers = [RawPeer(node.port, sources[i % 4]) for i in range(16)]
    trickling, stop = peers[1::2], threading.Event()

    def trickle() -> None:
        while not stop.wait(2.0):
            for peer in trickling:
                with contextlib.suppress(OSError):
                    peer.sock.sendall(b"\x00")

    thread = threading.Thread(target=trickle, daemon=True)
    try:
        assert all(established(peer.associate()) for peer in peers)
        for peer in trickling:
            peer.sock.sendall(b"\x04\x00" + struct.pack(">I", 4000) + b"\x00")
        thread.start()
        state = health(node)
        assert (
            state["status"] == "degraded"
            and "association slots exhausted: 16 of 16 in use" in state["problems"]
        )
        ds, start = chest_dataset(), time.monotonic()
        wait_for(lambda: stores(node.port, ds), 10, "a legitimate store while every slot was held")
        assert time.monotonic() - start < 10
        wait_for(
            lambda: not [p for p in health(node)["problems"] if "exhausted" in p],
            10,
            "the exhaustion to end in /health",
        )
        assert node.metrics.value("associations_aborted_total", reason="reclaimed") >= 1
    finally:
        stop.set()
        for peer in peers:
            peer.close()
        node.stop()


# --- the HTTP endpoint ---------------------------------------------------------------------------------


def ended(sock: socket.socket, timeout: float) -> bool:
    """Whether the other side closes ``sock`` within ``timeout`` (what it sends first is read)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_silent_or_trickling_http_connections_are_timed_out_and_capped(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    """60 silent connections cost at most the cap's threads, and each is closed after the 1 s
    deadline; one sending its request a byte every 0.3 s (each read quick) is closed all the same."""
    node = start_node(tmp_path, predictor, http_timeout_s=1.0, http_max_connections=8)
    baseline = threading.active_count()
    opened: list[socket.socket] = []
    try:
        opened = [
            socket.create_connection(("127.0.0.1", node.metrics_port), timeout=10)
            for _ in range(60)
        ]
        peak = baseline
        for _ in range(5):
            peak = max(peak, threading.active_count())
            time.sleep(0.1)
        assert peak <= baseline + 8 + 1, f"{peak - baseline} threads for 60 silent connections"
        assert all(ended(sock, 5) for sock in opened)
        trickler = socket.create_connection(("127.0.0.1", node.metrics_port), timeout=10)
        opened.append(trickler)
        start, cut_after = time.monotonic(), None
        for byte in b"GET /health HTTP/1.0\r\nX-Padding: " + b"x" * 40:
            try:
                trickler.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut_after = time.monotonic() - start
                break
            time.sleep(0.3)
        assert cut_after is not None and cut_after < 3, (
            f"a trickled request held its connection ({cut_after})"
        )
        assert health(node)["status"] in ("ok", "degraded")
        wait_for(lambda: threading.active_count() <= baseline, 5, "the HTTP threads to end")
    finally:
        for sock in opened:
            sock.close()
        node.stop()


# --- /health sees the listener --------------------------------------------------------------------------


def test_health_names_associations_that_keep_ending_on_an_internal_error(
    tmp_path: Path, predictor: NodePredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node(tmp_path, predictor)
    admit = node.spool.admit

    def broken(*_args, **_kwargs):
        raise RuntimeError("a fault of the node's own")

    monkeypatch.setattr(node.spool, "admit", broken)
    try:
        for seed in range(3):
            assert send(node.port, [chest_dataset(seed=seed)]) == [StoreStatus.OUT_OF_RESOURCES]
        problems = wait_for(
            lambda: [p for p in health(node)["problems"] if "internal error" in p],
            10,
            "the crashes in /health",
        )
        assert problems[0].startswith(
            "the last 3 associations each ended on an internal error of the node's own"
        )
        monkeypatch.setattr(node.spool, "admit", admit)
        assert send(node.port, [chest_dataset(seed=9)]) == [StoreStatus.SUCCESS]
        wait_for(
            lambda: not [p for p in health(node)["problems"] if "internal error" in p],
            10,
            "the problem to clear",
        )
    finally:
        node.stop()


def test_a_listener_whose_threads_are_not_running_says_which(tmp_path: Path) -> None:
    from node_support import node_config

    from pacs_node.audit import AuditLog
    from pacs_node.intake.listener import Listener
    from pacs_node.intake.spool import Spool
    from pacs_node.metrics import Metrics

    config = node_config(tmp_path)
    spool = Spool(config.spool)
    try:
        listener = Listener(
            config,
            spool=spool,
            audit=AuditLog(config.audit_path),
            metrics=Metrics(),
            gate=lambda: None,
            enqueue=lambda _path: None,
        )
        assert listener.problems() == [
            "the DICOM accept loop is not running",
            "the listener's sweeper is not running",
        ]
    finally:
        spool.close()


# --- what a peer leaves behind --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["aborts", "goes-silent", "trickles"])
def test_the_temporary_file_of_a_data_set_never_finished_is_removed(
    tmp_path: Path, predictor: NodePredictor, how: str
) -> None:
    """Half a data set in spool/tmp, then the peer aborts, goes silent or trickles: the file goes
    with the association (and the association goes within seconds)."""
    node = start_node(
        tmp_path, predictor, idle_timeout_s=1.0, receive_grace_s=1.0, min_receive_kb_s=1.0
    )
    peer = RawPeer(node.port, "127.0.0.2")
    try:
        assert established(
            peer.associate(contexts=((ComputedRadiographyImageStorage, ExplicitVRLittleEndian),))
        )
        pdus = store_pdus(chest_dataset(rows=512, columns=512))
        assert len(pdus) > 4
        for pdu in pdus[:4]:  # the command and the first part of the data set
            peer.sock.sendall(pdu)
        wait_for(lambda: list(node.spool.tmp.iterdir()), 10, "the data set arriving into spool/tmp")
        if how == "aborts":
            # A-ABORT (PS3.8 9.3.8)
            peer.sock.sendall(b"\x07\x00" + struct.pack(">I", 4) + b"\x00\x00\x00\x00")
        elif how == "trickles":
            peer.sock.sendall(pdus[4][:7])
        assert peer.closed_by_node(8), "the association outlived its peer's silence"
        wait_for(
            lambda: not list(node.spool.tmp.iterdir()),
            10,
            "spool/tmp emptied of the unfinished data set",
        )
    finally:
        peer.close()
        node.stop()
