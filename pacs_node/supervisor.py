"""Keeping the node's threads alive and saying how the node is: restarts, retention, health.

* The worker thread runs :meth:`~pacs_node.pipeline.Pipeline.run`; it, the listener and every
  sender are restarted when they end unexpectedly, and the node gives up (``fatal``;
  ``dp-node`` then exits non-zero for its service manager) when one keeps dying:
  :data:`MAX_RESTARTS` ends within :data:`RESTART_WINDOW_S`.
* The audit trail is flushed after a full disk; the retention limits are applied every
  :data:`PRUNE_EVERY_S` and soon after anything is kept.
* :meth:`Supervisor.health` is what ``/health`` answers: ``ok``, ``degraded`` with the
  problems found (a stalled worker or sender, a full disk, results not getting through), or
  ``failed``; the gauges of ``/metrics`` read the same state.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from pacs_node import logs
from pacs_node.audit import AuditLog
from pacs_node.config import NodeConfig
from pacs_node.delivery.outbox import DeliveryStats, DestinationSender
from pacs_node.intake.listener import Listener
from pacs_node.intake.spool import Spool
from pacs_node.metrics import Labels, Metrics
from pacs_node.outcomes import NodeFailed, Outcomes
from pacs_node.pipeline import Pipeline

logger = logging.getLogger(__name__)

#: A thread that ends unexpectedly this many times within RESTART_WINDOW_S is not restarted
#: again: the node reports itself failed and ``dp-node`` exits non-zero.
MAX_RESTARTS, RESTART_WINDOW_S = 5, 300.0
#: The retention limits are applied this often, and soon after anything is kept.
PRUNE_EVERY_S = 600.0


class Supervisor:
    """Owns the worker thread and its own; watches the listener and the senders."""

    def __init__(
        self,
        *,
        config: NodeConfig,
        pipeline: Pipeline,
        listener: Listener,
        senders: list[DestinationSender],
        spool: Spool,
        audit: AuditLog,
        metrics: Metrics,
        outcomes: Outcomes,
        stopping: threading.Event,
        prune_due: threading.Event,
        model: tuple[str, str],
    ) -> None:
        self.config, self.pipeline, self.listener, self.senders = (
            config,
            pipeline,
            listener,
            senders,
        )
        self.spool, self.audit, self.metrics, self.outcomes = spool, audit, metrics, outcomes
        self.stopping, self.prune_due, self.model = stopping, prune_due, model
        self.fatal: str | None = None
        self.failed = threading.Event()
        self._restarts: dict[str, list[float]] = {}
        self.worker = self._new_worker()
        self._thread = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._register_gauges()

    def start_worker(self) -> None:
        self.worker.start()

    def start(self) -> None:
        self._thread.start()

    def stop_worker(self, timeout: float) -> None:
        if self.worker.is_alive():
            self.worker.join(timeout)

    # --- threads -------------------------------------------------------------------------------------

    def _new_worker(self) -> threading.Thread:
        return threading.Thread(
            target=_guarded("worker", lambda: self.pipeline.run(self.stopping)),
            name="worker",
            daemon=True,
        )

    def _supervise(self) -> None:
        last_prune = time.monotonic()
        while not self.stopping.wait(0.5):
            try:
                self._revive("worker", self.worker.is_alive, self._restart_worker)
                self._revive("listener", lambda: self.listener.alive, self.listener.restart)
                for sender in self.senders:
                    alive = functools.partial(getattr, sender, "alive")
                    self._revive(f"send-{sender.destination.name}", alive, sender.restart)
                if self.audit.backlog:
                    self.audit.flush()
                if self.prune_due.is_set() or time.monotonic() - last_prune > PRUNE_EVERY_S:
                    self.prune_due.clear()
                    self.prune()
                    last_prune = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the supervisor outlives what it supervises
                logger.error("supervisor: %s", logs.describe(exc))

    def _revive(self, name: str, alive: Callable[[], bool], restart: Callable[[], None]) -> None:
        if alive() or self.fatal or self.stopping.is_set():
            return
        now = time.monotonic()
        recent = [t for t in self._restarts.get(name, []) if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS:
            self._give_up(
                f"the {name} thread ended {len(recent) + 1} times within {RESTART_WINDOW_S:.0f} s"
            )
            return
        self._restarts[name] = [*recent, now]
        self.metrics.inc("thread_restarts", thread=name)
        logger.error("the %s thread ended unexpectedly; starting it again", name)
        restart()

    def _restart_worker(self) -> None:
        self.worker = self._new_worker()
        self.worker.start()

    def _give_up(self, why: str) -> None:
        self.fatal = why
        self.outcomes.emit(NodeFailed(why=why))
        self.failed.set()

    def prune(self) -> None:
        """Apply the retention limits to the kept images and every destination's dead letters."""
        retention = self.config.retention
        removed = self.spool.prune(
            (retention.skipped_days, retention.skipped_max_mb),
            (retention.failed_days, retention.failed_max_mb),
        )
        for sender in self.senders:
            removed += sender.prune_dead_letters(retention.failed_days, retention.failed_max_mb)
        if removed:
            logger.info(
                "retention: %d kept image(s) removed (older or beyond the size limit)", removed
            )

    # --- health --------------------------------------------------------------------------------------

    def health(self) -> dict[str, object]:
        """``ok``, ``degraded`` (with the problems found) or ``failed``; what ``/health`` answers."""
        problems = self._problems()
        status = "failed" if self.fatal else ("degraded" if problems else "ok")
        work = self.pipeline.work
        return {
            "status": status,
            "problems": ([self.fatal] if self.fatal else []) + problems,
            "worker_alive": self.worker.is_alive(),
            "disk_ok": self._disk_ok(),
            "spool_free_mb": self.spool.free_bytes() // 2**20,
            "queue": work.qsize(),
            "retrying": work.retrying,
            "model": self.model[0],
            "model_version": self.model[1],
            "destinations": {str(s.destination): _sender_state(s) for s in self.senders},
        }

    def _disk_ok(self) -> bool:
        return self.spool.free_bytes() >= self.config.min_free_mb * 2**20

    def _problems(self) -> list[str]:
        now, stall, pipeline, work = (
            time.monotonic(),
            self.config.stall_after_s,
            self.pipeline,
            self.pipeline.work,
        )
        problems = []
        if self.stopping.is_set():
            problems.append("stopping")
        elif not self.worker.is_alive():
            problems.append("the worker thread is not running")
        if pipeline.busy_since is not None and now - pipeline.busy_since > stall:
            problems.append(
                f"the worker has been on one batch for {now - pipeline.busy_since:.0f} s"
            )
        elif (
            pipeline.busy_since is None
            and work.qsize() > work.retrying
            and now - pipeline.last_progress > stall
        ):
            problems.append(
                f"the queue of {work.qsize()} has not moved for {now - pipeline.last_progress:.0f} s"
            )
        if work.retrying:
            problems.append(
                f"{work.retrying} image(s) waiting to be tried again (disk or memory full)"
            )
        if not self._disk_ok():
            problems.append(
                f"the spool's disk has {self.spool.free_bytes() // 2**20} MB free, below min_free_mb ({self.config.min_free_mb} MB): "
                "new images are refused (0xA700) until space is freed"
            )
        if self.audit.backlog:
            problems.append(f"{self.audit.backlog} audit line(s) waiting for the disk")
        if not self.listener.alive:
            problems.append("the DICOM listener is not running")
        problems += self.listener.problems()
        problems += self.spool.problems()
        problems += [
            problem
            for sender in self.senders
            for problem in _sender_problems(sender, now, stall, self.config.outbox.stall_after_s)
        ]
        return problems

    def _register_gauges(self) -> None:
        def per_destination(
            read: Callable[[DestinationSender], float],
        ) -> Callable[[], dict[Labels, float]]:
            return lambda: {(("destination", str(s.destination)),): read(s) for s in self.senders}

        work = self.pipeline.work
        self.metrics.gauge(
            "queue_depth",
            lambda: {(): float(work.qsize())},
            "instances waiting for the model, retries included",
        )
        self.metrics.gauge(
            "outbox_backlog",
            per_destination(lambda s: float(s.stats.backlog)),
            "results waiting to be sent",
        )
        self.metrics.gauge(
            "outbox_oldest_seconds",
            per_destination(lambda s: _waited(s.stats) or 0.0),
            "how long the oldest result waiting for a destination has waited (0: none waits)",
        )
        self.metrics.gauge(
            "destination_failing_seconds",
            per_destination(lambda s: _failing(s.stats) or 0.0),
            "how long every try to deliver to a destination has failed (0: not failing)",
        )
        self.metrics.gauge(
            "spool_free_bytes",
            lambda: {(): float(self.spool.free_bytes())},
            "free space on the spool's disk (below min_free_mb, images are refused)",
        )
        self.metrics.gauge(
            "healthy",
            lambda: {(): float(self.health()["status"] == "ok")},
            "1 when /health says ok",
        )


def _guarded(name: str, target: Callable[[], None]) -> Callable[[], None]:
    """A thread body that reports how it ended instead of printing a traceback."""

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - the supervisor restarts the thread
            logger.critical("%s thread ended: %s", name, logs.describe(exc))

    return run


def _waited(stats: DeliveryStats) -> float | None:
    """Seconds the oldest result waiting has waited, or None when none waits."""
    return None if stats.oldest is None else max(0.0, time.time() - stats.oldest)


def _failing(stats: DeliveryStats) -> float | None:
    """Seconds every try to deliver has failed, or None when the last one delivered."""
    return None if stats.failing_since is None else time.monotonic() - stats.failing_since


def _sender_state(sender: DestinationSender) -> dict[str, object]:
    stats = sender.stats
    waited, failing = _waited(stats), _failing(stats)
    return {
        "backlog": stats.backlog,
        "last_error": stats.last_error,
        "alive": sender.alive,
        "oldest_s": None if waited is None else round(waited, 1),
        "failing_s": None if failing is None else round(failing, 1),
    }


def _sender_problems(sender: DestinationSender, now: float, stall: float, late: float) -> list[str]:
    """What is wrong with one destination's deliveries: a dead or stuck sender, held results,
    or results not getting through (the oldest waiting, or every try failing, past ``late``)."""
    if not sender.alive:
        return [f"the sender to {sender.destination} is not running"]
    if sender.stats.held:
        return [
            f"the sender to {sender.destination} holds its results ({sender.stats.held}): {sender.stats.last_error}"
        ]
    problems = []
    busy = sender.stats.busy_since
    if busy is not None and now - busy > stall:
        problems.append(
            f"the sender to {sender.destination}: one delivery has taken {now - busy:.0f} s"
        )
    waited, failing = _waited(sender.stats) or 0.0, _failing(sender.stats)
    if waited > late or (failing or 0.0) > late:
        problem = f"results for {sender.destination} are not getting through: {sender.stats.backlog} waiting, the oldest for {waited:.0f} s"
        if failing is not None:
            problem += f"; every try has failed for {failing:.0f} s ({sender.stats.last_error})"
        problems.append(problem)
    return problems
