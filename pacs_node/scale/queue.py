"""The shared intake of the scale-out mode: images held by PostgreSQL, taken under leases.

Every acknowledged image is a row of ``dp_images`` until a worker has processed it:

* :meth:`IntakeQueue.admit` inserts the image (its bytes and its receipt) and commits. With
  PostgreSQL's defaults (``fsync``, ``synchronous_commit`` on) the commit returns once its WAL
  record is on disk, so a receiver that answers the C-STORE after :meth:`admit` returns keeps
  the node's promise: acknowledged = durable, now in storage every node reaches.
* :meth:`IntakeQueue.lease` gives a worker up to ``limit`` images no one holds, oldest first,
  each for ``seconds``: ``SELECT ... FOR UPDATE SKIP LOCKED`` in one ``UPDATE``, so two workers
  never take the same image, and neither waits on the rows the other is taking. An image
  whose lease lapsed (its worker died, or stalled past it) is taken again like a new one;
  each take counts in ``attempts``, and ``alone`` takes in ``solo`` (the crash-loop rule of
  the single-process spool).
* :meth:`IntakeQueue.renew` extends the leases a worker still holds (its heartbeat while it
  works); :meth:`IntakeQueue.done` deletes an image only for the worker that still holds its
  lease, and says whether it did: a worker whose lease lapsed and was taken over learns it
  there, and the image is the new holder's. Results are deterministic (their UIDs and content
  digest depend on the image and the model only), so an image processed twice by two workers
  yields the same results, which the shared delivery ledger sends once.
* :meth:`IntakeQueue.release` puts leased images back at once (a worker stopping).

Time is PostgreSQL's (``now()``), never a worker's clock: nodes on several machines agree on
when a lease lapses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS dp_images (
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
CREATE INDEX IF NOT EXISTS dp_images_lease ON dp_images (lease_until, id);
"""


@dataclass(frozen=True, kw_only=True)
class Leased:
    """An image a worker holds: its row, receipt, bytes, and how often it was taken."""

    id: int
    sop_instance_uid: str
    receipt: dict[str, Any]
    data: bytes
    attempts: int
    solo: int


class IntakeQueue:
    """The ``dp_images`` table over one connection (psycopg 3), created if missing.

    Args:
        dsn: a libpq connection string (``host=... port=... dbname=... user=...``).
        owner: this worker's name in the leases it holds (unique per process).
    """

    def __init__(self, dsn: str, owner: str) -> None:
        import psycopg

        self.owner = owner
        self._db = psycopg.connect(dsn, autocommit=True)
        with self._db.transaction():
            self._db.execute(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def admit(self, data: bytes, sop_instance_uid: str, receipt: dict[str, Any]) -> int:
        """Hold an image durably (committed before this returns); its row id."""
        row = self._db.execute(
            "INSERT INTO dp_images (sop_instance_uid, receipt, data) VALUES (%s, %s, %s) RETURNING id",
            (sop_instance_uid, json.dumps(receipt), data),
        ).fetchone()
        assert row is not None  # INSERT ... RETURNING gives its row
        return int(row[0])

    def lease(self, limit: int, seconds: float, *, alone: bool = False) -> list[Leased]:
        """Up to ``limit`` images no one holds (never leased, or their lease lapsed), oldest
        first, now held by this worker for ``seconds``; ``alone``: counted as taken alone."""
        rows = self._db.execute(
            """
            UPDATE dp_images SET
                lease_owner = %(owner)s,
                lease_until = now() + make_interval(secs => %(seconds)s),
                attempts = attempts + 1,
                solo = solo + %(alone)s
            WHERE id IN (
                SELECT id FROM dp_images
                WHERE lease_until IS NULL OR lease_until < now()
                ORDER BY id
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id, sop_instance_uid, receipt, data, attempts, solo
            """,
            {"owner": self.owner, "seconds": seconds, "alone": int(alone), "limit": limit},
        ).fetchall()
        return sorted(
            (
                Leased(
                    id=int(r[0]),
                    sop_instance_uid=str(r[1]),
                    receipt=dict(r[2]),
                    data=bytes(r[3]),
                    attempts=int(r[4]),
                    solo=int(r[5]),
                )
                for r in rows
            ),
            key=lambda leased: leased.id,
        )

    def renew(self, ids: Iterable[int], seconds: float) -> set[int]:
        """Extend this worker's leases of ``ids`` by ``seconds`` from now; the ids it still held."""
        rows = self._db.execute(
            """
            UPDATE dp_images SET lease_until = now() + make_interval(secs => %s)
            WHERE id = ANY(%s) AND lease_owner = %s AND lease_until >= now()
            RETURNING id
            """,
            (seconds, list(ids), self.owner),
        ).fetchall()
        return {int(r[0]) for r in rows}

    def done(self, image_id: int) -> bool:
        """Forget a processed image, if this worker still holds its lease; whether it did."""
        row = self._db.execute(
            "DELETE FROM dp_images WHERE id = %s AND lease_owner = %s AND lease_until >= now() RETURNING id",
            (image_id, self.owner),
        ).fetchone()
        return row is not None

    def release(self, ids: Iterable[int]) -> None:
        """Put this worker's images back at once, for any worker to take."""
        self._db.execute(
            "UPDATE dp_images SET lease_owner = NULL, lease_until = NULL WHERE id = ANY(%s) AND lease_owner = %s",
            (list(ids), self.owner),
        )

    def waiting(self) -> int:
        """Images held, leased or not."""
        row = self._db.execute("SELECT count(*) FROM dp_images").fetchone()
        return int(row[0]) if row else 0
