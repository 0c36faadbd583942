"""The outbox after a burst: does delivery keep pace with the worker over thousands of images?

    python benchmarks/node_burst.py --bundle runs/demo/bundle --images 2000   # or: make benchmark-burst

Runs ``dp-node`` as a process (as ``node_latency.py`` does) whose destination is dcmtk's
``storescp --ignore`` (it takes every object and writes none: 2,000 overlays would fill
24 GB), and sends it ``--images`` copies of the real ``RG1_UNCR.dcm`` from 4 concurrent
``storescu``, as fast as they go. It samples, once a second, how many images were processed
and how many results wait in the outbox, and prints: the burst's processing rate, the
largest backlog, and how long after the last image was processed the outbox was empty
(target: within 10 s of the last image processed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.data import get_testdata_file

from pacs_node.config import ENGINES

sys.path.insert(0, str(Path(__file__).parent))
from node_latency import (  # a sibling script
    copies,
    free_port,
    listening,
    node_config,
    peak_rss_mb,
    processed,
    storescp,
    storescu,
    wait,
)


def waiting(outbox: Path) -> int:
    """Results in the outbox, every destination (entries, not their sidecars or the ledger)."""
    return sum(1 for _ in outbox.glob("*/*.dcm"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument(
        "--associations", type=int, default=1, help="the node's outbox.associations"
    )
    parser.add_argument("--engine", default="auto", choices=ENGINES)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-node-burst-"))
    dest_port, node_port = free_port(), free_port()
    destination = storescp(work / "destination", dest_port, fork=args.associations > 1, keep=False)
    config = node_config(
        work, node_port, dest_port, args.bundle, "cpu", args.engine, args.associations
    )
    print(f"writing {args.images} copies of RG1_UNCR.dcm ...", flush=True)
    batch = copies(Path(get_testdata_file("RG1_UNCR.dcm")), work / "burst", args.images)
    log = (work / "node.log").open("w")
    node = subprocess.Popen(
        [sys.executable, "-m", "pacs_node.cli", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    audit, outbox = work / "spool" / "audit.jsonl", work / "outbox"
    samples: list[tuple[float, int, int]] = []
    try:
        wait(lambda: listening(node_port), 120, "the node")
        start = time.perf_counter()
        with ThreadPoolExecutor(5) as pool:
            sending = [pool.submit(storescu, node_port, batch[i::4], "DPNODE") for i in range(4)]
            while not (all(s.done() for s in sending) and processed(audit) >= len(batch)):
                samples.append((time.perf_counter() - start, processed(audit), waiting(outbox)))
                time.sleep(1.0)
            for s in sending:
                s.result()
        last_processed = time.perf_counter() - start
        wait(lambda: waiting(outbox) == 0, 3600, "an empty outbox", 0.05)
        emptied = time.perf_counter() - start
        figures = {
            "images": len(batch),
            "associations": args.associations,
            "images_per_s_processed": len(batch) / last_processed,
            "largest_backlog": max(s[2] for s in samples),
            "backlog_at_last_processed": samples[-1][2],
            "outbox_empty_after_last_processed_s": emptied - last_processed,
            "node_peak_rss_mb": peak_rss_mb(node.pid),
            "samples": samples,
        }
    finally:
        node.terminate()
        node.wait(60)
        destination.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"burst of {figures['images']} RG1 images from 4 storescu, outbox.associations "
        f"{figures['associations']}: processed at {figures['images_per_s_processed']:.2f} images/s; "
        f"largest outbox backlog {figures['largest_backlog']} results; the outbox empty "
        f"{figures['outbox_empty_after_last_processed_s']:.1f} s after the last image was processed "
        f"(target <= 10 s); node peak RSS {figures['node_peak_rss_mb']:.0f} MB"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
