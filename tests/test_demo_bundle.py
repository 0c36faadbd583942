"""The embedded demonstration bundle (what `make run` serves): right on its own held-out
phantoms, and quick to build.

The figures are recomputed from what the bundle saved about its test split (the per-image
scores of ``docs/scores_test.npz``, the contract's points and gate), never read from a number
the card states; the split is checked to keep each patient on one side when the phantoms the
bundle was trained from lie beside it (``make run`` and the suite's fixture both put them there).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dp_model.training import data as training_data

#: What the demonstration must reach on its held-out test phantoms (docs/benchmarks.md, "Demo model").
BALANCED_ACCURACY = 0.80
PRESENT_SPECIFICITY = 0.80
#: Fewer test images than this and a lucky split could pass: the figures would mean little.
TEST_IMAGES = 150


def _balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, classes: int) -> float:
    recalls = [
        float((predicted[labels == c] == c).mean()) for c in range(classes) if (labels == c).any()
    ]
    return float(np.mean(recalls))


@pytest.fixture(scope="module")
def test_scores(demo_bundle: Path):
    from dp_model.serving.bundle import load_bundle

    _, contract = load_bundle(demo_bundle)
    saved_scores = demo_bundle / "docs" / "scores_test.npz"
    assert saved_scores.exists(), (
        f"{demo_bundle} saved no per-image test scores to recompute its figures from"
    )
    with np.load(saved_scores, allow_pickle=False) as saved:
        scores = {key: saved[key] for key in saved.files}
    return contract, scores


def test_the_demo_model_recognises_the_types_of_its_held_out_test_phantoms(test_scores) -> None:
    contract, scores = test_scores
    labels, probabilities = scores["labels"], scores["probabilities"]
    assert len(labels) >= TEST_IMAGES, f"only {len(labels)} test images"
    assert tuple(scores["outputs"]) == tuple(contract.classes), (
        "one probability per class, in the contract's order"
    )
    found = _balanced_accuracy(labels, probabilities.argmax(axis=1), len(contract.classes))
    assert found >= BALANCED_ACCURACY, (
        f"balanced accuracy {found:.3f} on {len(labels)} held-out test images"
    )


def test_the_demo_model_is_clearly_above_its_baselines_recomputed_from_their_saved_scores(
    demo_bundle: Path, test_scores
) -> None:
    """The baselines' per-image test scores are saved beside the model's, on the same images in
    the same order; the model's balanced accuracy is above each, the paired bootstrap interval
    of the difference (1,000 resamples of the test images) above zero."""
    card = (demo_bundle / "docs" / "README.md").read_text()
    assert "| plain ResNet18" in card and "not better than its baselines" not in card
    _, scores = test_scores
    with np.load(demo_bundle / "docs" / "scores_baselines.npz", allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["ids"], scores["ids"])
        np.testing.assert_array_equal(saved["labels"], scores["labels"])
        others = {key: saved[key].argmax(axis=1) for key in ("plain_resnet18", "block_statistics")}
    labels, ours, classes = (
        scores["labels"],
        scores["probabilities"].argmax(axis=1),
        scores["probabilities"].shape[1],
    )
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(labels), len(labels)) for _ in range(1000)]
    for name, theirs in others.items():
        differences = [
            _balanced_accuracy(labels[d], ours[d], classes)
            - _balanced_accuracy(labels[d], theirs[d], classes)
            for d in draws
        ]
        low = float(np.percentile(differences, 2.5))
        assert low > 0, (
            f"{name}: the model's lead in balanced accuracy is not clear (95 % interval from {low:+.3f})"
        )


def test_the_demo_models_present_point_keeps_normal_test_phantoms_negative(test_scores) -> None:
    from dp_model.serving.served import is_pneumonia, served_decisions

    contract, scores = test_scores
    ood = None if np.isnan(scores["ood_score"]).all() else scores["ood_score"]
    served = served_decisions(scores["probabilities"], ood, contract)
    np.testing.assert_array_equal(
        served.positive, scores["positive"], err_msg="the saved decisions are the contract's rule"
    )
    truth = is_pneumonia(scores["labels"], contract)
    specificity = float((~served.positive[~truth]).mean())
    sensitivity = float(served.positive[truth].mean())
    assert "present" in contract.operating_points and contract.operating_points["present"].certified
    assert specificity >= PRESENT_SPECIFICITY, (
        f"present point: specificity {specificity:.3f} at sensitivity {sensitivity:.3f} on test"
    )


def test_the_demo_model_draws_regions_because_they_beat_the_prior_map(
    demo_bundle: Path, test_scores
) -> None:
    from dp_model.serving.contract import regions_earned

    contract, _ = test_scores
    located = contract.localization
    assert located is not None and located.shown, "lesion regions are not shown"
    assert regions_earned(
        located.validation, located.prior_validation, located.difference_low, located.margin
    )
    assert located.test["iou>0.3"] > located.prior_test["iou>0.3"], (
        "on test too, the regions beat the fixed prior"
    )


def _iou(a: list[float], b: list[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_the_walkthroughs_samples_are_answered_right_with_regions_on_the_lesion(
    demo_bundle: Path,
) -> None:
    """What the README shows a newcomer: the node's answer on each sample beside its ground truth
    (``samples/truth.json``): pneumonia found with its type and a region on the lesion box, a
    normal phantom answered negative with no region."""
    from pydicom import dcmread

    from pacs_node.model.predictor import NodePredictor, prepare

    truth = json.loads((demo_bundle / "samples" / "truth.json").read_text())
    card = (demo_bundle / "docs" / "README.md").read_text()
    for name, expected in truth.items():  # the card says what each sample is
        line = next((row for row in card.splitlines() if row.startswith(f"- `{name}`: ")), "")
        assert expected["labels"][0] in line and all(
            f"x {box[0]:g}-{box[2]:g}" in line for box in expected["boxes"]
        ), f"the card's line for {name}: {line!r}"
    predictor = NodePredictor(demo_bundle, "cpu")
    assert {"normal"} in [set(t["labels"]) for t in truth.values()], "no normal sample"
    assert any(set(t["labels"]) != {"normal"} for t in truth.values()), "no pneumonia sample"
    overlaps: dict[str, str] = {}
    on_lesion: list[str] = []
    for name, expected in truth.items():
        (found,) = predictor.predict(
            [prepare(dcmread(demo_bundle / "samples" / name), predictor.contract.image_size)]
        )
        assert found.assessed, name
        if expected["labels"] == ["normal"]:
            assert not found.positive and len(found.boxes) == 0, (
                f"{name}: a normal phantom answered {found}"
            )
            continue
        assert found.positive and expected["labels"] == [
            found.classes[int(np.argmax(found.probabilities))]
        ], name
        best = max(
            (
                _iou(list(map(float, box)), truth_box)
                for box in found.boxes
                for truth_box in expected["boxes"]
            ),
            default=0.0,
        )
        overlaps[name] = (
            f"{name}: best IoU {best:.2f}; regions {found.boxes.tolist()}, boxes {expected['boxes']}"
        )
        if best > 0.3:
            on_lesion.append(name)
    # the samples are chosen by their answers, not by their regions (dp_model.training.run):
    # the first pneumonia sample, the one the walkthrough opens with, shows its region on the
    # lesion; how often regions are right is the card's localization figure, not a sample's
    first = next(name for name, t in truth.items() if set(t["labels"]) != {"normal"})
    assert first in on_lesion, overlaps


def test_the_demo_bundles_test_phantoms_share_no_patient_with_its_training(
    demo_bundle: Path,
) -> None:
    from dp_model.datasets import read_dataset
    from dp_model.datasets.splits import hashed_id

    card = (demo_bundle / "docs" / "README.md").read_text()
    assert "patient split" in card
    phantoms = demo_bundle.parent / "data"
    if not phantoms.exists():
        pytest.skip(f"the phantoms the bundle was trained from are not beside it ({phantoms})")
    split = json.loads((demo_bundle / "configs" / "split.json").read_text())
    patient = {hashed_id(r.image_id): r.patient_id for r in read_dataset(phantoms).records}
    held_out = {patient[i] for i in split["test"]}
    fitted = {patient[i] for part in ("train", "val", "calibration") for i in split.get(part, [])}
    assert None not in held_out and not held_out & fitted


def test_the_demo_card_says_how_easy_its_phantoms_were(demo_bundle: Path) -> None:
    card = (demo_bundle / "docs" / "README.md").read_text()
    assert (
        "Synthetic phantoms (`dp-synth`" in card
        and "lesion contrast" in card
        and "label noise" in card
    )


# --- decoding: no process pool where it costs more than it saves ------------------------------------


@pytest.fixture(scope="module")
def small_phantoms(tmp_path_factory: pytest.TempPathFactory):
    from dp_model.datasets import read_dataset
    from dp_model.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("phantoms")
    generate(SynthConfig(num_images=72, size=96, workers=1), root, progress=False)
    return read_dataset(root).records


class _NoPool:
    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("a process pool was started for a few small images")


class _InlinePool:
    """Stands in for a process pool: maps in this process, and counts that it was used."""

    started = 0

    def __init__(self, *args, **kwargs) -> None:
        type(self).started += 1

    def map(self, function, jobs, chunksize: int = 1):
        return map(function, jobs)

    def shutdown(self) -> None:
        pass


def test_a_few_small_images_are_decoded_in_this_process_with_trainings_threads_left_alone(
    small_phantoms, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training_data, "ProcessPoolExecutor", _NoPool)
    threads = torch.get_num_threads()
    images, boxes = training_data.decode(small_phantoms, 64, workers=2)
    assert images.shape == (72, 64, 64) and len(boxes) == 72 and images.max() > 0
    assert torch.get_num_threads() == threads


def test_images_slow_to_decode_still_go_to_a_pool_and_come_back_in_order(
    small_phantoms, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, _ = training_data.decode(small_phantoms, 64, workers=1)
    monkeypatch.setattr(training_data, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(training_data, "POOL_BREAK_EVEN_S", 0.0)
    # the inline "worker" must not change this process
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    pooled, boxes = training_data.decode(small_phantoms, 64, workers=2)
    assert _InlinePool.started == 1 and len(boxes) == 72
    np.testing.assert_array_equal(pooled, here)


def test_the_samples_are_a_pneumonia_and_a_normal_test_image_the_node_gets_right(
    tmp_path: Path,
) -> None:
    from dp_model.training.run import example_images

    labels = np.array([0, 1, 2, 0, 1, 3])
    # the first lobar image is called bronchopneumonia
    probabilities = np.eye(5)[[0, 2, 2, 0, 1, 3]]
    # the first normal image is called positive
    positive = np.array([True, True, True, False, True, True])
    # the interstitial one is turned away
    assessed = np.array([True, True, True, True, True, False])
    np.savez(
        tmp_path / "scores.npz",
        labels=labels,
        probabilities=probabilities,
        positive=positive,
        assessed=assessed,
    )
    test = (10, 11, 12, 13, 14, 15)
    assert example_images(tmp_path / "scores.npz", test, normal=0) == [12, 13, 14]
    assert example_images(tmp_path / "scores.npz", test, normal=0, count=5) == [12, 13, 14, 10, 11]


def test_the_saved_test_scores_are_what_the_node_computes_for_the_same_images(
    demo_bundle: Path, predictor
) -> None:
    """``docs/scores_test.npz``, which every served figure of the card (and ``dp-train
    evaluate``'s comparison) is recomputed from, holds what the node's ``NodePredictor`` gives
    the same test phantoms: the calibrated probabilities and gate scores within 1e-4."""
    from helpers import assert_saved_scores_are_the_nodes

    phantoms = demo_bundle.parent / "data"
    if not phantoms.exists():
        pytest.skip(f"the phantoms the bundle was trained from are not beside it ({phantoms})")
    assert_saved_scores_are_the_nodes(demo_bundle, phantoms, predictor)
