"""The selection protocol: validation chooses, test is reported once, paired intervals decide.

The statistical parts run on synthetic scores whose answer is known; one small ablation run
checks that every row keeps what the protocol needs to be re-checked after the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dp_model.training import baselines, compare
from dp_model.training.compare import Scores, paired, select, verdict

CLASSES = ("normal", "a", "b", "c", "d")


def _ids(n: int, offset: int = 0) -> list[str]:
    return [f"{i + offset:016x}" for i in range(n)]


def _labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(5, size=n, p=[0.4, 0.2, 0.15, 0.15, 0.1])


def _scores(
    labels: np.ndarray, skill: float, rng: np.random.Generator, noise: np.ndarray | None = None
) -> np.ndarray:
    """Log scores whose true class gets ``skill`` extra logit; ``noise`` shared between rows
    makes two rows' errors correlated, as two networks on the same images are."""
    noise = rng.normal(size=(len(labels), 5)) if noise is None else noise
    logits = noise + skill * np.eye(5)[labels]
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _save(
    path: Path, val: tuple, test: tuple, tau: float = 0.0, counts=(40, 20, 15, 15, 10)
) -> Path:
    compare.save_scores(path, {"val": val, "test": test}, np.array(counts), tau, CLASSES)
    return path


# --- verdicts at a margin ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.03, 0.10, "better"),
        (0.02, 0.10, "not resolved"),
        (-0.01, 0.015, "level"),
        (-0.02, 0.02, "level"),
        (-0.03, 0.01, "not resolved"),
        (-0.10, -0.021, "worse"),
        (-0.05, 0.05, "not resolved"),
        (float("nan"), 0.0, "not resolved"),
    ],
)
def test_a_verdict_needs_the_whole_interval_past_or_inside_the_margin(
    low: float, high: float, expected: str
) -> None:
    assert verdict(low, high, margin=0.02) == expected


# --- the paired bootstrap on scores with a known answer ---------------------------------------------------------


def _seeds(
    skill_a: float, skill_b: float, n: int, seeds: int, shared: bool = True, start: int = 0
) -> tuple[dict, dict]:
    a, b = {}, {}
    for s in range(start, start + seeds):
        rng = np.random.default_rng(100 + s)
        labels = _labels(n, rng)
        noise = rng.normal(size=(n, 5))
        ids = np.array([int(i, 16) for i in _ids(n)], np.uint64)
        a[s] = Scores(ids, labels, _scores(labels, skill_a, rng, noise if shared else None))
        b[s] = Scores(ids, labels, _scores(labels, skill_b, rng, noise if shared else None))
    return a, b


def test_identical_rows_are_level_with_a_zero_difference() -> None:
    a, _ = _seeds(2.0, 2.0, 300, 5)
    for metric in ("balanced_accuracy", "macro_auc"):
        found = paired(a, a, metric, margin=0.02, resamples=200)
        assert found.difference == 0.0 and found.interval == (0.0, 0.0) and found.verdict == "level"


def test_a_clearly_better_row_is_better_and_the_reverse_is_worse() -> None:
    a, b = _seeds(3.0, 1.0, 300, 5)
    found = paired(a, b, "balanced_accuracy", margin=0.02, resamples=300)
    assert found.interval[0] > 0.02 and found.verdict == "better"
    assert paired(b, a, "balanced_accuracy", margin=0.02, resamples=300).verdict == "worse"
    assert paired(a, b, "macro_auc", margin=0.02, resamples=300).verdict == "better"


def test_a_small_effect_on_few_images_is_not_resolved() -> None:
    a, b = _seeds(1.6, 1.5, 60, 5)
    found = paired(a, b, "balanced_accuracy", margin=0.02, resamples=300)
    assert found.interval[0] < 0.02 < found.interval[1] and found.verdict == "not resolved"


def test_the_per_seed_difference_is_the_metric_difference_on_the_same_images() -> None:
    a, b = _seeds(2.0, 1.0, 200, 5)
    found = paired(a, b, "balanced_accuracy", resamples=50)
    for s, (difference, low, high) in found.per_seed.items():
        expected = compare.balanced_accuracy(
            a[s].labels, a[s].probabilities()
        ) - compare.balanced_accuracy(b[s].labels, b[s].probabilities())
        assert difference == pytest.approx(expected) and low <= difference <= high
    assert found.difference == pytest.approx(np.mean([v[0] for v in found.per_seed.values()]))


def test_pairing_the_images_narrows_the_interval_of_correlated_rows() -> None:
    # Two rows that share their errors image by image and differ a little: resampling the same
    # images for both cancels the shared part. An unpaired bootstrap would be several times wider.
    a, b = _seeds(2.2, 2.0, 400, 5, shared=True)
    width = np.diff(paired(a, b, "balanced_accuracy", resamples=400).images_only)[0]
    rng = np.random.default_rng(0)
    unpaired = []
    for _ in range(400):
        differences = []
        for s in a:
            i, j = (rng.integers(0, len(a[s].labels), len(a[s].labels)) for _ in range(2))
            differences.append(
                compare.balanced_accuracy(a[s].labels[i], a[s].probabilities()[i])
                - compare.balanced_accuracy(b[s].labels[j], b[s].probabilities()[j])
            )
        unpaired.append(np.mean(differences))
    assert width < 0.5 * np.diff(np.percentile(unpaired, [2.5, 97.5]))[0]


def test_seed_to_seed_variation_widens_the_combined_interval() -> None:
    # Five seeds, better by a wide margin in some and worse in others: the images of each seed
    # decide it, the seeds do not. Only the interval that resamples seeds says so.
    a, b = {}, {}
    for s, (skill_a, skill_b) in enumerate(
        [(3.0, 1.0), (1.0, 3.0), (3.0, 1.0), (1.0, 3.0), (3.0, 1.0)]
    ):
        one, two = _seeds(skill_a, skill_b, 400, 1, start=s)
        a[s], b[s] = one[s], two[s]
    found = paired(a, b, "balanced_accuracy", margin=0.02, resamples=400)
    assert found.images_only[0] > 0.02  # seeds held fixed: looks decided
    assert found.interval[0] < 0.0 < found.interval[1] and found.verdict == "not resolved"


def test_fewer_seeds_than_the_protocol_asks_give_no_verdict() -> None:
    a, b = _seeds(3.0, 1.0, 300, 3)
    assert paired(a, b, "balanced_accuracy", resamples=100, min_seeds=5).verdict == "not resolved"
    assert paired(a, b, "balanced_accuracy", resamples=100, min_seeds=3).verdict == "better"


def test_rows_scored_on_different_images_cannot_be_paired() -> None:
    a, b = _seeds(2.0, 2.0, 50, 1)
    shifted = {0: Scores(b[0].ids + np.uint64(1), b[0].labels, b[0].log_scores)}
    with pytest.raises(ValueError, match="same images"):
        paired(a, shifted, resamples=10)


def test_a_map_is_compared_with_the_prior_on_the_same_boxed_images() -> None:
    rng = np.random.default_rng(0)
    a, prior = {}, {}
    for s in range(5):
        labels = rng.integers(0, 4, 300)
        hits = rng.random(300) < 0.6
        prior[s] = (np.where(hits, 0.4, 0.05), labels)
        # hits wherever the prior does, and more
        a[s] = (np.where(hits | (rng.random(300) < 0.5), 0.4, 0.05), labels)
    found = compare.paired_localization(a, prior, threshold=0.1, resamples=300)
    assert found.difference == pytest.approx(
        np.mean(
            [
                compare.class_mean(a[s][1], (a[s][0] > 0.1) * 1.0)
                - compare.class_mean(prior[s][1], (prior[s][0] > 0.1) * 1.0)
                for s in a
            ]
        )
    )
    assert (
        found.verdict == "better"
        and compare.paired_localization(prior, prior, resamples=50).verdict == "level"
    )
    # nobody passes 0.5
    assert compare.paired_localization(a, prior, threshold=0.5, resamples=50).verdict == "level"
    # each class counts once
    assert compare.class_mean(np.array([0, 0, 0, 1]), np.array([1.0, 1.0, 1.0, 0.0])) == 0.5


# --- choosing on validation, reporting test once ----------------------------------------------------------------


def test_selection_uses_validation_only_and_reports_the_chosen_rows_test(tmp_path: Path) -> None:
    # "val_wins" is better on validation and worse on test; "test_wins" the reverse. A selection
    # that looked at test would pick "test_wins".
    rng = np.random.default_rng(3)
    files: dict[str, dict[int, Path]] = {"test_wins": {}, "val_wins": {}}
    for s in range(3):
        val_labels, test_labels = _labels(300, rng), _labels(300, rng)
        val, test = (_ids(300), val_labels), (_ids(300, 1000), test_labels)
        files["test_wins"][s] = _save(
            tmp_path / f"t{s}.npz",
            (*val, _scores(val_labels, 1.0, rng)),
            (*test, _scores(test_labels, 3.0, rng)),
        )
        files["val_wins"][s] = _save(
            tmp_path / f"v{s}.npz",
            (*val, _scores(val_labels, 3.0, rng)),
            (*test, _scores(test_labels, 1.0, rng)),
        )
    chosen = select(files)
    assert (
        chosen.chosen == "val_wins"
        and chosen.validation["val_wins"] > chosen.validation["test_wins"]
    )
    expected = np.mean(
        [
            compare.balanced_accuracy(f.labels, f.probabilities())
            for f in (compare.load_scores(files["val_wins"][s], "test") for s in range(3))
        ]
    )
    assert chosen.test["balanced_accuracy"] == pytest.approx(expected) and set(
        chosen.test_per_seed
    ) == {0, 1, 2}


# --- post-hoc logit adjustment ----------------------------------------------------------------------------------


def _prior_shifted(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A calibrated posterior under a long-tailed prior: balanced accuracy suffers from the
    prior, and subtracting log prior (tau = 1) is the Bayes-optimal fix."""
    prior = np.array([0.55, 0.2, 0.12, 0.08, 0.05])
    labels = rng.choice(5, size=n, p=prior)
    likelihood = rng.normal(size=(n, 5)) + 1.2 * np.eye(5)[labels]
    logits = likelihood + np.log(prior)
    return labels, logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), prior


def test_logit_adjustment_chosen_on_validation_recovers_balanced_accuracy_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    val_labels, val_log, prior = _prior_shifted(4000, rng)
    test_labels, test_log, _ = _prior_shifted(4000, rng)
    tau = baselines.choose_tau(val_log, val_labels, prior)
    assert 0.5 <= tau <= 1.5
    raw, fixed = np.exp(test_log), baselines.adjusted(test_log, prior, tau)
    assert (
        compare.balanced_accuracy(test_labels, fixed)
        > compare.balanced_accuracy(test_labels, raw) + 0.05
    )
    assert compare.macro_auc(test_labels, fixed) == pytest.approx(
        compare.macro_auc(test_labels, raw), abs=1e-12
    )
    # Scores without a prior shift keep tau = 0: ties go to no adjustment.
    flat = np.full((6, 5), np.log(0.2))
    assert baselines.choose_tau(flat, np.arange(6) % 5, prior) == 0.0


# --- the non-deep baseline --------------------------------------------------------------------------------------


def test_block_statistics_learn_what_lives_in_one_block_and_choose_on_validation() -> None:
    # Each class brightens a different 16 x 16 block: a block model must find it; shuffled labels must not.
    rng = np.random.default_rng(0)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 5, n)
        x = rng.integers(0, 200, (n, 1, 64, 64)).astype(np.uint8)
        for i, c in enumerate(labels):
            x[i, 0, 16 * (c % 4) : 16 * (c % 4) + 16, 16 * (c // 4) : 16 * (c // 4) + 16] += 40
        return x, labels

    train, val, test = images(300), images(150), images(150)
    features = baselines.tile_features(train[0])
    assert features.shape == (300, 32)
    assert features[0, 0] == pytest.approx(train[0][0, 0, :16, :16].mean()) and features[
        0, 16
    ] == pytest.approx(train[0][0, 0, :16, :16].std(), rel=1e-5)
    val_scores, test_scores, chosen = baselines.tile_statistics(
        train, val, test[0], 5, seed=0, iterations=15
    )
    assert chosen in baselines.TILE_GRID and val_scores.shape == (150, 5)
    assert compare.balanced_accuracy(test[1], test_scores) > 0.8
    _, shuffled, _ = baselines.tile_statistics(
        (train[0], rng.permutation(train[1])), val, test[0], 5, seed=0, iterations=15
    )
    assert compare.balanced_accuracy(test[1], shuffled) < 0.45
    with pytest.raises(ValueError, match="multiple of 16"):
        baselines.tile_features(np.zeros((1, 1, 40, 40)))


# --- the prior map ----------------------------------------------------------------------------------------------


def test_the_prior_map_is_each_classs_mean_training_box() -> None:
    import torch

    from dp_model.training.data import Resident
    from dp_model.training.evaluation import prior_ious, prior_maps

    boxes = torch.zeros(4, 1, 4)
    boxes[0, 0], boxes[1, 0], boxes[2, 0] = (
        torch.tensor([0.0, 0, 16, 16]),
        torch.tensor([24.0, 24, 40, 40]),
        torch.tensor([32.0, 32, 64, 64]),
    )
    train = Resident(
        torch.zeros(4, 1, 64, 64, dtype=torch.uint8),
        boxes,
        torch.tensor([1, 1, 2, 0]),
        torch.tensor([True, True, True, False]),
        ["a", "b", "c", "d"],
    )
    prior = prior_maps(train, 3)
    assert prior[0].max() == 0 and prior[2][40, 40] == 1.0 and prior[2][10, 10] == 0
    # Class 1's two boxes do not meet: each covers half its images, and the map is scaled to its peak.
    assert prior[1][4, 4] == 1.0 and prior[1][30, 30] == 1.0 and prior[1][20, 20] == 0
    iou, labels = prior_ious(prior, train)
    assert (
        labels.tolist() == [1, 1, 2]
        and iou[2] == pytest.approx(1.0)
        and iou[0] == pytest.approx(0.5)
    )


# --- the baselines get the system's budget ----------------------------------------------------------------------


def test_the_plain_network_gets_the_systems_search_and_budget() -> None:
    from dataclasses import replace

    from dp_model.training.ablation import PLAIN_SEARCH, SELECTIONS, SYSTEM_SEARCH, TABLE_I, _recipe
    from dp_model.training.config import FinetuneConfig, TrainConfig

    config = TrainConfig(
        finetune=FinetuneConfig(
            epochs=8, batch_size=32, optimizer="adamw", lr=1e-3, warmup_epochs=0.5
        )
    )
    system = {row.name: _recipe(row, config) for row in (*TABLE_I, *SYSTEM_SEARCH)}
    plain = [_recipe(row, config) for row in PLAIN_SEARCH]
    # The same augmentations as the system's search, and everything else of the system's recipe.
    assert (
        {p.augment for p in plain}
        == {system[n].augment for n in SELECTIONS["Deep Pneumonia, tuned on validation"]}
        == set(baselines.PLAIN_AUGMENTATIONS.values())
    )
    for p in plain:
        assert (p.schedule, p.epochs, p.lr, p.warmup_epochs, p.batch_size, p.optimizer) == (
            "cosine",
            8,
            1e-3,
            0.5,
            32,
            "adamw",
        )
        assert p.loss.kind == "ce" and not p.mgacr.enabled and p.architecture == "resnet18"
        twin = system[
            "Deep Pneumonia, strong augmentation"
            if p.augment == baselines.PLAIN_AUGMENTATIONS["strong"]
            else TABLE_I[-1].name
        ]
        # the system differs only by what Table I adds
        assert replace(twin, mgacr=p.mgacr, loss=p.loss) == p


# --- the ablation harness keeps everything the protocol needs ------------------------------------------------------


def test_every_row_keeps_validation_and_test_scores_per_image(tmp_path: Path) -> None:
    from dp_model.synth import Difficulty, SynthConfig, generate
    from dp_model.training.ablation import (
        PLAIN_SEARCH,
        PROTOCOL,
        SELECTIONS,
        STANDING,
        SYSTEM_SEARCH,
        TABLE_I,
    )
    from dp_model.training.cli import main as train_main

    data = tmp_path / "synth"
    generate(
        SynthConfig(
            num_images=70,
            size=96,
            workers=1,
            class_weights=(1.0, 1.0, 1.0, 1.0, 1.0),
            difficulty=Difficulty(label_noise=0.0),
        ),
        data,
        progress=False,
    )
    out = tmp_path / "out"
    assert (
        train_main(
            [
                "ablation",
                "--data",
                str(data),
                "--out",
                str(out),
                "--seeds",
                "0",
                "1",
                "--by-seed",
                "--tables",
                "plain,standing,I,search",
                "--image-size",
                "32",
                "--pretrain-epochs",
                "1",
                "--finetune-epochs",
                "1",
                "--batch-size",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())["results"]
    rows = [r.name for r in (*PLAIN_SEARCH, *STANDING, *TABLE_I, *SYSTEM_SEARCH)]
    # whole seeds, in order
    assert [(r["seed"], r["row"]) for r in results] == [(s, name) for s in (0, 1) for name in rows]
    for r in results:
        saved = {k: compare.load_scores(out / r["scores"], k) for k in ("val", "test")}
        assert not set(saved["val"].ids.tolist()) & set(saved["test"].ids.tolist())
        if r["row"].startswith("Prior map"):
            assert r["localization"] and np.isnan(r["balanced_accuracy"])
            continue
        # Both splits' metrics are kept, and every figure is recomputed from the saved scores exactly.
        assert set(r["validation"]) == {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc"}
        assert compare.balanced_accuracy(
            saved["test"].labels, saved["test"].probabilities(adjust=False)
        ) == pytest.approx(r["balanced_accuracy"], abs=1e-12)
        assert compare.balanced_accuracy(
            saved["val"].labels, saved["val"].probabilities(adjust=False)
        ) == pytest.approx(r["validation"]["balanced_accuracy"], abs=1e-12)
        assert compare.balanced_accuracy(
            saved["test"].labels, saved["test"].probabilities()
        ) == pytest.approx(r["adjusted"]["test"]["balanced_accuracy"], abs=1e-12)
        assert (
            r["adjusted"]["tau"] in baselines.TAUS
            and r["adjusted"]["validation"]["balanced_accuracy"]
            >= r["validation"]["balanced_accuracy"]
        )
    by = {(r["seed"], r["row"]): r for r in results}
    # The light-augmentation plain candidate is Table I's first row: trained once, saved under both names.
    assert (
        by[(0, PLAIN_SEARCH[0].name)]["balanced_accuracy"]
        == by[(0, TABLE_I[0].name)]["balanced_accuracy"]
    )
    assert (
        by[(0, PLAIN_SEARCH[1].name)]["minutes"] > 0
        and "chosen_on_validation" in by[(0, STANDING[2].name)]["extra"]
    )
    assert (
        by[(1, TABLE_I[-1].name)]["localization"]
        and (out / by[(1, TABLE_I[-1].name)]["scores"]).stat().st_size < 20_000
    )
    for choice, names in SELECTIONS.items():
        chosen = select({n: {s: out / by[(s, n)]["scores"] for s in (0, 1)} for n in names})
        assert chosen.chosen in names and set(chosen.validation) == set(names), choice
    # The protocol's report reads nothing but results.json and the score files.
    report = compare.protocol_report(out / "results.json", PROTOCOL, resamples=20, min_seeds=2)
    assert report["seeds"] == [0, 1] and set(report["selections"]) == set(SELECTIONS)
    pairs = {(c["a"], c["b"], c["metric"]) for c in report["comparisons"]}
    assert (TABLE_I[1].name, TABLE_I[0].name, "balanced_accuracy") in pairs and (
        "Deep Pneumonia, tuned on validation",
        "Plain ResNet18, tuned on validation",
        "macro_auc",
    ) in pairs
    assert (TABLE_I[-1].name, STANDING[3].name, "loc. IoU > 0.1") in pairs
    assert {c["verdict"] for c in report["comparisons"]} <= {
        "better",
        "worse",
        "level",
        "not resolved",
    }
    assert "### Chosen on validation, measured once on test" in compare.protocol_markdown(report)


def test_a_named_pair_is_compared_on_every_seed_both_rows_have(tmp_path: Path) -> None:
    # "strong" has seeds 0-2, "weak" 0-2, "partial" only 0: the protocol's report would cut
    # every row to seed 0; a named pair keeps the three seeds its two rows share.
    rng = np.random.default_rng(7)
    results = []
    for s in range(3):
        val_labels, test_labels = _labels(200, rng), _labels(200, rng)
        noise = rng.normal(size=(200, 5))
        for name, skill in (("strong", 3.0), ("weak", 0.5), ("partial", 1.0)):
            if name == "partial" and s:
                continue
            path = _save(
                tmp_path / f"{name}{s}.npz",
                (_ids(200), val_labels, _scores(val_labels, skill, rng)),
                (_ids(200, 1000), test_labels, _scores(test_labels, skill, rng, noise)),
            )
            results.append({"row": name, "seed": s, "scores": path.name})
    (tmp_path / "results.json").write_text(json.dumps({"results": results}))
    report = compare.pairs_report(
        tmp_path / "results.json",
        [("strong", "weak"), ("strong", "partial")],
        resamples=100,
        min_seeds=3,
    )
    first, _, third, _ = report["comparisons"]
    assert (first["a"], first["b"], first["metric"], set(first["per_seed"])) == (
        "strong",
        "weak",
        "balanced_accuracy",
        {"0", "1", "2"},
    )
    assert (
        first["verdict"] == "better"
        and third["verdict"] == "not resolved"
        and set(third["per_seed"]) == {"0"}
    )
    # one seed: no verdict, the interval still shown
    assert third["interval_alone"] == compare.verdict(*third["interval"])
    text = compare.pairs_markdown(report)
    assert (
        "| strong | weak | balanced accuracy |" in text
        and "3 of 3 | **better** | better |" in text
        and "1 of 1" in text
    )
    with pytest.raises(ValueError, match="no row named 'missing'"):
        compare.pairs_report(tmp_path / "results.json", [("strong", "missing")])
    script = _paired_options()
    assert (
        script.main(
            [
                "paired_options.py",
                "--protocol",
                str(tmp_path / "results.json"),
                "--pair",
                "strong",
                "weak",
                "--resamples",
                "50",
            ]
        )
        == 0
    )
    assert (
        "| strong | weak | macro auc | 0, 1, 2 |" in (tmp_path / "pairs.md").read_text()
        and (tmp_path / "pairs.json").is_file()
    )
    assert (
        script.main(
            [
                "paired_options.py",
                "--protocol",
                str(tmp_path / "results.json"),
                "--pair",
                "strong",
                "missing",
            ]
        )
        == 2
    )


def _paired_options():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "paired_options", Path(__file__).parents[1] / "benchmarks" / "paired_options.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
