"""How a sender reaches a destination: the interface both transports keep, and what became of each object.

The outbox (:mod:`pacs_node.delivery.outbox`) owns everything a delivery promises: the persistent
queue, backoff, dead letters, the delivery ledger, the ``sending`` markers of objects in
doubt. A transport only moves bytes and says what happened: :mod:`pacs_node.delivery.cstore` over a
DICOM association (C-STORE, C-FIND), :mod:`pacs_node.delivery.stow` over HTTP (STOW-RS, QIDO-RS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol


class Status(Enum):
    """What became of one object sent."""

    #: The destination has it.
    STORED = "stored"
    #: The destination answered no; counted toward ``max_refusals``, then a dead letter.
    REFUSED = "refused"
    #: It can never be sent (unreadable, a class the destination takes in no form): a dead letter at once.
    REJECTED = "rejected"
    #: The destination could take nothing now (down, busy, refused the credentials): tried
    #: again after a backoff, never blamed on the object.
    UNAVAILABLE = "unavailable"
    #: It went out and no answer came: in doubt, asked about before it is sent again.
    UNANSWERED = "unanswered"


@dataclass(frozen=True)
class Outcome:
    """The outcome of one object.

    Attributes:
        reason: a dead letter's reason code (REFUSED, REJECTED); for UNAVAILABLE, why the
            destination's deliveries are held when a person must act (``authentication``),
            else empty.
        detail: one line for ``/health`` and the dead letter's note: codes and fixed
            sentences only, never a value the destination sent.
        retry_after: seconds the destination asked to be left alone (HTTP Retry-After).
    """

    status: Status
    reason: str = ""
    detail: str = ""
    retry_after: float = 0.0


STORED = Outcome(Status.STORED)


class Unreachable(Exception):
    """The destination could not be reached at all (no connection, association rejected, TLS failed).

    Args:
        detail: one line saying why, for ``/health``.
        reason: a hold reason, as in :class:`Outcome`.
    """

    def __init__(self, detail: str, reason: str = "") -> None:
        super().__init__(detail)
        self.detail, self.reason = detail, reason


class Link(Protocol):
    """An open way to one destination, for one batch (an association, an HTTP connection)."""

    @property
    def usable(self) -> bool:
        """False once the link broke or the destination stopped taking objects: the batch waits for the backoff."""

    def has(self, path: Path) -> bool:
        """Whether the destination already stores the object of ``path`` (in doubt after a crash); False when it cannot say."""

    def groups(self, files: list[Path]) -> list[list[Path]]:
        """``files`` in the groups sent together (one C-STORE each, or one STOW-RS request per size cap)."""

    def send(self, group: list[Path], on_wire: Callable[[list[Path]], None]) -> dict[Path, Outcome]:
        """Send one group; ``on_wire`` is called just before its bytes leave. The outcome of each file."""

    def close(self) -> None: ...


class Transport(Protocol):
    """Opens links to one destination."""

    def open(self, ask: bool) -> Link:
        """A link for one batch (``ask``: objects in doubt will be asked about); raises :class:`Unreachable`."""
