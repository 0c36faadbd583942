"""The node never stops: one bad image, a full disk, a refusing destination or a dead thread
costs that image or that object at most, never the service."""

from __future__ import annotations

import errno
import io
import json
import struct
import urllib.request
from pathlib import Path

import pytest
from node_support import (
    FullDisk,
    GatedPredictor,
    audit_lines,
    chest_dataset,
    final_lines,
    free_port,
    raw_element,
    send,
    send_files,
    start_node,
    wait_for,
    write_raw,
)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from pacs_node.intake.spool import Spool
from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node
from pacs_node.status import StoreStatus


def story_of(node: Node, sop_instance_uid: str) -> list[dict]:
    return [line for line in final_lines(node) if line.get("sop_instance_uid") == sop_instance_uid]


def processed(node: Node, ds) -> bool:
    return any(line["status"] == "processed" for line in story_of(node, ds.SOPInstanceUID))


def malformed(kind: str):
    """A chest image with one header value as broken modalities write it."""
    ds = chest_dataset(seed=3)
    if kind == "window-center-text":
        ds[0x00281050], ds[0x00281051] = (
            raw_element(0x00281050, "DS", "abc"),
            raw_element(0x00281051, "DS", "4000"),
        )
    elif kind == "rescale-slope-text":
        ds[0x00281053], ds[0x00281052] = (
            raw_element(0x00281053, "DS", "abc"),
            raw_element(0x00281052, "DS", "0"),
        )
    elif kind == "rows-two-values":
        ds[0x00280010] = raw_element(0x00280010, "US", struct.pack("<HH", ds.Rows, ds.Rows))
    elif kind == "columns-zero":
        ds[0x00280011] = raw_element(0x00280011, "US", struct.pack("<H", 0))
    elif kind == "bits-stored-text":
        # text, under a wrong VR, where a number belongs
        ds[0x00280101] = raw_element(0x00280101, "LO", "xy")
    return ds


@pytest.mark.parametrize(
    "kind",
    [
        "window-center-text",
        "rescale-slope-text",
        "rows-two-values",
        "columns-zero",
        "bits-stored-text",
    ],
)
def test_a_malformed_header_costs_at_most_that_image_and_the_next_one_is_processed(
    node: Node, tmp_path: Path, kind: str
) -> None:
    bad, good = malformed(kind), chest_dataset(seed=4)
    assert send_files(node.port, [write_raw(bad, tmp_path / "bad.dcm")]) == [StoreStatus.SUCCESS]
    assert send(node.port, [good]) == [StoreStatus.SUCCESS]
    wait_for(lambda: processed(node, good), 60, "the good image after the malformed one")
    story = wait_for(
        lambda: story_of(node, bad.SOPInstanceUID), 10, "a recorded outcome for the malformed image"
    )
    assert len(story) == 1 and story[0]["status"] in ("processed", "skipped"), story
    if kind in ("window-center-text", "rescale-slope-text"):
        # tolerant reading: a bad window is not a bad image
        assert story[0]["status"] == "processed"
    assert node.health()["worker_alive"] and node.spool.count() == 0


def test_a_full_disk_delays_results_and_loses_nothing(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    disk = FullDisk(tmp_path / "disk")
    gated = GatedPredictor(predictor)
    node = start_node(
        tmp_path,
        gated,
        spool=str(disk.folder / "spool"),
        output_dir=str(disk.folder / "out"),
        min_free_mb=0,
        metrics_port=-1,
    )
    try:
        first = chest_dataset(seed=1)
        assert send(node.port, [first]) == [StoreStatus.SUCCESS]
        assert gated.entered.wait(60)
        disk.fill()  # the disk fills while the model reads the image
        gated.gate.set()
        wait_for(
            lambda: node.metrics.value("retries_total", reason="disk-full") >= 1,
            60,
            "a retry for lack of space",
        )
        assert node.health()["status"] == "degraded"
        disk.free()
        wait_for(lambda: processed(node, first), 120, "the image once space is back")
        second = chest_dataset(seed=2)
        assert send(node.port, [second]) == [StoreStatus.SUCCESS]
        wait_for(lambda: processed(node, second), 60, "a new image after the episode")
        assert list(node.spool.failed.iterdir()) == [] and node.health()["worker_alive"]
        assert len(list((disk.folder / "out" / first.StudyInstanceUID).glob("*.dcm"))) == 2
    finally:
        node.stop()
        disk.close()


class FullFile(io.BytesIO):
    """A file on a full disk: writes fail with ENOSPC once a little has been written."""

    def write(self, data) -> int:
        if self.tell() + len(data) > 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_start_that_could_not_be_recorded_does_not_count_as_a_death(tmp_path: Path) -> None:
    """A full disk that refuses the in-flight record three times must not look like three
    crashes on the image (which would quarantine a healthy image)."""
    disk = FullDisk(tmp_path / "disk")
    spool = Spool(disk.folder / "spool")
    try:
        path = spool.incoming / "image.dcm"
        chest_dataset().save_as(path, enforce_file_format=True)
        disk.fill()
        for _ in range(3):
            with pytest.raises(OSError):
                spool.begin([path])
        disk.free()
        assert spool.attempts == {} and spool.quarantine(3) == []
    finally:
        spool.close()
        disk.close()


def test_one_spool_one_node() -> None:
    import tempfile

    from pacs_node.intake.spool import SpoolInUse

    with tempfile.TemporaryDirectory() as folder:
        first = Spool(folder)
        with pytest.raises(SpoolInUse, match="in use by another process"):
            Spool(folder)
        first.close()
        Spool(folder).close()


def test_abandoned_files_in_the_spools_tmp_folder_are_swept_and_fresh_ones_kept(
    tmp_path: Path,
) -> None:
    import os
    import time

    spool = Spool(tmp_path / "spool")
    try:
        old, fresh = spool.tmp / "abandoned.part", spool.tmp / "arriving.part"
        old.write_bytes(b"x" * 1000)
        fresh.write_bytes(b"y")
        os.utime(old, (time.time() - 3600, time.time() - 3600))
        assert spool.remove_stale_tmp(600) == 1
        assert not old.exists() and fresh.exists()
    finally:
        spool.close()


def test_a_full_disk_is_recognised_behind_the_exceptions_pydicom_raises_from_it() -> None:
    from pydicom.filewriter import dcmwrite

    from pacs_node.files import is_transient

    with pytest.raises(OSError) as raised:
        dcmwrite(FullFile(), chest_dataset(), enforce_file_format=True)
    assert raised.value.errno is None  # pydicom's own OSError, naming the element it was writing
    assert is_transient(raised.value) and not is_transient(ValueError("a bad value"))


class SecondaryCaptureOnly:
    """A PACS that takes Secondary Capture and refuses every SR class at negotiation."""

    def __init__(self) -> None:
        self.port, self.stored = free_port(), []
        ae = AE(ae_title="SCONLY")
        ae.add_supported_context(
            SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        handler = (
            evt.EVT_C_STORE,
            lambda event: self.stored.append(str(event.request.AffectedSOPInstanceUID)) or 0x0000,
        )
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[handler])


def test_a_destination_that_refuses_the_sr_class_still_gets_every_overlay(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    pacs = SecondaryCaptureOnly()
    node = start_node(tmp_path, predictor, destinations=(f"SCONLY@127.0.0.1:{pacs.port}",))
    try:
        images = [chest_dataset(seed=i) for i in range(3)]
        for ds in images:  # one at a time: every batch holds an SR the destination refuses
            assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        wait_for(lambda: len(pacs.stored) == 3, 60, "the three overlays at the destination")
        dead = wait_for(
            lambda: (
                [
                    line
                    for line in audit_lines(node)
                    if line["event"] == "delivery" and line["status"] == "dead-letter"
                ]
                if len(
                    [
                        line
                        for line in audit_lines(node)
                        if line["event"] == "delivery" and line["status"] == "dead-letter"
                    ]
                )
                == 3
                else None
            ),
            30,
            "three dead letters",
        )
        assert {line["reason"] for line in dead} == {"sop-class-not-accepted"}
        (sender,) = node.senders
        # The destination counts an overlay when it stores it; the sender removes the file once it
        # has read the answer, a moment later.
        wait_for(lambda: sender.pending() == [], 30, "an empty outbox")
        assert sender.alive
        assert "Comprehensive SR" in next(sender.dead.glob("*.why.txt")).read_text()
    finally:
        node.stop()
        pacs.server.shutdown()


class Crash(BaseException):
    """What no ``except Exception`` catches: the kind of exit that used to end a thread silently."""


class CrashingOnce:
    def __init__(self, inner: NodePredictor, times: int = 1) -> None:
        self.inner, self.contract, self.times = inner, inner.contract, times

    def predict(self, prepared):
        if self.times > 0:
            self.times -= 1
            raise Crash("the model thread fell over")
        return self.inner.predict(prepared)


def test_a_worker_that_dies_is_restarted_and_its_image_processed(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(tmp_path, CrashingOnce(predictor))
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        wait_for(lambda: processed(node, ds), 60, "the image, after the worker's restart")
        assert node.metrics.value("thread_restarts_total", thread="worker") == 1
        # Health is read by the supervisor's rounds: ok again within a few of them (on a busy
        # machine the first round may still see the restarted worker starting).
        wait_for(lambda: node.health()["status"] == "ok", 30, f"health ok, not {node.health()}")
        assert node.fatal is None
    finally:
        node.stop()


def test_a_worker_that_keeps_dying_stops_the_node_for_the_service_manager(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(tmp_path, CrashingOnce(predictor, times=1000))
    try:
        for seed in range(3):
            send(node.port, [chest_dataset(seed=seed)])
        wait_for(lambda: node.fatal, 60, "the node to give up")
        assert "worker" in node.fatal and node.health()["status"] == "failed"
        # nothing lost on the way out
        assert node.spool.count() + len(list(node.spool.failed.glob("*.dcm"))) == 3
    finally:
        node.stop()


class SlowDestination:
    """Accepts results, but takes ``seconds`` to answer each C-STORE."""

    def __init__(self, seconds: float) -> None:
        import time

        self.port, self.stored = free_port(), []
        ae = AE(ae_title="SLOW")
        for sop_class in (
            "1.2.840.10008.5.1.4.1.1.88.34",
            "1.2.840.10008.5.1.4.1.1.88.33",
            SecondaryCaptureImageStorage,
        ):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handler = (
            evt.EVT_C_STORE,
            lambda event: time.sleep(seconds) or self.stored.append(1) or 0x0000,
        )
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[handler])


def test_health_says_degraded_when_a_sender_is_stuck_or_the_queue_does_not_move(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    # Each store takes 2.5 s: well past the 1 s stall bound, short enough to wait out.
    slow = SlowDestination(2.5)
    gated = GatedPredictor(predictor)
    node = start_node(
        tmp_path, gated, destinations=(f"SLOW@127.0.0.1:{slow.port}",), stall_after_s=1.0
    )
    url = f"http://127.0.0.1:{node.metrics_port}/health"

    def health() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        assert health()[0] == 200
        send(node.port, [chest_dataset()])
        code, state = wait_for(
            lambda: (lambda h: h if h[0] == 503 else None)(health()),
            30,
            "degraded health while the model is stuck",
        )
        assert any("worker" in problem for problem in state["problems"]), state
        gated.gate.set()
        code, state = wait_for(
            lambda: (
                lambda h: h if h[0] == 503 and any("send" in p for p in h[1]["problems"]) else None
            )(health()),
            30,
            "a stuck sender",
        )
        wait_for(
            lambda: len(slow.stored) == 2 and health()[0] == 200,
            60,
            "health back once both results are delivered",
        )
    finally:
        node.stop()
        slow.server.shutdown()


def test_a_batch_that_crashed_the_node_is_retried_one_image_at_a_time(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    spool = Spool(tmp_path / "spool")
    images = [chest_dataset(seed=i) for i in range(4)]
    paths = [spool.incoming / f"{ds.SOPInstanceUID}.dcm" for ds in images]
    for ds, path in zip(images, paths):
        ds.save_as(path, enforce_file_format=True)
    for _ in range(3):  # killed three times while these four were in one batch
        spool.begin(paths)
    spool.close()
    node = start_node(tmp_path, predictor)
    try:
        for ds in images:
            wait_for(
                lambda ds=ds: processed(node, ds), 60, "every image of the batch, one at a time"
            )
        assert list(node.spool.failed.iterdir()) == []
    finally:
        node.stop()


def test_an_image_that_crashes_the_node_alone_three_times_is_quarantined(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    spool = Spool(tmp_path / "spool")
    poison, survivor = chest_dataset(seed=1), chest_dataset(seed=2)
    for ds in (poison, survivor):
        ds.save_as(spool.incoming / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    for _ in range(3):
        # alone in flight at three deaths
        spool.begin([spool.incoming / f"{poison.SOPInstanceUID}.dcm"])
    spool.begin([spool.incoming / f"{survivor.SOPInstanceUID}.dcm"])
    spool.close()
    node = start_node(tmp_path, predictor)
    try:
        wait_for(lambda: processed(node, survivor), 60, "the survivor")
        (line,) = story_of(node, poison.SOPInstanceUID)
        assert line["status"] == "failed" and line["reason"] == "crash-loop"
        assert [p.suffix for p in node.spool.failed.iterdir() if p.suffix == ".dcm"] == [".dcm"]
    finally:
        node.stop()


def test_the_same_instance_received_twice_at_once_is_processed_not_called_unreadable(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    gated = GatedPredictor(predictor)
    node = start_node(tmp_path, gated)
    try:
        first, other = chest_dataset(seed=1), chest_dataset(seed=2)
        assert send(node.port, [first]) == [StoreStatus.SUCCESS]
        assert gated.entered.wait(60)  # the first copy is in the model
        assert send(node.port, [first, other]) == [StoreStatus.SUCCESS, StoreStatus.SUCCESS]
        gated.gate.set()
        wait_for(lambda: processed(node, other), 60, "the other image")
        wait_for(
            lambda: len(story_of(node, first.SOPInstanceUID)) == 2,
            30,
            "both receptions accounted for",
        )
        assert {line["status"] for line in story_of(node, first.SOPInstanceUID)} == {"processed"}
        assert node.spool.count() == 0
    finally:
        node.stop()


def test_a_data_set_whose_instance_uid_differs_from_the_command_is_refused_and_recorded(
    node: Node, tmp_path: Path
) -> None:
    # the command will carry the UID of the file meta, another than the data set's
    ds = chest_dataset()
    assert send_files(
        node.port,
        [write_raw(ds, tmp_path / "mismatch.dcm", MediaStorageSOPInstanceUID=generate_uid())],
    ) == [StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    (line,) = [line for line in audit_lines(node) if line["event"] == "store-refused"]
    assert line["reason"] == "instance-uid-mismatch" and line["calling_ae"] == "TESTSCU"
    assert (
        node.metrics.value("refused_total", reason="instance-uid-mismatch") == 1
        and node.spool.count() == 0
    )


class OutOfMemory:
    """A model that runs out of memory on every call while ``failing``."""

    def __init__(self, inner: NodePredictor) -> None:
        self.inner, self.contract, self.failing = inner, inner.contract, True

    def predict(self, prepared):
        if self.failing:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner.predict(prepared)


def test_an_image_that_never_fits_in_memory_fails_after_some_retries_and_the_node_goes_on(
    tmp_path: Path, predictor: NodePredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pacs_node.pipeline as node_module

    monkeypatch.setattr(node_module, "RETRY_INITIAL_S", 0.05)
    model = OutOfMemory(predictor)
    node = start_node(tmp_path, model)
    try:
        ds = chest_dataset(seed=1)
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        (line,) = wait_for(
            lambda: [x for x in story_of(node, ds.SOPInstanceUID) if x["status"] == "failed"],
            60,
            "the image to fail",
        )
        assert (
            "out of memory" in line["detail"]
            and node.metrics.value("retries_total", reason="resources")
            == node_module.MAX_MEMORY_RETRIES
        )
        model.failing = False
        after = chest_dataset(seed=2)
        assert send(node.port, [after]) == [StoreStatus.SUCCESS]
        wait_for(lambda: processed(node, after), 60, "the next image")
        assert node.fatal is None
    finally:
        node.stop()
