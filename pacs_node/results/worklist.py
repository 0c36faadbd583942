"""The ``fhir`` output: the worklist message, a FHIR R4 transaction Bundle a RIS or worklist reads.

Why: RIS and worklists read FHIR, not DICOM SR. The message is a DiagnosticReport (status
``preliminary``, LOINC 30745-4 "XR Chest Views", category radiology) about the study, found by its
Study Instance UID and, where the image has one, its Accession Number (the key a RIS orders by),
the image analysed as its key image, and one Observation per statement the SR
(:mod:`pacs_node.results.report`) makes, so that a worklist and a PACS are told the same thing:
the same decision, the same numbers rounded the same way, nothing more (docs/decisions.md, "The
worklist message says what the SR says"):

* pneumonia Present / Absent (interpretation POS / NEG) with the probability of pneumonia and the
  Threshold Value it was decided at, both in percent. A multi-label model: each finding Present /
  Absent with its probability ("Probability of lobar pneumonia"), each decided at its operating
  point. A single-label model decides no type: the probability of each type is a number beside
  pneumonia, and when pneumonia is present one Observation "Most probable pneumonia type" names
  the type with its probability, neither POS nor NEG. Probabilities are named as such, never
  Certainty of Finding. Why a positive result has no regions, as a note;
* the CAD Processing and Findings Summary (DCM 111017): all algorithms succeeded with findings,
  without findings, or, for an image outside the training distribution, no algorithm succeeded
  (DCM 111245). Such an image has no decision, neither Present, Absent nor Indeterminate: the
  summary carries the gate's score and threshold and a note says why;
* the triage flag where the bundle has a triage point and the image was assessed: SNOMED CT
  "Priority", its value FHIR's request-priority (``urgent`` when raised, ``routine`` when not,
  the coding a worklist orders by) with the SR's High / Normal priority beside it, and the
  triage point.

The Observations name the algorithm, a Device (model name, version, Device UID, manufacturer; a
demonstration model says so), and derive from the study and the image.

Exactly once: each resource carries an identifier derived from the source and the model
(:meth:`~pacs_node.results.identity.ResultIdentity.instance_uid`; the Device: the model's Device
UID) and is created with ``ifNoneExist`` on it (FHIR R4 RESTful API, conditional create), all in
one transaction: the same Bundle POSTed again (after a timeout, or a kill -9 between the
server's commit and its answer) creates nothing, and a model's Device is created once for all
its images. The bytes are a function of the image and the model, no clock in them.

No patient identifier is in the message: the RIS knows the patient from the study and its order.
Built as data and validated by fhir.resources' R4B models (R4B changed none of the resources used
here), so a message that is written is a valid one: a missing element, an unknown one or a
value of the wrong form raises, and the image fails with ``worklist-error``.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any, NamedTuple

from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dp_model.serving.contract import ModelContract
from pacs_node import codes
from pacs_node.codes import Coding, fhir_coding
from pacs_node.model.prediction import Prediction
from pacs_node.results.base import FHIR_JSON, Result, ResultContext
from pacs_node.results.identity import ResultIdentity
from pacs_node.status import FailReason

#: What this output's identifiers are derived under.
ROLE = "fhir"
#: A DICOM UID as a FHIR identifier (as FHIR R4 ImagingStudy.identifier): ``urn:oid:<UID>``.
DICOM_UID = "urn:dicom:uid"
#: An OID that names no DICOM object (the report's, the Observations'), as FHIR writes any URI.
OID = "urn:ietf:rfc:3986"

Json = dict[str, Any]


class Finding(NamedTuple):
    """One Observation: what it states, as the SR states it.

    Attributes:
        key: what its identifier is derived under, unique in the message.
        name: what is observed (Observation.code).
        value: the codings of its value, one concept (Observation.valueCodeableConcept).
        numbers: ``(name, value, unit)`` of each number stated with it (Observation.component).
        interpretation: POS / NEG, where the value is a decision on a finding.
        note: a remark in words (why a positive result has no regions, why an image was not
            assessed).
    """

    key: str
    name: Code
    value: tuple[Coding, ...]
    numbers: tuple[tuple[Code, float, Code], ...] = ()
    interpretation: Coding | None = None
    note: str = ""


#: Why an image has no decision, in the words the message uses for it.
NOT_ASSESSED = "Not assessed: the image lies outside the model's training distribution"


def findings(prediction: Prediction) -> list[Finding]:
    """The Observations of one image, in the SR's order: its image-level group's decisions, each
    with the numbers named for it, then its Qualitative Evaluations (TID 1500 row 12).

    An image not assessed has no decision in the SR, so none here: the CAD Processing and
    Findings Summary says so, with the gate's score and threshold, and no priority is stated.
    """
    if not prediction.assessed:
        return [_summary(prediction, _gate(prediction), NOT_ASSESSED)]
    found = (_each_decided(prediction) if prediction.multi_label else _type_chosen(prediction)) + [
        _summary(prediction)
    ]
    if prediction.triage_point is not None:
        found.append(_priority(prediction.triage, prediction.triage_point))
    return found


def _pneumonia(prediction: Prediction, others: tuple[tuple[Code, float], ...] = ()) -> Finding:
    """Pneumonia Present / Absent with its probability and the threshold it was decided at,
    then ``others``: probabilities stated with it, no decision of their own."""
    numbers = (
        (codes.probability_code("pneumonia"), prediction.pneumonia_probability),
        (codes.THRESHOLD_VALUE, prediction.operating_point),
        *others,
    )
    return _decision("pneumonia", codes.PNEUMONIA, prediction.positive, numbers)._replace(
        note=prediction.regions_withheld
    )


def _types(prediction: Prediction) -> list[str]:
    return [label for label in prediction.classes if label != prediction.normal_class]


def _each_decided(prediction: Prediction) -> list[Finding]:
    """A multi-label model: pneumonia and each finding Present / Absent at its operating point."""
    return [
        _pneumonia(prediction),
        *(
            _decision(
                f"class-{label}",
                codes.finding_code(label),
                prediction.present(label),
                ((codes.probability_code(label), prediction.probability(label)),),
            )
            for label in _types(prediction)
        ),
    ]


def _type_chosen(prediction: Prediction) -> list[Finding]:
    """A single-label model: pneumonia Present / Absent, with the probability of each type
    beside it, and when present the most probable type with its probability (as the SR's
    "Most probable pneumonia type"): a type is chosen, not decided, so none is POS or NEG."""
    chosen = prediction.most_probable_type
    others = tuple(
        (codes.probability_code(label), prediction.probability(label))
        for label in _types(prediction)
        if label != chosen
    )
    found = [_pneumonia(prediction, others)]
    if chosen is not None:
        number = (codes.probability_code(chosen), 100.0 * prediction.probability(chosen))
        found.append(
            Finding(
                "type",
                codes.MOST_PROBABLE_TYPE,
                (fhir_coding(codes.finding_code(chosen)),),
                ((*number, codes.PERCENT),),
            )
        )
    return found


def _decision(
    key: str, name: Code, present: bool, fractions: tuple[tuple[Code, float], ...]
) -> Finding:
    """Present / Absent, with the probabilities (and threshold) named for it, in percent."""
    return Finding(
        key,
        name,
        (fhir_coding(codes.PRESENT if present else codes.ABSENT),),
        tuple((number, 100.0 * fraction, codes.PERCENT) for number, fraction in fractions),
        codes.POSITIVE if present else codes.NEGATIVE,
    )


def _summary(
    prediction: Prediction, numbers: tuple[tuple[Code, float, Code], ...] = (), note: str = ""
) -> Finding:
    """What the algorithm did (DCM 111017, CID 6047, as the SR's row 12 states it): with
    findings, without findings, or no algorithm succeeded (the image was not assessed)."""
    if not prediction.assessed:
        summary = codes.NOT_ASSESSED
    else:
        summary = codes.WITH_FINDINGS if prediction.positive else codes.WITHOUT_FINDINGS
    return Finding(
        "summary", codes.CAD_PROCESSING_SUMMARY, (fhir_coding(summary),), numbers, note=note
    )


def _priority(raised: bool, triage_point: float) -> Finding:
    """The triage flag as the SR's SNOMED CT Priority and as the FHIR request-priority a
    worklist orders by (the first coding), with the triage point it was decided at."""
    if raised:
        value = (codes.URGENT, fhir_coding(codes.HIGH_PRIORITY))
    else:
        value = (codes.ROUTINE, fhir_coding(codes.NORMAL_PRIORITY))
    threshold = ((codes.THRESHOLD_VALUE, 100.0 * triage_point, codes.PERCENT),)
    return Finding("priority", codes.PRIORITY, value, threshold)


def _gate(prediction: Prediction) -> tuple[tuple[Code, float, Code], ...]:
    """The out-of-distribution score and the gate's threshold (no units), where numbers."""
    values = [
        (codes.DISTRIBUTION_SCORE, prediction.ood_score),
        (codes.THRESHOLD_VALUE, prediction.ood_threshold),
    ]
    return tuple(
        (name, value, codes.NO_UNITS)
        for name, value in values
        if value is not None and math.isfinite(value)
    )


def build_bundle(
    source: Dataset, prediction: Prediction, model: ModelContract, identity: ResultIdentity
) -> Bundle:
    """The worklist message of one image: the Device, the Observations, the DiagnosticReport."""
    about = _about(source)
    device = _device(model)
    stated = findings(prediction)
    uids = [identity.instance_uid(f"{ROLE}-{finding.key}") for finding in stated]
    observations = [
        _observation(finding, uid, _full_url(model.device_uid), about)
        for finding, uid in zip(stated, uids)
    ]
    report = _report(source, prediction, model, identity, [_full_url(uid) for uid in uids])
    entries = [_entry(device), *map(_entry, observations), _entry(report)]
    return Bundle.model_validate(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    )


def _about(source: Dataset) -> Json:
    """What every resource is about: the study, the image analysed, the day it was taken."""
    study, image = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
    found: Json = {
        "study": {"type": "ImagingStudy", "identifier": _identifier(DICOM_UID, study)},
        "image": {"type": "Media", "identifier": _identifier(DICOM_UID, image)},
    }
    day = _date(source.get("StudyDate"))
    return found | ({"effectiveDateTime": day} if day else {})


def _date(value: object) -> str:
    """A DICOM DA (``YYYYMMDD``) as a FHIR date; empty when it is not one. A date alone: the
    time of a DICOM study has no time zone, which a FHIR dateTime with a time must have."""
    try:
        return datetime.strptime(str(value or ""), "%Y%m%d").date().isoformat()
    except ValueError:
        return ""


def _device(model: ModelContract) -> Json:
    """The algorithm, once per set of weights (its Device UID)."""
    device: Json = {
        "resourceType": "Device",
        "identifier": [_identifier(DICOM_UID, model.device_uid)],
        "manufacturer": codes.MANUFACTURER,
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "type": {"text": "AI pneumonia detection algorithm"},
        "version": [{"value": model.version}],
    }
    if model.demo:
        device["note"] = [
            {"text": "Demonstration model trained on synthetic images: not for clinical use."}
        ]
    return device


def _observation(finding: Finding, uid: str, device_url: str, about: Json) -> Json:
    observation: Json = {
        "resourceType": "Observation",
        "identifier": [_identifier(OID, uid)],
        "status": "preliminary",
        "category": [{"coding": [_coding(codes.IMAGING)]}],
        "code": {"coding": [_coding(fhir_coding(finding.name))], "text": finding.name.meaning},
        "device": {"reference": device_url},
        "derivedFrom": [about["study"], about["image"]],
        "valueCodeableConcept": {"coding": [_coding(coding) for coding in finding.value]},
    }
    if "effectiveDateTime" in about:
        observation["effectiveDateTime"] = about["effectiveDateTime"]
    if finding.interpretation is not None:
        observation["interpretation"] = [{"coding": [_coding(finding.interpretation)]}]
    if finding.numbers:
        observation["component"] = [_component(*number) for number in finding.numbers]
    if finding.note:
        observation["note"] = [{"text": finding.note}]
    return observation


def _component(name: Code, value: float, unit: Code) -> Json:
    """A number, rounded as the SR rounds it, in UCUM."""
    return {
        "code": {"coding": [_coding(fhir_coding(name))]},
        "valueQuantity": {
            "value": round(float(value), 2),
            "unit": unit.value,
            "system": codes.FHIR_SYSTEMS["UCUM"],
            "code": unit.value,
        },
    }


def _report(
    source: Dataset,
    prediction: Prediction,
    model: ModelContract,
    identity: ResultIdentity,
    results: list[str],
) -> Json:
    about = _about(source)
    report: Json = {
        "resourceType": "DiagnosticReport",
        "identifier": [_identifier(OID, identity.instance_uid(ROLE))],
        "status": "preliminary",
        "category": [{"coding": [_coding(codes.RADIOLOGY)]}],
        "code": {"coding": [_coding(fhir_coding(codes.CHEST_XR_STUDY))]},
        "result": [{"reference": url} for url in results],
        "imagingStudy": [about["study"]],
        "media": [{"comment": "The radiograph analysed", "link": about["image"]}],
        "conclusion": conclusion(prediction, model),
    }
    accession = str(source.get("AccessionNumber", "") or "").strip()
    if accession:
        order = {"type": {"coding": [_coding(codes.ACCESSION)]}, "value": accession}
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": order}]
    if "effectiveDateTime" in about:
        report["effectiveDateTime"] = about["effectiveDateTime"]
    if prediction.positive:
        concluded = [
            codes.PNEUMONIA,
            *(codes.finding_code(label) for label, _ in prediction.findings),
        ]
        unique = list(dict.fromkeys(fhir_coding(code) for code in concluded))
        report["conclusionCode"] = [{"coding": [_coding(coding)]} for coding in unique]
    return report


def conclusion(prediction: Prediction, model: ModelContract) -> str:
    """The result in one sentence a worklist shows, with the numbers the Observations state."""
    demo = "DEMONSTRATION model trained on synthetic images. " if model.demo else ""
    if not prediction.assessed:
        said = NOT_ASSESSED
    else:
        said = (
            f"Pneumonia {'present' if prediction.positive else 'absent'}"
            f" (probability {100.0 * prediction.pneumonia_probability:.2f} %,"
            f" decided at {100.0 * prediction.operating_point:.2f} %)"
        )
        chosen = prediction.most_probable_type
        if chosen is not None:
            meaning = codes.finding_code(chosen).meaning
            said += (
                f", most likely {meaning[:1].lower()}{meaning[1:]}"
                f" ({100.0 * prediction.probability(chosen):.2f} %)"
            )
        elif prediction.positive:
            said += ": " + ", ".join(
                codes.finding_code(label).meaning for label, _ in prediction.findings
            )
        if prediction.triage_point is not None:
            said += (
                f". Triage priority {'urgent' if prediction.triage else 'routine'}"
                f" (flagged at {100.0 * prediction.triage_point:.2f} %)"
            )
    return (
        f"{demo}{said}. Preliminary result of {model.name} {model.version},"
        " not verified by a radiologist; not for primary diagnosis."
    )


def _identifier(system: str, uid: str) -> Json:
    return {"system": system, "value": f"urn:oid:{uid}"}


def _coding(coding: Coding) -> Json:
    return {"system": coding.system, "code": coding.code, "display": coding.display}


def _full_url(uid: str) -> str:
    """The resource's name inside the Bundle, which the server replaces by its own id
    (FHIR R4 Bundle.entry.fullUrl): a UUID derived from the identifier, so stable too."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, uid)}"


def _entry(resource: Json) -> Json:
    """A conditional create: POST, unless a resource with this identifier exists."""
    (identifier,) = resource["identifier"]
    uid = identifier["value"].removeprefix("urn:oid:")
    return {
        "fullUrl": _full_url(uid),
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}",
        },
    }


class WorklistWriter:
    """The ``fhir`` output: the worklist message of one image (FHIR R4 transaction Bundle)."""

    media_type = FHIR_JSON
    kind, label, role, fail_reason = "fhir", "FHIR", ROLE, FailReason.WORKLIST

    def build(self, context: ResultContext) -> Result:
        bundle = build_bundle(context.source, context.prediction, context.model, context.identity)
        return Result(
            kind=self.kind,
            label=self.label,
            uid=context.identity.instance_uid(ROLE),
            data=bundle.model_dump_json().encode(),
            media_type=FHIR_JSON,
            suffix=".fhir.json",
        )
