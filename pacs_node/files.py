"""Durable files on the node's own disk: written whole or not at all, private to the service
account, and the disk's passing conditions (full, out of memory) told apart from lasting ones.

The spool, the outbox, the audit trail and the results folder all write through
:func:`atomic_file` and :func:`private_folder`; retention (:func:`prune`) applies to every
folder a person keeps files in.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

#: Errors that say "not now" rather than "never": the disk or memory is full for the moment.
TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EAGAIN, errno.EMFILE, errno.ENFILE}
)

FILE_MODE, FOLDER_MODE = 0o600, 0o700


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk, full memory or a
    similar condition worth retrying later (pydicom re-raises a write's ENOSPC as an OSError
    without an errno, naming the element it was writing)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MemoryError) or (
            isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS
        ):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def private_folder(folder: Path) -> Path:
    """``folder``, and every parent it creates, readable by the service account only."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(mode=FOLDER_MODE, exist_ok=True)
        os.chmod(created, FOLDER_MODE)
    leaf = missing[0] if missing else folder
    os.chmod(leaf, FOLDER_MODE)
    return leaf


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


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SEQUENCE = itertools.count()


@contextmanager
def atomic_file(path: Path, tmp_dir: Path | None = None) -> Iterator[BinaryIO]:
    """Open a file (mode 0600) that appears at ``path`` complete and durable, or not at all."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{next(_SEQUENCE)}.part"
    try:
        with os.fdopen(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb"
        ) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


#: Companion files of an instance kept for a person: the reason, the receipt.
COMPANIONS = (".why.json", ".why.txt", ".json", ".dcm")


def prune(folder: Path, days: float, max_mb: int) -> int:
    """Remove the oldest instances of ``folder`` (with their companion files) beyond an age and a total size.

    The newest instances are kept while they fit; limits of 0 are no limit.
    """
    groups: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        if path.is_file():
            key = next(
                (path.name[: -len(s)] for s in COMPANIONS if path.name.endswith(s)), path.name
            )
            groups.setdefault(key, []).append(path)
    now, removed, kept = time.time(), 0, 0
    # An instance is as old as its oldest file (the image, kept when it arrived).
    for files in sorted(
        groups.values(), key=lambda files: min(_mtime(f) for f in files), reverse=True
    ):
        size, age = sum(_size(f) for f in files), now - min(_mtime(f) for f in files)
        if (days and age > days * 86400) or (max_mb and kept + size > max_mb * 2**20):
            for f in files:
                f.unlink(missing_ok=True)
            removed += 1
        else:
            kept += size
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
