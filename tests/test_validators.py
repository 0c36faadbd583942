"""Every DICOM object the node writes passes the real validators (tests/validators.py).

PixelMed's DicomSRValidator checks the SR's content against PS3.16, dciodvfy each object
against its IOD, dcentvfy the source and its results together (patient, study: the same
values). Passing means no error and no warning but those in :data:`ALLOWED_WARNINGS`, each
listed with why it stays: a new warning fails.

Four sources, sent to a real node on loopback that writes ``sr``, ``sc`` and ``gsps``:

* ``rg1``: RG1_UNCR.dcm as it is (a real PA chest CR, 15 bits, MONOCHROME1, ISO_IR 100).
* ``latin1``: RG1 with non-ASCII letters in Patient's Name, in its ISO_IR 100 character set.
* ``voilut``: RG1 with a vendor's VOI LUT Sequence (a sigmoid) instead of its window.
* ``lossy``: RG1 compressed to JPEG baseline by dcmcjpeg (8 bits, Lossy Image Compression 01,
  DERIVED, its own SOP Instance UID and a Source Image Sequence, as a device would).

Two answers for each (:class:`Scripted`): ``positive`` (the demo model's own heat map, a clear
pneumonia and one region) and ``not_assessed`` (the out-of-distribution gate closed).

What a validator says today that a writer has to change is listed in :data:`TODAY`: those
cases are ``xfail(strict=True)`` and fail as xfail only when the validator says exactly that
(:class:`KnownProblem`); any other finding fails them outright, and once the writer is fixed
they pass, which fails them as XPASS until the entry goes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from helpers import data_file, run_tool
from node_support import final_lines, send_files, start_node, wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from validators import KnownProblem, Report, check, dcentvfy, dciodvfy, pixelmed_sr_all

from pacs_node.model.predictor import NodePredictor, Prediction, Prepared
from pacs_node.status import StoreStatus

pytestmark = [pytest.mark.tools, pytest.mark.slow]

SOURCES = ("rg1", "latin1", "voilut", "lossy")
CASES = ("positive", "not_assessed")
KINDS = ("SR", "SC", "PR")
#: Patient's Name of the latin1 source: letters ISO_IR 100 has and ASCII has not.
LATIN1_NAME = "Müller^Zoë"

#: What each validator says today that a writer must change, by (validator, kind, source or *):
#: the lines (``*`` as in ALLOWED_WARNINGS) that make those cases xfail.
TODAY: dict[tuple[str, str], list[str]] = {}


def params(validator: str, kinds: tuple[str | None, ...] = (None,)) -> list:
    """Every source and answer (and kind), xfail where :data:`TODAY` lists the validator's lines."""
    found = []
    for source in SOURCES:
        for case in CASES:
            for kind in kinds:
                known = next(
                    (
                        TODAY[validator, key]
                        for key in (kind, source, "*")
                        if (validator, key) in TODAY
                    ),
                    None,
                )
                marks = (
                    [pytest.mark.xfail(strict=True, raises=KnownProblem, reason="; ".join(known))]
                    if known
                    else []
                )
                values = (source, case, kind, known) if kind else (source, case, known)
                found.append(pytest.param(*values, marks=marks, id="-".join(values[:-1])))
    return found


# --- the sources and the node's results ------------------------------------------------------------


def build_sources(folder: Path) -> dict[str, Path]:
    """The four sources (module docstring); each but rg1 in a study of its own."""
    folder.mkdir(parents=True)
    rg1 = data_file("RG1_UNCR.dcm")
    plain = variant(rg1, folder / "plain.dcm", "lossy")
    run_tool("dcmcjpeg", "+eb", plain, folder / "lossy.dcm")  # IJG quality 90
    return {
        "rg1": rg1,
        "latin1": variant(rg1, folder / "latin1.dcm", "latin1", PatientName=LATIN1_NAME),
        "voilut": variant(rg1, folder / "voilut.dcm", "voilut", vendor_voi_lut),
        "lossy": folder / "lossy.dcm",
    }


def variant(rg1: Path, path: Path, name: str, change=None, **attributes) -> Path:
    """RG1 with new study, series and instance UIDs (derived from ``name``) and the changes given."""
    ds = dcmread(rg1)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(entropy_srcs=["dp-validators", name, level])
        for level in ("study", "series", "image")
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if change is not None:
        change(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def vendor_voi_lut(ds: Dataset) -> None:
    """A vendor's VOI LUT (PS3.3 C.11.2) in place of the window: a sigmoid over the 15-bit range."""
    del ds.WindowCenter, ds.WindowWidth
    stored = np.arange(2**ds.BitsStored, dtype=np.float64)
    lut = 65535 / (1 + np.exp(-(stored - 15000) / 5000))
    item = Dataset()
    item.LUTDescriptor = [len(stored), 0, 16]
    item.LUTExplanation = "VENDOR SIGMOID"
    # 64 KiB of entries: as OW, since an explicit-VR US value's length is 16 bits
    item.add_new(0x00283006, "OW", lut.round().astype("<u2").tobytes())
    ds.VOILUTSequence = [item]


class Scripted:
    """The demo model's answers with the decision the test asks for, whatever the image.

    ``positive``: its own heat map, a clear first pneumonia class and one region, its
    out-of-distribution gate passed (RG1 lies far outside the phantoms it was trained on).
    ``not_assessed``: its gate closed.
    """

    def __init__(self, inner: NodePredictor, case: str) -> None:
        self.inner, self.contract, self.case = inner, inner.contract, case

    def predict(self, prepared: list[Prepared]) -> list[Prediction]:
        answers = self.inner.predict(prepared)
        return [self._scripted(p, item) for p, item in zip(answers, prepared, strict=True)]

    def _scripted(self, prediction: Prediction, item: Prepared) -> Prediction:
        threshold = 1.0 if prediction.ood_threshold is None else prediction.ood_threshold
        if self.case == "not_assessed":
            return replace(prediction, ood_score=2 * threshold + 1, ood_threshold=threshold)
        classes, normal = prediction.classes, prediction.normal_class
        findings = [label for label in classes if label != normal]
        # pneumonia 0.99: positive at any operating point a bundle may choose below it
        chances = {label: 0.3 / (len(findings) - 1) for label in findings[1:]}
        chances |= {findings[0]: 0.69, normal: 0.01}
        rows, columns = item.source_shape
        box = np.array([[0.2 * columns, 0.3 * rows, 0.45 * columns, 0.6 * rows]], np.float32)
        scripted = replace(
            prediction,
            probabilities=np.array([chances[label] for label in classes]),
            boxes=box,
            box_scores=(0.83,),
            regions_withheld="",
            ood_score=0.0,
            ood_threshold=threshold,
        )
        assert scripted.positive
        return scripted


@dataclass(frozen=True)
class Objects:
    """One source and what the node wrote for it."""

    source: Path
    SR: Path
    SC: Path
    PR: Path


def results_of(folder: Path, predictor: Scripted, sources: dict[str, Path]) -> dict[str, Objects]:
    """Send every source to a node on loopback writing sr, sc and gsps; its results by source."""
    node = start_node(folder, predictor, outputs=("sr", "sc", "gsps"))
    try:
        statuses = send_files(node.port, list(sources.values()))
        assert statuses == [StoreStatus.SUCCESS] * len(sources)
        wait_for(lambda: len(final_lines(node)) == len(sources), 120, "every source's outcome")
    finally:
        node.stop()
    assert [line["status"] for line in final_lines(node)] == ["processed"] * len(sources)
    found = {}
    for name, path in sources.items():
        study = dcmread(path, stop_before_pixels=True).StudyInstanceUID
        files = {p.name.split(".")[0]: p for p in (folder / "out" / study).glob("*.dcm")}
        assert sorted(files) == sorted(KINDS), files
        found[name] = Objects(source=path, **files)
    return found


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("validators")


@pytest.fixture(scope="module")
def sources(folder: Path) -> dict[str, Path]:
    return build_sources(folder / "sources")


@pytest.fixture(scope="module")
def objects(
    folder: Path, sources: dict[str, Path], predictor: NodePredictor
) -> dict[tuple[str, str], Objects]:
    """Every source's results for both answers, from one node per answer."""
    found = {}
    for case in CASES:
        for name, written in results_of(folder / case, Scripted(predictor, case), sources).items():
            found[name, case] = written
    return found


@pytest.fixture(scope="module")
def broken_sr(folder: Path, objects: dict[tuple[str, str], Objects]) -> Path:
    """rg1's positive SR without its Device Observer UID (TID 1004 row 1, mandatory)."""
    sr = dcmread(objects["rg1", "positive"].SR)
    sr.ContentSequence = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue != "121012"
    ]
    sr.save_as(folder / "broken_sr.dcm")
    return folder / "broken_sr.dcm"


@pytest.fixture(scope="module")
def pixelmed(
    objects: dict[tuple[str, str], Objects], broken_sr: Path, sources: dict[str, Path]
) -> dict[Path, Report]:
    """PixelMed's report on every SR, the broken one and a radiograph (one JVM for them all)."""
    return pixelmed_sr_all([o.SR for o in objects.values()] + [broken_sr, sources["rg1"]])


# --- the node's objects ----------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "case", "known"), params("pixelmed"))
def test_pixelmed_finds_the_report_valid(
    source: str, case: str, known, objects, pixelmed: dict[Path, Report]
) -> None:
    check(pixelmed[objects[source, case].SR], known)


@pytest.mark.parametrize(("source", "case", "kind", "known"), params("dciodvfy", KINDS))
def test_dciodvfy_finds_each_object_valid(
    source: str, case: str, kind: str, known, objects
) -> None:
    check(dciodvfy(getattr(objects[source, case], kind)), known)


@pytest.mark.parametrize(("source", "case", "known"), params("dcentvfy"))
def test_dcentvfy_finds_the_source_and_its_results_consistent(
    source: str, case: str, known, objects
) -> None:
    written = objects[source, case]
    check(dcentvfy([written.source, written.SR, written.SC, written.PR]), known)


def test_the_sources_are_what_they_claim_and_add_no_error_to_rg1s(sources) -> None:
    read = {name: dcmread(path, stop_before_pixels=True) for name, path in sources.items()}
    latin1 = read["latin1"]
    assert latin1.SpecificCharacterSet == "ISO_IR 100" and latin1.PatientName == LATIN1_NAME
    assert "ü".encode("latin-1") in Path(sources["latin1"]).read_bytes()
    voi = read["voilut"]
    assert "WindowCenter" not in voi and voi.VOILUTSequence[0].LUTDescriptor == [2**15, 0, 16]
    lossy = read["lossy"]
    assert lossy.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert lossy.LossyImageCompression == "01" and lossy.ImageType[0] == "DERIVED"
    # RG1's own errors (its Pixel Spacing of 0\0), and no other
    rg1_errors = dciodvfy(sources["rg1"]).errors
    assert rg1_errors and all(dciodvfy(path).errors == rg1_errors for path in sources.values())


# --- each validator can fail -------------------------------------------------------------------------


def test_pixelmed_reports_a_missing_mandatory_item(pixelmed, broken_sr: Path) -> None:
    report = pixelmed[broken_sr]
    assert any(
        'DeviceObserverIdentifyingAttributes/[Row 1] UIDREF (121012,DCM,"Device Observer UID")'
        in line
        and line.endswith("Missing required content item")
        for line in report.errors
    ), report


def test_pixelmed_reports_an_object_it_cannot_check(pixelmed, sources) -> None:
    # a radiograph is no SR: PixelMed prints no error of its own, the report has one
    assert any("IOD (SOP Class) unrecognized" in line for line in pixelmed[sources["rg1"]].errors)


def test_dciodvfy_reports_a_missing_type_1_attribute(objects, tmp_path: Path) -> None:
    sc = dcmread(objects["rg1", "positive"].SC)
    del sc.ConversionType
    sc.save_as(tmp_path / "sc.dcm")
    assert dciodvfy(tmp_path / "sc.dcm").errors == [
        "Error - Missing attribute Type 1 Required Element=<ConversionType> Module=<SCEquipment>"
    ]


def test_dciodvfy_reports_a_file_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"not a DICOM file\n" * 8)
    assert dciodvfy(tmp_path / "junk.dcm").errors
    missing = dciodvfy(tmp_path / "missing.dcm").errors
    assert missing[0].startswith("Abort - File open for read failed"), missing


def test_dcentvfy_reports_two_files_that_disagree_on_the_patient(objects, tmp_path: Path) -> None:
    written = objects["rg1", "positive"]
    sc = dcmread(written.SC)
    sc.PatientName = "Other^Patient"
    sc.save_as(tmp_path / "sc.dcm")
    errors = dcentvfy([written.source, tmp_path / "sc.dcm"]).errors
    assert len(errors) == 1 and errors[0].startswith(
        "Error - String attribute has different value - Element=<PatientName> IE=<Patient>"
    ), errors


def test_a_warning_not_allowed_fails_and_a_known_problem_is_only_itself() -> None:
    allowed = (
        "Warning - Different information entities for attribute - Element=<AccessionNumber> IE"
        " <Series> versus <Study> for file <a.dcm> versus <b.dcm>"
    )
    new = (
        "Warning - Attribute is not present in standard DICOM IOD - (0x0008,0x0080) LO Institution"
    )
    check(Report("dcentvfy", "a.dcm b.dcm", warnings=[allowed]))
    with pytest.raises(AssertionError, match="Institution"):
        check(Report("dciodvfy", "a.dcm", warnings=[allowed, new]))
    with pytest.raises(KnownProblem):
        check(Report("dciodvfy", "a.dcm", warnings=[new]), known=[new])
    with pytest.raises(AssertionError, match="Error - other"):  # not xfail: another problem
        check(Report("dciodvfy", "a.dcm", errors=["Error - other"], warnings=[new]), known=[new])
