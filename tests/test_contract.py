"""The model contract: one decision rule, calibration, operating points, the out-of-distribution gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dp_model.serving.calibration import fit_temperature, operating_point, reliability
from dp_model.serving.contract import (
    FORMAT,
    ContractError,
    ModelContract,
    OODGate,
    OperatingPoint,
    decide,
    no_finding_probability,
    probabilities,
    within_gate,
)
from dp_model.serving.ood import FeatureStatistics, threshold

RSNA = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")


def contract(**fields) -> ModelContract:
    base = {
        "classes": ("normal", "lobar", "interstitial"),
        "image_size": 64,
        "attention_stages": (),
        "normal_class": "normal",
        "name": "m",
        "version": "1",
        "device_uid": "2.25.1",
        "demo": True,
        "synthetic": True,
    }
    return ModelContract(**(base | fields))


def test_in_the_rsna_layout_abnormal_but_not_opacity_is_not_pneumonia() -> None:
    rsna = contract(classes=RSNA, normal_class="Normal", pneumonia_classes=("Lung Opacity",))
    abnormal = np.array([0.1, 0.8, 0.1])  # "No Lung Opacity / Not Normal"
    decision = rsna.decide(abnormal)
    assert (
        decision.pneumonia_probability == pytest.approx(0.1)
        and not decision.positive
        and decision.label == "Normal"
    )
    opacity = rsna.decide(np.array([0.2, 0.2, 0.6]))
    assert (
        opacity.positive
        and opacity.label == "Lung Opacity"
        and opacity.findings == (("Lung Opacity", pytest.approx(0.6)),)
    )


def test_the_rule_sums_exclusive_classes_and_takes_the_largest_independent_finding() -> None:
    softmax = contract().decide(np.array([0.4, 0.35, 0.25]))
    assert (
        softmax.pneumonia_probability == pytest.approx(0.6)
        and softmax.positive
        and softmax.label == "lobar"
    )
    findings = decide(
        np.array([0.7, 0.55]),
        ("lobar", "interstitial"),
        "normal",
        ("lobar", "interstitial"),
        True,
        0.5,
    )
    assert findings.pneumonia_probability == pytest.approx(0.7) and [
        c for c, _ in findings.findings
    ] == ["lobar", "interstitial"]
    none = decide(
        np.array([0.3, 0.2]),
        ("lobar", "interstitial"),
        "normal",
        ("lobar", "interstitial"),
        True,
        0.5,
    )
    assert not none.positive and none.label == "normal" and none.findings == ()


def test_no_triage_flag_on_a_negative_report_whatever_the_override() -> None:
    points = {"present": OperatingPoint(threshold=0.3), "triage": OperatingPoint(threshold=0.8)}
    # pneumonia 0.9
    decision = contract(operating_points=points).decide(np.array([0.1, 0.8, 0.1]), threshold=0.95)
    assert not decision.positive and not decision.triage


def test_the_bundles_points_decide_and_a_triage_flag_needs_its_own_point() -> None:
    points = {
        "present": OperatingPoint(threshold=0.3, target="sensitivity 0.90"),
        "triage": OperatingPoint(threshold=0.8, target="specificity 0.95"),
    }
    with_points = contract(operating_points=points)
    p = np.array([0.65, 0.2, 0.15])  # pneumonia 0.35
    assert with_points.decide(p).positive and not with_points.decide(p).triage
    assert not with_points.decide(p, threshold=0.5).positive  # the node's explicit override
    assert with_points.decide(np.array([0.1, 0.8, 0.1])).triage
    assert not contract().decide(np.array([0.0, 1.0, 0.0])).triage  # no triage point, no flag


def test_a_contract_written_before_these_fields_loads_with_stated_defaults() -> None:
    later = (
        "pneumonia_classes",
        "temperature",
        "calibration",
        "operating_points",
        "ood",
        "splits",
        "localization",
        "logit_adjustment",
    )
    # written before the format was recorded: format 1
    old = {k: v for k, v in contract().to_json().items() if k not in (*later, "format")}
    loaded = ModelContract.from_json(old)
    assert (
        loaded.pneumonia == ("lobar", "interstitial")
        and loaded.temperature == 1.0
        and loaded.present_point.threshold == 0.5
    )
    assert (
        loaded.ood is None
        and loaded.localization is None
        and loaded.logit_adjustment == ()
        and len(loaded.defaults()) == 6
    )
    assert "split sizes: not recorded" in loaded.defaults() and any(
        line.startswith("localization: not measured") for line in loaded.defaults()
    )
    assert ModelContract.from_json(
        contract(
            operating_points={"present": OperatingPoint(threshold=0.3)},
            ood=OODGate(threshold=10.0, quantile=0.99, held_out=40),
        ).to_json()
    ).ood == OODGate(threshold=10.0, quantile=0.99, held_out=40)


def test_points_and_gate_chosen_with_stated_confidence_round_trip_and_older_ones_say_what_they_lack():
    present = OperatingPoint(
        threshold=0.3,
        target="sensitivity 0.90",
        sensitivity=1.0,
        specificity=0.4,
        lower_bound=0.905,
        confidence=0.95,
        certified=True,
        split="calibration",
        positives=30,
        negatives=20,
    )
    gate = OODGate(
        threshold=10.0,
        quantile=0.98,
        held_out=300,
        rank=299,
        false_rejection=0.01,
        confidence=0.95,
        shrinkage=0.31,
        split="calibration",
    )
    splits = {
        "train": 200,
        "validation": 40,
        "calibration": 40,
        "test": 48,
        "calibrated_on": "calibration",
    }
    new = contract(
        operating_points={"present": present},
        ood=gate,
        splits=splits,
        temperature=1.5,
        calibration={"split": "calibration"},
    )
    loaded = ModelContract.from_json(new.to_json())
    assert loaded.present_point == present and loaded.ood == gate and loaded.splits == splits
    # the one field this contract lacks
    assert [line.split(":")[0] for line in loaded.defaults()] == ["localization"]
    older = new.to_json() | {
        "operating_points": {"present": {"threshold": 0.3}},
        "ood": {"threshold": 10.0, "quantile": 0.99, "held_out": 44},
    }
    lacking = ModelContract.from_json(older).defaults()
    assert any(
        "false-rejection bound" in line and "44 held-out" in line for line in lacking
    ) and any("confidence bound of the operating points" in line for line in lacking)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pneumonia_classes": ["normal"]}, "pneumonia class"),
        ({"pneumonia_classes": {"lobar": 1}}, "pneumonia_classes"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": 1e-300}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e30}, "temperature"),
        ({"operating_points": {"present": {"threshold": 1.5}}}, "threshold"),
        ({"operating_points": {"present": {"threshold": float("nan")}}}, "threshold"),
        ({"operating_points": [0.5]}, "operating_points"),
        ({"operating_points": {"present": None}}, "operating point"),
        (
            {"operating_points": {"present": {"threshold": 0.7}, "triage": {"threshold": 0.1}}},
            "triage point",
        ),
        ({"ood": [1, 2]}, "ood"),
        ({"ood": {"threshold": float("inf"), "quantile": 0.99, "held_out": 40}}, "ood threshold"),
        ({"ood": {"threshold": float("nan"), "quantile": 0.99, "held_out": 40}}, "ood threshold"),
        ({"ood": {"threshold": -5, "quantile": 0.99, "held_out": 40}}, "ood threshold"),
        ({"ood": {"threshold": 800, "quantile": 7, "held_out": -3}}, "quantile"),
        ({"splits": [1, 2]}, "splits"),
        ({"localization": {"source": "map+:3", "shown": "yes"}}, "localization shown"),
        ({"localization": {"source": "map+:3", "shown": True}}, "do not beat the prior"),
        (
            {"localization": {"source": "map+:3", "shown": False, "validation": {"iou>0.9": 1.0}}},
            "iou>0.9",
        ),
        ({"localization": {"source": "lime", "shown": False}}, "localization source"),
        ({"localization": {"source": "cam", "shown": False, "margin": 0.01}}, "margin"),
        ({"logit_adjustment": [1.0]}, "logit_adjustment"),
        ({"logit_adjustment": [1.0, float("nan")]}, "logit_adjustment"),
    ],
)
def test_an_inconsistent_contract_is_refused_with_the_field_named(
    change: dict, message: str
) -> None:
    with pytest.raises(ContractError, match=message):
        ModelContract.from_json(contract().to_json() | change)


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 3-class model right about 70 % of the time but saying 99 %."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    guess = np.where(rng.random(n) < 0.7, labels, (labels + rng.integers(1, 3, n)) % 3)
    logits = rng.normal(0, 0.3, (n, 3))
    logits[np.arange(n), guess] += 6.0
    return logits, labels


def test_temperature_scaling_fitted_on_validation_lowers_the_calibration_error_on_held_out_images():
    val_logits, val_labels = overconfident(400, 0)
    test_logits, test_labels = overconfident(400, 1)
    t = fit_temperature(val_logits, val_labels)
    assert t > 2.0  # an overconfident model is cooled
    before = reliability(probabilities(test_logits, 1.0), test_labels, bootstrap=50)
    after = reliability(probabilities(test_logits, t), test_labels, bootstrap=50)
    assert after.ece < before.ece / 3 and after.high < before.low
    # the ranking is kept
    assert (
        probabilities(test_logits, t).argmax(1) == probabilities(test_logits, 1.0).argmax(1)
    ).all()


def test_an_operating_point_reproduces_its_stated_sensitivity_and_specificity_on_validation():
    rng = np.random.default_rng(3)
    positive = rng.random(500) < 0.3
    scores = np.clip(
        np.where(positive, rng.normal(0.7, 0.15, 500), rng.normal(0.35, 0.15, 500)), 0.001, 0.999
    )
    point = operating_point(scores, positive, sensitivity=0.90)
    assert (scores[positive] >= point.threshold).mean() == pytest.approx(
        point.sensitivity, abs=1e-4
    ) and point.sensitivity >= 0.90
    assert (scores[~positive] < point.threshold).mean() == pytest.approx(
        point.specificity, abs=1e-4
    )
    strict = operating_point(scores, positive, specificity=0.95)
    assert strict.specificity >= 0.95 and strict.threshold > point.threshold
    with pytest.raises(ValueError, match="with and without pneumonia"):
        operating_point(scores, np.ones(500, bool), sensitivity=0.9)


def test_the_mahalanobis_gate_passes_held_out_in_distribution_features_and_stops_shifted_ones():
    rng = np.random.default_rng(4)
    centres = rng.normal(0, 3, (3, 64))
    labels = rng.integers(0, 3, 300)
    train = torch.from_numpy(centres[labels] + rng.normal(0, 1, (300, 64))).float()
    held_labels = rng.integers(0, 3, 200)
    held_out = torch.from_numpy(centres[held_labels] + rng.normal(0, 1, (200, 64))).float()
    shifted = torch.from_numpy(rng.normal(0, 1, (50, 64)) * 3 + 8).float()
    stats = FeatureStatistics.fit(train, labels)
    gate = threshold(stats.scores(held_out[:100]))
    assert (stats.scores(held_out[100:]) <= gate).mean() >= 0.9
    assert (stats.scores(shifted) > gate).all()


def test_operating_points_refuse_what_the_validation_split_cannot_give() -> None:
    positive = np.array([True, True, False, False])
    with pytest.raises(ValueError, match="no threshold reaches a specificity"):
        operating_point(np.array([0.5, 0.5, 0.5, 0.5]), positive, specificity=0.95)
    with pytest.raises(ValueError, match="non-finite"):
        operating_point(np.array([0.5, np.nan, 0.2, 0.1]), positive, sensitivity=0.9)
    # scores of exactly 0
    zero = operating_point(np.array([0.0, 0.0, 0.0, 0.0]), positive, sensitivity=0.9)
    assert 0 < zero.threshold < 1 and zero.sensitivity == 1.0
    assert fit_temperature(np.full((5, 3), np.nan), np.zeros(5, int)) == 1.0
    # one class: nothing to fit
    assert fit_temperature(np.random.default_rng(0).normal(size=(20, 3)), np.zeros(20, int)) == 1.0


def test_the_gate_uses_the_layer_each_network_names_and_cia_net_has_none() -> None:
    from dp_model.networks.architectures import build_network
    from dp_model.serving.ood import classifier_layer

    net = build_network("resnet18", 5)
    assert classifier_layer(net) is net.backbone.fc
    # its last linear layers see the paired normal image too
    assert classifier_layer(build_network("cia_net", 4)) is None


def test_the_gate_takes_exactly_one_pass_of_features_one_row_per_image() -> None:
    from dp_model.serving.ood import one_pass

    seen = [torch.zeros(4, 8)]
    # taken, and the list emptied for the next batch
    assert one_pass(seen, 4).shape == (4, 8) and seen == []
    for passes, rows in (
        ([torch.zeros(4, 8), torch.zeros(4, 8)], 4),
        ([torch.zeros(8, 8)], 4),
        ([], 4),
    ):
        with pytest.raises(ValueError, match="not one"):
            # a second pass (another image's), rows that are not images, none
            one_pass(passes, rows)


def test_localization_travels_with_the_contract_and_the_rule_is_the_stated_one() -> None:
    from dp_model.serving.contract import Localization, regions_earned

    prior = {"iou>0.1": 0.64, "iou>0.3": 0.34, "iou>0.5": 0.21, "pointing": 0.5}
    beats = prior | {"iou>0.3": 0.40, "pointing": 0.6}
    # the interval must clear 0
    assert regions_earned(beats, prior, 0.01) and not regions_earned(beats, prior, -0.01)
    assert not regions_earned(beats | {"iou>0.3": 0.38}, prior, 0.01)  # under the 0.05 margin
    # the pointing game must beat the prior's too
    assert not regions_earned(beats | {"pointing": 0.5}, prior, 0.01)
    assert not regions_earned(beats | {"iou>0.3": float("nan")}, prior, 0.01)
    located = Localization(
        source="cam",
        shown=True,
        validation=beats,
        prior_validation=prior,
        difference_low=0.01,
        candidates={"cam": beats, "grad_cam": beats},
        images={"validation": 300},
    )
    loaded = ModelContract.from_json(
        contract(
            architecture="class_attention", localization=located, logit_adjustment=(0.5, -0.25)
        ).to_json()
    )
    assert loaded.localization == located and loaded.logit_adjustment == (0.5, -0.25)


def test_the_logit_adjustment_comes_off_before_the_sigmoid() -> None:
    multi = contract(architecture="class_attention", logit_adjustment=(np.log(9.0), 0.0))
    # Trained with c = 9 on its first finding, the network says 0.9 where the truth is 0.5.
    p = multi.probabilities(np.array([[np.log(9.0), 0.0]]))[0]
    assert p == pytest.approx([0.5, 0.5], abs=1e-6)


def test_a_contract_records_its_format_and_a_round_trip_keeps_it() -> None:
    written = contract(temperature=1.5, calibration={"split": "calibration"}).to_json()
    assert written["format"] == FORMAT == 2
    assert ModelContract.from_json(written).to_json() == written


def test_a_contract_without_a_format_reads_as_before_with_each_missing_field_at_its_default() -> (
    None
):
    old = {
        k: v
        for k, v in contract().to_json().items()
        if k in ("classes", "image_size", "attention_stages", "normal_class", "name")
        or k in ("version", "device_uid", "demo", "synthetic")
    }
    loaded = ModelContract.from_json(old)
    assert loaded == contract()  # the dataclass's own defaults: resnet18, temperature 1, no gate
    assert loaded.architecture == "resnet18" and loaded.pneumonia_classes == ()
    assert len(loaded.defaults()) == 6  # and the node still says what the bundle lacked
    assert "format" not in old  # the migration works on a copy


def test_a_contract_of_a_newer_format_is_refused_naming_both_formats() -> None:
    with pytest.raises(
        ContractError, match=r"written by a newer dp-train \(format 3\); this one reads up to 2"
    ):
        ModelContract.from_json(contract().to_json() | {"format": 3})


@pytest.mark.parametrize("bad", [0, -1, "2", 2.0, True, None, [2]])
def test_a_format_that_is_not_a_whole_number_from_1_is_refused(bad: object) -> None:
    with pytest.raises(ContractError, match="format"):
        ModelContract.from_json(contract().to_json() | {"format": bad})


@pytest.mark.parametrize("missing", ["temperature", "localization", "architecture", "ood"])
def test_a_format_2_contract_lacking_a_field_is_refused_naming_it(missing: str) -> None:
    written = contract().to_json()
    del written[missing]
    with pytest.raises(ContractError, match=missing):
        ModelContract.from_json(written)


def test_the_gate_passes_a_score_at_or_below_its_threshold_and_never_nan() -> None:
    assert within_gate(9.0, 10.0) and within_gate(10.0, 10.0) and not within_gate(10.5, 10.0)
    assert not within_gate(float("nan"), 10.0) and not within_gate(float("inf"), 10.0)
    assert within_gate(float("nan"), None) and within_gate(None, 10.0)  # no gate, or no score
    scores = np.array([9.0, 10.0, 10.5, np.nan])
    assert within_gate(scores, 10.0).tolist() == [True, True, False, False]
    assert within_gate(scores, None).tolist() == [True] * 4
    gated = contract(ood=OODGate(threshold=10.0, quantile=0.99, held_out=40))
    assert gated.admits(scores).tolist() == [True, True, False, False]
    assert contract().admits(scores).tolist() == [True] * 4
    assert gated.admits(10.0) is True and gated.admits(float("nan")) is False


def test_the_normal_class_of_a_multi_label_model_is_one_minus_its_largest_finding() -> None:
    findings = np.array([[0.2, 0.7], [0.1, 0.3]])
    assert no_finding_probability(findings) == pytest.approx([0.3, 0.7])
    assert torch.allclose(
        no_finding_probability(torch.tensor(findings)),
        torch.tensor([0.3, 0.7], dtype=torch.float64),
    )
    assert float(no_finding_probability(findings[0])) == pytest.approx(0.3)
