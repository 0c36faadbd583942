"""Train / test splits: per-class stratified (the paper's 90/10) and patient-level.

A patient's images never fall on both sides of a patient-level split; a test set that
shares patients with training overstates accuracy. :func:`split_dataset` picks the
patient-level split whenever every record has a patient id.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .records import ChestDataset, DatasetError, Record

logger = logging.getLogger(__name__)

Method = Literal["auto", "stratified", "patient", "official"]


@dataclass(frozen=True)
class Split:
    """Indices into a dataset's records, and how they were chosen."""

    train: tuple[int, ...]
    test: tuple[int, ...]
    method: str


def split_dataset(
    dataset: ChestDataset, test_fraction: float = 0.1, seed: int = 0, method: Method = "auto"
) -> Split:
    """Split ``dataset``; ``auto`` is patient-level when every record has a patient id, else stratified."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if method == "auto":
        has_patients = all(r.patient_id is not None for r in dataset.records)
        method = "patient" if has_patients else "stratified"
    if method == "official":
        return official_split(dataset)
    if method == "patient":
        return patient_split(dataset, test_fraction, seed)
    if method == "stratified":
        return stratified_split(dataset, test_fraction, seed)
    raise ValueError(f"unknown split method {method!r}; use auto, stratified, patient or official")


def stratum(record: Record, frequency: Counter) -> str:
    """The class a record is stratified by: its rarest label ("" for no finding)."""
    if not record.labels:
        return ""
    return min(record.labels, key=lambda label: (frequency[label], label))


def stratified_split(dataset: ChestDataset, test_fraction: float, seed: int) -> Split:
    """Take ``test_fraction`` of each class's images at random into the test set (the paper's rule)."""
    frequency = Counter(label for r in dataset.records for label in r.labels)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(dataset.records):
        groups[stratum(record, frequency)].append(index)
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for key in sorted(groups):
        members = rng.permutation(groups[key])
        test.extend(int(i) for i in members[: _test_count(len(members), test_fraction)])
    return _finish(dataset, test, "stratified")


def patient_split(dataset: ChestDataset, test_fraction: float, seed: int) -> Split:
    """Stratified by class at the level of patients: each patient's images all go to one side."""
    missing = sum(1 for r in dataset.records if r.patient_id is None)
    if missing:
        raise DatasetError(
            f"{dataset.root}: {missing} images have no patient id; a patient-level split needs them all"
        )
    frequency = Counter(label for r in dataset.records for label in r.labels)
    patients: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(dataset.records):
        patients[record.patient_id].append(index)  # type: ignore[index]
    # A patient is stratified by the rarest class among all of their images.
    groups: dict[str, list[str]] = defaultdict(list)
    for patient, indices in patients.items():
        labels = [label for i in indices for label in dataset.records[i].labels]
        key = min(labels, key=lambda label: (frequency[label], label)) if labels else ""
        groups[key].append(patient)
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for key in sorted(groups):
        members = [groups[key][i] for i in rng.permutation(len(groups[key]))]
        wanted = _test_count(sum(len(patients[p]) for p in members), test_fraction)
        taken = 0
        for patient in members:
            if taken >= wanted:
                break
            test.extend(patients[patient])
            taken += len(patients[patient])
    return _finish(dataset, test, "patient")


def official_split(dataset: ChestDataset) -> Split:
    """The dataset's own split (``Record.split``); "val" goes to test."""
    missing = sum(1 for r in dataset.records if r.split is None)
    if missing:
        raise DatasetError(f"{dataset.root}: {missing} images are in no official split")
    test = [i for i, r in enumerate(dataset.records) if r.split in ("test", "val")]
    return _finish(dataset, test, "official")


def _test_count(n: int, fraction: float) -> int:
    """At least one test item from any group of two or more, never the whole group."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def _finish(dataset: ChestDataset, test: list[int], method: str) -> Split:
    chosen = set(test)
    train = tuple(i for i in range(len(dataset.records)) if i not in chosen)
    split = Split(train, tuple(sorted(chosen)), method)
    # test or validation: the caller says
    logger.debug("%s split: %d images kept, %d held out", method, len(split.train), len(split.test))
    return split


def hashed_id(image_id: str | None) -> str:
    """How a bundle's ``split.json`` names an image: sha256 of its id, 16 hex digits (no PHI)."""
    import hashlib

    return hashlib.sha256(str(image_id).encode()).hexdigest()[:16]


def split_subset(dataset: ChestDataset, split_file: dict, part: str) -> ChestDataset:
    """The records of ``dataset`` that a bundle's ``split.json`` puts in ``part`` (train, val, test).

    Raises:
        DatasetError: no record of the dataset is in that part (another dataset, or another split).
    """
    from dataclasses import replace

    wanted = set(split_file.get(part, []))
    chosen = [record for record in dataset.records if hashed_id(record.image_id) in wanted]
    if not chosen:
        raise DatasetError(
            f"{dataset.root}: none of its {len(dataset.records)} images is in the bundle's {part} split; is it the dataset the bundle was trained from?"
        )
    if len(chosen) < len(wanted):
        logger.warning(
            "%d of the %d images of the bundle's %s split are not in %s",
            len(wanted) - len(chosen),
            len(wanted),
            part,
            dataset.root,
        )
    return replace(dataset, records=chosen)
