"""Identity: results never merge two patients, and a command with a UID too long for DICOM gets an answer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_support import (
    audit_lines,
    chest_dataset,
    final_lines,
    lenient_writing,
    send,
    start_node,
    wait_for,
    write_raw,
)
from pydicom import dcmread

from pacs_node.intake.sanitize import clean_source
from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node
from pacs_node.uids import is_valid_uid

#: An Affected SOP Instance UID of 86 characters: digits and dots, but past the 64 of PS3.5 9.1.
LONG_UID = "1.2.826.0.1.3680043.8.498." + "1" * 60


def without_study(patient_id: str, seed: int):
    ds = chest_dataset(seed=seed, PatientID=patient_id, PatientName=f"Patient^{patient_id}")
    del ds.StudyInstanceUID
    return ds


def test_two_patients_without_a_study_uid_get_two_studies_and_the_same_image_always_the_same_one():
    first, second = without_study("PID-1", 0), without_study("PID-2", 1)
    studies = [str(clean_source(ds).dataset.StudyInstanceUID) for ds in (first, second, first)]
    assert (
        studies[0] != studies[1]
        and studies[0] == studies[2]
        and all(is_valid_uid(uid) for uid in studies)
    )
    note = clean_source(first).note
    assert "StudyInstanceUID (missing)" in note and "PID-1" not in note and "Patient" not in note


def test_one_invalid_study_uid_shared_by_two_patients_gives_each_patient_a_study_of_their_own():
    images = [
        chest_dataset(seed=i, PatientID=pid, StudyInstanceUID="1.2.3.abc")
        for i, pid in enumerate(("PID-1", "PID-1", "PID-2"))
    ]
    studies = [str(clean_source(ds).dataset.StudyInstanceUID) for ds in images]
    # the same patient's images still share their (invalid) study
    assert studies[0] == studies[1] != studies[2]
    assert "StudyInstanceUID (invalid)" in clean_source(images[0]).note


@pytest.fixture
def node(tmp_path: Path, predictor: NodePredictor) -> Iterator[Node]:
    running = start_node(tmp_path, predictor, metrics_port=-1)
    yield running
    running.stop()


def test_two_patients_sent_without_a_study_uid_get_their_results_in_two_studies(
    node: Node, tmp_path: Path
) -> None:
    assert send(node.port, [without_study("PID-1", 0), without_study("PID-2", 1)]) == [0, 0]
    wait_for(lambda: len(final_lines(node, "processed")) == 2, 30, "both images processed")
    by_study: dict[str, set[str]] = {}
    for path in (tmp_path / "out").rglob("*.dcm"):
        ds = dcmread(path)
        by_study.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.PatientID))
        assert path.parent.name == str(ds.StudyInstanceUID)
    assert sorted(map(sorted, by_study.values())) == [["PID-1"], ["PID-2"]]
    assert all(
        "StudyInstanceUID (missing)" in line["detail"] for line in final_lines(node, "processed")
    )
    # The audit trail names the study the results went into, so a person can find them.
    assert {line.get("study_instance_uid") for line in final_lines(node, "processed")} == set(
        by_study
    )


#: A modality that puts UIDs into its commands unchecked, as a separate process (the
#: node's pynetdicom, in this process, keeps its own checks): C-STOREs each file given on
#: one association and prints each status (-1: none).
UNCHECKED_SENDER = """
import sys
from pydicom import config, dcmread
from pynetdicom import AE, _config
_config.VALIDATORS["UI"] = lambda value: (True, "")
config.settings.writing_validation_mode = config.IGNORE
port, called, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
ae = AE(ae_title="MODALITY")
ae.dimse_timeout = 10
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
assoc = ae.associate("127.0.0.1", port, ae_title=called)
assert assoc.is_established
for path in files:
    status = assoc.send_c_store(dcmread(path)) if assoc.is_established else None
    print(int(status.Status) if status else -1, flush=True)
if assoc.is_established:
    assoc.release()
"""


def test_a_c_store_whose_instance_uid_is_too_long_is_refused_by_name_and_the_association_goes_on(
    node: Node, tmp_path: Path
) -> None:
    """pynetdicom drops a command whose Affected SOP Instance UID is past 64 characters (PS3.5
    9.1) and aborts the association. The node answers it, 0xC000 cannot understand (PS3.4
    B.2.3), writes an audit line, and takes the next image on the same association."""
    bad = chest_dataset(seed=0)
    with lenient_writing():
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = LONG_UID
    files = [
        write_raw(bad, tmp_path / "bad.dcm"),
        write_raw(chest_dataset(seed=1), tmp_path / "next.dcm"),
    ]
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            UNCHECKED_SENDER,
            str(node.port),
            node.config.ae_title,
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [int(line) for line in run.stdout.split()] == [0xC000, 0x0000], run.stdout + run.stderr
    wait_for(lambda: final_lines(node, "processed"), 30, "the next image processed")
    refused = [line for line in audit_lines(node) if line["event"] == "store-refused"]
    assert [
        (line["reason"], line["status_code"], bool(line.get("sop_instance_uid")))
        for line in refused
    ] == [("invalid-uid", "0xC000", False)]
    assert LONG_UID not in node.config.audit_path.read_text()


def test_a_command_whose_class_uid_is_not_valid_is_served_under_its_presentation_context() -> None:
    """Both command UIDs are checked by pynetdicom; a bad SOP Class UID takes the context's own,
    so that the storage service answers (and refuses it by name)."""
    from pydicom.dataset import Dataset
    from pynetdicom.presentation import build_context

    from pacs_node.intake.listener import INVALID_UID_STAND_IN, stand_in_for_invalid_uids

    class Message:
        context_id, command_set = 3, Dataset()

    context = build_context("1.2.840.10008.5.1.4.1.1.1")
    context.context_id = 3
    assoc = type("Assoc", (), {"accepted_contexts": [context]})()
    with lenient_writing():
        Message.command_set.CommandField, Message.command_set.AffectedSOPClassUID = 0x0001, LONG_UID
        Message.command_set.AffectedSOPInstanceUID = "1.2.3.4"
    stand_in_for_invalid_uids(Message, assoc)
    assert Message.command_set.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert Message.command_set.AffectedSOPInstanceUID == INVALID_UID_STAND_IN


# --- what a result's UIDs follow ------------------------------------------------------------------


def test_every_setting_that_changes_what_a_result_says_changes_its_uids(
    demo_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from dp_model.serving.bundle import load_bundle
    from pacs_node.config import NodeConfig
    from pacs_node.results import identity

    contract = load_bundle(demo_bundle)[1]
    default = NodeConfig()
    base = identity.rendition(default, contract)
    bundles_point = contract.present_point.threshold
    changed = {
        "operating point": replace(default, operating_point=0.99),
        "gate off": replace(default, ood_gate=False),
    }
    if contract.localization is None:  # the stage matters only where the bundle names no source
        changed["map stage"] = replace(default, heatmap_stage=2)
    for what, config in changed.items():
        assert identity.rendition(config, contract) != base, what
    # The same settings written out are the same results; other outputs leave these unchanged.
    for config in (
        replace(default, operating_point=bundles_point),
        replace(default, outputs=("sr", "sc", "gsps")),
    ):
        assert identity.rendition(config, contract) == base
    # Another node code: other UIDs for every role.
    source = chest_dataset()
    before = identity.ResultIdentity.of(source, contract, base)
    monkeypatch.setattr(identity, "results_format", lambda: "another")
    after = identity.ResultIdentity.of(source, contract, identity.rendition(default, contract))
    for role in ("sr", "sc", "pr"):
        assert before.instance_uid(role) != after.instance_uid(role)
    assert before.tracking_uid("region-0") != after.tracking_uid("region-0")


def test_the_code_digest_reads_every_module_that_decides_a_results_content() -> None:
    import importlib.util

    from pacs_node.results import identity

    read = set()
    for package, name in identity.RESULTS_CODE:
        spec = importlib.util.find_spec(package)
        root = Path(next(iter(spec.submodule_search_locations)))
        where = root / name
        read |= {
            f"{package}/{p.relative_to(root).as_posix()}"
            for p in (where.rglob("*.py") if where.is_dir() else [where])
        }
    assert {
        "pacs_node/results/report.py",
        "pacs_node/results/overlay.py",
        "pacs_node/model/prediction.py",
        "pacs_node/codes.py",
        "pacs_node/intake/sanitize.py",
        "dp_model/serving/contract.py",
        "dp_model/serving/runner.py",
        "dp_model/serving/gate.py",
        "dp_transforms/dicom.py",
    } <= read
    assert len(identity.results_format()) == 16


def test_every_setting_a_writer_reads_is_part_of_the_uids_and_changes_them(
    demo_bundle: Path,
) -> None:
    # What the writers read of the node's configuration, from their source: a writer that starts
    # reading another setting fails here until the setting is one of CONTENT_SETTINGS.
    import re
    from dataclasses import replace

    from dp_model.serving.bundle import load_bundle
    from pacs_node.config import NodeConfig
    from pacs_node.results import identity

    folder = Path(identity.__file__).parent
    read = {
        name
        for path in folder.glob("*.py")
        for name in re.findall(r"\bconfig\.(\w+)", path.read_text())
        if name != "parsed_destinations"
    }
    assert read <= set(identity.CONTENT_SETTINGS), read - set(identity.CONTENT_SETTINGS)
    contract = load_bundle(demo_bundle)[1]
    default = NodeConfig()
    other = {
        "operating_point": 0.99,
        "ood_gate": False,
        "heatmap_stage": 2,
        "overlay_max_side": 1024,
        "overlay_modality": "OT",
        "overlay_transfer_syntax": "jpeg-ls",
        "engine": "onnx-int8",
    }
    assert set(other) == set(identity.CONTENT_SETTINGS)
    base = identity.rendition(default, contract)
    for name, value in other.items():
        if name == "heatmap_stage" and contract.localization is not None:
            continue  # the bundle's own map source is drawn, whatever the stage
        assert identity.rendition(replace(default, **{name: value}), contract) != base, name
    # A bundle recalibrated keeps its weights and Device UID, and says other things.
    warmer = replace(contract, temperature=contract.temperature * 2)
    assert identity.rendition(default, warmer) != base
