"""Memory of the node under many large data sets at once.

    python benchmarks/node_memory.py --bundle runs/demo/bundle                 # 16 x 200 MB
    python benchmarks/node_memory.py --bundle runs/demo/bundle --senders 4 --mb 100

Runs ``dp-node`` as a process and sends it ``--senders`` data sets of ``--mb`` MB each at
the same time, one dcmtk ``storescu`` per data set: a frontal chest CR of 1200 x 1000 pixels
with a private element of the given size (modalities attach raw data so). Data sets arrive
in chunks on disk and large elements stay there while the worker reads the image, so the
node's memory should not grow with the size or the number of data sets. It prints the
node's peak resident memory before and after, the time until every result is written, and
the throughput in MB/s.
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

import yaml
from node_latency import free_port, listening, peak_rss_mb, wait
from node_netfuzz import chest


def large_file(path: Path, seed: int, size_mb: int) -> Path:
    ds = chest(seed)
    ds.add_new(0x00091010, "LO", "DP LARGE PRIVATE")
    ds.add_new(0x00091001, "OB", bytes(size_mb * 2**20))
    ds.save_as(path, enforce_file_format=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("node_memory: storescu not found (Debian package dcmtk; make system-deps)")
    work = Path(tempfile.mkdtemp(prefix="dp-node-memory-"))
    port = free_port()
    config = work / "node.yaml"
    config.write_text(yaml.safe_dump({
        "port": port, "host": "127.0.0.1", "bundle": str(args.bundle), "spool": str(work / "spool"), "output_dir": str(work / "out"),
        "metrics_port": -1, "device": "cpu", "allow": ["STORESCU"], "max_associations": args.senders + 2,
        "max_associations_per_host": args.senders + 2, "max_dataset_mb": args.mb + 64,
    }))  # fmt: skip
    files = [large_file(work / f"large{i:02d}.dcm", 5000 + i, args.mb) for i in range(args.senders)]
    warm = large_file(work / "warm.dcm", 4999, 1)
    log = (work / "node.log").open("w")
    node = subprocess.Popen([sys.executable, "-m", "pacs_node.cli", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: listening(port), 180, "the node")
        subprocess.run(["storescu", "-aec", "DPNODE", "127.0.0.1", str(port), str(warm)], check=True, capture_output=True)
        wait(lambda: len(list((work / "out").rglob("*.dcm"))) == 2, 120, "the warm-up results")
        before = peak_rss_mb(node.pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.senders) as pool:
            list(pool.map(lambda f: subprocess.run(["storescu", "-aec", "DPNODE", "127.0.0.1", str(port), str(f)], check=True, capture_output=True), files))
        received = time.perf_counter() - started
        wait(lambda: len(list((work / "out").rglob("*.dcm"))) == 2 * (args.senders + 1), 1800, "every result", 0.2)
        total = time.perf_counter() - started
        after = peak_rss_mb(node.pid)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(120)
        log.close()
    figures = {
        "senders": args.senders, "data_set_mb": args.mb, "peak_rss_before_mb": round(before, 1), "peak_rss_after_mb": round(after, 1),
        "peak_rss_growth_mb": round(after - before, 1), "seconds_until_all_acknowledged": round(received, 1),
        "seconds_until_all_results": round(total, 1), "receive_mb_per_s": round(args.senders * args.mb / received, 1),
    }  # fmt: skip
    print(f"node memory: {args.senders} concurrent associations, one {args.mb} MB data set each ({args.senders * args.mb / 1024:.1f} GB)")
    print(f"  peak resident memory: {before:.0f} MB before, {after:.0f} MB after (+{after - before:.0f} MB)")
    print(f"  all acknowledged in {received:.1f} s ({figures['receive_mb_per_s']} MB/s), all results in {total:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
