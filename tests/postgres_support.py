"""A throwaway PostgreSQL cluster for the scale-out tests: initdb into a temporary folder, the
server on a Unix socket there (no TCP port), stopped and removed afterwards.

Debian's ``postgresql`` package provides the binaries (``make system-deps``), all taken from
one version's folder. PostgreSQL refuses to run as root; as root the cluster belongs to the
``postgres`` user and its commands run through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def binaries() -> Path:
    """The newest installed PostgreSQL's ``bin`` folder (Debian's layout), else the PATH's."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    if found:
        return max(found, key=lambda p: int(p.parent.name))
    initdb = shutil.which("initdb")
    if initdb is None:
        raise FileNotFoundError("initdb")
    return Path(initdb).parent


class Postgres:
    """One cluster in ``folder``; :attr:`dsn` connects to its ``postgres`` database."""

    def __init__(self, folder: Path, port: int = 5432) -> None:
        self.folder, self.port, self.bin = folder, port, binaries()
        self.data, self.socket = folder / "data", folder / "socket"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def dsn(self) -> str:
        return f"host={self.socket} port={self.port} dbname=postgres user=dp"

    def _run(self, tool: str, *arguments: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bin / tool), *arguments],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.folder,  # one the postgres user can read
        )
        if done.returncode:
            log = self.folder / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{tail}")

    def create(self) -> None:
        self.socket.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.folder, "postgres")
            shutil.chown(self.socket, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "dp", "-A", "trust", "--no-sync")

    def start(self) -> None:
        options = f"-k {self.socket} -p {self.port} -c listen_addresses='' -c fsync=on"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """``immediate``: as a crash (no checkpoint; recovery from the WAL at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")


@contextmanager
def postgres() -> Iterator[Postgres]:
    """A started cluster, stopped and removed on the way out. Where PostgreSQL is absent the
    test is skipped, except under CI (``CI`` set), where ``make test`` installs it."""
    try:
        binaries()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("PostgreSQL is not installed (Debian package postgresql: make system-deps)")
    # not under pytest's own temporary folder: as root, the postgres user must reach it
    folder = Path(tempfile.mkdtemp(prefix="dp-pg-", dir="/tmp"))
    cluster = Postgres(folder)
    try:
        cluster.create()
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            cluster.stop()  # stopped by the test already, or never started
        shutil.rmtree(folder, ignore_errors=True)


def truncate(dsn: str, *tables: str) -> None:
    """Empty the tables of ``tables`` that exist."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as raw:
        for table in tables:
            if raw.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]:
                raw.execute(f"TRUNCATE {table}")
