"""The DICOM node: receive, keep, read, report, send back, and never stop doing so.

Threads and what they own:

* association threads (pynetdicom, :mod:`pacs_node.intake.listener`): check, spool, enqueue;
  no decoding, no model;
* one worker: takes up to ``batch_size`` waiting instances, screens and decodes them,
  runs the model once for the batch (whose decoded images hold ``batch_memory_mb`` at
  most), builds the SR and the SC, puts them durably in
  every destination's outbox (or ``output_dir``), then lets the spool forget the source;
* one sender per destination (:mod:`pacs_node.delivery.outbox`);
* a supervisor: restarts a worker or sender thread that ended unexpectedly, gives up
  (``fatal``; ``dp-node`` then exits non-zero for its service manager) when one keeps
  dying, flushes the audit trail after a full disk, applies the retention limits;
* the metrics endpoint (:mod:`pacs_node.metrics`).

The promise: an image the node acknowledged gets its results or a recorded reason,
whatever the image, the peers or the machine do.

* Isolation per image: any exception while processing one image costs that image alone
  (``spool/failed/``, a stable :class:`~pacs_node.status.FailReason`, an audit line);
  the next image proceeds. A batch whose inference fails is retried image by image.
* Passing conditions (a full disk, memory) are retried with backoff, never parked.
* A batch in flight when the process died is retried one image at a time; an image in
  flight alone at :data:`MAX_SOLO_STARTS` deaths goes to ``failed/`` (crash-loop).
* Start-up re-queues every instance still in the spool, so after a crash (``kill -9``
  included) nothing acknowledged is lost; result UIDs are deterministic, so an instance
  processed twice yields the same two objects, not four.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from dp_transforms import ImageError
from pydicom import dcmread
from pydicom.dataset import Dataset

from dp_model.config import ConfigError
from pacs_node import logs
from pacs_node.audit import AuditLog, safe_uid
from pacs_node.config import Destination, NodeConfig, WebDestination, is_loopback
from pacs_node.delivery.outbox import DeliveryStats, DestinationSender
from pacs_node.delivery.registry import protocol_of
from pacs_node.files import atomic_file, is_transient, private_folder
from pacs_node.intake.listener import Listener, Refusal, client_tls, server_tls
from pacs_node.intake.sanitize import Cleaned, clean_source, text
from pacs_node.intake.screen import screen
from pacs_node.intake.spool import Receipt, Spool
from pacs_node.intake.work import WorkQueue
from pacs_node.metrics import Metrics, MetricsServer
from pacs_node.model.predictor import NodePredictor, Prediction, Prepared, held_bytes, prepare
from pacs_node.results.base import Result, ResultContext, ResultWriter
from pacs_node.results.identity import ResultIdentity
from pacs_node.results.registry import writers_for
from pacs_node.status import FailReason, StoreStatus
from pacs_node.uids import is_valid_uid

logger = logging.getLogger(__name__)

#: An instance in flight, alone, at this many deaths of the process or its worker (a file that
#: crashes a decoder, say) is moved to spool/failed instead of being tried again.
MAX_SOLO_STARTS = 3
#: A thread that ends unexpectedly this many times within RESTART_WINDOW_S is not restarted
#: again: the node reports itself failed and ``dp-node`` exits non-zero.
MAX_RESTARTS, RESTART_WINDOW_S = 5, 300.0
#: Backoff of an instance put back for a passing condition (a full disk), and how often an
#: image that exhausts the memory on its own is tried.
RETRY_INITIAL_S, RETRY_MAX_S = 2.0, 300.0
MAX_MEMORY_RETRIES = 5
#: The retention limits are applied this often, and soon after anything is kept.
PRUNE_EVERY_S = 600.0


@dataclass
class Item:
    """One received instance on its way through the worker."""

    path: Path
    receipt: Receipt | None
    dataset: Dataset | None = None
    prepared: Prepared | None = None
    clean: Cleaned | None = None
    stage: FailReason = FailReason.READ
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def sop_instance_uid(self) -> str:
        return safe_uid(self.receipt.sop_instance_uid) if self.receipt else ""


class Node:
    """A running node; :meth:`start` it, :meth:`stop` it (also used by the tests)."""

    def __init__(self, config: NodeConfig, predictor: NodePredictor | None = None) -> None:
        self._protocol = logs.install()
        self.config = config
        self.spool = Spool(config.spool, config.keep_skipped)
        self.audit = AuditLog(config.audit_path)
        self.metrics = Metrics()
        self.writers = check_outputs(config)
        self.predictor = predictor or NodePredictor(config.bundle, config.device, config.operating_point, config.heatmap_stage, config.ood_gate)
        self.work = WorkQueue(self._held_bytes)
        self.output_dir = Path(config.output_dir)
        outbox = Path(config.spool).parent / "outbox"
        self.senders = [
            DestinationSender(d, outbox, config.ae_title, config.outbox, self._delivered, _sending_tls(config, d), config.network_timeout_s, self._sent, self._held)
            for d in config.parsed_destinations()
        ]
        self.listener = Listener(config, self.spool, self.audit, self.metrics, self._gate, self.work.put)
        self.fatal: str | None = None
        self.failed = threading.Event()
        self._stopping = threading.Event()
        self._worker = self._new_worker()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._restarts: dict[str, list[float]] = {}
        self._retries: dict[str, int] = {}
        self._busy_since: float | None = None
        self._prune_due = threading.Event()
        self._last_progress = time.monotonic()
        self._http: MetricsServer | None = None
        self._register_gauges()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Re-queue the spool, start the worker, senders, supervisor, metrics endpoint and the listener."""
        self._prune()
        for path, starts in self.spool.quarantine(MAX_SOLO_STARTS):
            self._record_quarantine(path, starts)
        suspects = sorted(self.spool.incoming / name for name in self.spool.suspects())
        self.work.put_suspects(suspects)
        pending = [p for p in self.spool.pending() if p not in suspects]
        for path in pending:
            self.work.put(path)
        if suspects or pending:
            logger.info("%d instance(s) from before the last stop are queued again (%d retried alone)", len(suspects) + len(pending), len(suspects))
        self._protocol.listeners.append(self._protocol_error)
        for sender in self.senders:
            sender.start()
        self._worker.start()
        if self.config.metrics_port >= 0:
            self._http = MetricsServer(self.config.metrics_host, self.config.metrics_port, self.metrics, self.health, self.config.http_timeout_s, self.config.http_max_connections)
            self._http.start()
        self.listener.start(server_tls(self.config) if self.config.tls.listening else None)
        self._supervisor.start()
        self._announce_exposure()
        logger.info("%s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish the batch in flight, leave the rest in the spool and outboxes."""
        self._stopping.set()
        self.listener.stop()
        if self._worker.is_alive():
            self._worker.join(timeout)
        for sender in self.senders:
            sender.stop()
        if self._http is not None:
            self._http.stop()
        if self._protocol_error in self._protocol.listeners:
            self._protocol.listeners.remove(self._protocol_error)
        self.audit.close()
        logger.info("stopped; %d instance(s) left in the spool for the next start", self.spool.count())
        self.spool.close()

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def metrics_port(self) -> int | None:
        return self._http.port if self._http else None

    def _announce_exposure(self) -> None:
        """Say at start what an operator must know about who can reach the node."""
        if self.config.allow_any_caller:
            logger.warning("OPEN NODE: any calling AE title is accepted (allow_any_caller: true); name the callers in allow")
        if any(network.prefixlen == 0 for network in self.config.networks()):
            logger.warning("connections are accepted from any address (allow_networks holds a /0 network)")
        if not self.config.tls.listening and not is_loopback(self.config.host):
            logger.warning("DICOM traffic to %s:%d travels in cleartext: patient data is readable on the network (configure tls)", self.config.host, self.port)
        if self._http is not None and not is_loopback(self.config.metrics_host):
            logger.warning(
                "/health and /metrics are served to the network on %s:%d, without authentication (metrics_host); they name destinations and counts, never patient data",
                self.config.metrics_host, self.metrics_port,
            )  # fmt: skip
        for sender in self.senders:
            if isinstance(sender.destination, WebDestination) and sender.destination.cleartext:
                logger.warning("results to %s travel in cleartext: patient data is readable on the network (use https://)", sender.destination)

    # --- the association threads' view of the node ----------------------------------------------------

    def _gate(self) -> Refusal | None:
        """Whether an instance can be taken now (PS3.4 B.2.3: 0xA7xx tells the sender to retry)."""
        if self._stopping.is_set():
            return Refusal(StoreStatus.SHUTTING_DOWN, "shutting-down")
        if self.fatal:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "node-failed")
        if self.work.qsize() >= self.config.max_queue:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "queue-full")
        if self.spool.free_bytes() < self.config.min_free_mb * 2**20:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "disk-full")
        return None

    # --- worker ------------------------------------------------------------------------------------

    def _new_worker(self) -> threading.Thread:
        return threading.Thread(target=self._guarded_thread("worker", self._work), name="worker", daemon=True)

    def _guarded_thread(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        """A thread body that reports how it ended instead of printing a traceback."""

        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - the supervisor restarts the thread
                logger.critical("%s thread ended: %s", name, logs.describe(exc))

        return run

    def _work(self) -> None:
        while not self._stopping.is_set():
            batch = self.work.take(self.config.batch_size, 0.2, self.config.batch_memory_mb * 2**20)
            if batch:
                self.process(batch)
            else:
                self._last_progress = time.monotonic()

    def _held_bytes(self, path: Path) -> int:
        """What the image at ``path`` will hold in a batch, from its header's Rows and Columns (0: unreadable)."""
        try:
            found = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            return held_bytes(int(found.Rows), int(found.Columns), self.predictor.contract.image_size, self.config.overlay_max_side)
        except Exception:  # noqa: BLE001 - the worker reports an unreadable file when it reads it
            return 0

    def process(self, paths: list[Path]) -> None:
        """Screen, decode, infer (one batch), write and hand over the results of ``paths``."""
        paths = [p for p in paths if not self._crash_loop(p)]
        if not paths:
            return
        items = [Item(path, self.spool.receipt(path)) for path in paths]
        try:
            self.spool.begin(paths)  # before anything that could kill the process
        except OSError as exc:
            for item in items:
                self._retry(item, exc)
            return
        self._busy_since = time.monotonic()
        try:
            try:
                self._process(items)
            except Exception as exc:  # noqa: BLE001 - a fault of the node's own, not of the image: record it, keep serving
                logger.error("internal error while processing a batch (%s)", logs.describe(exc))
                for item in items:
                    if item.path.exists():
                        self._fail(item, FailReason.INTERNAL, logs.describe(exc))
        except BaseException:
            self.work.put_suspects([item.path for item in items if item.path.exists()])
            raise  # the thread ends here; the supervisor starts another, which tries these alone
        self.spool.end(paths)
        self._busy_since = None
        self._last_progress = time.monotonic()

    def _crash_loop(self, path: Path) -> bool:
        """True (and the instance quarantined) when it was in flight, alone, at too many deaths."""
        attempts = self.spool.attempts.get(path.name)
        if attempts is None or attempts.solo < MAX_SOLO_STARTS:
            return False
        self.spool.fail(path, FailReason.CRASH_LOOP, f"in flight, alone, at {attempts.solo} deaths of the worker")
        self.spool.end([path])
        self._record_quarantine(self.spool.failed / path.name, attempts.solo)
        return True

    def _process(self, items: list[Item]) -> None:
        ready = [item for item in items if self._step(item, self._load)]
        for item, prediction in self._infer(ready):
            self._step(item, lambda it, p=prediction: self._finish(it, p))

    def _step(self, item: Item, step: Callable[[Item], object]) -> bool:
        """Run one step for one image; whatever it raises costs this image alone."""
        try:
            return bool(step(item))
        except Exception as exc:  # noqa: BLE001 - isolation per image
            self._raised(item, exc)
            return False

    def _raised(self, item: Item, exc: Exception) -> None:
        """A passing condition puts the image back for later; anything else fails it, at its stage."""
        if _transient(exc):
            self._retry(item, exc)
        else:
            self._fail(item, item.stage, logs.describe(exc))

    def _load(self, item: Item) -> bool:
        """Read, screen and decode; False (and recorded) when the item gets no result."""
        t0 = time.perf_counter()
        try:
            item.dataset = dcmread(item.path, defer_size="256 KB")  # large elements stay on disk until read
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, the file is not readable
            if _transient(exc):
                raise
            return self._skip(item, "unreadable", "not a readable DICOM file")
        found = screen(item.dataset)
        if found is not None:
            return self._skip(item, found[0].value, found[1])
        try:
            item.prepared = prepare(item.dataset, self.predictor.contract.image_size, item.sop_instance_uid or "image", self.config.overlay_max_side)
        except ImageError as exc:
            return self._skip(item, exc.reason.value, logs.redact(exc.detail))
        item.clean = clean_source(item.dataset)
        item.timings["decode"] = time.perf_counter() - t0
        return True

    def _infer(self, ready: list[Item]) -> list[tuple[Item, Prediction]]:
        """One forward pass for the batch; if it fails, one pass per image, so that one image costs only itself."""
        if not ready:
            return []
        for item in ready:
            item.stage = FailReason.INFERENCE
        start = time.perf_counter()
        try:
            predictions = self.predictor.predict([item.prepared for item in ready])
        except Exception as exc:  # noqa: BLE001 - isolation per image
            if len(ready) > 1:  # one image's fault, or a batch too large for the memory: one by one
                logger.warning("inference failed for a batch of %d (%s); trying the images one by one", len(ready), logs.describe(exc))
                return [pair for item in ready for pair in self._infer([item])]
            self._raised(ready[0], exc)
            return []
        seconds = time.perf_counter() - start
        self.metrics.observe("inference_seconds", seconds)
        for item in ready:
            item.timings["inference"] = seconds / len(ready)
        return list(zip(ready, predictions))

    def _finish(self, item: Item, prediction: Prediction) -> bool:
        t0 = time.perf_counter()
        source, model = item.clean.dataset, self.predictor.contract
        context = ResultContext(
            source=source, received=item.dataset, prepared=item.prepared, prediction=prediction, model=model,
            identity=ResultIdentity.of(source, model), config=self.config,
        )  # fmt: skip
        results = []
        for writer in self.writers:
            item.stage = writer.fail_reason
            results.append(writer.build(context))
        item.timings["build"] = time.perf_counter() - t0
        item.stage = FailReason.HAND_OVER
        delivery = self._hand_over(source, results, _content_digest(source, prediction))
        self.spool.done(item.path)
        self._processed(item, prediction, [r.uid for r in results], delivery)
        return True

    def _processed(self, item: Item, prediction: Prediction, outputs: list[str], delivery: str) -> None:
        model = self.predictor.contract
        item.timings["total"] = time.perf_counter() - item.started
        if item.receipt is not None:
            self.metrics.observe("processing_seconds", max(0.0, time.time() - item.receipt.received))
        result = {
            "label": prediction.label, "positive": prediction.positive, "pneumonia_probability": round(prediction.pneumonia_probability, 4),
            "regions": len(prediction.boxes), "model": model.name, "model_version": model.version, "assessed": prediction.assessed,
        }  # fmt: skip
        if prediction.triage_point is not None:
            result["triage"] = prediction.triage
        if prediction.ood_score is not None:
            result["ood_score"] = round(prediction.ood_score, 2) if np.isfinite(prediction.ood_score) else None
        if not prediction.assessed:  # no finding asserted, so no probability stated either (as in the SR and SC)
            result = {k: v for k, v in result.items() if k != "pneumonia_probability"} | {"label": None, "positive": None, "not_assessed": "out-of-distribution"}
        outcome = "not-assessed" if not prediction.assessed else "positive" if prediction.positive else "negative"
        self.metrics.inc("processed", outcome=outcome)
        if prediction.triage:
            self.metrics.inc("triage_flags")
        if not prediction.assessed:
            self.metrics.inc("out_of_distribution")
        said = f"{prediction.label}, pneumonia {100 * prediction.pneumonia_probability:.0f}%" if prediction.assessed else "not assessed (outside the training distribution)"
        logger.info(
            "%s: %s%s, %d region(s), %.0f ms; %s",
            item.sop_instance_uid, said, ", TRIAGE" if prediction.triage else "", len(prediction.boxes), 1000 * item.timings["total"], delivery,
        )  # fmt: skip
        note = item.clean.note if item.clean else ""
        self._audit(item, "processed", result=result, outputs=outputs, delivery=delivery, detail=note or None)

    def _hand_over(self, source: Dataset, results: list[Result], digest: str) -> str:
        """Results into the outbox of every destination that takes them, durably; with no
        destination, into ``output_dir/<StudyInstanceUID>``."""
        if not self.senders:
            folder = self._study_folder(str(source.StudyInstanceUID))
            for result in results:
                with atomic_file(folder / result.file_name) as handle:
                    handle.write(result.data)
            return f"written to {folder}"
        queued, had = [], []
        for sender in self.senders:
            taken = [result for result in results if sender.takes(result)]
            if not taken:
                continue
            put = [sender.put(result, str(source.SOPInstanceUID), digest) for result in taken]
            (queued if any(put) else had).append(str(sender.destination))
            sender.wake()
        return "; ".join(f"{what} {', '.join(names)}" for what, names in (("queued for", queued), ("already delivered to", had)) if names)

    def _study_folder(self, study_uid: str) -> Path:
        """The results folder of a study: only ever a valid UID under ``output_dir``."""
        if not is_valid_uid(study_uid):
            raise ValueError("a Study Instance UID that is not a valid UID never names a folder")
        root = private_folder(self.output_dir).resolve()
        folder = (root / study_uid).resolve()
        if folder.parent != root:
            raise ValueError("the results folder would leave output_dir")
        return private_folder(folder)

    # --- outcomes ------------------------------------------------------------------------------------

    def _skip(self, item: Item, reason: str, detail: str) -> bool:
        self.spool.skip(item.path)
        self._prune_due.set()
        self.metrics.inc("skipped", reason=reason)
        logger.info("%s: no result: %s (%s)", item.sop_instance_uid, reason, detail)
        self._audit(item, "skipped", skip_reason=reason, detail=detail)
        return False

    def _fail(self, item: Item, reason: FailReason, detail: str) -> None:
        self.spool.fail(item.path, reason, detail)
        self._prune_due.set()
        self.metrics.inc("failed", reason=reason)
        logger.error("%s: failed (%s): %s; kept in %s", item.sop_instance_uid, reason, detail, self.spool.failed)
        self._audit(item, "failed", reason=str(reason), detail=detail)

    def _retry(self, item: Item, exc: BaseException) -> None:
        """Put an instance back for later: the condition (a full disk) is expected to pass.

        A full disk is waited out for as long as it lasts; an image that exhausts the memory
        alone MAX_MEMORY_RETRIES times is not going to fit, and fails.
        """
        reason = "disk-full" if _errno(exc) in (errno.ENOSPC, errno.EDQUOT) else "resources"
        count = self._retries[item.path.name] = self._retries.get(item.path.name, 0) + 1
        if reason == "resources" and count > MAX_MEMORY_RETRIES:
            self._fail(item, item.stage, f"out of memory {count} times ({logs.describe(exc)})")
            return
        delay = min(RETRY_MAX_S, RETRY_INITIAL_S * 2 ** (count - 1))
        self.metrics.inc("retries", reason=reason)
        logger.warning("%s: %s (%s); tried again in %.0f s", item.sop_instance_uid, reason, getattr(exc, "strerror", None) or type(exc).__name__, delay)
        self.work.retry_later(item.path, delay)

    def _record_quarantine(self, path: Path, starts: int) -> None:
        receipt = self.spool.receipt(path)
        logger.error("%s was in flight, alone, at %d deaths of the node; moved to %s", safe_uid(receipt.sop_instance_uid) if receipt else path.stem, starts, path.parent)
        self.metrics.inc("failed", reason=FailReason.CRASH_LOOP)
        self._audit(Item(path, receipt), "failed", reason=str(FailReason.CRASH_LOOP), detail=f"in flight, alone, at {starts} deaths of the node; quarantined")

    def _audit(self, item: Item, status: str, **fields) -> None:
        self._retries.pop(item.path.name, None)
        ds = item.dataset
        # The study the results went into: a derived one when the source's was missing or invalid.
        study = item.clean.dataset if item.clean is not None else ds
        self.audit.write(
            "received",
            calling_ae=item.receipt.calling_ae if item.receipt else None,
            peer=item.receipt.peer if item.receipt else None,
            sop_instance_uid=item.sop_instance_uid or None,
            study_instance_uid=safe_uid(text(study, "StudyInstanceUID")) if study is not None else None,
            sop_class_uid=safe_uid(text(ds, "SOPClassUID")) if ds is not None else None,
            status=status,
            timings_ms={k: round(1000 * v, 1) for k, v in item.timings.items()},
            **fields,
        )

    def _delivered(self, destination, sop_uid: str, source_uid: str, reason: str | None) -> None:
        if reason is None:
            self.metrics.inc("delivered", destination=str(destination))
        else:
            self.metrics.inc("dead_letters", destination=str(destination), reason=reason)
        self.audit.write(
            "delivery", sop_instance_uid=safe_uid(source_uid), outputs=[sop_uid], destination=str(destination),
            status="delivered" if reason is None else "dead-letter", reason=reason,
        )  # fmt: skip

    def _held(self, destination, reason: str | None, detail: str) -> None:
        """A destination's deliveries held until a person acts (reason), or resumed (None)."""
        if reason is not None:
            self.metrics.inc("delivery_holds", destination=str(destination), reason=reason)
        self.audit.write("delivery", destination=str(destination), status="held" if reason else "resumed", reason=reason, detail=detail)

    def _sent(self, seconds: float) -> None:
        self.metrics.observe("delivery_seconds", seconds)

    def _protocol_error(self) -> None:
        self.metrics.inc("protocol_errors")

    # --- supervision ---------------------------------------------------------------------------------

    def _supervise(self) -> None:
        last_prune = time.monotonic()
        while not self._stopping.wait(0.5):
            try:
                self._revive("worker", self._worker.is_alive, self._restart_worker)
                self._revive("listener", lambda: self.listener.alive, self.listener.restart)
                for sender in self.senders:
                    self._revive(f"send-{sender.destination.name}", lambda s=sender: s.alive, sender.restart)
                if self.audit.backlog:
                    self.audit.flush()
                if self._prune_due.is_set() or time.monotonic() - last_prune > PRUNE_EVERY_S:
                    self._prune_due.clear()
                    self._prune()
                    last_prune = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the supervisor outlives what it supervises
                logger.error("supervisor: %s", logs.describe(exc))

    def _revive(self, name: str, alive: Callable[[], bool], restart: Callable[[], None]) -> None:
        if alive() or self.fatal or self._stopping.is_set():
            return
        now = time.monotonic()
        recent = [t for t in self._restarts.get(name, []) if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS:
            self._give_up(f"the {name} thread ended {len(recent) + 1} times within {RESTART_WINDOW_S:.0f} s")
            return
        self._restarts[name] = [*recent, now]
        self.metrics.inc("thread_restarts", thread=name)
        logger.error("the %s thread ended unexpectedly; starting it again", name)
        restart()

    def _restart_worker(self) -> None:
        self._busy_since = None
        self._worker = self._new_worker()
        self._worker.start()

    def _give_up(self, why: str) -> None:
        self.fatal = why
        logger.critical("%s: the node stops taking images; its service manager should restart it", why)
        self.audit.write("node", status="failed", reason="thread-crash-loop", detail=why)
        self.failed.set()

    def _prune(self) -> None:
        retention = self.config.retention
        removed = self.spool.prune((retention.skipped_days, retention.skipped_max_mb), (retention.failed_days, retention.failed_max_mb))
        for sender in self.senders:
            removed += sender.prune_dead_letters(retention.failed_days, retention.failed_max_mb)
        if removed:
            logger.info("retention: %d kept image(s) removed (older or beyond the size limit)", removed)

    # --- health --------------------------------------------------------------------------------------

    def health(self) -> dict:
        """``ok``, ``degraded`` (with the problems found) or ``failed``; what ``/health`` answers."""
        problems = self._problems()
        status = "failed" if self.fatal else ("degraded" if problems else "ok")
        return {
            "status": status, "problems": ([self.fatal] if self.fatal else []) + problems, "worker_alive": self._worker.is_alive(),
            "disk_ok": self._disk_ok(), "spool_free_mb": self.spool.free_bytes() // 2**20, "queue": self.work.qsize(), "retrying": self.work.retrying,
            "model": self.predictor.contract.name, "model_version": self.predictor.contract.version,
            "destinations": {str(s.destination): _sender_state(s) for s in self.senders},
        }  # fmt: skip

    def _disk_ok(self) -> bool:
        return self.spool.free_bytes() >= self.config.min_free_mb * 2**20

    def _problems(self) -> list[str]:
        now, stall = time.monotonic(), self.config.stall_after_s
        problems = []
        if self._stopping.is_set():
            problems.append("stopping")
        elif not self._worker.is_alive():
            problems.append("the worker thread is not running")
        if self._busy_since is not None and now - self._busy_since > stall:
            problems.append(f"the worker has been on one batch for {now - self._busy_since:.0f} s")
        elif self._busy_since is None and self.work.qsize() > self.work.retrying and now - self._last_progress > stall:
            problems.append(f"the queue of {self.work.qsize()} has not moved for {now - self._last_progress:.0f} s")
        if self.work.retrying:
            problems.append(f"{self.work.retrying} image(s) waiting to be tried again (disk or memory full)")
        if not self._disk_ok():
            problems.append(
                f"the spool's disk has {self.spool.free_bytes() // 2**20} MB free, below min_free_mb ({self.config.min_free_mb} MB): "
                "new images are refused (0xA700) until space is freed"
            )  # fmt: skip
        if self.audit.backlog:
            problems.append(f"{self.audit.backlog} audit line(s) waiting for the disk")
        if not self.listener.alive:
            problems.append("the DICOM listener is not running")
        problems += self.listener.problems()
        problems += [problem for sender in self.senders for problem in _sender_problems(sender, now, stall, self.config.outbox.stall_after_s)]
        return problems

    def _register_gauges(self) -> None:
        def per_destination(read: Callable[[DestinationSender], float]) -> Callable[[], dict]:
            return lambda: {(("destination", str(s.destination)),): read(s) for s in self.senders}

        self.metrics.gauge("queue_depth", lambda: {(): float(self.work.qsize())}, "instances waiting for the model, retries included")
        self.metrics.gauge("outbox_backlog", per_destination(lambda s: float(s.stats.backlog)), "results waiting to be sent")
        self.metrics.gauge("outbox_oldest_seconds", per_destination(lambda s: _waited(s.stats) or 0.0), "how long the oldest result waiting for a destination has waited (0: none waits)")
        self.metrics.gauge("destination_failing_seconds", per_destination(lambda s: _failing(s.stats) or 0.0), "how long every try to deliver to a destination has failed (0: not failing)")
        self.metrics.gauge("spool_free_bytes", lambda: {(): float(self.spool.free_bytes())}, "free space on the spool's disk (below min_free_mb, images are refused)")
        self.metrics.gauge("healthy", lambda: {(): float(self.health()["status"] == "ok")}, "1 when /health says ok")


def check_outputs(config: NodeConfig) -> list[ResultWriter]:
    """The writers of ``outputs``; a ConfigError naming the key when an output kind, a
    destination's protocol, or a kind a destination lists is not one the node has, or when a
    destination could never take anything the node writes."""
    writers = writers_for(config.outputs)
    for index, destination in enumerate(config.parsed_destinations()):
        protocol = protocol_of(destination)
        listed = writers_for(destination.outputs, f"destinations[{index}].outputs") if destination.outputs else writers
        missing = [w.kind for w in listed if w.kind not in config.outputs]
        if missing:
            raise ConfigError(f"destinations[{index}].outputs lists {', '.join(missing)}, which outputs does not write ({', '.join(config.outputs)})")
        media = {w.kind: w.media_type for w in listed}
        if not any(m in protocol.media_types for m in media.values()):
            raise ConfigError(f"destinations[{index}] ({protocol.name}) carries none of the outputs it would take: {', '.join(media)}")
    return writers


def _waited(stats: DeliveryStats) -> float | None:
    """Seconds the oldest result waiting has waited, or None when none waits."""
    return None if stats.oldest is None else max(0.0, time.time() - stats.oldest)


def _failing(stats: DeliveryStats) -> float | None:
    """Seconds every try to deliver has failed, or None when the last one delivered."""
    return None if stats.failing_since is None else time.monotonic() - stats.failing_since


def _sender_state(sender: DestinationSender) -> dict:
    stats = sender.stats
    waited, failing = _waited(stats), _failing(stats)
    return {
        "backlog": stats.backlog, "last_error": stats.last_error, "alive": sender.alive,
        "oldest_s": None if waited is None else round(waited, 1), "failing_s": None if failing is None else round(failing, 1),
    }  # fmt: skip


def _sender_problems(sender: DestinationSender, now: float, stall: float, late: float) -> list[str]:
    """What is wrong with one destination's deliveries: a dead or stuck sender, held results,
    or results not getting through (the oldest waiting, or every try failing, past ``late``)."""
    if not sender.alive:
        return [f"the sender to {sender.destination} is not running"]
    if sender.stats.held:
        return [f"the sender to {sender.destination} holds its results ({sender.stats.held}): {sender.stats.last_error}"]
    problems = []
    busy = sender.stats.busy_since
    if busy is not None and now - busy > stall:
        problems.append(f"the sender to {sender.destination}: one delivery has taken {now - busy:.0f} s")
    waited, failing = _waited(sender.stats) or 0.0, _failing(sender.stats)
    if waited > late or (failing or 0.0) > late:
        problem = f"results for {sender.destination} are not getting through: {sender.stats.backlog} waiting, the oldest for {waited:.0f} s"
        if failing is not None:
            problem += f"; every try has failed for {failing:.0f} s ({sender.stats.last_error})"
        problems.append(problem)
    return problems


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
    stated = [*prediction.probabilities.astype("float64").tolist(), *prediction.box_scores, prediction.operating_point]
    digest.update(np.round(100.0 * np.asarray(stated, dtype="float64"), 2).tobytes())
    digest.update(f"assessed={prediction.assessed}".encode())
    digest.update(prediction.boxes.astype("float32").round(2).tobytes())
    return digest.hexdigest()[:32]


def _errno(exc: BaseException | None) -> int | None:
    """The errno of ``exc`` or of the exception it was raised from."""
    while exc is not None:
        if getattr(exc, "errno", None) is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def _transient(exc: BaseException) -> bool:
    return is_transient(exc) or isinstance(exc, torch.OutOfMemoryError)


def _sending_tls(config: NodeConfig, destination: Destination | WebDestination) -> ssl.SSLContext | None:
    """The client TLS context for one destination: https:// always, C-STORE with ``tls.send``."""
    if config.tls.send or (isinstance(destination, WebDestination) and destination.https):
        return client_tls(config)
    return None
