"""The audit trail: one JSON line per received instance, and one per delivery.

Lines carry correlation ids (SOP Instance UID, Study Instance UID), the calling AE title,
status, skip reason, the result, where it went and timings. They never carry the patient's
name, id or birth date: :data:`FIELDS` is the complete list of what a line may hold, and
anything else is dropped before writing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

#: Every key an audit line may have.
FIELDS = (
    "time", "event", "calling_ae", "sop_instance_uid", "study_instance_uid", "sop_class_uid", "status", "skip_reason",
    "detail", "result", "outputs", "delivery", "destination", "timings_ms",
)  # fmt: skip


class AuditLog:
    """Append-only JSON lines, flushed and fsynced per line (one writer per process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event}
        record |= {k: v for k, v in fields.items() if k in FIELDS and v is not None}
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        return record

    def close(self) -> None:
        with self._lock:
            self._handle.close()
