"""Tolerant reading, strict writing: what real sources hold, and what the outputs may carry.

Reading: :func:`text`, :func:`number` and :func:`integer` (from :mod:`dp_transforms.header`,
shared with the pixel pipeline) read an attribute whatever its value is (a wrong VR,
several values, raw bytes, text where a number belongs) and answer None or "" rather
than raise.

Writing: :func:`clean_source` builds, from a received data set, the only data set the
writers (SR and SC) see: the patient, study and equipment attributes they copy and the
identifiers they reference, each copied when valid for its VR, fixed when a known legacy
form says what was meant (``1945-01-01``, ``10:15:00``, ``female``, ``61 years``), and left
empty (Type 2) or out (Type 3) otherwise. Sequences are left out. What was changed is
reported by keyword, never by value.

A source UID that is not valid, or missing, is replaced by a derived one, the same every
time (:func:`source_uid`), and never shared by two patients: the patient's identifiers go
into every derivation. An invalid Study Instance UID becomes one derived study per patient,
so the results of that patient's images still share one study; a missing one becomes one
study per source image, since nothing says which images belong together. A constant
stand-in would put every patient's results without a Study Instance UID into one study.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import validate_value

from dp_transforms.header import integer, number, text, texts, values
from pacs_node.charsets import character_set_for, text_values
from pacs_node.uids import derived_uid, is_valid_uid

__all__ = [
    "Cleaned",
    "clean_source",
    "derived_uid",
    "integer",
    "is_valid_uid",
    "number",
    "output_uid",
    "source_uid",
    "text",
    "texts",
    "values",
]

#: Control characters a kept value may not hold (PS3.5 6.1.2.3): every C0 and C1 control but
#: ESC (ISO 2022 names need it); text VRs keep TAB, LF, FF and CR as well.
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f-\x9f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f]")
_LONG_TEXT_VRS = ("LT", "ST", "UT")
_TEXT_VRS = {
    "AE": 16,
    "CS": 16,
    "LO": 64,
    "SH": 16,
    "LT": 10240,
    "ST": 1024,
    "UT": 2**32 - 2,
    "UC": 2**32 - 2,
}
_NUMERIC_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV")

#: Patient, study and equipment attributes the writers copy from the source (highdicom's
#: Patient, General Study and Patient Study modules, and the acquisition equipment).
COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "QualityControlSubject",
    "OtherPatientNames",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "ConsultingPhysicianName",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "StudyID",
    "RequestingService",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientBodyMassIndex",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientSexNeutered",
    "ReasonForVisit",
    "AdmissionID",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "PatientState",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "Laterality",
    "ImageLaterality",
)
#: Type 2 attributes of the outputs: present, empty when the source has no valid value.
TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: What tells one patient from another, as the source has it: every UID the node derives
#: for a source includes these, so that a derived study never holds two patients.
PATIENT_KEYS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate")
#: Enumerated values (PS3.3) of the coded attributes copied; anything else is left out.
ENUMERATED = {
    "PatientSex": ("M", "F", "O"),
    "QualityControlSubject": ("YES", "NO"),
    "PatientIdentityRemoved": ("YES", "NO"),
    "SmokingStatus": ("YES", "NO", "UNKNOWN"),
    "PatientSexNeutered": ("ALTERED", "UNALTERED"),
    "Laterality": ("R", "L"),
    "ImageLaterality": ("R", "L", "U", "B"),
    "TypeOfPatientID": ("TEXT", "RFID", "BARCODE"),
}
#: Words legacy systems write for the patient's sex.
SEX_WORDS = {"MALE": "M", "MAN": "M", "H": "M", "FEMALE": "F", "WOMAN": "F", "W": "F", "OTHER": "O"}
PATIENT_ORIENTATION = re.compile(r"^[APLRHF]{1,3}$")


# --- UIDs --------------------------------------------------------------------------------------------


def output_uid(value: object, role: str) -> str:
    """``value`` when it is a valid UID (padding removed), else a UID derived from it."""
    raw = "" if value is None else str(value)
    stripped = raw.strip(" \x00")
    return stripped if is_valid_uid(stripped) else derived_uid("invalid source UID", role, raw)


def source_uid(ds: Dataset, keyword: str) -> tuple[str, str]:
    """The UID the outputs carry for the source's ``keyword``, and how it was had: ``""`` (the
    source's own, padding removed), ``"invalid"`` or ``"missing"`` (derived; see the module).

    A derived UID is a function of the patient's identifiers as well, so two patients never
    share one; a missing one also of the source's other UIDs, so each image gets its own.
    """
    raw = _raw_text(ds, keyword)
    stripped = raw.strip(" \x00")
    if is_valid_uid(stripped):
        return stripped, ""
    patient = [_raw_text(ds, key) for key in PATIENT_KEYS]
    if stripped:
        return derived_uid("invalid source UID", keyword, raw, *patient), "invalid"
    return derived_uid(
        "missing source UID", keyword, *(_raw_text(ds, key) for key in UIDS), *patient
    ), "missing"


# --- strict writing -------------------------------------------------------------------------------------


@dataclass
class Cleaned:
    """The data set the writers may read, and what was changed on the way (keywords only;
    a derived UID's keyword says how: ``StudyInstanceUID (missing)``, ``(invalid)``)."""

    dataset: Dataset
    fixed: list[str] = field(default_factory=list)
    emptied: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        """A one-line account without values, for the audit trail."""
        parts = [
            f"{what}: {', '.join(keywords)}"
            for what, keywords in (
                ("fixed", self.fixed),
                ("left empty", self.emptied),
                ("derived UIDs", self.derived),
            )
            if keywords
        ]
        return "; ".join(parts)


def clean_source(ds: Dataset) -> Cleaned:
    """What the SR and SC writers may copy from ``ds``: valid values only (see the module)."""
    clean = Cleaned(Dataset())
    out = clean.dataset
    out.SOPClassUID = str(ds.get("SOPClassUID", "")).strip(" \x00")
    for keyword in UIDS:
        uid, how = source_uid(ds, keyword)
        out.add(DataElement(Tag(keyword), "UI", uid))
        if how:
            clean.derived.append(f"{keyword} ({how})")
    for keyword in COPIED:
        _copy(ds, out, keyword, clean)
    for keyword in TYPE_2:
        if keyword not in out:
            out.add(DataElement(Tag(keyword), dictionary_VR(Tag(keyword)), None))
    out.InstanceNumber = (
        integer(ds, "InstanceNumber") if 0 <= (integer(ds, "InstanceNumber") or -1) < 2**31 else 1
    )
    # What makes it a source image for highdicom's references (the pixels were read with these).
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PixelRepresentation"):
        value = integer(ds, keyword)
        if value is not None and 0 <= value < 2**16:
            setattr(out, keyword, value)
    out.Modality = _code_string(text(ds, "Modality")) or "" if text(ds, "Modality") else ""
    orientation = [v for v in texts(ds, "PatientOrientation") if PATIENT_ORIENTATION.match(v)]
    if len(orientation) == 2:
        out.PatientOrientation = orientation
    _character_set(out, ds)
    return clean


def _raw_text(ds: Dataset, keyword: str) -> str:
    found = values(ds, keyword)
    return "\\".join(str(v) for v in found)


def _copy(source: Dataset, out: Dataset, keyword: str, clean: Cleaned) -> None:
    tag = Tag(keyword)
    try:
        element = source[tag]
    except Exception:  # noqa: BLE001 - absent, or unreadable: the same for the output
        return
    vr = dictionary_VR(tag)
    if vr != element.VR and element.VR != "UN":
        return _emptied(out, keyword, clean)
    found = values(source, keyword)
    if not found:
        return _emptied(out, keyword, clean, quiet=element.value in (None, "", b""))
    if dictionary_VM(tag) == "1" and len(found) > 1:  # "12345\67890" is not the patient "12345"
        return _emptied(out, keyword, clean)
    kept = [_valid(vr, value) for value in found]
    if keyword in ENUMERATED:
        kept = [_enumerated(keyword, value) for value in kept]
    if any(value is None for value in kept):
        return _emptied(out, keyword, clean)
    if [str(v) for v in kept] != [str(v) for v in found]:
        clean.fixed.append(keyword)
    out.add(DataElement(tag, vr, kept[0] if len(kept) == 1 else kept))


def _emptied(out: Dataset, keyword: str, clean: Cleaned, quiet: bool = False) -> None:
    if keyword in TYPE_2:
        tag = Tag(keyword)
        out.add(DataElement(tag, dictionary_VR(tag), None))
    if not quiet:
        clean.emptied.append(keyword)


def _valid(vr: str, value: object) -> int | float | str | None:
    """``value`` made valid for ``vr`` (legacy forms fixed), or None."""
    candidate = _fixed(vr, value)
    if candidate is None:
        return None
    try:
        validate_value(vr, candidate, pydicom_config.RAISE)
    except (ValueError, TypeError, OverflowError):
        return None
    return candidate


def _fixed(vr: str, value: object) -> int | float | str | None:
    if vr in _NUMERIC_VRS:
        return value if isinstance(value, (int, float)) else None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    text_value = (
        (_TEXT_CONTROL if vr in _LONG_TEXT_VRS else _CONTROL).sub("", str(value)).strip(" \x00")
    )
    if not text_value:
        return None
    fixer = _FIXERS.get(vr)
    if fixer is not None:
        return fixer(text_value)
    if vr in _TEXT_VRS:
        return _fit(text_value, _TEXT_VRS[vr]) if vr != "CS" else text_value
    return text_value


def _fit(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` bytes in UTF-8, the character set of the outputs
    (tools such as dciodvfy count bytes, not characters)."""
    while len(value.encode("utf-8")) > limit:
        value = value[:-1]
    return value.rstrip()


def _date(value: str) -> str | None:
    digits = re.sub(r"[-/. ]", "", value)
    if not re.fullmatch(r"\d{8}", digits):
        return None
    year, month, day = int(digits[:4]), int(digits[4:6]), int(digits[6:])
    try:
        datetime.date(year, month, day)
    except ValueError:
        return None
    return digits


def _time(value: str) -> str | None:
    compact = value.replace(":", "").strip()
    return compact if re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", compact) else None


def _age(value: str) -> str | None:
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY])[A-Z]*", value.strip().upper())
    return f"{int(match[1]):03d}{match[2]}" if match else None


def _code_string(value: str) -> str | None:
    upper = value.upper()
    return upper if re.fullmatch(r"[A-Z0-9_ ]{1,16}", upper) else None


def _person_name(value: str) -> str | None:
    groups = value.split("=")[:3]
    if any(len(group.encode("utf-8")) > 64 for group in groups):
        return None
    return "=".join(groups)


_FIXERS = {"DA": _date, "TM": _time, "AS": _age, "CS": _code_string, "PN": _person_name}


def _enumerated(keyword: str, value: object) -> str | None:
    """One of the attribute's enumerated values (a legacy word for the sex mapped), or None."""
    code = str(value or "").upper()
    if keyword == "PatientSex":
        code = SEX_WORDS.get(code, code)
    return code if code in ENUMERATED[keyword] else None


def _character_set(out: Dataset, source: Dataset) -> None:
    """The source's own character set when it holds every kept text, else UTF-8 (ISO_IR 192)
    when any needs more than ASCII (:mod:`pacs_node.charsets`): the values are Python text,
    and written in the source's set they are the source's bytes."""
    found = character_set_for(texts(source, "SpecificCharacterSet"), text_values(out))
    if found is not None:
        out.SpecificCharacterSet = found
