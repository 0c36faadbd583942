"""The Structured Report means what it says, read the way its consumers read it.

Each test reads the node's SR back as one of its readers does: highdicom's TID 1500 reader
(``hd.sr.srread`` and the Measurement Report's group accessors), dcmtk's generic renderers
(``dsr2html``, ``dsrdump``), dicom3tools' ``dciodvfy``, PixelMed's ``DicomSRValidator``, and a
destination that takes one SR SOP class and not the other. The reports are the node's own,
for the demo bundle's samples (a pneumonia, a normal phantom) and for RG1, a real radiograph
the demo model's out-of-distribution gate does not assess.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from helpers import data_file, run_tool
from node_support import identity_of, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    StudyRootQueryRetrieveInformationModelFind,
)
from validators import check

from pacs_node import codes
from pacs_node.config import Destination, NodeConfig, OutboxConfig
from pacs_node.delivery.cstore import CStoreTransport
from pacs_node.delivery.outbox import DestinationSender
from pacs_node.delivery.transport import Status
from pacs_node.intake.sanitize import clean_source
from pacs_node.model.predictor import NodePredictor, Prediction, prepare
from pacs_node.results.base import ResultContext, region_tracking_uid
from pacs_node.results.identity import ResultIdentity
from pacs_node.results.report import ReportWriter, in_sop_class, sop_instance_uid_in


@dataclasses.dataclass
class Case:
    """One SR the node wrote, with what it was written from."""

    path: Path
    source: Dataset
    prediction: Prediction
    identity: ResultIdentity

    @property
    def report(self) -> hd.sr.MeasurementReport:
        return hd.sr.srread(self.path).content

    @property
    def dataset(self) -> Dataset:
        return dcmread(self.path)


def write_report(
    folder: Path,
    name: str,
    received: Dataset,
    predictor: NodePredictor,
    change: dict | None = None,
) -> Case:
    """What the node's worker does with one image: clean, prepare, predict, ``ReportWriter.build``."""
    source = clean_source(received).dataset
    prepared = prepare(received, predictor.contract.image_size)
    (prediction,) = predictor.predict([prepared])
    if change:
        prediction = dataclasses.replace(prediction, **change)
    identity = identity_of(source, predictor.contract)
    context = ResultContext(
        source=source,
        received=received,
        prepared=prepared,
        prediction=prediction,
        model=predictor.contract,
        identity=identity,
        config=NodeConfig(),
    )
    path = folder / f"{name}.dcm"
    path.write_bytes(ReportWriter().build(context).data)
    return Case(path, source, prediction, identity)


@pytest.fixture(scope="module")
def cases(
    tmp_path_factory: pytest.TempPathFactory, predictor: NodePredictor, demo_bundle: Path
) -> dict[str, Case]:
    folder = tmp_path_factory.mktemp("sr")
    sample = {n: dcmread(demo_bundle / "samples" / f"sample-{n}.dcm") for n in (1, 2)}
    found = {
        "positive": write_report(folder, "positive", sample[1], predictor),
        "negative": write_report(folder, "negative", sample[2], predictor),
        "not assessed": write_report(
            folder, "not-assessed", dcmread(data_file("RG1_UNCR.dcm")), predictor
        ),
        "triage raised": write_report(
            folder, "triage-raised", sample[1], predictor, {"triage_point": 0.5}
        ),
        "triage not raised": write_report(
            folder, "triage-not-raised", sample[2], predictor, {"triage_point": 0.5}
        ),
    }
    # what the samples are, so that each test below tests what it says
    assert found["positive"].prediction.positive and len(found["positive"].prediction.boxes)
    assert found["negative"].prediction.assessed and not found["negative"].prediction.positive
    assert not found["not assessed"].prediction.assessed
    assert found["triage raised"].prediction.triage
    assert not found["triage not raised"].prediction.triage
    return found


def items(dataset: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from items(item)


def name_of(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def value_of(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def key(code) -> tuple[str, str]:
    return str(code.value), str(code.scheme_designator)


def findings(prediction: Prediction) -> list[tuple[str, str]]:
    """What the image-level group states, as ``(name, value)``: pneumonia Present / Absent,
    then, for a multi-label model, each finding Present / Absent, for a single-label one with
    pneumonia present the most probable type (chosen, not decided)."""
    said = "Present" if prediction.positive else "Absent"
    stated = [(codes.PNEUMONIA.meaning, said)]
    if prediction.multi_label:
        stated += [
            (
                codes.finding_code(label).meaning,
                "Present" if prediction.present(label) else "Absent",
            )
            for label in prediction.classes
            if label != prediction.normal_class
        ]
    elif prediction.most_probable_type is not None:
        chosen = codes.finding_code(prediction.most_probable_type).meaning
        stated.append((codes.MOST_PROBABLE_TYPE.meaning, chosen))
    return stated


def rendered(path: Path) -> str:
    """dsr2html's page as the text a reader sees."""
    page = run_tool("dsr2html", path).stdout
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


# --- 2. a generic renderer names every finding ------------------------------------------------------


@pytest.mark.tools
@pytest.mark.parametrize("case", ["positive", "negative"])
def test_every_container_is_separate_so_a_generic_renderer_names_each_finding(
    cases: dict[str, Case], case: str
) -> None:
    """PS3.3 C.17.3.2.1: CONTINUOUS content reads as one running text, and dsr2html prints its
    values without their names ("Present Absent Absent"); SEPARATE items each keep their name."""
    found = cases[case]
    ds = found.dataset
    containers = [ds, *(item for item in items(ds) if item.ValueType == "CONTAINER")]
    assert {str(c.ContinuityOfContent) for c in containers} == {"SEPARATE"}
    text = rendered(found.path)
    for meaning, value in findings(found.prediction):
        assert re.search(rf"{re.escape(meaning)} ?: {value} \(", text), (meaning, value, text)
    dump = run_tool("dsrdump", found.path).stdout
    assert '<CONTAINER:(,,"Imaging Measurement Report")=SEPARATE>' in dump


# --- 3. probabilities as probabilities; certainty only of a finding present ---------------------------


def test_an_absent_finding_carries_no_certainty_and_probabilities_are_named_as_such(
    cases: dict[str, Case],
) -> None:
    """DCM 111012 "Certainty of Finding" is how likely a detected finding is of its stated type:
    never beside an Absent. The model's outputs are stated as what they are, the probability of
    each finding, in the image-level group where highdicom's reader finds them."""
    certainty = key(dicom_codes.DCM.CertaintyOfFinding)
    for case in ("positive", "negative", "triage raised"):
        found = cases[case]
        for item in items(found.dataset):
            if item.ValueType == "CODE" and value_of(item) == key(codes.ABSENT):
                assert certainty not in {name_of(child) for child in items(item)}, case
        for group in found.report.get_image_measurement_groups():
            named = {key(m.name) for m in group.get_measurements()}
            if any(key(e.value) == key(codes.ABSENT) for e in group.get_qualitative_evaluations()):
                assert certainty not in named, case
        (group,) = found.report.get_image_measurement_groups(finding_type=codes.PNEUMONIA)
        measured = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
        prediction = found.prediction
        assert measured[codes.probability_code("pneumonia").meaning] == (
            pytest.approx(100 * prediction.pneumonia_probability, abs=0.006),
            "%",
        )
        for label in prediction.classes:
            if label != prediction.normal_class:
                assert measured[codes.probability_code(label).meaning] == (
                    pytest.approx(100 * prediction.probability(label), abs=0.006),
                    "%",
                ), label


# --- 4. the image-level result is a TID 1501 group, not a whole-image region ---------------------------


@pytest.mark.parametrize("case", ["positive", "negative"])
def test_the_image_level_result_is_a_measurement_group_highdicom_finds_without_a_region(
    cases: dict[str, Case], case: str
) -> None:
    found = cases[case]
    report, prediction = found.report, found.prediction
    source_uid = str(found.source.SOPInstanceUID)
    (group,) = report.get_image_measurement_groups(
        finding_type=codes.PNEUMONIA, referenced_sop_instance_uid=source_uid
    )
    evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    assert evaluations == dict(findings(prediction))
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measured[codes.THRESHOLD_VALUE.meaning] == pytest.approx(
        100 * prediction.operating_point, abs=0.006
    )
    # No region stands for the image: the regions are the lesions, and only they.
    regions = report.get_planar_roi_measurement_groups()
    assert len(regions) == len(prediction.boxes)
    assert report.get_planar_roi_measurement_groups(finding_type=codes.PNEUMONIA) == []
    for region in regions:
        outline = region.roi.value.reshape(-1, 2)
        width, height = outline.max(axis=0) - outline.min(axis=0)
        assert (width, height) != (found.source.Columns, found.source.Rows)


# --- 4b. a single-label model names the most probable type; it decides none ----------------------------


def type_statements(found: Case) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Every coded statement of the report about a pneumonia type: a type stated Present or
    Absent, or named as the most probable one."""
    prediction = found.prediction
    types = {
        key(codes.finding_code(label))
        for label in prediction.classes
        if label != prediction.normal_class
    }
    return [
        (name_of(item), value_of(item))
        for item in items(found.dataset)
        if item.ValueType == "CODE"
        and (name_of(item) in types or name_of(item) == key(codes.MOST_PROBABLE_TYPE))
    ]


def test_a_positive_single_label_report_names_the_most_probable_type_and_states_no_type_absent(
    cases: dict[str, Case],
) -> None:
    """A softmax model decides pneumonia at its operating point and then names the most probable
    pneumonia class (``contract.decide``): no type is decided, so none is stated Absent, and the
    one named is named as the most probable, not Present below the threshold printed beside it."""
    found = cases["positive"]
    prediction = found.prediction
    assert not prediction.multi_label
    types = [label for label in prediction.classes if label != prediction.normal_class]
    # whether or not a type reaches the operating point on its own (the demo model decides
    # that, not the test), no type is stated Present or Absent: the most probable is named
    assert prediction.label == max(types, key=prediction.probability)
    stated = type_statements(found)
    assert key(codes.ABSENT) not in {value for _, value in stated}, stated
    assert key(codes.PRESENT) not in {value for _, value in stated}, stated
    (group,) = found.report.get_image_measurement_groups(finding_type=codes.PNEUMONIA)
    evaluations = [(key(e.name), key(e.value)) for e in group.get_qualitative_evaluations()]
    assert evaluations == [
        (key(codes.PNEUMONIA), key(codes.PRESENT)),
        (key(codes.MOST_PROBABLE_TYPE), key(codes.finding_code(prediction.label))),
    ]
    comment = [
        str(item.TextValue)
        for item in items(found.dataset)
        if item.ValueType == "TEXT" and name_of(item) == key(codes.COMMENT)
    ]
    assert any("most likely" in text for text in comment), comment


@pytest.mark.parametrize("case", ["negative", "not assessed"])
def test_a_report_without_pneumonia_makes_no_type_statement(
    cases: dict[str, Case], case: str
) -> None:
    """Pneumonia Absent is the whole decision (not assessed: no decision at all)."""
    assert type_statements(cases[case]) == []


# --- 5. "not assessed" in DICOM's terms ----------------------------------------------------------------


def summary(found: Case) -> tuple[str, str]:
    """The report-level CAD Processing and Findings Summary (TID 1500 row 12, DCM 111017)."""
    (item,) = [
        item
        for item in items(found.dataset)
        if item.ValueType == "CODE" and name_of(item) == key(codes.CAD_PROCESSING_SUMMARY)
    ]
    return value_of(item)


@pytest.mark.tools
def test_not_assessed_says_no_algorithm_succeeded_in_dicoms_terms(
    cases: dict[str, Case],
) -> None:
    found = cases["not assessed"]
    ds = found.dataset
    coded = {value_of(item) for item in items(ds) if item.ValueType == "CODE"}
    # no equivocal pneumonia: nothing present, absent or indeterminate is said of it
    assert not coded & {key(codes.PRESENT), key(codes.ABSENT), key(dicom_codes.SCT.Indeterminate)}
    assert summary(found) == key(dicom_codes.DCM.NoAlgorithmsSucceededWithoutFindings)
    assert summary(cases["positive"]) == key(dicom_codes.DCM.AllAlgorithmsSucceededWithFindings)
    assert summary(cases["negative"]) == key(dicom_codes.DCM.AllAlgorithmsSucceededWithoutFindings)
    # The image-level group is there, on the source, with the gate's score and no finding.
    (group,) = found.report.get_image_measurement_groups(
        referenced_sop_instance_uid=str(found.source.SOPInstanceUID)
    )
    assert group.finding_type is None and group.get_qualitative_evaluations() == []
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measured[codes.DISTRIBUTION_SCORE.meaning] == pytest.approx(
        found.prediction.ood_score, abs=0.006
    )
    assert found.report.get_planar_roi_measurement_groups() == []
    text = rendered(found.path)
    assert re.search(
        r"CAD Processing and Findings Summary ?: No algorithms succeeded; without findings", text
    ), text


# --- 10. one tracking UID per region, the SR's and the presentation state's -----------------------


def test_regions_are_tracked_by_the_uid_the_presentation_state_can_compute(
    cases: dict[str, Case],
) -> None:
    found = cases["positive"]
    regions = found.report.get_planar_roi_measurement_groups()
    assert [g.tracking_uid for g in regions] == [
        region_tracking_uid(found.identity, i) for i in range(len(found.prediction.boxes))
    ]
    # the key is the region's index and nothing else: another identity, other UIDs
    other = dataclasses.replace(found.identity, source_uid="2.25.1")
    assert region_tracking_uid(other, 0) != region_tracking_uid(found.identity, 0)


# --- 11. an image library; nothing stated that is not known ------------------------------------------


@pytest.mark.parametrize("case", ["positive", "negative", "not assessed"])
def test_the_image_library_names_the_source_and_nothing_unknown_is_stated(
    cases: dict[str, Case], case: str
) -> None:
    found = cases[case]
    ds = found.dataset
    (library,) = [item for item in items(ds) if name_of(item) == key(codes.IMAGE_LIBRARY)]
    images = [item for item in items(library) if item.ValueType == "IMAGE"]
    assert [
        (str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID))
        for image in images
        for ref in image.ReferencedSOPSequence
    ] == [(str(found.source.SOPClassUID), str(found.source.SOPInstanceUID))]
    # A finding site the node does not know is not stated (a box may lie over the abdomen).
    finding_site = key(dicom_codes.SCT.FindingSite)
    assert finding_site not in {name_of(item) for item in items(ds)}
    # No laterality left empty, in the header or the content.
    for element in ds.iterall():
        if "Laterality" in element.keyword:
            assert element.value not in (None, ""), element.keyword
    for item in items(ds):
        if "aterality" in str(item.ConceptNameCodeSequence[0].CodeMeaning):
            assert item.get("ConceptCodeSequence") or item.get("TextValue"), item


# --- 11. the triage flag in standard codes ---------------------------------------------------------


def test_the_triage_flag_is_a_priority_in_snomed_terms(cases: dict[str, Case]) -> None:
    for case, priority in (
        ("triage raised", codes.HIGH_PRIORITY),
        ("triage not raised", codes.NORMAL_PRIORITY),
    ):
        ds = cases[case].dataset
        said = [
            value_of(item)
            for item in items(ds)
            if item.ValueType == "CODE" and name_of(item) == key(codes.PRIORITY)
        ]
        assert said == [key(priority)], case
        assert ("triage", codes.PRIVATE_SCHEME) not in {name_of(item) for item in items(ds)}
    # an image without a triage point says nothing of priority
    assert key(codes.PRIORITY) not in {name_of(item) for item in items(cases["positive"].dataset)}


# --- 12. Comprehensive 3D SR where the destination takes it ----------------------------------------


@pytest.mark.tools
@pytest.mark.parametrize("case", ["positive", "negative", "not assessed"])
def test_both_sr_classes_carry_the_same_report_and_pass_dciodvfy(
    cases: dict[str, Case], case: str, tmp_path: Path
) -> None:
    found = cases[case]
    first = found.dataset
    assert first.SOPClassUID == ComprehensiveSRStorage
    assert first.SOPInstanceUID == found.identity.instance_uid("sr")
    solid = in_sop_class(first, Comprehensive3DSRStorage)
    again = in_sop_class(dcmread(found.path), Comprehensive3DSRStorage)
    assert solid.SOPClassUID == solid.file_meta.MediaStorageSOPClassUID == Comprehensive3DSRStorage
    # one SOP Instance UID names one SOP class: the second form has its own, derived from the first
    assert (
        solid.SOPInstanceUID == again.SOPInstanceUID == solid.file_meta.MediaStorageSOPInstanceUID
    )
    assert solid.SOPInstanceUID == sop_instance_uid_in(
        str(first.SOPInstanceUID), Comprehensive3DSRStorage
    )
    assert solid.SOPInstanceUID != first.SOPInstanceUID
    assert solid.ContentSequence == first.ContentSequence
    for form in (first, solid):
        path = tmp_path / f"{form.SOPClassUID}.dcm"
        form.save_as(path, enforce_file_format=True)
        check = run_tool("dciodvfy", path, check=False)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if "Error" in line]
        assert errors == [], check.stdout + check.stderr


class Peer:
    """A storage SCP on a free loopback port that accepts only ``sop_classes``, and answers
    Study Root C-FIND at IMAGE level about the instances it ``holds``."""

    def __init__(self, sop_classes: tuple[str, ...], holds: tuple[str, ...] = ()) -> None:
        self.stored: list[Dataset] = []
        self.holds, self.asked = set(holds), []
        ae = AE(ae_title="RESULTS")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)],
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        self.stored.append(event.dataset)
        return 0x0000

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        uid = str(event.identifier.SOPInstanceUID)
        self.asked.append(uid)
        if uid in self.holds:
            found = Dataset()
            found.QueryRetrieveLevel, found.SOPInstanceUID = "IMAGE", uid
            yield 0xFF00, found
        yield 0x0000, None


@pytest.mark.parametrize(
    ("accepted", "expected"),
    [
        ((Comprehensive3DSRStorage, ComprehensiveSRStorage), Comprehensive3DSRStorage),
        ((Comprehensive3DSRStorage,), Comprehensive3DSRStorage),
        ((ComprehensiveSRStorage,), ComprehensiveSRStorage),
    ],
    ids=["both", "3d-only", "comprehensive-only"],
)
def test_a_destination_gets_the_3d_sr_where_it_accepts_it_and_the_comprehensive_sr_otherwise(
    cases: dict[str, Case], accepted: tuple[str, ...], expected: str
) -> None:
    found = cases["positive"]
    peer = Peer(accepted)
    try:
        transport = CStoreTransport(
            Destination("RESULTS", "127.0.0.1", peer.port), "DPNODE", None, 10.0
        )
        link = transport.open(ask=False)
        try:
            outcome = link.send([found.path], lambda _: None)[found.path]
        finally:
            link.close()
    finally:
        peer.server.shutdown()
    assert outcome.status is Status.STORED, outcome
    (stored,) = peer.stored
    assert stored.SOPClassUID == expected
    assert stored.SOPInstanceUID == sop_instance_uid_in(found.identity.instance_uid("sr"), expected)
    assert stored.ContentSequence == found.dataset.ContentSequence


def test_a_report_in_doubt_after_a_crash_is_asked_about_in_the_class_it_is_sent_in(
    cases: dict[str, Case], tmp_path: Path
) -> None:
    """The report reached the destination as a Comprehensive 3D SR just before a crash: the
    sender asks about that instance, finds it, and sends nothing again."""
    found = cases["positive"]
    first = found.identity.instance_uid("sr")
    solid = sop_instance_uid_in(first, Comprehensive3DSRStorage)
    peer = Peer((Comprehensive3DSRStorage, ComprehensiveSRStorage), holds=(solid,))
    delivered: list[tuple[str, str | None]] = []
    sender = DestinationSender(
        Destination("RESULTS", "127.0.0.1", peer.port),
        tmp_path / "outbox",
        calling_ae="DPNODE",
        config=OutboxConfig(initial_backoff_s=0.2, max_backoff_s=0.8),
        on_delivered=lambda destination, uid, source, reason: delivered.append((uid, reason)),
        timeout_s=5,
    )
    entry = sender.put(dcmread(found.path), "source")
    assert entry is not None
    sender._sending_marker(entry).touch()  # on the wire when the process died
    sender.start()
    try:
        wait_for(lambda: delivered, 20, "the report in doubt accounted for")
    finally:
        sender.stop()
        peer.server.shutdown()
    assert peer.asked == [solid] and peer.stored == [] and delivered == [(first, None)]


# --- PixelMed's validator ------------------------------------------------------------------------------


PIXELMED_CASES = ("positive", "negative", "not assessed", "triage raised")


@pytest.fixture(scope="module")
def pixelmed_reports(cases: dict[str, Case]) -> dict:
    """PixelMed's report of each case, all in one JVM (building its validator takes seconds)."""
    from validators import pixelmed_sr_all

    found = pixelmed_sr_all([cases[case].path for case in PIXELMED_CASES])
    return {case: found[Path(cases[case].path)] for case in PIXELMED_CASES}


@pytest.mark.tools
@pytest.mark.parametrize("case", PIXELMED_CASES)
def test_pixelmed_finds_nothing_but_what_its_own_templates_lack(
    pixelmed_reports: dict, case: str
) -> None:
    """PixelMed's DicomSRValidator checks the content tree against its copy of PS3.16's
    templates; it finds nothing but the warnings and its own limits that tests/validators.py
    allows, each with its reason (before: NUM properties of the qualitative evaluations, which
    no template has)."""
    check(pixelmed_reports[case])
