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
from node_support import chest_dataset, echo_ok, free_port, identity_of, wait_for
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from dp_model.serving.bundle import load_bundle
from pacs_node.delivery.cstore import RESULT_CLASSES
from pacs_node.results.report import COMPREHENSIVE_3D_SR, sop_instance_uid_in

# a quarter acknowledged at the kill, a backlog behind them (make benchmark-soak: 10,000, three
# kills)
IMAGES = 120
SENDERS = 8


class CountingSCP:
    """A destination that counts every instance it stores, by SOP Instance UID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stored: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = None

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.stored[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title="RESULTS")
        for sop_class in RESULT_CLASSES:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


class Modality:
    """Sends its images like a modality does: retry what was not acknowledged, until all are."""

    def __init__(
        self, port: int, images: list[Dataset], acknowledged: set[str], lock: threading.Lock
    ) -> None:
        self.port, self.images, self.acknowledged, self.lock = port, images, acknowledged, lock
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        remaining = list(self.images)
        deadline = time.monotonic() + 600
        while remaining and time.monotonic() < deadline:
            ae = AE(ae_title="MODALITY")
            # a modality's patience for an answer: a node killed in the middle of a PDU
            # answers nothing, and the image is sent again
            ae.acse_timeout = ae.dimse_timeout = 10
            ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="DPNODE")
            if not assoc.is_established:
                time.sleep(0.3)
                continue
            while remaining and assoc.is_established:
                status = assoc.send_c_store(remaining[0])
                if status and int(status.Status) == 0x0000:
                    with self.lock:
                        self.acknowledged.add(str(remaining.pop(0).SOPInstanceUID))
                elif status:
                    time.sleep(0.2)  # refused (out of resources): try again
            if assoc.is_established:
                assoc.release()


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
