"""The common form every dataset adapter produces: records of image, labels, boxes, patient."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset on disk does not match its documented layout; the message names file and line."""


@dataclass(frozen=True, eq=False)
class Record:
    """One image of a dataset.

    Attributes:
        image: path of the image file.
        labels: class names; exactly one for single-label datasets, any number (none for
            "no finding") for multi-label ones.
        boxes: ``(N, 4)`` lesion boxes ``(x_min, y_min, x_max, y_max)`` in the image's own
            pixels; empty when the image has none or none were drawn.
        box_labels: the class of each box.
        patient_id: the patient, when the dataset says; splits keep a patient on one side.
        image_id: the dataset's own identifier of the image.
        split: the dataset's official split ("train", "test", "val"), if it has one.
    """

    image: Path
    labels: tuple[str, ...]
    _: KW_ONLY
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_labels: tuple[str, ...] = ()
    patient_id: str | None = None
    image_id: str = ""
    split: str | None = None


@dataclass(frozen=True, eq=False, kw_only=True)
class ChestDataset:
    """Records plus the class list that gives each label its index.

    Attributes:
        name: the layout the dataset was read from.
        root: its folder.
        classes: class names; the index of a name is its class index.
        multi_label: whether an image may carry several labels (or none).
        records: the images.
        pneumonia: the classes that mean pneumonia, as the layout declares them; empty:
            every class but the normal one (see :attr:`pneumonia_classes`).
    """

    name: str
    root: Path
    classes: tuple[str, ...]
    multi_label: bool
    records: tuple[Record, ...]
    pneumonia: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        known = set(self.classes)
        for record in self.records:
            unknown = [label for label in record.labels if label not in known]
            if unknown:
                raise DatasetError(
                    f"{self.root}: {record.image_id or record.image}: unknown label {unknown[0]!r}; classes are {list(self.classes)}"
                )
            unknown_boxes = [label for label in record.box_labels if label not in known]
            if unknown_boxes:
                raise DatasetError(
                    f"{self.root}: {record.image_id or record.image}: box label {unknown_boxes[0]!r} is not a class; classes are {list(self.classes)}"
                )
            if len(record.box_labels) != len(record.boxes):
                raise DatasetError(
                    f"{self.root}: {record.image_id}: {len(record.boxes)} boxes but {len(record.box_labels)} box labels"
                )
            if not self.multi_label and len(record.labels) != 1:
                raise DatasetError(
                    f"{self.root}: {record.image_id}: {len(record.labels)} labels in a single-label dataset"
                )

    def pneumonia_classes(self, normal: str) -> tuple[str, ...]:
        """The declared pneumonia classes, or every class but ``normal``."""
        return self.pneumonia or tuple(c for c in self.classes if c != normal)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def targets(self) -> np.ndarray:
        """``(N,)`` class indices, or ``(N, C)`` multi-hot for multi-label datasets."""
        index = {name: i for i, name in enumerate(self.classes)}
        if not self.multi_label:
            return np.array([index[r.labels[0]] for r in self.records], np.int64)
        out = np.zeros((len(self.records), len(self.classes)), np.float32)
        for row, record in enumerate(self.records):
            out[row, [index[label] for label in record.labels]] = 1.0
        return out

    def class_counts(self, indices: Sequence[int] | None = None) -> dict[str, int]:
        """Images per class (over ``indices`` if given), every class present, zero included."""
        chosen = self.records if indices is None else [self.records[i] for i in indices]
        counts = Counter(label for record in chosen for label in record.labels)
        return {name: counts.get(name, 0) for name in self.classes}

    def summary(self) -> str:
        counts = self.class_counts()
        boxed = sum(1 for r in self.records if len(r.boxes))
        patients = len({r.patient_id for r in self.records if r.patient_id is not None})
        parts = ", ".join(f"{name} {count}" for name, count in counts.items())
        return (
            f"{self.name} at {self.root}: {len(self.records)} images, {patients or 'no'} patient ids, "
            f"{boxed} with boxes; {parts}"
        )


def read_csv_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file as ``(line number, row)``, checking that ``required`` columns exist."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [column for column in required if column not in header]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; header is {header}")
        reader.fieldnames = header
        return [
            (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader
        ]


def parse_float(value: str, path: Path, line: int, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DatasetError(f"{path}:{line}: column {column!r} is not a number: {value!r}") from None
    if not np.isfinite(number):
        raise DatasetError(f"{path}:{line}: column {column!r} is not finite: {value!r}")
    return number


def index_images(
    folder: Path, suffixes: Sequence[str] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
) -> dict[str, Path]:
    """Map file stem (and full name) to path for every image below ``folder``."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in suffixes:
            found.setdefault(path.stem, path)
            found.setdefault(path.name, path)
    return found
