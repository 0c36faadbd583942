"""What a restart finds on disk, torn or wrong, never costs the trail or a result: a torn last
audit line stays alone on its line, and a receipt that does not hold what a receipt holds is
treated as absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from node_support import audit_lines, chest_dataset, final_lines, send, start_node, wait_for

from pacs_node.audit import AuditLog
from pacs_node.intake.spool import Receipt, Spool
from pacs_node.model.predictor import NodePredictor


def test_the_first_audit_line_after_a_restart_starts_on_a_new_line_after_a_torn_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text(
        '{"time":"2026-01-01T00:00:00+0000","event":"received","status":"processed"}\n{"time":"2026-01-01T00:00:01+0000","eve'
    )
    audit = AuditLog(path)  # the process died halfway through its last line
    audit.write("node", status="started")
    audit.write("node", status="stopped")
    audit.close()
    lines = path.read_text().split("\n")
    assert len(lines) == 5 and lines[-1] == "", lines
    # the torn line, alone: a reader skips it
    assert lines[1] == '{"time":"2026-01-01T00:00:01+0000","eve'
    assert [json.loads(line)["status"] for line in (lines[0], *lines[2:4])] == [
        "processed",
        "started",
        "stopped",
    ]
    AuditLog(path).close()  # a whole last line gets no blank line after it
    assert path.read_text().count("\n") == 4


def test_a_node_started_on_a_torn_audit_log_writes_only_whole_lines(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    audit = tmp_path / "spool" / "audit.jsonl"
    audit.parent.mkdir(parents=True)
    audit.write_text('{"time":"2026-01-01T00:00:00+0000","event":"rec')
    node = start_node(tmp_path, predictor, metrics_port=-1)
    try:
        assert send(node.port, [chest_dataset()]) == [0]
        wait_for(
            lambda: '"status":"processed"' in audit.read_text(), 30, "the image to be processed"
        )
    finally:
        node.stop()
    torn, *complete = audit.read_text().splitlines()
    assert torn == '{"time":"2026-01-01T00:00:00+0000","event":"rec' and complete
    assert "processed" in [json.loads(line)["status"] for line in complete]


@pytest.mark.parametrize(
    "receipt",
    [
        {
            "sop_instance_uid": "1.2.3",
            "calling_ae": "MODALITY",
            "peer": "127.0.0.1",
            "received": "yesterday",
        },
        {"sop_instance_uid": 123, "calling_ae": "MODALITY", "peer": "127.0.0.1", "received": 1.0e9},
        {
            "sop_instance_uid": "1.2.3",
            "calling_ae": ["MODALITY"],
            "peer": "127.0.0.1",
            "received": 1.0e9,
        },
        {"sop_instance_uid": "1.2.3", "calling_ae": "MODALITY", "peer": None, "received": 1.0e9},
        {
            "sop_instance_uid": "1.2.3",
            "calling_ae": "MODALITY",
            "peer": "127.0.0.1",
            "received": True,
        },
        {
            "sop_instance_uid": "1.2.3",
            "calling_ae": "MODALITY",
            "peer": "127.0.0.1",
            "received": float("nan"),
        },
        {
            "sop_instance_uid": "1.2.3",
            "calling_ae": "MODALITY",
            "peer": "127.0.0.1",
            "received": -5.0,
        },
        {"sop_instance_uid": "1.2.3", "calling_ae": "MODALITY", "peer": "127.0.0.1"},
        ["1.2.3", "MODALITY", "127.0.0.1", 1.0e9],
    ],
)
def test_a_receipt_of_the_wrong_shape_is_no_receipt(tmp_path: Path, receipt: object) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps(receipt))
    assert Receipt.read(path) is None


def test_a_receipt_read_back_is_the_receipt_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    received = spool.tmp / "arrived.dcm"
    chest_dataset().save_as(received, enforce_file_format=True)
    written = Receipt("1.2.826.0.1.3680043.2.1125.1", "MODALITY", "127.0.0.1", 1_700_000_000.5)
    path = spool.admit(received, written)
    assert spool.receipt(path) == written
    spool.close()


def test_a_result_handed_over_is_audited_processed_whatever_its_receipt_says(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    """A receipt with a wrong-typed field (a damaged file, an older version) is treated as
    absent: the instance's own header stands in, and the delivered result is not audited as
    a hand-over failure."""
    spool = Spool(tmp_path / "spool")
    ds = chest_dataset(seed=5)
    path = spool.incoming / "00000000000000000001-1-000001.dcm"
    ds.save_as(path, enforce_file_format=True)
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "sop_instance_uid": ds.SOPInstanceUID,
                "calling_ae": "MODALITY",
                "peer": "10.0.0.9",
                "received": "yesterday",
            }
        )
    )
    spool.close()
    node = start_node(tmp_path, predictor, metrics_port=-1)
    try:
        lines = wait_for(
            lambda: final_lines(node), 30, "the instance from before the restart to be processed"
        )
        assert [
            (line["status"], line.get("reason"), line["sop_instance_uid"]) for line in lines
        ] == [("processed", None, ds.SOPInstanceUID)]
        assert (
            len(list((tmp_path / "out" / ds.StudyInstanceUID).iterdir())) == 2
            and node.spool.count() == 0
        )
        assert not [line for line in audit_lines(node) if line.get("status") == "failed"]
    finally:
        node.stop()
