"""The served decision measured: the node's rule, points and gate scored with exact intervals,
and the points and the gate chosen with stated confidence on a calibration split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dp_model.serving.calibration import certified_point, operating_point
from dp_model.serving.contract import ModelContract, OODGate, OperatingPoint
from dp_model.serving.ood import FeatureStatistics, certified_threshold, gate_rank
from dp_model.serving.served import (
    adaptive_ece,
    brier,
    clopper_pearson,
    evaluate_served,
    lower_bound,
    served_decisions,
)

CLASSES = ("normal", "lobar", "interstitial")


def contract(**fields) -> ModelContract:
    base = {
        "classes": CLASSES,
        "image_size": 64,
        "attention_stages": (),
        "normal_class": "normal",
        "name": "m",
        "version": "1",
        "device_uid": "2.25.1",
        "demo": True,
        "synthetic": True,
        "operating_points": {
            "present": OperatingPoint(threshold=0.5),
            "triage": OperatingPoint(threshold=0.8),
        },
        "ood": OODGate(threshold=10.0, quantile=0.99, held_out=40),
    }
    return ModelContract(**(base | fields))


# Eight images worked by hand: P(pneumonia) = 1 - p(normal); the gate admits scores <= 10 (NaN: not).
PROBABILITIES = np.array(
    [
        [0.10, 0.60, 0.30],  # 0.90 lobar          assessed: positive, flagged
        [0.40, 0.30, 0.30],  # 0.60 interstitial   assessed: positive
        [0.70, 0.20, 0.10],  # 0.30 lobar          assessed: missed
        [0.05, 0.90, 0.05],  # 0.95 lobar          NOT assessed (score 50)
        [0.80, 0.10, 0.10],  # 0.20 normal         assessed: negative
        [0.45, 0.50, 0.05],  # 0.55 normal         assessed: false positive
        [0.90, 0.05, 0.05],  # 0.10 normal         NOT assessed (score NaN)
        [0.15, 0.15, 0.70],  # 0.85 normal         assessed: false positive, flagged
    ]
)
OOD = np.array([5.0, 5.0, 5.0, 50.0, 5.0, 5.0, np.nan, 5.0])
LABELS = np.array([1, 2, 1, 1, 0, 0, 0, 0])


def test_clopper_pearson_intervals_match_their_closed_forms_and_the_published_table() -> None:
    # Clopper and Pearson (1934)
    assert clopper_pearson(2, 4) == pytest.approx((0.0676, 0.9324), abs=1e-4)
    assert clopper_pearson(4, 4) == pytest.approx((0.025 ** (1 / 4), 1.0))  # k = n: (alpha/2)^(1/n)
    assert clopper_pearson(0, 4) == pytest.approx((0.0, 1 - 0.025 ** (1 / 4)))
    assert clopper_pearson(1, 4)[0] == pytest.approx(1 - 0.975 ** (1 / 4))
    assert lower_bound(20, 20) == pytest.approx(0.05 ** (1 / 20))  # one-sided 95 %: 0.861
    assert lower_bound(0, 20) == 0.0 and math.isnan(clopper_pearson(0, 0)[0])


def test_the_served_rule_is_the_nodes_image_by_image() -> None:
    from pacs_node.model.prediction import Prediction

    served = served_decisions(PROBABILITIES, OOD, contract())
    node = [
        Prediction(
            classes=CLASSES,
            probabilities=p,
            normal_class="normal",
            operating_point=0.5,
            heatmap=np.zeros((2, 2)),
            boxes=np.zeros((0, 4)),
            triage_point=0.8,
            ood_score=s,
            ood_threshold=10.0,
        )
        for p, s in zip(PROBABILITIES, OOD)
    ]
    assert (
        served.assessed.tolist()
        == [p.assessed for p in node]
        == [True, True, True, False, True, True, False, True]
    )
    assert (
        served.positive.tolist()
        == [p.positive for p in node]
        == [True, True, False, False, False, True, False, True]
    )
    assert (
        served.triage.tolist()
        == [p.triage for p in node]
        == [True, False, False, False, False, False, False, True]
    )
    np.testing.assert_allclose(
        served.pneumonia_probability, [0.9, 0.6, 0.3, 0.95, 0.2, 0.55, 0.1, 0.85]
    )
    # no gate: every image assessed, as in the node
    ungated = served_decisions(PROBABILITIES, OOD, contract(ood=None))
    assert ungated.assessed.all() and ungated.positive.tolist() == [
        True,
        True,
        False,
        True,
        False,
        True,
        False,
        True,
    ]
    # the finding named: the normal class for an image the gate turned away, however probable
    # pneumonia looked (the fourth, 0.95), in the node and in the evaluation alike
    assert served.label.tolist() == [p.label for p in node]
    assert served.label[3] == "normal" != ungated.label[3]
    assert node[3].findings == [] and node[3].decision.findings == ()


class Scripted:
    """A detector whose scores are given: one per image, in order."""

    kind = "scripted"
    needs_stages = False

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)

    def score(self, seen) -> np.ndarray:
        return np.array([self.scores.pop(0) for _ in range(len(seen.features))])


def test_the_gate_gives_one_answer_in_the_node_the_served_evaluation_and_the_bundles_predictor(
    demo_bundle,
) -> None:
    """At, just above and far above the threshold, and NaN; then without a gate."""
    from dataclasses import replace

    from dp_model.serving.inference import Predictor
    from dp_model.serving.runner import Runner
    from pacs_node.model.prediction import Prediction

    predictor = Predictor(str(demo_bundle))
    # the scripted detector watches the network in PyTorch (the graph's gate is NumPy's)
    predictor.runner = Runner(bundle=demo_bundle, engine="torch")
    threshold = predictor.contract.ood.threshold
    scores = [threshold / 2, threshold, float(np.nextafter(threshold, np.inf)), 2 * threshold]
    scores.append(float("nan"))
    paths = [min((demo_bundle / "samples").glob("*.dcm"))] * len(scores)

    def answers(contract, gated: bool) -> tuple[list[bool], list[bool], list[bool]]:
        predictor.runner.contract = contract
        predictor.runner.statistics = Scripted(scores) if gated else None
        probabilities, _ = predictor.probabilities(paths)
        node = [
            Prediction(
                classes=contract.output_classes,
                probabilities=p,
                normal_class=contract.normal_class,
                operating_point=0.5,
                heatmap=np.zeros((2, 2)),
                boxes=np.zeros((0, 4)),
                ood_score=s,
                ood_threshold=None if contract.ood is None else contract.ood.threshold,
            ).assessed
            for p, s in zip(probabilities, scores)
        ]
        served = served_decisions(probabilities, np.array(scores), contract)
        return list(predictor.assessed), served.assessed.tolist(), node

    gated, served, node = answers(predictor.contract, True)
    assert gated == served == node == [True, True, False, False, False]
    ungated, served, node = answers(replace(predictor.contract, ood=None), False)
    assert ungated == served == node == [True] * len(scores)
    # the graph's gate is NumPy's: a detector of another kind is refused, never skipped (which
    # would let every image through)
    graph = Runner(bundle=demo_bundle, engine="onnx")
    graph.statistics = Scripted(scores)
    with pytest.raises(TypeError, match="NumPy statistics"):
        graph.run(np.zeros((1, 1, graph.contract.image_size, graph.contract.image_size)))


def test_sensitivity_specificity_abstention_and_binary_calibration_against_hand_counts() -> None:
    report = evaluate_served(PROBABILITIES, OOD, LABELS, contract(), bootstrap=0, bins=2)
    every, assessed = report.all, report.assessed
    assert (report.abstention.successes, report.abstention.total) == (2, 8)
    # Every image: an image the gate stops is not reported positive, so it costs sensitivity.
    assert (every.sensitivity["present"].successes, every.sensitivity["present"].total) == (2, 4)
    assert (every.specificity["present"].successes, every.specificity["present"].total) == (2, 4)
    assert (every.sensitivity["triage"].successes, every.specificity["triage"].successes) == (1, 3)
    assert (every.sensitivity["present"].low, every.sensitivity["present"].high) == pytest.approx(
        (0.0676, 0.9324), abs=1e-4
    )
    # Assessed images only: three positives, three negatives.
    assert (assessed.sensitivity["present"].successes, assessed.sensitivity["present"].total) == (
        2,
        3,
    )
    assert (assessed.specificity["present"].successes, assessed.specificity["present"].total) == (
        1,
        3,
    )
    assert (assessed.sensitivity["triage"].successes, assessed.specificity["triage"].successes) == (
        1,
        2,
    )
    assert assessed.specificity["present"].high == pytest.approx(0.9057, abs=1e-4)
    # P(pneumonia): squared errors summed by hand 1.7375 over 8; AUC 13 of 16 pairs; two equal-mass bins.
    assert every.brier == pytest.approx(1.7375 / 8) and every.auc == pytest.approx(13 / 16)
    assert every.ece == pytest.approx(0.5 * abs(1.15 / 4 - 0.25) + 0.5 * abs(3.3 / 4 - 0.75))
    assert assessed.images == 6 and assessed.auc == pytest.approx(6 / 9)


def test_brier_and_equal_mass_ece_by_hand() -> None:
    p, y = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 1, 1, 1])
    assert brier(p, y) == pytest.approx((0.01 + 0.64 + 0.04 + 0.01) / 4)
    assert adaptive_ece(p, y, bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)
    assert adaptive_ece(p, y, bins=1) == pytest.approx(abs(0.5 - 0.75))


def test_the_auc_interval_is_a_bootstrap_around_the_served_score_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[labels > 0, 1] += 1.0
    probs = contract().probabilities(logits)
    one, two = (
        evaluate_served(probs, None, labels, contract(), bootstrap=200, seed=1) for _ in range(2)
    )
    assert one.all.auc_low < one.all.auc < one.all.auc_high and (
        one.all.auc_low,
        one.all.auc_high,
    ) == (two.all.auc_low, two.all.auc_high)
    assert one.all.auc_high - one.all.auc_low < 0.2


def test_temperature_changes_the_auc_of_the_probability_of_pneumonia_of_a_softmax() -> None:
    """Why the card reports the AUC of the served, temperature-scaled score: 1 - p(normal) of
    a softmax over five classes ranks two images differently at T = 1 and T = 10."""
    five = ("normal", "a", "b", "c", "d")
    logits = np.array([[0.0, 3.0, -10.0, -10.0, -10.0], [0.0, 1.0, 1.0, 1.0, -10.0]])
    labels = np.array([0, 1])  # the first is normal, the second pneumonia
    aucs = []
    for temperature in (1.0, 10.0):
        c = contract(classes=five, temperature=temperature, operating_points={}, ood=None)
        aucs.append(evaluate_served(c.probabilities(logits), None, labels, c, bootstrap=0).all.auc)
    assert aucs == [0.0, 1.0]


def test_the_report_reads_as_json_and_as_a_table() -> None:
    report = evaluate_served(PROBABILITIES, OOD, LABELS, contract(), bootstrap=50, bins=2)
    data = report.to_json()
    assert data["all"]["present"]["sensitivity"] == {
        "successes": 2,
        "total": 4,
        "value": 0.5,
        "low": pytest.approx(0.0676, abs=1e-4),
        "high": pytest.approx(0.9324, abs=1e-4),
    }
    assert data["abstention"]["value"] == 0.25 and data["thresholds"] == {
        "present": 0.5,
        "triage": 0.8,
    }
    table = report.table()
    assert (
        "| present | 0.5000 | every image (8) | 0.500 (0.068 to 0.932) |" in table
        and "not assessed: 2 of 8" in table
    )


# --- the points and the gate, chosen with stated confidence -------------------------------------------


def test_the_present_point_is_placed_where_the_lower_bound_of_sensitivity_reaches_the_target():
    positives, negatives = np.linspace(0.41, 0.70, 30), np.linspace(0.05, 0.40, 20)
    scores, truth = np.concatenate([positives, negatives]), np.arange(50) < 30
    point = certified_point(scores, truth, sensitivity=0.90)
    # 29 of 30 has a one-sided 95 % bound of 0.851; only 30 of 30 (0.905) reaches 0.90.
    assert (
        point.threshold == pytest.approx(0.41, abs=2e-6)
        and point.certified
        and point.lower_bound == pytest.approx(0.05 ** (1 / 30))
    )
    # The node scores the same image in float32 (0.41 there is 0.40999999...): the positive the
    # bound counted must still be called positive.
    assert float(np.float32(0.41)) >= point.threshold
    # the point estimate's, 27 of 30
    assert operating_point(scores, truth, sensitivity=0.90).threshold == pytest.approx(0.44)
    assert (point.positives, point.negatives, point.confidence) == (30, 20, 0.95)


def test_a_target_the_split_cannot_certify_is_said_so_and_triage_needs_enough_negatives() -> None:
    positives, negatives = np.linspace(0.41, 0.70, 20), np.linspace(0.05, 0.40, 58)
    scores, truth = np.concatenate([positives, negatives]), np.arange(78) < 20
    present = certified_point(scores, truth, sensitivity=0.90)
    assert (
        not present.certified
        and present.threshold == pytest.approx(0.41, abs=2e-6)
        and present.lower_bound == pytest.approx(0.05 ** (1 / 20))
    )
    assert "not certified" in present.target and "20 positives" in present.target
    with pytest.raises(ValueError, match="58 negatives"):  # 0.05^(1/58) = 0.9497 < 0.95
        certified_point(scores, truth, specificity=0.95)
    more = np.concatenate([positives, np.linspace(0.05, 0.40, 59)]), np.arange(79) < 20
    triage = certified_point(*more, specificity=0.95)  # 59 of 59: 0.9505
    assert triage.certified and triage.threshold > 0.40 and triage.specificity == 1.0


def test_the_gate_rank_is_the_smallest_order_statistic_with_the_stated_confidence() -> None:
    def confidence(rank: int, n: int, eps: float) -> float:
        # P(FRR <= eps) = P(Binomial(n, 1 - eps) <= rank - 1)
        log_terms = (
            math.lgamma(n + 1)
            - math.lgamma(j + 1)
            - math.lgamma(n - j + 1)
            + j * math.log(1 - eps)
            + (n - j) * math.log(eps)
            for j in range(rank)
        )
        return sum(math.exp(t) for t in log_terms)

    for n in (300, 1000, 5000):
        rank, bound = gate_rank(n, 0.01, 0.95)
        assert confidence(rank, n, 0.01) >= 0.95 > confidence(rank - 1, n, 0.01) and bound == 0.01
    # too few images for 1 %: the largest, and the bound it does give
    rank, bound = gate_rank(44, 0.01, 0.95)
    assert rank == 44 and bound == pytest.approx(1 - 0.05 ** (1 / 44))


def test_the_gate_rejects_at_most_its_stated_share_with_its_stated_confidence() -> None:
    rng = np.random.default_rng(0)
    # uniform scores: a threshold t rejects 1 - t of in-distribution images
    held = rng.random((2000, 1000))
    rejected = np.array([1 - certified_threshold(row, 0.01, 0.95)[0] for row in held])
    assert (rejected <= 0.01).mean() >= 0.93
    quantile = 1 - np.quantile(held, 0.99, axis=1)  # the 99 % quantile: right only on average
    assert (quantile <= 0.01).mean() < 0.7


def test_the_covariance_shrinkage_is_estimated_by_ledoit_wolf() -> None:
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(1)
    for n, d in ((40, 64), (4000, 8)):
        labels = rng.integers(0, 2, n)
        features = torch.from_numpy(rng.normal(0, 1, (n, d)) + 5 * labels[:, None]).float()
        stats = FeatureStatistics.fit(features, labels)
        centred = (
            features.double().numpy()
            - np.stack([features.double().numpy()[labels == k].mean(0) for k in (0, 1)])[labels]
        )
        assert stats.shrinkage == pytest.approx(
            ledoit_wolf_shrinkage(centred, assume_centered=True), rel=1e-6
        )
    assert FeatureStatistics.fit(features, labels, shrinkage=0.1).shrinkage == 0.1


def test_the_type_the_node_names_is_scored_on_the_pneumonia_images_it_reports_positive() -> None:
    """Of the three pneumonia images reported positive by hand (0, 1; 3 is not assessed), image 0
    is named lobar (right) and image 1, a tie of lobar and interstitial, lobar (wrong)."""
    report = evaluate_served(PROBABILITIES, OOD, LABELS, contract(), bootstrap=0, bins=2)
    assert (report.type_correct.successes, report.type_correct.total) == (1, 2)
    assert (
        report.to_json()["type_among_served_positives"]["successes"] == 1
        and "type named right: 1 of 2" in report.table()
    )
    single = contract(classes=("normal", "pneumonia"))
    two = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert (
        evaluate_served(two, None, np.array([1, 0]), single, bootstrap=0, bins=2).type_correct
        is None
    )
