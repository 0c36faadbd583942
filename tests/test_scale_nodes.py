"""The scale-out mode with real nodes over a real PostgreSQL: images received by one node are
processed by whichever takes them, each result reaches the destination once, a stop puts back
what a node held, a restart of the database is outlived, and the delivery ledger decides who
sends what."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from node_support import (
    CountingSCP,
    audit_lines,
    chest_dataset,
    identity_of,
    send,
    start_node,
    wait_for,
)
from postgres_support import Postgres, truncate
from pynetdicom import AE

from pacs_node.model.predictor import NodePredictor
from pacs_node.results.report import COMPREHENSIVE_3D_SR, sop_instance_uid_in
from pacs_node.scale.ledger import Claim, DeliveryLedger


@pytest.fixture
def db(cluster: Postgres):
    """The cluster with empty tables."""
    truncate(cluster.dsn, "dp_images", "dp_deliveries")
    return cluster


def rows(dsn: str, table: str = "dp_images") -> int:
    with psycopg.connect(dsn, autocommit=True) as raw:
        return int(raw.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def expected_results(images, bundle: Path) -> set[str]:
    """The UIDs of one SR (in its 3D form, which the destination takes) and one SC per image."""
    from dp_model.serving.bundle import load_bundle

    contract = load_bundle(bundle)[1]
    expected = set()
    for ds in images:
        identity = identity_of(ds, contract)
        expected |= {
            sop_instance_uid_in(identity.instance_uid("sr"), COMPREHENSIVE_3D_SR),
            identity.instance_uid("sc"),
        }
    return expected


def delivered_once(destination: CountingSCP, images, bundle: Path, dsn: str) -> None:
    """Every image's SR and SC at the destination, the shared queue empty, and nothing more
    after a second (anything still to come would be a duplicate or a stray)."""
    expected = expected_results(images, bundle)
    wait_for(lambda: set(destination.stored) >= expected, 120, "every result delivered")
    wait_for(lambda: rows(dsn) == 0, 30, "the shared queue emptied")
    time.sleep(1)
    assert destination.stored == Counter(dict.fromkeys(expected, 1))


def scale_node(
    tmp_path: Path, name: str, db: Postgres, predictor, destination: CountingSCP, **more
):
    return start_node(
        tmp_path / name,
        predictor,
        destinations=[f"RESULTS@127.0.0.1:{destination.port}"],
        scale={"database": db.dsn, "node_name": name, "lease_s": 3.0, "take": 2},
        batch_size=2,
        outbox={"initial_backoff_s": 0.2, "max_backoff_s": 1.0},
        **more,
    )


@pytest.mark.slow
def test_two_nodes_share_the_work_of_one_and_each_result_arrives_once(
    tmp_path: Path, db: Postgres, predictor, demo_bundle: Path
) -> None:
    destination = CountingSCP()
    destination.start()
    other = NodePredictor(demo_bundle, device="cpu")
    first = scale_node(tmp_path, "node-a", db, predictor, destination)
    second = scale_node(tmp_path, "node-b", db, other, destination)
    try:
        images = [chest_dataset(rows=300, columns=280, seed=i) for i in range(12)]
        assert send(first.port, images) == [0] * len(images), "acknowledged by node-a alone"
        delivered_once(destination, images, demo_bundle, db.dsn)
        processed = Counter(
            line["node"]
            for node in (first, second)
            for line in audit_lines(node)
            if line["event"] == "received" and line.get("status") == "processed"
        )
        assert sum(processed.values()) == len(images)
        assert processed["node-b"] >= 1, f"node-b took none of node-a's images: {processed}"
        delivered = Counter(
            line["node"]
            for node in (first, second)
            for line in audit_lines(node)
            if line["event"] == "delivery" and line.get("status") == "delivered"
        )
        assert sum(delivered.values()) == 2 * len(images), "one delivery line per result"
    finally:
        first.stop()
        second.stop()
        destination.stop()


def test_the_ledger_lets_one_sender_send_and_the_others_wait_ask_or_skip(db: Postgres) -> None:
    mine, theirs = DeliveryLedger(db.dsn, "a-1", 30), DeliveryLedger(db.dsn, "b-1", 30)
    sr = Claim("RESULTS", "1.2.3.4", "digest-1")
    try:
        assert mine.claim([sr]) == {sr: "send"}
        assert theirs.claim([sr]) == {sr: "busy"}, "a live claim of another sender"
        mine.delivered(sr)
        assert theirs.claim([sr]) == {sr: "delivered"} and theirs.has(sr)
        corrected = Claim("RESULTS", "1.2.3.4", "digest-2")
        assert theirs.claim([corrected]) == {corrected: "send"}, "new content of the UID"
        theirs.give_up([corrected])
        assert mine.claim([corrected]) == {corrected: "send"}, "given up: free at once"
        with psycopg.connect(db.dsn, autocommit=True) as raw:  # mine dies on the wire
            raw.execute("UPDATE dp_deliveries SET until = now() - interval '1 s'")
        assert theirs.claim([corrected]) == {corrected: "doubt"}, "a lapsed claim: ask first"
        other = Claim("ELSEWHERE", "1.2.3.4", "digest-2")
        assert mine.claim([other]) == {other: "send"}, "each destination has its own ledger"
    finally:
        mine.close()
        theirs.close()


def test_two_senders_claiming_the_same_new_results_at_once_never_both_send(db: Postgres) -> None:
    claims = [Claim("RESULTS", f"1.2.3.{i}", "digest") for i in range(40)]
    ledgers = [DeliveryLedger(db.dsn, f"node-{n}-1", 30) for n in range(3)]
    start = threading.Barrier(len(ledgers))

    def claim_all(ledger: DeliveryLedger) -> dict[Claim, str]:
        verdicts = {}
        start.wait()
        for claim in claims:  # one transaction each: the most chances to interleave
            verdicts |= ledger.claim([claim])
        return verdicts

    try:
        with ThreadPoolExecutor(len(ledgers)) as pool:
            results = list(pool.map(claim_all, ledgers))
        for claim in claims:
            verdicts = sorted(result[claim] for result in results)
            assert verdicts == ["busy", "busy", "send"], (claim.uid, verdicts)
    finally:
        for ledger in ledgers:
            ledger.close()


@pytest.mark.slow
def test_a_stopped_node_puts_back_what_it_held_and_another_processes_it(
    tmp_path: Path, db: Postgres, predictor, demo_bundle: Path
) -> None:
    destination = CountingSCP()
    destination.start()
    first = scale_node(tmp_path, "node-a", db, predictor, destination)
    images = [chest_dataset(rows=300, columns=280, seed=100 + i) for i in range(6)]
    try:
        assert send(first.port, images) == [0] * len(images)
    finally:
        first.stop()  # a stop in the middle: whatever it held goes back, its take taken back
    with psycopg.connect(db.dsn, autocommit=True) as raw:
        held = raw.execute(
            "SELECT count(*) FROM dp_images WHERE lease_owner IS NOT NULL"
        ).fetchone()
        takes = raw.execute("SELECT coalesce(max(attempts), 0) FROM dp_images").fetchone()
    assert held[0] == 0 and takes[0] == 0, "put back, no take counted"
    second = scale_node(
        tmp_path, "node-b", db, NodePredictor(demo_bundle, device="cpu"), destination
    )
    try:
        delivered_once(destination, images, demo_bundle, db.dsn)
    finally:
        second.stop()
        destination.stop()


@pytest.mark.slow
def test_a_node_outlives_a_restart_of_the_database_and_refuses_while_it_is_down(
    tmp_path: Path, db: Postgres, predictor, demo_bundle: Path
) -> None:
    destination = CountingSCP()
    destination.start()
    node = scale_node(tmp_path, "node-a", db, predictor, destination)
    try:
        before = [chest_dataset(rows=300, columns=280, seed=200)]
        assert send(node.port, before) == [0]
        # delivered and noted before the cut (a destination that cannot be asked whether it has
        # a result would get one sent again after a cut during its delivery)
        wait_for(
            lambda: len(destination.stored) == 2 and rows(db.dsn) == 0, 60, "the first image done"
        )
        db.stop("immediate")
        during = [chest_dataset(rows=300, columns=280, seed=201)]
        assert send(node.port, during) == [0xA700], (
            "not durable anywhere: refused, to be sent again"
        )
        wait_for(
            lambda: any("unavailable" in p for p in node.health()["problems"]),
            10,
            "/health to say the shared queue is unavailable",
        )
        assert "unavailable" in (node.ready() or ""), "/ready takes it out of a balancer's rotation"
        db.start()
        after = [chest_dataset(rows=300, columns=280, seed=202)]
        assert send(node.port, after + during) == [0, 0]
        expected = expected_results(before + during + after, demo_bundle)
        wait_for(lambda: set(destination.stored) >= expected, 120, "every result delivered")
        wait_for(lambda: node.health()["status"] == "ok", 30, "/health ok again")
        assert node.ready() is None
        time.sleep(1)
        assert destination.stored == Counter(dict.fromkeys(expected, 1))
    finally:
        node.stop()
        destination.stop()


@pytest.mark.slow
def test_a_single_node_spool_switched_to_the_scale_out_mode_keeps_its_images(
    tmp_path: Path, db: Postgres, predictor, demo_bundle: Path
) -> None:
    from pacs_node.intake.spool import Receipt, Spool

    images = [chest_dataset(rows=300, columns=280, seed=300 + i) for i in range(2)]
    own = Spool(tmp_path / "node-a" / "spool")  # what a single node left: acknowledged, unprocessed
    for ds in images:
        received = own.tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(received, enforce_file_format=True)
        own.admit(received, Receipt(str(ds.SOPInstanceUID), "MODALITY", "127.0.0.1", time.time()))
    own.close()
    destination = CountingSCP()
    destination.start()
    node = scale_node(tmp_path, "node-a", db, predictor, destination)
    try:
        delivered_once(destination, images, demo_bundle, db.dsn)
    finally:
        node.stop()
        destination.stop()


@pytest.mark.slow
def test_a_node_whose_destination_is_down_leaves_the_rest_of_the_queue_to_others(
    tmp_path: Path, db: Postgres, predictor, demo_bundle: Path
) -> None:
    from pacs_node.intake.shared import AWAITING_PER_TAKE

    destination = CountingSCP()  # down
    node = scale_node(tmp_path, "node-a", db, predictor, destination)
    images = [chest_dataset(rows=300, columns=280, seed=400 + i) for i in range(16)]
    cap = AWAITING_PER_TAKE * 2  # take: 2
    try:
        assert send(node.port, images) == [0] * len(images)

        def leased() -> int:
            with psycopg.connect(db.dsn, autocommit=True) as raw:
                found = raw.execute("SELECT count(*) FROM dp_images WHERE lease_owner IS NOT NULL")
                return int(found.fetchone()[0])

        wait_for(lambda: len(node.spool._awaiting) >= cap, 60, "the node's deliveries to lag")
        seen: list[int] = []

        def steady() -> bool:  # the same count over 1.5 s: what was in flight has landed
            seen.append(len(node.spool._awaiting))
            return len(seen) > 16 and len(set(seen[-16:])) == 1

        wait_for(steady, 30, "the lag to settle")  # a feeder that ignored it takes the rest
        lagging = len(node.spool._awaiting)
        # beyond the cap, at most what was already taken: a take and two batches in flight
        assert lagging <= cap + 2 + 2 * 2 and leased() == lagging < len(images)
        time.sleep(1)
        assert len(node.spool._awaiting) == lagging, "it stopped taking"
        assert rows(db.dsn) == len(images), "nothing leaves the queue before it is delivered"
        destination.start()
        delivered_once(destination, images, demo_bundle, db.dsn)
    finally:
        node.stop()
        destination.stop()


@pytest.mark.slow
def test_the_shared_queue_is_bounded_by_max_queue_across_the_nodes(
    tmp_path: Path, db: Postgres, predictor
) -> None:
    destination = CountingSCP()  # down: nothing leaves the queue
    node = scale_node(tmp_path, "node-a", db, predictor, destination, max_queue=4)
    try:
        images = [chest_dataset(rows=300, columns=280, seed=600 + i) for i in range(5)]
        assert send(node.port, images[:4]) == [0] * 4
        wait_for(lambda: node.spool.backlog() >= 4, 10, "the heartbeat to count the queue")
        assert node.ready() == "queue-full"
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(
            str(images[4].SOPClassUID), str(images[4].file_meta.TransferSyntaxUID)
        )
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DPNODE")
        # refused for now (transient), not acknowledged into a database whose disk would fill
        assert assoc.is_rejected and assoc.acceptor.primitive.result == 0x02
    finally:
        node.stop()
