"""The served decision, measured: what the node reports for each image, scored against the truth.

The node's answer for an image is the contract's rule (:func:`~dp_model.serving.contract.decide`) at
the bundle's "present" and "triage" points, on the calibrated (temperature-scaled)
probabilities, behind the out-of-distribution gate: an image whose score lies above the
gate's threshold, or is not a number, is not assessed and nothing is asserted about it.
:func:`served_decisions` runs exactly that rule on per-image probabilities and scores, and
:func:`evaluate_served` scores it:

* sensitivity and specificity at each point, with exact (Clopper-Pearson) intervals, on every
  image and on the assessed images alone. On every image, one the gate stops is not reported
  positive: it costs sensitivity, never specificity, as it would in the clinic;
* the abstention rate (images not assessed), with its interval;
* the binary calibration of the probability of pneumonia, the number the SR states: Brier
  score and the expected calibration error over equal-mass bins (fixed-width bins leave most
  of a small test split in one or two bins);
* the AUC of that served probability, with a bootstrap interval. Temperature scaling can
  change the ranking by a sum of softmax probabilities (:mod:`dp_model.serving.calibration`), so this
  is not the AUC of the unscaled outputs.

The model card (on the test split) and ``dp-train evaluate`` (on any dataset) both call
:func:`evaluate_served`; the per-image scores behind a card are saved next to it
(:func:`save_scores`), so that each figure can be recomputed (:func:`evaluate_scores_file`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..metrics import roc_auc
from .contract import ModelContract

__all__ = [
    "Block",
    "Proportion",
    "Served",
    "ServedReport",
    "adaptive_ece",
    "admitted",
    "brier",
    "clopper_pearson",
    "evaluate_scores_file",
    "evaluate_served",
    "is_pneumonia",
    "lower_bound",
    "reliability_bins",
    "reliability_diagram",
    "save_scores",
    "served_decisions",
]

#: Two-sided confidence of every interval reported here.
CONFIDENCE = 0.95
#: Equal-mass bins of the ECE and the reliability diagram.
BINS = 10


# --- exact binomial intervals -------------------------------------------------------------------------


def clopper_pearson(
    successes: int, total: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The exact two-sided interval of a proportion (Clopper and Pearson, 1934); NaN for no trials."""
    from scipy.stats import beta

    if total <= 0:
        return float("nan"), float("nan")
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, total - successes + 1))
    high = (
        1.0
        if successes == total
        else float(beta.ppf(1 - alpha / 2, successes + 1, total - successes))
    )
    return low, high


def lower_bound(successes, total: int, confidence: float = CONFIDENCE):
    """The one-sided Clopper-Pearson lower bound at ``confidence`` of ``successes`` of ``total``
    (an array of counts gives an array); NaN for no trials."""
    from scipy.stats import beta

    k = np.asarray(successes, np.float64)
    if total <= 0:
        bound = np.full(k.shape, np.nan)
    else:
        with np.errstate(invalid="ignore"):
            bound = np.where(k > 0, beta.ppf(1 - confidence, np.maximum(k, 1), total - k + 1), 0.0)
    return float(bound) if bound.ndim == 0 else bound


@dataclass(frozen=True)
class Proportion:
    """``successes`` of ``total``, and its exact interval."""

    successes: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.successes / self.total if self.total else float("nan")

    def to_json(self) -> dict:
        return {
            "successes": self.successes,
            "total": self.total,
            "value": _number(self.value),
            "low": _number(self.low),
            "high": _number(self.high),
        }

    def text(self) -> str:
        return (
            "n/a (no images)"
            if not self.total
            else f"{self.value:.3f} ({self.low:.3f} to {self.high:.3f})"
        )


def proportion(hits: np.ndarray, confidence: float = CONFIDENCE) -> Proportion:
    """The share of true entries of a boolean array, with its Clopper-Pearson interval."""
    hits = np.asarray(hits, bool)
    k, n = int(hits.sum()), int(hits.size)
    return Proportion(k, n, *clopper_pearson(k, n, confidence))


# --- the node's rule, image by image ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Served:
    """What the node reports for each image: arrays ``(N,)`` (one :class:`~dp_model.serving.contract.Decision` each)."""

    pneumonia_probability: np.ndarray
    assessed: np.ndarray
    positive: np.ndarray
    triage: np.ndarray
    #: the finding the node names (the most probable pneumonia class when positive, the
    #: normal class otherwise, and for an image the gate turned away)
    label: np.ndarray
    #: the findings the report asserts, a tuple of class names each (empty when negative)
    findings: np.ndarray


def admitted(ood_scores: np.ndarray | None, contract: ModelContract) -> np.ndarray | None:
    """Whether the gate lets each image through, as the node decides it: no gate (or no
    scores) lets everything through; a score above the threshold, or NaN, does not pass
    (:meth:`~dp_model.serving.contract.ModelContract.admits`)."""
    if ood_scores is None or contract.ood is None:
        return None
    return contract.admits(np.asarray(ood_scores, np.float64))


def served_decisions(
    probabilities: np.ndarray, ood_scores: np.ndarray | None, contract: ModelContract
) -> Served:
    """The node's answers for calibrated ``probabilities`` ``(N, K)`` over the contract's outputs
    and out-of-distribution ``ood_scores`` ``(N,)`` (None: no gate), at the bundle's points."""
    probabilities = np.asarray(probabilities, np.float64)
    gate = admitted(ood_scores, contract)
    assessed = np.ones(len(probabilities), bool) if gate is None else gate
    decisions = [contract.decide(row, assessed=bool(a)) for row, a in zip(probabilities, assessed)]
    return Served(
        pneumonia_probability=np.array([d.pneumonia_probability for d in decisions], np.float64),
        assessed=assessed,
        positive=np.array([d.positive for d in decisions], bool),
        triage=np.array([d.triage for d in decisions], bool),
        label=np.array([d.label for d in decisions], dtype=object),
        findings=_objects([tuple(name for name, _ in d.findings) for d in decisions]),
    )


def _objects(values: list) -> np.ndarray:
    """``values`` as a one-dimensional object array (tuples stay whole, whatever their length)."""
    found = np.empty(len(values), dtype=object)
    found[:] = values
    return found


def is_pneumonia(labels: np.ndarray, contract: ModelContract) -> np.ndarray:
    """Whether each class index in ``labels`` is one of the contract's pneumonia classes."""
    return np.isin(np.asarray(contract.classes)[np.asarray(labels, np.int64)], contract.pneumonia)


# --- calibration of a binary probability -------------------------------------------------------------


def brier(probability: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared difference between the probability and the 0/1 outcome (NaN for no images)."""
    p, y = np.asarray(probability, np.float64), np.asarray(truth, np.float64)
    return float(np.mean((p - y) ** 2)) if len(p) else float("nan")


def _equal_mass(probability: np.ndarray, bins: int) -> list[np.ndarray]:
    order = np.argsort(np.asarray(probability, np.float64), kind="stable")
    return [part for part in np.array_split(order, min(bins, len(order))) if len(part)]


def reliability_bins(
    probability: np.ndarray, truth: np.ndarray, bins: int = BINS, confidence: float = CONFIDENCE
) -> list[dict]:
    """Equal-mass bins of the probability: each bin's images, mean probability, observed
    frequency and the frequency's Clopper-Pearson interval."""
    p, y = np.asarray(probability, np.float64), np.asarray(truth, bool)
    out = []
    for part in _equal_mass(p, bins):
        share = proportion(y[part], confidence)
        out.append(
            {
                "images": len(part),
                "mean_probability": float(p[part].mean()),
                "frequency": share.value,
                "low": share.low,
                "high": share.high,
            }
        )
    return out


def adaptive_ece(probability: np.ndarray, truth: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error over equal-mass bins: the image-weighted gap between each
    bin's mean probability and its observed frequency (NaN for no images)."""
    found = reliability_bins(probability, truth, bins)
    total = sum(b["images"] for b in found)
    return (
        float(sum(b["images"] / total * abs(b["mean_probability"] - b["frequency"]) for b in found))
        if total
        else float("nan")
    )


def _auc_interval(
    probability: np.ndarray, truth: np.ndarray, bootstrap: int, seed: int, confidence: float
) -> tuple[float, float, float]:
    value = roc_auc(truth, probability)
    if bootstrap <= 0 or np.isnan(value):
        return value, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            roc_auc(truth[i], probability[i])
            for i in (rng.integers(0, len(truth), len(truth)) for _ in range(bootstrap))
        ]
    )
    draws = draws[~np.isnan(draws)]
    tail = 100 * (1 - confidence) / 2
    return (
        (value, *map(float, np.percentile(draws, [tail, 100 - tail])))
        if len(draws)
        else (value, float("nan"), float("nan"))
    )


# --- the report ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Block:
    """The served decision on one set of images (every image, or the assessed ones).

    Attributes:
        sensitivity, specificity: per operating point ("present", "triage"): the share of
            pneumonia images reported positive (flagged), and of the others not.
        brier, ece: binary calibration of the probability of pneumonia.
        auc, auc_low, auc_high: of the probability of pneumonia, with a bootstrap interval.
    """

    images: int
    positives: int
    negatives: int
    sensitivity: dict[str, Proportion]
    specificity: dict[str, Proportion]
    brier: float
    ece: float
    auc: float
    auc_low: float
    auc_high: float

    def to_json(self) -> dict:
        points = {
            name: {
                "sensitivity": self.sensitivity[name].to_json(),
                "specificity": self.specificity[name].to_json(),
            }
            for name in self.sensitivity
        }
        scalars = {
            k: _number(getattr(self, k)) for k in ("brier", "ece", "auc", "auc_low", "auc_high")
        }
        return (
            {"images": self.images, "positives": self.positives, "negatives": self.negatives}
            | points
            | scalars
        )


@dataclass(frozen=True, kw_only=True)
class ServedReport:
    """:func:`evaluate_served`'s answer."""

    thresholds: dict[str, float]
    abstention: Proportion
    abstention_positives: Proportion
    abstention_negatives: Proportion
    all: Block
    assessed: Block
    #: of the pneumonia images the node reports positive, the share whose named type (the
    #: finding in the SR and on the overlay) is the true one; None with one pneumonia class
    type_correct: Proportion | None = None
    bins: int
    confidence: float
    temperature: float

    def to_json(self) -> dict:
        return {
            "rule": "dp_model.serving.contract.decide at the bundle's points, behind its out-of-distribution gate",
            "confidence": self.confidence,
            "interval": "Clopper-Pearson (exact) for proportions, percentile bootstrap for the AUC",
            "ece_bins": f"{self.bins} equal-mass",
            "temperature": self.temperature,
            "thresholds": dict(self.thresholds),
            "abstention": self.abstention.to_json(),
            "abstention_positives": self.abstention_positives.to_json(),
            "abstention_negatives": self.abstention_negatives.to_json(),
            "all": self.all.to_json(),
            "assessed": self.assessed.to_json(),
            "type_among_served_positives": None
            if self.type_correct is None
            else self.type_correct.to_json(),
        }

    def table(self) -> str:
        """Markdown for people: the points' rates with intervals, abstention, calibration."""
        level = f"{self.confidence:.0%}"
        lines = [
            f"| point | threshold | images | sensitivity ({level} CI) | specificity ({level} CI) |",
            "|---|---|---|---|---|",
        ]
        for name, threshold in self.thresholds.items():
            for label, block in (("every image", self.all), ("assessed", self.assessed)):
                lines.append(
                    f"| {name} | {threshold:.4f} | {label} ({block.images}) | {block.sensitivity[name].text()} | {block.specificity[name].text()} |"
                )
        a = self.abstention
        lines += [
            "",
            f"- not assessed: {a.successes} of {a.total}, {a.text()}; {self.abstention_positives.successes} of {self.abstention_positives.total} "
            f"with pneumonia, {self.abstention_negatives.successes} of {self.abstention_negatives.total} without",
        ]
        if self.type_correct is not None:
            t = self.type_correct
            lines.append(
                f"- type named right: {t.successes} of {t.total} pneumonia images reported positive, {t.text()}"
            )
        for label, block in (("assessed images", self.assessed), ("every image", self.all)):
            auc = (
                "n/a"
                if np.isnan(block.auc)
                else f"{block.auc:.3f}"
                + (
                    ""
                    if np.isnan(block.auc_low)
                    else f" ({level} bootstrap CI {block.auc_low:.3f} to {block.auc_high:.3f})"
                )
            )
            lines.append(
                f"- probability of pneumonia ({label}, {block.images}): Brier {_text(block.brier)}, ECE {_text(block.ece)} ({self.bins} equal-mass bins), AUC {auc}"
            )
        return "\n".join(lines)


def _block(
    served: Served,
    truth: np.ndarray,
    keep: np.ndarray,
    bootstrap: int,
    seed: int,
    bins: int,
    confidence: float,
    points: tuple[str, ...],
) -> Block:
    y, p = truth[keep], served.pneumonia_probability[keep]
    flags = {"present": served.positive[keep], "triage": served.triage[keep]}
    sensitivity = {name: proportion(flags[name][y], confidence) for name in points}
    specificity = {name: proportion(~flags[name][~y], confidence) for name in points}
    auc, auc_low, auc_high = _auc_interval(p, y, bootstrap, seed, confidence)
    return Block(
        images=int(keep.sum()),
        positives=int(y.sum()),
        negatives=int((~y).sum()),
        sensitivity=sensitivity,
        specificity=specificity,
        brier=brier(p, y),
        ece=adaptive_ece(p, y, bins),
        auc=auc,
        auc_low=auc_low,
        auc_high=auc_high,
    )


def evaluate_served(
    probabilities: np.ndarray,
    ood_scores: np.ndarray | None,
    labels: np.ndarray,
    contract: ModelContract,
    bootstrap: int = 1000,
    seed: int = 0,
    bins: int = BINS,
    confidence: float = CONFIDENCE,
) -> ServedReport:
    """Score the node's rule against the truth.

    Args:
        probabilities: ``(N, K)`` calibrated probabilities over ``contract.output_classes``
            (:meth:`~dp_model.serving.contract.ModelContract.probabilities` of the logits).
        ood_scores: ``(N,)`` out-of-distribution scores (None: no gate).
        labels: ``(N,)`` class indices into ``contract.classes``.
        bootstrap: resamples of the AUC's interval (0: none).
    """
    served = served_decisions(probabilities, ood_scores, contract)
    truth = is_pneumonia(labels, contract)
    if len(truth) != len(served.assessed):
        raise ValueError(f"{len(truth)} labels for {len(served.assessed)} images")
    points = ("present", "triage") if contract.triage_point is not None else ("present",)
    thresholds = {"present": contract.present_point.threshold} | (
        {"triage": contract.triage_point.threshold} if contract.triage_point else {}
    )
    every = np.ones(len(truth), bool)
    typed = served.positive & truth
    named_right = (
        served.label[typed] == np.asarray(contract.classes, dtype=object)[np.asarray(labels)[typed]]
    )
    type_correct = (
        proportion(named_right.astype(bool), confidence) if len(contract.pneumonia) > 1 else None
    )
    return ServedReport(
        thresholds=thresholds,
        abstention=proportion(~served.assessed, confidence),
        abstention_positives=proportion(~served.assessed[truth], confidence),
        abstention_negatives=proportion(~served.assessed[~truth], confidence),
        all=_block(served, truth, every, bootstrap, seed, bins, confidence, points),
        assessed=_block(served, truth, served.assessed, bootstrap, seed, bins, confidence, points),
        type_correct=type_correct,
        bins=bins,
        confidence=confidence,
        temperature=contract.temperature,
    )


# --- per-image scores on disk, and the reliability diagram -----------------------------------------------


def scores_path(bundle: Path, split: str) -> Path:
    """Where a bundle keeps the per-image scores of ``split`` (``test``, ``val``,
    ``calibration``): ``docs/scores_<split>.npz``, written by :func:`save_scores`. The node
    reads the validation split's as its reference population (:mod:`pacs_node.drift`)."""
    return Path(bundle) / "docs" / f"scores_{split}.npz"


def save_scores(
    path: Path,
    ids: list[str],
    labels: np.ndarray,
    probabilities: np.ndarray,
    ood_scores: np.ndarray | None,
    contract: ModelContract,
) -> Path:
    """Per-image scores as ``.npz`` (no pickles): ``ids`` (as given: a bundle passes the hashed
    ids of ``split.json``), ``labels`` (class indices), ``classes``, ``outputs``, calibrated
    ``probabilities``, ``pneumonia_probability``, ``ood_score`` (NaN: no gate), and the node's
    ``assessed``, ``positive`` and ``triage``."""
    served = served_decisions(probabilities, ood_scores, contract)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        ids=np.asarray(ids, dtype=str),
        labels=np.asarray(labels, np.int64),
        classes=np.asarray(contract.classes, dtype=str),
        outputs=np.asarray(contract.output_classes, dtype=str),
        probabilities=np.asarray(probabilities, np.float64),
        pneumonia_probability=served.pneumonia_probability,
        ood_score=np.full(len(served.assessed), np.nan)
        if ood_scores is None
        else np.asarray(ood_scores, np.float64),
        assessed=served.assessed,
        positive=served.positive,
        triage=served.triage,
        temperature=np.float64(contract.temperature),
    )
    return path


def evaluate_scores_file(path: Path, contract: ModelContract, **options) -> ServedReport:
    """:func:`evaluate_served` on a file of :func:`save_scores` (a NaN score: no gate, as saved)."""
    with np.load(path, allow_pickle=False) as saved:
        scores = saved["ood_score"]
        return evaluate_served(
            saved["probabilities"],
            None if np.isnan(scores).all() else scores,
            saved["labels"],
            contract,
            **options,
        )


def reliability_diagram(
    probability: np.ndarray, truth: np.ndarray, path: Path, title: str, bins: int = BINS
) -> Path:
    """Observed frequency against mean probability in equal-mass bins, with each bin's
    Clopper-Pearson interval, and the diagonal of perfect calibration; as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = reliability_bins(probability, truth, bins)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    if found:
        x = np.array([b["mean_probability"] for b in found])
        y = np.array([b["frequency"] for b in found])
        error = np.array(
            [
                [b["frequency"] - b["low"] for b in found],
                [b["high"] - b["frequency"] for b in found],
            ]
        )
        ax.errorbar(
            x,
            y,
            yerr=error,
            fmt="o",
            capsize=3,
            label=f"{len(found)} equal-mass bins, {CONFIDENCE:.0%} CI",
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="served probability of pneumonia",
        ylabel="observed share with pneumonia",
    )
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _text(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"
