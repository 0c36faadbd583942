"""A hostile or broken peer cannot reach outside the node's folders, exhaust it, or go unseen."""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import data_file
from node_support import (
    audit_lines,
    chest_dataset,
    final_lines,
    send,
    send_files,
    start_node,
    wait_for,
    write_raw,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dp_transforms import ImageError, dicom_to_image
from dp_transforms.errors import ImageErrorReason
from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node
from pacs_node.status import StoreStatus


def processed(node: Node, uid: str) -> bool:
    return any(
        line["status"] == "processed" and line.get("sop_instance_uid") == uid
        for line in final_lines(node)
    )


def association_lines(node: Node, status: str) -> list[dict]:
    return [
        line
        for line in audit_lines(node)
        if line["event"] == "association" and line["status"] == status
    ]


# --- paths ----------------------------------------------------------------------------------------


def test_a_study_uid_that_is_a_path_never_becomes_one(node: Node, tmp_path: Path) -> None:
    outside = tmp_path.parent / f"escape-{os.getpid()}-{random.randrange(10**9)}"
    hostile = [
        chest_dataset(seed=1, StudyInstanceUID="../../" + outside.name),
        chest_dataset(seed=2, StudyInstanceUID=str(outside)),
    ]
    paths = [write_raw(ds, tmp_path / f"hostile{i}.dcm") for i, ds in enumerate(hostile)]
    assert send_files(node.port, paths) == [StoreStatus.SUCCESS] * 2
    for ds in hostile:
        wait_for(
            lambda ds=ds: processed(node, ds.SOPInstanceUID),
            60,
            "the hostile images to be processed",
        )
    assert not outside.exists() and not (tmp_path / outside.name).exists()
    results = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(results) == 4
    for path in results:
        assert path.resolve().is_relative_to((tmp_path / "out").resolve())
        written = dcmread(path)
        assert UID(written.StudyInstanceUID).is_valid and UID(written.SOPInstanceUID).is_valid


# --- memory and disk -------------------------------------------------------------------------------


def test_a_data_set_above_the_size_cap_is_stopped_while_it_arrives(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(tmp_path, predictor, max_dataset_mb=1)
    try:
        big = chest_dataset(rows=1200, columns=1100)  # 2.6 MB of pixels
        assert send(node.port, [big])[0] != StoreStatus.SUCCESS
        line = wait_for(
            lambda: [x for x in audit_lines(node) if x.get("reason") == "too-large"],
            10,
            "a too-large audit line",
        )[0]
        assert line["calling_ae"] == "TESTSCU"
        assert node.metrics.value("refused_total", reason="too-large") == 1
        wait_for(
            lambda: not list(node.spool.tmp.iterdir()), 10, "the partial data set to be removed"
        )
        small = chest_dataset(seed=2)
        assert send(node.port, [small]) == [StoreStatus.SUCCESS]
        wait_for(lambda: processed(node, small.SOPInstanceUID), 60, "a small image afterwards")
    finally:
        node.stop()


def jpeg2000_bomb(declared: int = 16384) -> Dataset:
    """A small JPEG 2000 image whose codestream header declares ``declared`` x ``declared`` pixels."""
    ds = chest_dataset(rows=64, columns=64, BitsStored=16, HighBit=15)
    ds.PixelData = (
        (np.random.default_rng(0).integers(0, 4000, (64, 64))).astype(np.uint16).tobytes()
    )
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    frame = b"".join(list(generate_fragments(ds.PixelData))[1:])  # after the Basic Offset Table
    at = frame.index(b"\xff\x51")  # SIZ: marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz
    frame = (
        frame[: at + 6]
        + struct.pack(">II", declared, declared)
        + frame[at + 14 : at + 22]
        + struct.pack(">II", declared, declared)
        + frame[at + 30 :]
    )
    ds.PixelData = encapsulate([frame])
    return ds


def test_a_codestream_that_declares_more_pixels_than_allowed_is_never_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = jpeg2000_bomb()
    monkeypatch.setattr(
        Dataset, "pixel_array", property(lambda self: pytest.fail("the decoder was called"))
    )
    with pytest.raises(ImageError) as refused:
        dicom_to_image(bomb)
    assert refused.value.reason == ImageErrorReason.GEOMETRY and "16384" in str(refused.value)


def test_a_codestream_that_disagrees_with_rows_and_columns_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = jpeg2000_bomb(declared=2048)  # allowed in size, but not what the header says
    monkeypatch.setattr(
        Dataset, "pixel_array", property(lambda self: pytest.fail("the decoder was called"))
    )
    with pytest.raises(ImageError) as refused:
        dicom_to_image(bomb)
    assert refused.value.reason == ImageErrorReason.CORRUPT


def test_the_node_records_a_codestream_bomb_and_carries_on(node: Node, tmp_path: Path) -> None:
    bomb = jpeg2000_bomb()
    assert send_files(node.port, [write_raw(bomb, tmp_path / "bomb.dcm")]) == [StoreStatus.SUCCESS]
    (line,) = wait_for(
        lambda: [x for x in final_lines(node) if x["sop_instance_uid"] == bomb.SOPInstanceUID],
        60,
        "the bomb's outcome",
    )
    assert line["status"] == "skipped" and line["skip_reason"] == "geometry"


# --- connections -------------------------------------------------------------------------------------


def half_open(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(payload)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(30)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_half_open_connections_cannot_hold_the_association_slots(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(
        tmp_path,
        predictor,
        max_associations=4,
        max_associations_per_host=32,
        handshake_timeout_s=1.0,
    )
    a_associate_rq_half = (
        b"\x01\x00"
        + struct.pack(">I", 300)
        + b"\x00\x01\x00\x00"
        + b"DPNODE".ljust(16)
        + b"TESTSCU".ljust(16)
    )
    sockets = [half_open(node.port, b"\x01\x00\x00") for _ in range(8)] + [
        half_open(node.port, a_associate_rq_half) for _ in range(8)
    ]
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = 5

        def established() -> bool:
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DPNODE")
            if assoc.is_established:
                assoc.release()
                return True
            return False

        wait_for(established, 30, "a legitimate association despite 16 half-open connections")
        assert all(closed_by_peer(sock) for sock in sockets)
        # Ten a minute from one peer in full, the rest counted (tests/test_node_security.py: bursts).
        wait_for(
            lambda: (
                len([x for x in audit_lines(node) if x.get("reason") == "handshake-timeout"]) == 10
            ),
            10,
            "audit lines for the timeouts",
        )
        assert node.metrics.value("associations_aborted_total", reason="handshake-timeout") == 16
    finally:
        for sock in sockets:
            sock.close()
        node.stop()


def test_a_peer_that_announces_a_huge_pdu_cannot_make_the_node_hold_it(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(tmp_path, predictor, handshake_timeout_s=5.0)
    try:
        sock = half_open(node.port, b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0))
        chunk = b"\x00" * 2**16
        sent = 0
        try:
            while sent < 256 * 2**20:  # the node must hang up long before 256 MB
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 256 * 2**20
        assert wait_for(
            lambda: node.metrics.value("protocol_errors_total") >= 1,
            10,
            "the protocol error counted",
        )
    finally:
        sock.close()
        node.stop()


def malformed_streams(count: int, seed: int = 0) -> Iterator[bytes]:
    """Byte streams a broken or hostile peer sends: noise, wrong types, lying lengths, cut PDUs."""
    rng = random.Random(seed)
    valid_rq = (
        b"\x01\x00"
        + struct.pack(">I", 68)
        + b"\x00\x01\x00\x00"
        + b"DPNODE".ljust(16)
        + b"TESTSCU".ljust(16)
        + b"\x00" * 32
    )
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        elif kind == 1:
            yield bytes([rng.choice([0x08, 0x09, 0x7F, 0xFF])]) + bytes(
                rng.randrange(256) for _ in range(40)
            )
        elif kind == 2:
            body = bytearray(valid_rq)
            for _ in range(rng.randrange(1, 8)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            yield bytes(body)
        elif kind == 3:
            # P-DATA before any association
            yield b"\x04\x00" + struct.pack(">I", 12) + b"\x00\x00\x00\x08\x01\x03" + b"\xff" * 6
        else:
            yield b"\x01\x00" + struct.pack(">I", 20) + b"\x00\x01"  # cut short


class RootRecords(logging.Handler):
    """What a handler on the root logger receives: what the node's log file would hold."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_malformed_pdu_streams_leave_one_line_each_at_most_and_no_traceback(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    root = logging.getLogger()
    written, level = RootRecords(), root.level
    root.addHandler(written)
    root.setLevel(logging.DEBUG)
    node = start_node(tmp_path, predictor, handshake_timeout_s=1.0)
    try:
        for stream in malformed_streams(200):
            with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
                try:
                    sock.sendall(stream)
                    sock.shutdown(socket.SHUT_WR)
                    sock.recv(4096)
                except OSError:
                    pass
        ds = chest_dataset()
        wait_for(
            lambda: attempt(node.port).is_established,
            30,
            "a free association slot once the noise is cut",
        )
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        wait_for(
            lambda: processed(node, ds.SOPInstanceUID), 60, "a legitimate image after the noise"
        )
        loud = [r for r in written.records if r.levelno >= logging.WARNING]
        assert not [r for r in written.records if r.exc_info], "a traceback reached the log"
        assert len(loud) <= 50, f"{len(loud)} warning lines for 200 malformed streams"
        assert node.metrics.value("protocol_errors_total") >= 50
    finally:
        root.removeHandler(written)
        root.setLevel(level)
        node.stop()


# --- refusals are visible ---------------------------------------------------------------------------


def attempt(port: int, calling: str = "TESTSCU", called: str = "DPNODE", contexts=(Verification,)):
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title=called)


@pytest.mark.parametrize(
    ("calling", "called", "reason"),
    [("STRANGER", "DPNODE", "calling-ae"), ("TESTSCU", "SOMEONE", "called-ae")],
)
def test_a_rejected_association_gets_an_audit_line_and_a_count(
    node: Node, calling: str, called: str, reason: str
) -> None:
    assert attempt(node.port, calling, called).is_rejected
    (line,) = wait_for(
        lambda: association_lines(node, "rejected"), 10, "the rejection's audit line"
    )
    assert (
        line["reason"] == reason and line["calling_ae"] == calling and line["peer"] == "127.0.0.1"
    )
    assert node.metrics.value("associations_rejected_total", reason=reason) == 1


def test_the_association_limit_is_visible(tmp_path: Path, predictor: NodePredictor) -> None:
    node = start_node(tmp_path, predictor, max_associations=1)
    try:
        held = attempt(node.port)
        assert held.is_established
        assert attempt(node.port).is_rejected
        held.release()
        (line,) = wait_for(
            lambda: association_lines(node, "rejected"), 10, "the rejection's audit line"
        )
        assert (
            line["reason"] == "limit"
            and node.metrics.value("associations_rejected_total", reason="limit") == 1
        )
    finally:
        node.stop()


def test_one_host_cannot_take_every_connection(tmp_path: Path, predictor: NodePredictor) -> None:
    node = start_node(tmp_path, predictor, max_associations_per_host=2)
    held = [attempt(node.port) for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        assert not attempt(node.port).is_established
        (line,) = wait_for(
            lambda: association_lines(node, "rejected"), 10, "the rejection's audit line"
        )
        assert (
            line["reason"] == "per-host-limit"
            and node.metrics.value("associations_rejected_total", reason="per-host-limit") == 1
        )
    finally:
        for assoc in held:
            assoc.release()
        node.stop()


def test_a_peer_outside_the_allowed_networks_is_turned_away_and_recorded(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(tmp_path, predictor, allow_networks=("10.0.0.0/8",))
    try:
        assert not attempt(node.port).is_established
        (line,) = wait_for(
            lambda: association_lines(node, "rejected"), 10, "the rejection's audit line"
        )
        assert line["reason"] == "network" and line["peer"] == "127.0.0.1"
    finally:
        node.stop()


def test_refused_presentation_contexts_are_recorded(node: Node) -> None:
    assoc = attempt(node.port, contexts=(CTImageStorage, Verification))
    assert assoc.is_established
    assoc.release()
    (line,) = wait_for(
        lambda: association_lines(node, "contexts-refused"), 10, "the refused context's audit line"
    )
    assert line["contexts"] == ["CT Image Storage"] and line["calling_ae"] == "TESTSCU"
    assert node.metrics.value("contexts_refused_total") == 1


# --- what hospitals send -------------------------------------------------------------------------------


def test_deflated_data_sets_are_read(node: Node, tmp_path: Path) -> None:
    ds = chest_dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    assert send_files(node.port, [write_raw(ds, tmp_path / "deflated.dcm")]) == [
        StoreStatus.SUCCESS
    ]
    wait_for(lambda: processed(node, ds.SOPInstanceUID), 60, "the deflated image to be processed")
    # a real deflated Secondary Capture (not a chest: skipped, not refused)
    real = data_file("image_dfl.dcm")
    assert send_files(node.port, [real]) == [StoreStatus.SUCCESS]
    uid = dcmread(real, stop_before_pixels=True).SOPInstanceUID
    (line,) = wait_for(
        lambda: [x for x in final_lines(node) if x["sop_instance_uid"] == uid],
        60,
        "the real deflated file's outcome",
    )
    assert line["status"] == "skipped" and line["skip_reason"] == "modality"


def deflate_bomb(inflated_mb: int) -> bytes:
    """A Part 10 file in Deflated Explicit VR Little Endian, a few MB on the wire, whose
    data set inflates to ``inflated_mb`` MB (a pixel data element of zeros)."""
    import zlib
    from io import BytesIO

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = chest_dataset()
    del ds.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    size = inflated_mb * 2**20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = compressor.compress(
        body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", size)
    )
    zeros = b"\x00" * 2**20
    for _ in range(inflated_mb):
        stream += compressor.compress(zeros)
    stream += compressor.flush()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = BytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + stream


def test_a_deflate_bomb_is_refused_without_inflating_it(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(tmp_path, predictor, max_dataset_mb=64)
    try:
        bomb = tmp_path / "bomb.dcm"
        bomb.write_bytes(deflate_bomb(2048))
        assert bomb.stat().st_size < 4 * 2**20  # 2 GB once inflated
        assert send_files(node.port, [bomb])[0] != StoreStatus.SUCCESS
        assert node.metrics.value("refused_total", reason="too-large") == 1
        assert node.spool.count() == 0 and not list(node.spool.tmp.iterdir())
    finally:
        node.stop()


@pytest.mark.slow
def test_large_data_sets_arriving_at_once_do_not_sit_in_memory(
    tmp_path: Path, demo_bundle: Path
) -> None:
    """Four 100 MB data sets at once (a chest image with a large private element, as some
    modalities attach raw data): received in chunks to disk, read with large elements left
    there, the node's peak memory grows by far less than one of them."""
    import subprocess
    import sys
    import threading

    import yaml
    from helpers import run_tool
    from node_support import TEST_CALLERS, peak_rss_mb

    port = free_port_here()
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "host": "127.0.0.1",
                "bundle": str(demo_bundle),
                "spool": str(tmp_path / "spool"),
                "output_dir": str(tmp_path / "out"),
                "metrics_port": -1,
                "device": "cpu",
                "allow": list(TEST_CALLERS),
            }
        )
    )
    files = []
    for i in range(4):
        ds = chest_dataset(rows=1200, columns=1000, seed=i)
        ds.add_new(0x00091010, "LO", "DP LARGE PRIVATE")
        ds.add_new(0x00091001, "OB", bytes(100 * 2**20))
        files.append(write_raw(ds, tmp_path / f"large{i}.dcm"))
        del ds
    warm = write_raw(chest_dataset(rows=1200, columns=1000, seed=9), tmp_path / "warm.dcm")
    log = (tmp_path / "node.log").open("w")
    node = subprocess.Popen(
        [sys.executable, "-m", "pacs_node.cli", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: "listening" in (tmp_path / "node.log").read_text(), 120, "the node to start"
        )
        run_tool("storescu", "-aet", "TESTSCU", "-aec", "DPNODE", "127.0.0.1", port, warm)
        wait_for(
            lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 2,
            120,
            "the warm-up image's results",
        )
        before = peak_rss_mb(node.pid)
        senders = [
            threading.Thread(
                target=run_tool,
                args=("storescu", "-aet", "TESTSCU", "-aec", "DPNODE", "127.0.0.1", port, f),
            )
            for f in files
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(300)
        wait_for(
            lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 10,
            300,
            "the results of the four large data sets",
        )
        grown = peak_rss_mb(node.pid) - before
        assert grown < 100, (
            f"the node's peak memory grew by {grown:.0f} MB for four 100 MB data sets"
        )
    finally:
        node.terminate()
        node.wait(60)
        log.close()


def free_port_here() -> int:
    from node_support import free_port

    return free_port()


def test_a_deflate_stream_that_does_not_inflate_is_refused_as_unparseable(
    node: Node, tmp_path: Path
) -> None:
    ds = chest_dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    good = write_raw(ds, tmp_path / "deflated.dcm").read_bytes()
    truncated, scrambled = tmp_path / "truncated.dcm", tmp_path / "scrambled.dcm"
    truncated.write_bytes(good[: len(good) // 2])  # the stream stops short
    from pynetdicom.dsutils import split_dataset

    start = split_dataset(tmp_path / "deflated.dcm")[1] + 10  # the first block's code lengths
    scrambled.write_bytes(
        good[:start] + bytes(b ^ 0xFF for b in good[start : start + 64]) + good[start + 64 :]
    )
    assert send_files(node.port, [truncated, scrambled]) == [StoreStatus.CANNOT_UNDERSTAND] * 2
    assert node.metrics.value("refused_total", reason="unparseable") == 2
    assert node.spool.count() == 0 and not list(node.spool.tmp.iterdir())


def test_a_disk_that_fills_while_a_data_set_arrives_cuts_that_transfer_not_the_node(
    tmp_path: Path, predictor: NodePredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool's disk as a 24 MB one: what arrives uses it up. The transfer is cut before the
    disk is full (never acknowledged, so the sender keeps the image), and nothing is left behind."""
    node = start_node(tmp_path, predictor, min_free_mb=8)
    spool = node.spool
    monkeypatch.setattr(
        spool,
        "free_bytes",
        lambda: 24 * 2**20 - sum(p.stat().st_size for p in spool.tmp.iterdir() if p.is_file()),
    )
    try:
        _cut_while_arriving(node, tmp_path)
    finally:
        node.stop()


def _cut_while_arriving(node: Node, tmp_path: Path) -> None:
    spool = node.spool
    big = chest_dataset(rows=4096, columns=4096)  # 32 MB of pixels
    assert send_files(node.port, [write_raw(big, tmp_path / "big.dcm")]) != [StoreStatus.SUCCESS]
    assert node.metrics.value("associations_aborted_total", reason="disk-full") == 1
    wait_for(lambda: not list(spool.tmp.iterdir()), 10, "the partial file to be removed")
    assert spool.count() == 0 and not [
        x for x in final_lines(node) if x["sop_instance_uid"] == big.SOPInstanceUID
    ]
    small = chest_dataset(seed=5)
    assert send(node.port, [small]) == [StoreStatus.SUCCESS]
    wait_for(lambda: processed(node, small.SOPInstanceUID), 60, "the next image")
