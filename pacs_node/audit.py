"""The audit trail: one JSON line per received instance, per refusal and per delivery.

Lines carry correlation ids (SOP Instance UID, Study Instance UID), the calling AE title,
the peer's address, status, stable reason codes, the result, where it went and timings.
They never carry a value of the data set: :data:`FIELDS` is the complete list of what a
line may hold, the node writes only codes and fixed sentences into ``detail``, and a UID
that is not a valid UID (it could hold anything) is replaced by a hash of it.

The file is created 0600. A line that cannot be written (a full disk) is kept in memory,
in order, and written when space is back: the trail stays complete and never holds half
a line. A process killed halfway through a line leaves that line torn; the next line
written (after a restart, say) starts on a line of its own, so that only the torn line
is lost to a reader, never the whole line after it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pacs_node.files import FILE_MODE, private_folder
from pacs_node.uids import is_valid_uid

logger = logging.getLogger(__name__)

#: Every key an audit line may have.
FIELDS = (
    "time",
    "event",
    "calling_ae",
    "peer",
    "sop_instance_uid",
    "study_instance_uid",
    "sop_class_uid",
    "status",
    "status_code",
    "reason",
    "skip_reason",
    "detail",
    "result",
    "outputs",
    "delivery",
    "destination",
    "contexts",
    "thread",
    "timings_ms",
    "count",
    "node",
)
#: Lines kept in memory while the disk is full; beyond this the oldest are dropped (and counted).
MAX_PENDING = 100_000


def safe_uid(value: object) -> str:
    """A UID as it may appear in logs and the audit trail: itself when valid, else a hash of it."""
    text = str(value or "").strip().rstrip("\x00").strip()
    if not text:
        return ""
    if is_valid_uid(text):
        return text
    return "invalid-uid-" + hashlib.sha256(text.encode(errors="replace")).hexdigest()[:16]


class Bursts:
    """Audit lines of refusals that a peer can repeat at will (connections from a network that
    is not allowed, past a per-host limit ...): each kind, from each peer, is written in full
    ``burst`` times a minute; the rest are counted, and the count is written once a minute
    (``count``). Every refusal stays accounted for; a flood cannot fill the disk or stall
    the accept loop with fsyncs."""

    def __init__(self, audit: AuditLog, burst: int = 10, window_s: float = 60.0) -> None:
        self.audit, self.burst, self.window_s = audit, burst, window_s
        self._windows: dict[tuple[object, ...], _Window] = {}
        self._lock = threading.Lock()

    def write(self, event: str, key: tuple[object, ...], **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.start >= self.window_s:
                self._close(key)
                window = self._windows[key] = _Window(now, event, fields)
            window.written += 1
            held = window.written > self.burst
            window.held += held
        if not held:
            self.audit.write(event, **fields)

    def flush(self) -> None:
        """Write the counts of windows that have ended."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, w in self._windows.items() if now - w.start >= self.window_s]:
                self._close(key)

    def _close(self, key: tuple[object, ...]) -> None:
        window = self._windows.pop(key, None)
        if window and window.held:
            event, fields = window.event, window.fields
            self.audit.write(
                event,
                **(
                    fields
                    | {
                        "count": window.held,
                        "detail": f"{window.held} more like this within {self.window_s:.0f} s",
                    }
                ),
            )


@dataclasses.dataclass
class _Window:
    """One kind of refusal from one peer: when its minute started, how many lines came in it,
    how many of those were held back, and the first line's event and fields (the count's)."""

    start: float
    event: str
    fields: dict[str, Any]
    written: int = 0
    held: int = 0


class AuditLog:
    """Append-only JSON lines, each written whole and fsynced (one writer per process)."""

    def __init__(self, path: str | Path, node: str = "") -> None:
        self.path = Path(path)
        #: the node's name on every line (the scale-out mode: which node did what)
        self.node = node
        private_folder(self.path.parent)
        # read: the last byte (_torn)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, FILE_MODE)
        os.fchmod(self._fd, FILE_MODE)
        self._lock = threading.Lock()
        self._pending: collections.deque[bytes] = collections.deque()
        self.write_errors = 0
        self.dropped = 0

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event}
        record |= {k: v for k, v in fields.items() if k in FIELDS and v is not None}
        if self.node:
            record["node"] = self.node
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(line)
            self._flush()
        return record

    @property
    def backlog(self) -> int:
        """Lines waiting for the disk."""
        return len(self._pending)

    def flush(self) -> bool:
        """Write what waits; True when nothing is left waiting."""
        with self._lock:
            return self._flush()

    def _flush(self) -> bool:
        while self._pending and self._fd >= 0:
            size = os.fstat(self._fd).st_size
            line = (b"\n" if self._torn(size) else b"") + self._pending[0]
            try:
                if os.write(self._fd, line) != len(line):
                    raise OSError("short write")
                os.fsync(self._fd)
            except OSError as exc:
                self._undo(size)
                self.write_errors += 1
                if self.write_errors == 1 or self.write_errors % 1000 == 0:
                    logger.error(
                        "audit log %s: cannot write (%s); %d line(s) kept in memory until it can",
                        self.path,
                        exc.strerror or exc,
                        len(self._pending),
                    )
                return False
            self._pending.popleft()
        return True

    def _torn(self, size: int) -> bool:
        """Whether the file ends inside a line (a process killed while writing it)."""
        try:
            return size > 0 and os.pread(self._fd, 1, size - 1) != b"\n"
        except OSError:
            return False

    def _undo(self, size: int) -> None:
        """Cut a half-written line off, so the trail stays one JSON object per line."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, size)

    def close(self) -> None:
        with self._lock:
            self._flush()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
