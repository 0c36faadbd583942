"""The scale-out mode's shared intake against a real PostgreSQL: each image taken by one worker
at a time, a lapsed lease taken over, the old holder fenced off, and an admitted image kept
through a crash of the database."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from postgres_support import Postgres, postgres

from pacs_node.scale.queue import IntakeQueue


@pytest.fixture
def cluster():
    with postgres() as started:
        yield started


def fill(queue: IntakeQueue, count: int) -> list[int]:
    return [
        queue.admit(f"image {i}".encode(), f"1.2.3.{i}", {"calling_ae": "MODALITY"})
        for i in range(count)
    ]


def test_concurrent_workers_never_take_the_same_image(cluster: Postgres) -> None:
    admitted = fill(IntakeQueue(cluster.dsn, "receiver"), 60)
    taken: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def work(name: str) -> None:
        queue = IntakeQueue(cluster.dsn, name)
        while batch := queue.lease(4, 30):
            taken[name] += [leased.id for leased in batch]
            for leased in batch:
                assert queue.done(leased.id)
        queue.close()

    threads = [threading.Thread(target=work, args=(name,)) for name in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [i for ids in taken.values() for i in ids]
    assert sorted(every) == admitted, "each image taken exactly once"
    assert sum(1 for ids in taken.values() if ids) >= 2, "the work was shared"
    assert IntakeQueue(cluster.dsn, "check").waiting() == 0


def test_a_lapsed_lease_is_taken_over_and_the_old_holder_is_fenced_off(
    cluster: Postgres,
) -> None:
    first, second = IntakeQueue(cluster.dsn, "first"), IntakeQueue(cluster.dsn, "second")
    (image,) = fill(first, 1)
    (held,) = first.lease(1, 0.5)
    assert held.id == image and held.attempts == 1 and held.data == b"image 0"
    assert second.lease(1, 30) == [], "held by first"
    time.sleep(0.8)
    (taken,) = second.lease(1, 30, alone=True)
    assert taken.id == image and taken.attempts == 2 and taken.solo == 1
    assert first.renew([image], 30) == set() and not first.done(image), "first lost it"
    assert second.renew([image], 30) == {image} and second.done(image)
    assert second.waiting() == 0


def test_an_image_admitted_is_kept_through_a_crash_of_the_database(cluster: Postgres) -> None:
    queue = IntakeQueue(cluster.dsn, "receiver")
    (image,) = fill(queue, 1)
    queue.close()
    cluster.stop("immediate")  # no checkpoint: the row comes back from the WAL
    cluster.start()
    (held,) = IntakeQueue(cluster.dsn, "worker").lease(1, 30)
    assert held.id == image and held.receipt == {"calling_ae": "MODALITY"}


def test_a_worker_killed_with_its_lease_loses_the_images_to_another(cluster: Postgres) -> None:
    (image,) = fill(IntakeQueue(cluster.dsn, "receiver"), 1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pacs_node.scale.queue import IntakeQueue\n"
            "q = IntakeQueue(sys.argv[1], 'doomed')\n"
            "assert q.lease(1, 2.0)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            cluster.dsn,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holder.kill()  # kill -9: no release, no goodbye
        holder.wait(10)
        other = IntakeQueue(cluster.dsn, "other")
        assert other.lease(1, 30) == [], "the lease holds until it lapses"
        deadline = time.monotonic() + 10
        while not (taken := other.lease(1, 30)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [leased.id for leased in taken] == [image] and taken[0].attempts == 2
    finally:
        holder.kill()
