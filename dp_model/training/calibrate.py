"""The end of ``dp-train``: what the contract learns from held-out images.

On the calibration split (the validation split when the run holds none out): the
temperature, the operating points (each where a one-sided Clopper-Pearson bound reaches its
target) and the threshold of the out-of-distribution gate (an order statistic with a bounded
false-rejection rate); on the training split: the feature statistics of the gate. On the
test split, reported only: the calibration error before and after.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..calibration import (
    CONFIDENCE,
    Reliability,
    certified_point,
    fit_temperature,
    probabilities,
    reliability,
)
from ..contract import Localization, ModelContract, OODGate, OperatingPoint, pneumonia_probability
from ..ood import (
    FALSE_REJECTION,
    FeatureStatistics,
    certified_threshold,
    classifier_layer,
    one_pass,
    penultimate,
)
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


def calibrated_outputs(model: nn.Module, data: Resident, contract: ModelContract, statistics: FeatureStatistics | None) -> tuple[np.ndarray, np.ndarray | None]:
    """What the node computes for each image of a split: the contract's calibrated
    probabilities ``(N, K)`` and the out-of-distribution scores ``(N,)`` (None without a gate)."""
    logits, features = outputs(model, data)
    calibrated = contract.probabilities(torch.from_numpy(logits)).numpy()
    return calibrated, None if statistics is None or features is None else statistics.scores(features)


@torch.no_grad()
def outputs(model: nn.Module, data: Resident, batch_size: int = 128) -> tuple[np.ndarray, torch.Tensor | None]:
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


@dataclass
class Fitted:
    """What the contract gets, and what the model card shows."""

    temperature: float
    calibration: dict
    operating_points: dict[str, OperatingPoint]
    ood: OODGate | None
    statistics: FeatureStatistics | None
    before: Reliability
    after: Reliability
    localization: Localization | None = None  # measured by :mod:`.regions`, carried to the contract
    logit_adjustment: tuple[float, ...] = ()


def fit(
    model: nn.Module, data: dict[str, Resident], classes: tuple[str, ...], normal: int, pneumonia: tuple[str, ...], multi_label: bool, seed: int = 0,
    offsets: tuple[float, ...] = (),
) -> Fitted:
    """Temperature, operating points and the out-of-distribution gate of a trained model,
    chosen on the calibration split (:func:`held_out_split`); ``offsets`` (the contract's
    ``logit_adjustment``) come off the logits before the temperature."""
    split = held_out_split(data)
    name = SPLIT_NAMES[split]
    val_logits, val_features = outputs(model, data[split])
    test_logits, _ = outputs(model, data["test"])
    shift = np.asarray(offsets or 0.0, np.float32)
    val_logits, test_logits = val_logits - shift, test_logits - shift
    val_labels, test_labels = data[split].labels.cpu().numpy(), data["test"].labels.cpu().numpy()
    outputs_order = tuple(c for i, c in enumerate(classes) if i != normal) if multi_label else classes

    def targets(labels: np.ndarray) -> np.ndarray:  # what the network's outputs are trained towards
        if not multi_label:
            return labels
        hot = np.zeros((len(labels), len(outputs_order)), np.float32)
        for row, label in enumerate(labels):
            if classes[label] in outputs_order:
                hot[row, outputs_order.index(classes[label])] = 1.0
        return hot

    temperature = fit_temperature(val_logits, targets(val_labels), multi_label)
    before = reliability(probabilities(test_logits, 1.0, multi_label), targets(test_labels), multi_label, seed=seed)
    after = reliability(probabilities(test_logits, temperature, multi_label), targets(test_labels), multi_label, seed=seed)
    calibration = {"method": f"temperature scaling on the {name} split", "split": name, "images": len(val_labels), "test_before": before.to_json(), "test_after": after.to_json()}
    logger.info("calibration: temperature %.3f; test ECE %.3f [%.3f, %.3f] -> %.3f [%.3f, %.3f]", temperature, before.ece, before.low, before.high, after.ece, after.low, after.high)

    scores = pneumonia_probability(probabilities(val_logits, temperature, multi_label), outputs_order, pneumonia, multi_label)
    is_pneumonia = np.isin(np.asarray(classes)[val_labels], pneumonia)
    points = _points(scores, is_pneumonia, name)
    gate, statistics = _gate(model, data["train"], val_features, classes, name)
    return Fitted(temperature, calibration, points, gate, statistics, before, after)


def _points(scores: np.ndarray, is_pneumonia: np.ndarray, split: str) -> dict[str, OperatingPoint]:
    """"present" and "triage", each where its one-sided lower bound reaches its target; a
    "present" target the split cannot certify is placed at its best bound and said so."""
    points: dict[str, OperatingPoint] = {}
    try:
        points["present"] = certified_point(scores, is_pneumonia, sensitivity=PRESENT_SENSITIVITY, split=split)
    except ValueError as exc:
        logger.warning("no operating points: %s; the node uses 0.5", exc)
        return points
    try:
        points["triage"] = certified_point(scores, is_pneumonia, specificity=TRIAGE_SPECIFICITY, split=split)
        if points["triage"].threshold < points["present"].threshold:  # a flag is never raised below "present"
            del points["triage"]
    except ValueError as exc:
        logger.warning("no triage point: %s", exc)
    for key, point in points.items():
        log = logger.info if point.certified else logger.warning
        log("operating point %s: %.4f (%s; sensitivity %.3f, specificity %.3f there)", key, point.threshold, point.target, point.sensitivity, point.specificity)
    return points


def _gate(model: nn.Module, train: Resident, val_features: torch.Tensor | None, classes: tuple[str, ...], split: str = "validation") -> tuple[OODGate | None, FeatureStatistics | None]:
    if val_features is None or len(val_features) < 10:
        logger.warning("no out-of-distribution gate: %s", "the network names no classifier layer" if val_features is None else f"fewer than 10 {split} images")
        return None, None
    _, train_features = outputs(model, train)
    statistics = FeatureStatistics.fit(train_features, train.labels.cpu().numpy())
    held_out = statistics.scores(val_features)
    value, rank, bound = certified_threshold(held_out, FALSE_REJECTION, CONFIDENCE)
    gate = OODGate(value, rank / (len(held_out) + 1), len(held_out), rank=rank, false_rejection=bound, confidence=CONFIDENCE, shrinkage=statistics.shrinkage, split=split)
    log = logger.info if bound <= FALSE_REJECTION else logger.warning
    log("out-of-distribution gate: Mahalanobis distance above %.1f (the %d-th smallest of %d %s images: at most %.1f%% of in-distribution images "
        "turned away, at %.0f%% confidence; covariance shrinkage %.3f)", value, rank, len(held_out), split, 100 * bound, 100 * CONFIDENCE, statistics.shrinkage)  # fmt: skip
    return gate, statistics

