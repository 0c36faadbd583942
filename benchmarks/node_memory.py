"""Memory of the node: large data sets at once, every decode path at the decode budget's edge,
and a batch of the largest legitimate images.

    python benchmarks/node_memory.py --bundle runs/demo/bundle                 # 16 x 200 MB, ...
    python benchmarks/node_memory.py --bundle runs/demo/bundle --senders 4 --mb 100

Runs ``dp-node`` as a process, its peak resident memory (VmHWM) reset before each phase
(``/proc/PID/clear_refs``) and read when the phase's results are written:

* large: ``--senders`` data sets of ``--mb`` MB each at the same time, one dcmtk ``storescu``
  per data set: a frontal chest CR of 320 x 288 pixels with a private element of the given
  size (modalities attach raw data so). Data sets arrive in chunks on disk and large
  elements stay there while the worker reads the image, so the node's memory should not
  grow with the size or the number of data sets; the time until every result is written
  and the receive rate in MB/s are reported too.
* decode: one chest image of ``--side`` x ``--side`` pixels (8192: 64 Mpx, the edge of the
  decode budget; 16 bits allocated, 12 stored) per decode path, sent alone in its own
  transfer syntax: native (explicit little endian), deflated, RLE, JPEG lossless (process
  14, selection value 1) and JPEG-LS lossless, JPEG 2000 lossless, and JPEG baseline (8 bits).
* batch: ``--batch`` such native images sent at once, ``--senders`` at a time, so that
  the worker takes them in as few batches as ``batch_size`` and ``batch_memory_mb`` allow.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from node_latency import free_port, listening, peak_rss_mb, wait
from node_netfuzz import chest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

#: Decode paths: name, how the file is made from the native 16-bit one (a pydicom encoding
#: plugin, or a dcmtk tool and its options).
DECODE_PATHS = (
    ("native", None),
    ("deflate", ("dcmconv", "+td")),
    ("rle", (RLELossless, "pylibjpeg")),
    ("jpeg-lossless", ("dcmcjpeg", "+e1")),
    ("jpeg-ls", (JPEGLSLossless, "pyjpegls")),
    ("jpeg2000", (JPEG2000Lossless, "pylibjpeg")),
    ("jpeg-baseline", ("dcmcjpeg", "+eb")),
)


def large_file(path: Path, seed: int, size_mb: int) -> Path:
    ds = chest(seed)
    ds.add_new(0x00091010, "LO", "DP LARGE PRIVATE")
    ds.add_new(0x00091001, "OB", bytes(size_mb * 2**20))
    ds.save_as(path, enforce_file_format=True)
    return path


def large_image(path: Path, seed: int, side: int, bits: int = 12) -> Path:
    """A ``side`` x ``side`` chest CR (lungs dark, mediastinum bright, noise), native, a new instance."""
    ds = chest(seed)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rng = np.random.default_rng(seed)
    xx, yy = np.arange(side)[None, :], np.arange(side)[:, None]
    lungs = (
        (np.abs(xx - side / 2) > side * 0.08)
        & (np.abs(xx - side / 2) < side * 0.4)
        & (yy > side * 0.15)
        & (yy < side * 0.8)
    )
    top = 2**bits - 1
    pixels = np.where(lungs, np.float32(top * 0.22), np.float32(top * 0.68)) + rng.standard_normal(
        (side, side), dtype=np.float32
    ) * (top / 200)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8, 8, 7) if bits == 8 else (16, bits, bits - 1)
    ds.PixelData = np.clip(pixels, 0, top).astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    del pixels
    ds.save_as(path, enforce_file_format=True)
    return path


def encoded(native: Path, name: str, how: tuple | None, folder: Path, seed: int, side: int) -> Path:
    """The native image in the transfer syntax of one decode path (a new instance)."""
    path = folder / f"{name}.dcm"
    if how is None:
        return shutil.copy(native, path)
    if how[0] in ("dcmconv", "dcmcjpeg"):
        source = (
            large_image(folder / f"{name}-source.dcm", seed, side, bits=8)
            if how[1] == "+eb"
            else native
        )
        subprocess.run([how[0], how[1], str(source), str(path)], check=True, capture_output=True)
    else:
        ds = dcmread(native)
        ds.compress(how[0], encoding_plugin=how[1])
        ds.save_as(path, enforce_file_format=True)
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def send_file(port: int, path: Path) -> None:
    """C-STORE one file in its own transfer syntax, read from disk in chunks (pynetdicom)."""
    from pynetdicom import AE, _config

    meta = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", port, ae_title="DPNODE")
    if not assoc.is_established:
        raise SystemExit(f"node_memory: the node refused an association for {path.name}")
    status = assoc.send_c_store(path)
    assoc.release()
    if not status or status.Status != 0:
        raise SystemExit(f"node_memory: the node did not store {path.name} ({status})")


class Node:
    """``dp-node`` as a process, with its results folder and its peak memory."""

    def __init__(self, work: Path, bundle: Path, senders: int, mb: int) -> None:
        self.work, self.port, self.out = work, free_port(), work / "out"
        config = work / "node.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "port": self.port,
                    "host": "127.0.0.1",
                    "bundle": str(bundle),
                    "spool": str(work / "spool"),
                    "output_dir": str(self.out),
                    "metrics_port": -1,
                    "device": "cpu",
                    "allow": ["STORESCU"],
                    "max_associations": senders + 2,
                    "max_associations_per_host": senders + 2,
                    "max_dataset_mb": mb + 64,
                }
            )
        )
        self.log = (work / "node.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pacs_node.cli", "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait(lambda: listening(self.port), 180, "the node")

    def results(self) -> int:
        return len(list(self.out.rglob("*.dcm")))

    def wait_results(self, count: int, timeout: float = 1800) -> None:
        wait(lambda: self.results() >= count, timeout, f"{count} results", 0.2)

    def reset_peak(self) -> float:
        """Reset VmHWM to the current resident memory; that memory, in MiB."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return peak_rss_mb(self.process.pid)

    def peak(self) -> float:
        return peak_rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)
        self.log.close()


def phase_large(node: Node, work: Path, senders: int, mb: int) -> dict:
    files = [large_file(work / f"large{i:02d}.dcm", 5000 + i, mb) for i in range(senders)]
    before, results = node.reset_peak(), node.results()
    started = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(
            pool.map(
                lambda f: subprocess.run(
                    ["storescu", "-aec", "DPNODE", "127.0.0.1", str(node.port), str(f)],
                    check=True,
                    capture_output=True,
                ),
                files,
            )
        )
    received = time.perf_counter() - started
    node.wait_results(results + 2 * senders)
    total = time.perf_counter() - started
    after = node.peak()
    for f in files:
        f.unlink()
    print(
        f"large: {senders} concurrent associations, one {mb} MB data set each ({senders * mb / 1024:.1f} GB)"
    )
    print(
        f"  peak resident memory: {before:.0f} MB before, {after:.0f} MB during (+{after - before:.0f} MB)"
    )
    print(
        f"  all acknowledged in {received:.1f} s ({senders * mb / received:.1f} MB/s), all results in {total:.1f} s"
    )
    return {
        "senders": senders,
        "data_set_mb": mb,
        "peak_rss_before_mb": round(before, 1),
        "peak_rss_after_mb": round(after, 1),
        "peak_rss_growth_mb": round(after - before, 1),
        "seconds_until_all_acknowledged": round(received, 1),
        "seconds_until_all_results": round(total, 1),
        "receive_mb_per_s": round(senders * mb / received, 1),
    }


def phase_decode(node: Node, work: Path, side: int) -> dict:
    folder = work / "decode"
    folder.mkdir()
    native = large_image(folder / "native-source.dcm", 6000, side)
    figures = {}
    print(
        f"decode paths: one {side} x {side} image each ({side * side / 2**20:.0f} Mpx), sent alone"
    )
    for index, (name, how) in enumerate(DECODE_PATHS):
        path = encoded(native, name, how, folder, 6001 + index, side)
        before, results = node.reset_peak(), node.results()
        started = time.perf_counter()
        send_file(node.port, path)
        node.wait_results(results + 2)
        peak = node.peak()
        figures[name] = {
            "file_mb": round(path.stat().st_size / 2**20, 1),
            "peak_rss_mb": round(peak, 1),
            "peak_rss_growth_mb": round(peak - before, 1),
            "seconds_until_results": round(time.perf_counter() - started, 1),
        }
        print(
            f"  {name:14s} {figures[name]['file_mb']:7.1f} MB file: peak {peak:6.0f} MB (+{peak - before:4.0f} MB), results in {figures[name]['seconds_until_results']:.1f} s"
        )
        path.unlink()
    shutil.rmtree(folder)
    return figures


def phase_batch(node: Node, work: Path, side: int, count: int, senders: int) -> dict:
    folder = work / "batch"
    folder.mkdir()
    files = [large_image(folder / f"image{i:02d}.dcm", 7000 + i, side) for i in range(count)]
    before, results = node.reset_peak(), node.results()
    started = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(lambda f: send_file(node.port, f), files))
    node.wait_results(results + 2 * count)
    peak = node.peak()
    seconds = time.perf_counter() - started
    shutil.rmtree(folder)
    print(f"batch: {count} native {side} x {side} images sent at once ({senders} at a time)")
    print(
        f"  peak resident memory {peak:.0f} MB (+{peak - before:.0f} MB), all results in {seconds:.1f} s"
    )
    return {
        "images": count,
        "side": side,
        "peak_rss_mb": round(peak, 1),
        "peak_rss_growth_mb": round(peak - before, 1),
        "seconds_until_all_results": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument(
        "--side",
        type=int,
        default=8192,
        help="side of the decode and batch phases' images (8192: the decode budget's edge)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=8,
        help="images of the batch phase (the node's default batch_size)",
    )
    parser.add_argument("--phases", default="large,decode,batch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if shutil.which("storescu") is None or shutil.which("dcmcjpeg") is None:
        raise SystemExit(
            "node_memory: storescu / dcmcjpeg not found (Debian package dcmtk; make system-deps)"
        )
    work = Path(tempfile.mkdtemp(prefix="dp-node-memory-"))
    node = Node(work, args.bundle, args.senders, max(args.mb, 2 * args.side**2 // 2**20))
    figures: dict = {}
    try:
        send_file(node.port, large_file(work / "warm.dcm", 4999, 1))
        node.wait_results(2, 120)
        figures["idle_rss_mb"] = round(node.reset_peak(), 1)
        print(f"node resident memory after one image: {figures['idle_rss_mb']:.0f} MB")
        phases = args.phases.split(",")
        if "large" in phases:
            figures |= phase_large(node, work, args.senders, args.mb)
        if "decode" in phases:
            figures["decode_paths"] = phase_decode(node, work, args.side)
        if "batch" in phases:
            figures["batch"] = phase_batch(node, work, args.side, args.batch, args.senders)
    finally:
        node.stop()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
