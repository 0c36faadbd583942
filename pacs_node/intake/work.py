"""The worker's queue: instances waiting for the model, in order, with retries and suspects.

* Instances are taken in batches of up to ``batch_size``, and of at most ``max_bytes`` of
  what their decoded images will hold until their results are written (``weigh`` tells, from
  each header); an instance heavier than that on its own is taken alone.
* A *suspect* (in flight when the process last died, or when the worker thread died) is
  always taken alone, so that a file that kills the process is found by itself and the
  others of its batch are not blamed with it.
* An instance that met a passing condition (a full disk) is put back with a delay and
  taken again when the delay has passed, before newer work; it is never parked for good.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path


class WorkQueue:
    """Thread-safe; ``put`` from the association threads, ``take`` from the worker."""

    def __init__(self, weigh: Callable[[Path], int] | None = None) -> None:
        self._weigh = weigh
        self._ready: collections.deque[Path] = collections.deque()
        self._later: list[tuple[float, int, Path]] = []
        self._suspects: set[str] = set()
        self._order = itertools.count()
        self._changed = threading.Condition()

    def put(self, path: Path) -> None:
        with self._changed:
            self._ready.append(path)
            self._changed.notify()

    def put_suspects(self, paths: list[Path]) -> None:
        """Put ``paths`` first, each to be taken alone."""
        with self._changed:
            self._suspects.update(p.name for p in paths)
            self._ready.extendleft(reversed(paths))
            self._changed.notify()

    def retry_later(self, path: Path, seconds: float) -> None:
        with self._changed:
            heapq.heappush(self._later, (time.monotonic() + seconds, next(self._order), path))

    def take(self, batch_size: int, timeout: float, max_bytes: int | None = None) -> list[Path]:
        """Up to ``batch_size`` paths (a suspect alone) that weigh at most ``max_bytes`` together
        (the first whatever it weighs); [] when nothing came within ``timeout``."""
        with self._changed:
            self._release_due()
            if not self._ready:
                self._changed.wait(timeout=min(timeout, self._next_due()))
                self._release_due()
            if not self._ready:
                return []
            first = self._ready.popleft()
            if first.name in self._suspects:
                self._suspects.discard(first.name)
                return [first]
            batch, held = [first], self._weight(first, max_bytes)
            while (
                self._ready
                and len(batch) < batch_size
                and self._ready[0].name not in self._suspects
            ):
                weight = self._weight(self._ready[0], max_bytes)
                if max_bytes is not None and held + weight > max_bytes:
                    break
                batch.append(self._ready.popleft())
                held += weight
            return batch

    def _weight(self, path: Path, max_bytes: int | None) -> int:
        return self._weigh(path) if self._weigh is not None and max_bytes is not None else 0

    def qsize(self) -> int:
        """Everything waiting, retries included."""
        with self._changed:
            return len(self._ready) + len(self._later)

    @property
    def retrying(self) -> int:
        with self._changed:
            return len(self._later)

    def _release_due(self) -> None:
        now, due = time.monotonic(), []
        while self._later and self._later[0][0] <= now:
            due.append(heapq.heappop(self._later)[2])
        self._ready.extendleft(reversed(due))

    def _next_due(self) -> float:
        return max(0.0, self._later[0][0] - time.monotonic()) if self._later else float("inf")
