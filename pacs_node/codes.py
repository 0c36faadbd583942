"""Every coded concept the node writes, in one place (DICOM PS3.16; SNOMED CT, DCM, UCUM).

The Structured Report and the Secondary Capture import their codes from here and nowhere
else. Class labels come from the model's contract; :func:`finding_code` maps each to a
SNOMED CT concept where one exists and to the node's private scheme otherwise.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

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
FINDING = codes.DCM.Finding
FINDING_SITE_LUNG = codes.SCT.Lung
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
#: The presence of pneumonia in an image the model did not assess (outside its training distribution).
INDETERMINATE = codes.SCT.Indeterminate
YES, NO = codes.SCT.Yes, codes.SCT.No
#: Whether the image lies within the model's training distribution (Yes / No): an image
#: outside it is not assessed, and the report says so in codes, not in free text alone.
WITHIN_DISTRIBUTION = Code(
    "in-distribution", PRIVATE_SCHEME, "Image within the model's training distribution"
)
#: The out-of-distribution score (squared Mahalanobis distance of the model's features), no units.
DISTRIBUTION_SCORE = Code("ood-score", PRIVATE_SCHEME, "Out-of-distribution score")
NO_UNITS = codes.UCUM.NoUnits
#: Raised (Yes) when the probability of pneumonia reaches the bundle's triage operating point.
TRIAGE_FLAG = Code("triage", PRIVATE_SCHEME, "Triage priority flag")
#: The score: "Certainty of Finding". DCM 111047 ("Probability of cancer") is wrong here.
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding
PERCENT = codes.UCUM.Percent
REPORT_TITLE = codes.DCM.ImagingMeasurementReport
#: TID 1500 row 6: the container of the measurement groups (viewers draw every group in it).
IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements
#: TID 1500 row 12: the container of the image-level classification.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: A free-text remark in the Qualitative Evaluations (TID 1500 row 14, TEXT): why a positive
#: result carries no lesion regions.
COMMENT = codes.DCM.Comment
#: The threshold a decision was taken at (operating point, triage point, gate threshold).
THRESHOLD_VALUE = codes.DCM.ThresholdValue
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


def image_score_code(label: str) -> Code:
    """The concept of the image-level certainty shown on the image, named after its finding
    ("Pneumonia certainty (image)"): the number Certainty of Finding states in the classification."""
    return _named_after(label, "is", "certainty (image)")


def _named_after(label: str, prefix: str, what: str) -> Code:
    """A private concept about finding ``label``: ``<prefix>-<label>``, "<finding's meaning> <what>"."""
    key = label.strip().lower().replace(" ", "-") or "unnamed"
    return Code(
        f"{prefix}-{key}"[:16], PRIVATE_SCHEME, f"{finding_code(label).meaning} {what}"[:64]
    )


def identify_schemes(dataset: Dataset) -> None:
    """Add a Coding Scheme Identification item for each private scheme ``dataset`` uses."""
    used = {
        str(element.value)
        for element in dataset.iterall()
        if element.keyword == "CodingSchemeDesignator"
    }
    items = []
    for designator in sorted(used & PRIVATE_SCHEMES.keys()):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName, item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEMES[
            designator
        ]
        items.append(item)
    if items:
        dataset.CodingSchemeIdentificationSequence = Sequence(items)
