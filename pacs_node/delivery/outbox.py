"""Sending results: one persistent outbox per destination, each with its own sender thread.

``outbox/<destination>/`` holds the results still to deliver, one file each (a DICOM object,
or a result of another media type where the destination's protocol carries it), written
durably before the source instance leaves the spool. A sender sends what is there in
batches, one association (C-STORE, :mod:`pacs_node.delivery.cstore`) or a few HTTP requests
(STOW-RS, :mod:`pacs_node.delivery.stow`) per batch, deletes what the destination accepted, and after
a failure waits with exponential backoff up to a cap, or longer when an HTTP destination
asks (Retry-After, up to the same cap). An object the destination refuses
``max_refusals`` times, whose SOP class it does not accept at all, or that stays
undeliverable for ``dead_letter_after_s``, moves to ``dead-letter/<destination>/`` with
the reason beside it, for a person to look at. Destinations never wait for each other: a
destination that is down delays only its own outbox (pynetdicom itself has no retry; a
gateway that retries a bad destination in a tight loop starves the rest).

A sender never dies of what a destination or a file does: every failure is recorded and
retried or dead-lettered, and the loop goes on; whatever goes wrong while one file is
prepared costs that file alone. Each delivery leaves a small marker in
``outbox/<destination>/.delivered/<SOPInstanceUID>`` holding the content digest sent (kept
for ``dead_letter_after_s``), so an image processed again after a crash does not send results
the destination already has. An object that was on the wire when the process died, or that
got no answer, is in doubt (``.delivered/<entry>.sending``): before sending it again, the
sender asks the destination whether it has it (C-FIND where it answers queries, QIDO-RS).

Entries, exactly once. A result is written as an entry of its own,
``<uid>_<n><suffix>`` (``<SOPInstanceUID>_<n>.dcm`` for a DICOM object) with a sidecar
``<uid>_<n>.json`` (its source, kind and media type, the node's content digest, and the SHA-256
and size of the file's exact bytes), ``n`` one more
than the newest entry of that UID still in the outbox. An entry is never rewritten: a result
corrected while the one before is on the wire is another entry, sent after it, and the first
one's success can neither count for it nor remove it. One lock per outbox makes the check
and the write of :meth:`DestinationSender.put` atomic with the sender's ledger-write-and-unlink
of a delivery: a result identical to the newest entry of its UID, or (with none waiting) to
what the ledger says was delivered, is not written again, so the same image sent twenty
times in quick succession gives each result once whatever the timing. An entry superseded
by a newer one of the same UID before it was delivered is dropped, never sent (the newer
one is what the destination must end up with). Files of the layout before (``<UID>.dcm``)
are adopted as entry 0 at start, after a structural check, their in-doubt markers with them.

Integrity. The outbox trusts none of its files: before each send (and before asking about
an object in doubt) the file's bytes are checked against the digest recorded at hand-over.
A file cut short, changed, or whose sidecar is missing or unreadable goes to dead letters
(reason ``integrity``) with an audit line, and never holds up what is queued behind it; a
truncated SR that still parses is never delivered.

A destination that refuses the node's credentials (HTTP 401, 403) holds its results: they
stay in the outbox, tried again with backoff, ``/health`` says why and an audit line says so
once; mended credentials are used at the next try, with no restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from pacs_node.config import Destination, OutboxConfig, WebDestination
from pacs_node.delivery.registry import protocol_of
from pacs_node.delivery.transport import Link, Outcome, Status, Unreachable
from pacs_node.files import FILE_MODE, atomic_file, fsync_dir, private_folder, prune
from pacs_node.logs import describe
from pacs_node.results.base import Result
from pacs_node.results.registry import dicom_result
from pacs_node.scale.db import Unavailable
from pacs_node.scale.ledger import Claim, DeliveryLedger

logger = logging.getLogger(__name__)


#: How long a sender waits when every object it took is being sent by another node.
BUSY_WAIT_S = 0.5


def next_backoff(previous: float, config: OutboxConfig) -> float:
    """The wait after a failed attempt: ``initial_backoff_s``, then doubling up to ``max_backoff_s``."""
    return min(config.max_backoff_s, max(config.initial_backoff_s, 2 * previous))


@dataclass
class _Attempts:
    """In-memory delivery history of one outbox file (restarts begin again, on purpose)."""

    refusals: int = 0
    first_failure: float | None = None


@dataclass(kw_only=True)
class DeliveryStats:
    """What /health shows of a destination (delivery counts are in the node's metrics).

    Attributes:
        busy_since: monotonic time the current attempt (association and sends) began, or None.
        held: why the destination's deliveries are held until a person acts (``authentication``), or empty.
        oldest: Unix time the oldest result now waiting was put in the outbox, or None when
            none waits (a file time, so that the wait counts across restarts).
        failing_since: monotonic time of the first attempt since the last delivery that
            delivered nothing (unreachable, unavailable, unanswered, refused), or None.
    """

    failed_associations: int = 0
    last_error: str = ""
    backlog: int = 0
    busy_since: float | None = None
    held: str = ""
    oldest: float | None = None
    failing_since: float | None = None

    def failed(self) -> None:
        """An attempt delivered nothing: the destination has been failing since now, if not before."""
        if self.failing_since is None:
            self.failing_since = time.monotonic()


class DestinationSender:
    """The outbox and sender thread of one destination.

    Args:
        destination: where to send.
        root: the outbox root; this destination uses ``root/<name>`` and ``root/../dead-letter/<name>``.
        calling_ae: this node's AE title.
        config: batching, backoff and dead-letter settings.
        on_delivered: called with ``(destination, sop_instance_uid, source_uid, reason)`` per
            object: reason None when delivered, else the dead letter's reason code.
        tls: client TLS context, or None (an https:// destination then trusts the system store).
        timeout_s: ACSE, DIMSE and network timeout.
        on_sent: called with the seconds each C-STORE or STOW-RS request took.
        on_held: called with ``(destination, reason, detail)`` when the destination's deliveries
            become held (reason ``authentication``), and with reason None when they resume.
        ledger: the scale-out mode's shared delivery ledger (:mod:`pacs_node.scale.ledger`):
            each object is claimed there before it is sent, and what any node delivered is not
            sent again; None: this outbox alone says what was delivered.
    """

    def __init__(
        self,
        destination: Destination | WebDestination,
        root: Path,
        *,
        calling_ae: str,
        config: OutboxConfig,
        on_delivered: Callable[[Destination | WebDestination, str, str, str | None], None]
        | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 30.0,
        on_sent: Callable[[float], None] | None = None,
        on_held: Callable[[Destination | WebDestination, str | None, str], None] | None = None,
        ledger: DeliveryLedger | None = None,
    ) -> None:
        self.destination, self.config = destination, config
        self.folder = private_folder(root / destination.name)
        self.dead = private_folder(root.parent / "dead-letter" / destination.name)
        self.ledger = private_folder(self.folder / ".delivered")
        self.on_delivered = on_delivered or (lambda *_: None)
        self.on_sent = on_sent or (lambda _: None)
        self.on_held = on_held or (lambda *_: None)
        self.stats = DeliveryStats()
        self.shared = ledger
        #: Entries waiting, by the source instance they were built from (under the lock).
        self._sources: Counter[str] = Counter()
        protocol = protocol_of(destination)
        self.media_types = protocol.media_types
        self.transport = protocol.open(destination, calling_ae, config, tls, timeout_s)
        self._attempts: dict[str, _Attempts] = {}
        # put's check-and-write against a delivery's ledger-write-and-unlink
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retry_after = 0.0
        # the destination's backoff, and the monotonic time before which no association tries
        # again (a failure backs them all off)
        self._backoff, self._quiet_until = 0.0, 0.0
        # per association (thread): when its objects went on the wire
        self._wire = threading.local()
        # UIDs some association is sending now (under the lock): never two at once
        self._claimed: set[str] = set()
        # when each association's current attempt began (under the lock)
        self._busy: dict[int, float] = {}
        self._threads = [self._new_thread(i) for i in range(config.associations)]
        self.forget_old_deliveries()
        for legacy in [p for p in self.folder.glob("*.dcm") if _LEGACY.fullmatch(p.stem)]:
            try:
                self._adopt(legacy)
            except OSError as exc:
                # a full disk: it stays as it is, not sent, until a start that can adopt it
                logger.warning(
                    "%s: could not adopt %s from the outbox layout before (%s)",
                    destination,
                    legacy.name,
                    describe(exc),
                )
        listed = self._listing()
        self._sources.update(self._source_of(path) for path in listed)
        keys = {_key(path) for path in listed}
        for orphan in self.folder.iterdir():
            # a sidecar whose object was never written (a full disk)
            if _SIDECAR.fullmatch(orphan.name) and orphan.name[: -len(".json")] not in keys:
                orphan.unlink(missing_ok=True)

    def takes(self, result: Result) -> bool:
        """Whether ``result`` goes to this destination: its protocol carries the result's media
        type, and the destination takes its kind (every kind, when it lists none)."""
        outputs = self.destination.outputs
        return result.media_type in self.media_types and (not outputs or result.kind in outputs)

    def put(self, result: Result | Dataset, source_uid: str, digest: str = "") -> Path | None:
        """Write a result durably into this destination's outbox as a new entry; the entry that
        will carry it, or None when the destination already has it (see the module).

        An image processed again after a crash gives the same result, the same content
        (``digest``) under the same UID: it is not sent twice. An image sent again with
        corrected patient data gives another digest: the corrected result is sent, after any
        entry of the same UID already on the wire. Without a digest, every put is sent.
        """
        if isinstance(result, Dataset):
            result = dicom_result(result)
        uid, data = result.uid, result.data
        with self._lock:
            entries = self._entries_of(uid)
            if digest and entries and self._sidecar(entries[-1]).get("digest") == digest:
                return entries[-1]  # the same result is waiting, or on the wire
            if digest and not entries and _noted(self.ledger / uid) == digest:
                return None
            if (
                digest
                and not entries
                and self._shared_has(Claim(self.destination.name, uid, digest))
            ):
                return None
            path = (
                self.folder / f"{uid}_{_sequence(entries[-1]) + 1 if entries else 1}{result.suffix}"
            )
            # The sidecar first: the sender picks up entries, and must find their source and digest beside them.
            sidecar = {
                "source": source_uid,
                "digest": digest,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "kind": result.kind,
                "media_type": result.media_type,
            }
            with atomic_file(_sidecar_path(path)) as handle:
                handle.write(json.dumps(sidecar).encode())
            with atomic_file(path) as handle:
                handle.write(data)
            self._sources[source_uid] += 1
        return path

    def holds(self, source_uid: str) -> bool:
        """Whether a result built from ``source_uid`` waits here (or is on the wire)."""
        with self._lock:
            return self._sources[source_uid] > 0

    def _shared_has(self, claim: Claim) -> bool:
        """Whether the shared ledger says the destination has ``claim``; False without one, or
        when it cannot be read (the claim before sending decides then)."""
        if self.shared is None:
            return False
        try:
            return self.shared.has(claim)
        except Unavailable:
            return False

    def _forget(self, source: str) -> None:
        """An entry built from ``source`` leaves the outbox (the caller holds the lock)."""
        self._sources[source] -= 1
        if self._sources[source] <= 0:
            del self._sources[source]

    def _entries_of(self, uid: str) -> list[Path]:
        """The entries of ``uid`` in the outbox, oldest first."""
        prefix = f"{uid}_"
        found = [
            self.folder / e.name
            for e in os.scandir(self.folder)
            if e.name.startswith(prefix) and _ENTRY.fullmatch(e.name)
        ]
        return sorted((p for p in found if _uid_of(p) == uid), key=_sequence)

    def _adopt(self, path: Path) -> None:
        """Make a file of the layout before (``<UID>.dcm``, a sidecar without a file digest) entry 0
        of its UID, its in-doubt marker with it. Its bytes were never recorded: a structural check
        (it parses, and is the instance its name says) stands in for the digest, this once."""
        uid, target = path.stem, self.folder / f"{path.stem}_0.dcm"
        try:
            data = path.read_bytes()
            problem = _not_the_instance(data, uid)
        except OSError as exc:
            problem = f"unreadable ({describe(exc)})"
        if problem:
            self._dead_letter(path, "integrity", f"outbox file from before the upgrade: {problem}")
            return
        sidecar = self._sidecar(path) | {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        with atomic_file(target.with_suffix(".json")) as handle:
            handle.write(json.dumps(sidecar).encode())
        marker = self.ledger / f"{uid}.sending"
        if marker.exists():
            # before the file: a crash in between leaves the marker where the entry will be
            os.replace(marker, self._sending_marker(target))
        os.replace(path, target)
        path.with_suffix(".json").unlink(missing_ok=True)
        fsync_dir(self.folder)

    def prune_dead_letters(self, days: float, max_mb: int) -> int:
        """Apply the retention limits to this destination's dead letters; the number removed."""
        return prune(self.dead, days, max_mb)

    def forget_old_deliveries(self) -> None:
        """Drop delivery markers older than ``dead_letter_after_s``."""
        horizon = time.time() - self.config.dead_letter_after_s
        for marker in self.ledger.iterdir():
            try:
                if marker.stat().st_mtime < horizon:
                    marker.unlink(missing_ok=True)
            except OSError:
                continue

    def pending(self) -> list[Path]:
        """The entries waiting (and the one on the wire), oldest first."""
        with self._lock:
            return self._listing()

    def _listing(self) -> list[Path]:
        """Every entry (``<uid>_<n><suffix>``); files of the layout before are adopted first (see ``__init__``)."""
        stamped = []
        for entry in os.scandir(self.folder):
            if _ENTRY.fullmatch(entry.name):
                try:
                    stamped.append((entry.stat().st_mtime_ns, entry.name))
                except OSError:  # gone since the listing
                    continue
        return [self.folder / name for _, name in sorted(stamped)]

    def _take(self) -> tuple[list[Path], int]:
        """The entries no association is sending, oldest first, with how many entries wait in
        all. Entries superseded by a newer one of the same UID are dropped (never sent: the
        destination must end up with the newer), unless one is on the wire: then the UID waits
        until it is answered, and the newer goes after it."""
        with self._lock:
            entries = self._listing()
            newest: dict[str, Path] = {}
            for path in entries:
                if _sequence(path) >= _sequence(newest.get(_uid_of(path), path)):
                    newest[_uid_of(path)] = path
            for path in entries:
                if newest[_uid_of(path)] is not path and _uid_of(path) not in self._claimed:
                    self._drop(path)
            waiting = len(newest)
            free = [
                path
                for path in entries
                if newest[_uid_of(path)] is path and _uid_of(path) not in self._claimed
            ]
        return free, waiting

    def _claim(self, files: list[Path]) -> list[Path]:
        """A share of ``files`` for this association: at most a batch, and no more than an
        even split among the associations, so that a short queue is sent in parallel too."""
        share = -(-len(files) // len(self._threads))
        chosen = files[: min(self.config.batch_size, share)]
        with self._lock:
            chosen = [path for path in chosen if _uid_of(path) not in self._claimed]
            self._claimed.update(_uid_of(path) for path in chosen)
        return chosen

    def _release(self, files: list[Path]) -> None:
        with self._lock:
            self._claimed.difference_update(_uid_of(path) for path in files)
            self._busy.pop(threading.get_ident(), None)
            self.stats.busy_since = min(self._busy.values(), default=None)

    def _busy_from(self, when: float) -> None:
        """This association's attempt runs since ``when``; health reads the oldest of them."""
        with self._lock:
            self._busy[threading.get_ident()] = when
            self.stats.busy_since = min(self._busy.values())

    def _drop(self, path: Path) -> None:
        """Remove a superseded entry (the caller holds the lock)."""
        self._forget(self._source_of(path))
        self._unlink(path)
        self._attempts.pop(path.name, None)
        logger.info(
            "%s: %s superseded by a newer result of the same instance before it was delivered; not sent",
            self.destination,
            path.stem,
        )

    def wake(self) -> None:
        self._wake.set()

    def _new_thread(self, index: int) -> threading.Thread:
        name = f"send-{self.destination.name}" + (f"-{index + 1}" if index else "")
        return threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported here; the node's supervisor restarts the sender
            logger.critical("%s: sender thread ended: %s", self.destination, describe(exc))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def restart(self) -> None:
        """Start new sender threads in place of those that ended unexpectedly."""
        for index, thread in enumerate(self._threads):
            if not thread.is_alive():
                with self._lock:
                    self._busy.pop(thread.ident or -1, None)
                    self.stats.busy_since = min(self._busy.values(), default=None)
                self._threads[index] = self._new_thread(index)
                self._threads[index].start()

    @property
    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        if self.shared is not None:
            self.shared.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            quiet = self._quiet_until - time.monotonic()
            if quiet > 0:  # an association found the destination failing: all back off together
                self._stop.wait(quiet)
                continue
            try:
                delivered = self._round()
            except Unavailable as exc:  # the shared ledger: nothing is sent without it
                self._release([])
                self.stats.last_error = str(exc)
                delivered = False
            except Exception as exc:  # noqa: BLE001 - a sender must outlive whatever one round does
                self._release([])
                self.stats.last_error = f"internal error ({describe(exc)})"
                logger.error("%s: %s", self.destination, self.stats.last_error)
                delivered = False
            if delivered is None:
                continue
            with self._lock:
                if delivered:
                    self._backoff, self._quiet_until = 0.0, 0.0
                    continue
                # one backoff per destination, whichever association failed
                self._backoff = next_backoff(self._backoff, self.config)
                wait, self._retry_after = (
                    max(self._backoff, min(self._retry_after, self.config.max_backoff_s)),
                    0.0,
                )
                self._quiet_until = time.monotonic() + wait
            logger.warning(
                "%s: delivery failed (%s); next try in %.1f s",
                self.destination,
                self.stats.last_error,
                wait,
            )
            self._pause(wait)

    def _round(self) -> bool | None:
        """One batch: True when the destination was reached, False when not, None when idle."""
        files, waiting = self._take()
        self.stats.backlog = waiting
        self.stats.oldest = _mtime(files[0]) if files else None
        batch = self._claim(files)
        if not batch:
            if not waiting:
                self.stats.failing_since = None  # nothing left to fail on
            self._wake.wait(1.0)
            self._wake.clear()
            return None
        self._busy_from(time.monotonic())
        try:
            return self._send_batch(batch)
        finally:
            self._release(batch)

    def _pause(self, seconds: float) -> None:
        """Wait before the next attempt; a stop ends the wait at once."""
        self._stop.wait(seconds)

    def _send_batch(self, files: list[Path]) -> bool:
        """Send ``files`` over one link; False when the destination could not be reached or used."""
        files = [path for path in files if self._intact(path)]
        if not files:
            return True
        in_doubt = {path for path in files if self._sending_marker(path).exists()}
        try:
            # with a shared ledger, any object may turn out to be in doubt (another node's)
            link = self.transport.open(ask=bool(in_doubt) or self.shared is not None)
        except Unreachable as exc:
            self.stats.failed_associations += 1
            # markers stay: nothing was sent
            self._unavailable(files, Outcome(Status.UNAVAILABLE, exc.reason, exc.detail))
            return False
        try:
            return self._use(link, files, in_doubt)
        finally:
            link.close()

    def _use(self, link: Link, files: list[Path], in_doubt: set[Path]) -> bool:
        """Ask about the objects in doubt, send the rest; False when the link broke or the destination was unavailable."""
        todo = []
        for path in files:
            if self._noted_delivered(path) or (
                path in in_doubt and link.usable and _has(link, path)
            ):
                self._delivered(path)
            else:
                todo.append(path)
        usable = True
        for group in link.groups(todo):
            if not (usable and link.usable) or self._stop.is_set():
                break
            group = self._claim_group(link, group)
            if not group:
                continue
            self._wire.started = None
            outcomes = self._send(link, group)
            if self._wire.started is not None:
                self.on_sent(time.perf_counter() - self._wire.started)
            # every one, even after a False
            settled = [self._settle(path, outcome) for path, outcome in outcomes.items()]
            usable = all(settled)
        return usable and link.usable

    def _claim_group(self, link: Link, group: list[Path]) -> list[Path]:
        """What of ``group`` to send, once claimed in the shared ledger (all of it without one):
        what a node delivered is settled, what another node is sending waits, what is in
        doubt is asked about first.

        Raises:
            pacs_node.scale.db.Unavailable: the ledger is unreachable: nothing is sent.
        """
        if self.shared is None:
            return group
        claims = {path: self._claim_of(path) for path in group}
        verdicts = self.shared.claim(list(claims.values()))
        send = []
        for path, claim in claims.items():
            verdict = verdicts[claim]
            if verdict == "delivered":
                self._settled_elsewhere(path)
            elif verdict == "doubt" and link.usable and _has(link, path):
                self._delivered(path)
            elif verdict != "busy":
                send.append(path)
        if not send and "busy" in verdicts.values():
            self._stop.wait(BUSY_WAIT_S)  # another node is sending them: not a tight loop
        return send

    def _claim_of(self, path: Path, sidecar: dict[str, object] | None = None) -> Claim:
        """The shared ledger's key of an entry (``sidecar``: its sidecar, when already read)."""
        sidecar = self._sidecar(path) if sidecar is None else sidecar
        digest = str(sidecar.get("digest") or sidecar.get("sha256") or "")
        return Claim(self.destination.name, _uid_of(path), digest)

    def _settled_elsewhere(self, path: Path) -> None:
        """The destination has this entry's content, delivered by another node (the shared
        ledger says so): noted in the local ledger too, the entry gone, not sent."""
        self._gone(path, self._sidecar(path))
        logger.info(
            "%s: %s is already delivered (by another node); not sent",
            self.destination,
            _uid_of(path),
        )

    def _send(self, link: Link, group: list[Path]) -> dict[Path, Outcome]:
        """``link.send``; whatever it raises costs the group alone (one file, for C-STORE), as a refusal."""
        try:
            return link.send(group, self._on_wire)
        except Exception as exc:  # noqa: BLE001 - a file pynetdicom or pydicom chokes on must not stop the queue
            logger.warning(
                "%s: could not send %s (%s)",
                self.destination,
                ", ".join(p.stem for p in group),
                describe(exc),
            )
            return dict.fromkeys(
                group, Outcome(Status.REFUSED, "send-error", f"sending failed ({describe(exc)})")
            )

    def _intact(self, path: Path) -> bool:
        """Whether ``path`` holds exactly the bytes handed over (its sidecar's SHA-256 and size);
        a file that does not, or cannot be checked, goes to dead letters (reason ``integrity``)."""
        sidecar = self._sidecar(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False  # gone since the listing (superseded, or moved by a person)
        except OSError as exc:
            problem = f"unreadable ({describe(exc)})"
        else:
            problem = _mismatch(data, sidecar)
        if problem:
            self._dead_letter(
                path, "integrity", f"the outbox file is not the one handed over: {problem}"
            )
            return False
        return True

    def _noted_delivered(self, path: Path) -> bool:
        """Whether the ledger notes this entry's content as delivered: the process died after
        the note and before the entry was removed (a note is made only after a delivery)."""
        digest = self._sidecar(path).get("digest")
        return bool(digest) and _noted(self.ledger / _uid_of(path)) == digest

    def _on_wire(self, group: list[Path]) -> None:
        """Mark objects about to leave: should the process die before their answer, they are in doubt."""
        self._busy_from(time.monotonic())
        for path in group:
            _touch(self._sending_marker(path))
        self._wire.started = time.perf_counter()

    def _sending_marker(self, path: Path) -> Path:
        """Present while ``path`` is on the wire or unanswered: after a crash, the object is in doubt."""
        return self.ledger / f"{_key(path)}.sending"

    def _settle(self, path: Path, outcome: Outcome) -> bool:
        """Act on what became of one object; False when the destination could not take it now."""
        if outcome.status is not Status.UNANSWERED:  # answered: no longer in doubt
            self._sending_marker(path).unlink(missing_ok=True)
            if outcome.status is not Status.STORED and self.shared is not None:
                with contextlib.suppress(Unavailable):  # the claim then lapses by itself
                    self.shared.give_up([self._claim_of(path)])
        if outcome.status is Status.STORED:
            self._delivered(path)
        elif outcome.status is Status.REFUSED:
            self.stats.last_error = outcome.detail
            self._refused(path, outcome.reason, outcome.detail)
        elif outcome.status is Status.REJECTED:
            self._dead_letter(path, outcome.reason, outcome.detail)
        else:
            self._unavailable([path], outcome)
            return False
        return True

    def _unavailable(self, files: list[Path], outcome: Outcome) -> None:
        """The destination took nothing now: back off, hold when a person must act, dead-letter what waited too long."""
        self.stats.last_error = outcome.detail
        self.stats.failed()
        self._retry_after = max(self._retry_after, outcome.retry_after)
        self._hold(outcome.reason, outcome.detail)
        self._note_failure(files)

    def _hold(self, reason: str, detail: str) -> None:
        """Say once that deliveries are held for a reason a person must mend (the credentials)."""
        if reason and self.stats.held != reason:
            self.stats.held = reason
            logger.error("%s: deliveries held (%s): %s", self.destination, reason, detail)
            self.on_held(self.destination, reason, detail)

    def _resume(self) -> None:
        if self.stats.held:
            self.stats.held = ""
            logger.info("%s: deliveries resumed", self.destination)
            self.on_held(self.destination, None, "delivered again")

    def _refused(self, path: Path, reason: str, last: str) -> None:
        self.stats.failed()
        attempts = self._attempts.setdefault(path.name, _Attempts())
        attempts.refusals += 1
        if attempts.refusals >= self.config.max_refusals:
            self._dead_letter(path, reason, f"refused {attempts.refusals} times, last: {last}")

    def _delivered(self, path: Path) -> None:
        """Note that the destination has entry ``path``: its digest in the ledger, the entry gone,
        in one step against :meth:`put` (the lock)."""
        sidecar, uid = self._sidecar(path), _uid_of(path)
        if self.shared is not None:
            try:
                self.shared.delivered(self._claim_of(path, sidecar))
            except Unavailable as exc:
                # the claim stays "sending": whoever sends it next asks the destination first
                logger.warning(
                    "%s: could not note the delivery of %s in the shared ledger (%s)",
                    self.destination,
                    uid,
                    exc,
                )
        self._gone(path, sidecar)
        self.stats.failing_since = None
        self._resume()
        self.on_delivered(self.destination, uid, str(sidecar.get("source", "")), None)

    def _gone(self, path: Path, sidecar: dict[str, object]) -> None:
        """The destination has entry ``path`` (sent here, or by another node): its digest in
        the local ledger, the entry gone, in one step against :meth:`put` (the lock)."""
        uid = _uid_of(path)
        with self._lock:
            self._forget(str(sidecar.get("source", "")))
            try:
                _note(self.ledger / uid, _sidecar_path(path), str(sidecar.get("digest", "")))
            except OSError:
                # the destination has the object all the same; sending it again would duplicate it
                logger.warning(
                    "%s: could not note the delivery of %s; an image processed again would be sent again",
                    self.destination,
                    uid,
                )
            self._unlink(path)
            fsync_dir(self.folder)
        self._attempts.pop(path.name, None)

    def _unlink(self, path: Path) -> None:
        """Remove an entry, then its in-doubt marker and its sidecar: a crash in between leaves
        no entry that could be sent again without being asked about first (a marker left
        behind expires; a sidecar left behind goes at the next start)."""
        for part in (path, self._sending_marker(path), _sidecar_path(path)):
            part.unlink(missing_ok=True)

    def _note_failure(self, files: list[Path]) -> None:
        now = time.monotonic()
        for path in files:
            attempts = self._attempts.setdefault(path.name, _Attempts())
            attempts.first_failure = attempts.first_failure or now
            if now - attempts.first_failure >= self.config.dead_letter_after_s:
                self._dead_letter(
                    path,
                    "undeliverable",
                    f"undeliverable for {self.config.dead_letter_after_s:.0f} s, last: {self.stats.last_error}",
                )

    def _dead_letter(self, path: Path, reason: str, why: str) -> None:
        """Move an entry to ``dead-letter/<destination>/<uid><suffix>`` (a person looks for it by its
        UID; a later dead letter of the same UID replaces it), with its sidecar and the reason."""
        source, uid = self._source_of(path), _uid_of(path)
        with self._lock:
            self._forget(source)
            for part, suffix in ((path, _suffix(path)), (_sidecar_path(path), ".json")):
                if part.exists():
                    os.replace(part, self.dead / f"{uid}{suffix}")
        try:
            with atomic_file(self.dead / f"{uid}.why.txt") as handle:
                handle.write(f"{reason}: {why}\n".encode())
        except OSError:
            # a full disk: the move matters more than the note; the audit line has the reason
            pass
        fsync_dir(self.dead)
        self._sending_marker(path).unlink(missing_ok=True)
        self._attempts.pop(path.name, None)
        logger.error("%s: %s moved to dead letters: %s", self.destination, path.stem, why)
        self.on_delivered(self.destination, uid, source, reason)

    def _source_of(self, path: Path) -> str:
        return str(self._sidecar(path).get("source", ""))

    @staticmethod
    def _sidecar(path: Path) -> dict[str, object]:
        try:
            found = json.loads(_sidecar_path(path).read_text())
            return found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            return {}


#: The name of an outbox file of the layout before entries: the SOP Instance UID alone.
_LEGACY = re.compile(r"[0-9.]+")


#: An entry: ``<uid>_<n><suffix>``, its sidecar ``<uid>_<n>.json`` (partial writes start with a dot).
_ENTRY = re.compile(r"(?P<uid>[0-9A-Za-z][0-9A-Za-z.-]*)_(?P<n>[0-9]+)(?P<suffix>\.(?!json$)[^_]+)")
_SIDECAR = re.compile(r"[0-9A-Za-z][0-9A-Za-z.-]*_[0-9]+\.json")


def _parts(path: Path) -> tuple[str, int, str]:
    """``(uid, n, suffix)`` of an entry; a file of the layout before (``<uid>.dcm``): ``(uid, 0, ".dcm")``."""
    match = _ENTRY.fullmatch(path.name)
    if match:
        return match["uid"], int(match["n"]), match["suffix"]
    return path.stem, 0, path.suffix


def _uid_of(path: Path) -> str:
    """The UID of an entry (the SOP Instance UID of a DICOM object)."""
    return _parts(path)[0]


def _sequence(path: Path) -> int:
    """The number of an entry among those of its UID (0 for an adopted file of the layout before)."""
    return _parts(path)[1]


def _suffix(path: Path) -> str:
    return _parts(path)[2]


def _key(path: Path) -> str:
    """An entry's name without its suffix: what its sidecar and in-doubt marker are named after."""
    return path.name[: -len(_suffix(path))]


def _sidecar_path(path: Path) -> Path:
    return path.with_name(f"{_key(path)}.json")


def _mismatch(data: bytes, sidecar: dict[str, object]) -> str:
    """Why ``data`` is not the file described by ``sidecar``; empty when it is."""
    expected = sidecar.get("sha256")
    if not isinstance(expected, str) or not expected:
        return "its sidecar is missing, unreadable or has no digest"
    if sidecar.get("size") != len(data):
        return f"{len(data)} bytes, {sidecar.get('size')} handed over"
    if hashlib.sha256(data).hexdigest() != expected:
        return "its content changed since hand-over"
    return ""


def _not_the_instance(data: bytes, uid: str) -> str:
    """Why ``data`` is not a complete PS3.10 file of instance ``uid``; empty when it is."""
    try:
        ds = dcmread(io.BytesIO(data))
        found = str(ds.SOPInstanceUID)
        ds.SOPClassUID  # noqa: B018 - a file cut short reads without it
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, the file is not usable
        return f"not a readable DICOM file ({type(exc).__name__})"
    return "" if found == uid else "it holds another instance than its name says"


def _has(link: Link, path: Path) -> bool:
    """``link.has``, False (send it again) when asking fails in a way the link did not foresee."""
    try:
        return link.has(path)
    except Exception as exc:  # noqa: BLE001 - one object in doubt must not end the round
        logger.info(
            "could not ask whether %s arrived (%s); sending it again", path.stem, describe(exc)
        )
        return False


def _touch(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))


def _note(note: Path, sidecar: Path, digest: str) -> None:
    """The ledger's marker ``note`` of a delivered entry: a second name for the entry's own
    sidecar (a hard link, made under a temporary name and renamed over any earlier note). It
    takes no new room on the disk, so a full disk cannot keep a delivery from being noted (the
    soak saw one delivered while the disk was full, its note lost, and the object sent again
    after a crash), and the sidecar stays whole beside the entry until the entry is gone.
    Without a sidecar (an entry of the layout before), a new marker holding ``digest``, never
    an empty one over a note that has one."""
    temporary = note.with_name(f".{note.name}.link")
    temporary.unlink(missing_ok=True)
    try:
        os.link(sidecar, temporary)
    except FileNotFoundError:
        if digest or not note.exists():
            _write(note, digest)
        return
    os.utime(
        temporary
    )  # the note ages from the delivery (forget_old_deliveries), not the hand-over
    os.replace(temporary, note)


def _noted(note: Path) -> str | None:
    """The digest a ledger marker holds: a sidecar's (JSON), or the bare digest of a marker
    written before markers were sidecars; None without one."""
    text = _read(note)
    if text is None or not text.startswith("{"):
        return text
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return str(found.get("digest", "")) if isinstance(found, dict) else None


def _write(path: Path, text: str) -> None:
    """A small marker with ``text`` in it (not fsynced: it only has to outlive the process)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:  # delivered or moved meanwhile
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
