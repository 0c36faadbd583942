"""The end of ``dp-train``: what the contract learns from held-out images.

On the validation split: the temperature, the operating points and the threshold of the
out-of-distribution gate; on the training split: the feature statistics of the gate. On
the test split, reported only: the calibration error before and after.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..calibration import Reliability, fit_temperature, operating_point, probabilities, reliability
from ..contract import Localization, OODGate, OperatingPoint, pneumonia_probability
from ..ood import QUANTILE, FeatureStatistics, classifier_layer, one_pass, penultimate, threshold
from .data import Resident

logger = logging.getLogger(__name__)

#: What the operating points are chosen for, on validation.
PRESENT_SENSITIVITY = 0.90
TRIAGE_SPECIFICITY = 0.95


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
    """Temperature, operating points and the out-of-distribution gate of a trained model;
    ``offsets`` (the contract's ``logit_adjustment``) come off the logits before the temperature."""
    val_logits, val_features = outputs(model, data["val"])
    test_logits, _ = outputs(model, data["test"])
    val_logits, test_logits = val_logits - np.asarray(offsets or 0.0, np.float32), test_logits - np.asarray(offsets or 0.0, np.float32)
    val_labels, test_labels = data["val"].labels.cpu().numpy(), data["test"].labels.cpu().numpy()
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
    calibration = {"method": "temperature scaling on the validation split", "test_before": before.to_json(), "test_after": after.to_json()}
    logger.info("calibration: temperature %.3f; test ECE %.3f [%.3f, %.3f] -> %.3f [%.3f, %.3f]", temperature, before.ece, before.low, before.high, after.ece, after.low, after.high)

    scores = pneumonia_probability(probabilities(val_logits, temperature, multi_label), outputs_order, pneumonia, multi_label)
    is_pneumonia = np.isin(np.asarray(classes)[val_labels], pneumonia)
    points: dict[str, OperatingPoint] = {}
    try:
        points["present"] = operating_point(scores, is_pneumonia, sensitivity=PRESENT_SENSITIVITY)
        points["triage"] = operating_point(scores, is_pneumonia, specificity=TRIAGE_SPECIFICITY)
        if points["triage"].threshold < points["present"].threshold:  # a flag is never raised below "present"
            del points["triage"]
    except ValueError as exc:
        logger.warning("no operating points: %s; the node uses 0.5", exc)
    for name, point in points.items():
        logger.info("operating point %s: %.4f (%s; sensitivity %.3f, specificity %.3f)", name, point.threshold, point.target, point.sensitivity, point.specificity)

    gate, statistics = _gate(model, data["train"], val_features, classes)
    return Fitted(temperature, calibration, points, gate, statistics, before, after)


def _gate(model: nn.Module, train: Resident, val_features: torch.Tensor | None, classes: tuple[str, ...]) -> tuple[OODGate | None, FeatureStatistics | None]:
    if val_features is None or len(val_features) < 10:
        logger.warning("no out-of-distribution gate: %s", "the network names no classifier layer" if val_features is None else "fewer than 10 validation images")
        return None, None
    _, train_features = outputs(model, train)
    statistics = FeatureStatistics.fit(train_features, train.labels.cpu().numpy())
    held_out = statistics.scores(val_features)
    gate = OODGate(round(threshold(held_out, QUANTILE), 4), QUANTILE, len(held_out))
    logger.info("out-of-distribution gate: Mahalanobis distance above %.1f (the %.0f%% quantile of %d validation images)", gate.threshold, 100 * QUANTILE, len(held_out))
    return gate, statistics

