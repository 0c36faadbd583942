"""A new output kind is one writer and one registry line: a FHIR-like DiagnosticReport,
written by a writer this file registers, reaches ``output_dir`` and a destination whose
protocol (also registered here) carries its media type, with nothing else changed.

The toy kind is JSON, not DICOM: it proves that nothing after the writer (the outbox, its
sidecars and integrity check, the audit trail, ``output_dir``) assumes a pydicom data set,
and that destinations receive only the kinds their protocol carries and they list.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from node_support import (
    StoreSCP,
    audit_lines,
    chest_dataset,
    final_lines,
    send,
    start_node,
    wait_for,
)

from pacs_node.delivery import registry as protocols
from pacs_node.delivery.transport import STORED, Outcome, Status, Unreachable
from pacs_node.results import registry as writers
from pacs_node.results.base import Result, ResultContext
from pacs_node.status import StoreStatus

FHIR = "application/fhir+json"


class DiagnosticReportWriter:
    """The toy kind: a FHIR DiagnosticReport of the finding, as JSON."""

    kind, label, role, media_type, fail_reason = "toy", "TOY", "toy-report", FHIR, "toy-error"

    def build(self, context: ResultContext) -> Result:
        prediction, uid = context.prediction, context.identity.instance_uid(self.role)
        report = {
            "resourceType": "DiagnosticReport",
            "id": uid,
            "status": "preliminary",
            "imagingStudy": [
                {
                    "identifier": {
                        "system": "urn:dicom:uid",
                        "value": f"urn:oid:{context.source.StudyInstanceUID}",
                    }
                }
            ],
            "conclusion": prediction.label if prediction.assessed else "not assessed",
        }
        return Result(
            kind=self.kind,
            label=self.label,
            uid=uid,
            data=json.dumps(report).encode(),
            media_type=FHIR,
            suffix=".fhir.json",
        )


class FhirServer(http.server.ThreadingHTTPServer):
    """A FHIR-like endpoint on loopback that keeps what is POSTed to it."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, dict]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # the server is `self` here
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                self.received.append(
                    (handler.path, handler.headers["Content-Type"], json.loads(body))
                )
                handler.send_response(201)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *_args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class FhirLink:
    """POST each result to ``<url>/DiagnosticReport``; one request per result."""

    usable = True

    def __init__(self, url: str) -> None:
        self.url = url

    def groups(self, files: list[Path]) -> list[list[Path]]:
        return [[path] for path in files]

    def send(self, group: list[Path], on_wire) -> dict[Path, Outcome]:
        import urllib.request

        on_wire(group)
        outcomes = {}
        for path in group:
            request = urllib.request.Request(
                f"{self.url}/DiagnosticReport",
                data=path.read_bytes(),
                headers={"Content-Type": FHIR},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                outcomes[path] = (
                    STORED
                    if answer.status == 201
                    else Outcome(Status.REFUSED, "http", f"HTTP {answer.status}")
                )
        return outcomes

    def has(self, path: Path) -> bool:
        return False

    def close(self) -> None:
        pass


class FhirTransport:
    def __init__(self, url: str) -> None:
        self.url = url

    def open(self, ask: bool) -> FhirLink:
        if not self.url:
            raise Unreachable("no URL")
        return FhirLink(self.url)


@pytest.fixture
def fhir_kind():
    """The toy kind and its protocol, registered for one test and removed after it."""
    writers.register(DiagnosticReportWriter())
    protocols.register(
        protocols.Protocol(
            name="fhir-rest",
            media_types=frozenset({FHIR}),
            open=lambda d, ae, config, tls, timeout: FhirTransport(str(d)),
        )
    )
    yield
    writers.unregister("toy")
    protocols.unregister("fhir-rest")


def test_a_registered_kind_is_written_to_output_dir_beside_the_dicom_results(
    tmp_path: Path, predictor, fhir_kind
) -> None:
    node = start_node(tmp_path, predictor, outputs=("sr", "toy"))
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        folder = tmp_path / "out" / ds.StudyInstanceUID
        wait_for(lambda: len(list(folder.glob("*"))) == 2, 60, "the SR and the FHIR report")
        (report_file,) = folder.glob("TOY.*.fhir.json")
        report = json.loads(report_file.read_text())
        assert (
            report["resourceType"] == "DiagnosticReport"
            and report_file.name == f"TOY.{report['id']}.fhir.json"
        )
        assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{ds.StudyInstanceUID}"
        # the files are written before the audit line that closes the image
        (line,) = wait_for(lambda: final_lines(node, "processed"), 30, "the processed line")
        assert report["id"] in line["outputs"] and len(line["outputs"]) == 2
    finally:
        node.stop()


def test_a_registered_kind_reaches_the_destination_whose_protocol_carries_it_and_no_other(
    tmp_path: Path, predictor, fhir_kind
) -> None:
    server = FhirServer()
    fhir_destination = {
        "url": f"http://127.0.0.1:{server.server_address[1]}/fhir",
        "protocol": "fhir-rest",
        "outputs": ["toy"],
    }
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = start_node(
            tmp_path,
            predictor,
            outputs=("sr", "toy"),
            destinations=[pacs.destination, fhir_destination],
        )
        try:
            ds = chest_dataset()
            assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
            wait_for(
                lambda: server.received and pacs.received(),
                60,
                "the FHIR report and the SR at their destinations",
            )
            wait_for(
                lambda: (
                    len([line for line in audit_lines(node) if line["status"] == "delivered"]) == 2
                ),
                30,
                "two deliveries",
            )
            ((path, media_type, report),) = server.received
            assert (
                path == "/fhir/DiagnosticReport"
                and media_type == FHIR
                and report["resourceType"] == "DiagnosticReport"
            )
            assert [str(d.Modality) for d in pacs.received()] == ["SR"], (
                "the C-STORE destination gets the DICOM kinds only"
            )
            assert not any(
                p.is_file() for p in (tmp_path / "outbox").rglob("*") if ".delivered" not in p.parts
            ), "both outboxes emptied"
        finally:
            node.stop()
        server.shutdown()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"outputs": ("sr", "toy")},
            "outputs must be one or more of sr, sc, gsps, fhir, each once, got ['sr', 'toy']",
        ),
        (
            {"destinations": [{"url": "http://127.0.0.1:9/x", "protocol": "fhir-rest"}]},
            "protocol of http://127.0.0.1:9/x must be one of dimse, stow-rs, fhir, got 'fhir-rest'",
        ),
        (
            {"destinations": [{"url": "http://127.0.0.1:9/x", "outputs": ["gsps"]}]},
            "destinations[0].outputs lists gsps, which outputs does not write (sr, sc)",
        ),
        (
            {"destinations": [{"url": "http://127.0.0.1:9/x", "protocol": "dimse"}]},
            "protocol of http://127.0.0.1:9/x: dimse sends to an AE title at a host and port, not to a web address",
        ),
        (  # built for every image and sent nowhere: with destinations, output_dir is not used
            {"outputs": ["sr", "fhir"], "destinations": ["PACS@127.0.0.1:9"]},
            "outputs writes fhir, which no destination takes: add a destination that carries it, or remove it from outputs",
        ),
    ],
)
def test_a_kind_or_protocol_the_node_does_not_have_is_a_configuration_error(
    tmp_path: Path, predictor, settings, message
) -> None:
    from node_support import node_config

    from pacs_node.node import Node

    with pytest.raises(ValueError) as raised:
        Node(node_config(tmp_path, **settings), predictor)
    assert str(raised.value) == message


def test_a_dicom_object_put_as_it_is_carries_its_writers_kind() -> None:
    """A presentation state handed to an outbox as a data set is of kind ``gsps`` (the name a
    destination's ``outputs`` uses), not ``pr``, its file label."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from pacs_node.results.registry import dicom_result

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.11.1", "2.25.7"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    result = dicom_result(ds)
    assert (result.kind, result.label, result.uid, result.file_name) == (
        "gsps",
        "PR",
        "2.25.7",
        "PR.2.25.7.dcm",
    )


@pytest.mark.parametrize(
    ("uid", "suffix"),
    [
        ("../../etc/passwd", ".dcm"),
        ("1.2_3", ".dcm"),
        ("", ".dcm"),
        ("1.2.3", ".x/../../y"),
        ("1.2.3", ".json"),
        ("1.2.3", ".a_b"),
        ("1.2.3", "dcm"),
    ],
)
def test_a_result_whose_uid_or_suffix_could_name_another_path_is_refused(
    uid: str, suffix: str
) -> None:
    """A writer's uid and suffix become file names in the outbox and output_dir: only plain names."""
    with pytest.raises(ValueError, match="a result's"):
        Result(kind="fhir", label="FHIR", uid=uid, data=b"{}", suffix=suffix)
    assert (
        Result(kind="fhir", label="FHIR", uid="2.25.7", data=b"{}", suffix=".fhir.json").file_name
        == "FHIR.2.25.7.fhir.json"
    )
