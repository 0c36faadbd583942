"""A broken modality's C-STORE gets a named status and an audit line, and the association goes on.

The peers here write the DIMSE messages themselves (PS3.7 9.3.1, encoded as in PS3.8 Annex E)
over real loopback sockets, so that a command set can lack an element, or a data set can be
cut short, in ways pynetdicom's own requestor would never send.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from node_support import audit_lines, chest_dataset, start_node, wait_for
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from test_node_slots import RawPeer, established, health

from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node
from pacs_node.status import StoreStatus

CONTEXTS = (
    (ComputedRadiographyImageStorage, ExplicitVRLittleEndian),
    (Verification, ExplicitVRLittleEndian),
)
#: (0000,0800) Command Data Set Type (PS3.7 E.1): 0x0101 means no data set follows.
NO_DATA_SET = 0x0101
#: The command's UIDs left out ("absent"), empty, or as the sender has them.
ABSENT = object()


def command_set(
    instance_uid=ABSENT,
    class_uid=str(ComputedRadiographyImageStorage),
    message_id: int = 1,
    data_set: bool = True,
) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), Implicit VR Little Endian, ``ABSENT`` UIDs left out."""
    command = Dataset()
    command.CommandGroupLength = 0
    if class_uid is not ABSENT:
        command.AffectedSOPClassUID = class_uid
    command.CommandField, command.MessageID, command.Priority = 0x0001, message_id, 2
    command.CommandDataSetType = 0x0000 if data_set else NO_DATA_SET
    if instance_uid is not ABSENT:
        command.AffectedSOPInstanceUID = instance_uid
    command.CommandGroupLength = len(encode(command, True, True)) - 12
    return encode(command, True, True)


def pdu(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (PS3.8 9.3.5); ``control`` is its message control header (E.2)."""
    pdv = struct.pack(">I", 2 + len(data)) + bytes([context_id, control]) + data
    return b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def store(peer: RawPeer, command: bytes, data: bytes | None) -> int | None:
    """Send one C-STORE-RQ (the data set in 16 kB fragments); the status answered, None: no answer."""
    peer.sock.sendall(pdu(1, 0x03, command))
    if data is not None:
        fragments = [data[i : i + 16000] for i in range(0, len(data), 16000)] or [b""]
        for i, fragment in enumerate(fragments):
            peer.sock.sendall(pdu(1, 0x02 if i == len(fragments) - 1 else 0x00, fragment))
    reply = peer.read_pdu()
    if reply[:1] != b"\x04":
        return None
    return int(decode(io.BytesIO(reply[12:]), True, True).Status)


def refusals(node: Node) -> list[tuple[str, str]]:
    return [
        (line["reason"], line["status_code"])
        for line in audit_lines(node)
        if line["event"] == "store-refused"
    ]


@pytest.fixture
def peer(node: Node):
    raw = RawPeer(node.port, "127.0.0.2")
    assert established(raw.associate(contexts=CONTEXTS))
    yield raw
    raw.close()


def then_stores(peer: RawPeer) -> bool:
    """Whether an ordinary C-STORE on the same association still succeeds."""
    ds = chest_dataset(seed=7)
    return (
        store(peer, command_set(str(ds.SOPInstanceUID), message_id=2), encoded(ds))
        == StoreStatus.SUCCESS
    )


@pytest.mark.parametrize("uid", [ABSENT, ""], ids=["absent", "empty"])
def test_a_c_store_without_an_instance_uid_is_refused_by_name_and_the_association_goes_on(
    node: Node, peer: RawPeer, uid
) -> None:
    """Affected SOP Instance UID is required in a C-STORE-RQ (PS3.7 9.3.1.1). pynetdicom names the
    received file after it as soon as the command set is complete, before any event handler
    runs: without one, the association broke with no status and no audit line."""
    ds = chest_dataset(seed=1)
    assert store(peer, command_set(uid), encoded(ds)) == StoreStatus.CANNOT_UNDERSTAND
    assert then_stores(peer)
    assert wait_for(lambda: refusals(node), 10, "the audit line") == [("invalid-uid", "0xC000")]


@pytest.mark.parametrize("uid", [ABSENT, ""], ids=["absent", "empty"])
def test_a_c_store_without_a_class_uid_is_refused_by_name_and_the_association_goes_on(
    node: Node, peer: RawPeer, uid
) -> None:
    ds = chest_dataset(seed=1)
    assert (
        store(peer, command_set(str(ds.SOPInstanceUID), class_uid=uid), encoded(ds))
        == StoreStatus.CANNOT_UNDERSTAND
    )
    assert then_stores(peer)
    assert wait_for(lambda: refusals(node), 10, "the audit line") == [("invalid-uid", "0xC000")]


def test_a_c_store_without_a_data_set_is_the_peers_fault_not_the_nodes(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    """A C-STORE-RQ must carry a data set (PS3.7 9.3.1.1). One that says it has none is refused
    0xC000 (retrying it will not help), not 0xA700, and is never counted as an internal error of
    the node's own: three such peers made /health say the node was failing."""
    node = start_node(tmp_path, predictor)
    try:
        for seed in range(3):
            peer = RawPeer(node.port, "127.0.0.2")
            try:
                assert established(peer.associate(contexts=CONTEXTS))
                ds = chest_dataset(seed=seed)
                assert (
                    store(peer, command_set(str(ds.SOPInstanceUID), data_set=False), None)
                    == StoreStatus.CANNOT_UNDERSTAND
                )
            finally:
                peer.close()
        wait_for(lambda: len(refusals(node)) == 3, 10, "the audit lines")
        assert set(refusals(node)) == {("no-data-set", "0xC000")}
        assert not [p for p in health(node)["problems"] if "internal error" in p]
    finally:
        node.stop()


def truncated(data: bytes, where: str) -> bytes:
    if where == "pixel-data":
        return data[:-5000]
    if where == "last-byte":
        return data[:-1]
    name = data.find(b"\x10\x00\x10\x00PN")  # (0010,0010) Patient's Name: its header, not its value
    return data[: name + 8]


@pytest.mark.parametrize("where", ["pixel-data", "last-byte", "patient-name"])
def test_a_data_set_cut_short_mid_element_is_refused_not_acknowledged(
    node: Node, peer: RawPeer, where: str
) -> None:
    """A data set whose last element is shorter than its own length says is not the object the
    modality holds: success (PS3.4 B.2.3) would let the modality delete the only good copy. It is
    refused 0xC000, cannot understand, and the association goes on."""
    ds = chest_dataset(seed=1)
    assert (
        store(peer, command_set(str(ds.SOPInstanceUID)), truncated(encoded(ds), where))
        == StoreStatus.CANNOT_UNDERSTAND
    )
    assert then_stores(peer)
    assert wait_for(lambda: refusals(node), 10, "the audit line") == [("truncated", "0xC000")]


def test_a_peer_proposing_refused_classes_again_and_again_cannot_grow_the_audit_trail_line_by_line(
    node: Node,
) -> None:
    """The SOP classes a peer proposes and the node refuses are the peer's to repeat at will, as
    many as 127 a request: like other repeatable refusals, each peer's are written in full a few
    times a minute and counted after that, so an allowed peer cannot fill the spool's disk."""
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    for index in range(60):
        ae.add_requested_context(f"1.2.826.0.1.3680043.8.498.{index + 1}", ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    for _ in range(25):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DPNODE")
        assert assoc.is_established
        assoc.release()
    lines = [line for line in audit_lines(node) if line.get("status") == "contexts-refused"]
    assert 0 < len(lines) <= 10, len(lines)
