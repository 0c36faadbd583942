"""The durable spool: what the node received and has not finished with.

Layout under the spool folder::

    tmp/        partial writes (removed at start-up)
    incoming/   received instances waiting for, or in, processing: <SOPInstanceUID>.dcm
    skipped/    received instances that are not frontal chest radiographs (kept when asked)
    failed/     instances whose processing raised, or that were in flight when the node
                died too often (a file that crashes a decoder must not crash the node
                at every start); kept for a person to look at
    inflight.json   instances being processed, with how many times processing began

A C-STORE is acknowledged only after its bytes are in ``incoming/`` (write to ``tmp/``,
fsync, atomic rename, fsync of the folder), so a crash at any moment, ``kill -9``
included, loses nothing that was acknowledged. An instance leaves ``incoming/`` only
after its results are durable in the outbox; a restart therefore picks up every instance
without a result, and because result UIDs are derived from the source instance,
processing one twice overwrites rather than duplicates.

Each file is a DICOM Part 10 file whose file meta records the calling AE title as
Sending Application Entity Title (0002,0017), so the audit trail survives a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info

_UID = re.compile(r"^[0-9.]{1,64}$")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, tmp_dir: Path | None = None) -> Iterator[BinaryIO]:
    """Open a file that appears at ``path`` complete and durable, or not at all."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{id(path):x}.part"
    try:
        with tmp.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def instance_name(sop_instance_uid: str) -> str:
    """File name of an instance: its UID when that is a valid UID, else a hash of it."""
    uid = sop_instance_uid.strip().rstrip("\x00")
    if _UID.match(uid):
        return f"{uid}.dcm"
    return f"x{hashlib.sha256(uid.encode(errors='replace')).hexdigest()[:40]}.dcm"


class Spool:
    """The spool folders and the moves between them (one process owns a spool)."""

    def __init__(self, root: str | Path, keep_skipped: bool = True) -> None:
        self.root = Path(root)
        self.keep_skipped = keep_skipped
        self.tmp, self.incoming, self.skipped, self.failed = (self.root / n for n in ("tmp", "incoming", "skipped", "failed"))
        for folder in (self.tmp, self.incoming, self.skipped, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():  # writes that a crash interrupted were never acknowledged
            stale.unlink(missing_ok=True)

    # --- in-flight bookkeeping: a file that kills the process is not retried forever ---------

    def begin(self, paths: list[Path]) -> None:
        """Record that processing of ``paths`` starts (durably, before it starts)."""
        starts = self._inflight()
        for path in paths:
            starts[path.name] = starts.get(path.name, 0) + 1
        self._save_inflight(starts)

    def end(self, paths: list[Path]) -> None:
        """Processing of ``paths`` ended, whatever its outcome."""
        starts = self._inflight()
        for path in paths:
            starts.pop(path.name, None)
        self._save_inflight(starts)

    def quarantine(self, max_starts: int) -> list[tuple[Path, int]]:
        """Move to ``failed/`` what was in flight at ``max_starts`` deaths of the process; returns them."""
        starts, moved = self._inflight(), []
        for name, count in sorted(starts.items()):
            path = self.incoming / name
            if count >= max_starts and path.exists():
                self._move(path, self.failed)
                moved.append((self.failed / name, count))
        if moved:
            self._save_inflight({k: v for k, v in starts.items() if (self.incoming / k).exists()})
        return moved

    def _inflight(self) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads((self.root / "inflight.json").read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_inflight(self, starts: dict[str, int]) -> None:
        with atomic_file(self.root / "inflight.json", self.tmp) as handle:
            handle.write(json.dumps(starts).encode())

    def store(self, file_meta: FileMetaDataset, dataset_bytes: bytes) -> Path:
        """Write a received instance durably into ``incoming/`` and return its path."""
        path = self.incoming / instance_name(str(file_meta.MediaStorageSOPInstanceUID))
        with atomic_file(path, self.tmp) as handle:
            handle.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(handle, file_meta, enforce_standard=True)
            handle.write(dataset_bytes)
        return path

    def pending(self) -> list[Path]:
        """Instances in ``incoming/``, oldest first: the work a (re)started node must do."""
        files = [p for p in self.incoming.iterdir() if p.suffix == ".dcm"]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def count(self) -> int:
        return sum(1 for p in self.incoming.iterdir() if p.suffix == ".dcm")

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def done(self, path: Path) -> None:
        """The instance's results are durable elsewhere: forget it."""
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def skip(self, path: Path) -> None:
        """Not for the model: keep it in ``skipped/`` (or drop it when not keeping skipped)."""
        self._move(path, self.skipped) if self.keep_skipped else self.done(path)

    def fail(self, path: Path) -> None:
        """Processing raised: keep the instance in ``failed/`` for a person to look at."""
        self._move(path, self.failed)

    def _move(self, path: Path, folder: Path) -> None:
        if path.exists():
            os.replace(path, folder / path.name)
            fsync_dir(folder)
            fsync_dir(path.parent)
