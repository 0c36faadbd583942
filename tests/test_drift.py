"""The drift statistic tells a population like the validation images from a shifted one, at a
threshold chosen on the validation images alone; a bundle without a reference still counts its
rates and never stops the node."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from dp_model.serving.served import scores_path
from pacs_node import drift
from pacs_node.metrics import Metrics
from pacs_node.model.prediction import Prediction
from pacs_node.outcomes import Image, Processed


def population(probability: np.ndarray, gate: np.ndarray | None = None) -> drift.Population:
    """Served decisions at 0.5 (positive) and 0.9 (triage), every image assessed unless ``gate`` says."""
    assessed = np.ones(len(probability), bool) if gate is None else gate
    return drift.Population(
        probability=probability,
        assessed=assessed,
        positive=assessed & (probability >= 0.5),
        triage=assessed & (probability >= 0.9),
    )


def mixture(rng: np.random.Generator, size: int, prevalence: float) -> drift.Population:
    """Scores of a model that separates well: high for pneumonia, low for normal images."""
    sick = rng.random(size) < prevalence
    return population(np.where(sick, rng.beta(8, 2, size), rng.beta(2, 8, size)))


@pytest.mark.parametrize("seed", range(5))
def test_the_distance_is_scipys_wasserstein_distance(seed: int) -> None:
    rng = np.random.default_rng(seed)
    u, v = rng.random(rng.integers(1, 80)), rng.beta(2, 5, rng.integers(1, 80))
    assert drift.wasserstein(u, v) == pytest.approx(wasserstein_distance(u, v), abs=1e-12)
    assert np.isnan(drift.wasserstein(u, np.zeros(0)))


def test_windows_of_the_reference_population_stay_below_the_threshold_and_shifted_ones_cross_it() -> (
    None
):
    rng = np.random.default_rng(1)
    reference = mixture(rng, 300, prevalence=0.3)
    limit = drift.bounds(reference, window=100).distance
    alike = [drift.wasserstein(mixture(rng, 100, 0.3).scores, reference.scores) for _ in range(200)]
    shifted = [
        drift.wasserstein(mixture(rng, 100, 0.6).scores, reference.scores) for _ in range(200)
    ]
    # nominally 1 % of windows like the reference cross it
    assert np.mean(np.array(alike) > limit) < 0.05, (limit, np.quantile(alike, [0.5, 0.99]))
    assert np.mean(np.array(shifted) > limit) > 0.9, (limit, np.quantile(shifted, [0.1, 0.5]))


def test_the_threshold_of_the_demo_bundle_holds_on_its_test_images(demo_bundle: Path) -> None:
    """Windows of the test split (held out, the same population) stay below the threshold found
    on the validation split; windows of its pneumonia images alone (a ward where every image
    is sick) cross it."""
    contract_temperature = float(np.load(scores_path(demo_bundle, "val"))["temperature"])
    reference = drift.load_reference(demo_bundle, contract_temperature)
    assert reference is not None
    window = 100
    limit = drift.bounds(reference, window).distance
    with np.load(scores_path(demo_bundle, "test")) as saved:
        test = drift.Population(
            probability=saved["pneumonia_probability"],
            assessed=saved["assessed"],
            positive=saved["positive"],
            triage=saved["triage"],
        )
        sick = np.flatnonzero(saved["labels"] != list(saved["classes"]).index("normal"))
    rng = np.random.default_rng(2)

    def crossed(pool: np.ndarray) -> float:
        draws = [test.take(rng.choice(pool, window)) for _ in range(200)]
        return float(
            np.mean([drift.wasserstein(d.scores, reference.scores) > limit for d in draws])
        )

    assert crossed(np.arange(len(test))) < 0.05
    assert crossed(sick) > 0.9


def test_a_bundle_without_a_reference_has_no_drift_gauges_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pacs_node.drift"):
        assert drift.load_reference(tmp_path, 1.0) is None
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "drift gauges are off" in caplog.records[0].getMessage()
    metrics = Metrics()
    watch = drift.Watch(metrics, 20, ("demo", "1"), None)
    for p in (0.2, 0.7, 0.95):
        watch(processed(p))
    text = metrics.render().decode()
    assert 'dp_node_window_images{model="demo",model_version="1"} 3.0' in text
    assert "dp_node_drift_distance" not in text


def test_an_unreadable_reference_is_a_warning_not_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = scores_path(tmp_path, "val")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a numpy archive")
    with caplog.at_level(logging.INFO, logger="pacs_node.drift"):
        assert drift.load_reference(tmp_path, 1.0) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_the_window_rates_count_the_last_images_of_each_model_version() -> None:
    rng = np.random.default_rng(3)
    reference = mixture(rng, 200, prevalence=0.3)
    metrics = Metrics()
    watch = drift.Watch(metrics, 10, ("demo", "2"), reference)
    for p in [0.1] * 30 + [0.95] * 6 + [0.2] * 3:
        watch(processed(p, version="2"))
    watch(processed(0.6, ood=True, version="2"))
    watch(processed(0.99, version="1"))  # another version: its own window, no drift
    labels = {"model": "demo", "model_version": "2"}
    value = metrics.registry.get_sample_value
    assert value("dp_node_window_images", labels) == 10
    assert value("dp_node_window_not_assessed_ratio", labels) == pytest.approx(0.1)
    assert value("dp_node_window_positive_ratio", labels) == pytest.approx(0.6)
    assert value("dp_node_window_triage_ratio", labels) == pytest.approx(0.6)
    assert value("dp_node_window_images", {"model": "demo", "model_version": "1"}) == 1
    assert value("dp_node_drift_distance", {"model": "demo", "model_version": "1"}) is None
    low, distance, high = (
        value(f"dp_node_drift_distance{end}", labels) for end in ("_low", "", "_high")
    )
    assert low <= distance <= high
    assert distance > value("dp_node_drift_threshold", labels)
    assert value("dp_node_reference_positive_ratio", labels) == pytest.approx(
        reference.positive.mean()
    )


def processed(probability: float, ood: bool = False, version: str = "1") -> Processed:
    """The event of one processed image whose model said ``probability`` of pneumonia."""
    prediction = Prediction(
        classes=("normal", "pneumonia"),
        probabilities=np.array([1.0 - probability, probability]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=np.zeros((2, 2)),
        boxes=np.zeros((0, 4)),
        triage_point=0.9,
        ood_score=2.0 if ood else 0.0,
        ood_threshold=1.0,
    )
    model = SimpleNamespace(name="demo", version=version)
    return Processed(
        image=Image(sop_instance_uid="1.2.3"),
        prediction=prediction,
        model=model,  # type: ignore[arg-type]  # the watch reads the name and version alone
        outputs=[],
        delivery="kept",
    )
