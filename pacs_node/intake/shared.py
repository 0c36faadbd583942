"""The spool of a node in the scale-out mode: the same pipeline over the shared queue.

A :class:`SharedSpool` is a :class:`~pacs_node.intake.spool.Spool` whose promises are kept by
PostgreSQL rather than by this machine's disk:

* **Receiving**: :meth:`SharedSpool.admit` commits the image to the shared queue
  (:class:`~pacs_node.scale.queue.IntakeQueue`) before the C-STORE is answered, then forgets
  the local file: acknowledged = committed, in storage every node reaches.
* **Taking work**: a feeder thread leases images from the queue (oldest first, whichever node
  received them) while this node's worker has fewer than ``scale.take`` waiting, writes each
  into the local ``incoming/`` (a working copy, not a promise: a node that dies loses its
  leases, and its working copies mean nothing at its next start), and queues it for the
  worker. An image taken before by a worker that gave no answer (``attempts`` above 1: its
  node died or stalled) is a suspect, processed alone; one in flight alone at too many deaths
  is put aside (``failed/``), the single node's crash-loop rule across the fleet.
* **Heartbeat**: every third of ``scale.lease_s`` the feeder renews the leases of every image
  this node holds, in processing or with results still waiting for delivery.
* **Done**: an image leaves the queue once every result built from it is settled (delivered,
  or dead-lettered) in this node's outbox. Should the node die before, another node takes the
  image and builds the same results (deterministic UIDs and content); the shared delivery
  ledger (:mod:`pacs_node.scale.ledger`) sends what the destination does not have yet.
  Skipped and failed images leave the queue at once, kept in this node's ``skipped/`` and
  ``failed/`` for a person to look at.
* **Stopping**: images held are put back at once, their take taken back (a stop is not a death).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from pacs_node.config import NodeConfig, ScaleConfig
from pacs_node.intake.spool import Attempts, Receipt, Spool
from pacs_node.intake.work import WorkQueue
from pacs_node.scale.db import Unavailable
from pacs_node.scale.queue import IntakeQueue, Leased

logger = logging.getLogger(__name__)

#: How often an idle feeder looks for images other nodes received.
POLL_S = 0.25
#: Images committed at once by the receiving associations (each read whole into memory).
ADMITTING_AT_ONCE = 4
#: A node takes no more images while this many times ``scale.take`` wait for their deliveries
#: (a destination down): the others wait in the shared queue, for a node that can deliver.
AWAITING_PER_TAKE = 4


class Holder(Protocol):
    """What the spool asks of a destination's outbox: whether results of a source wait there."""

    def holds(self, source_uid: str) -> bool: ...


@dataclass
class _Awaiting:
    """A processed image whose results wait in the outbox: its row, the source its results
    name, and its working copy's file name (gone)."""

    leased: Leased
    source_uid: str
    name: str


def node_name(scale: ScaleConfig) -> str:
    """This node's name: the configured one, else the host name."""
    return scale.node_name or socket.gethostname()


def open_spool(config: NodeConfig) -> Spool:
    """The node's spool: its own (the embedded default), or over the shared queue
    (``scale.database``). The outbox is kept either way: its results are sent, and the shared
    ledger settles without sending what another node delivered meanwhile."""
    if not config.scale.enabled:
        return Spool(config.spool, config.keep_skipped)
    return SharedSpool(config.spool, config.keep_skipped, config.scale, config.min_free_mb)


class SharedSpool(Spool):
    """A spool whose images are held by the scale-out mode's shared queue (see the module).

    Args:
        root: the local spool folder (working copies, ``skipped/``, ``failed/``, the audit trail).
        keep_skipped: as for :class:`~pacs_node.intake.spool.Spool`.
        scale: the database, this node's name, the lease and how much to take at once.
        min_free_mb: below this much free space on the local disk, the node takes no image.

    Raises:
        pacs_node.scale.db.Unavailable: the database could not be reached at start.
        pacs_node.scale.db.DurabilityError: it runs with ``fsync = off``.
    """

    def __init__(
        self, root: str | Path, keep_skipped: bool, scale: ScaleConfig, min_free_mb: int = 0
    ) -> None:
        super().__init__(root, keep_skipped)
        self.scale, self.min_free_bytes = scale, min_free_mb * 2**20
        self.node = node_name(scale)
        self.queue = IntakeQueue(scale.database, self.node)
        #: this process's name on its leases and delivery claims
        self.owner = self.queue.owner
        #: the heartbeat's own connection: renewals never wait behind a large image
        self._beat = IntakeQueue(scale.database, self.node, owner=self.owner)
        (self.root / "attempts.json").unlink(missing_ok=True)
        self.attempts = {}
        self._receivers: queue.SimpleQueue[IntakeQueue] = queue.SimpleQueue()
        #: images being committed at once (each is read whole into memory)
        self._admitting = threading.BoundedSemaphore(ADMITTING_AT_ONCE)
        self._held: dict[str, Leased] = {}  # working copies, by file name
        self._alone: set[int] = set()  # rows counted as processed alone in this take
        self._awaiting: list[_Awaiting] = []  # processed, results not yet all settled
        self._state = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._work: WorkQueue | None = None
        self._outboxes: Sequence[Holder] = ()
        self._thread: threading.Thread | None = None
        self._heart: threading.Thread | None = None
        self._unavailable_since: float | None = None
        self._waiting = 0  # the shared queue's images, as the last heartbeat counted them
        self._adopt_own_spool()

    def _adopt_own_spool(self) -> None:
        """Move into the shared queue what this spool holds from a life as a single node
        (acknowledged images with their receipts); a previous life's working copies (no
        receipt beside them) are dropped: their rows return when their leases lapse."""
        adopted = 0
        for path in sorted(self.incoming.glob("*.dcm")):
            receipt = self.receipt(path) if path.with_suffix(".json").exists() else None
            if receipt is not None:
                self.queue.admit(path.read_bytes(), receipt.sop_instance_uid, asdict(receipt))
                adopted += 1
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)
        if adopted:
            logger.info("%d image(s) of this node's own spool moved into the shared queue", adopted)

    # --- wiring and lifecycle ----------------------------------------------------------------

    def start(self, work: WorkQueue, outboxes: Sequence[Holder]) -> None:
        """Feed ``work`` from the shared queue; ``outboxes`` say when an image's results are settled."""
        self._work, self._outboxes = work, outboxes
        self._thread = threading.Thread(target=self._feed, name="shared-feeder", daemon=True)
        self._heart = threading.Thread(target=self._beating, name="shared-heartbeat", daemon=True)
        self._thread.start()
        self._heart.start()

    @property
    def alive(self) -> bool:
        return all(t is not None and t.is_alive() for t in (self._thread, self._heart))

    def wake(self, _path: Path | None = None) -> None:
        """Look for work now (an image was just admitted here)."""
        self._wake.set()

    def close(self) -> None:
        """Stop feeding, put back every image held (its take taken back), close the connections."""
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._heart):
            if thread is not None:
                thread.join(timeout=10)
        with self._state:
            held = list(self._held.values()) + [a.leased for a in self._awaiting]
            alone = [x for x in held if x.id in self._alone]
            self._held.clear()
            self._awaiting.clear()
        try:
            self.queue.release([x for x in held if x not in alone])
            self.queue.release(alone, alone=True)
        except Unavailable as exc:
            logger.warning(
                "could not put back %d image(s) (%s); they return when their leases lapse",
                len(held),
                exc,
            )
        self.queue.close()
        self._beat.close()
        while not self._receivers.empty():
            self._receivers.get().close()
        super().close()

    # --- receiving -----------------------------------------------------------------------------

    def admit(self, received: Path, receipt: Receipt) -> Path:
        """Commit a fully received data set to the shared queue (durable before this returns);
        the local file is removed. The path returned names the reception; nothing is there.

        Raises:
            pacs_node.scale.db.Unavailable: the database is unreachable; nothing was admitted
                (or, when the connection broke during the commit, possibly admitted: the
                sender, answered with a failure, sends again, and the same results are
                delivered once).
        """
        with self._admitting, self._receiver() as shared:
            row = shared.admit(received.read_bytes(), receipt.sop_instance_uid, asdict(receipt))
        received.unlink(missing_ok=True)
        return self.incoming / f"queued-{row}"

    @contextmanager
    def _receiver(self) -> Iterator[IntakeQueue]:
        """A connection of its own for each association admitting at once."""
        try:
            shared = self._receivers.get_nowait()
        except queue.Empty:
            shared = IntakeQueue(self.scale.database, self.node)
        try:
            yield shared
        finally:
            self._receivers.put(shared)

    # --- the pipeline's bookkeeping ---------------------------------------------------------

    def receipt(self, path: Path) -> Receipt | None:
        with self._state:
            leased = self._held.get(path.name)
        if leased is not None:
            found = Receipt.of(leased.receipt)
            if found is not None:
                return found
        return super().receipt(path)

    def begin(self, paths: list[Path], alone: bool | None = None) -> None:
        """Count images processed alone in the shared queue (the crash-loop rule).

        Raises:
            OSError: the database is unreachable (:class:`~pacs_node.scale.db.Unavailable`): do not process.
        """
        if not ((len(paths) == 1) if alone is None else alone):
            return
        with self._state:
            held = [self._held[p.name] for p in paths if p.name in self._held]
        self.queue.alone(held)
        with self._state:
            self._alone.update(x.id for x in held)
            for path in paths:
                entry = self.attempts.setdefault(path.name, Attempts())
                entry.solo += 1

    def end(self, paths: list[Path]) -> None:
        """Processing ended: what was counted as alone is taken back (best effort)."""
        with self._state:
            for path in paths:
                self.attempts.pop(path.name, None)
            ended = [
                leased
                for path in paths
                if (leased := self._leased_of(path)) is not None and leased.id in self._alone
            ]
            self._alone.difference_update(leased.id for leased in ended)
        if ended:
            try:
                self.queue.not_alone(ended)
            except Unavailable as exc:
                logger.warning("could not note that %d image(s) ended (%s)", len(ended), exc)

    def _leased_of(self, path: Path) -> Leased | None:
        """The row of a working copy, held or awaiting its deliveries (the caller holds the lock)."""
        found = self._held.get(path.name)
        if found is None:
            found = next((a.leased for a in self._awaiting if a.name == path.name), None)
        return found

    def suspects(self) -> set[str]:
        return set()  # the feeder finds them as it takes them

    def quarantine(self, max_solo: int) -> list[tuple[Path, int]]:
        return []  # the pipeline puts aside each image as it takes it

    def pending(self) -> list[Path]:
        return []  # nothing held before the start: the shared queue is the work

    def done(self, path: Path, source_uid: str = "") -> None:
        """The image's results are durable in the outbox: it leaves the shared queue once every
        one of them is settled (at once, when none waits)."""
        path.unlink(missing_ok=True)
        self._leave(path, source_uid)
        self._wake.set()

    def skip(self, path: Path) -> None:
        super().skip(path)
        self._leave(path)

    def fail(self, path: Path, reason: str, detail: str) -> None:
        super().fail(path, reason, detail)
        self._leave(path)

    def _leave(self, path: Path, source_uid: str = "") -> None:
        """The image at ``path`` is done here (processed, skipped, failed): it leaves the shared
        queue now, or, while results built from it (``source_uid``, else the UID it was received
        under: a later result failed after one was handed over) wait in an outbox, once they
        are settled."""
        with self._state:
            leased = self._held.pop(path.name, None)
        if leased is None:
            return
        source = source_uid or leased.sop_instance_uid
        if self._waits_on(source):
            with self._state:
                self._awaiting.append(_Awaiting(leased, source, path.name))
        else:
            self._finish([leased])

    def _waits_on(self, source_uid: str) -> bool:
        return any(outbox.holds(source_uid) for outbox in self._outboxes)

    def count(self) -> int:
        with self._state:
            return len(self._held)

    # --- the feeder ----------------------------------------------------------------------------

    def _feed(self) -> None:
        while not self._stop.is_set():
            try:
                self._take()
                self._available()
            except Unavailable as exc:
                self._unavailable(exc)
                self._stop.wait(1.0)
            except Exception as exc:  # noqa: BLE001 - the feeder outlives whatever one round does
                logger.error("shared queue feeder: %s: %s", type(exc).__name__, exc)
                self._stop.wait(1.0)
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _beating(self) -> None:
        """The heartbeat, on its own thread and connection (a lease or a large image never
        delays it): every third of the lease."""
        while not self._stop.wait(self.scale.lease_s / 3):
            try:
                self._heartbeat()
            except Unavailable as exc:
                self._unavailable(exc)
            except Exception as exc:  # noqa: BLE001 - the heartbeat outlives whatever one beat does
                logger.error("shared queue heartbeat: %s: %s", type(exc).__name__, exc)

    def _take(self) -> None:
        """Lease what the worker has room for, unless this node's deliveries lag (a
        destination down) or its disk is full: then the images wait for another node."""
        assert self._work is not None
        with self._state:
            awaiting = len(self._awaiting)
        room = self.scale.take - self._work.qsize()
        if (
            room <= 0
            or awaiting >= AWAITING_PER_TAKE * self.scale.take
            or self.free_bytes() < self.min_free_bytes
        ):
            return
        taken = self.queue.lease(room, self.scale.lease_s)
        for index, leased in enumerate(taken):
            try:
                path = self._materialize(leased)
            except BaseException:
                # the rest go back at once (a full disk, the database gone): not a death
                with contextlib.suppress(Unavailable):
                    self.queue.release(taken[index:])
                raise
            if path is None:
                continue
            if leased.attempts > 1:  # an earlier take gave no answer: its node died or stalled
                self._work.put_suspects([path])
            else:
                self._work.put(path)

    def _materialize(self, leased: Leased) -> Path | None:
        """The working copy of a leased image in ``incoming/``, its bytes read now (one image
        in memory at a time); None when the lease was lost meanwhile."""
        data = self.queue.data(leased)
        if data is None:
            return None
        path = self.incoming / f"{self.receipt_name()}.dcm"
        part = self.tmp / f"{path.name}.part"
        try:
            part.write_bytes(data)  # no fsync: the shared queue holds the image, not this copy
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        del data
        os.replace(part, path)
        with self._state:
            self._held[path.name] = leased
            # the takes before this one that ended in no answer
            self.attempts[path.name] = Attempts(
                solo=leased.solo, batch=leased.attempts - 1 - leased.solo
            )
        return path

    def _heartbeat(self) -> None:
        """Renew every lease this node holds; let go of images whose results are all settled."""
        with self._state:
            awaiting = list(self._awaiting)
        settled = [a for a in awaiting if not self._waits_on(a.source_uid)]
        if settled:
            with self._state:
                self._awaiting = [a for a in self._awaiting if a not in settled]
            self._finish([a.leased for a in settled], self._beat)
        with self._state:
            held = list(self._held.values()) + [a.leased for a in self._awaiting]
        kept = self._beat.renew(held, self.scale.lease_s)
        self._waiting = self._beat.waiting()
        self._available()
        lost = [x for x in held if x.id not in kept]
        if lost:
            logger.warning(
                "%d image(s) taken by this node were taken over by another (this node did not "
                "renew its leases in time); their results are delivered once all the same",
                len(lost),
            )

    def _finish(self, leased: list[Leased], queue_: IntakeQueue | None = None) -> None:
        """Remove images from the shared queue, for the take that holds them."""
        for one in leased:
            with self._state:
                self._alone.discard(one.id)
            try:
                if not (queue_ or self.queue).done(one):
                    logger.warning(
                        "image %s (row %d) was taken over by another node before it was done here; "
                        "its results are delivered once all the same",
                        one.sop_instance_uid,
                        one.id,
                    )
            except Unavailable as exc:
                # its lease lapses, another node processes it again; the ledger sends nothing twice
                logger.warning("could not mark image row %d done (%s)", one.id, exc)

    def _unavailable(self, exc: Unavailable) -> None:
        if self._unavailable_since is None:
            self._unavailable_since = time.monotonic()
            logger.error("the shared queue is unavailable (%s); trying again each second", exc)

    def _available(self) -> None:
        if self._unavailable_since is not None:
            logger.info(
                "the shared queue is available again after %.0f s",
                time.monotonic() - self._unavailable_since,
            )
            self._unavailable_since = None

    def backlog(self) -> int:
        """Images in the shared queue, every node's (as of the last heartbeat): the node refuses
        new ones at ``max_queue`` (0xA700) rather than fill the database's disk."""
        return self._waiting

    def problems(self) -> list[str]:
        found = []
        if self._thread is not None and not self.alive and not self._stop.is_set():
            found.append("the shared queue's feeder is not running")
        since = self._unavailable_since
        if since is not None:
            found.append(
                f"the shared queue has been unavailable for {time.monotonic() - since:.0f} s: "
                "new images are refused (0xA700) and none is taken"
            )
        return found
