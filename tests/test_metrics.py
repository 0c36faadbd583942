"""Classification metrics against direct counts on small examples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dp_model.metrics import confusion_matrix, evaluate, per_class, roc_auc


def test_confusion_matrix_and_per_class_rates_count_by_hand() -> None:
    target = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 0, 0])
    matrix = confusion_matrix(target, pred, 3)
    assert matrix.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    stats = per_class(matrix)
    assert stats["precision"][0] == pytest.approx(2 / 4) and stats["recall"][0] == pytest.approx(
        2 / 3
    )
    # of the four images not class 1, three were not called 1
    assert stats["specificity"][1] == pytest.approx(3 / 4)
    assert np.isnan(stats["precision"][2]) and np.isnan(stats["f1"][2])  # never predicted


def test_roc_auc_is_the_share_of_correctly_ordered_pairs() -> None:
    rng = np.random.default_rng(0)
    target = rng.random(30) < 0.4
    scores = np.round(rng.random(30), 1)  # ties count one half
    pairs = [
        (1.0 if p > n else 0.5 if p == n else 0.0)
        for p, n in itertools.product(scores[target], scores[~target])
    ]
    assert roc_auc(target, scores) == pytest.approx(np.mean(pairs))
    assert np.isnan(roc_auc(np.ones(4, bool), np.arange(4.0)))


def test_evaluate_gives_bootstrap_intervals_for_the_scalars_and_each_class_auc() -> None:
    rng = np.random.default_rng(1)
    target = rng.integers(0, 3, 120)
    probabilities = rng.dirichlet(np.ones(3), 120)
    probabilities[np.arange(120), target] += 0.5  # informative
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    report = evaluate(target, probabilities, ("normal", "a", "b"), bootstrap=200, seed=0)
    assert report.accuracy == pytest.approx(np.mean(probabilities.argmax(axis=1) == target))
    for name in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_auc",
        "auc normal",
        "auc a",
        "auc b",
    ):
        low, high = report.intervals[name]
        value = (
            report.scalars()[name]
            if name in report.scalars()
            else report.per_class["auc"][("normal", "a", "b").index(name[4:])]
        )
        assert low <= value <= high and high - low < 0.5
    assert (
        "ROC AUC (95 % CI)" in report.table()
        and f"{report.intervals['auc a'][0]:.3f} to" in report.table()
    )
    assert evaluate(target, probabilities, ("normal", "a", "b")).intervals == {}
