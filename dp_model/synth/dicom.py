"""Synthetic cases as DICOM CR or DX (For Presentation) files that pass ``dciodvfy``.

Pixels are stored with 12 bits, MONOCHROME2 or MONOCHROME1 (inverted stored values),
with a window that maps them back to the rendered display values, so
:func:`dp_transforms.read_dicom` returns the rendered image whatever the polarity.
UIDs are derived from the seed, patient and image, so a regenerated dataset is
byte-for-byte the same.
"""

from __future__ import annotations

import uuid
from datetime import date, timedelta

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from .render import Case

BITS = 12
MAX_VALUE = 2**BITS - 1
DETECTOR_MM = 430.0  # a 43 cm detector, the usual chest cassette size
MANUFACTURER = "Deep Pneumonia synthetic phantom"


def case_uid(seed: int, *parts: object) -> str:
    """A deterministic UID for a part of a synthetic dataset: the ``2.25`` form of a name-based UUID (PS3.5 B.2)."""
    name = "/".join(["deep-pneumonia-synth", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def build_dataset(case: Case, seed: int, monochrome1: bool, dx: bool, patient_id: str) -> Dataset:
    """The DICOM dataset of ``case`` (CR, or DX For Presentation)."""
    ds = Dataset()
    sop_class = DigitalXRayImageStorageForPresentation if dx else ComputedRadiographyImageStorage
    ds.file_meta = _file_meta(sop_class, case_uid(seed, "image", case.index))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    _patient_and_study(ds, case, seed, patient_id)
    ds.Modality = "DX" if dx else "CR"
    ds.SeriesInstanceUID = case_uid(seed, "series", case.index)
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = MANUFACTURER
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = case.info["view"]
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    spacing = round(DETECTOR_MM / case.pixels.shape[0], 4)
    ds.ImagerPixelSpacing = [spacing, spacing]
    _pixels(ds, case.pixels, monochrome1)
    if dx:
        _dx_modules(ds, monochrome1)
    return ds


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_and_study(ds: Dataset, case: Case, seed: int, patient_id: str) -> None:
    study_date = date(2024, 1, 1) + timedelta(days=case.index % 700)
    ds.PatientName = f"SYNTHETIC^PHANTOM{case.patient:06d}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = f"{study_date.year - case.info['age']:04d}0101"
    ds.PatientSex = case.info["sex"]
    ds.PatientAge = f"{case.info['age']:03d}Y"
    ds.StudyInstanceUID = case_uid(seed, "study", case.index)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.StudyID = f"S{case.index:07d}"
    ds.AccessionNumber = f"SYN{seed:03d}{case.index:07d}"[:16]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST (synthetic)"


def _pixels(ds: Dataset, pixels: np.ndarray, monochrome1: bool) -> None:
    stored = np.rint(np.clip(pixels, 0.0, 1.0) * MAX_VALUE).astype(np.uint16)
    if monochrome1:
        stored = MAX_VALUE - stored
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS, BITS - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()


def _dx_modules(ds: Dataset, monochrome1: bool) -> None:
    """DX Series, DX Image, DX Detector, DX Anatomy Imaged and Acquisition Context (PS3.3 A.26)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.DetectorType = "SCINTILLATOR"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code(codes.SCT.Chest)])
    ds.AcquisitionContextSequence = Sequence()
    ds.PositionerType = ""
    view = codes.SCT.AnteroPosterior if ds.ViewPosition == "AP" else codes.SCT.PosteroAnterior
    ds.ViewCodeSequence = Sequence([_code(view)])


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
        code.value,
        code.scheme_designator,
        code.meaning,
    )
    return item
