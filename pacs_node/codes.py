"""Every coded concept the node writes, in one place (DICOM PS3.16; SNOMED CT, DCM, UCUM).

The Structured Report and the Secondary Capture import their codes from here and nowhere
else. Class labels come from the model's contract; :func:`finding_code` maps each to a
SNOMED CT concept where one exists and to the node's private scheme otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.valuerep import VR

#: Who the node's results say made them (Manufacturer of every object it writes; the screen
#: knows the node's own results by it, and never reads them as radiographs).
MANUFACTURER = "Deep Pneumonia developers"

#: The private coding scheme for labels SNOMED CT has no concept for (PS3.3 8.1: designators
#: beginning with "99" are private).
PRIVATE_SCHEME = "99DPNEU"
#: IHE's scheme for the codes its AI Results profile defines before DICOM assigns them.
IHE_SCHEME = "99IHE"
#: How each private scheme used is identified in the objects (Coding Scheme Identification
#: Sequence, PS3.3 C.12.1.1.4): designator -> (name, responsible organisation).
PRIVATE_SCHEMES = {
    PRIVATE_SCHEME: ("Deep Pneumonia node codes", "Deep Pneumonia project"),
    IHE_SCHEME: ("IHE Radiology codes", "IHE International"),
}

#: Procedure reported: the chest radiograph the findings are about, not the algorithm.
PROCEDURE_CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain chest X-ray")
#: The finding of the image-level group.
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
#: The out-of-distribution score (squared Mahalanobis distance of the model's features), no units.
DISTRIBUTION_SCORE = Code("ood-score", PRIVATE_SCHEME, "Out-of-distribution score")
NO_UNITS = codes.UCUM.NoUnits
#: What the algorithm did, for the whole report (TID 1500 row 13, CID 6047, as the CAD SR
#: templates state it, e.g. TID 4100 Chest CAD): pneumonia found, not found, or the image not
#: assessed at all (outside the model's training distribution: "no algorithms succeeded").
CAD_PROCESSING_SUMMARY = codes.DCM.CADProcessingAndFindingsSummary
WITH_FINDINGS = codes.DCM.AllAlgorithmsSucceededWithFindings
WITHOUT_FINDINGS = codes.DCM.AllAlgorithmsSucceededWithoutFindings
NOT_ASSESSED = codes.DCM.NoAlgorithmsSucceededWithoutFindings
#: The triage flag as a reading priority (SNOMED CT "Priority" with a value from its
#: "Priorities" hierarchy): High priority when the probability of pneumonia reaches the
#: bundle's triage point, Normal priority when it does not.
PRIORITY = Code("260870009", "SCT", "Priority")
HIGH_PRIORITY = Code("394849002", "SCT", "High priority")
NORMAL_PRIORITY = Code("394848005", "SCT", "Normal priority")
PERCENT = codes.UCUM.Percent
REPORT_TITLE = codes.DCM.ImagingMeasurementReport
#: TID 1500 row 6: the container of the measurement groups (viewers draw every group in it).
IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements
#: TID 1500 row 12: the container of the report-level evaluations.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: A free-text remark (TID 1500 row 14; in the image-level group, the verdict in words): why
#: a positive result carries no lesion regions, why an image was not assessed.
COMMENT = codes.DCM.Comment
#: The threshold a decision was taken at (operating point, gate threshold).
THRESHOLD_VALUE = codes.DCM.ThresholdValue
#: TID 1600 Image Library: the source radiograph, and what is known of it (TID 1602).
IMAGE_LIBRARY = codes.DCM.ImageLibrary
IMAGE_LIBRARY_GROUP = codes.DCM.ImageLibraryGroup
SOURCE = Code("260753009", "SCT", "Source")
MODALITY = codes.DCM.Modality
#: The image library's Modality descriptor (CID 29) of the radiographs the node assesses.
MODALITIES = {"CR": codes.cid29.ComputedRadiography, "DX": codes.cid29.DigitalRadiography}
PIXEL_DATA_ROWS, PIXEL_DATA_COLUMNS = codes.DCM.PixelDataRows, codes.DCM.PixelDataColumns
PIXELS = Code("{pixels}", "UCUM", "Pixels")
#: Observer type of the model (TID 1002).
DEVICE = codes.DCM.Device
#: Purpose of Reference of the Contributing Equipment item describing the algorithm: IHE AI
#: Results' "Processing Algorithm" (CID 7005 is extensible; its nearest DCM concept,
#: 109102 "Processing Equipment", does not say that an algorithm made the content).
PROCESSING_ALGORITHM = Code("Newcode1", IHE_SCHEME, "Processing Algorithm")
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment
#: The radiographic view of a source's View Position (PS3.3 C.8.11.5) as CID 4010 "DX View"
#: codes: the overlay's View Code Sequence, the SC IOD's own place for the view (C.8.6.2).
VIEW_CODES: dict[str, Code] = {
    "PA": codes.SCT.PosteroAnterior,
    "AP": codes.SCT.AnteroPosterior,
    "LL": codes.SCT.LeftLateral,
    "RL": codes.SCT.RightLateral,
}

#: SNOMED CT concepts for the class labels the synthetic and Deep Pneumonia datasets use.
CLASS_CODES: dict[str, Code] = {
    "pneumonia": PNEUMONIA,
    "lobar": Code("278516003", "SCT", "Lobar pneumonia"),
    "bronchopneumonia": Code("396285007", "SCT", "Bronchopneumonia"),
    "interstitial": Code("64667001", "SCT", "Interstitial pneumonia"),
}


#: What a single-label (softmax) model names when pneumonia is present: the most probable
#: pneumonia class, valued with that class's code. Not a decision on the type (none is made at
#: an operating point), so never Present or Absent (docs/decisions.md).
MOST_PROBABLE_TYPE = Code("type", PRIVATE_SCHEME, "Most probable pneumonia type")


def finding_code(label: str) -> Code:
    """The coded concept of one of the model's class labels (private scheme when unknown)."""
    key = label.strip().lower()
    if key in CLASS_CODES:
        return CLASS_CODES[key]
    meaning = label.replace("_", " ").strip().capitalize() or "Unnamed class"
    if "pneumonia" not in meaning.lower():
        meaning = f"{meaning} pneumonia"
    return Code(key.replace(" ", "-")[:16] or "unnamed", PRIVATE_SCHEME, meaning[:64])


def region_score_code(label: str) -> Code:
    """The concept of a region's score, named after its finding ("Lobar pneumonia region score").

    A viewer that labels a region from its numbers (OHIF) then shows what was found there.
    """
    return _named_after(label, "rs", "region score")


def probability_code(label: str) -> Code:
    """The concept of the model's probability of finding ``label`` ("Probability of lobar
    pneumonia"): what the model outputs for the image, stated as a probability.

    Not DCM 111012 "Certainty of Finding", which is how likely a finding already detected is
    of its stated type: the model's outputs are probabilities of each finding being present,
    also where it is absent (docs/decisions.md).
    """
    key = label.strip().lower().replace(" ", "-") or "unnamed"
    meaning = finding_code(label).meaning
    return Code(
        f"p-{key}"[:16], PRIVATE_SCHEME, f"Probability of {meaning[:1].lower()}{meaning[1:]}"[:64]
    )


def _named_after(label: str, prefix: str, what: str) -> Code:
    """A private concept about finding ``label``: ``<prefix>-<label>``, "<finding's meaning> <what>"."""
    key = label.strip().lower().replace(" ", "-") or "unnamed"
    return Code(
        f"{prefix}-{key}"[:16], PRIVATE_SCHEME, f"{finding_code(label).meaning} {what}"[:64]
    )


def identify_schemes(dataset: Dataset) -> None:
    """Add a Coding Scheme Identification item for each private scheme ``dataset`` uses."""
    items = []
    for designator in sorted(_designators(dataset) & PRIVATE_SCHEMES.keys()):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName, item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEMES[
            designator
        ]
        items.append(item)
    if items:
        dataset.CodingSchemeIdentificationSequence = Sequence(items)


def _designators(dataset: Dataset) -> set[str]:
    """Every Coding Scheme Designator in ``dataset``, at any depth: a walk through its
    sequences alone (an SR holds a few hundred elements, and ``iterall`` converts and names
    each of them, a millisecond a report)."""
    used: set[str] = set()
    pending = [dataset]
    while pending:
        item = pending.pop()
        if _DESIGNATOR in item:
            used.add(str(item[_DESIGNATOR].value))
        for tag, element in item.items():
            # a raw element read in implicit VR names no VR until converted
            if element.VR in (VR.SQ, None) and item[tag].VR == VR.SQ:
                pending.extend(item[tag].value)
    return used


_DESIGNATOR = Tag("CodingSchemeDesignator")


# --- FHIR: the worklist message (pacs_node.results.worklist) -------------------------------------


class Coding(NamedTuple):
    """A FHIR Coding: the URI of its code system, the code and its display."""

    system: str
    code: str
    display: str


#: The URI FHIR names each coding scheme by, by DICOM designator (FHIR R4 terminologies; DCM:
#: PS3.16 8). The private scheme's URI is this file, where its codes are defined.
FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
    PRIVATE_SCHEME: "https://github.com/deep-pneumonia/deep-pneumonia/blob/main/pacs_node/codes.py",
}
#: What the worklist message reports on: a chest radiograph study, whatever its views (LOINC).
CHEST_XR_STUDY = Code("30745-4", "LN", "XR Chest Views")
#: DiagnosticReport.category: radiology (HL7 v2 table 0074, FHIR R4's diagnostic service sections).
RADIOLOGY = Coding("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")
#: Observation.category: an imaging observation.
IMAGING = Coding("http://terminology.hl7.org/CodeSystem/observation-category", "imaging", "Imaging")
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
#: Observation.interpretation of a finding decided present or absent (an image not assessed
#: has no decision, so no interpretation: its CAD summary says :data:`NOT_ASSESSED`).
POSITIVE = Coding(_INTERPRETATION, "POS", "Positive")
NEGATIVE = Coding(_INTERPRETATION, "NEG", "Negative")
#: The triage flag as the priority a worklist orders by (FHIR request-priority): raised, not
#: raised; the worklist message states :data:`HIGH_PRIORITY` / :data:`NORMAL_PRIORITY` beside it.
URGENT = Coding("http://hl7.org/fhir/request-priority", "urgent", "Urgent")
ROUTINE = Coding("http://hl7.org/fhir/request-priority", "routine", "Routine")
#: The type of an Accession Number identifier (HL7 v2 table 0203): the key a RIS orders by.
ACCESSION = Coding("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID")


def fhir_coding(code: Code) -> Coding:
    """A DICOM coded concept as a FHIR Coding (KeyError for a scheme FHIR has no URI for here)."""
    return Coding(FHIR_SYSTEMS[code.scheme_designator], code.value, code.meaning)
