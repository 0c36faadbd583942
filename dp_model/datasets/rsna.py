"""RSNA Pneumonia Detection Challenge layout.

::

    root/
      stage_2_train_labels.csv          patientId,x,y,width,height,Target
      stage_2_detailed_class_info.csv   patientId,class
      stage_2_train_images/<patientId>.dcm

``stage_2_train_labels.csv`` has one row per box (x, y, width, height in pixels) and one
row with empty coordinates and Target 0 for images without opacity.
``stage_2_detailed_class_info.csv`` repeats a patient's class once per row of the labels
file. Classes: "Normal", "No Lung Opacity / Not Normal", "Lung Opacity"; the boxes are
"Lung Opacity". Each patientId names one image. The patient is the DICOM file's Patient ID
(0010,0020; PS3.3 C.7.1.1): in the challenge's files it repeats the patientId, in other
collections in this layout (synthetic ones among them) several images share a patient,
and a patient-level split must keep them together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dp_transforms.geometry import xywh_to_xyxy

from .records import ChestDataset, DatasetError, Record, index_images, parse_float, read_csv_rows

NAME = "rsna"
CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
#: The challenge's pneumonia class: "No Lung Opacity / Not Normal" is abnormal, not pneumonia.
PNEUMONIA = ("Lung Opacity",)
LABELS_CSV = "stage_2_train_labels.csv"
CLASSES_CSV = "stage_2_detailed_class_info.csv"
IMAGE_FOLDERS = ("stage_2_train_images", "stage_1_train_images", "train_images")


def looks_like(root: Path) -> bool:
    return (root / LABELS_CSV).is_file()


def read(root: str | Path) -> ChestDataset:
    """Read the RSNA layout (labels, detailed classes and DICOM files named by patientId)."""
    root = Path(root)
    boxes, targets = _read_labels(root / LABELS_CSV)
    detailed = _read_detailed(root / CLASSES_CSV)
    folder = next((root / f for f in IMAGE_FOLDERS if (root / f).is_dir()), root / IMAGE_FOLDERS[0])
    images = index_images(folder, (".dcm",))
    records = []
    for patient, target in targets.items():
        label = detailed.get(patient)
        if label is None:
            raise DatasetError(f"{root / CLASSES_CSV}: no class for patientId {patient!r}")
        if (label == "Lung Opacity") != bool(target):
            raise DatasetError(
                f"{root}: patientId {patient!r} has Target {target} but class {label!r}"
            )
        if patient not in images:
            raise DatasetError(f"{folder}: no DICOM file {patient}.dcm")
        xyxy = xywh_to_xyxy(boxes[patient]) if boxes[patient] else np.zeros((0, 4), np.float32)
        records.append(
            Record(
                images[patient],
                (label,),
                boxes=xyxy,
                box_labels=(label,) * len(xyxy),
                patient_id=header_patient(images[patient]) or patient,
                image_id=patient,
            )
        )
    return ChestDataset(
        name=NAME,
        root=root,
        classes=CLASSES,
        multi_label=False,
        records=tuple(records),
        pneumonia=PNEUMONIA,
    )


def header_patient(path: Path) -> str | None:
    """The Patient ID in a DICOM file's header (about half a millisecond a file), or None
    when the file has none or cannot be read (its image id then stands for the patient)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        value = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID")
    except (OSError, InvalidDicomError, ValueError, EOFError):
        return None
    return str(value).strip() or None if value is not None else None


def _read_labels(path: Path) -> tuple[dict[str, list[list[float]]], dict[str, int]]:
    boxes: dict[str, list[list[float]]] = {}
    targets: dict[str, int] = {}
    for line, row in read_csv_rows(path, ("patientId", "x", "y", "width", "height", "Target")):
        patient, target = row["patientId"], row["Target"]
        if target not in ("0", "1"):
            raise DatasetError(f"{path}:{line}: Target must be 0 or 1, got {target!r}")
        if targets.setdefault(patient, int(target)) != int(target):
            raise DatasetError(f"{path}:{line}: patientId {patient!r} has rows with Target 0 and 1")
        entry = boxes.setdefault(patient, [])
        if target == "1":
            entry.append(
                [parse_float(row[c], path, line, c) for c in ("x", "y", "width", "height")]
            )
    return boxes, targets


def _read_detailed(path: Path) -> dict[str, str]:
    classes: dict[str, str] = {}
    for line, row in read_csv_rows(path, ("patientId", "class")):
        if row["class"] not in CLASSES:
            raise DatasetError(
                f"{path}:{line}: unknown class {row['class']!r}; expected one of {list(CLASSES)}"
            )
        if classes.setdefault(row["patientId"], row["class"]) != row["class"]:
            raise DatasetError(
                f"{path}:{line}: patientId {row['patientId']!r} has two different classes"
            )
    return classes
