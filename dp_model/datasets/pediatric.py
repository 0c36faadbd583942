"""Pediatric pneumonia layout (Guangzhou Women and Children's Medical Center, JPEG folders).

::

    root/
      train/NORMAL/IM-0115-0001.jpeg, NORMAL2-IM-1427-0001.jpeg, ...
      train/PNEUMONIA/person1_bacteria_1.jpeg, person1_virus_6.jpeg, ...
      test/...   val/...

The folder gives normal or pneumonia; the file name says bacteria or virus. Patient ids
come from the names (``person1``; ``IM-0115`` for normal images), and the top folder is
the official split. ``classes="three"`` (default) gives normal / bacterial / viral,
``"two"`` gives NORMAL / PNEUMONIA.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from .records import ChestDataset, DatasetError, Record

NAME = "pediatric"
THREE = ("normal", "bacterial", "viral")
TWO = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
PATIENT = re.compile(r"^(person\d+|(?:NORMAL\d*-)?IM-\d+)", re.IGNORECASE)
SUFFIXES = (".jpeg", ".jpg", ".png")


def looks_like(root: Path) -> bool:
    return any(
        (root / split / folder).is_dir() for split in SPLITS for folder in ("NORMAL", "PNEUMONIA")
    )


def read(root: str | Path, classes: Literal["three", "two"] = "three") -> ChestDataset:
    """Read the ``split/NORMAL|PNEUMONIA/*.jpeg`` folders."""
    root = Path(root)
    records = []
    for split in SPLITS:
        for folder in ("NORMAL", "PNEUMONIA"):
            directory = root / split / folder
            if not directory.is_dir():
                continue
            for path in sorted(p for p in directory.iterdir() if p.suffix.lower() in SUFFIXES):
                label = _label(path, folder, classes)
                match = PATIENT.match(path.stem)
                records.append(
                    Record(
                        path,
                        (label,),
                        patient_id=match.group(1) if match else None,
                        image_id=path.stem,
                        split=split,
                    )
                )
    if not records:
        raise DatasetError(f"{root}: no images in train|val|test/NORMAL|PNEUMONIA")
    return ChestDataset(
        name=NAME,
        root=root,
        classes=THREE if classes == "three" else TWO,
        multi_label=False,
        records=tuple(records),
    )


def _label(path: Path, folder: str, classes: str) -> str:
    if classes == "two":
        return folder
    if folder == "NORMAL":
        return "normal"
    name = path.stem.lower()
    if "bacteria" in name:
        return "bacterial"
    if "virus" in name:
        return "viral"
    raise DatasetError(f"{path}: a pneumonia image whose name says neither bacteria nor virus")
