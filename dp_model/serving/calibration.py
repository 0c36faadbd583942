"""Calibration: temperature scaling (Guo et al., ICML 2017), expected calibration error,
operating points.

A network trained with focal and class-balanced losses on a small split is rarely
calibrated: its probabilities are scores, not frequencies. One temperature ``T``, fitted on
the calibration split by minimising the negative log-likelihood, divides the logits before
the softmax (or each sigmoid). That keeps each image's argmax and the ranking of the images
by any single class's probability (and by a single sigmoid), but not the ranking by a sum
of softmax probabilities: the probability of pneumonia, ``1 - p(normal)`` over five classes,
of logits (0, 3, -10, -10, -10) is above that of (0, 1, 1, 1, -10) at T = 1 and below it at
T = 10. So the AUC of the served (scaled) probability of pneumonia is measured on its own
(:mod:`dp_model.serving.served`), not taken from the unscaled outputs.

The expected calibration error (ECE) of the top-class probability is measured before and
after, with a bootstrap interval, on held-out images; the binary calibration of the
probability of pneumonia, the number the node states, is in :mod:`dp_model.serving.served`.

The operating points are placed where a one-sided Clopper-Pearson lower bound of the
targeted rate reaches the target (:func:`certified_point`), not where the point estimate
does: with 20 positives, the threshold whose observed sensitivity is 0.90 has a true
sensitivity below 0.85 about a third of the time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import TEMPERATURE_RANGE, OperatingPoint

logger = logging.getLogger(__name__)

#: Bins of the reliability diagram and of the ECE.
BINS = 15
#: The temperature is searched within these bounds.
T_MIN, T_MAX = TEMPERATURE_RANGE


def _nll(logits: Tensor, targets: Tensor, multi_label: bool) -> Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    return F.cross_entropy(logits, targets)


def fit_temperature(logits: np.ndarray, targets: np.ndarray, multi_label: bool = False) -> float:
    """The temperature minimising the held-out NLL of ``logits`` ``(N, K)``.

    ``targets``: class indices ``(N,)``, or ``(N, K)`` multi-hot for sigmoid outputs.
    """
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets))
    if len(x) < 2 or not torch.isfinite(x).all():
        logger.warning(
            "calibration: %s; temperature 1",
            "non-finite logits" if len(x) else "fewer than two held-out images",
        )
        return 1.0
    if not multi_label and len(torch.unique(y)) < 2:
        logger.warning("calibration: the held-out split holds one class only; temperature 1")
        return 1.0
    # A golden-section search on log T: the NLL is unimodal in T, and this needs no step size.
    lo, hi = np.log(T_MIN), np.log(T_MAX)
    ratio = (np.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return float(_nll(x / np.exp(log_t), y, multi_label))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    found = float(np.exp((lo + hi) / 2))
    if not T_MIN * 1.01 < found < T_MAX / 1.01:
        logger.warning(
            "calibration: the temperature %.3g lies at the bound of the search; the held-out split says little",
            found,
        )
    return found


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the bin-weighted gap between confidence and accuracy."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if len(confidence) == 0:
        return float("nan")
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total)


@dataclass(frozen=True)
class Reliability:
    """Top-class confidence and correctness of each image, and their ECE with an interval."""

    confidence: np.ndarray
    correct: np.ndarray
    ece: float
    low: float
    high: float

    def to_json(self) -> dict:
        return {
            "ece": round(self.ece, 4),
            "ece_low": round(self.low, 4),
            "ece_high": round(self.high, 4),
            "images": len(self.confidence),
        }


def reliability(
    probs: np.ndarray,
    labels: np.ndarray,
    multi_label: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Reliability:
    """Top-label reliability of ``probs`` ``(N, K)`` against class indices (or multi-hot rows)."""
    probs = np.asarray(probs, np.float64)
    if multi_label:  # every (image, finding) pair is a binary forecast
        p, truth = probs.ravel(), np.asarray(labels, np.float64).ravel() >= 0.5
        confidence, correct = np.where(p >= 0.5, p, 1 - p), ((p >= 0.5) == truth).astype(np.float64)
    else:
        confidence, correct = (
            probs.max(axis=1),
            (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64),
        )
    value = ece(confidence, correct)
    rng = np.random.default_rng(seed)
    draws = (
        [
            ece(confidence[i], correct[i])
            for i in (rng.integers(0, len(confidence), len(confidence)) for _ in range(bootstrap))
        ]
        if len(confidence)
        else [np.nan]
    )
    low, high = np.nanpercentile(draws, [2.5, 97.5]) if len(confidence) else (np.nan, np.nan)
    return Reliability(confidence, correct, value, float(low), float(high))


def operating_point(
    scores: np.ndarray,
    positive: np.ndarray,
    sensitivity: float | None = None,
    specificity: float | None = None,
) -> OperatingPoint:
    """The threshold on ``scores`` for a target sensitivity (the highest threshold reaching it)
    or a target specificity (the lowest threshold reaching it), with what it gives there."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    _check_target(scores, positive, sensitivity, specificity)
    scores = np.clip(scores, 1e-6, 1 - 1e-6)  # a threshold lies strictly between 0 and 1
    candidates = np.unique(scores)
    sens = np.array([(scores[positive] >= t).mean() for t in candidates])
    spec = np.array([(scores[~positive] < t).mean() for t in candidates])
    if sensitivity is not None:
        chosen = int(np.nonzero(sens >= sensitivity)[0].max())
        target = f"sensitivity {sensitivity:.2f} on validation"
    else:
        reaching = np.nonzero(spec >= specificity)[0]
        if not len(reaching):
            raise ValueError(
                f"no threshold reaches a specificity of {specificity:.2f} on the validation split"
            )
        chosen = int(reaching.min())
        target = f"specificity {specificity:.2f} on validation"
    return OperatingPoint(
        threshold=float(candidates[chosen]),
        target=target,
        sensitivity=round(float(sens[chosen]), 4),
        specificity=round(float(spec[chosen]), 4),
    )


#: The one-sided confidence of the operating points' lower bounds.
CONFIDENCE = 0.95
#: How far below the score it is placed at a certified threshold lies: far above float32's
#: rounding of a probability (6e-8 near 0.5), far below any difference between two images.
THRESHOLD_MARGIN = 1e-6


def certified_point(
    scores: np.ndarray,
    positive: np.ndarray,
    sensitivity: float | None = None,
    specificity: float | None = None,
    confidence: float = CONFIDENCE,
    split: str = "calibration",
) -> OperatingPoint:
    """The threshold on ``scores`` where the one-sided Clopper-Pearson lower bound (at
    ``confidence``) of the sensitivity, or of the specificity, reaches the target.

    For a sensitivity: the highest such threshold (the fewest false positives). When no
    threshold reaches it (fewer than ``log(1 - confidence) / log(target)`` positives: 29 for
    0.90 at 95 %), the threshold with the largest bound, the lowest positive's score, marked
    not certified: the node needs a "present" point, and this one misses the fewest.
    For a specificity: the lowest such threshold; none reaching it raises (a triage flag is
    optional, and one that cannot be backed is left out).

    Raises:
        ValueError: no target or both, a target outside (0, 1], non-finite scores, one
            class only, or a specificity no threshold can certify (the message says why).
    """
    from .served import lower_bound

    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    _check_target(scores, positive, sensitivity, specificity)
    scores = np.clip(scores, 1e-6, 1 - 1e-6)  # a threshold lies strictly between 0 and 1
    # the last one is above every score
    candidates = np.unique(np.append(scores, min(1 - 1e-7, scores.max() + 1e-7)))
    # Each threshold sits a margin below the score it is placed at: the node computes the same
    # image's score in float32, in another batch, and may land a few units of the last place
    # lower; on the threshold itself it would turn a positive the bound counted into a negative.
    candidates = candidates - THRESHOLD_MARGIN
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    detected = np.array([int((scores[positive] >= t).sum()) for t in candidates])
    cleared = np.array([int((scores[~positive] < t).sum()) for t in candidates])
    if sensitivity is not None:
        bounds = lower_bound(detected, n_pos, confidence)
        reaching = np.nonzero(bounds >= sensitivity)[0]
        chosen = (
            int(reaching.max())
            if len(reaching)
            else int(np.nonzero(bounds == bounds.max())[0].max())
        )
        name, target_value, count = "sensitivity", sensitivity, f"{n_pos} positives"
    else:
        bounds = lower_bound(cleared, n_neg, confidence)
        reaching = np.nonzero(bounds >= specificity)[0]
        if not len(reaching):
            raise ValueError(
                f"no threshold certifies a specificity of {specificity:.2f} at {confidence:.0%} on the {split} split's {n_neg} negatives "
                f"(the bound of {n_neg} of {n_neg} is {lower_bound(n_neg, n_neg, confidence):.3f})"
            )
        chosen = int(reaching.min())
        name, target_value, count = "specificity", specificity, f"{n_neg} negatives"
    certified = bool(bounds[chosen] >= target_value)
    target = (
        f"{name} {target_value:.2f} at {confidence:.0%} confidence on the {split} split ({count})"
    )
    if not certified:
        target += f": not certified, the best lower bound is {bounds[chosen]:.3f}"
    return OperatingPoint(
        threshold=float(candidates[chosen]),
        target=target,
        sensitivity=round(detected[chosen] / n_pos, 4),
        specificity=round(cleared[chosen] / n_neg, 4),
        lower_bound=float(bounds[chosen]),
        confidence=confidence,
        certified=certified,
        split=split,
        positives=n_pos,
        negatives=n_neg,
    )


def _check_target(
    scores: np.ndarray, positive: np.ndarray, sensitivity: float | None, specificity: float | None
) -> None:
    if (sensitivity is None) == (specificity is None):
        raise ValueError("give a target sensitivity or a target specificity")
    target_value = sensitivity if sensitivity is not None else specificity
    if not 0 < target_value <= 1:
        raise ValueError(f"a target sensitivity or specificity lies in (0, 1], got {target_value}")
    if not np.isfinite(scores).all():
        raise ValueError("non-finite scores on the held-out split")
    if positive.all() or not positive.any():
        raise ValueError(
            "the held-out split needs images with and without pneumonia to place an operating point"
        )
