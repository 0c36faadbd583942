"""Nothing acknowledged is ever lost: concurrent senders, ``kill -9``, a destination that is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from node_support import (
    CountingSCP,
    Modality,
    chest_dataset,
    echo_ok,
    free_port,
    identity_of,
    wait_for,
)

from dp_model.serving.bundle import load_bundle
from pacs_node.results.report import COMPREHENSIVE_3D_SR, sop_instance_uid_in

# a quarter acknowledged at the kill, a backlog behind them (make benchmark-soak: 10,000, three
# kills)
IMAGES = 120
SENDERS = 8


def start_node(config: Path, log) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pacs_node.cli", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_every_acknowledged_image_gets_exactly_one_sr_and_one_sc_despite_kill_9(
    tmp_path: Path, demo_bundle: Path
) -> None:
    port, destination = free_port(), CountingSCP()
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "host": "127.0.0.1",
                "bundle": str(demo_bundle),
                "spool": str(tmp_path / "spool"),
                "metrics_port": -1,
                "destinations": [f"RESULTS@127.0.0.1:{destination.port}"],
                "device": "cpu",
                "batch_size": 16,
                "allow": ["MODALITY", "PROBE"],
                "outbox": {"initial_backoff_s": 0.5, "max_backoff_s": 2.0},
            }
        )
    )
    images = [chest_dataset(rows=300, columns=280, seed=i) for i in range(IMAGES)]
    acknowledged: set[str] = set()
    lock = threading.Lock()
    log = (tmp_path / "node.log").open("w")
    node = start_node(config, log)
    try:
        wait_for(lambda: echo_ok(port), 120, "the node to answer C-ECHO")
        senders = [Modality(port, images[i::SENDERS], acknowledged, lock) for i in range(SENDERS)]
        for sender in senders:
            sender.thread.start()
        # The destination is down while the first images arrive; the node is killed mid-run.
        wait_for(
            lambda: len(acknowledged) >= IMAGES // 4, 300, "a quarter of the images acknowledged"
        )
        node.kill()  # SIGKILL: no chance to clean up
        node.wait(30)
        killed_at = len(acknowledged)
        node = start_node(config, log)
        wait_for(lambda: echo_ok(port), 120, "the restarted node to answer C-ECHO")
        wait_for(lambda: len(acknowledged) >= IMAGES // 2, 300, "half of the images acknowledged")
        destination.start()
        for sender in senders:
            sender.thread.join(600)
        assert len(acknowledged) == IMAGES, "the senders could not deliver every image to the node"
        contract = load_bundle(demo_bundle)[1]
        expected = set()
        for ds in images:
            identity = identity_of(ds, contract)
            # the destination takes Comprehensive 3D SR: the report's 3D form, its own UID
            report = sop_instance_uid_in(identity.instance_uid("sr"), COMPREHENSIVE_3D_SR)
            expected |= {report, identity.instance_uid("sc")}
        wait_for(
            lambda: set(destination.stored) >= expected, 600, "every result at the destination"
        )
        time.sleep(2)  # anything still to come would be a duplicate or a stray
        # Counted, not compared as sets: exactly one SR and one SC per image, no other instance.
        assert destination.stored == Counter(dict.fromkeys(expected, 1))
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0
        assert killed_at < IMAGES
        assert (
            list((tmp_path / "spool" / "incoming").glob("*.dcm")) == []
            and list((tmp_path / "spool" / "failed").glob("*.dcm")) == []
        )
        assert list((tmp_path / "dead-letter").rglob("*.dcm")) == []
    finally:
        if node.poll() is None:
            node.kill()
        destination.stop()
        log.close()
