"""Write generated cases in the real dataset layouts that ``dp_model.datasets`` reads.

Image files are written by the workers as cases are rendered (:func:`write_image`);
the label files are written once at the end from the rows the workers return
(:func:`write_tables`), so the result is identical whatever the number of workers.
Besides the layout's own files, every dataset gets ``synth_truth.csv`` (true class,
recorded class, lesion density, true boxes; from version 2 also the abnormalities that
are not pneumonia and the simulated device) and ``synth_config.yaml``.
"""

from __future__ import annotations

import csv
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ..config import to_mapping
from .config import CLASSES, SynthConfig
from .dicom import build_dataset
from .render import Case


@dataclass(frozen=True, kw_only=True)
class Row:
    """What the tables need of a written case."""

    index: int
    image_id: str
    patient_id: str
    label: str
    recorded_label: str
    boxes: list[list[float]]
    true_boxes: list[list[float]]
    info: dict


def image_id(config: SynthConfig, index: int) -> str:
    """The dataset's name for image ``index``: a UUID for RSNA (as its patientIds are), else a counter."""
    if config.layout == "rsna":
        return str(uuid.uuid5(uuid.NAMESPACE_OID, f"deep-pneumonia-synth/{config.seed}/{index}"))
    return f"syn{index:06d}"


def patient_id(config: SynthConfig, case: Case, name: str) -> str:
    """The patient's id. Version 1 named an RSNA patient after the image, although
    consecutive images share a patient's anatomy; version 2 gives every layout the patient."""
    return (
        name
        if config.layout == "rsna" and config.version == 1
        else f"P{config.seed:03d}-{case.patient:06d}"
    )


def image_path(root: Path, config: SynthConfig, name: str) -> Path:
    suffix = ".dcm" if config.image_format == "dicom" else ".png"
    folder = "stage_2_train_images" if config.layout == "rsna" else "images"
    return root / folder / f"{name}{suffix}"


def write_image(root: Path, config: SynthConfig, case: Case) -> Row:
    """Write one case's image file and return its table row."""
    name = image_id(config, case.index)
    patient = patient_id(config, case, name)
    path = image_path(root, config, name)
    if config.image_format == "dicom":
        rng = np.random.default_rng([config.seed, 3, case.index])
        monochrome1 = bool(rng.random() < config.monochrome1_fraction)
        dx = bool(rng.random() < config.dx_fraction)
        build_dataset(case, config.seed, monochrome1, dx, patient).save_as(
            path, enforce_file_format=True
        )
    else:
        Image.fromarray(np.rint(case.pixels * 255).astype(np.uint8)).save(path, compress_level=1)
    return Row(
        index=case.index,
        image_id=name,
        patient_id=patient,
        label=case.label,
        recorded_label=case.recorded_label,
        boxes=case.boxes.tolist(),
        true_boxes=case.true_boxes.tolist(),
        info=case.info,
    )


def prepare(root: Path, config: SynthConfig) -> None:
    """Create the folders and record the configuration."""
    image_path(root, config, "x").parent.mkdir(parents=True, exist_ok=True)
    (root / "synth_config.yaml").write_text(yaml.safe_dump(to_mapping(config), sort_keys=False))


def write_tables(root: Path, config: SynthConfig, rows: list[Row]) -> None:
    """Write the layout's label files and ``synth_truth.csv``."""
    rows = sorted(rows, key=lambda r: r.index)
    {"deep-pneumonia": _deep_pneumonia, "rsna": _rsna, "csv": _generic_csv}[config.layout](
        root, config, rows
    )
    _truth(root, rows, config.version)


def _deep_pneumonia(root: Path, config: SynthConfig, rows: list[Row]) -> None:
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    _csv(
        root / "labels.csv",
        ["image_id", "label", "patient_id"],
        ([r.image_id, r.recorded_label, r.patient_id] for r in rows),
    )
    _csv(
        root / "boxes.csv",
        ["image_id", "x_min", "y_min", "x_max", "y_max"],
        ([r.image_id, *map(_number, box)] for r in rows for box in r.boxes),
    )


def _rsna(root: Path, config: SynthConfig, rows: list[Row]) -> None:
    labels, detailed = [], []
    for r in rows:
        if r.recorded_label != CLASSES[0] and r.boxes:
            for x0, y0, x1, y1 in r.boxes:
                labels.append([r.image_id, *map(_number, (x0, y0, x1 - x0, y1 - y0)), 1])
                detailed.append([r.image_id, "Lung Opacity"])
            continue
        # Anything abnormal that is not an outlined opacity is "not normal" in RSNA's terms:
        # in version 1, any distractor; in version 2, an abnormality that is not pneumonia
        # (distractors are normal findings there, in every class).
        found = r.info["distractors"] > 0 if config.version == 1 else bool(r.info["abnormalities"])
        abnormal = r.recorded_label != CLASSES[0] or found
        labels.append([r.image_id, "", "", "", "", 0])
        detailed.append([r.image_id, "No Lung Opacity / Not Normal" if abnormal else "Normal"])
    _csv(
        root / "stage_2_train_labels.csv",
        ["patientId", "x", "y", "width", "height", "Target"],
        labels,
    )
    _csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], detailed)


def _generic_csv(root: Path, config: SynthConfig, rows: list[Row]) -> None:
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    suffix = ".dcm" if config.image_format == "dicom" else ".png"
    out = []
    for r in rows:
        image = f"images/{r.image_id}{suffix}"
        for box in r.boxes or [[]]:
            out.append(
                [
                    image,
                    r.recorded_label,
                    r.patient_id,
                    *map(_number, box),
                    *([""] * (4 - len(box))),
                ]
            )
    _csv(
        root / "data.csv", ["image", "label", "patient_id", "x_min", "y_min", "x_max", "y_max"], out
    )


def _truth(root: Path, rows: list[Row], version: int) -> None:
    header = [
        "image_id",
        "patient_id",
        "true_label",
        "recorded_label",
        "lesion_density",
        "distractors",
        "sex",
        "age",
        "view",
        "true_boxes",
    ]
    extra = ["abnormalities", "device"] if version > 1 else []  # version 1's table stays as it was
    _csv(
        root / "synth_truth.csv",
        header + extra,
        (
            [
                r.image_id,
                r.patient_id,
                r.label,
                r.recorded_label,
                r.info["lesion_density"],
                r.info["distractors"],
                r.info["sex"],
                r.info["age"],
                r.info["view"],
                json.dumps(r.true_boxes),
            ]
            + ([" ".join(r.info["abnormalities"]), r.info["device"]] if extra else [])
            for r in rows
        ),
    )


def _csv(path: Path, header: list[str], rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _number(value: float) -> str:
    return f"{value:g}"
