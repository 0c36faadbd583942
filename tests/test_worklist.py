"""The worklist message: a FHIR R4 DiagnosticReport with one Observation per finding, POSTed as
one transaction Bundle to a FHIR server, exactly once per image.

The receiver is a FHIR server on a real loopback socket, as far as the node uses one: a
transaction Bundle POSTed to its base, conditional create (``ifNoneExist`` on an identifier: a
create whose identifier is already stored stores nothing, as HAPI does), and search by
identifier. It counts the POSTs that arrive and the resources it stores separately: a POST
repeated after a crash is allowed on the wire only because the server would dedupe it.
"""

from __future__ import annotations

import http.server
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import highdicom as hd
import numpy as np
import pytest
import yaml
from fhir.resources.R4B.bundle import Bundle
from node_support import (
    audit_lines,
    bundle_with,
    chest_dataset,
    echo_ok,
    final_lines,
    free_port,
    identity_of,
    node_config,
    send,
    start_node,
    wait_for,
)
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pacs_node import codes
from pacs_node.config import NodeConfig
from pacs_node.model.prediction import Prediction
from pacs_node.results.base import ResultContext
from pacs_node.results.report import build_report
from pacs_node.status import StoreStatus

FHIR_JSON = "application/fhir+json"
#: The URIs FHIR names the DICOM coding schemes by (FHIR R4 terminologies; DICOM PS3.16 8).
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
}
PRIORITY = "http://hl7.org/fhir/request-priority"
#: The triage point of the bundle the node tests run: of the demo samples, sample-3
#: (probability 1.0) is flagged, sample-1 (0.83, above the operating point 0.61) is positive
#: but not flagged, sample-2 is negative, and chest_dataset() lies outside the distribution.


# --- a FHIR server on loopback ------------------------------------------------------------------


class FhirServer(http.server.ThreadingHTTPServer):
    """Transactions with conditional create, and search by identifier, at ``/fhir``.

    Args:
        answers: statuses the first POSTs are answered with, before anything is stored.
        search: whether it answers searches (a server that does not answers 501).
    """

    daemon_threads = True

    def __init__(self, answers: tuple[int, ...] = (), search: bool = True) -> None:
        self.answers, self.search = list(answers), search
        self.posts: list[dict] = []
        self.searches = 0
        self.stored: list[dict] = []
        self.lock = threading.Lock()
        #: set: a POST is stored, then left unanswered (``held``) until ``release``
        self.hold, self.held, self.release = threading.Event(), threading.Event(), threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"

    def destination(self) -> dict:
        return {"url": self.url, "protocol": "fhir", "outputs": ["fhir"]}

    def transact(self, bundle: dict) -> dict:
        """Store each entry unless ``ifNoneExist`` finds one (FHIR R4 3.1.0.8.1); the transaction-response."""
        responses = []
        with self.lock:
            for entry in bundle["entry"]:
                resource, request = entry["resource"], entry["request"]
                assert request["method"] == "POST" and request["url"] == resource["resourceType"]
                key, _, wanted = request["ifNoneExist"].partition("=")
                assert key == "identifier"
                found = self._find(resource["resourceType"], wanted)
                if found:
                    responses.append({"response": {"status": "200 OK"}})
                else:
                    self.stored.append(resource)
                    responses.append({"response": {"status": "201 Created"}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}

    def _find(self, resource_type: str, token: str) -> list[dict]:
        system, _, value = token.partition("|")
        return [
            r
            for r in self.stored
            if r["resourceType"] == resource_type
            and any(i.get("system") == system and i["value"] == value for i in r["identifier"])
        ]

    def of_type(self, resource_type: str) -> list[dict]:
        with self.lock:
            return [r for r in self.stored if r["resourceType"] == resource_type]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FhirServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers: the node reuses its connection

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.posts.append(
                {"path": self.path, "type": self.headers["Content-Type"], "body": body}
            )
            forced = self.server.answers.pop(0) if self.server.answers else None
        if forced is not None:
            return self._answer(forced, _outcome("forced by the test"))
        if self.path != "/fhir/" or self.headers["Content-Type"] != FHIR_JSON:
            return self._answer(415, _outcome("a transaction is POSTed to the base as FHIR JSON"))
        try:
            bundle = Bundle.model_validate_json(body)
        except ValidationError:
            return self._answer(400, _outcome("not a FHIR Bundle"))
        if bundle.type != "transaction":
            return self._answer(400, _outcome("not a transaction"))
        answer = self.server.transact(json.loads(body))
        if self.server.hold.is_set():
            self.server.held.set()
            self.server.release.wait(60)
            self.close_connection = True
            return None
        return self._answer(200, answer)

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.searches += 1
        parts = urlsplit(self.path)
        if not self.server.search:
            return self._answer(501, _outcome("search is not implemented"))
        resource_type = parts.path.removeprefix("/fhir/")
        (token,) = parse_qs(parts.query)["identifier"]
        with self.server.lock:
            found = self.server._find(resource_type, token)
        return self._answer(
            200,
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(found),
                "entry": [{"resource": r} for r in found],
            },
        )

    def _answer(self, status: int, content: dict) -> None:
        data = json.dumps(content).encode()
        self.send_response(status)
        self.send_header("Content-Type", FHIR_JSON)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args) -> None:
        pass


def _outcome(text: str) -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


# --- building the message -----------------------------------------------------------------------


def prediction(
    lobar: float = 0.8,
    triage_point: float | None = 0.7,
    ood_score: float = 1.0,
    multi_label: bool = False,
    withheld: str = "",
) -> Prediction:
    """A softmax (or multi-label) prediction of normal, lobar and interstitial."""
    probabilities = np.array([1.0 - lobar - 0.05, lobar, 0.05])
    if multi_label:
        probabilities = np.array([0.0, lobar, 0.65])
    return Prediction(
        classes=("normal", "lobar", "interstitial"),
        probabilities=probabilities,
        normal_class="normal",
        operating_point=0.6,
        heatmap=np.zeros((4, 4)),
        boxes=np.zeros((0, 4)),
        multi_label=multi_label,
        triage_point=triage_point,
        ood_score=ood_score,
        ood_threshold=7.5,
        regions_withheld=withheld,
    )


def types_below() -> Prediction:
    """A softmax pneumonia at 75 % (threshold 60 %) whose types are each below the threshold:
    lobar at 40 % is the most probable."""
    return Prediction(
        classes=("normal", "lobar", "interstitial"),
        probabilities=np.array([0.25, 0.4, 0.35]),
        normal_class="normal",
        operating_point=0.6,
        heatmap=np.zeros((4, 4)),
        boxes=np.zeros((0, 4)),
        triage_point=0.7,
    )


def context(contract, predicted: Prediction, source: Dataset | None = None) -> ResultContext:
    source = source or chest_dataset()
    return ResultContext(
        source=source,
        received=source,
        prepared=None,
        prediction=predicted,
        model=contract,
        identity=identity_of(source, contract),
        config=NodeConfig(),
    )


@pytest.fixture(scope="module")
def contract(demo_bundle: Path):
    from dp_model.serving.bundle import load_bundle

    return load_bundle(demo_bundle)[1]


def message(contract, predicted: Prediction, source: Dataset | None = None):
    from pacs_node.results.worklist import WorklistWriter

    return WorklistWriter().build(context(contract, predicted, source))


def resources(result) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for entry in json.loads(result.data)["entry"]:
        found.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return found


def test_the_bundle_is_a_valid_fhir_transaction_that_creates_each_resource_once_by_its_identifier(
    contract,
) -> None:
    source = chest_dataset()
    result = message(contract, prediction(), source)
    identity = identity_of(source, contract)
    bundle = Bundle.model_validate_json(result.data)  # fhir.resources: R4B, as R4 for these
    assert bundle.type == "transaction"
    assert (result.kind, result.media_type, result.suffix) == ("fhir", FHIR_JSON, ".fhir.json")
    assert result.uid == identity.instance_uid("fhir")
    data = json.loads(result.data)
    urls = {entry["fullUrl"] for entry in data["entry"]}
    assert len(urls) == len(data["entry"]) and all(u.startswith("urn:uuid:") for u in urls)
    identifiers = []
    for entry in data["entry"]:
        resource, request = entry["resource"], entry["request"]
        (identifier,) = resource["identifier"]
        identifiers.append(identifier["value"])
        assert request == {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}",
        }
    assert len(set(identifiers)) == len(identifiers)
    (report,) = resources(result)["DiagnosticReport"]
    assert report["identifier"] == [
        {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{identity.instance_uid('fhir')}"}
    ]
    assert report["status"] == "preliminary"
    assert report["code"]["coding"] == [
        {"system": "http://loinc.org", "code": "30745-4", "display": "XR Chest Views"}
    ]
    observations = resources(result)["Observation"]
    assert sorted(r["reference"] for r in report["result"]) == sorted(
        e["fullUrl"] for e in data["entry"] if e["resource"]["resourceType"] == "Observation"
    )
    (device,) = resources(result)["Device"]
    device_url = next(
        e["fullUrl"] for e in data["entry"] if e["resource"]["resourceType"] == "Device"
    )
    assert device["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{contract.device_uid}"}
    ]
    assert all(o["device"] == {"reference": device_url} for o in observations)
    assert all(o["status"] == "preliminary" for o in observations)


def test_the_report_names_the_study_the_image_and_the_algorithm_and_no_patient(contract) -> None:
    source = chest_dataset(AccessionNumber="ACC-77", StudyDate="20261122")
    result = message(contract, prediction(), source)
    (report,) = resources(result)["DiagnosticReport"]
    study = {"system": "urn:dicom:uid", "value": f"urn:oid:{source.StudyInstanceUID}"}
    image = {"system": "urn:dicom:uid", "value": f"urn:oid:{source.SOPInstanceUID}"}
    assert report["imagingStudy"] == [{"type": "ImagingStudy", "identifier": study}]
    assert [m["link"] for m in report["media"]] == [{"type": "Media", "identifier": image}]
    assert report["basedOn"][0]["identifier"]["value"] == "ACC-77"
    assert report["effectiveDateTime"] == "2026-11-22"
    for observation in resources(result)["Observation"]:
        assert {"type": "ImagingStudy", "identifier": study} in observation["derivedFrom"]
        assert {"type": "Media", "identifier": image} in observation["derivedFrom"]
    (device,) = resources(result)["Device"]
    assert {"name": contract.name, "type": "model-name"} in device["deviceName"]
    assert device["version"] == [{"value": contract.version}]
    assert device["manufacturer"] == codes.MANUFACTURER
    if contract.demo:
        assert "synthetic" in device["note"][0]["text"] and "DEMONSTRATION" in report["conclusion"]
    assert (
        contract.name in report["conclusion"]
        and "not for primary diagnosis" in report["conclusion"]
    )
    text = result.data.decode()
    for value in (source.PatientName, source.PatientID, source.PatientBirthDate):
        assert str(value) not in text, "the worklist message carries study identifiers only"


def test_the_same_image_and_model_give_the_same_bytes_another_model_other_identifiers(
    contract,
) -> None:
    import dataclasses

    source = chest_dataset()
    first = message(contract, prediction(), source)
    assert message(contract, prediction(), source).data == first.data
    retrained = dataclasses.replace(contract, device_uid=generate_uid())
    other = message(retrained, prediction(), source)
    ids = {i["value"] for r in sum(resources(first).values(), []) for i in r["identifier"]}
    other_ids = {i["value"] for r in sum(resources(other).values(), []) for i in r["identifier"]}
    assert not ids & other_ids and other.uid != first.uid


#: What a consumer reads from a coded concept, in FHIR or DICOM: (scheme designator, code).
Concept = tuple[str, str]


def _key(concept) -> Concept:
    """A DICOM code (pydicom, highdicom or a Code Sequence item) as (designator, value)."""
    return str(concept.scheme_designator), str(concept.value)


def _sr_statements(sr: Dataset, source: Dataset) -> tuple[Counter, dict[str, str], str]:
    """What the SR states, read as a consumer reads it: highdicom's TID 1500 reader for the
    image-level group (TID 1501 on the source image), the content tree for TID 1500 row 12.

    Returns the statements (``("coded", name, value)`` for each decision and each row-12 code,
    ``("number", name, value, unit)`` for each of the group's numbers), the group's algorithm
    parameters by name ("triage point" -> "0.7"), and the row-12 Comment ("" when none).
    """
    data = io.BytesIO()
    sr.save_as(data, enforce_file_format=True)
    read = hd.sr.srread(io.BytesIO(data.getvalue()))
    report = read.content
    (group,) = report.get_image_measurement_groups(
        referenced_sop_instance_uid=str(source.SOPInstanceUID)
    )
    stated: Counter = Counter()
    for evaluation in group.get_qualitative_evaluations():
        stated["coded", _key(evaluation.name), _key(evaluation.value)] += 1
    for measurement in group.get_measurements():
        stated["number", _key(measurement.name), measurement.value, _key(measurement.unit)] += 1
    (container,) = [
        item
        for item in read.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    ]
    comment = ""
    for item in container.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0]
            stated[
                "coded",
                (name.CodingSchemeDesignator, name.CodeValue),
                (value.CodingSchemeDesignator, value.CodeValue),
            ] += 1
        elif (name.CodingSchemeDesignator, name.CodeValue) == _key(codes.COMMENT):
            comment = str(item.TextValue)
    parameters = [
        str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"
    ]
    named = dict(parameter.rsplit(" ", 1) for parameter in parameters)
    return stated, named, comment


def _fhir_statements(result) -> tuple[Counter, dict[str, float]]:
    """The same, read from the Observations (FHIR URIs back to DICOM scheme designators): each
    Observation's code and the DICOM coding of its value, each component as a number. The
    triage point is returned apart, by its Observation's name: the SR states it as an
    algorithm parameter."""
    schemes = {uri: designator for designator, uri in SYSTEMS.items()}
    schemes[codes.FHIR_SYSTEMS[codes.PRIVATE_SCHEME]] = codes.PRIVATE_SCHEME
    stated: Counter = Counter()
    points: dict[str, float] = {}
    for observation in resources(result)["Observation"]:
        (name,) = observation["code"]["coding"]
        code = (schemes[name["system"]], name["code"])
        (value,) = [
            c for c in observation["valueCodeableConcept"]["coding"] if c["system"] in schemes
        ]
        stated["coded", code, (schemes[value["system"]], value["code"])] += 1
        for component in observation.get("component", []):
            (number,) = component["code"]["coding"]
            quantity = component["valueQuantity"]
            assert quantity["system"] == SYSTEMS["UCUM"] and quantity["unit"] == quantity["code"]
            number_code = (schemes[number["system"]], number["code"])
            if code == _key(codes.PRIORITY):
                points[number["display"]] = quantity["value"]
                continue
            unit = ("UCUM", quantity["code"])
            stated["number", number_code, quantity["value"], unit] += 1
    return stated, points


@pytest.mark.parametrize(
    ("predicted", "priority"),
    [
        (prediction(lobar=0.8, triage_point=0.7), "urgent"),
        (prediction(lobar=0.6, triage_point=0.7), "routine"),
        (prediction(lobar=0.2), "routine"),
        (prediction(lobar=0.8, triage_point=None), None),
        (prediction(lobar=0.9, multi_label=True), "urgent"),
        (prediction(lobar=0.8, withheld="regions are not drawn: not measured"), "urgent"),
        (prediction(ood_score=50.0), None),
        (types_below(), "urgent"),
    ],
    ids=[
        "flagged",
        "positive",
        "negative",
        "no-triage-point",
        "multi-label",
        "withheld",
        "ood",
        "types-below",
    ],
)
def test_the_observations_state_the_decision_the_sr_states_and_the_flag_as_a_priority(
    contract, predicted: Prediction, priority: str | None
) -> None:
    """A worklist and a PACS are told the same thing: the Observations state what the SR
    states (the decisions, the probabilities and thresholds, the CAD summary, the priority),
    read back from each as its consumer reads it, and nothing else."""
    source = chest_dataset()
    result = message(contract, predicted, source)
    sr = build_report(source, predicted, contract, identity_of(source, contract))
    said, parameters, comment = _sr_statements(sr, source)
    told, points = _fhir_statements(result)
    assert told == said
    # the triage point: an algorithm parameter in the SR, a threshold beside the priority here
    triage_point = float(parameters["triage point"]) if "triage point" in parameters else None
    if priority is None:
        assert points == {}
    else:
        assert points == {codes.THRESHOLD_VALUE.meaning: pytest.approx(100 * triage_point)}
    observations = resources(result)["Observation"]
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    assert len(by_code) == len(observations)
    # the priority a worklist orders by comes first, the SR's SNOMED CT priority beside it
    if priority is None:
        assert codes.PRIORITY.value not in by_code
    else:
        first, sct = by_code[codes.PRIORITY.value]["valueCodeableConcept"]["coding"]
        assert (first["system"], first["code"]) == (PRIORITY, priority)
        high = priority == "urgent"
        assert sct["code"] == (codes.HIGH_PRIORITY if high else codes.NORMAL_PRIORITY).value
    # each probability lies on the Observation of the finding it is named for (a softmax
    # model's type probabilities, decided on by no one, beside pneumonia's)
    for observation in observations:
        meaning = observation["code"]["text"]
        if meaning == codes.MOST_PROBABLE_TYPE.meaning:
            meaning = observation["valueCodeableConcept"]["coding"][0]["display"]
        beside = meaning == codes.PNEUMONIA.meaning and not predicted.multi_label
        for component in observation.get("component", []):
            display = component["code"]["coding"][0]["display"]
            if display.startswith("Probability of ") and not beside:
                assert display == f"Probability of {meaning[:1].lower()}{meaning[1:]}"
    text = result.data.decode()
    assert "Certainty" not in text and "Indeterminate" not in text
    (summary,) = [
        o for o in observations if o["code"]["text"] == codes.CAD_PROCESSING_SUMMARY.meaning
    ]
    (report,) = resources(result)["DiagnosticReport"]
    if not predicted.assessed:
        # no decision, so nothing of pneumonia and no interpretation; the summary says why
        assert list(by_code) == [codes.CAD_PROCESSING_SUMMARY.value]
        assert "interpretation" not in summary
        assert comment.startswith("Not assessed") and summary["note"][0]["text"].startswith(
            "Not assessed"
        )
        assert "Not assessed" in report["conclusion"] and "%" not in report["conclusion"]
        assert "conclusionCode" not in report
        return
    pneumonia = by_code[codes.PNEUMONIA.value]
    interpretation = pneumonia["interpretation"][0]["coding"][0]["code"]
    assert interpretation == ("POS" if predicted.positive else "NEG")
    assert [c["code"]["coding"][0]["code"] for c in pneumonia["component"]][:2] == [
        codes.probability_code("pneumonia").value,
        codes.THRESHOLD_VALUE.value,
    ]
    if predicted.regions_withheld:
        assert comment == predicted.regions_withheld
        assert pneumonia["note"] == [{"text": predicted.regions_withheld}]
    assert "certainty" not in report["conclusion"]
    if predicted.positive:
        assert {
            "system": SYSTEMS["SCT"],
            "code": codes.PNEUMONIA.value,
            "display": "Pneumonia",
        } in [c["coding"][0] for c in report["conclusionCode"]]


@pytest.mark.parametrize("case", ["types-below", "negative", "multi-label"])
def test_a_softmax_model_names_the_most_probable_type_and_decides_none(contract, case: str) -> None:
    """The type of a softmax model's pneumonia is its most probable pneumonia class, chosen
    after pneumonia was decided (``contract.decide``): one Observation names it, with its
    probability; no type is POS or NEG. A negative states pneumonia alone. A multi-label model
    decides each finding at its operating point, and each is stated so."""
    predicted = {
        "types-below": types_below(),
        "negative": prediction(lobar=0.2),
        "multi-label": prediction(lobar=0.9, multi_label=True),
    }[case]
    observations = resources(message(contract, predicted))["Observation"]
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    types = {codes.finding_code(label).value for label in ("lobar", "interstitial")}
    decided = {
        code: o["interpretation"][0]["coding"][0]["code"]
        for code, o in by_code.items()
        if "interpretation" in o
    }
    if case == "multi-label":
        assert decided == {codes.PNEUMONIA.value: "POS", **dict.fromkeys(types, "POS")}
        assert codes.MOST_PROBABLE_TYPE.value not in by_code
        return
    assert decided == {codes.PNEUMONIA.value: "POS" if predicted.positive else "NEG"}
    assert not types & by_code.keys()
    (report,) = resources(message(contract, predicted))["DiagnosticReport"]
    if not predicted.positive:
        assert codes.MOST_PROBABLE_TYPE.value not in by_code
        assert "most likely" not in report["conclusion"]
        return
    named = by_code[codes.MOST_PROBABLE_TYPE.value]
    (value,) = named["valueCodeableConcept"]["coding"]
    assert value["code"] == codes.finding_code("lobar").value
    (number,) = named["component"]
    assert number["code"]["coding"][0]["display"] == "Probability of lobar pneumonia"
    assert number["valueQuantity"]["value"] == 40.0
    assert "most likely lobar pneumonia (40.00 %)" in report["conclusion"], report["conclusion"]


# --- delivering it ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranked_samples(demo_bundle: Path) -> list[tuple[int, float]]:
    """The demo samples' numbers and probabilities of pneumonia (by the demo model), the most
    probable first."""
    from pacs_node.model.predictor import NodePredictor, prepare

    predictor = NodePredictor(demo_bundle, "cpu")
    numbers = sorted(
        int(path.stem.split("-")[1]) for path in (demo_bundle / "samples").glob("sample-*.dcm")
    )
    size = predictor.contract.image_size
    found = predictor.predict(
        [prepare(dcmread(demo_bundle / "samples" / f"sample-{n}.dcm"), size) for n in numbers]
    )
    return sorted(zip(numbers, (p.pneumonia_probability for p in found)), key=lambda r: -r[1])


@pytest.fixture(scope="module")
def top(ranked_samples: list[tuple[int, float]]) -> int:
    """The demo sample the triage bundle flags: its most probable."""
    return ranked_samples[0][0]


@pytest.fixture(scope="module")
def triage_bundle(
    demo_bundle: Path, ranked_samples: list[tuple[int, float]], tmp_path_factory
) -> Path:
    """The demo bundle with a triage point (its own operating point kept) between its most
    probable sample and the next: that one sample is flagged, whatever a training made of
    the others (the point is never below the present point)."""
    (_, first), (_, second) = ranked_samples[:2]
    meta = json.loads((demo_bundle / "configs" / "metadata.json").read_text())
    present = meta["deep_pneumonia"]["operating_points"]["present"]["threshold"]
    triage = max(present, (first + second) / 2)
    assert second < triage <= first, (
        f"the two most probable demo samples are not apart: {ranked_samples}"
    )
    points = meta["deep_pneumonia"]["operating_points"] | {"triage": {"threshold": triage}}
    return bundle_with(
        demo_bundle, tmp_path_factory.mktemp("triage") / "bundle", operating_points=points
    )


@pytest.fixture(scope="module")
def triage_predictor(triage_bundle: Path):
    from pacs_node.model.predictor import NodePredictor

    return NodePredictor(triage_bundle, "cpu")


@pytest.fixture(scope="module")
def sample(demo_bundle: Path):
    """A demo sample as another image of another study (its pixels, so its prediction, kept)."""

    def copy(number: int) -> Dataset:
        ds = dcmread(demo_bundle / "samples" / f"sample-{number}.dcm")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        return ds

    return copy


FAST_RETRY = {"initial_backoff_s": 0.2, "max_backoff_s": 0.5}


def fhir_node(tmp_path: Path, predictor, server: FhirServer, **settings):
    return start_node(
        tmp_path,
        predictor,
        outputs=("fhir",),  # a node writes only what some destination takes
        destinations=[server.destination()],
        outbox=FAST_RETRY,
        **settings,
    )


def deliveries(node_or_path, status: str = "delivered") -> list[dict]:
    return [
        line
        for line in audit_lines(node_or_path)
        if line["event"] == "delivery" and line.get("status") == status
    ]


def test_a_worklist_server_gets_exactly_one_message_per_image_and_the_flagged_ones_are_urgent(
    tmp_path: Path, triage_predictor, sample, ranked_samples
) -> None:
    server = FhirServer()
    (top, _), *rest = ranked_samples
    flagged = [sample(top), sample(top)]
    others = [*(sample(n) for n, _ in rest), chest_dataset()]
    node = fhir_node(tmp_path, triage_predictor, server)
    try:
        images = [*flagged, *others, flagged[0]]  # the first flagged image sent twice
        assert send(node.port, images) == [StoreStatus.SUCCESS] * len(images)
        wait_for(lambda: len(deliveries(node)) == 5, 60, "five worklist messages delivered")
        time.sleep(0.5)  # anything more would be a duplicate
        assert len(server.posts) == 5 and len(server.of_type("DiagnosticReport")) == 5
        assert {p["path"] for p in server.posts} == {"/fhir/"}
        assert {p["type"] for p in server.posts} == {FHIR_JSON}
        priorities = {}
        for report in server.of_type("DiagnosticReport"):
            (study,) = report["imagingStudy"]
            uid = study["identifier"]["value"].removeprefix("urn:oid:")
            priorities[uid] = [
                o["valueCodeableConcept"]["coding"][0]["code"]
                for o in server.of_type("Observation")
                if o["code"]["coding"][0]["code"] == codes.PRIORITY.value
                and {"type": "ImagingStudy", "identifier": study["identifier"]} in o["derivedFrom"]
            ]
        lines = wait_for(lambda: len(final_lines(node)) == 6 and final_lines(node), 30, "six")
        said = {line["sop_instance_uid"]: line["result"] for line in lines}
        expected = {}
        for ds in [*flagged, *others]:
            result = said[str(ds.SOPInstanceUID)]
            # not assessed: no flag either way
            flag = ["urgent" if result["triage"] else "routine"] if result["assessed"] else []
            expected[str(ds.StudyInstanceUID)] = flag
        assert priorities == expected
        assert sorted(map(len, expected.values())) == [0, 1, 1, 1, 1]
        assert [flag for flag in expected.values() if flag].count(["urgent"]) == 2, (
            "only the most probable demo sample is above the triage point"
        )
        assert len(server.of_type("Device")) == 1, "one Device for the model, created once"
    finally:
        node.stop()
        server.shutdown()


@pytest.mark.parametrize("answers", [(503,), (429,), (500, 503), (408,), (404,), (401,)])
def test_a_message_the_server_could_not_take_now_is_sent_again_and_stored_once(
    tmp_path: Path, triage_predictor, answers: tuple[int, ...], sample, top
) -> None:
    server = FhirServer(answers=answers)
    node = fhir_node(tmp_path, triage_predictor, server)
    try:
        assert send(node.port, [sample(top)]) == [StoreStatus.SUCCESS]
        wait_for(lambda: deliveries(node), 30, "the message delivered after a retry")
        assert len(server.posts) == len(answers) + 1
        assert len(server.of_type("DiagnosticReport")) == 1
        assert deliveries(node, "dead-letter") == []
        if answers == (401,):
            (held,) = deliveries(node, "held")
            assert held["reason"] == "authentication"
    finally:
        node.stop()
        server.shutdown()


@pytest.mark.parametrize("status", [400, 409, 412, 422])
def test_a_message_the_server_refuses_goes_to_dead_letters_at_once_with_an_audit_line(
    tmp_path: Path, triage_predictor, status: int, sample, top
) -> None:
    server = FhirServer(answers=(status,))
    node = fhir_node(tmp_path, triage_predictor, server)
    try:
        ds = sample(top)
        assert send(node.port, [ds]) == [StoreStatus.SUCCESS]
        (line,) = wait_for(lambda: deliveries(node, "dead-letter"), 30, "a dead letter")
        identity = identity_of(ds, triage_predictor.contract)
        assert line["outputs"] == [identity.instance_uid("fhir")] and line["reason"] == "refused"
        dead = tmp_path / "dead-letter" / node.senders[0].destination.name
        assert (dead / f"{identity.instance_uid('fhir')}.fhir.json").exists()
        why = (dead / f"{identity.instance_uid('fhir')}.why.txt").read_text()
        assert why.startswith(f"refused: HTTP {status}")
        time.sleep(1.0)  # two backoffs: nothing is sent again
        assert len(server.posts) == 1 and server.of_type("DiagnosticReport") == []
        assert deliveries(node) == []
    finally:
        node.stop()
        server.shutdown()


def test_a_message_whose_answer_never_came_is_asked_about_before_it_is_sent_again(
    tmp_path: Path, triage_predictor, sample, top
) -> None:
    """A timeout after the body left: the server may have it. The node searches by the report's
    identifier and finds it: one POST, one report."""
    server = FhirServer()
    server.hold.set()
    node = fhir_node(tmp_path, triage_predictor, server, network_timeout_s=1.0)
    try:
        assert send(node.port, [sample(top)]) == [StoreStatus.SUCCESS]
        wait_for(server.held.is_set, 30, "the POST held without an answer")
        server.hold.clear()
        wait_for(lambda: deliveries(node), 30, "the message delivered")
        assert len(server.posts) == 1 and server.searches >= 1
        assert len(server.of_type("DiagnosticReport")) == 1
    finally:
        server.release.set()
        node.stop()
        server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("search", [True, False], ids=["server-searches", "server-cannot-search"])
def test_a_flagged_image_reaches_the_worklist_exactly_once_across_a_kill_9_of_the_node(
    tmp_path: Path, triage_bundle: Path, search: bool, sample, top
) -> None:
    """The node dies (SIGKILL) while the server has stored the transaction and not yet answered.
    Restarted on the same spool, it asks the server (search by identifier) and sends nothing
    again; a server that cannot search gets the POST again and creates nothing (ifNoneExist)."""
    server = FhirServer(search=search)
    server.hold.set()
    port = free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "bundle": str(triage_bundle),
                "spool": str(tmp_path / "spool"),
                "metrics_port": -1,
                "device": "cpu",
                "allow": ["TESTSCU", "PROBE"],
                "outputs": ["fhir"],
                "destinations": [server.destination()],
                "outbox": FAST_RETRY,
            }
        )
    )
    log = (tmp_path / "node.log").open("w")
    command = [sys.executable, "-m", "pacs_node.cli", "--config", str(config)]
    node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: echo_ok(port), 60, "the node to answer C-ECHO")
        ds = sample(top)
        assert send(port, [ds]) == [StoreStatus.SUCCESS]
        wait_for(server.held.is_set, 30, "the transaction stored and its answer held")
        node.kill()  # SIGKILL: the answer never reaches the node
        node.wait(30)
        server.hold.clear()
        server.release.set()
        node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        audit = tmp_path / "spool" / "audit.jsonl"
        wait_for(lambda: deliveries(audit), 60, "the restarted node to settle the message")
        time.sleep(1.0)  # anything more would be a duplicate
        reports = server.of_type("DiagnosticReport")
        assert len(reports) == 1, f"{len(reports)} reports stored from {len(server.posts)} POSTs"
        identity = identity_of(ds, contract_of(triage_bundle))
        assert reports[0]["identifier"][0]["value"] == f"urn:oid:{identity.instance_uid('fhir')}"
        # with search the node asks and POSTs nothing again; without, the server dedupes the POST
        assert len(server.posts) == (1 if search else 2)
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0
    finally:
        if node.poll() is None:
            node.kill()
        log.close()
        server.release.set()
        server.shutdown()


def contract_of(bundle: Path):
    from dp_model.serving.bundle import load_bundle

    return load_bundle(bundle)[1]


# --- configuration ------------------------------------------------------------------------------


def test_a_fhir_destination_takes_the_worklist_message_and_no_dicom_object(
    tmp_path: Path, contract, predictor
) -> None:
    from pacs_node.node import Node
    from pacs_node.results.base import Result

    server = FhirServer()
    node = Node(
        node_config(
            tmp_path,
            outputs=("sr", "fhir"),
            destinations=[server.destination(), "PACS@127.0.0.1:9"],
        ),
        predictor,
    )
    sender = node.senders[0]
    assert sender.takes(message(contract, prediction()))
    assert not sender.takes(Result(kind="sr", label="SR", uid="2.25.1", data=b""))
    server.shutdown()


@pytest.mark.parametrize(
    ("settings", "message_"),
    [
        (
            {
                "outputs": ("sr", "fhir"),
                "destinations": [
                    {"url": "http://127.0.0.1:9/fhir", "protocol": "fhir", "outputs": ["sr"]}
                ],
            },
            "destinations[0] (fhir) carries none of the outputs it would take: sr",
        ),
        (
            {
                "outputs": ("sr",),
                "destinations": [
                    {"url": "http://127.0.0.1:9/fhir", "protocol": "fhir", "outputs": ["fhir"]}
                ],
            },
            "destinations[0].outputs lists fhir, which outputs does not write (sr)",
        ),
        (
            {
                "outputs": ("sr", "fhir"),
                "destinations": [{"url": "http://127.0.0.1:9/fhir", "protocol": "fhir-r5"}],
            },
            "protocol of http://127.0.0.1:9/fhir must be one of dimse, stow-rs, fhir, got 'fhir-r5'",
        ),
    ],
)
def test_a_fhir_destination_that_could_not_work_is_one_line_naming_the_key(
    tmp_path: Path, predictor, settings, message_
) -> None:
    from pacs_node.node import Node

    with pytest.raises(ValueError) as raised:
        Node(node_config(tmp_path, **settings), predictor)
    assert str(raised.value) == message_
