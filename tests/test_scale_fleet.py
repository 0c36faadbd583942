"""Three node processes over one PostgreSQL behind HAProxy (configs/haproxy.cfg): one is
killed with ``kill -9`` in the middle of a burst, its results waiting in its outbox (the
destination down). While it is dead, every acknowledged image gets its SR and SC from the
others (nothing stranded); brought back with its outbox as it died, it sends none of them again
(the shared ledger): exactly one SR and one SC per image at the destination, nothing left in the
shared queue, and audit trails that say which node processed and delivered what."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
import yaml
from node_support import CountingSCP, Modality, chest_dataset, free_port, wait_for
from postgres_support import postgres
from test_scale_nodes import expected_results

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 90
SENDERS = 6
NAMES = ("node-1", "node-2", "node-3")
VICTIM = "node-2"


def ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def node_process(
    folder: Path, name: str, dsn: str, destination: int, bundle: Path, log, again: bool = False
):
    """A node process in ``folder``; ``again``: restarted on its configuration and spool."""
    config = folder / "node.yaml"
    if again:
        settings = yaml.safe_load(config.read_text())
        return _start(config, log), settings["port"], settings["metrics_port"]
    port, metrics = free_port(), free_port()
    folder.mkdir(parents=True)
    config.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "metrics_port": metrics,
                "bundle": str(bundle),
                "spool": str(folder / "spool"),
                "destinations": [f"RESULTS@127.0.0.1:{destination}"],
                "device": "cpu",
                "batch_size": 4,
                "allow": ["MODALITY"],
                "network_timeout_s": 10.0,
                "outbox": {"initial_backoff_s": 0.5, "max_backoff_s": 2.0},
                "scale": {"database": dsn, "node_name": name, "lease_s": 4.0, "take": 4},
            }
        )
    )
    return _start(config, log), port, metrics


def _start(config: Path, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pacs_node.cli", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def audit(folder: Path) -> list[dict]:
    path = folder / "spool" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_three_nodes_behind_haproxy_lose_nothing_and_repeat_nothing_when_one_is_killed(
    tmp_path: Path, demo_bundle: Path
) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        if os.environ.get("CI"):
            raise FileNotFoundError("haproxy (make system-deps installs it)")
        pytest.skip("HAProxy is not installed (Debian package haproxy: make system-deps)")
    destination = CountingSCP()
    processes: dict[str, subprocess.Popen] = {}
    log = (tmp_path / "fleet.log").open("w")
    balancer = None
    with postgres() as db:
        try:
            env, listen = {}, free_port()
            for index, name in enumerate(NAMES, 1):
                process, port, metrics = node_process(
                    tmp_path / name, name, db.dsn, destination.port, demo_bundle, log
                )
                processes[name] = process
                env |= {f"DP_NODE_{index}": f"127.0.0.1:{port}", f"DP_READY_{index}": str(metrics)}
                wait_for(lambda m=metrics: ready(m), 120, f"{name} ready")
            balancer = subprocess.Popen(
                [haproxy, "-db", "-f", str(ROOT / "configs" / "haproxy.cfg")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ | env | {"DP_LISTEN": f"127.0.0.1:{listen}"},
            )
            time.sleep(2.5)  # HAProxy's checks see each node up (rise 2, inter 1 s)
            assert balancer.poll() is None, "HAProxy did not start (fleet.log)"

            images = [chest_dataset(rows=300, columns=280, seed=500 + i) for i in range(IMAGES)]
            acknowledged: set[str] = set()
            lock = threading.Lock()

            def burst(part: list) -> list[Modality]:
                senders = [
                    Modality(listen, part[i::SENDERS], acknowledged, lock) for i in range(SENDERS)
                ]
                for sender in senders:
                    sender.thread.start()
                return senders

            # The destination is down: what the victim processes waits in its outbox, and its
            # images stay in the shared queue under its leases when it dies.
            first = burst(images[: 2 * IMAGES // 3])
            wait_for(
                lambda: (
                    sum(line.get("status") == "processed" for line in audit(tmp_path / VICTIM)) >= 1
                ),
                300,
                f"{VICTIM} to process images",
            )
            processes[VICTIM].kill()  # SIGKILL: no put-back, no goodbye
            processes[VICTIM].wait(30)
            second = burst(images[2 * IMAGES // 3 :])  # the burst goes on without it
            for sender in first + second:
                sender.thread.join(600)
            assert len(acknowledged) == IMAGES, "the senders could not deliver every image"
            with psycopg.connect(db.dsn, autocommit=True) as raw:
                # the victim's leases lapse (lease_s 4 s): its images are anyone's again
                wait_for(
                    lambda: (
                        raw.execute(
                            "SELECT count(*) FROM dp_images WHERE lease_owner LIKE %s"
                            " AND lease_until >= now()",
                            (f"{VICTIM}-%",),
                        ).fetchone()[0]
                        == 0
                    ),
                    60,
                    f"{VICTIM}'s leases to lapse",
                )
                destination.start()
                expected = expected_results(images, demo_bundle)
                # Nothing stranded: every result arrives while the victim is still dead.
                wait_for(lambda: set(destination.stored) >= expected, 120, "every result delivered")
                wait_for(
                    lambda: raw.execute("SELECT count(*) FROM dp_images").fetchone()[0] == 0,
                    60,
                    "the shared queue emptied",
                )
                # The victim comes back with its outbox as it died: the results in it were
                # delivered by the others, which the shared ledger says; none is sent again.
                left = sorted((tmp_path / VICTIM / "outbox").rglob("*.dcm"))
                assert left, f"{VICTIM} died with results waiting in its outbox"
                processes[VICTIM], *_ = node_process(
                    tmp_path / VICTIM,
                    VICTIM,
                    db.dsn,
                    destination.port,
                    demo_bundle,
                    log,
                    again=True,
                )
                wait_for(
                    lambda: not list((tmp_path / VICTIM / "outbox").rglob("*.dcm")),
                    120,
                    f"{VICTIM}'s outbox settled",
                )
                time.sleep(1)  # anything still to come would be a duplicate or a stray
                assert destination.stored == Counter(dict.fromkeys(expected, 1))
                assert not raw.execute(
                    "SELECT count(*) FROM dp_deliveries WHERE state = 'sending'"
                ).fetchone()[0]

            trails = {name: audit(tmp_path / name) for name in NAMES}
            processed = {
                name: {
                    line["sop_instance_uid"]
                    for line in lines
                    if line["event"] == "received" and line.get("status") == "processed"
                }
                for name, lines in trails.items()
            }
            survivors = set().union(*(processed[n] for n in NAMES if n != VICTIM))
            sources = {str(ds.SOPInstanceUID) for ds in images}
            assert survivors == sources, "the survivors processed every image, the victim's too"
            assert processed[VICTIM] and processed[VICTIM] <= sources
            deliveries = Counter(
                line["outputs"][0]
                for name in NAMES
                for line in trails[name]
                if line["event"] == "delivery" and line.get("status") == "delivered"
            )
            # the outbox's UIDs (the SR's as built; the destination stores its 3D form)
            assert len(deliveries) == len(expected) and set(deliveries.values()) == {1}, (
                "one delivery line per result, from one node"
            )
            assert all(line.get("node") == name for name in NAMES for line in trails[name]), (
                "each line names its node"
            )
            for name in NAMES:
                processes[name].send_signal(signal.SIGTERM)
                assert processes[name].wait(60) == 0
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
            if balancer is not None and balancer.poll() is None:
                balancer.terminate()
                balancer.wait(10)
            destination.stop()
            log.close()
