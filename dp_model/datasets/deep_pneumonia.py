"""The Deep Pneumonia layout: images, one class per image, lesion boxes drawn by radiologists.

Five classes, the first being normal (the majority), four pneumonia types with boxes::

    root/
      classes.txt      one class name per line; line i (from 0) is class index i
      labels.csv       image_id,label[,patient_id]   label: class index or class name
      boxes.csv        image_id,x_min,y_min,x_max,y_max   one row per box, lesion images only
      images/          <image_id>.png | .jpg | .dcm (subfolders allowed)

Boxes are in the pixels of the image file. A lesion image without rows in ``boxes.csv``
is kept (its lesion was not outlined); a box for a normal image is an error, since it
contradicts the label.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .records import ChestDataset, DatasetError, Record, index_images, parse_float, read_csv_rows

NAME = "deep-pneumonia"
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def looks_like(root: Path) -> bool:
    return (root / "classes.txt").is_file() and (root / "labels.csv").is_file()


def read_classes(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    names = tuple(
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    if len(names) < 2 or len(set(names)) != len(names):
        raise DatasetError(f"{path}: need at least two distinct class names, got {list(names)}")
    return names


def read_boxes(path: Path, known_images: set[str]) -> dict[str, list[list[float]]]:
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    for line, row in read_csv_rows(path, ("image_id", *BOX_COLUMNS)):
        if row["image_id"] not in known_images:
            raise DatasetError(
                f"{path}:{line}: box for image {row['image_id']!r}, which labels.csv does not list"
            )
        box = [parse_float(row[c], path, line, c) for c in BOX_COLUMNS]
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DatasetError(f"{path}:{line}: empty or inverted box {box}")
        boxes[row["image_id"]].append(box)
    return boxes


def read(root: str | Path) -> ChestDataset:
    """Read a dataset in the Deep Pneumonia layout."""
    root = Path(root)
    classes = read_classes(root / "classes.txt")
    rows = read_csv_rows(root / "labels.csv", ("image_id", "label"))
    images = index_images(root / "images")
    labels: dict[str, tuple[str, str | None]] = {}
    for line, row in rows:
        image_id, label = (
            row["image_id"],
            _class_name(row["label"], classes, root / "labels.csv", line),
        )
        if image_id in labels:
            raise DatasetError(f"{root / 'labels.csv'}:{line}: image {image_id!r} listed twice")
        if image_id not in images:
            raise DatasetError(
                f"{root / 'labels.csv'}:{line}: no file for image {image_id!r} in {root / 'images'}"
            )
        labels[image_id] = (label, row.get("patient_id") or None)
    boxes = read_boxes(root / "boxes.csv", set(labels)) if (root / "boxes.csv").exists() else {}
    records = []
    for image_id, (label, patient) in labels.items():
        image_boxes = np.asarray(boxes.get(image_id, []), np.float32).reshape(-1, 4)
        if len(image_boxes) and label == classes[0]:
            raise DatasetError(
                f"{root / 'boxes.csv'}: image {image_id!r} is labelled {label!r} but has boxes"
            )
        records.append(
            Record(
                images[image_id],
                (label,),
                boxes=image_boxes,
                box_labels=(label,) * len(image_boxes),
                patient_id=patient,
                image_id=image_id,
            )
        )
    return ChestDataset(
        name=NAME, root=root, classes=classes, multi_label=False, records=tuple(records)
    )


def _class_name(value: str, classes: tuple[str, ...], path: Path, line: int) -> str:
    if value in classes:
        return value
    if value.isdigit() and int(value) < len(classes):
        return classes[int(value)]
    raise DatasetError(
        f"{path}:{line}: label {value!r} is neither a class name nor an index below {len(classes)}"
    )
