"""The model contract: everything the node needs to know about a model, and the one decision rule.

What travels with the weights (in ``configs/metadata.json`` under ``deep_pneumonia``, and
``models/ood.pt`` for the feature statistics):

* the classes, the normal class, and which classes mean *pneumonia*, declared by the
  dataset layout (in the RSNA layout "No Lung Opacity / Not Normal" is not pneumonia);
* the input geometry and the network's architecture and options;
* the calibration: a temperature applied to the logits before the softmax or sigmoid;
* the operating points: "present" (for a stated sensitivity) and "triage" (for a stated
  specificity), each placed where a one-sided Clopper-Pearson lower bound reaches its target
  on the calibration split (bundles written before: the point estimate on validation);
* the out-of-distribution gate: a threshold on a detector's score (``kind``; bundles written
  before name the Mahalanobis distance of the penultimate features), an order statistic of
  held-out in-distribution images chosen so that its false-rejection rate is bounded with
  stated confidence;
* the localization: which map the lesion regions come from, how well each map source and a
  fixed prior map localized the boxed validation and test images, and whether the regions
  earned their place on a film (:class:`Localization`);
* the logit adjustment: per-output offsets subtracted before calibration (class attention's
  ``log c_i``, which undoes the positive weights of its loss);
* the sizes of the splits that trained, selected, calibrated and tested the model.

The node and evaluation import this module, never the training code; it imports no PyTorch
(the node serving an ONNX graph runs without it). The contract states
its ``format`` (:data:`FORMAT`); one written before the format was recorded is format 1 and
is migrated on load by :func:`_migrate_1`, which fills each field it lacks with the default
older bundles meant, and :meth:`ModelContract.defaults` names the defaults used so that the
node can say so at start. A contract of a newer format than this code knows is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np

from ..networks.registry import ARCHITECTURES, build_network
from .gate import DETECTORS
from .sources import MAP_SOURCES

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "FORMAT",
    "ContractError",
    "Decision",
    "Localization",
    "ModelContract",
    "OODGate",
    "OperatingPoint",
    "adjusted_logits",
    "decide",
    "no_finding_probability",
    "pneumonia_classes",
    "pneumonia_probability",
    "probabilities",
    "within_gate",
]

#: The format of the contract's JSON that :meth:`ModelContract.to_json` writes, and the newest
#: :meth:`ModelContract.from_json` reads. 1: written before the format was recorded (fields
#: added over time, each missing one meaning its default); 2: every field present.
FORMAT = 2


class ContractError(ValueError):
    """A contract that is incomplete or inconsistent; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """A threshold on the probability of pneumonia and what it was chosen for.

    Attributes:
        threshold: "present" (or "flagged") at or above it.
        target: what it was chosen for, in words ("sensitivity 0.90 on validation").
        sensitivity, specificity: measured at ``threshold`` on the split that chose it
            (None where not measured): they chose the point and do not estimate its
            performance; the model card measures that on test.
        lower_bound: the one-sided Clopper-Pearson lower bound, at ``confidence``, of the
            targeted rate on the split that chose it (None: chosen on the point estimate).
        certified: whether ``lower_bound`` reaches the target (None: not asked).
        split: the split that chose it; positives, negatives: how many images it held.
    """

    threshold: float
    target: str = ""
    sensitivity: float | None = None
    specificity: float | None = None
    lower_bound: float | None = None
    confidence: float | None = None
    certified: bool | None = None
    split: str = ""
    positives: int | None = None
    negatives: int | None = None

    def to_json(self) -> dict[str, Any]:
        found = {
            "threshold": self.threshold,
            "target": self.target,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
        }
        extra = {
            "lower_bound": self.lower_bound,
            "confidence": self.confidence,
            "certified": self.certified,
            "split": self.split,
            "positives": self.positives,
            "negatives": self.negatives,
        }
        return found | {k: v for k, v in extra.items() if v not in (None, "")}

    @staticmethod
    def from_json(data: dict[str, Any]) -> OperatingPoint:
        if not isinstance(data, dict):
            raise ContractError(f"an operating point must be an object, not {type(data).__name__}")
        threshold = float(data["threshold"])
        if not 0.0 < threshold < 1.0:  # NaN fails this too
            raise ContractError(
                f"operating point threshold must be between 0 and 1, got {threshold}"
            )
        sensitivity, specificity, bound, confidence = (
            None if data.get(k) is None else float(data[k])
            for k in ("sensitivity", "specificity", "lower_bound", "confidence")
        )
        positives, negatives = (
            None if data.get(k) is None else int(data[k]) for k in ("positives", "negatives")
        )
        certified = None if data.get("certified") is None else bool(data["certified"])
        return OperatingPoint(
            threshold=threshold,
            target=str(data.get("target", "")),
            sensitivity=sensitivity,
            specificity=specificity,
            lower_bound=bound,
            confidence=confidence,
            certified=certified,
            split=str(data.get("split", "")),
            positives=positives,
            negatives=negatives,
        )


#: The temperatures a contract may hold (the calibration searches within them).
TEMPERATURE_RANGE = (0.05, 20.0)
#: The "present" point of a bundle that carries none.
DEFAULT_PRESENT = OperatingPoint(threshold=0.5, target="0.5 (the bundle states no operating point)")


@dataclass(frozen=True, kw_only=True)
class OODGate:
    """An image is outside the training distribution when its score by the ``kind`` detector
    (:data:`dp_model.serving.gate.DETECTORS`; the Mahalanobis distance of its penultimate features to
    the nearest class mean in bundles that name none) exceeds ``threshold``.

    Attributes:
        threshold: on the score; an order statistic of held-out in-distribution scores.
        quantile: so that about ``1 - quantile`` of in-distribution images are turned away
            (for a rank ``r`` of ``n``, ``r / (n + 1)``: the expected share let through).
        held_out: how many held-out images the threshold comes from.
        kind: the detector, a key of :data:`dp_model.serving.gate.DETECTORS`.
        digest: SHA-256 of ``models/ood.pt`` (the statistics), checked at load.
        arrays_digest: SHA-256 of ``models/ood.npz``, the same statistics for NumPy
            (:mod:`dp_model.serving.gate`), which the node serving an ONNX graph reads; empty in
            bundles written before it was: those are gated in PyTorch.
        rank: the threshold is the ``rank``-th smallest held-out distance (None: a quantile).
        false_rejection: the share of in-distribution images turned away is at most this
            with probability ``confidence`` over the draw of the held-out images (None: not stated).
        shrinkage: weight of the scaled identity in the covariance (None: not recorded).
        split: the split the held-out images came from.
    """

    threshold: float
    quantile: float
    held_out: int
    kind: str = "mahalanobis"
    digest: str = ""
    arrays_digest: str = ""
    rank: int | None = None
    false_rejection: float | None = None
    confidence: float | None = None
    shrinkage: float | None = None
    split: str = ""

    def to_json(self) -> dict[str, Any]:
        found = {
            "kind": self.kind,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "held_out": self.held_out,
            "digest": self.digest,
        }
        extra = {
            "rank": self.rank,
            "false_rejection": self.false_rejection,
            "confidence": self.confidence,
            "shrinkage": self.shrinkage,
            "split": self.split,
            "arrays_digest": self.arrays_digest,
        }
        return found | {k: v for k, v in extra.items() if v not in (None, "")}

    @staticmethod
    def from_json(data: dict[str, Any]) -> OODGate:
        if not isinstance(data, dict):
            raise ContractError(f"ood must be an object, not {type(data).__name__}")
        kind = data.get("kind", "mahalanobis")
        if kind not in DETECTORS:
            raise ContractError(
                f"out-of-distribution gate {kind!r} is not known ({', '.join(DETECTORS)})"
            )
        rank, bound, confidence, shrinkage = (
            None if data.get(k) is None else float(data[k])
            for k in ("rank", "false_rejection", "confidence", "shrinkage")
        )
        gate = OODGate(
            threshold=float(data["threshold"]),
            quantile=float(data["quantile"]),
            held_out=int(data["held_out"]),
            kind=kind,
            digest=str(data.get("digest", "")),
            arrays_digest=str(data.get("arrays_digest", "")),
            rank=None if rank is None else int(rank),
            false_rejection=bound,
            confidence=confidence,
            shrinkage=shrinkage,
            split=str(data.get("split", "")),
        )
        # A distance is above 0; the scores of the other detectors (minus a probability, an energy) may be any finite number.
        if not (
            math.isfinite(gate.threshold)
            and (gate.threshold > 0 or kind not in ("mahalanobis", "knn"))
        ):
            raise ContractError(
                f"ood threshold must be a finite number{' above 0' if kind in ('mahalanobis', 'knn') else ''}, got {gate.threshold}"
            )
        if not 0 < gate.quantile < 1 or gate.held_out < 1:
            raise ContractError(
                f"ood quantile must be between 0 and 1 and held_out at least 1, got {gate.quantile}, {gate.held_out}"
            )
        return gate


#: Regions are shown only when the chosen map's validation accuracy at IoU > 0.3 is at least
#: this much above the prior's (and the other conditions of :func:`regions_earned` hold).
REGION_MARGIN = 0.05
#: The summary figures a localization carries (:data:`dp_model.metrics.FIGURE_KEYS`).
LOCALIZATION_KEYS = ("iou>0.1", "iou>0.3", "iou>0.5", "pointing")
NOT_MEASURED = (
    "Lesion regions not shown: this model's localization was not measured on held-out images"
)
NOT_EARNED = "Lesion regions not shown: this model's localization did not beat a fixed prior on held-out data"


def regions_earned(
    chosen: dict[str, float],
    prior: dict[str, float],
    difference_low: float,
    margin: float = REGION_MARGIN,
) -> bool:
    """The rule (docs/decisions.md): on the validation split, the chosen map's share of boxed
    images with IoU > 0.3 is at least ``margin`` above the prior map's, the lower end of the
    95 % paired bootstrap interval of that difference is above 0 (a few images cannot earn
    it), and its pointing game beats the prior's. NaN anywhere: not earned."""
    values = [
        chosen.get("iou>0.3"),
        prior.get("iou>0.3"),
        chosen.get("pointing"),
        prior.get("pointing"),
        difference_low,
    ]
    if any(v is None or not math.isfinite(v) for v in values):
        return False
    return (
        chosen["iou>0.3"] >= prior["iou>0.3"] + margin
        and difference_low > 0
        and chosen["pointing"] > prior["pointing"]
    )


@dataclass(frozen=True, kw_only=True)
class Localization:
    """Where the node's lesion regions come from, and the evidence that they say anything.

    Every map source the network offers (:data:`dp_model.serving.sources.MAP_SOURCES`) and a fixed
    prior map (each class's mean training box, at half its peak) are scored on the boxed
    images of the validation split, each handed the image's true class; the source with the
    best validation accuracy at IoU > 0.3 is chosen, and the test split is reported once.

    Attributes:
        source: the chosen map source ("map+:3", "grad_cam", "cam", "class_maps").
        shown: whether the node draws regions (:func:`regions_earned` on validation).
        margin: the margin of the rule.
        validation, test: the chosen source's figures (:data:`LOCALIZATION_KEYS`).
        prior_validation, prior_test: the prior map's.
        difference_low: lower end of the paired bootstrap interval of chosen minus prior at
            IoU > 0.3, on validation.
        candidates: every source's validation figures, by source.
        images: boxed images scored, ``{"validation": n, "test": n}``.
    """

    source: str
    shown: bool
    margin: float = REGION_MARGIN
    validation: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    prior_validation: dict[str, float] = field(default_factory=dict)
    prior_test: dict[str, float] = field(default_factory=dict)
    difference_low: float = float("nan")
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """Why regions are not shown (empty when they are)."""
        return "" if self.shown else NOT_EARNED

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shown": self.shown,
            "margin": self.margin,
            "rule": "IoU>0.3 accuracy at least margin above the prior's, "
            "its paired bootstrap lower bound above 0, and pointing game above the prior's, on validation",
            **{
                key: _json_figures(getattr(self, key))
                for key in ("validation", "test", "prior_validation", "prior_test")
            },
            "difference_low": _finite_or_none(self.difference_low),
            "candidates": {k: _json_figures(v) for k, v in self.candidates.items()},
            "images": dict(self.images),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Localization:
        if not isinstance(data, dict):
            raise ContractError(f"localization must be an object, not {type(data).__name__}")
        figures = {
            key: _figures(data.get(key, {}), key)
            for key in ("validation", "test", "prior_validation", "prior_test")
        }
        low = data.get("difference_low")
        located = Localization(
            source=str(data["source"]),
            shown=_boolean(data["shown"], "localization shown"),
            margin=float(data.get("margin", REGION_MARGIN)),
            **figures,
            difference_low=float("nan") if low is None else float(low),
            candidates={
                str(k): _figures(v, f"candidate {k}")
                for k, v in _mapping(data.get("candidates", {}), "candidates").items()
            },
            images={str(k): int(v) for k, v in _mapping(data.get("images", {}), "images").items()},
        )
        located.check()
        return located

    def check(self) -> None:
        """A contract cannot claim regions its own figures do not earn, nor loosen the rule."""
        if self.source not in MAP_SOURCES:
            raise ContractError(
                f"localization source {self.source!r} is not one of {list(MAP_SOURCES)}"
            )
        if self.margin < REGION_MARGIN or not math.isfinite(self.margin):
            raise ContractError(
                f"localization margin must be at least {REGION_MARGIN}, got {self.margin}"
            )
        if self.shown and not regions_earned(
            self.validation, self.prior_validation, self.difference_low, self.margin
        ):
            raise ContractError(
                f"localization says regions are shown, but its validation figures do not beat the prior's by the rule "
                f"(IoU>0.3 {self.validation.get('iou>0.3')} against {self.prior_validation.get('iou>0.3')} + {self.margin}, "
                f"pointing {self.validation.get('pointing')} against {self.prior_validation.get('pointing')}, bound {self.difference_low})"
            )


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_figures(figures: dict[str, float]) -> dict[str, float | None]:
    """Figures as JSON can hold them: NaN (nothing to measure) as null."""
    return {k: _finite_or_none(v) for k, v in figures.items()}


def _boolean(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ContractError(f"{name} must be true or false, got {value!r}")
    return value


def _figures(value: object, name: str) -> dict[str, float]:
    """Localization figures: a mapping of :data:`LOCALIZATION_KEYS` to numbers (null: NaN)."""
    found = _mapping(value, name)
    unknown = [k for k in found if k not in LOCALIZATION_KEYS]
    if unknown:
        raise ContractError(
            f"localization {name}: {unknown[0]!r} is not one of {list(LOCALIZATION_KEYS)}"
        )
    return {k: float("nan") if v is None else float(v) for k, v in found.items()}


@overload
def within_gate(score: float | None, threshold: float | None) -> bool: ...
@overload
def within_gate(score: np.ndarray, threshold: float | None) -> np.ndarray: ...
def within_gate(score: float | np.ndarray | None, threshold: float | None) -> bool | np.ndarray:
    """Whether the out-of-distribution gate lets an image (or each of an array's) through:
    its ``score`` is at or below ``threshold``. A NaN score never passes (the gate fails
    closed); no gate (``threshold`` None) or no score lets everything through."""
    if isinstance(score, np.ndarray):
        if threshold is None:
            return np.ones(score.shape, bool)
        with np.errstate(invalid="ignore"):
            return np.asarray(score, np.float64) <= threshold
    return score is None or threshold is None or bool(score <= threshold)


_Probabilities = TypeVar("_Probabilities", np.ndarray, "Tensor")


def adjusted_logits(logits: np.ndarray, adjustment: tuple[float, ...] = ()) -> np.ndarray:
    """Logits ``(N, K)`` float64 with the logit adjustment (the contract's ``logit_adjustment``,
    one offset per output; empty: none) subtracted: the one place it comes off, for
    :func:`probabilities` and for the temperature's fit."""
    found = np.asarray(logits, np.float64)
    return found - np.asarray(adjustment, np.float64) if len(adjustment) else found


def probabilities(
    logits: np.ndarray,
    temperature: float = 1.0,
    multi_label: bool = False,
    adjustment: tuple[float, ...] = (),
) -> np.ndarray:
    """Calibrated probabilities ``(N, K)`` of logits ``(N, K)``, float64: ``adjustment``
    subtracted from each output's logit, divided by ``temperature``, then a sigmoid per
    finding (``multi_label``) or a softmax over the classes.

    The one calibration rule: the contract's (:meth:`ModelContract.probabilities`), the
    temperature's fit (:mod:`dp_model.serving.calibration`) and the training code's
    (:func:`dp_model.networks.architectures.output_probabilities`) all call it.
    """
    scaled = adjusted_logits(logits, adjustment) / temperature
    if multi_label:
        # the sigmoid of either sign without overflow: exp of a non-positive number only
        small = np.exp(-np.abs(scaled))
        return np.asarray(np.where(scaled >= 0, 1.0 / (1.0 + small), small / (1.0 + small)))
    shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def no_finding_probability(findings: _Probabilities) -> _Probabilities:
    """The probability of the normal class of a multi-label model: one minus its most probable
    finding's, along the last axis of ``findings`` (each finding's sigmoid), so that "normal"
    is the most probable class exactly when no finding reaches 0.5."""
    if not isinstance(findings, np.ndarray):  # a tensor
        return 1.0 - findings.amax(dim=-1)
    return np.asarray(1.0 - np.max(findings, axis=-1))


def pneumonia_probability(
    probabilities: np.ndarray,
    outputs: tuple[str, ...],
    pneumonia: tuple[str, ...],
    multi_label: bool,
) -> np.ndarray:
    """The probability of pneumonia of each row of ``probabilities`` (``(..., K)`` over ``outputs``).

    Softmax outputs: the sum over the pneumonia classes (the classes exclude each other).
    Sigmoid outputs (multi-label): the largest pneumonia finding's probability.
    """
    index = [outputs.index(c) for c in pneumonia if c in outputs]
    if not index:
        return np.zeros(probabilities.shape[:-1], np.float64)
    chosen = np.asarray(probabilities, np.float64)[..., index]
    combined = chosen.max(axis=-1) if multi_label else np.clip(chosen.sum(axis=-1), 0.0, 1.0)
    return np.asarray(combined, np.float64)


def pneumonia_classes(
    declared: tuple[str, ...], classes: tuple[str, ...], normal: str
) -> tuple[str, ...]:
    """The classes that mean pneumonia: those declared, or every class but the normal one."""
    return declared or tuple(c for c in classes if c != normal)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What the rule says about one image's probabilities."""

    pneumonia_probability: float
    positive: bool
    triage: bool
    label: str
    findings: tuple[tuple[str, float], ...]


def decide(
    probabilities: np.ndarray,
    outputs: tuple[str, ...],
    normal: str,
    pneumonia: tuple[str, ...],
    multi_label: bool,
    threshold: float,
    triage: float | None = None,
    *,
    assessed: bool = True,
) -> Decision:
    """The one rule from one image's output probabilities to what is reported.

    Pneumonia is present when its probability (:func:`pneumonia_probability`) reaches
    ``threshold`` and the image was ``assessed`` (the out-of-distribution gate let it through:
    :func:`within_gate`; an image turned away is reported with no finding, whatever its
    probabilities). Then the label is the most probable pneumonia class, and the findings are
    the pneumonia classes present: for a multi-label model each one at the threshold, else
    the label alone. The triage flag is raised at ``triage`` (never without one).
    """
    probabilities = np.asarray(probabilities)
    p = float(pneumonia_probability(probabilities, outputs, pneumonia, multi_label))
    # NaN is never positive; the node refuses non-finite outputs before this
    positive = assessed and p >= threshold
    # a flag on a negative report would contradict it
    flagged = positive and triage is not None and p >= triage
    ranked = sorted(
        (c for c in pneumonia if c in outputs),
        key=lambda c: -float(probabilities[outputs.index(c)]),
    )
    if not positive or not ranked:
        return Decision(
            pneumonia_probability=p, positive=positive, triage=flagged, label=normal, findings=()
        )
    chosen = (
        [c for c in ranked if probabilities[outputs.index(c)] >= threshold]
        if multi_label
        else ranked[:1]
    )
    return Decision(
        pneumonia_probability=p,
        positive=positive,
        triage=flagged,
        label=ranked[0],
        findings=tuple((c, float(probabilities[outputs.index(c)])) for c in chosen),
    )


@dataclass(frozen=True, kw_only=True)
class ModelContract:
    """What travels with the weights: classes, input size, the network's shape, provenance,
    calibration, operating points and the out-of-distribution gate.

    Attributes:
        classes: class names in output order.
        image_size: side of the square input canvas (letterboxed, values in [0, 1]).
        attention_stages: residual stages with MGACR heads.
        normal_class: the class meaning "no finding".
        name, version: the bundle's identity; ``device_uid`` changes with the weights.
        demo: trained as a demonstration; synthetic: trained on synthetic images.
        architecture: the network (:data:`~dp_model.networks.registry.ARCHITECTURES`); bundles
            written before variants existed carry none and are ResNet18.
        options: the network's constructor options (JSON values).
        pneumonia_classes: the classes that mean pneumonia (declared by the dataset layout);
            empty in bundles written before: every class but the normal one.
        temperature: logits are divided by it before the softmax or sigmoid (1: uncalibrated).
        calibration: how the temperature was fitted and what it did (for the model card).
        operating_points: "present" and optionally "triage".
        ood: the out-of-distribution gate, or None (no gate: every image is assessed).
        splits: images in each split (train, validation, calibration, test) and which split
            chose the temperature, the points and the gate (``"calibrated_on"``).
        localization: the map source of the regions and whether they are shown; None in
            bundles written before it was measured: no regions.
        logit_adjustment: subtracted from each output's logit before the temperature (empty:
            none); class attention's ``log c_i``, so that 0.5 means what it says.
        onnx_digest: SHA-256 of ``models/model.onnx``, the forward pass as an ONNX graph
            (:mod:`dp_model.serving.onnx_graph`), checked before it runs; empty: the bundle has none.
            Optional in format 2: a reader that does not know it runs the weights in PyTorch.
        int8_digest: SHA-256 of ``models/model.int8.onnx``, the graph's 8-bit copy, recorded
            only where it kept every served decision on the validation split
            (:mod:`dp_model.serving.quantized`); empty: none. Served only when asked for
            (``engine: onnx-int8``).
    """

    classes: tuple[str, ...]
    image_size: int
    attention_stages: tuple[int, ...]
    normal_class: str
    name: str
    version: str
    device_uid: str
    demo: bool
    synthetic: bool
    architecture: str = "resnet18"
    options: dict[str, Any] = field(default_factory=dict)
    pneumonia_classes: tuple[str, ...] = ()
    temperature: float = 1.0
    calibration: dict[str, Any] = field(default_factory=dict)
    operating_points: dict[str, OperatingPoint] = field(default_factory=dict)
    ood: OODGate | None = None
    splits: dict[str, Any] = field(default_factory=dict)
    localization: Localization | None = None
    logit_adjustment: tuple[float, ...] = ()
    onnx_digest: str = ""
    int8_digest: str = ""

    # --- the network and its outputs ------------------------------------------------------------

    @property
    def multi_label(self) -> bool:
        """One sigmoid per finding instead of a softmax over every class."""
        registered = ARCHITECTURES.get(self.architecture)
        return registered is not None and registered.multi_label

    @property
    def output_classes(self) -> tuple[str, ...]:
        """The classes of the network's outputs, in order: the findings alone when multi-label."""
        return (
            tuple(c for c in self.classes if c != self.normal_class)
            if self.multi_label
            else self.classes
        )

    @property
    def pneumonia(self) -> tuple[str, ...]:
        """The classes that count towards the probability of pneumonia."""
        return pneumonia_classes(self.pneumonia_classes, self.classes, self.normal_class)

    def network(self) -> nn.Module:
        """The untrained network of this contract (its weights are the bundle's to load)."""
        from torch import nn  # the network is PyTorch's; the contract alone is not

        built = build_network(
            self.architecture, len(self.output_classes), self.attention_stages, **self.options
        )
        assert isinstance(built, nn.Module)  # every registered builder makes a torch module
        return built

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``(N, K)`` float32 of the network's logits
        (:func:`probabilities` at this contract's temperature and logit adjustment)."""
        return probabilities(
            logits, self.temperature, self.multi_label, self.logit_adjustment
        ).astype(np.float32)

    # --- the decision rule ----------------------------------------------------------------------

    @property
    def present_point(self) -> OperatingPoint:
        return self.operating_points.get("present", DEFAULT_PRESENT)

    @property
    def triage_point(self) -> OperatingPoint | None:
        return self.operating_points.get("triage")

    def pneumonia_probability(self, probabilities: np.ndarray) -> np.ndarray:
        return pneumonia_probability(
            probabilities, self.output_classes, self.pneumonia, self.multi_label
        )

    def decide(
        self, probabilities: np.ndarray, threshold: float | None = None, *, assessed: bool = True
    ) -> Decision:
        """:func:`decide` at the bundle's points (``threshold`` overrides "present") of an image
        the gate let through (``assessed``) or turned away."""
        threshold = self.present_point.threshold if threshold is None else threshold
        triage = None if self.triage_point is None else self.triage_point.threshold
        return decide(
            probabilities,
            self.output_classes,
            self.normal_class,
            self.pneumonia,
            self.multi_label,
            threshold,
            triage,
            assessed=assessed,
        )

    @overload
    def admits(self, scores: float | None) -> bool: ...
    @overload
    def admits(self, scores: np.ndarray) -> np.ndarray: ...
    def admits(self, scores: float | np.ndarray | None) -> bool | np.ndarray:
        """Whether this contract's gate lets images of out-of-distribution ``scores`` through
        (:func:`within_gate`; everything passes without a gate)."""
        return within_gate(scores, None if self.ood is None else self.ood.threshold)

    def defaults(self) -> list[str]:
        """The fields this contract lacks and the defaults used for them (bundles written before)."""
        found = []
        if not self.pneumonia_classes:
            found.append(f"pneumonia classes: every class but {self.normal_class!r}")
        if self.temperature == 1.0 and not self.calibration:
            found.append("calibration: none (temperature 1)")
        if "present" not in self.operating_points:
            found.append(f"operating point: {DEFAULT_PRESENT.threshold}")
        if self.ood is None:
            found.append("out-of-distribution gate: none (every image is assessed)")
        elif self.ood.false_rejection is None:
            found.append(
                f"false-rejection bound of the out-of-distribution gate: the {self.ood.quantile:.0%} quantile of {self.ood.held_out} held-out images, no confidence stated"
            )
        if "present" in self.operating_points and self.present_point.lower_bound is None:
            found.append(
                "confidence bound of the operating points: point estimates on the split that chose them"
            )
        if not self.splits:
            found.append("split sizes: not recorded")
        if self.localization is None:
            found.append(
                "localization: not measured on held-out images (no lesion regions are drawn)"
            )
        return found

    # --- JSON -------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "attention_stages": list(self.attention_stages),
            "normal_class": self.normal_class,
            "name": self.name,
            "version": self.version,
            "device_uid": self.device_uid,
            "demo": self.demo,
            "synthetic": self.synthetic,
            "architecture": self.architecture,
            "options": dict(self.options),
            "input": "one channel, letterboxed to image_size, values in [0, 1], larger brighter",
            "pneumonia_classes": list(self.pneumonia),
            "temperature": self.temperature,
            "calibration": dict(self.calibration),
            "operating_points": {k: v.to_json() for k, v in self.operating_points.items()},
            "ood": None if self.ood is None else self.ood.to_json(),
            "splits": dict(self.splits),
            "localization": None if self.localization is None else self.localization.to_json(),
            "logit_adjustment": list(self.logit_adjustment),
        } | {
            key: value
            for key, value in (("onnx_digest", self.onnx_digest), ("int8_digest", self.int8_digest))
            if value
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> ModelContract:
        """The contract of ``data`` of any format up to :data:`FORMAT` (older ones migrated
        first), every field read strictly."""
        data = _migrated(data)
        try:
            contract = ModelContract(
                classes=tuple(data["classes"]),
                image_size=int(data["image_size"]),
                attention_stages=tuple(data["attention_stages"]),
                normal_class=str(data["normal_class"]),
                name=str(data["name"]),
                version=str(data["version"]),
                device_uid=str(data["device_uid"]),
                demo=bool(data["demo"]),
                synthetic=bool(data["synthetic"]),
                architecture=str(data["architecture"]),
                options=dict(_mapping(data["options"], "options")),
                pneumonia_classes=_strings(data["pneumonia_classes"], "pneumonia_classes"),
                temperature=float(data["temperature"]),
                calibration=dict(_mapping(data["calibration"], "calibration")),
                operating_points={
                    str(k): OperatingPoint.from_json(v)
                    for k, v in _mapping(data["operating_points"], "operating_points").items()
                },
                ood=None if data["ood"] is None else OODGate.from_json(data["ood"]),
                splits=dict(_mapping(data["splits"], "splits")),
            )
            contract = replace(
                contract,
                localization=None
                if data["localization"] is None
                else Localization.from_json(data["localization"]),
                logit_adjustment=tuple(float(v) for v in data["logit_adjustment"]),
                onnx_digest=str(data.get("onnx_digest", "")),
                int8_digest=str(data.get("int8_digest", "")),
            )
        except ContractError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ContractError(
                f"the deep_pneumonia model contract is incomplete or invalid ({exc})"
            ) from None
        contract.check()
        return contract

    def check(self) -> None:
        """Raise :class:`ContractError` when the fields contradict each other."""
        if self.normal_class not in self.classes:
            raise ContractError(
                f"normal class {self.normal_class!r} is not one of the classes {list(self.classes)}"
            )
        unknown = [
            c for c in self.pneumonia_classes if c not in self.classes or c == self.normal_class
        ]
        if unknown:
            raise ContractError(
                f"pneumonia class {unknown[0]!r} is not a finding of {list(self.classes)}"
            )
        if not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:
            # NaN and inf fail this too
            raise ContractError(
                f"temperature must be between {TEMPERATURE_RANGE[0]} and {TEMPERATURE_RANGE[1]}, got {self.temperature}"
            )
        if self.logit_adjustment and (
            len(self.logit_adjustment) != len(self.output_classes)
            or not all(math.isfinite(v) for v in self.logit_adjustment)
        ):
            raise ContractError(
                f"logit_adjustment must hold one finite number per output {list(self.output_classes)}, got {list(self.logit_adjustment)}"
            )
        for name, digest in (("onnx_digest", self.onnx_digest), ("int8_digest", self.int8_digest)):
            if digest and not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise ContractError(
                    f"{name} must be the 64 hex digits of a SHA-256, got {digest!r}"
                )
        if self.int8_digest and not self.onnx_digest:
            raise ContractError(
                "int8_digest without onnx_digest: an 8-bit graph is a float graph's copy"
            )
        triage = self.triage_point
        if triage is not None and triage.threshold < self.present_point.threshold:
            raise ContractError(
                f"the triage point {triage.threshold} is below the present point {self.present_point.threshold}"
            )


def _migrated(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` brought to :data:`FORMAT`, one migration per format it passes (``data`` itself
    is left as it is); a format this code does not know is refused."""
    if not isinstance(data, dict):
        raise ContractError(
            f"the deep_pneumonia model contract must be an object, not {type(data).__name__}"
        )
    found = data.get("format", 1)
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise ContractError(f"the contract's format must be a whole number from 1, got {found!r}")
    if found > FORMAT:
        raise ContractError(
            f"the model contract was written by a newer dp-train (format {found}); this one reads up to {FORMAT}"
        )
    return _migrate_1(data) if found == 1 else data


def _migrate_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 to 2: each field added after the first bundles, filled with what its absence
    meant (ResNet18, every class but the normal one meaning pneumonia, no calibration, no
    operating point, gate, localization or logit adjustment; see
    :meth:`ModelContract.defaults`). The values are the contract's own, as an old bundle left
    them: a migrated contract is the one format 1 always read."""
    lacking: dict[str, Any] = {
        "architecture": "resnet18",
        "options": {},
        "pneumonia_classes": [],
        "temperature": 1.0,
        "calibration": {},
        "operating_points": {},
        "ood": None,
        "splits": {},
        "localization": None,
        "logit_adjustment": [],
    }
    return lacking | data | {"format": 2}


def _strings(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ContractError(f"{name} must be a list of class names")
    return tuple(value)


def _mapping(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ContractError(f"{name} must be an object")
    return value
