"""Two batches in flight: while the results of one are built and handed over, the next is
read, decoded and run through the model. An image taken alone stays alone in flight (a
death of the process counts against it only), results come out in the order the images were
taken, and a worker that dies with two batches in flight loses nothing and doubles nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from node_support import chest_dataset, final_lines, send, start_node, wait_for

from pacs_node.model.predictor import NodePredictor
from pacs_node.results.base import Result, ResultContext
from pacs_node.results.overlay import OverlayWriter
from pacs_node.status import StoreStatus


class Recording:
    """The real predictor; its first call waits for ``gate``. Each call notes how many images it
    was given and which images (SOP Instance UIDs) the spool had in flight at that moment."""

    def __init__(self, inner: NodePredictor) -> None:
        self.inner, self.contract = inner, inner.contract
        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls: list[tuple[int, set[str]]] = []
        self.node = None

    def predict(self, prepared):
        spool = self.node.spool
        receipts = [spool.receipt(spool.incoming / name) for name in spool.attempts]
        in_flight = {receipt.sop_instance_uid if receipt else "gone" for receipt in receipts}
        self.calls.append((len(prepared), in_flight))
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.inner.predict(prepared)


class OverlayGates:
    """The overlay of an image in ``held`` waits until its gate opens; ``crash`` raises once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held: dict[str, threading.Event] = {}
        self.entered: set[str] = set()
        self.crash: dict[str, BaseException] = {}
        build = OverlayWriter.build

        def gated(writer: OverlayWriter, context: ResultContext) -> Result:
            uid = str(context.source.SOPInstanceUID)
            self.entered.add(uid)
            if uid in self.crash:
                raise self.crash.pop(uid)
            if uid in self.held:
                assert self.held[uid].wait(60), "the test never released the overlay"
            return build(writer, context)

        monkeypatch.setattr(OverlayWriter, "build", gated)


class Crash(BaseException):
    """What no ``except Exception`` catches: the thread it is raised in ends."""


def processed_order(node) -> list[str]:
    return [line["sop_instance_uid"] for line in final_lines(node, "processed")]


def queued_behind_the_first(node, recording: Recording, images: list, count: int) -> None:
    """Image 0 alone holds the model while images 1 to ``count`` arrive; then the model runs:
    they are taken in batches of 3, in order."""
    assert send(node.port, images[:1]) == [StoreStatus.SUCCESS]
    assert recording.entered.wait(30)
    assert send(node.port, images[1 : count + 1]) == [StoreStatus.SUCCESS] * count
    recording.gate.set()


def started(tmp_path: Path, predictor: NodePredictor) -> tuple[Recording, object]:
    recording = Recording(predictor)
    node = start_node(tmp_path, recording, batch_size=3)
    recording.node = node
    return recording, node


def test_the_next_batch_reaches_the_model_while_the_results_of_the_one_before_are_built(
    tmp_path: Path, predictor: NodePredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [chest_dataset(seed=seed) for seed in range(8)]
    uids = [str(ds.SOPInstanceUID) for ds in images]
    overlays = OverlayGates(monkeypatch)
    first, second = threading.Event(), threading.Event()
    overlays.held = dict.fromkeys(uids[1:4], first) | dict.fromkeys(uids[4:7], second)
    recording, node = started(tmp_path, predictor)
    try:
        queued_behind_the_first(node, recording, images, 6)  # [1 2 3], [4 5 6]
        wait_for(lambda: len(recording.calls) == 3, 30, "[4 5 6] through the model")
        assert processed_order(node) == uids[:1], (
            "[4 5 6] went through the model before the results of [1 2 3] were built"
        )
        assert [size for size, _ in recording.calls] == [1, 3, 3]
        assert recording.calls[0][1] == {uids[0]}
        assert recording.calls[2][1] == set(uids[1:7]), (
            "two batches in flight, both recorded before the second began"
        )
        # image 7 arrives alone while the results of [4 5 6] wait: it is in flight alone, after them
        assert send(node.port, images[7:]) == [StoreStatus.SUCCESS]
        first.set()
        wait_for(lambda: uids[4] in overlays.entered, 30, "the results of [4 5 6] being built")
        wait_for(lambda: node.pipeline.work.qsize() == 0, 30, "image 7 taken")
        time.sleep(0.5)  # time for image 7 to reach the model, were it let in beside [4 5 6]
        assert len(recording.calls) == 3, "image 7 reached the model beside [4 5 6]"
        second.set()
        wait_for(lambda: len(processed_order(node)) == 8, 60, "every image processed")
        assert recording.calls[3] == (1, {uids[7]}), (
            "an image taken alone was in flight beside another batch"
        )
        assert processed_order(node) == uids, "results in the order the images were taken"
        assert node.spool.count() == 0 and node.spool.attempts == {}
    finally:
        first.set()
        second.set()
        recording.gate.set()
        node.stop()


def test_a_worker_that_dies_with_two_batches_in_flight_loses_nothing_and_doubles_nothing(
    tmp_path: Path, predictor: NodePredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [chest_dataset(seed=seed) for seed in range(7)]
    uids = [str(ds.SOPInstanceUID) for ds in images]
    overlays = OverlayGates(monkeypatch)
    hold = threading.Event()
    overlays.held = {uids[2]: hold}
    recording, node = started(tmp_path, predictor)
    try:
        queued_behind_the_first(node, recording, images, 6)
        # image 1's results are built; image 2's overlay waits until [4 5 6] is past the model,
        # then the results thread dies on image 3's overlay
        wait_for(lambda: len(recording.calls) == 3, 30, "[4 5 6] through the model")
        overlays.crash[uids[3]] = Crash("the results thread fell over")
        hold.set()
        wait_for(lambda: len(processed_order(node)) == 7, 60, "every image, after the restart")
        assert sorted(processed_order(node)) == sorted(uids), "each image processed once"
        assert [line["status"] for line in final_lines(node)] == ["processed"] * 7
        assert node.metrics.value("thread_restarts_total", thread="worker") == 1
        # what was in flight at the death (3 of [1 2 3], all of [4 5 6]) is taken again alone
        assert [size for size, _ in recording.calls[3:]] == [1, 1, 1, 1]
        assert len(list(Path(node.config.output_dir).rglob("*.dcm"))) == 2 * 7
        wait_for(lambda: node.health()["status"] == "ok", 30, "health ok again")
        assert node.spool.count() == 0 and node.spool.attempts == {}
    finally:
        hold.set()
        recording.gate.set()
        node.stop()


def test_an_image_taken_alone_while_the_results_thread_dies_is_not_lost(
    tmp_path: Path, predictor: NodePredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker takes image 4 alone and waits for [1 2 3]'s results, whose thread dies: image
    4, taken but not begun, is put back and processed by the restarted worker."""
    images = [chest_dataset(seed=seed) for seed in range(5)]
    uids = [str(ds.SOPInstanceUID) for ds in images]
    overlays = OverlayGates(monkeypatch)
    hold = threading.Event()
    overlays.held = {uids[1]: hold}
    recording, node = started(tmp_path, predictor)
    try:
        queued_behind_the_first(node, recording, images, 3)
        wait_for(lambda: uids[1] in overlays.entered, 30, "the results of [1 2 3] being built")
        assert send(node.port, images[4:]) == [StoreStatus.SUCCESS]
        wait_for(lambda: node.pipeline.work.qsize() == 0, 30, "image 4 taken, alone")
        overlays.crash[uids[2]] = Crash("the results thread fell over")
        hold.set()
        wait_for(lambda: len(processed_order(node)) == 5, 60, "every image, after the restart")
        assert sorted(processed_order(node)) == sorted(uids)
        assert node.metrics.value("thread_restarts_total", thread="worker") == 1
        assert node.spool.count() == 0 and node.spool.attempts == {}
    finally:
        hold.set()
        recording.gate.set()
        node.stop()
