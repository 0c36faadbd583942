"""Sending results: one persistent outbox per destination, each with its own sender thread.

``outbox/<destination>/`` holds the results still to deliver, one DICOM file each, written
durably before the source instance leaves the spool. A sender sends what is there in
batches, one association (C-STORE, :mod:`pacs_node.cstore`) or a few HTTP requests
(STOW-RS, :mod:`pacs_node.stow`) per batch, deletes what the destination accepted, and after
a failure waits with exponential backoff up to a cap, or longer when an HTTP destination
asks (Retry-After, up to the same cap). An object the destination refuses
``max_refusals`` times, whose SOP class it does not accept at all, or that stays
undeliverable for ``dead_letter_after_s``, moves to ``dead-letter/<destination>/`` with
the reason beside it, for a person to look at. Destinations never wait for each other: a
destination that is down delays only its own outbox (pynetdicom itself has no retry; a
gateway that retries a bad destination in a tight loop starves the rest).

A sender never dies of what a destination or a file does: every failure is recorded and
retried or dead-lettered, and the loop goes on. Each delivery leaves a small marker in
``outbox/<destination>/.delivered/`` (kept for ``dead_letter_after_s``), so an image
processed again after a crash does not send results the destination already has. An object
that was on the wire when the process died, or that got no answer, is in doubt: before
sending it again, the sender asks the destination whether it has it (C-FIND where it
answers queries, QIDO-RS).

A destination that refuses the node's credentials (HTTP 401, 403) holds its results: they
stay in the outbox, tried again with backoff, ``/health`` says why and an audit line says so
once; mended credentials are used at the next try, with no restart.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from .config import Destination, OutboxConfig, WebDestination
from .cstore import CStoreTransport
from .logs import describe
from .spool import FILE_MODE, atomic_file, fsync_dir, private_folder, prune
from .stow import StowTransport
from .transport import Link, Outcome, Status, Transport, Unreachable

logger = logging.getLogger(__name__)

def next_backoff(previous: float, config: OutboxConfig) -> float:
    """The wait after a failed attempt: ``initial_backoff_s``, then doubling up to ``max_backoff_s``."""
    return min(config.max_backoff_s, max(config.initial_backoff_s, 2 * previous))


@dataclass
class _Attempts:
    """In-memory delivery history of one outbox file (restarts begin again, on purpose)."""

    refusals: int = 0
    first_failure: float | None = None


@dataclass
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
    """

    def __init__(
        self,
        destination: Destination | WebDestination,
        root: Path,
        calling_ae: str,
        config: OutboxConfig,
        on_delivered: Callable[[Destination | WebDestination, str, str, str | None], None] | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 30.0,
        on_sent: Callable[[float], None] | None = None,
        on_held: Callable[[Destination | WebDestination, str | None, str], None] | None = None,
    ) -> None:
        self.destination, self.config = destination, config
        self.folder = private_folder(root / destination.name)
        self.dead = private_folder(root.parent / "dead-letter" / destination.name)
        self.ledger = private_folder(self.folder / ".delivered")
        self.on_delivered = on_delivered or (lambda *_: None)
        self.on_sent = on_sent or (lambda _: None)
        self.on_held = on_held or (lambda *_: None)
        self.stats = DeliveryStats()
        self.transport = open_transport(destination, calling_ae, config, tls, timeout_s)
        self._attempts: dict[str, _Attempts] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retry_after = 0.0
        self._wire_started: float | None = None
        self._thread = self._new_thread()
        self.forget_old_deliveries()
        for orphan in self.folder.glob("*.json"):  # a sidecar whose object was never written (a full disk)
            if not orphan.with_suffix(".dcm").exists():
                orphan.unlink(missing_ok=True)

    def put(self, dataset: Dataset, source_uid: str, digest: str = "") -> Path | None:
        """Write a result durably into this destination's outbox; None when the destination
        already has it, the same content (``digest``) under the same UID.

        An image processed again after a crash gives the same result: it is not sent twice.
        An image sent again with corrected patient data gives another digest: the corrected
        result is sent.
        """
        path = self.folder / f"{dataset.SOPInstanceUID}.dcm"
        if digest and _read(self.ledger / path.stem) == digest:
            return None
        # The sidecar first: the sender picks up *.dcm, and must find its source beside it.
        with atomic_file(path.with_suffix(".json")) as handle:
            handle.write(json.dumps({"source": source_uid, "digest": digest}).encode())
        with atomic_file(path) as handle:
            dataset.save_as(handle, enforce_file_format=True)
        return path

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
        return sorted((p for p in self.folder.glob("*.dcm")), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def wake(self) -> None:
        self._wake.set()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._main, name=f"send-{self.destination.name}", daemon=True)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported here; the node's supervisor restarts the sender
            logger.critical("%s: sender thread ended: %s", self.destination, describe(exc))

    def start(self) -> None:
        self._thread.start()

    def restart(self) -> None:
        """Start a new sender thread after the last one ended unexpectedly."""
        self.stats.busy_since = None
        self._thread = self._new_thread()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                delivered = self._round()
            except Exception as exc:  # noqa: BLE001 - a sender must outlive whatever one round does
                self.stats.busy_since = None
                self.stats.last_error = f"internal error ({describe(exc)})"
                logger.error("%s: %s", self.destination, self.stats.last_error)
                delivered = False
            if delivered is None:
                continue
            if delivered:
                backoff = 0.0
                continue
            backoff = next_backoff(backoff, self.config)
            wait, self._retry_after = max(backoff, min(self._retry_after, self.config.max_backoff_s)), 0.0
            logger.warning("%s: delivery failed (%s); next try in %.1f s", self.destination, self.stats.last_error, wait)
            self._pause(wait)

    def _round(self) -> bool | None:
        """One batch: True when the destination was reached, False when not, None when idle."""
        files = self.pending()
        self.stats.backlog = len(files)
        self.stats.oldest = _mtime(files[0]) if files else None
        if not files:
            self.stats.failing_since = None  # nothing left to fail on
            self._wake.wait(1.0)
            self._wake.clear()
            return None
        self.stats.busy_since = time.monotonic()
        try:
            return self._send_batch(files[: self.config.batch_size])
        finally:
            self.stats.busy_since = None

    def _pause(self, seconds: float) -> None:
        """Wait before the next attempt; a stop ends the wait at once."""
        self._stop.wait(seconds)

    def _send_batch(self, files: list[Path]) -> bool:
        """Send ``files`` over one link; False when the destination could not be reached or used."""
        in_doubt = {path for path in files if self._sending_marker(path).exists()}
        try:
            link = self.transport.open(ask=bool(in_doubt))
        except Unreachable as exc:
            self.stats.failed_associations += 1
            self._unavailable(files, Outcome(Status.UNAVAILABLE, exc.reason, exc.detail))  # markers stay: nothing was sent
            return False
        try:
            return self._use(link, files, in_doubt)
        finally:
            link.close()

    def _use(self, link: Link, files: list[Path], in_doubt: set[Path]) -> bool:
        """Ask about the objects in doubt, send the rest; False when the link broke or the destination was unavailable."""
        todo = []
        for path in files:
            if path in in_doubt and link.usable and link.has(path):
                self._delivered(path, path.stem, self._source_of(path))
            else:
                todo.append(path)
        usable = True
        for group in link.groups(todo):
            if not (usable and link.usable) or self._stop.is_set():
                break
            self._wire_started = None
            outcomes = link.send(group, self._on_wire)
            if self._wire_started is not None:
                self.on_sent(time.perf_counter() - self._wire_started)
            settled = [self._settle(path, outcome) for path, outcome in outcomes.items()]  # every one, even after a False
            usable = all(settled)
        return usable and link.usable

    def _on_wire(self, group: list[Path]) -> None:
        """Mark objects about to leave: should the process die before their answer, they are in doubt."""
        self.stats.busy_since = time.monotonic()
        for path in group:
            _touch(self._sending_marker(path))
        self._wire_started = time.perf_counter()

    def _sending_marker(self, path: Path) -> Path:
        """Present while ``path`` is on the wire or unanswered: after a crash, the object is in doubt."""
        return self.ledger / f"{path.stem}.sending"

    def _settle(self, path: Path, outcome: Outcome) -> bool:
        """Act on what became of one object; False when the destination could not take it now."""
        if outcome.status is not Status.UNANSWERED:  # answered: no longer in doubt
            self._sending_marker(path).unlink(missing_ok=True)
        if outcome.status is Status.STORED:
            self._delivered(path, path.stem, self._source_of(path))
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

    def _delivered(self, path: Path, sop_uid: str, source: str) -> None:
        try:
            _write(self.ledger / path.stem, self._sidecar(path).get("digest", ""))
        except OSError:  # a full disk: the destination has the object all the same; sending it again would duplicate it
            logger.warning("%s: could not note the delivery of %s (disk full?); an image processed again would be sent again", self.destination, path.stem)
        self._sending_marker(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        fsync_dir(self.folder)
        self._attempts.pop(path.name, None)
        self.stats.failing_since = None
        self._resume()
        self.on_delivered(self.destination, sop_uid, source, None)

    def _note_failure(self, files: list[Path]) -> None:
        now = time.monotonic()
        for path in files:
            attempts = self._attempts.setdefault(path.name, _Attempts())
            attempts.first_failure = attempts.first_failure or now
            if now - attempts.first_failure >= self.config.dead_letter_after_s:
                self._dead_letter(path, "undeliverable", f"undeliverable for {self.config.dead_letter_after_s:.0f} s, last: {self.stats.last_error}")

    def _dead_letter(self, path: Path, reason: str, why: str) -> None:
        source = self._source_of(path)
        for part in (path, path.with_suffix(".json")):
            if part.exists():
                os.replace(part, self.dead / part.name)
        try:
            with atomic_file(self.dead / path.with_suffix(".why.txt").name) as handle:
                handle.write(f"{reason}: {why}\n".encode())
        except OSError:  # a full disk: the move matters more than the note; the audit line has the reason
            pass
        fsync_dir(self.dead)
        self._sending_marker(path).unlink(missing_ok=True)
        self._attempts.pop(path.name, None)
        logger.error("%s: %s moved to dead letters: %s", self.destination, path.stem, why)
        self.on_delivered(self.destination, path.stem, source, reason)

    def _source_of(self, path: Path) -> str:
        return str(self._sidecar(path).get("source", ""))

    @staticmethod
    def _sidecar(path: Path) -> dict:
        try:
            found = json.loads(path.with_suffix(".json").read_text())
            return found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            return {}


def open_transport(destination: Destination | WebDestination, calling_ae: str, config: OutboxConfig, tls: ssl.SSLContext | None, timeout_s: float) -> Transport:
    """C-STORE to an AE title, STOW-RS to a URL."""
    if isinstance(destination, WebDestination):
        return StowTransport(destination, tls, timeout_s, config.max_request_mb * 2**20)
    return CStoreTransport(destination, calling_ae, tls, timeout_s)


def _touch(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))


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
