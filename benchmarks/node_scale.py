"""Images per second against the number of node processes in the scale-out mode.

    python benchmarks/node_scale.py --bundle runs/demo/bundle --workers 1 2 3   # or: make benchmark-scale
    python benchmarks/node_scale.py --workers 1 2 4 8 --images 800            # a 16-core machine

For each count of workers, in one run: a throwaway PostgreSQL cluster (Debian's ``postgresql``,
on a Unix socket, ``fsync`` on), that many ``dp-node`` processes in the scale-out mode over it,
and dcmtk's ``storescp --fork --ignore`` as the destination (it takes every object and writes
none). Four ``storescu`` send ``--images`` copies of the real ``RG1_UNCR.dcm``, each sender to
one node in turn (what a balancer in front of the nodes does). The figure is images per second
from the first image sent until every image's SR and SC are delivered (the nodes' audit
trails), with the speed-up over one worker, and, first, the single node of the embedded default
(its own spool, no database) as the baseline, measured in the same run.
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

import yaml
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from node_latency import (  # a sibling script
    copies,
    free_port,
    listening,
    machine_cpu_s,
    peak_rss_mb,
    storescp,
    storescu,
    wait,
)
from postgres_support import postgres  # the tests' throwaway cluster

SENDERS = 4


def delivered(audits: list[Path]) -> int:
    """Results delivered, summed over the nodes' audit trails."""
    total = 0
    for audit in audits:
        try:
            total += audit.read_text().count('"status":"delivered"')
        except OSError:
            continue
    return total


def start_nodes(work: Path, count: int, dsn: str, dest_port: int, bundle: Path) -> list[tuple]:
    """``count`` node processes (0: one node of the embedded default, without the database)."""
    nodes = []
    for index in range(max(count, 1)):
        folder, port = work / f"node-{index + 1}", free_port()
        folder.mkdir(parents=True)
        settings = {
            "port": port,
            "bundle": str(bundle),
            "spool": str(folder / "spool"),
            "metrics_port": -1,
            "device": "cpu",
            "destinations": [f"RESULTS@127.0.0.1:{dest_port}"],
        }
        if count:
            settings["scale"] = {"database": dsn, "node_name": f"node-{index + 1}"}
        (folder / "node.yaml").write_text(yaml.safe_dump(settings))
        log = (folder / "node.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "pacs_node.cli", "--config", str(folder / "node.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        nodes.append((process, port, folder / "spool" / "audit.jsonl", log))
    for _process, port, _audit, _log in nodes:
        wait(lambda p=port: listening(p), 120, "a node")
    return nodes


def one_run(count: int, images: list[Path], dsn: str, bundle: Path, work: Path) -> dict:
    dest_port = free_port()
    destination = storescp(work / "destination", dest_port, fork=True, keep=False)
    nodes = start_nodes(work, count, dsn, dest_port, bundle)
    audits = [audit for _p, _port, audit, _log in nodes]
    try:
        busy0, all0 = machine_cpu_s()
        start = time.perf_counter()
        with ThreadPoolExecutor(SENDERS) as pool:
            sending = [
                pool.submit(storescu, nodes[i % len(nodes)][1], images[i::SENDERS], "DPNODE")
                for i in range(SENDERS)
            ]
            for s in sending:
                s.result()
        received = time.perf_counter() - start
        wait(lambda: delivered(audits) >= 2 * len(images), 3600, "every result delivered", 0.1)
        seconds = time.perf_counter() - start
        busy1, all1 = machine_cpu_s()
        return {
            "workers": count,
            "mode": "scale-out" if count else "single node (embedded default)",
            "images": len(images),
            "seconds": seconds,
            "images_per_s": len(images) / seconds,
            "received_in_s": received,
            "machine_busy_fraction": (busy1 - busy0) / (all1 - all0),
            "node_peak_rss_mb": [peak_rss_mb(p.pid) for p, _port, _a, _l in nodes],
        }
    finally:
        for process, _port, _audit, log in nodes:
            process.terminate()
            process.wait(60)
            log.close()
        destination.terminate()
        destination.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-node-scale-"))
    rows = []
    try:
        print(f"writing {args.images} copies of RG1_UNCR.dcm ...", flush=True)
        source = Path(get_testdata_file("RG1_UNCR.dcm"))
        for count in [0, *args.workers]:
            batch = copies(source, work / f"images-{count}", args.images)
            with postgres() as db:
                rows.append(one_run(count, batch, db.dsn, args.bundle, work / f"run-{count}"))
            shutil.rmtree(work / f"images-{count}", ignore_errors=True)
            row = rows[-1]
            print(
                f"{row['mode']:>32} workers {count}: {row['images_per_s']:.2f} images/s "
                f"({row['images']} in {row['seconds']:.1f} s; received in {row['received_in_s']:.1f} s; "
                f"machine busy {100 * row['machine_busy_fraction']:.0f} %; "
                f"peak RSS per node {', '.join(f'{m:.0f}' for m in row['node_peak_rss_mb'])} MB)",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next((r for r in rows if r["workers"] == 1), None)
    for row in rows:
        row["speedup_over_one_worker"] = (
            row["images_per_s"] / base["images_per_s"] if base else None
        )
    if args.json:
        args.json.write_text(json.dumps({"senders": SENDERS, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
