"""The worker's path for each image: read, decode, infer, write, hand over.

The worker takes up to ``batch_size`` waiting instances, reads and screens each, decodes
it, runs the model once for the batch (whose decoded images hold ``batch_memory_mb`` at
most), builds every configured output kind (:mod:`pacs_node.results.registry`), the report
first, and puts each result durably in every destination's outbox that takes it (or
``output_dir``) as soon as it is built, so that the report is on its way while the overlay
is drawn; then lets the spool forget the source. Each image ends in one outcome event
(:mod:`pacs_node.outcomes`): processed, skipped, failed, or put back for later.

The promise: an image the node acknowledged gets its results or a recorded reason,
whatever the image, the peers or the machine do.

* Isolation per image: any exception while processing one image costs that image alone
  (``spool/failed/``, a stable :class:`~pacs_node.status.FailReason` or the failing writer's
  reason, an audit line); the next image proceeds. A batch whose inference fails is retried
  image by image. Results handed over before a writer failed (the report, when the overlay
  fails) stay handed over and are delivered, as the failed line's ``outputs`` says.
* Two batches in flight at most: while the results of one are built and handed over (a
  second thread, ``results``), the next is read, decoded and run through the model, the
  decoded images of both within ``batch_memory_mb``. An image taken alone (a suspect, or
  the only one waiting) is in flight alone: it starts once the batch before it is done,
  and the next starts once it is done, so that a death of the process counts against it
  alone (:data:`MAX_SOLO_STARTS`). Results leave in the order the images were taken.
* Passing conditions (a full disk, memory) are retried with backoff, never parked.
* A batch in flight when the process (or the worker) died is retried one image at a time; an image in
  flight alone at :data:`MAX_SOLO_STARTS` deaths goes to ``failed/`` (crash-loop).
* :meth:`Pipeline.resume` re-queues every instance still in the spool, so after a crash
  (``kill -9`` included) nothing acknowledged is lost; result UIDs are deterministic, so an
  instance processed twice yields the same objects, not twice as many.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dp_transforms import ImageError
from pacs_node import logs
from pacs_node.audit import safe_uid
from pacs_node.config import NodeConfig
from pacs_node.delivery.outbox import DestinationSender
from pacs_node.files import atomic_file, is_transient, private_folder
from pacs_node.intake.sanitize import Cleaned, clean_source, text
from pacs_node.intake.screen import screen
from pacs_node.intake.spool import Receipt, Spool
from pacs_node.intake.work import WorkQueue
from pacs_node.model.predictor import NodePredictor, Prediction, Prepared, held_bytes, prepare
from pacs_node.outcomes import Failed, Image, Inferred, Outcomes, Processed, Retried, Skipped
from pacs_node.results.base import Result, ResultContext, ResultWriter
from pacs_node.results.identity import ResultIdentity, rendition
from pacs_node.results.registry import build_order
from pacs_node.scale.db import Unavailable
from pacs_node.status import FailReason
from pacs_node.uids import is_valid_uid

logger = logging.getLogger(__name__)

#: An instance in flight, alone, at this many deaths of the process or its worker (a file that
#: crashes a decoder, say) is moved to spool/failed instead of being tried again.
MAX_SOLO_STARTS = 3
#: Backoff of an instance put back for a passing condition (a full disk), and how often an
#: image that exhausts the memory on its own is tried.
RETRY_INITIAL_S, RETRY_MAX_S = 2.0, 300.0
MAX_MEMORY_RETRIES = 5


@dataclass(kw_only=True)
class Item:
    """One received instance on its way through the worker; ``stage`` is the failure reason
    should the step under way raise."""

    path: Path
    receipt: Receipt | None
    dataset: Dataset | None = None
    prepared: Prepared | None = None
    clean: Cleaned | None = None
    stage: str = FailReason.READ
    timings: dict[str, float] = field(default_factory=dict)
    #: The UIDs of the results handed over so far (a failure after them leaves them delivered).
    handed_over: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    read_at: float = 0.0
    #: Put back for later (a full disk, memory): no longer this batch's to end or fail.
    requeued: bool = False

    @property
    def sop_instance_uid(self) -> str:
        return safe_uid(self.receipt.sop_instance_uid) if self.receipt else ""

    def image(self) -> Image:
        """The image as the records name it: the study its results went into (a derived one when
        the source's was missing or invalid), who sent it, how long each step took."""
        study = self.clean.dataset if self.clean is not None else self.dataset
        return Image(
            sop_instance_uid=self.sop_instance_uid,
            calling_ae=self.receipt.calling_ae if self.receipt else None,
            peer=self.receipt.peer if self.receipt else None,
            study_instance_uid=safe_uid(text(study, "StudyInstanceUID"))
            if study is not None
            else None,
            sop_class_uid=safe_uid(text(self.dataset, "SOPClassUID"))
            if self.dataset is not None
            else None,
            received=self.receipt.received if self.receipt else None,
            timings=dict(self.timings),
        )


@dataclass(kw_only=True)
class Batch:
    """Images taken together, past the model: their results are still to be built."""

    items: list[Item]
    inferred: list[tuple[Item, Prediction]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def held(self) -> int:
        """Bytes its decoded images hold until their results are written."""
        return sum(
            item.prepared.canvas.nbytes + item.prepared.source.pixels.nbytes
            for item, _ in self.inferred
            if item.prepared is not None
        )


class Pipeline:
    """The worker's steps, in order: ``read`` (and screen), ``decode``, ``infer`` (one pass per
    batch), ``write`` (every output kind), ``hand over``; each image's outcome is emitted."""

    def __init__(
        self,
        *,
        config: NodeConfig,
        spool: Spool,
        predictor: NodePredictor,
        writers: list[ResultWriter],
        senders: list[DestinationSender],
        outcomes: Outcomes,
        prune_due: threading.Event,
    ) -> None:
        self.config, self.spool, self.predictor, self.writers, self.senders = (
            config,
            spool,
            predictor,
            writers,
            senders,
        )
        #: The writers in the order their results are built and handed over: the report first.
        self.build_order = build_order(writers)
        self.outcomes, self.prune_due = outcomes, prune_due
        #: The settings' share of every result's UIDs (identity.rendition), fixed at start.
        self.rendition = rendition(config, predictor.contract)
        self.work = WorkQueue(self._held_bytes)
        self.output_dir = Path(config.output_dir)
        self.last_progress = time.monotonic()
        self._retries: dict[str, int] = {}
        #: The batches in flight (taken, not yet ended), by identity: at most two.
        self._in_flight: dict[int, Batch] = {}
        #: The batch whose results are being built, on its own thread.
        self._building: _Building | None = None

    # --- the worker's loop ---------------------------------------------------------------------------

    def resume(self) -> None:
        """Queue what the spool holds from before the last stop: suspects alone, quarantining
        those that were in flight alone at too many deaths."""
        for path, starts in self.spool.quarantine(MAX_SOLO_STARTS):
            self._quarantined(path, starts)
        suspects = sorted(self.spool.incoming / name for name in self.spool.suspects())
        self.work.put_suspects(suspects)
        pending = [p for p in self.spool.pending() if p not in suspects]
        for path in pending:
            self.work.put(path)
        if suspects or pending:
            logger.info(
                "%d instance(s) from before the last stop are queued again (%d retried alone)",
                len(suspects) + len(pending),
                len(suspects),
            )

    @property
    def busy_since(self) -> float | None:
        """When the oldest batch in flight was taken; None when none is."""
        starts = [batch.started for batch in list(self._in_flight.values())]
        return min(starts) if starts else None

    def run(self, stopping: threading.Event) -> None:
        """The worker thread's body until ``stopping`` is set: reads, decodes and infers one
        batch while a ``results`` thread builds and hands over the one before."""
        try:
            self._loop(stopping)
        except BaseException:
            # what no ``except Exception`` catches, in either thread: once the results thread
            # is done, every image still in flight is tried again, each alone
            building, self._building = self._building, None
            if building is not None:
                with contextlib.suppress(BaseException):
                    building.wait()
            for batch in list(self._in_flight.values()):
                live = [i.path for i in batch.items if not i.requeued]
                self.work.put_suspects([path for path in live if path.exists()])
                self.spool.end([path for path in live if not path.exists()])
            self._in_flight.clear()  # the restarted worker's to take again
            raise  # the thread ends here; the supervisor starts another

    def _loop(self, stopping: threading.Event) -> None:
        budget = self.config.batch_memory_mb * 2**20
        while not stopping.is_set():
            held = self._building.batch.held if self._building is not None else 0
            paths = self.work.take(self.config.batch_size, 0.2, max(1, budget - held))
            if stopping.is_set():  # what was taken stays in the spool for the next start
                break
            # idle, or an image taken alone: in flight after the batch before it, before the next
            if len(paths) <= 1:
                self._wait_building(paths)
                if paths and (batch := self._front(paths, alone=True)) is not None:
                    self._finish(batch)
                elif not paths:
                    self.last_progress = time.monotonic()
                continue
            batch = self._front(paths, alone=False)
            self._wait_building([])
            if batch is not None:
                self._building = _Building(batch, self._finish)
        self._wait_building([])

    def _wait_building(self, taken: list[Path]) -> None:
        """Until the batch being built is done; what ended its thread is raised here, ``taken``
        (images taken, not begun) put back first, to be tried alone."""
        building = self._building
        if building is None:
            return
        try:
            building.wait()
        except BaseException:
            self.work.put_suspects(taken)
            raise
        self._building = None

    def _held_bytes(self, path: Path) -> int:
        """What the image at ``path`` will hold in a batch, from its header's Rows and Columns (0: unreadable)."""
        try:
            found = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            return held_bytes(
                int(found.Rows),
                int(found.Columns),
                self.predictor.contract.image_size,
                self.config.overlay_max_side,
            )
        except Exception:  # noqa: BLE001 - the worker reports an unreadable file when it reads it
            return 0

    def _front(self, paths: list[Path], *, alone: bool) -> Batch | None:
        """Begin ``paths`` (durably; ``alone``: taken alone, nothing else in flight), read,
        decode and infer them; None when none is left to build (each already ended: skipped,
        failed, put back)."""
        paths = [p for p in paths if not self._crash_loop(p)]
        if not paths:
            return None
        batch = Batch(items=[Item(path=p, receipt=self.spool.receipt(p)) for p in paths])
        try:
            self.spool.begin(paths, alone=alone)  # before anything that could kill the process
        except OSError as exc:
            for item in batch.items:
                self._retry(item, exc, begun=False)
            return None
        self._in_flight[id(batch)] = batch
        with self._guard(batch):
            ready = [
                item
                for item in batch.items
                if self._step(item, self._read) and self._step(item, self._decode)
            ]
            batch.inferred = self._infer(ready)
        return batch

    def _finish(self, batch: Batch) -> None:
        """Build and hand over the results of a batch past the model, then end it."""
        with self._guard(batch):
            for item, prediction in batch.inferred:
                self._step(
                    item, functools.partial(self._write_and_hand_over, prediction=prediction)
                )
        batch.inferred = []
        for item in batch.items:  # its images are no longer held
            item.prepared = item.dataset = item.clean = None
        self.spool.end([item.path for item in batch.items if not item.requeued])
        self._in_flight.pop(id(batch), None)
        self.last_progress = time.monotonic()

    @contextlib.contextmanager
    def _guard(self, batch: Batch) -> Iterator[None]:
        """A fault of the node's own fails the batch's images still in the spool, and the node
        keeps serving (what no ``except Exception`` catches ends the worker: :meth:`run`)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a fault of the node's own, not of the image: record it, keep serving
            logger.error("internal error while processing a batch (%s)", logs.describe(exc))
            for item in batch.items:
                if item.path.exists() and not item.requeued:
                    self._fail(item, FailReason.INTERNAL, logs.describe(exc))

    def _crash_loop(self, path: Path) -> bool:
        """True (and the instance quarantined) when it was in flight, alone, at too many deaths."""
        attempts = self.spool.attempts.get(path.name)
        if attempts is None or attempts.solo < MAX_SOLO_STARTS:
            return False
        self.spool.fail(
            path,
            FailReason.CRASH_LOOP,
            f"in flight, alone, at {attempts.solo} deaths of the worker",
        )
        self.spool.end([path])
        self._quarantined(self.spool.failed / path.name, attempts.solo)
        return True

    # --- the steps -----------------------------------------------------------------------------------

    def _step(self, item: Item, step: Callable[[Item], bool]) -> bool:
        """Run one step for one image; whatever it raises costs this image alone."""
        try:
            return step(item)
        except Exception as exc:  # noqa: BLE001 - isolation per image
            self._raised(item, exc)
            return False

    def _raised(self, item: Item, exc: Exception) -> None:
        """A passing condition puts the image back for later; anything else fails it, at its stage."""
        if _transient(exc):
            self._retry(item, exc)
        else:
            self._fail(item, item.stage, logs.describe(exc))

    def _read(self, item: Item) -> bool:
        """Read the header (large elements stay on disk) and screen it; False (and recorded) when it gets no result."""
        item.read_at = time.perf_counter()
        try:
            item.dataset = dcmread(item.path, defer_size="256 KB")
        except Exception as exc:  # whatever pydicom raises, the file is not readable
            if _transient(exc):
                raise
            return self._skip(item, "unreadable", "not a readable DICOM file")
        found = screen(item.dataset)
        if found is not None:
            return self._skip(item, found[0].value, found[1])
        return True

    def _decode(self, item: Item) -> bool:
        """The pixels on the model's canvas and as displayed, and the cleaned data set the writers copy from."""
        assert item.dataset is not None  # _read succeeded
        try:
            item.prepared = prepare(
                item.dataset,
                self.predictor.contract.image_size,
                item.sop_instance_uid or "image",
                self.config.overlay_max_side,
            )
        except ImageError as exc:
            return self._skip(item, exc.reason.value, logs.redact(exc.detail))
        item.clean = clean_source(item.dataset)
        item.timings["decode"] = time.perf_counter() - item.read_at
        return True

    def _infer(self, ready: list[Item]) -> list[tuple[Item, Prediction]]:
        """One forward pass for the batch; if it fails, one pass per image, so that one image costs only itself."""
        if not ready:
            return []
        for item in ready:
            item.stage = FailReason.INFERENCE
        start = time.perf_counter()
        try:
            predictions = self.predictor.predict([_prepared(item) for item in ready])
        except Exception as exc:  # noqa: BLE001 - isolation per image
            if len(ready) > 1:  # one image's fault, or a batch too large for the memory: one by one
                logger.warning(
                    "inference failed for a batch of %d (%s); trying the images one by one",
                    len(ready),
                    logs.describe(exc),
                )
                return [pair for item in ready for pair in self._infer([item])]
            self._raised(ready[0], exc)
            return []
        seconds = time.perf_counter() - start
        self.outcomes.emit(Inferred(seconds=seconds, images=len(ready)))
        for item in ready:
            item.timings["inference"] = seconds / len(ready)
        return list(zip(ready, predictions, strict=True))

    def _write_and_hand_over(self, item: Item, prediction: Prediction) -> bool:
        """Build each result and hand it over at once, the report first (:func:`build_order`):
        nothing the SR does not need stands between the model and the SR's send. The image
        leaves the spool only when every result is handed over; should the process die
        before, the image is processed again, and a result already handed over (the same UID,
        the same content digest) is not queued or sent twice (:meth:`DestinationSender.put`)."""
        # _decode succeeded
        assert item.clean is not None and item.dataset is not None and item.prepared is not None
        source, model = item.clean.dataset, self.predictor.contract
        context = ResultContext(
            source=source,
            received=item.dataset,
            prepared=item.prepared,
            prediction=prediction,
            model=model,
            identity=ResultIdentity.of(source, model, self.rendition),
            config=self.config,
        )
        digest = _content_digest(source, prediction)
        results: dict[str, Result] = {}
        taken: dict[str, bool] = {}
        item.timings["build"] = 0.0
        for writer in self.build_order:
            item.stage = writer.fail_reason
            t0 = time.perf_counter()
            result = results[writer.kind] = writer.build(context)
            item.timings["build"] += time.perf_counter() - t0
            item.stage = FailReason.HAND_OVER
            for destination, queued in self._hand_over(source, result, digest).items():
                taken[destination] = taken.get(destination, False) or queued
            item.handed_over.append(result.uid)
        self.spool.done(item.path, source_uid=str(source.SOPInstanceUID))
        item.timings["total"] = time.perf_counter() - item.started
        self._retries.pop(item.path.name, None)
        note = item.clean.note if item.clean else ""
        self.outcomes.emit(
            Processed(
                image=item.image(),
                prediction=prediction,
                model=model,
                outputs=[results[writer.kind].uid for writer in self.writers],
                delivery=self._delivery(source, taken),
                note=note,
            )
        )
        return True

    def _hand_over(self, source: Dataset, result: Result, digest: str) -> dict[str, bool]:
        """One result into the outbox of every destination that takes it, durably, each
        sender woken at once; with no destination, into ``output_dir/<StudyInstanceUID>``.
        The destinations that take it: True where it was queued, False where it had been
        delivered before."""
        if not self.senders:
            folder = self._study_folder(str(source.StudyInstanceUID))
            with atomic_file(folder / result.file_name) as handle:
                handle.write(result.data)
            return {}
        taken: dict[str, bool] = {}
        for sender in self.senders:
            if sender.takes(result):
                put = sender.put(result, str(source.SOPInstanceUID), digest)
                taken[str(sender.destination)] = put is not None
                sender.wake()
        return taken

    def _delivery(self, source: Dataset, taken: dict[str, bool]) -> str:
        """Where an image's results went, in words: ``queued for A, B; already delivered to C``."""
        if not self.senders:
            return f"written to {self._study_folder(str(source.StudyInstanceUID))}"
        names = [str(sender.destination) for sender in self.senders]
        queued = [name for name in names if taken.get(name)]
        had = [name for name in names if taken.get(name) is False]
        return "; ".join(
            f"{what} {', '.join(found)}"
            for what, found in (("queued for", queued), ("already delivered to", had))
            if found
        )

    def _study_folder(self, study_uid: str) -> Path:
        """The results folder of a study: only ever a valid UID under ``output_dir``."""
        if not is_valid_uid(study_uid):
            raise ValueError("a Study Instance UID that is not a valid UID never names a folder")
        root = private_folder(self.output_dir).resolve()
        folder = (root / study_uid).resolve()
        if folder.parent != root:
            raise ValueError("the results folder would leave output_dir")
        return private_folder(folder)

    # --- how an image ends ---------------------------------------------------------------------------

    def _skip(self, item: Item, reason: str, detail: str) -> bool:
        self.spool.skip(item.path)
        self.prune_due.set()
        self._retries.pop(item.path.name, None)
        self.outcomes.emit(Skipped(image=item.image(), reason=reason, detail=detail))
        return False

    def _fail(self, item: Item, reason: str, detail: str) -> None:
        self.spool.fail(item.path, reason, detail)
        self.prune_due.set()
        self._retries.pop(item.path.name, None)
        self.outcomes.emit(
            Failed(
                image=item.image(),
                reason=str(reason),
                detail=detail,
                folder=self.spool.failed,
                outputs=list(item.handed_over),
            )
        )

    def _retry(self, item: Item, exc: BaseException, *, begun: bool = True) -> None:
        """Put an instance back for later: the condition (a full disk) is expected to pass.
        Once ``begun``, it is no longer in flight: another batch may take it before this
        one ends.

        A full disk, and the scale-out mode's database out of reach, are waited out for as
        long as they last; an image that exhausts the memory alone MAX_MEMORY_RETRIES times is
        not going to fit, and fails.
        """
        if _errno(exc) in (errno.ENOSPC, errno.EDQUOT):
            reason = "disk-full"
        elif isinstance(exc, Unavailable):
            reason = "database-unavailable"
        else:
            reason = "resources"
        count = self._retries[item.path.name] = self._retries.get(item.path.name, 0) + 1
        if reason == "resources" and count > MAX_MEMORY_RETRIES:
            self._fail(item, item.stage, f"out of memory {count} times ({logs.describe(exc)})")
            return
        if begun:
            item.requeued = True
            self.spool.end([item.path])
        delay = min(RETRY_MAX_S, RETRY_INITIAL_S * 2 ** (count - 1))
        why = getattr(exc, "strerror", None) or type(exc).__name__
        self.outcomes.emit(Retried(image=item.image(), reason=reason, why=why, delay=delay))
        self.work.retry_later(item.path, delay)

    def _quarantined(self, path: Path, starts: int) -> None:
        image = Item(path=path, receipt=self.spool.receipt(path)).image()
        detail = f"in flight, alone, at {starts} deaths of the node; quarantined"
        self.outcomes.emit(
            Failed(
                image=image,
                reason=str(FailReason.CRASH_LOOP),
                detail=detail,
                folder=path.parent,
                deaths=starts,
            )
        )


class _Building:
    """One batch's results built on a thread of their own (a daemon: a hand-over stuck on a
    dead disk does not hold the process when it must end); :meth:`wait` raises what ended it."""

    def __init__(self, batch: Batch, finish: Callable[[Batch], None]) -> None:
        self.batch = batch
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(finish,), name="results", daemon=True
        )
        self._thread.start()

    def _run(self, finish: Callable[[Batch], None]) -> None:
        try:
            finish(self.batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the worker, which ends with it
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _prepared(item: Item) -> Prepared:
    """An item's decoded image; only items that passed the decode step reach inference."""
    assert item.prepared is not None
    return item.prepared


def _content_digest(source: Dataset, prediction: Prediction) -> str:
    """What the results say, in short: the copied source attributes and the model's answer,
    its numbers at the precision the results state them (percent, two decimals, as the SR).

    The same image processed again gives the same digest (nothing is sent twice), also in
    another batch: batched inference is not bit-exact, and at six decimals the digest of 2 of
    48 images processed alone differed from their digest in batches of 8 (demo model, CPU,
    up to 1.8e-7 apart), so a resend was taken for a correction and delivered again; at
    the stated precision none did. The same instance sent again with
    corrected patient data, or a number the results would state differently, gives another
    digest (the correction is sent).
    """
    digest = hashlib.sha256()
    for element in source:
        digest.update(f"{element.tag}={element.value}\x1f".encode(errors="replace"))
    stated = [
        *prediction.probabilities.astype("float64").tolist(),
        *prediction.box_scores,
        prediction.operating_point,
    ]
    digest.update(np.round(100.0 * np.asarray(stated, dtype="float64"), 2).tobytes())
    digest.update(f"assessed={prediction.assessed}".encode())
    digest.update(prediction.boxes.astype("float32").round(2).tobytes())
    return digest.hexdigest()[:32]


def _errno(exc: BaseException | None) -> int | None:
    """The errno of ``exc`` or of the exception it was raised from."""
    while exc is not None:
        number = getattr(exc, "errno", None)
        if isinstance(number, int):
            return number
        exc = exc.__cause__ or exc.__context__
    return None


def _transient(exc: BaseException) -> bool:
    """A failure worth retrying: the disk's or the network's, or PyTorch running out of GPU
    memory (only where PyTorch runs: serving an ONNX graph, it is never imported)."""
    torch = sys.modules.get("torch")
    return is_transient(exc) or (torch is not None and isinstance(exc, torch.OutOfMemoryError))
