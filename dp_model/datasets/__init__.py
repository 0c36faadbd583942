"""Readers for the public chest X-ray dataset layouts, and train / test splits.

Every reader returns a :class:`ChestDataset` of :class:`Record` s; :func:`read_dataset`
recognises the layout of a folder by its marker files.
"""

from __future__ import annotations

from pathlib import Path

from . import deep_pneumonia, generic_csv, nih, pediatric, rsna
from .records import ChestDataset, DatasetError, Record
from .splits import Split, split_dataset

LAYOUTS = {
    deep_pneumonia.NAME: deep_pneumonia.read,
    rsna.NAME: rsna.read,
    nih.NAME: nih.read,
    pediatric.NAME: pediatric.read,
    generic_csv.NAME: generic_csv.read,
}


def detect_layout(path: str | Path) -> str:
    """The layout of a dataset folder (or ``csv`` for a CSV file), from its marker files."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return generic_csv.NAME
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset folder or CSV file")
    for module in (deep_pneumonia, rsna, nih, pediatric):
        if module.looks_like(path):
            return module.NAME
    raise DatasetError(
        f"{path}: layout not recognised (looked for classes.txt + labels.csv, {rsna.LABELS_CSV}, "
        f"{nih.ENTRY_CSVS[0]}, train/NORMAL|PNEUMONIA); pass the layout explicitly"
    )


def read_dataset(path: str | Path, layout: str = "auto") -> ChestDataset:
    """Read a dataset in any supported layout (``auto`` to detect it)."""
    name = detect_layout(path) if layout == "auto" else layout
    if name not in LAYOUTS:
        raise DatasetError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)} or auto")
    return LAYOUTS[name](path)


__all__ = [
    "ChestDataset",
    "DatasetError",
    "LAYOUTS",
    "Record",
    "Split",
    "detect_layout",
    "read_dataset",
    "split_dataset",
]
