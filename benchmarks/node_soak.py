"""Soak: thousands of images over concurrent associations while the node is killed, its
destination goes down and its disk fills up; every acknowledged image must end with exactly
one SR and one SC at the destination.

    sudo python benchmarks/node_soak.py --bundle runs/demo/bundle            # 10,000 images
    python benchmarks/node_soak.py --bundle runs/demo/bundle --images 1000
    python benchmarks/node_soak.py --bundle runs/demo/bundle --scale 3       # scale-out mode

Runs ``dp-node`` as a process, its spool and outbox on a tmpfs of ``--disk-mb`` (mounting
one needs root; without, the disk-full episode is left out and the output says so). A
destination in this process counts every C-STORE it receives, by SOP Instance UID. Eight
senders (``--senders``) send frontal chest phantoms as modalities do: each image until it
is acknowledged, a new association after a failure. The schedule, by share of images
acknowledged: ``kill -9`` at 15 %, 45 % and 75 % (restarted at once); the destination
down for ``--outage-seconds`` at 30 %; the disk filled for ``--full-seconds`` at 60 %.
It prints:

* images acknowledged, wall time, images per second;
* results at the destination counted: exactly one SR and one SC per acknowledged image,
  duplicates, missing, strays;
* the audit trail: an outcome line for each acknowledged image, images with more than one
  (processed again after a kill), refusals while the disk was full;
* peak resident memory of the node (the largest of its processes).

``--scale N``: the scale-out mode instead, N nodes over a throwaway PostgreSQL cluster (the
tests' own, Debian's ``postgresql``), behind HAProxy with ``configs/haproxy.cfg`` when N is 3
(else each sender stores to one node in turn). The schedule: ``kill -9`` of node 1, 2 and 3 in
turn at 15 %, 45 % and 75 % (each restarted at once), the destination down at 30 %, the
database stopped as by a crash (``pg_ctl stop -m immediate``) and started again at 60 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml
from node_latency import free_port, peak_rss_mb, wait
from node_netfuzz import chest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from node_support import CountingSCP  # the tests' counting destination
from postgres_support import postgres  # the tests' throwaway cluster

from dp_model.serving.bundle import load_bundle
from pacs_node.config import NodeConfig
from pacs_node.intake.sanitize import clean_source
from pacs_node.results.identity import ResultIdentity, rendition
from pacs_node.results.report import COMPREHENSIVE_3D_SR, sop_instance_uid_in

CALLING = "SOAK"


class Node:
    """``dp-node`` as a process that can be killed and started again; remembers its peak memory."""

    def __init__(self, config: Path, log: Path, port: int, metrics_port: int = -1) -> None:
        self.config, self.log_path, self.port, self.metrics_port = config, log, port, metrics_port
        self.log = log.open("a")
        self.process: subprocess.Popen | None = None
        self.peak_rss_mb = 0.0
        self.kills = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pacs_node.cli", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait(self._listening, 180, "the node to listen")

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def kill(self) -> None:
        self._note_rss()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.kills += 1

    def stop(self) -> int:
        self._note_rss()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)

    def _note_rss(self) -> None:
        with contextlib.suppress(OSError):
            self.peak_rss_mb = max(self.peak_rss_mb, peak_rss_mb(self.process.pid))


class Sender(threading.Thread):
    """One modality: sends its images in order, each until it is acknowledged."""

    def __init__(
        self, port: int, indices: list[int], acknowledged: dict[str, int], lock: threading.Lock
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.indices, self.acknowledged, self.lock = port, indices, acknowledged, lock
        self.refusals = Counter()

    def run(self) -> None:
        remaining = list(self.indices)
        while remaining:
            ae = AE(ae_title=CALLING)
            ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            assoc = ae.associate("127.0.0.1", self.port, ae_title="DPNODE")
            if not assoc.is_established:
                time.sleep(0.5)
                continue
            while remaining and assoc.is_established:
                ds = chest(remaining[0])
                try:
                    status = assoc.send_c_store(ds)
                except RuntimeError:  # the node went away between two stores: a new association
                    break
                code = int(status.Status) if status else -1
                if code == 0:
                    with self.lock:
                        self.acknowledged[str(ds.SOPInstanceUID)] = remaining.pop(0)
                elif status:
                    self.refusals[f"0x{code:04X}"] += 1
                    time.sleep(0.5)  # out of resources: try again a little later
            if assoc.is_established:
                assoc.release()


def haproxy(nodes: list[Node], work: Path) -> tuple[subprocess.Popen, int]:
    """HAProxy with configs/haproxy.cfg in front of three nodes; it and its entry port."""
    entry = free_port()
    env = {"DP_LISTEN": f"127.0.0.1:{entry}"}
    for index, node in enumerate(nodes, 1):
        env |= {
            f"DP_NODE_{index}": f"127.0.0.1:{node.port}",
            f"DP_READY_{index}": str(node.metrics_port),
        }
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(Path(__file__).parents[1] / "configs" / "haproxy.cfg")],
        stdout=(work / "haproxy.log").open("w"),
        stderr=subprocess.STDOUT,
        env=os.environ | env,
    )
    wait(lambda: _listening(entry), 30, "HAProxy")
    time.sleep(2.5)  # its checks see each node up (rise 2, inter 1 s)
    return process, entry


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def mount_tmpfs(folder: Path, size_mb: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(folder)],
            capture_output=True,
        ).returncode
        == 0
    )


def fill(folder: Path) -> None:
    with (folder / "filler").open("wb", buffering=0) as handle:
        for size in (2**20, 65536, 4096, 512, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                continue


def expected_results(indices: list[int], contract) -> dict[str, int]:
    """SR and SC UIDs the node must deliver for each image index (its identity is derived)."""
    expected = {}
    for index in indices:
        source = clean_source(chest(index)).dataset
        identity = ResultIdentity.of(source, contract, rendition(NodeConfig(), contract))
        # the destination takes Comprehensive 3D SR, so the report arrives in that class, under
        # the UID derived from the Comprehensive SR's (pacs_node.delivery.cstore)
        report = sop_instance_uid_in(identity.instance_uid("sr"), COMPREHENSIVE_3D_SR)
        expected[report] = expected[identity.instance_uid("sc")] = index
    return expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument(
        "--disk-mb",
        type=int,
        default=3072,
        help="the spool's tmpfs: room for the backlog of every image at once",
    )
    parser.add_argument("--full-seconds", type=float, default=20.0)
    parser.add_argument("--outage-seconds", type=float, default=60.0)
    parser.add_argument("--database-down-seconds", type=float, default=10.0)
    parser.add_argument(
        "--scale", type=int, default=0, help="nodes in the scale-out mode (0: one node)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.scale:
        with postgres() as db:
            return soak(args, db)
    return soak(args, None)


def soak(args: argparse.Namespace, db) -> int:
    """The soak of one node (``db`` None) or of ``args.scale`` nodes over ``db``."""
    work = Path(tempfile.mkdtemp(prefix="dp-node-soak-"))
    disk = work / "disk"
    mounted = db is None and mount_tmpfs(disk, args.disk_mb)
    destination = CountingSCP()
    nodes = []
    for index in range(max(args.scale, 1)):
        port, folder = free_port(), disk / (f"node-{index + 1}" if args.scale else "")
        settings = {
            "port": port,
            "host": "127.0.0.1",
            "bundle": str(args.bundle),
            "spool": str(folder / "spool"),
            "metrics_port": free_port() if args.scale else -1,
            "destinations": [f"RESULTS@127.0.0.1:{destination.port}"],
            "device": "cpu",
            "batch_size": 16,
            "allow": [CALLING],
            "min_free_mb": 8,
            "keep_skipped": False,
            "outbox": {"initial_backoff_s": 0.5, "max_backoff_s": 5.0},
            # the senders stand for modalities on as many hosts
            "max_associations_per_host": 2 * args.senders,
        }
        if db is not None:
            settings["scale"] = {
                "database": db.dsn,
                "node_name": f"node-{index + 1}",
                "lease_s": 10.0,
            }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "node.yaml").write_text(yaml.safe_dump(settings))
        nodes.append(
            Node(
                folder / "node.yaml", work / f"node-{index + 1}.log", port, settings["metrics_port"]
            )
        )
    acknowledged: dict[str, int] = {}
    lock = threading.Lock()
    events: list[str] = []
    started = time.monotonic()
    destination.start()
    for node in nodes:
        node.start()
    balancer, ports = None, [node.port for node in nodes]
    if args.scale == 3:
        balancer, entry = haproxy(nodes, work)
        ports = [entry]
    senders = [
        Sender(ports[i % len(ports)], list(range(i, args.images, args.senders)), acknowledged, lock)
        for i in range(args.senders)
    ]
    for sender in senders:
        sender.start()

    def at(share: float) -> None:
        wait(
            lambda: len(acknowledged) >= share * args.images,
            7200,
            f"{share:.0%} of the images acknowledged",
            0.2,
        )

    def note(event: str) -> None:  # the episodes as they happen: a long run shows where it is
        events.append(event)
        print(f"  {event}", flush=True)

    try:
        schedule = [
            (0.15, "kill"),
            (0.30, "destination outage"),
            (0.45, "kill"),
            (0.60, "database restart" if db is not None else "disk full"),
            (0.75, "kill"),
        ]
        kills = 0
        for share, what in schedule:
            at(share)
            note(f"{time.monotonic() - started:.0f} s, {len(acknowledged)} acknowledged: {what}")
            if what == "kill":
                victim = nodes[kills % len(nodes)]
                kills += 1
                victim.kill()
                victim.start()
            elif what == "destination outage":
                destination.stop()
                time.sleep(args.outage_seconds)
                destination.start()
                note(f"{time.monotonic() - started:.0f} s: destination back")
            elif what == "disk full" and mounted:
                fill(disk)
                time.sleep(args.full_seconds)
                (disk / "filler").unlink()
                note(f"{time.monotonic() - started:.0f} s: disk freed")
            elif what == "database restart":
                db.stop("immediate")
                time.sleep(args.database_down_seconds)
                db.start()
                note(f"{time.monotonic() - started:.0f} s: database back")
        for sender in senders:
            sender.join(7200)
        sent_seconds = time.monotonic() - started
        contract = load_bundle(args.bundle)[1]
        expected = expected_results(sorted(acknowledged.values()), contract)
        wait(
            lambda: set(destination.stored) >= set(expected),
            3600,
            "every result at the destination",
            0.5,
        )
        done_seconds = time.monotonic() - started
        time.sleep(10)  # anything still to come would be a duplicate or a stray
    finally:
        exit_codes = [
            node.stop() if node.process and node.process.poll() is None else None for node in nodes
        ]
        exit_code = max((c for c in exit_codes if c is not None), default=None)
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        destination.stop()
    counts = destination.stored
    audit = [
        json.loads(line)
        for path in sorted(disk.glob("**/spool/audit.jsonl"))
        for line in path.read_text().splitlines()
    ]
    outcomes = Counter(line["sop_instance_uid"] for line in audit if line["event"] == "received")
    refusals = Counter(line["reason"] for line in audit if line["event"] == "store-refused")
    figures = {
        "images_acknowledged": len(acknowledged),
        "senders": args.senders,
        "wall_s_until_all_acknowledged": round(sent_seconds, 1),
        "wall_s_until_all_results": round(done_seconds, 1),
        "images_per_s": round(len(acknowledged) / done_seconds, 2),
        "nodes": len(nodes) if args.scale else 1,
        "mode": "scale-out" if args.scale else "single node",
        "kills": sum(node.kills for node in nodes),
        "database_restarts": int(db is not None),
        "disk_full_episode": mounted,
        "results_expected": len(expected),
        "results_exactly_once": sum(1 for uid in expected if counts[uid] == 1),
        "duplicates": sum(max(0, counts[uid] - 1) for uid in expected),
        "missing": sum(1 for uid in expected if counts[uid] == 0),
        "strays": sum(1 for uid in counts if uid not in expected),
        "images_with_an_outcome_line": sum(1 for uid in acknowledged if outcomes[uid] >= 1),
        "images_with_several_outcome_lines": sum(1 for uid in acknowledged if outcomes[uid] > 1),
        "refusals_by_reason": dict(refusals),
        "sender_retries": dict(sum((s.refusals for s in senders), Counter())),
        "node_peak_rss_mb": round(max(node.peak_rss_mb for node in nodes), 1),
        "node_exit_code": exit_code,
        "events": events,
    }
    episodes = (
        "a database restart"
        if db is not None
        else (
            "a disk-full episode"
            if mounted
            else "NO disk-full episode (mounting a tmpfs needs root)"
        )
    )
    print(
        f"soak ({figures['mode']}, {figures['nodes']} node(s)): {len(acknowledged)} images over {args.senders} "
        f"associations, {figures['kills']} kill -9, a destination outage, {episodes}; {os.cpu_count()} CPUs"
    )
    for event in events:
        print(f"  {event}")
    print(
        f"  wall time {done_seconds:.0f} s ({figures['images_per_s']} images/s, results included)"
    )
    print(
        f"  results: {figures['results_exactly_once']} of {len(expected)} exactly once; duplicates {figures['duplicates']}, missing {figures['missing']}, strays {figures['strays']}"
    )
    print(
        f"  audit: {figures['images_with_an_outcome_line']} of {len(acknowledged)} images with an outcome line, {figures['images_with_several_outcome_lines']} with more than one; refusals {dict(refusals)}"
    )
    print(
        f"  node peak resident memory {figures['node_peak_rss_mb']:.0f} MB; exit code at the end {exit_code}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if mounted:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    ok = (
        figures["results_exactly_once"] == len(expected)
        and figures["strays"] == 0
        and figures["images_with_an_outcome_line"] == len(acknowledged)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
