"""The end of ``dp-train``: what the contract learns from held-out images.

On the calibration split (the validation split when the run holds none out): the
temperature, the operating points (each where a one-sided Clopper-Pearson bound reaches its
target) and the threshold of the out-of-distribution gate (an order statistic with a bounded
false-rejection rate); on the training split: the statistics of the gate's detector
(:data:`~dp_model.serving.ood.DEFAULT_DETECTOR` unless asked otherwise). On the test split, reported
only: the calibration error before and after.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..serving.calibration import (
    CONFIDENCE,
    Reliability,
    certified_point,
    fit_temperature,
    reliability,
)
from ..serving.contract import (
    Localization,
    OODGate,
    OperatingPoint,
    adjusted_logits,
    pneumonia_probability,
    probabilities,
)
from ..serving.ood import (
    DEFAULT_DETECTOR,
    DETECTORS,
    FALSE_REJECTION,
    Detector,
    Seen,
    certified_threshold,
    classifier_layer,
    fit_detector,
    needs_stages,
    observe,
    one_pass,
    penultimate,
    stage_modules,
    write_statistics,
)
from ..serving.runner import Runner
from .data import Resident

logger = logging.getLogger(__name__)

#: What the operating points are chosen for, on the calibration split.
PRESENT_SENSITIVITY = 0.90
TRIAGE_SPECIFICITY = 0.95
#: How the splits are called in the contract and the model card.
SPLIT_NAMES = {"train": "train", "val": "validation", "calibration": "calibration", "test": "test"}


def held_out_split(data: dict[str, Resident]) -> str:
    """The key of the split that calibrates: "calibration" when the run holds one out, else "val"."""
    return "calibration" if len(data.get("calibration", ())) else "val"


def calibrated_outputs(
    runner: Runner, data: Resident, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray | None]:
    """What the node computes for each image of a split, by the node's own runner (a bundle's
    :class:`~dp_model.serving.runner.Runner`, batch by batch): the contract's calibrated
    probabilities ``(N, K)`` and the out-of-distribution scores ``(N,)`` (None without a gate)."""
    found = [
        runner.run(data.batch(torch.arange(s, min(len(data), s + batch_size)))[0].cpu())
        for s in range(0, len(data), batch_size)
    ]
    width = len(runner.contract.output_classes)
    probabilities = (
        np.concatenate([f.probabilities for f in found]) if found else np.zeros((0, width))
    )
    if runner.statistics is None:
        return probabilities, None
    scores = [f.ood_scores for f in found if f.ood_scores is not None]
    return probabilities, np.concatenate(scores) if scores else np.zeros(0)


@torch.no_grad()
def observed(model: nn.Module, data: Resident, stages: bool = False, batch_size: int = 128) -> Seen:
    """What a detector reads of a resident split (:class:`~dp_model.serving.ood.Seen`), on the CPU, without augmentation."""
    model = model.eval().cpu()
    starts = range(0, len(data), batch_size)
    return observe(
        model,
        (data.batch(torch.arange(s, min(len(data), s + batch_size)))[0].cpu() for s in starts),
        stages,
    )


@torch.no_grad()
def outputs(
    model: nn.Module, data: Resident, batch_size: int = 128
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Logits ``(N, K)`` of a resident split and its penultimate features ``(N, D)`` (None
    for a network that names no classifier layer), on the CPU, without augmentation."""
    model = model.eval().cpu()
    logits: list[torch.Tensor] = []
    features: list[torch.Tensor] | None = []
    with penultimate(model) if classifier_layer(model) is not None else nullcontext([]) as seen:
        for start in range(0, len(data), batch_size):
            x = data.batch(torch.arange(start, min(len(data), start + batch_size)))[0].cpu()
            logits.append(model(x).float())
            if features is not None:
                try:
                    features.append(one_pass(seen, len(x)).cpu())
                except ValueError:  # no single pass of one row per image: no gate
                    features = None
    features = torch.cat(features) if features else None
    return (torch.cat(logits).numpy() if logits else np.zeros((0, 0))), features


@dataclass(kw_only=True)
class Fitted:
    """What the contract gets, and what the model card shows."""

    temperature: float
    calibration: dict
    operating_points: dict[str, OperatingPoint]
    ood: OODGate | None
    statistics: Detector | None
    before: Reliability
    after: Reliability
    localization: Localization | None = None  # measured by :mod:`.regions`, carried to the contract
    logit_adjustment: tuple[float, ...] = ()


def fit(
    model: nn.Module,
    data: dict[str, Resident],
    classes: tuple[str, ...],
    normal: int,
    pneumonia: tuple[str, ...],
    multi_label: bool,
    seed: int = 0,
    offsets: tuple[float, ...] = (),
    detector: str = DEFAULT_DETECTOR,
) -> Fitted:
    """Temperature, operating points and the out-of-distribution gate (of the ``detector``
    kind) of a trained model, chosen on the calibration split (:func:`held_out_split`);
    ``offsets`` (the contract's ``logit_adjustment``) come off the logits before the temperature."""
    split = held_out_split(data)
    name = SPLIT_NAMES[split]
    # the temperature is fitted to what it divides: the logits less the contract's adjustment
    val_logits = adjusted_logits(outputs(model, data[split])[0], offsets)
    test_logits = adjusted_logits(outputs(model, data["test"])[0], offsets)
    val_labels, test_labels = data[split].labels.cpu().numpy(), data["test"].labels.cpu().numpy()
    outputs_order = (
        tuple(c for i, c in enumerate(classes) if i != normal) if multi_label else classes
    )

    def targets(labels: np.ndarray) -> np.ndarray:  # what the network's outputs are trained towards
        if not multi_label:
            return labels
        hot = np.zeros((len(labels), len(outputs_order)), np.float32)
        for row, label in enumerate(labels):
            if classes[label] in outputs_order:
                hot[row, outputs_order.index(classes[label])] = 1.0
        return hot

    temperature = fit_temperature(val_logits, targets(val_labels), multi_label)
    before = reliability(
        probabilities(test_logits, 1.0, multi_label), targets(test_labels), multi_label, seed=seed
    )
    after = reliability(
        probabilities(test_logits, temperature, multi_label),
        targets(test_labels),
        multi_label,
        seed=seed,
    )
    calibration = {
        "method": f"temperature scaling on the {name} split",
        "split": name,
        "images": len(val_labels),
        "test_before": before.to_json(),
        "test_after": after.to_json(),
    }
    logger.info(
        "calibration: temperature %.3f; test ECE %.3f [%.3f, %.3f] -> %.3f [%.3f, %.3f]",
        temperature,
        before.ece,
        before.low,
        before.high,
        after.ece,
        after.low,
        after.high,
    )

    scores = pneumonia_probability(
        probabilities(val_logits, temperature, multi_label), outputs_order, pneumonia, multi_label
    )
    is_pneumonia = np.isin(np.asarray(classes)[val_labels], pneumonia)
    points = _points(scores, is_pneumonia, name)
    gate, statistics = fit_gate(model, data["train"], data[split], name, detector)
    return Fitted(
        temperature=temperature,
        calibration=calibration,
        operating_points=points,
        ood=gate,
        statistics=statistics,
        before=before,
        after=after,
    )


def _points(scores: np.ndarray, is_pneumonia: np.ndarray, split: str) -> dict[str, OperatingPoint]:
    """ "present" and "triage", each where its one-sided lower bound reaches its target; a
    "present" target the split cannot certify is placed at its best bound and said so."""
    points: dict[str, OperatingPoint] = {}
    try:
        points["present"] = certified_point(
            scores, is_pneumonia, sensitivity=PRESENT_SENSITIVITY, split=split
        )
    except ValueError as exc:
        logger.warning("no operating points: %s; the node uses 0.5", exc)
        return points
    try:
        points["triage"] = certified_point(
            scores, is_pneumonia, specificity=TRIAGE_SPECIFICITY, split=split
        )
        if points["triage"].threshold < points["present"].threshold:
            # a flag is never raised below "present"
            del points["triage"]
    except ValueError as exc:
        logger.warning("no triage point: %s", exc)
    for key, point in points.items():
        log = logger.info if point.certified else logger.warning
        log(
            "operating point %s: %.4f (%s; sensitivity %.3f, specificity %.3f there)",
            key,
            point.threshold,
            point.target,
            point.sensitivity,
            point.specificity,
        )
    return points


def fit_gate(
    model: nn.Module,
    train: Resident,
    held_out: Resident,
    split: str = "validation",
    kind: str = DEFAULT_DETECTOR,
) -> tuple[OODGate | None, Detector | None]:
    """The out-of-distribution gate: the ``kind`` detector fitted on the training split, its
    threshold the order statistic of the ``held_out`` images' scores that bounds the false
    rejections (:func:`~dp_model.serving.ood.certified_threshold`). None without a classifier layer,
    with fewer than 10 held-out images, or when a forward pass is not one row per image; a
    network without residual stages gets the Mahalanobis detector instead of the multi-layer one."""
    if kind not in DETECTORS:
        raise ValueError(
            f"out-of-distribution detector {kind!r} is not known ({', '.join(DETECTORS)})"
        )
    if classifier_layer(model) is None or len(held_out) < 10:
        logger.warning(
            "no out-of-distribution gate: %s",
            "the network names no classifier layer"
            if classifier_layer(model) is None
            else f"fewer than 10 {split} images",
        )
        return None, None
    if needs_stages(kind) and stage_modules(model) is None:
        logger.warning(
            "%s has no residual stages: the gate uses the Mahalanobis detector instead of %s",
            type(model).__name__,
            kind,
        )
        kind = "mahalanobis"
    try:
        detector = fit_detector(
            kind,
            observed(model, train, needs_stages(kind)),
            train.labels.cpu().numpy(),
            classifier_layer(model),
        )
        scores = detector.score(observed(model, held_out, detector.needs_stages))
    except ValueError as exc:  # no single pass of one row per image: no gate
        logger.warning("no out-of-distribution gate: %s", exc)
        return None, None
    value, rank, bound = certified_threshold(scores, FALSE_REJECTION, CONFIDENCE)
    shrinkage = getattr(detector, "shrinkage", None)
    gate = OODGate(
        threshold=value,
        quantile=rank / (len(scores) + 1),
        held_out=len(scores),
        kind=kind,
        rank=rank,
        false_rejection=bound,
        confidence=CONFIDENCE,
        shrinkage=shrinkage,
        split=split,
    )
    log = logger.info if bound <= FALSE_REJECTION else logger.warning
    log(
        "out-of-distribution gate: %s above %.4g (the %d-th smallest of %d %s images: at most %.1f%% of in-distribution images "
        "turned away, at %.0f%% confidence)",
        kind,
        value,
        rank,
        len(scores),
        split,
        100 * bound,
        100 * CONFIDENCE,
    )
    return gate, detector


def replace_gate(root: Path, gate: OODGate, detector: Detector) -> None:
    """Give the bundle at ``root`` another gate: its ``models/ood.pt`` and ``models/ood.npz``
    and the contract's ``ood`` entry (with the new files' digests). The model card is not
    rewritten: it still describes the gate the bundle was trained with."""
    root = Path(root)
    found, arrays = write_statistics(detector, root / "models")
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["deep_pneumonia"]["ood"] = replace(gate, digest=found, arrays_digest=arrays).to_json()
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def resident_splits(
    bundle: Path,
    data: Path,
    parts: tuple[str, ...] = ("train", "val", "calibration", "test"),
    layout: str = "auto",
) -> dict[str, Resident]:
    """The bundle's own splits of the dataset it was trained from (its ``configs/split.json``),
    decoded as training decoded them: what refitting a gate, or benchmarking one, reads.
    A part the bundle does not have (no calibration split) is left out.

    Raises:
        DatasetError: the dataset holds none of a part's images (another dataset).
    """
    from ..datasets import read_dataset
    from ..datasets.splits import split_subset
    from ..serving.bundle import load_bundle
    from .config import DataConfig
    from .data import load_split

    _, contract = load_bundle(bundle)
    split_file = json.loads((Path(bundle) / "configs" / "split.json").read_text())
    dataset = read_dataset(str(data), layout)
    config = DataConfig(root=str(data), image_size=contract.image_size)
    found = {}
    for part in parts:
        if split_file.get(part):
            subset = split_subset(dataset, split_file, part)
            found[part] = load_split(
                subset, tuple(range(len(subset.records))), config, f"decode {part}"
            )
    return found
