"""Network fuzzer: mutated PDU streams against a running node, with legitimate stores between.

    python benchmarks/node_netfuzz.py --bundle runs/demo/bundle                 # 20,000 streams
    python benchmarks/node_netfuzz.py --bundle runs/demo/bundle --streams 2000 --seconds 120

Runs ``dp-node`` as a process and records, through a relay, the bytes a real pynetdicom
peer sends it: an A-ASSOCIATE-RQ, a C-ECHO, a C-STORE of a chest radiograph, an
A-RELEASE-RQ. These PDUs are the seeds. Each fuzzed connection sends a seed sequence with
1 to 4 mutations (bit flips, bytes inserted or deleted, a lying length, a PDU cut short,
repeated, dropped or of another type, random noise, a huge announced length), then closes
its side and reads what the node answers. Every ``--legit-every`` streams a legitimate
image is sent with pynetdicom and must get its SR and SC. It prints:

* streams sent, streams per second, wall time;
* node crashes (the process ended) and restarts needed: target 0;
* legitimate stores acknowledged, and with results: target all;
* protocol errors the node counted, log lines and bytes written, tracebacks in the log
  (target 0), peak resident memory of the node.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from node_latency import free_port, peak_rss_mb, wait
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

CALLING = "FUZZER"


def chest(seed: int) -> Dataset:
    """A small frontal chest CR (the node's tests' phantom); the same instance, UIDs included, for the same seed."""
    rng = np.random.default_rng(seed)
    rows, columns = 320, 288
    yy, xx = np.mgrid[0:rows, 0:columns]
    lungs = (
        (np.abs(xx - columns / 2) > columns * 0.08)
        & (np.abs(xx - columns / 2) < columns * 0.4)
        & (yy > rows * 0.15)
        & (yy < rows * 0.8)
    )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[f"dp-bench {seed} instance"]
    )
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"dp-bench {seed} study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"dp-bench {seed} series"])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Fuzz^Peer",
        "FUZZ1",
        "19600101",
        "O",
    )
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = (
        "20261201",
        "120000",
        "A1",
        "1",
        "",
    )
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.Manufacturer = (
        "CR",
        "CHEST",
        "PA",
        "Bench",
    )
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = (
        rows,
        columns,
        1,
        "MONOCHROME2",
    )
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (
        np.clip(np.where(lungs, 900, 2800) + rng.normal(0, 60, (rows, columns)), 0, 4095)
        .astype(np.uint16)
        .tobytes()
    )
    return ds


def legitimate_store(port: int, ds: Dataset) -> bool:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for _ in range(60):  # the node may be busy cutting fuzzed connections: retry for a while
        assoc = ae.associate("127.0.0.1", port, ae_title="DPNODE")
        if assoc.is_established:
            status = assoc.send_c_store(ds)
            assoc.release()
            if status and int(status.Status) == 0:
                return True
        time.sleep(0.5)
    return False


# --- seeds: the PDUs a real peer sends, recorded through a relay --------------------------------------


def record_seeds(node_port: int) -> list[bytes]:
    """The client-to-node PDUs of one real association (echo, store, release)."""
    relay = socket.socket()
    relay.bind(("127.0.0.1", 0))
    relay.listen(1)
    captured = bytearray()

    def pump() -> None:
        client, _ = relay.accept()
        upstream = socket.create_connection(("127.0.0.1", node_port))

        def back() -> None:
            while data := upstream.recv(65536):
                client.sendall(data)
            client.close()

        threading.Thread(target=back, daemon=True).start()
        while data := client.recv(65536):
            captured.extend(data)
            upstream.sendall(data)
        upstream.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", relay.getsockname()[1], ae_title="DPNODE")
    assert assoc.is_established, "the seed association failed"
    assoc.send_c_echo()
    assoc.send_c_store(chest(0))
    assoc.release()
    thread.join(30)
    relay.close()
    return split_pdus(bytes(captured))


def split_pdus(stream: bytes) -> list[bytes]:
    pdus, at = [], 0
    while at + 6 <= len(stream):
        (length,) = struct.unpack(">I", stream[at + 2 : at + 6])
        pdus.append(stream[at : at + 6 + length])
        at += 6 + length
    return pdus


# --- mutations ------------------------------------------------------------------------------------------


def flip(pdu: bytes, rng: random.Random) -> bytes:
    data = bytearray(pdu)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


def insert(pdu: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(pdu) + 1)
    return pdu[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + pdu[at:]


def delete(pdu: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(pdu))
    return pdu[:at] + pdu[at + rng.randint(1, 64) :]


def lying_length(pdu: bytes, rng: random.Random) -> bytes:
    length = rng.choice([0, 1, len(pdu) - 7, len(pdu) + 10, 2**16, 2**31, 0xFFFFFFFF])
    return pdu[:2] + struct.pack(">I", max(0, length) & 0xFFFFFFFF) + pdu[6:]


def cut(pdu: bytes, rng: random.Random) -> bytes:
    return pdu[: rng.randrange(1, len(pdu))]


def retype(pdu: bytes, rng: random.Random) -> bytes:
    return (
        bytes([rng.choice([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x00, 0x08, 0xFF])]) + pdu[1:]
    )


def inner_item(pdu: bytes, rng: random.Random) -> bytes:
    """A variable item's own length or type changed (presentation contexts, user information)."""
    if len(pdu) < 80:
        return flip(pdu, rng)
    at = rng.randrange(74, len(pdu) - 4)
    data = bytearray(pdu)
    data[at : at + 4] = bytes(
        [rng.choice([0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x55, 0x58, 0x00]), 0]
    ) + struct.pack(">H", rng.choice([0, 1, 0xFFFF, rng.randrange(4096)]))
    return bytes(data)


PDU_MUTATIONS = (flip, insert, delete, lying_length, cut, retype, inner_item)


def mutated_stream(seeds: list[bytes], rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 512)))  # noise
    pdus = list(seeds)
    if kind < 0.15:
        rng.shuffle(pdus)
    elif kind < 0.25:
        pdus = pdus[: rng.randint(1, len(pdus))] * rng.randint(1, 3)
    elif kind < 0.30:
        del pdus[rng.randrange(len(pdus))]
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(pdus))
        pdus[at] = rng.choice(PDU_MUTATIONS)(pdus[at], rng) or b"\x00"
    return b"".join(pdus)


def fuzz_one(port: int, stream: bytes) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1)
            while sock.recv(65536):
                pass
    except OSError:
        pass  # refused, reset, timed out: what a hostile peer gets


# --- the run ---------------------------------------------------------------------------------------------


def node_config(work: Path, port: int, metrics_port: int, bundle: Path) -> Path:
    config = work / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "host": "127.0.0.1",
                "bundle": str(bundle),
                "spool": str(work / "spool"),
                "output_dir": str(work / "out"),
                "metrics_port": metrics_port,
                "device": "cpu",
                "allow": [CALLING],
                "handshake_timeout_s": 2.0,
                "keep_skipped": False,
            }
        )
    )
    return config


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--streams", type=int, default=20000)
    parser.add_argument(
        "--seconds", type=float, default=1800, help="stop sending fuzzed streams after this long"
    )
    parser.add_argument("--legit-every", type=int, default=500)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-node-netfuzz-"))
    port, metrics_port = free_port(), free_port()
    log_path = work / "node.log"
    log = log_path.open("w")
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacs_node.cli",
            "--config",
            str(node_config(work, port, metrics_port, args.bundle)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rng = random.Random(args.seed)
    legit: list[str] = []
    sent = 0
    try:
        wait(lambda: "listening" in log_path.read_text(), 120, "the node to start")
        seeds = record_seeds(port)
        started = time.monotonic()
        with ThreadPoolExecutor(args.workers) as pool:
            while (
                sent < args.streams
                and time.monotonic() - started < args.seconds
                and node.poll() is None
            ):
                batch = min(args.legit_every, args.streams - sent)
                list(
                    pool.map(
                        lambda stream: fuzz_one(port, stream),
                        [mutated_stream(seeds, rng) for _ in range(batch)],
                    )
                )
                sent += batch
                ds = chest(1000 + len(legit))
                if legitimate_store(port, ds):
                    legit.append(str(ds.StudyInstanceUID))
                print(
                    f"  {sent} streams, {len(legit)} legitimate images acknowledged, {time.monotonic() - started:.0f} s",
                    flush=True,
                )
        fuzz_seconds = time.monotonic() - started
        crashed = node.poll() is not None

        def complete() -> list[str]:
            return [
                study for study in legit if len(list((work / "out" / study).glob("*.dcm"))) == 2
            ]

        deadline = time.monotonic() + 600
        while not crashed and len(complete()) < len(legit) and time.monotonic() < deadline:
            time.sleep(0.5)
        with_results = len(complete())
        errors = 0.0 if crashed else metric(metrics_port, "dp_node_protocol_errors_total")
        aborted = 0.0 if crashed else metric(metrics_port, "dp_node_associations_aborted_total")
        rss = float("nan") if crashed else peak_rss_mb(node.pid)
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
        log.close()
    text = log_path.read_text(errors="replace")
    figures = {
        "streams": sent,
        "seconds": round(fuzz_seconds, 1),
        "streams_per_s": round(sent / fuzz_seconds, 1),
        "node_crashed": crashed,
        "node_exit_code": node.returncode,
        "legitimate_acknowledged": len(legit),
        "legitimate_with_results": with_results,
        "protocol_errors_counted": errors,
        "connections_cut": aborted,
        "log_lines": text.count("\n"),
        "log_bytes": len(text.encode()),
        "tracebacks_in_log": text.count("Traceback"),
        "peak_rss_mb": round(rss, 1),
    }
    print(
        f"network fuzzer: {sent} mutated PDU streams in {fuzz_seconds:.0f} s ({figures['streams_per_s']}/s), {args.workers} concurrent peers, {os.cpu_count()} CPUs"
    )
    print(
        f"  node crashed: {'YES' if crashed else 'no'}; legitimate images: {len(legit)} acknowledged, {with_results} with their SR and SC"
    )
    print(
        f"  protocol errors counted {errors:.0f}, connections cut {aborted:.0f}; log {figures['log_lines']} lines, {figures['log_bytes'] / 1024:.0f} kB, {figures['tracebacks_in_log']} tracebacks"
    )
    print(f"  node peak resident memory {rss:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    ok = not crashed and with_results == len(legit) > 0 and figures["tracebacks_in_log"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
