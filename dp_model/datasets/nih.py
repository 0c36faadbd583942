"""NIH ChestX-ray14 layout.

::

    root/
      Data_Entry_2017.csv   Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,
                            Patient Gender,View Position,OriginalImage[Width,Height],
                            OriginalImagePixelSpacing[x,y],   (trailing comma in some copies)
      BBox_List_2017.csv    Image Index,Finding Label,Bbox [x,y,w,h],,,
      train_val_list.txt    optional official split, one image name per line
      test_list.txt
      images/ or images_001/images/ ... images_012/images/   the PNG files

Findings are multi-label, separated by ``|``; "No Finding" means none of the 14 classes.
Boxes (x, y, width, height in the 1024 x 1024 PNG) exist for about 1,000 images only; the
box file spells "Infiltrate" where the labels say "Infiltration". The dataset ships in
twelve archives, so images absent from disk are skipped with a warning by default.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np

from dp_transforms.geometry import xywh_to_xyxy

from .records import ChestDataset, DatasetError, Record, index_images, parse_float, read_csv_rows

logger = logging.getLogger(__name__)

NAME = "nih"
CLASSES = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
#: Of the fourteen findings, the one that means pneumonia.
PNEUMONIA = ("Pneumonia",)
ENTRY_CSVS = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
BBOX_CSV = "BBox_List_2017.csv"
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
BOX_COLUMNS = ("Bbox [x", "y", "w", "h]")


def looks_like(root: Path) -> bool:
    return any((root / name).is_file() for name in ENTRY_CSVS)


def read(root: str | Path, missing_images: Literal["skip", "error"] = "skip") -> ChestDataset:
    """Read ChestX-ray14 (labels, patient ids, boxes and the official split when present)."""
    root = Path(root)
    entry = next((root / n for n in ENTRY_CSVS if (root / n).is_file()), root / ENTRY_CSVS[0])
    images = index_images(root, (".png",))
    boxes = _read_boxes(root / BBOX_CSV) if (root / BBOX_CSV).exists() else {}
    split = _official_split(root)
    records, missing = [], 0
    for line, row in read_csv_rows(entry, ("Image Index", "Finding Labels", "Patient ID")):
        name = row["Image Index"]
        if name not in images:
            if missing_images == "error":
                raise DatasetError(f"{entry}:{line}: image {name!r} not found under {root}")
            missing += 1
            continue
        labels = _findings(row["Finding Labels"], entry, line)
        image_boxes, box_labels = boxes.get(name, (np.zeros((0, 4), np.float32), ()))
        records.append(
            Record(
                images[name],
                labels,
                boxes=image_boxes,
                box_labels=box_labels,
                patient_id=row["Patient ID"],
                image_id=name,
                split=split.get(name),
            )
        )
    if missing:
        logger.warning(
            "%s: %d of %d listed images are not on disk and were skipped",
            root,
            missing,
            missing + len(records),
        )
    return ChestDataset(
        name=NAME,
        root=root,
        classes=CLASSES,
        multi_label=True,
        records=tuple(records),
        pneumonia=PNEUMONIA,
    )


def _findings(value: str, path: Path, line: int) -> tuple[str, ...]:
    labels = tuple(label.strip() for label in value.split("|") if label.strip())
    if labels == (NO_FINDING,):
        return ()
    unknown = [label for label in labels if label not in CLASSES]
    if unknown or not labels:
        raise DatasetError(f"{path}:{line}: unknown finding {unknown[0] if unknown else value!r}")
    return labels


def _read_boxes(path: Path) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    found: dict[str, list[tuple[list[float], str]]] = defaultdict(list)
    for line, row in read_csv_rows(path, ("Image Index", "Finding Label", *BOX_COLUMNS)):
        label = BOX_LABEL_ALIASES.get(row["Finding Label"], row["Finding Label"])
        if label not in CLASSES:
            raise DatasetError(f"{path}:{line}: unknown finding {row['Finding Label']!r}")
        xywh = [parse_float(row[c], path, line, c) for c in BOX_COLUMNS]
        found[row["Image Index"]].append((xywh, label))
    return {
        name: (xywh_to_xyxy([b for b, _ in items]), tuple(label for _, label in items))
        for name, items in found.items()
    }


def _official_split(root: Path) -> dict[str, str]:
    split: dict[str, str] = {}
    for filename, name in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        path = root / filename
        if path.exists():
            for image in path.read_text().split():
                split[image] = name
    return split
