"""What the node spends sending one overlay-sized object over C-STORE: its PDUs handed to the
association's DUL thread in bundles (:mod:`pacs_node.dimse_reactor`) or one by one (pynetdicom).

    python benchmarks/cstore_send.py                      # 20 objects, 3 rounds each way
    python benchmarks/cstore_send.py --json docs/results/cstore_send.json

An RGB Secondary Capture the size of the overlay of ``RG1_UNCR.dcm`` (1841 x 2147, 11.9 MB of
pixels), sent as the node's outbox sends (``CStoreTransport``: its file's own bytes, the node's
association loops and sockets) over one association to dcmtk's ``storescp`` on loopback, which
announces its default 16 kB PDUs (740 PDUs per object) and stores every object. Both ways take
turns in one process; every stored object is read back and compared with what was sent. CPU
is this process's (both of the association's threads), per object; wall is per C-STORE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import fsm
from pynetdicom.dimse import DIMSEServiceProvider

from pacs_node import dimse_reactor, logs
from pacs_node.config import Destination
from pacs_node.delivery.cstore import CStoreTransport

ROWS, COLUMNS = 2147, 1841


def overlay_sized(folder: Path, count: int) -> list[Path]:
    pixels = np.random.default_rng(0).integers(0, 255, (ROWS, COLUMNS, 3), np.uint8).tobytes()
    files = []
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID, ds.Modality = "BENCH", "OT"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = ROWS, COLUMNS, 3
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = pixels
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bundled(on: bool) -> None:
    """The node's bundling of PDUs on or off; the node's loops and sockets either way."""
    originals = dimse_reactor._originals
    send_msg = dimse_reactor._send_msg if on else originals[DIMSEServiceProvider, "send_msg"]
    DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
    for name, entry in dimse_reactor._ACTIONS.items():
        fsm.ACTIONS[name] = entry if on else originals[dict, name]


def key(ds: Dataset) -> tuple[str, str]:
    return str(ds.SOPInstanceUID), hashlib.sha256(ds.PixelData).hexdigest()


def one_round(files: list[Path], folder: Path) -> tuple[float, float]:
    """CPU and wall ms per object of sending ``files`` on one association to a new storescp."""
    stored = folder / f"stored-{time.monotonic_ns()}"
    stored.mkdir()
    port = free_port()
    scp = subprocess.Popen(["storescp", "-od", str(stored), str(port)], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        transport = CStoreTransport(
            Destination.parse(f"STORESCP@127.0.0.1:{port}"), "DPNODE", None, 60
        )
        link = transport.open(False)
        cpu, wall = time.process_time(), time.perf_counter()
        outcomes = link.send(files, lambda group: None)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        link.close()
    finally:
        scp.terminate()
        scp.wait()
    assert all(o.status.value == "stored" for o in outcomes.values()), outcomes
    sent = sorted(key(dcmread(p)) for p in files)
    assert sorted(key(dcmread(p)) for p in stored.iterdir()) == sent, "stored objects differ"
    for path in stored.iterdir():
        path.unlink()
    return 1000 * cpu / len(files), 1000 * wall / len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logs.install()
    if not dimse_reactor.install():
        print("pynetdicom is not 3.0.x: the node sends PDU by PDU", file=sys.stderr)
        return 1
    figures: dict[str, dict[str, list[float]]] = {
        way: {"cpu_ms": [], "wall_ms": []} for way in ("bundled", "one_by_one")
    }
    with tempfile.TemporaryDirectory() as folder:
        files = overlay_sized(Path(folder), args.objects)
        one_round(files[:2], Path(folder))  # warm up
        for _ in range(args.rounds):
            for way in ("one_by_one", "bundled"):
                bundled(way == "bundled")
                cpu, wall = one_round(files, Path(folder))
                figures[way]["cpu_ms"].append(round(cpu, 1))
                figures[way]["wall_ms"].append(round(wall, 1))
    bundled(True)
    print(
        f"C-STORE of an overlay-sized object ({ROWS} x {COLUMNS} RGB, 740 PDUs of 16 kB) to "
        f"storescp on loopback, {args.objects} per round, {args.rounds} rounds each way"
    )
    for way, found in figures.items():
        print(
            f"  {way:10s} CPU {statistics.median(found['cpu_ms']):5.1f} ms per object "
            f"(rounds {found['cpu_ms']}), wall {statistics.median(found['wall_ms']):5.1f} ms "
            f"(rounds {found['wall_ms']})"
        )
    if args.json:
        args.json.write_text(json.dumps({"objects": args.objects, **figures}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
