"""The scale-out mode's shared intake against a real PostgreSQL: each image taken by one worker
at a time, a row another transaction holds skipped at once, a lapsed lease taken over and the
old holder fenced off, a stop's put-back not counted as a death, and an admitted image
recovered after a crash of the database."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from postgres_support import Postgres, truncate

from pacs_node.scale.queue import IntakeQueue


@pytest.fixture
def db(cluster: Postgres):
    """The cluster with an empty table, and a queue that made it."""
    made = IntakeQueue(cluster.dsn, "test")
    truncate(cluster.dsn, "dp_images")
    yield cluster
    made.close()


def fill(dsn: str, count: int) -> list[int]:
    receiver = IntakeQueue(dsn, "receiver")
    try:
        return [
            receiver.admit(f"image {i}".encode(), f"1.2.3.{i}\x00", {"calling_ae": "MODALITY"})
            for i in range(count)
        ]
    finally:
        receiver.close()


def lapse(dsn: str, image: int) -> None:
    """End a lease now, as the passing of its time would."""
    with psycopg.connect(dsn, autocommit=True) as raw:
        raw.execute(
            "UPDATE dp_images SET lease_until = now() - interval '1 s' WHERE id = %s", (image,)
        )


def takes(dsn: str, image: int) -> tuple[int, int]:
    """An image's ``(attempts, solo)``."""
    with psycopg.connect(dsn, autocommit=True) as raw:
        found = raw.execute(
            "SELECT attempts, solo FROM dp_images WHERE id = %s", (image,)
        ).fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


def test_each_connection_commits_durably(db: Postgres) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as raw:
        raw.execute("ALTER ROLE dp SET synchronous_commit = off")  # a site's "tuning"
    try:
        queue_ = IntakeQueue(db.dsn, "receiver")
        assert queue_.settings() == {"fsync": "on", "synchronous_commit": "on"}
        queue_.close()
    finally:
        with psycopg.connect(db.dsn, autocommit=True) as raw:
            raw.execute("ALTER ROLE dp RESET synchronous_commit")


def test_concurrent_workers_never_take_the_same_image(db: Postgres) -> None:
    admitted = fill(db.dsn, 60)

    def work(name: str) -> list[int]:
        worker, taken = IntakeQueue(db.dsn, name), []
        try:
            while batch := worker.lease(4, 30):
                taken += [leased.id for leased in batch]
                assert all(worker.done(leased) for leased in batch)
        finally:
            worker.close()
        return taken

    with ThreadPoolExecutor(3) as pool:
        found = [f.result(timeout=60) for f in [pool.submit(work, n) for n in "abc"]]
    every = [i for taken in found for i in taken]
    assert sorted(every) == admitted, "each image taken exactly once"


def test_rows_another_transaction_holds_are_skipped_not_waited_for(db: Postgres) -> None:
    first, second = fill(db.dsn, 2)
    worker = IntakeQueue(db.dsn, "worker")
    with psycopg.connect(db.dsn) as raw, raw.transaction():
        raw.execute("SELECT id FROM dp_images WHERE id = %s FOR UPDATE", (first,))
        started = time.monotonic()
        taken = worker.lease(2, 30)
        assert [leased.id for leased in taken] == [second] and time.monotonic() - started < 5
    worker.close()


def test_a_lapsed_lease_is_taken_over_and_the_old_holder_is_fenced_off(db: Postgres) -> None:
    first, second = IntakeQueue(db.dsn, "node"), IntakeQueue(db.dsn, "node")  # the same name
    (image,) = fill(db.dsn, 1)
    (held,) = first.lease(1, 30)
    assert held.id == image and held.attempts == 1 and first.data(held) == b"image 0"
    assert held.sop_instance_uid == "1.2.3.0", "the UI value's padding is not kept"
    assert second.lease(1, 30) == [], "held by first"
    lapse(db.dsn, image)
    (taken,) = second.lease(1, 30)
    assert second.alone([taken]) == {image} and first.alone([held]) == set()
    assert taken.id == image and taken.attempts == 2 and takes(db.dsn, image) == (2, 1)
    assert first.renew([held], 30) == set() and not first.done(held), "first lost it"
    assert first.data(held) is None and second.data(taken) == b"image 0"
    assert second.renew([taken], 30) == {image} and second.done(taken)
    assert second.waiting() == 0
    first.close()
    second.close()


def test_a_lapsed_lease_no_one_took_is_still_its_takes_and_processing_alone_is_taken_back(
    db: Postgres,
) -> None:
    (image,) = fill(db.dsn, 1)
    worker = IntakeQueue(db.dsn, "worker")
    (held,) = worker.lease(1, 30)
    assert worker.alone([held]) == {image} and takes(db.dsn, image) == (1, 1)
    assert worker.not_alone([held]) == {image} and takes(db.dsn, image) == (1, 0), "ended"
    lapse(db.dsn, image)  # a database outage longer than the lease: no one took it meanwhile
    assert worker.renew([held], 30) == {image} and worker.done(held)
    worker.close()


def test_a_stop_puts_images_back_without_counting_a_take(db: Postgres) -> None:
    (image,) = fill(db.dsn, 1)
    stopping, other = IntakeQueue(db.dsn, "stopping"), IntakeQueue(db.dsn, "other")
    (held,) = stopping.lease(1, 30)
    stopping.alone([held])
    stopping.release([held], alone=True)
    (taken,) = other.lease(1, 30)
    assert taken.id == image and (taken.attempts, taken.solo) == (1, 0)
    stopping.close()
    other.close()


def test_an_image_admitted_is_recovered_after_a_crash_of_the_database(db: Postgres) -> None:
    (image,) = fill(db.dsn, 1)
    db.stop("immediate")  # no checkpoint: the row comes back from the WAL at the next start
    db.start()
    worker = IntakeQueue(db.dsn, "worker")
    (held,) = worker.lease(1, 30)
    assert held.id == image and held.receipt == {"calling_ae": "MODALITY"}
    worker.close()


def test_a_worker_killed_with_its_lease_loses_the_image_to_another(db: Postgres) -> None:
    (image,) = fill(db.dsn, 1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pacs_node.scale.queue import IntakeQueue\n"
            "q = IntakeQueue(sys.argv[1], 'doomed')\n"
            "assert q.lease(1, 5.0)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            db.dsn,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
    )
    lines: queue.Queue[str] = queue.Queue()
    assert holder.stdout is not None
    threading.Thread(target=lambda: lines.put(holder.stdout.readline()), daemon=True).start()
    other = IntakeQueue(db.dsn, "other")
    try:
        assert lines.get(timeout=60).strip() == "held"
        holder.kill()  # kill -9: no release, no goodbye
        holder.wait(10)
        assert other.lease(1, 30) == [], "the lease holds until it lapses"
        deadline = time.monotonic() + 20
        while not (taken := other.lease(1, 30)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [leased.id for leased in taken] == [image] and taken[0].attempts == 2
    finally:
        holder.kill()
        holder.stdout.close()
        other.close()
