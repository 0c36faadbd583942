"""One connection to the scale-out database, as the node's shared parts use it.

Every connection sets ``synchronous_commit = on`` (a database or role may have turned it off
as "tuning") and refuses a server that runs with ``fsync = off``: a commit then returns once its
WAL record is on disk, which is what "acknowledged = durable" needs. A connection that breaks
(the server restarted, a failover, a network cut) raises :class:`Unavailable` for the call
under way and is opened again by the next call: a node outlives its database's restart. A
statement cut off by a broken connection may or may not have committed; each caller says
what that means for it (an admitted image may be admitted twice; a lease taken twice is
fenced by its take).

Tables are created once, under an advisory lock, by the first connection that finds one
missing: several nodes starting at once never race on the schema.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: The advisory lock the schema is created under (any constant every node agrees on).
SCHEMA_LOCK = 0x6470_696D  # "dpim"
#: How long connecting may take before the call fails.
CONNECT_TIMEOUT_S = 10
#: Unacknowledged data this long on the socket: the server is gone (TCP_USER_TIMEOUT; keepalives
#: alone do not fire while a request is unanswered, and retransmissions last about 15 minutes).
SILENT_SERVER_MS = 20_000
#: The most one statement may run (an image of max_dataset_mb admitted, a lease), and wait for a lock.
STATEMENT_TIMEOUT_MS = 120_000
LOCK_TIMEOUT_MS = 30_000


class Unavailable(OSError):
    """The database could not be reached, or the connection broke during the call."""


class DurabilityError(RuntimeError):
    """The server would not keep a committed image through a crash."""


class Database:
    """A connection (psycopg 3, autocommit) shared by the threads of one part of the node,
    opened on first use and again after it broke.

    Args:
        dsn: a libpq connection string.
        schema: ``(table, statements)`` pairs: each table is created when missing.
    """

    def __init__(self, dsn: str, schema: tuple[tuple[str, str], ...] = ()) -> None:
        self.dsn, self.schema = dsn, schema
        self._lock = threading.RLock()
        self._db: Any = None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def run(self, work: Callable[[Any], T]) -> T:
        """``work(connection)``, under this object's lock; in a transaction where ``work``
        opens one (``connection.transaction()``).

        Raises:
            Unavailable: the server could not be reached, or the connection broke.
            DurabilityError: the server runs with ``fsync = off``.
        """
        import psycopg

        with self._lock:
            try:
                if self._db is None:
                    self._db = self._connect()
                return work(self._db)
            except psycopg.OperationalError as exc:
                broken, self._db = self._db, None
                if broken is not None:
                    broken.close()
                raise Unavailable(f"the database is unavailable ({_first_line(exc)})") from None

    def execute(
        self, sql: str, params: Any = None, *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        """One statement; its rows (none for a statement that returns none)."""

        def one(db: Any) -> list[tuple[Any, ...]]:
            cursor = db.execute(sql, params, binary=binary)
            return list(cursor.fetchall()) if cursor.description is not None else []

        return self.run(one)

    def _connect(self) -> Any:
        import psycopg

        db = psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            tcp_user_timeout=SILENT_SERVER_MS,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}",
        )
        try:
            db.execute("SET synchronous_commit = on")
            fsync = db.execute("SHOW fsync").fetchone()
            if fsync is None or fsync[0] != "on":
                raise DurabilityError(
                    "the PostgreSQL server runs with fsync off: an acknowledged image could be lost"
                )
            if self.schema:
                with db.transaction():
                    db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    for table, statements in self.schema:
                        found = db.execute("SELECT to_regclass(%s)", (table,)).fetchone()
                        if found is None or found[0] is None:
                            db.execute(statements)
        except BaseException:
            db.close()
            raise
        return db

    def settings(self) -> dict[str, str]:
        """``fsync`` and ``synchronous_commit`` as this connection runs."""
        return {
            name: str(rows[0][0]) if rows else ""
            for name in ("fsync", "synchronous_commit")
            for rows in [self.execute(f"SHOW {name}")]
        }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
