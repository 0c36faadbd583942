"""The shared intake of the scale-out mode: images held by PostgreSQL, taken under leases.

Every acknowledged image is a row of ``dp_images`` until a worker has processed it:

* :meth:`IntakeQueue.admit` inserts the image (its bytes and its receipt) and commits. Each
  connection sets ``synchronous_commit = on`` (a database or role may have turned it off) and
  refuses a server that runs with ``fsync = off``: the commit returns once its WAL record is
  on disk, so a receiver that answers the C-STORE after :meth:`admit` returns keeps the node's
  promise, acknowledged = durable, now in storage every node reaches. A connection lost during
  :meth:`admit` leaves its outcome unknown (it may have committed): the sender is answered with
  a failure and may send again, and the second row is the same image, whose results are the
  same (deterministic UIDs and content) and are delivered once by the shared ledger.
* :meth:`IntakeQueue.lease` gives a worker up to ``limit`` images no one holds, oldest first,
  each for ``seconds``: ``SELECT ... FOR UPDATE SKIP LOCKED`` in a CTE (run once), then one
  ``UPDATE``, so two workers never take the same image, and neither waits on the rows the other
  is taking. An image whose lease lapsed (its worker died, or stalled past it) is taken again
  like a new one. Each take increments ``attempts``, the lease's fencing token; the pipeline
  counts in ``solo`` the images it processes alone (:meth:`IntakeQueue.alone`, taken back
  when that processing ends); a graceful :meth:`IntakeQueue.release` takes its take back, so
  that what remains counts the takes that ended in no answer (the crash-loop rule of the spool).
* :meth:`IntakeQueue.renew` extends the leases a worker still holds (its heartbeat while it
  works); :meth:`IntakeQueue.done` deletes an image only for the take that still holds it
  (same ``attempts``, same owner: a lease that lapsed and that no other worker took since is
  still this take's) and says whether it did: a worker whose image was taken over learns it
  there, and the image is processed again. Results are deterministic, so an image processed
  twice yields the same results, which the shared delivery ledger sends once.

Time is PostgreSQL's (``now()``: in autocommit, the statement's start), never a worker's clock:
nodes on several machines agree on when a lease lapses. A lease starts when its statement
does; a worker schedules its heartbeat from its own clock read before calling :meth:`lease`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pacs_node.scale.db import Database

#: Created once, under a lock, by whichever node finds the table missing.
SCHEMA = """
CREATE TABLE dp_images (
    id bigserial PRIMARY KEY,
    sop_instance_uid text NOT NULL,
    receipt jsonb NOT NULL,
    data bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    solo integer NOT NULL DEFAULT 0,
    lease_owner text,
    lease_until timestamptz
);
ALTER TABLE dp_images ALTER COLUMN data SET STORAGE EXTERNAL;
"""


@dataclass(frozen=True, kw_only=True)
class Leased:
    """An image a worker holds: its row, receipt, and its take (``attempts``: the fencing token
    of this lease); :meth:`IntakeQueue.data` reads its bytes."""

    id: int
    sop_instance_uid: str
    receipt: dict[str, Any]
    attempts: int
    solo: int


class IntakeQueue:
    """The ``dp_images`` table (created if missing) over one :class:`~pacs_node.scale.db.Database`
    connection, opened at once and again after it broke.

    Args:
        dsn: a libpq connection string (``host=... port=... dbname=... user=...``).
        node: this node's name; the leases it holds carry it and a random suffix, unique per
            queue object.
        owner: the name on the leases instead (another connection of the same worker: its
            heartbeat's).

    Raises:
        pacs_node.scale.db.DurabilityError: the server runs with ``fsync = off``.
        pacs_node.scale.db.Unavailable: the server could not be reached.
    """

    def __init__(self, dsn: str, node: str, owner: str = "") -> None:
        self.owner = owner or f"{node}-{uuid.uuid4().hex[:12]}"
        self.db = Database(dsn, (("dp_images", SCHEMA),))
        self.db.run(lambda _: None)  # connect now: a node without its database does not start

    def close(self) -> None:
        self.db.close()

    def settings(self) -> dict[str, str]:
        """``fsync`` and ``synchronous_commit`` as this connection runs."""
        return self.db.settings()

    def admit(self, data: bytes, sop_instance_uid: str, receipt: dict[str, Any]) -> int:
        """Hold an image durably (committed, its WAL on disk, before this returns); its row id."""
        rows = self.db.execute(
            "INSERT INTO dp_images (sop_instance_uid, receipt, data) VALUES (%s, %s, %s) RETURNING id",
            (sop_instance_uid.strip(" \x00"), json.dumps(receipt, allow_nan=False), data),
        )
        return int(rows[0][0])  # INSERT ... RETURNING gives its row

    def lease(self, limit: int, seconds: float) -> list[Leased]:
        """Up to ``limit`` images no one holds (never leased, or their lease lapsed), oldest
        first, now held by this worker for ``seconds``; without their bytes (:meth:`data`
        reads them one at a time: a take of many large images does not sit in memory at once)."""
        if not seconds > 0:
            raise ValueError(f"a lease of {seconds} s")
        rows = self.db.execute(
            """
            WITH picked AS (
                SELECT id FROM dp_images
                WHERE lease_until IS NULL OR lease_until < now()
                ORDER BY id
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            )
            UPDATE dp_images AS d SET
                lease_owner = %(owner)s,
                lease_until = now() + make_interval(secs => %(seconds)s),
                attempts = d.attempts + 1
            FROM picked WHERE d.id = picked.id
            RETURNING d.id, d.sop_instance_uid, d.receipt, d.attempts, d.solo
            """,
            {"owner": self.owner, "seconds": float(seconds), "limit": limit},
        )
        return sorted(
            (
                Leased(
                    id=int(r[0]),
                    sop_instance_uid=str(r[1]),
                    receipt=dict(r[2]),
                    attempts=int(r[3]),
                    solo=int(r[4]),
                )
                for r in rows
            ),
            key=lambda leased: leased.id,
        )

    def data(self, leased: Leased) -> bytes | None:
        """The bytes of an image this take holds; None when it no longer holds it."""
        rows = self.db.execute(
            "SELECT data FROM dp_images WHERE id = %s AND attempts = %s AND lease_owner = %s",
            (leased.id, leased.attempts, self.owner),
            binary=True,  # the bytes as they are, not hex
        )
        return bytes(rows[0][0]) if rows else None

    def alone(self, held: Iterable[Leased]) -> set[int]:
        """Count the images of ``held`` this worker still holds as in processing alone (the
        crash-loop rule: an image in flight alone at too many deaths is put aside); their ids."""
        return self._update(held, "solo = d.solo + 1")

    def not_alone(self, held: Iterable[Leased]) -> set[int]:
        """Take back :meth:`alone` for images whose processing ended (the rule counts deaths
        during processing alone, not the takes before or after)."""
        return self._update(held, "solo = greatest(d.solo - 1, 0)")

    def renew(self, held: Iterable[Leased], seconds: float) -> set[int]:
        """Extend this worker's live leases of ``held`` by ``seconds`` from now; the ids it still held."""
        return self._update(
            held, f"lease_until = now() + make_interval(secs => {float(seconds)!r})"
        )

    def done(self, leased: Leased) -> bool:
        """Forget a processed image, if this take still holds its lease; whether it did."""
        rows = self.db.execute(
            """
            DELETE FROM dp_images WHERE id = %s AND attempts = %s AND lease_owner = %s
            RETURNING id
            """,
            (leased.id, leased.attempts, self.owner),
        )
        return bool(rows)

    def release(self, held: Iterable[Leased], *, alone: bool = False) -> None:
        """Put this worker's images back at once, for any worker to take; the take is taken back
        (a stop is not a death)."""
        taken_back = "attempts = d.attempts - 1" + (", solo = d.solo - 1" if alone else "")
        self._update(held, f"lease_owner = NULL, lease_until = NULL, {taken_back}")

    def _update(self, held: Iterable[Leased], assignments: str) -> set[int]:
        """``UPDATE ... SET assignments`` on the rows of ``held`` this take still holds (the
        same ``attempts``, this owner: a lease that lapsed and that no one took since is
        still this take's); the ids updated. Only this module's constant fragments reach
        ``assignments``."""
        pairs = [(leased.id, leased.attempts) for leased in held]
        if not pairs:
            return set()
        rows = self.db.execute(
            f"""
            UPDATE dp_images AS d SET {assignments}
            FROM unnest(%s::bigint[], %s::integer[]) AS t(id, attempts)
            WHERE d.id = t.id AND d.attempts = t.attempts AND d.lease_owner = %s
            RETURNING d.id
            """,
            ([p[0] for p in pairs], [p[1] for p in pairs], self.owner),
        )
        return {int(r[0]) for r in rows}

    def waiting(self) -> int:
        """Images held, leased or not."""
        return int(self.db.execute("SELECT count(*) FROM dp_images")[0][0])
