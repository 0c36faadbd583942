"""Sending results: one persistent outbox per destination, each with its own sender thread.

``outbox/<destination>/`` holds the results still to deliver, one DICOM file each, written
durably before the source instance leaves the spool. A sender sends what is there in
batches, one association per batch, deletes what the destination accepted, and after a
failure waits with exponential backoff up to a cap. An object the destination refuses
``max_refusals`` times, whose SOP class it does not accept at all, or that stays
undeliverable for ``dead_letter_after_s``, moves to ``dead-letter/<destination>/`` with
the reason beside it, for a person to look at. Destinations never wait for each other: a
destination that is down delays only its own outbox (pynetdicom itself has no retry; a
gateway that retries a bad destination in a tight loop starves the rest).

A sender never dies of what a destination or a file does: every failure is recorded and
retried or dead-lettered, and the loop goes on. Each delivery leaves a small marker in
``outbox/<destination>/.delivered/`` (kept for ``dead_letter_after_s``), so an image
processed again after a crash does not send results the destination already has. An object
whose C-STORE was on the wire when the process died is in doubt: before sending it again,
the sender asks the destination (C-FIND, where it answers queries) whether it has it.
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

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from .config import Destination, OutboxConfig
from .logs import describe
from .spool import FILE_MODE, atomic_file, fsync_dir, private_folder, prune

logger = logging.getLogger(__name__)

#: The storage classes the node sends, each offered in both uncompressed syntaxes.
RESULT_CLASSES = (Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage, GrayscaleSoftcopyPresentationStateStorage)
RESULT_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: C-STORE statuses that mean the destination has the object: success and the warnings
#: (coercion of data elements, elements discarded, data set does not match SOP class).
DELIVERED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


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
    """

    failed_associations: int = 0
    last_error: str = ""
    backlog: int = 0
    busy_since: float | None = None


class DestinationSender:
    """The outbox and sender thread of one destination.

    Args:
        destination: where to send.
        root: the outbox root; this destination uses ``root/<name>`` and ``root/../dead-letter/<name>``.
        calling_ae: this node's AE title.
        config: batching, backoff and dead-letter settings.
        on_delivered: called with ``(destination, sop_instance_uid, source_uid, reason)`` per
            object: reason None when delivered, else the dead letter's reason code.
        tls: client TLS context, or None.
        timeout_s: ACSE, DIMSE and network timeout.
        on_sent: called with the seconds each C-STORE took.
    """

    def __init__(
        self,
        destination: Destination,
        root: Path,
        calling_ae: str,
        config: OutboxConfig,
        on_delivered: Callable[[Destination, str, str, str | None], None] | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 30.0,
        on_sent: Callable[[float], None] | None = None,
    ) -> None:
        self.destination, self.config, self.tls = destination, config, tls
        self.folder = private_folder(root / destination.name)
        self.dead = private_folder(root.parent / "dead-letter" / destination.name)
        self.ledger = private_folder(self.folder / ".delivered")
        self.on_delivered = on_delivered or (lambda *_: None)
        self.on_sent = on_sent or (lambda _: None)
        self.stats = DeliveryStats()
        self._attempts: dict[str, _Attempts] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ae = AE(ae_title=calling_ae)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(self._ae, timeout, timeout_s)
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
            logger.warning("%s: delivery failed (%s); next try in %.1f s", self.destination, self.stats.last_error, backoff)
            self._pause(backoff)

    def _round(self) -> bool | None:
        """One batch: True when the destination was reached, False when not, None when idle."""
        files = self.pending()
        self.stats.backlog = len(files)
        if not files:
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
        """Send ``files`` over one association; False when the destination could not be reached."""
        in_doubt = {path for path in files if self._sending_marker(path).exists()}
        self._ae.requested_contexts = []
        for sop_class in RESULT_CLASSES:
            self._ae.add_requested_context(sop_class, list(RESULT_SYNTAXES))
        self._ae.add_requested_context(SecondaryCaptureImageStorage, [JPEGLSLossless])  # its own context: accepted or not on its own
        if in_doubt:  # to ask the destination whether it has them, where it answers queries
            self._ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        tls_args = (self.tls, self.destination.host) if self.tls else None
        assoc = self._ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            self.stats.failed_associations += 1
            self.stats.last_error = "association rejected" if assoc.is_rejected else "no connection, or the association was aborted"
            self._note_failure(files)
            return False
        try:
            for path in files:
                if not assoc.is_established or self._stop.is_set():
                    return assoc.is_established
                if path in in_doubt and self._destination_has(assoc, path):
                    self._delivered(path, path.stem, self._source_of(path))
                    continue
                self._send_one(assoc, path)
        finally:
            if assoc.is_established:
                assoc.release()
        return True

    def _sending_marker(self, path: Path) -> Path:
        """Present while a C-STORE of ``path`` is on the wire: after a crash, the object is in doubt."""
        return self.ledger / f"{path.stem}.sending"

    def _destination_has(self, assoc, path: Path) -> bool:
        """Whether the destination already stores an object whose C-STORE was cut by a crash
        (PS3.4 C.4.1, Study Root C-FIND at IMAGE level); False when it cannot say."""
        if not any(cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind for cx in assoc.accepted_contexts):
            return False
        try:
            header = dcmread(path, stop_before_pixels=True)
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID
            answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        except Exception as exc:  # noqa: BLE001 - a destination that cannot answer gets the object again
            logger.info("%s: could not ask whether %s arrived (%s); sending it again", self.destination, path.stem, describe(exc))
            return False
        uid = str(header.SOPInstanceUID)
        return any(
            status and int(status.Status) in (0xFF00, 0xFF01) and found is not None and str(found.get("SOPInstanceUID", "")).strip(" \x00") == uid
            for status, found in answers
        )  # a match for this very instance, not whatever a lax PACS returns

    def _send_one(self, assoc, path: Path) -> None:
        try:
            dataset = dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            self._dead_letter(path, "unreadable", f"unreadable outbox file ({type(exc).__name__})")
            return
        if not _accepted(assoc, dataset) and dataset.file_meta.TransferSyntaxUID.is_compressed:
            dataset.decompress(generate_instance_uid=False)  # the same instance, the same pixels, uncompressed
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if not _accepted(assoc, dataset):
            name = UID(str(dataset.SOPClassUID)).name
            self._dead_letter(path, "sop-class-not-accepted", f"the destination accepts no presentation context for {name} in {UID(str(dataset.file_meta.TransferSyntaxUID)).name}")
            return
        self.stats.busy_since = time.monotonic()
        started = time.perf_counter()
        _touch(self._sending_marker(path))
        try:
            status = assoc.send_c_store(dataset)
        except Exception as exc:  # noqa: BLE001 - an object pynetdicom cannot send is refused, not fatal
            self._sending_marker(path).unlink(missing_ok=True)
            self.stats.last_error = f"sending failed ({describe(exc)})"
            self._refused(path, "send-error", self.stats.last_error)
            return
        self.on_sent(time.perf_counter() - started)
        self._answered(path, dataset, status)

    def _answered(self, path: Path, dataset: Dataset, status) -> None:
        code = int(getattr(status, "Status", -1)) if status else -1
        if status:  # the destination answered: the object is no longer in doubt
            self._sending_marker(path).unlink(missing_ok=True)
        if code in DELIVERED:
            self._delivered(path, str(dataset.SOPInstanceUID), self._source_of(path))
            return
        if not status:  # no response: the association broke; try again later
            self.stats.last_error = "no response to C-STORE"
            self._note_failure([path])
            return
        self.stats.last_error = f"C-STORE status 0x{code:04X}"
        self._refused(path, "refused", self.stats.last_error)

    def _refused(self, path: Path, reason: str, last: str) -> None:
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
        self.on_delivered(self.destination, sop_uid, source, None)

    def _note_failure(self, files: list[Path]) -> None:
        now = time.monotonic()
        for path in files:
            attempts = self._attempts.setdefault(path.name, _Attempts())
            attempts.first_failure = attempts.first_failure or now
            if now - attempts.first_failure >= self.config.dead_letter_after_s:
                self._dead_letter(path, "undeliverable", f"undeliverable for {self.config.dead_letter_after_s:.0f} s")

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


def _accepted(assoc, dataset: Dataset) -> bool:
    """Whether the association has an accepted context for the object's SOP class and transfer syntax."""
    sop_class, syntax = str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID)
    return any(str(cx.abstract_syntax) == sop_class and syntax in [str(t) for t in cx.transfer_syntax] for cx in assoc.accepted_contexts)


def _touch(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))


def _write(path: Path, text: str) -> None:
    """A small marker with ``text`` in it (not fsynced: it only has to outlive the process)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
