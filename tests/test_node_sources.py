"""Tolerant reading, strict writing: whatever real sources hold, the outputs are valid DICOM
and no value from the data set reaches a log or the audit trail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run_tool
from node_support import (
    TEST_CALLERS,
    audit_lines,
    chest_dataset,
    final_lines,
    free_port,
    raw_element,
    send,
    send_files,
    start_node,
    wait_for,
    write_raw,
)
from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import UID, JPEGBaseline8Bit, SecondaryCaptureImageStorage

from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node
from pacs_node.status import StoreStatus

pytestmark = pytest.mark.tools


def outcome(node: Node, uid: str, timeout: float = 60) -> dict:
    (line,) = wait_for(
        lambda: [x for x in final_lines(node) if x.get("sop_instance_uid") == uid],
        timeout,
        "the image's outcome",
    )
    return line


def dciodvfy_errors(path: Path) -> list[str]:
    check = run_tool("dciodvfy", path, check=False)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


def results_of(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "out").rglob("*.dcm"))


TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)


def test_a_source_without_type_2_attributes_gets_valid_results(node: Node, tmp_path: Path) -> None:
    ds = chest_dataset()
    for keyword in TYPE_2 + (
        "SeriesNumber",
        "InstanceNumber",
        "PatientOrientation",
        "Manufacturer",
    ):
        delattr(ds, keyword)
    assert send_files(node.port, [write_raw(ds, tmp_path / "sparse.dcm")]) == [StoreStatus.SUCCESS]
    assert outcome(node, ds.SOPInstanceUID)["status"] == "processed"
    results = results_of(tmp_path)
    assert len(results) == 2
    for path in results:
        assert dciodvfy_errors(path) == [], path.name


LEGACY = {
    "PatientSex": "female",
    "PatientBirthDate": "1945-01-01",
    "StudyDate": "2026-11-22",
    "StudyTime": "10:15:00.5",
    "PatientAge": "61 years",
}


def test_legacy_values_are_fixed_or_left_empty_never_copied_invalid(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    ds = chest_dataset(**LEGACY)
    assert send_files(node.port, [write_raw(ds, tmp_path / "legacy.dcm")]) == [StoreStatus.SUCCESS]
    assert outcome(node, ds.SOPInstanceUID)["status"] == "processed"
    for path in results_of(tmp_path):
        assert dciodvfy_errors(path) == [], path.name
        written = dcmread(path)
        assert (
            written.PatientSex == "F"
            and written.PatientBirthDate == "19450101"
            and written.StudyDate == "20261122"
        )
    text = node.config.audit_path.read_text() + caplog.text
    for value in LEGACY.values():
        assert value not in text


def test_invalid_uids_never_reach_an_output(node: Node, tmp_path: Path) -> None:
    ds = chest_dataset(
        StudyInstanceUID="1.2.03.4.5",
        SeriesInstanceUID="1.2." + "9" * 70,
        FrameOfReferenceUID="1.2.x.3",
    )
    assert send_files(node.port, [write_raw(ds, tmp_path / "uids.dcm")]) == [StoreStatus.SUCCESS]
    line = outcome(node, ds.SOPInstanceUID)
    assert line["status"] == "processed"
    results = results_of(tmp_path)
    assert len(results) == 2
    studies = {dcmread(p).StudyInstanceUID for p in results}
    assert len(studies) == 1 and UID(studies.pop()).is_valid  # one derived study for both results
    for path in results:
        assert dciodvfy_errors(path) == [], path.name


def test_a_japanese_multi_byte_header_is_carried_into_valid_results(
    node: Node, tmp_path: Path, rg1_path: Path
) -> None:
    # real ISO 2022 IR 87 names, on a 32 x 32 image
    real = dcmread(get_charset_files("chrJapMulti.dcm")[0])
    ds = chest_dataset(rows=480, columns=460)
    for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "StudyInstanceUID"):
        if keyword in real:
            setattr(ds, keyword, real[keyword].value)
    assert send_files(node.port, [write_raw(ds, tmp_path / "japanese.dcm")]) == [
        StoreStatus.SUCCESS
    ]
    assert outcome(node, ds.SOPInstanceUID)["status"] == "processed"
    for path in results_of(tmp_path):
        assert dciodvfy_errors(path) == [], path.name
        assert str(dcmread(path).PatientName) == str(real.PatientName)


def rsna_style(seed: int = 0) -> Dataset:
    """What the RSNA challenge files are: Secondary Capture storage of a CR chest, 8-bit JPEG baseline."""
    from io import BytesIO

    from PIL import Image
    from pydicom.encaps import encapsulate

    ds = chest_dataset(
        rows=512,
        columns=512,
        seed=seed,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        ConversionType="WSD",
    )
    pixels = (np.frombuffer(ds.PixelData, np.uint16).reshape(512, 512) >> 4).astype(np.uint8)
    jpeg = BytesIO()
    Image.fromarray(pixels, "L").save(jpeg, "JPEG", quality=95)
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    for keyword in ("ImageType",):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def test_rsna_style_secondary_captures_of_a_chest_are_scored(node: Node, tmp_path: Path) -> None:
    ds = rsna_style()
    assert send_files(node.port, [write_raw(ds, tmp_path / "rsna.dcm")]) == [StoreStatus.SUCCESS]
    assert outcome(node, ds.SOPInstanceUID)["status"] == "processed"


def test_the_node_never_scores_an_ai_result_its_own_included(node: Node, tmp_path: Path) -> None:
    source = chest_dataset()
    send(node.port, [source])
    assert outcome(node, source.SOPInstanceUID)["status"] == "processed"
    (overlay,) = [
        p for p in results_of(tmp_path) if dcmread(p, stop_before_pixels=True).Modality != "SR"
    ]
    ours = dcmread(overlay)
    ours.Modality = "CR"  # even dressed as a radiograph
    assert send_files(node.port, [write_raw(ours, tmp_path / "ours.dcm")]) == [StoreStatus.SUCCESS]
    line = outcome(node, ours.SOPInstanceUID)
    assert line["status"] == "skipped" and line["skip_reason"] == "ai-result"
    other = rsna_style(seed=1)
    other.BurnedInAnnotation = "YES"  # another vendor's burned-in AI overlay
    assert send_files(node.port, [write_raw(other, tmp_path / "other.dcm")]) == [
        StoreStatus.SUCCESS
    ]
    assert outcome(node, other.SOPInstanceUID)["skip_reason"] == "ai-result"


SENTINELS = (
    "Zqxjv^Sentinel",
    "SENTINEL-ID-81723",
    "19370521",
    "Sentinel Hospital 55",
    "SENTINELACC9",
)


def phi_laden(seed: int = 0) -> list[Dataset]:
    """Images whose identifiers are sentinels, also where a broken modality misplaces them."""
    name, patient_id, birth, institution, accession = SENTINELS
    base = {
        "PatientName": name,
        "PatientID": patient_id,
        "PatientBirthDate": birth,
        "InstitutionName": institution,
        "AccessionNumber": accession,
    }
    misplaced = [
        {},
        # Body Part Examined: skipped, and the reason must not quote it
        {0x00180015: ("CS", patient_id)},
        {0x00281050: ("DS", accession), 0x00281051: ("DS", birth)},  # a window made of identifiers
        {0x00100040: ("CS", name), 0x00080020: ("DA", institution)},  # Patient's Sex and Study Date
        {0x00280004: ("CS", patient_id)},  # Photometric Interpretation: undecodable
        {0x00185101: ("CS", patient_id)},  # View Position
    ]
    images = []
    for offset, elements in enumerate(misplaced):
        ds = chest_dataset(seed=seed + offset, **base)
        for tag, (vr, value) in elements.items():
            ds[tag] = raw_element(tag, vr, value)
        images.append(ds)
    return images


def test_no_value_from_the_data_set_reaches_the_logs_or_the_audit_trail(
    tmp_path: Path, demo_bundle: Path
) -> None:
    port = free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "host": "127.0.0.1",
                "bundle": str(demo_bundle),
                "spool": str(tmp_path / "spool"),
                "output_dir": str(tmp_path / "out"),
                "metrics_port": -1,
                "device": "cpu",
                "allow": list(TEST_CALLERS),
            }
        )
    )
    log = tmp_path / "node.log"
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "default"}
    with log.open("w") as handle:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pacs_node.cli",
                "--config",
                str(config),
                "--log-level",
                "DEBUG",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: "listening" in log.read_text(), 120, "the node to start")
        images = phi_laden()
        paths = [write_raw(ds, tmp_path / f"phi{i}.dcm") for i, ds in enumerate(images)]
        send_files(port, paths)
        wait_for(
            lambda: len(final_lines(tmp_path / "spool" / "audit.jsonl")) == len(images),
            120,
            "an outcome for every image",
        )
    finally:
        process.terminate()
        process.wait(60)
    text = log.read_text() + (tmp_path / "spool" / "audit.jsonl").read_text()
    assert images[0].SOPInstanceUID in text  # the correlation id is there ...
    for sentinel in SENTINELS:  # ... and nothing that identifies the patient
        assert sentinel not in text and sentinel[:16] not in text, sentinel


# --- the header fuzzer -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_header_mutations_of_the_real_rg1_each_get_a_result_or_a_reason(
    tmp_path: Path, predictor: NodePredictor, rg1_path: Path
) -> None:
    from header_fuzz import MUTATIONS, mutate, small_rg1

    base = small_rg1(rg1_path)
    node = start_node(tmp_path, predictor, batch_size=16, keep_skipped=False)
    try:
        sent: dict[str, int] = {}
        folder = tmp_path / "mutants"
        folder.mkdir()
        for batch_start in range(0, MUTATIONS, 50):
            paths = [
                write_raw(mutate(base, index), folder / f"{index}.dcm")
                for index in range(batch_start, min(batch_start + 50, MUTATIONS))
            ]
            statuses = send_files(node.port, paths)
            for path, status in zip(paths, statuses):
                sent[path.stem] = status
                path.unlink()
        acknowledged = sum(1 for s in sent.values() if s == StoreStatus.SUCCESS)
        wait_for(
            lambda: len(final_lines(node)) >= acknowledged,
            900,
            "an outcome for every acknowledged mutant",
        )
        lines = final_lines(node)
        assert len(lines) == acknowledged and node.health()["worker_alive"]
        assert node.spool.count() == 0
        failures = [line for line in lines if line["status"] == "failed"]
        assert failures == [], failures[:5]
        refused = {line["reason"] for line in audit_lines(node) if line["event"] == "store-refused"}
        assert refused <= {"sop-class-mismatch", "instance-uid-mismatch", "unparseable"}, refused
        assert (
            acknowledged >= 0.8 * MUTATIONS
            and sum(1 for line in lines if line["status"] == "processed") >= 0.3 * MUTATIONS
        )
        results = results_of(tmp_path)
        sample = [
            results[i]
            for i in np.random.default_rng(0).choice(
                len(results), size=min(60, len(results)), replace=False
            )
        ]
        assert len(sample) >= 50
        bad = {path.name: errors for path in sample if (errors := dciodvfy_errors(path))}
        assert bad == {}, bad
    finally:
        node.stop()


def test_control_characters_are_kept_only_where_the_vr_allows_them_and_no_value_is_picked_from_many():
    from pacs_node.intake.sanitize import clean_source

    ds = chest_dataset(
        StudyDescription="CHEST\tPA\r\n", PatientComments="first line\r\nsecond line\tend"
    )
    ds.PatientID = ["12345", "67890"]  # VM 1: which of the two is the patient cannot be told
    clean = clean_source(ds)
    assert clean.dataset.StudyDescription == "CHESTPA"  # LO: no TAB, CR or LF
    assert clean.dataset.PatientComments == "first line\r\nsecond line\tend"  # LT keeps them
    assert not clean.dataset.PatientID and "PatientID" in clean.emptied  # Type 2: present, empty
    assert "12345" not in clean.note and "67890" not in clean.note
