"""What the model says about one image, and what the node reports from it: :class:`Prediction`.

The decision itself is :func:`dp_model.serving.contract.decide`, the one rule; a prediction holds
its inputs (probabilities, operating point, triage point, the out-of-distribution score and
threshold) and the regions and heat map in the source image's pixel frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dp_model.serving.contract import (
    Decision,
    decide,
    no_finding_probability,
    pneumonia_classes,
    within_gate,
)


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """The model's answer for one image, in the source image's pixel frame.

    Attributes:
        classes: the model's output labels, in order (for a multi-label model, the findings).
        probabilities: calibrated softmax probability of each class, or sigmoid of each finding.
        normal_class: the label meaning "no finding".
        operating_point: decision threshold on the probability of pneumonia (of each
            finding, for a multi-label model).
        heatmap: ``(h, w)`` map in [0, 1] over the whole source image (coarse; resize to draw).
        boxes: ``(N, 4)`` lesion regions ``(x_min, y_min, x_max, y_max)`` in source pixels.
        multi_label: findings are decided independently.
        box_labels: the finding of each region, when the model says (else :attr:`label`).
        box_scores: each region's own score in [0, 1]: the peak of the localisation map inside it.
        pneumonia: the classes that mean pneumonia (empty: every class but the normal one).
        triage_point: the threshold of the triage flag (None: no flag).
        ood_score, ood_threshold: the out-of-distribution score and the gate's threshold
            (None: no gate). Above the threshold the image is not assessed.
        regions_withheld: why a positive result carries no regions, in words ("": regions
            are drawn where found): the bundle's localization was not measured, or did not
            beat a fixed prior map on held-out images.
        engine: who ran the model (``torch``, ``onnx``, ``onnx-int8``; "": not said), for
            the audit trail.
    """

    classes: tuple[str, ...]
    probabilities: np.ndarray
    normal_class: str
    operating_point: float
    heatmap: np.ndarray
    boxes: np.ndarray
    multi_label: bool = False
    box_labels: tuple[str, ...] = ()
    pneumonia: tuple[str, ...] = ()
    triage_point: float | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    box_scores: tuple[float, ...] = ()
    regions_withheld: str = ""
    engine: str = ""

    @property
    def assessed(self) -> bool:
        """False when the image lies outside the model's training distribution (or its score
        is not a number): no finding is asserted (:func:`~dp_model.serving.contract.within_gate`)."""
        return within_gate(self.ood_score, self.ood_threshold)

    @cached_property
    def decision(self) -> Decision:
        """:func:`~dp_model.serving.contract.decide` on these probabilities and the gate's verdict
        (computed once): what the SR, the overlay and the worklist report."""
        pneumonia = pneumonia_classes(self.pneumonia, self.classes, self.normal_class)
        return decide(
            self.probabilities,
            self.classes,
            self.normal_class,
            pneumonia,
            self.multi_label,
            self.operating_point,
            self.triage_point,
            assessed=self.assessed,
        )

    @property
    def pneumonia_probability(self) -> float:
        """Of any pneumonia (:func:`~dp_model.serving.contract.pneumonia_probability`)."""
        return self.decision.pneumonia_probability

    @property
    def positive(self) -> bool:
        return self.decision.positive

    @property
    def triage(self) -> bool:
        return self.decision.triage

    @property
    def label(self) -> str:
        """The most probable pneumonia class when positive, else (and when not assessed) the normal class."""
        return self.decision.label

    @property
    def most_probable_type(self) -> str | None:
        """The pneumonia type a single-label (softmax) model names when pneumonia is present:
        its most probable pneumonia class, chosen after pneumonia was decided, never itself
        decided at an operating point. None when negative, not assessed, or multi-label (each
        finding of a multi-label model is decided at its own operating point: :attr:`findings`)."""
        if self.multi_label or not self.positive or self.label == self.normal_class:
            return None
        return self.label

    def probability(self, label: str) -> float:
        """The model's probability of ``label`` (of no finding, for the normal class of a multi-label model)."""
        if self.multi_label and label == self.normal_class:
            return float(no_finding_probability(self.probabilities))
        return float(self.probabilities[self.classes.index(label)])

    @property
    def label_probability(self) -> float:
        return self.probability(self.label)

    def present(self, label: str) -> bool:
        """Whether finding ``label`` is reported present (one of :attr:`findings`)."""
        return any(name == label for name, _ in self.findings)

    def region_label(self, index: int) -> str:
        """The finding located in region ``index``."""
        return self.box_labels[index] if self.box_labels else self.label

    def region_score(self, index: int) -> float:
        """Region ``index``'s own score (the peak of the map inside it; NaN when unknown)."""
        return float(self.box_scores[index]) if index < len(self.box_scores) else float("nan")

    @property
    def findings(self) -> list[tuple[str, float]]:
        """The findings reported present, most probable first."""
        return list(self.decision.findings)
