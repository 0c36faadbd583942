"""A generic CSV layout for any other dataset.

One CSV file, with a header. Columns:

=============  =========  ==============================================================
column         required   meaning
=============  =========  ==============================================================
image          yes        image path, relative to the CSV's folder (or absolute)
label          yes        class name; for multi-label data several joined by ``|``, and
                          empty for "no finding"
patient_id     no         the patient; splits then keep each patient on one side
x_min, y_min,  no         one lesion box in the image's pixels (all four or none); an
x_max, y_max              image with several boxes has one row per box, and its other
                          columns must agree between those rows
box_label      no         the class of the box (default: the image's label)
split          no         an official split (train / val / test)
=============  =========  ==============================================================

Classes are read from ``classes.txt`` beside the CSV when present (one per line, in
index order), else taken in sorted order from the labels. The dataset is multi-label
when any label contains ``|`` or is empty, unless ``multi_label`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .records import ChestDataset, DatasetError, Record, parse_float, read_csv_rows

NAME = "csv"
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def read(csv_path: str | Path, multi_label: bool | None = None) -> ChestDataset:
    """Read a dataset described by one CSV file (see the module documentation)."""
    csv_path = Path(csv_path)
    rows = read_csv_rows(csv_path, ("image", "label"))
    images: dict[str, dict] = {}
    for line, row in rows:
        entry = images.setdefault(
            row["image"], {"row": row, "line": line, "boxes": [], "box_labels": []}
        )
        for column in ("label", "patient_id", "split"):
            if row.get(column, "") != entry["row"].get(column, ""):
                raise DatasetError(
                    f"{csv_path}:{line}: {column!r} differs from line {entry['line']} for the same image"
                )
        box = _box(row, csv_path, line)
        if box is not None:
            entry["boxes"].append(box)
            entry["box_labels"].append(row.get("box_label") or row["label"])
    if multi_label is None:
        multi_label = any(
            "|" in e["row"]["label"] or not e["row"]["label"] for e in images.values()
        )
    records = tuple(_record(csv_path, image, e, multi_label) for image, e in images.items())
    classes = _classes(csv_path, records)
    return ChestDataset(
        name=NAME,
        root=csv_path.parent,
        classes=classes,
        multi_label=multi_label,
        records=records,
    )


def _box(row: dict[str, str], path: Path, line: int) -> list[float] | None:
    present = [bool(row.get(c)) for c in BOX_COLUMNS]
    if not any(present):
        return None
    if not all(present):
        raise DatasetError(f"{path}:{line}: a box needs all of {list(BOX_COLUMNS)}")
    box = [parse_float(row[c], path, line, c) for c in BOX_COLUMNS]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetError(f"{path}:{line}: empty or inverted box {box}")
    return box


def _record(csv_path: Path, image: str, entry: dict, multi_label: bool) -> Record:
    row = entry["row"]
    path = Path(image) if Path(image).is_absolute() else csv_path.parent / image
    if not path.is_file():
        raise DatasetError(f"{csv_path}:{entry['line']}: image file {image!r} not found")
    labels = tuple(x for x in row["label"].split("|") if x) if multi_label else (row["label"],)
    boxes = np.asarray(entry["boxes"], np.float32).reshape(-1, 4)
    return Record(
        path,
        labels,
        boxes=boxes,
        box_labels=tuple(entry["box_labels"]),
        patient_id=row.get("patient_id") or None,
        image_id=image,
        split=row.get("split") or None,
    )


def _classes(csv_path: Path, records: tuple[Record, ...]) -> tuple[str, ...]:
    listed = csv_path.parent / "classes.txt"
    if listed.exists():
        return tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
    return tuple(
        sorted({label for record in records for label in (*record.labels, *record.box_labels)})
    )
