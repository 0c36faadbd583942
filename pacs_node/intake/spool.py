"""The durable spool: what the node received and has not finished with.

Layout under the spool folder (folders 0700, files 0600: they hold patient data)::

    tmp/            data sets still arriving and partial writes (removed at start-up)
    incoming/       received instances waiting for, or in, processing:
                    <receipt>.dcm and <receipt>.json (who sent it, when, which instance)
    skipped/        received instances that get no result (not a frontal chest radiograph,
                    unreadable); kept for a person to look at, within the retention limits
    failed/         instances whose processing failed, each with <receipt>.why.json (a
                    stable reason code), and instances that were in flight, alone, when
                    the node died too often (a file that crashes a decoder must not crash
                    the node at every start)
    attempts.json   instances being processed: how many times processing began for each,
                    alone or in a batch

A C-STORE is acknowledged only after its bytes are in ``incoming/`` (received into
``tmp/``, fsync, atomic rename, fsync of the folder), so a crash at any moment, ``kill -9``
included, loses nothing that was acknowledged. An instance leaves ``incoming/`` only after
its results are durable in the outbox; a restart therefore picks up every instance without
a result, and because result UIDs are derived from the source instance, processing one
twice overwrites rather than duplicates.

Every reception gets its own receipt name (time and a sequence number, never a value from
the data set), so two receptions of the same instance at once never overwrite each other.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread

from pacs_node.files import FILE_MODE, atomic_file, fsync_dir, fsync_file, private_folder, prune

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receipt:
    """What the node knows of a reception besides the data set: never patient data.

    Attributes:
        sop_instance_uid: the Affected SOP Instance UID of the C-STORE (checked against the
            data set's before acceptance).
        calling_ae: the sender's AE title.
        peer: the sender's address.
        received: Unix time of the acknowledgement.
    """

    sop_instance_uid: str
    calling_ae: str
    peer: str
    received: float

    @staticmethod
    def read(path: Path) -> Receipt | None:
        """The receipt at ``path``; None when there is none, or it does not hold what a receipt
        holds (text where text belongs, a finite, non-negative time): a damaged receipt must not
        turn a delivered result into a failure; the caller falls back to the instance's header."""
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return Receipt.of(found)

    @staticmethod
    def of(found: object) -> Receipt | None:
        """The receipt a JSON value holds; None when it does not hold what a receipt holds."""
        if not isinstance(found, dict) or set(found) != RECEIPT_FIELDS:
            return None
        texts = all(
            isinstance(found[key], str) for key in ("sop_instance_uid", "calling_ae", "peer")
        )
        received = found["received"]
        when = (
            isinstance(received, (int, float))
            and not isinstance(received, bool)
            and math.isfinite(received)
            and received >= 0
        )
        return Receipt(**found) if texts and when else None


#: The keys of a receipt's file, no more, no fewer.
RECEIPT_FIELDS = frozenset(field.name for field in fields(Receipt))


class SpoolInUse(OSError):
    """Another process holds the spool."""


def _lock(path: Path) -> BinaryIO:
    """Hold an exclusive lock on ``path`` for the life of the process (released when it ends,
    ``kill -9`` included): two nodes on one spool would process every image twice."""
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE), "r+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SpoolInUse(
            f"{path.parent}: the spool is in use by another process (one node per spool)"
        ) from None
    return handle


def _receipt_from_header(path: Path) -> Receipt | None:
    try:
        ds = dcmread(
            path, stop_before_pixels=True, defer_size=4096, specific_tags=["SOPInstanceUID"]
        )
        calling = str(ds.file_meta.get("SendingApplicationEntityTitle", "")).strip()
        return Receipt(
            str(ds.get("SOPInstanceUID", "")).strip(" \x00"), calling, "", path.stat().st_mtime
        )
    except Exception:  # noqa: BLE001 - an unreadable file has no receipt; the worker says why
        return None


@dataclass
class Attempts:
    """How often processing of one instance began: alone, or as part of a batch."""

    solo: int = 0
    batch: int = 0


class Spool:
    """The spool folders and the moves between them (one process owns a spool)."""

    def __init__(self, root: str | Path, keep_skipped: bool = True) -> None:
        self.root = private_folder(Path(root))
        self._lock_file = _lock(self.root / "spool.lock")
        self.keep_skipped = keep_skipped
        self.tmp, self.incoming, self.skipped, self.failed = (
            private_folder(self.root / n) for n in ("tmp", "incoming", "skipped", "failed")
        )
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._attempts_lock = threading.Lock()
        for stale in self.tmp.iterdir():
            # arrivals and writes that a crash interrupted were never acknowledged
            stale.unlink(missing_ok=True)
        for orphan in self.incoming.glob("*.json"):  # a receipt whose data set never arrived
            if not orphan.with_suffix(".dcm").exists():
                orphan.unlink(missing_ok=True)
        self.attempts = self._load_attempts()

    def close(self) -> None:
        """Let another process (or a later node in this one) have the spool."""
        self._lock_file.close()

    def remove_stale_tmp(self, age_s: float) -> int:
        """Remove files in ``tmp/`` untouched for ``age_s``: arrivals and writes that were
        abandoned (never acknowledged); the number removed."""
        horizon, removed = time.time() - age_s, 0
        for path in self.tmp.iterdir():
            try:
                if path.stat().st_mtime < horizon:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    # --- receiving ----------------------------------------------------------------------------------

    def receipt_name(self) -> str:
        """A fresh, unique, value-free name for one reception."""
        return f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):06d}"

    def admit(self, received: Path, receipt: Receipt) -> Path:
        """Move a fully received data set (a Part 10 file) into ``incoming/``, durably, with its receipt.

        Raises:
            OSError: the disk is full or failing; nothing was admitted.
        """
        name = self.receipt_name()
        path = self.incoming / f"{name}.dcm"
        fsync_file(received)
        with atomic_file(path.with_suffix(".json"), self.tmp) as handle:
            handle.write(json.dumps(asdict(receipt)).encode())
        try:
            _move_file(received, path)
        except OSError:
            path.with_suffix(".json").unlink(missing_ok=True)
            raise
        fsync_dir(self.incoming)
        return path

    def receipt(self, path: Path) -> Receipt | None:
        """The receipt beside ``path``; for an instance without one (a spool of an earlier
        version, a lost or damaged receipt), what its own header says."""
        return Receipt.read(path.with_suffix(".json")) or _receipt_from_header(path)

    # --- in-flight bookkeeping: a file that kills the process is not retried forever ---------

    def begin(self, paths: list[Path], alone: bool | None = None) -> None:
        """Record, durably and before it starts, that processing of ``paths`` begins;
        ``alone``: nothing else is in flight (by default, when ``paths`` is one image).

        Raises:
            OSError: the record could not be written (a full disk); do not process.
        """
        with self._attempts_lock:  # the worker begins a batch while the one before ends
            attempts = {name: Attempts(a.solo, a.batch) for name, a in self.attempts.items()}
            for path in paths:
                entry = attempts.setdefault(path.name, Attempts())
                if (len(paths) == 1) if alone is None else alone:
                    entry.solo += 1
                else:
                    entry.batch += 1
            self._save_attempts(attempts)
            # only once durable: a start that could not be recorded did not happen
            self.attempts = attempts

    def end(self, paths: list[Path]) -> None:
        """Processing of ``paths`` ended, whatever its outcome (the record is best effort)."""
        with self._attempts_lock:
            for path in paths:
                self.attempts.pop(path.name, None)
            try:
                self._save_attempts()
            except OSError as exc:  # kept in memory; written with the next batch
                logger.warning(
                    "could not update %s (%s); it is written again with the next batch",
                    self.root / "attempts.json",
                    exc.strerror,
                )

    def suspects(self) -> set[str]:
        """Instances in flight when the process last died: each is retried alone."""
        return {name for name in self.attempts if (self.incoming / name).exists()}

    def quarantine(self, max_solo: int) -> list[tuple[Path, int]]:
        """Move to ``failed/`` what was in flight, alone, at ``max_solo`` deaths of the process."""
        moved = []
        for name, entry in sorted(self.attempts.items()):
            path = self.incoming / name
            if entry.solo >= max_solo and path.exists():
                self.fail(
                    path, "crash-loop", f"in flight, alone, at {entry.solo} deaths of the node"
                )
                moved.append((self.failed / name, entry.solo))
        self.attempts = {k: v for k, v in self.attempts.items() if (self.incoming / k).exists()}
        if moved:
            self._save_attempts()
        return moved

    def _load_attempts(self) -> dict[str, Attempts]:
        try:
            data = json.loads((self.root / "attempts.json").read_text())
            return {
                str(k): Attempts(int(v.get("solo", 0)), int(v.get("batch", 0)))
                for k, v in data.items()
            }
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def _save_attempts(self, attempts: dict[str, Attempts] | None = None) -> None:
        attempts = self.attempts if attempts is None else attempts
        with atomic_file(self.root / "attempts.json", self.tmp) as handle:
            handle.write(json.dumps({k: asdict(v) for k, v in attempts.items()}).encode())

    # --- the work and its ends ----------------------------------------------------------------------

    def pending(self) -> list[Path]:
        """Instances in ``incoming/``, oldest first: the work a (re)started node must do."""
        return sorted(p for p in self.incoming.iterdir() if p.suffix == ".dcm")

    def count(self) -> int:
        return sum(1 for p in self.incoming.iterdir() if p.suffix == ".dcm")

    def problems(self) -> list[str]:
        """What ``/health`` should say of the spool beyond its disk (nothing, for this one)."""
        return []

    def backlog(self) -> int:
        """Images acknowledged and waiting beyond this node's own queue (none, for this one:
        its queue is its spool)."""
        return 0

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def done(self, path: Path, source_uid: str = "") -> None:
        """The instance's results are durable elsewhere: forget it (``source_uid``: the
        instance the results were built from, which the scale-out mode's spool waits on)."""
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        fsync_dir(path.parent)

    def skip(self, path: Path) -> None:
        """No result for it: keep it in ``skipped/`` (or drop it when not keeping skipped)."""
        if self.keep_skipped:
            self._move(path, self.skipped)
        else:
            self.done(path)

    def fail(self, path: Path, reason: str, detail: str) -> None:
        """Processing failed for good: keep the instance in ``failed/`` with the reason beside it."""
        why = self.failed / f"{path.stem}.why.json"
        try:
            with atomic_file(why, self.tmp) as handle:
                handle.write(
                    json.dumps({"reason": reason, "detail": detail, "time": time.time()}).encode()
                )
        except OSError:  # the move matters more than the note; the audit line has the reason too
            pass
        self._move(path, self.failed)

    def _move(self, path: Path, folder: Path) -> None:
        for part in (path, path.with_suffix(".json")):
            if part.exists():
                os.replace(part, folder / part.name)
        fsync_dir(folder)
        fsync_dir(path.parent)

    # --- retention --------------------------------------------------------------------------------------

    def prune(self, skipped: tuple[float, int], failed: tuple[float, int]) -> int:
        """Apply ``(days, max_mb)`` limits to ``skipped/`` and ``failed/``; the number of files removed."""
        return prune(self.skipped, *skipped) + prune(self.failed, *failed)


def _move_file(source: Path, target: Path) -> None:
    """Rename, or copy across file systems (then fsync) when rename cannot."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_file(target) as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 2**20)
        source.unlink(missing_ok=True)
