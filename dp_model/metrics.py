"""Classification metrics for long-tailed data, with bootstrap confidence intervals.

Accuracy is reported to compare with the paper; on a long tail it rewards predicting the
majority class, so checkpoints are selected on balanced accuracy (mean recall) or macro-F1.
Everything here is a pure function of labels, predictions and probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts, rows the true class, columns the predicted one."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(target, np.int64), np.asarray(pred, np.int64)), 1)
    return matrix


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def per_class(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall (sensitivity), specificity and F1 of each class (NaN where undefined)."""
    tp = np.diag(matrix).astype(np.float64)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    tn = matrix.sum() - tp - fp - fn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    with np.errstate(invalid="ignore"):
        f1 = np.where((precision + recall) > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(np.isnan(precision) | np.isnan(recall), np.nan, f1)
    return {
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
        "support": tp + fn,
    }


def roc_auc(target: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of binary ``target`` by ``scores`` (Mann-Whitney, ties counted half)."""
    target = np.asarray(target, bool)
    positives, negatives = int(target.sum()), int((~target).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = np.asarray(scores)[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[target].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curve(target: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every threshold, for plotting."""
    target = np.asarray(target, bool)
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    tps = np.concatenate([[0], np.cumsum(target[order])])
    fps = np.concatenate([[0], np.cumsum(~target[order])])
    return fps / max(1, int((~target).sum())), tps / max(1, int(target.sum()))


@dataclass(kw_only=True)
class Report:
    """Metrics of one evaluation.

    Attributes:
        classes: class names.
        accuracy, balanced_accuracy, macro_f1, macro_auc: scalars.
        per_class: precision, recall, specificity, f1, support, auc per class.
        confusion: the confusion matrix.
        intervals: 95 % bootstrap intervals of the scalars, ``name -> (low, high)``.
    """

    classes: tuple[str, ...]
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    macro_auc: float
    per_class: dict[str, list[float]]
    confusion: list[list[int]]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "macro_auc": self.macro_auc,
        }

    def table(self) -> str:
        """A markdown table of the per-class metrics and the scalars, for people."""
        lines = [
            "| class | support | precision | recall | specificity | F1 | ROC AUC (95 % CI) |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, name in enumerate(self.classes):
            values = [self.per_class[k][i] for k in ("precision", "recall", "specificity", "f1")]
            interval = self.intervals.get(f"auc {name}")
            auc = _fmt(self.per_class["auc"][i]) + (
                f" ({_fmt(interval[0])} to {_fmt(interval[1])})" if interval else ""
            )
            lines.append(
                f"| {name} | {int(self.per_class['support'][i])} | "
                + " | ".join(_fmt(v) for v in values)
                + f" | {auc} |"
            )
        lines.append("")
        for name, value in self.scalars().items():
            interval = self.intervals.get(name)
            ci = f" (95 % CI {_fmt(interval[0])} to {_fmt(interval[1])})" if interval else ""
            lines.append(f"- {name.replace('_', ' ')}: {_fmt(value)}{ci}")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


def _scalars(
    target: np.ndarray, probabilities: np.ndarray
) -> tuple[float, float, float, float, dict, np.ndarray]:
    num_classes = probabilities.shape[1]
    pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(target, pred, num_classes)
    stats = per_class(matrix)
    aucs = np.array([roc_auc(target == c, probabilities[:, c]) for c in range(num_classes)])
    accuracy = float(np.trace(matrix) / max(1, matrix.sum()))
    present = stats["support"] > 0
    balanced = float(np.nanmean(stats["recall"][present])) if present.any() else float("nan")
    macro_f1 = (
        float(np.nanmean(np.nan_to_num(stats["f1"][present]))) if present.any() else float("nan")
    )
    macro_auc = float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan")
    stats["auc"] = aucs
    return accuracy, balanced, macro_f1, macro_auc, stats, matrix


def evaluate(
    target: np.ndarray,
    probabilities: np.ndarray,
    classes: tuple[str, ...],
    bootstrap: int = 0,
    seed: int = 0,
) -> Report:
    """Metrics of ``probabilities`` ``(N, C)`` against ``target`` ``(N,)``.

    With ``bootstrap > 0``, 95 % percentile intervals from that many resamples of the images.
    Macro averages run over the classes present in ``target``; a class never predicted has
    precision undefined (n/a) and F1 0.
    """
    target, probabilities = np.asarray(target, np.int64), np.asarray(probabilities, np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] != target.shape[0]:
        raise ValueError(
            f"probabilities must be (N, C) with N = {target.shape[0]}, got {probabilities.shape}"
        )
    accuracy, balanced, macro_f1, macro_auc, stats, matrix = _scalars(target, probabilities)
    report = Report(
        classes=tuple(classes),
        accuracy=accuracy,
        balanced_accuracy=balanced,
        macro_f1=macro_f1,
        macro_auc=macro_auc,
        per_class={k: [float(x) for x in v] for k, v in stats.items()},
        confusion=matrix.tolist(),
    )
    if bootstrap > 0 and len(target) > 1:
        rng = np.random.default_rng(seed)
        draws = [
            _scalars(target[i], probabilities[i])
            for i in (rng.integers(0, len(target), len(target)) for _ in range(bootstrap))
        ]
        samples = np.array([d[:4] for d in draws])
        for column, name in enumerate(("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")):
            report.intervals |= _interval(name, samples[:, column])
        # Each class's ROC AUC gets its own interval, as the class-attention paper reports them.
        aucs = np.array([d[4]["auc"] for d in draws])
        for c, name in enumerate(report.classes):
            report.intervals |= _interval(f"auc {name}", aucs[:, c])
    return report


def _interval(name: str, values: np.ndarray) -> dict[str, tuple[float, float]]:
    """95 % percentile interval of the defined bootstrap values (none if there are none)."""
    values = values[~np.isnan(values)]
    return (
        {name: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))}
        if values.size
        else {}
    )


#: The IoU thresholds of CIA-Net's localization tables.
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of boolean masks ``(N, H, W)``, one value per image (0 when both are empty)."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    intersection = (predicted & truth).sum(axis=(1, 2))
    union = (predicted | truth).sum(axis=(1, 2))
    return np.where(union > 0, intersection / np.maximum(union, 1), 0.0)


def localization_accuracy(
    predicted: np.ndarray,
    truth: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
) -> dict[str, list[float]]:
    """Localization accuracy per class and threshold, as CIA-Net's Tables 1-3 report it.

    An image is localized correctly at ``T`` when the IoU of the predicted region (the
    union of everything the model marks, which may be several small rectangles) with the
    union of its ground-truth boxes exceeds ``T``. Accuracy is the share of the boxed test
    images of a class that are correct.

    Args:
        predicted: ``(N, H, W)`` boolean masks of the model's regions for each image's class.
        truth: ``(N, H, W)`` boolean masks of the ground-truth boxes (images without boxes
            are left out).
        labels: ``(N,)`` class index of each image.

    Returns:
        ``class -> [accuracy at each threshold]`` for every class with boxed images, and
        ``"mean"`` over those classes.
    """
    iou = mask_iou(predicted, truth)
    boxed = np.asarray(truth, bool).any(axis=(1, 2))
    labels = np.asarray(labels)
    out: dict[str, list[float]] = {}
    for c, name in enumerate(classes):
        chosen = boxed & (labels == c)
        if chosen.any():
            out[name] = [float((iou[chosen] > t).mean()) for t in thresholds]
    if out:
        out["mean"] = [float(np.mean([v[i] for v in out.values()])) for i in range(len(thresholds))]
    return out


#: The IoU thresholds of the summary that decides whether regions are shown (a subset of
#: :data:`IOU_THRESHOLDS`), and the keys of :func:`localization_figures`.
SUMMARY_THRESHOLDS = (0.1, 0.3, 0.5)
FIGURE_KEYS = tuple(f"iou>{t}" for t in SUMMARY_THRESHOLDS) + ("pointing",)


def pointing_game(maps: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Whether each map's maximum lies inside the truth (Zhang et al. 2016, without tolerance).

    A map whose maximum is shared by several pixels (a saturated sigmoid, a flat prior) scores
    the share of those pixels inside the truth: the expected hit of breaking the tie at
    random, so that a plateau is not decided by scan order.

    Args:
        maps: ``(N, H, W)`` scores.
        truth: ``(N, H, W)`` boolean masks.

    Returns:
        ``(N,)`` values in [0, 1].
    """
    maps, truth = np.asarray(maps, np.float32), np.asarray(truth, bool)
    flat = maps.reshape(len(maps), -1)
    peak = flat >= flat.max(axis=1, keepdims=True)
    return (peak & truth.reshape(len(truth), -1)).sum(axis=1) / np.maximum(peak.sum(axis=1), 1)


def localization_figures(
    iou: np.ndarray, pointing: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """The summary of per-image localization scores: the share of images with IoU above each
    of :data:`SUMMARY_THRESHOLDS`, and the pointing game, each averaged within a class and
    then over the classes present (as CIA-Net's "mean" row, so that the common classes do
    not decide alone). NaN without images."""
    iou, pointing, labels = (
        np.asarray(iou, np.float64),
        np.asarray(pointing, np.float64),
        np.asarray(labels),
    )
    present = np.unique(labels)
    if not len(present):
        return {key: float("nan") for key in FIGURE_KEYS}
    values = [*((iou > t).astype(np.float64) for t in SUMMARY_THRESHOLDS), pointing]
    return {
        key: float(np.mean([v[labels == c].mean() for c in present]))
        for key, v in zip(FIGURE_KEYS, values)
    }


def paired_difference_low(
    a: np.ndarray, b: np.ndarray, labels: np.ndarray, resamples: int = 1000, seed: int = 0
) -> float:
    """The lower end of the 95 % percentile bootstrap interval of ``mean_a - mean_b``, both
    class-averaged as :func:`localization_figures`, resampling images (paired: the same
    images for both). ``a`` and ``b`` are per-image scores (0/1 hits). NaN without images."""
    a, b, labels = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(labels)
    if not len(a):
        return float("nan")
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):
        index = rng.integers(0, len(a), len(a))
        chosen = labels[index]
        differences.append(
            np.mean(
                [(a[index][chosen == c] - b[index][chosen == c]).mean() for c in np.unique(chosen)]
            )
        )
    return float(np.percentile(differences, 2.5))
