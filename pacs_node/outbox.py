"""Sending results: one persistent outbox per destination, each with its own sender thread.

``outbox/<destination>/`` holds the results still to deliver, one DICOM file each, written
durably before the source instance leaves the spool. A sender sends what is there in
batches, one association per batch, deletes what the destination accepted, and after a
failure waits with exponential backoff up to a cap. An object the destination refuses
``max_refusals`` times, or that stays undeliverable for ``dead_letter_after_s``, moves to
``dead-letter/<destination>/`` for a person to look at. Destinations never wait for each
other: a destination that is down delays only its own outbox (pynetdicom itself has no
retry; a gateway that retries a bad destination in a tight loop starves the rest).
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
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .config import Destination, OutboxConfig
from .spool import atomic_file, fsync_dir

logger = logging.getLogger(__name__)

#: The storage classes the node sends, each offered in both uncompressed syntaxes.
RESULT_CLASSES = (Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage)
RESULT_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


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
    """What /health shows of a destination (delivery counts are in the node's metrics)."""

    failed_associations: int = 0
    last_error: str = ""
    backlog: int = 0


class DestinationSender:
    """The outbox and sender thread of one destination.

    Args:
        destination: where to send.
        root: the outbox root; this destination uses ``root/<name>`` and ``root/../dead-letter/<name>``.
        calling_ae: this node's AE title.
        config: batching, backoff and dead-letter settings.
        on_delivered: called with ``(destination, sop_instance_uid, source_uid, ok)`` per object.
        tls: client TLS context, or None.
        timeout_s: ACSE, DIMSE and network timeout.
    """

    def __init__(
        self,
        destination: Destination,
        root: Path,
        calling_ae: str,
        config: OutboxConfig,
        on_delivered: Callable[[Destination, str, str, bool], None] | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.destination, self.config, self.tls = destination, config, tls
        self.folder = root / destination.name
        self.dead = root.parent / "dead-letter" / destination.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dead.mkdir(parents=True, exist_ok=True)
        self.on_delivered = on_delivered or (lambda *_: None)
        self.stats = DeliveryStats()
        self._attempts: dict[str, _Attempts] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ae = AE(ae_title=calling_ae)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(self._ae, timeout, timeout_s)
        self._thread = threading.Thread(target=self._run, name=f"send-{destination.name}", daemon=True)

    def put(self, dataset: Dataset, source_uid: str) -> Path:
        """Write a result durably into this destination's outbox."""
        path = self.folder / f"{dataset.SOPInstanceUID}.dcm"
        # The sidecar first: the sender picks up *.dcm, and must find its source beside it.
        with atomic_file(path.with_suffix(".json")) as handle:
            handle.write(json.dumps({"source": source_uid}).encode())
        with atomic_file(path) as handle:
            dataset.save_as(handle, enforce_file_format=True)
        return path

    def pending(self) -> list[Path]:
        return sorted((p for p in self.folder.glob("*.dcm")), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            files = self.pending()
            self.stats.backlog = len(files)
            if not files:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            if self._send_batch(files[: self.config.batch_size]):
                backoff = 0.0
                continue
            backoff = next_backoff(backoff, self.config)
            logger.warning("%s: delivery failed (%s); next try in %.1f s", self.destination, self.stats.last_error, backoff)
            self._pause(backoff)

    def _pause(self, seconds: float) -> None:
        """Wait before the next attempt; a stop ends the wait at once."""
        self._stop.wait(seconds)

    def _send_batch(self, files: list[Path]) -> bool:
        """Send ``files`` over one association; False when the destination could not be reached."""
        self._ae.requested_contexts = []
        for sop_class in RESULT_CLASSES:
            self._ae.add_requested_context(sop_class, list(RESULT_SYNTAXES))
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
                self._send_one(assoc, path)
        finally:
            if assoc.is_established:
                assoc.release()
        return True

    def _send_one(self, assoc, path: Path) -> None:
        source = self._source_of(path)
        try:
            dataset = dcmread(path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            self._dead_letter(path, f"unreadable outbox file ({exc})")
            return
        status = assoc.send_c_store(dataset)
        code = int(getattr(status, "Status", -1)) if status else -1
        if code in (0x0000, 0xB000, 0xB006, 0xB007):
            self._delivered(path, str(dataset.SOPInstanceUID), source)
            return
        if not status:  # no response: the association broke; try again later
            self.stats.last_error = "no response to C-STORE"
            self._note_failure([path])
            return
        self.stats.last_error = f"C-STORE status 0x{code:04X}"
        attempts = self._attempts.setdefault(path.name, _Attempts())
        attempts.refusals += 1
        if attempts.refusals >= self.config.max_refusals:
            self._dead_letter(path, f"refused {attempts.refusals} times, last status 0x{code:04X}")

    def _delivered(self, path: Path, sop_uid: str, source: str) -> None:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        fsync_dir(self.folder)
        self._attempts.pop(path.name, None)
        self.on_delivered(self.destination, sop_uid, source, True)

    def _note_failure(self, files: list[Path]) -> None:
        now = time.monotonic()
        for path in files:
            attempts = self._attempts.setdefault(path.name, _Attempts())
            attempts.first_failure = attempts.first_failure or now
            if now - attempts.first_failure >= self.config.dead_letter_after_s:
                self._dead_letter(path, f"undeliverable for {self.config.dead_letter_after_s:.0f} s")

    def _dead_letter(self, path: Path, why: str) -> None:
        source = self._source_of(path)
        for part in (path, path.with_suffix(".json")):
            if part.exists():
                os.replace(part, self.dead / part.name)
        (self.dead / path.with_suffix(".why.txt").name).write_text(why + "\n")
        fsync_dir(self.dead)
        self._attempts.pop(path.name, None)
        logger.error("%s: %s moved to dead letters: %s", self.destination, path.stem, why)
        self.on_delivered(self.destination, path.stem, source, False)

    def _source_of(self, path: Path) -> str:
        try:
            return str(json.loads(path.with_suffix(".json").read_text())["source"])
        except (OSError, ValueError, KeyError):
            return ""
