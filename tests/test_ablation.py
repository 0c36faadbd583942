"""The paper's tables: the ablation harness and the comparison rows train what they say."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from training_support import tiny

from dp_model.training.cli import main as train_main

# --- the paper's tables --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ablation_harness_writes_every_table(dataset_dir: Path, tmp_path: Path) -> None:
    from dp_model.training.ablation import TABLES

    assert (
        train_main(
            [
                "ablation",
                "--data",
                str(dataset_dir),
                "--out",
                str(tmp_path / "out"),
                "--seeds",
                "0",
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
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["table"], r["row"]) for r in results["summary"]] == [
        (r.table, r.name) for rows in TABLES.values() for r in rows
    ]
    for entry in results["summary"]:
        untrained = entry["row"] in ("Majority class", "Chance (random scores)")
        assert (0.0 <= entry["accuracy"][0] <= 1.0 or entry["row"].startswith("Prior map")) and (
            entry["minutes"][0] > 0
        ) == (not untrained)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "Table I" in table and "Table II" in table and "| SVM (polynomial) |" in table
    assert "### The four systems" in table and "| CIA-Net without alignment |" in table
    # Networks get localization accuracy at every threshold; the same training in two tables is run once.
    by_row = {(r["table"], r["row"]): r for r in results["summary"]}
    assert all(
        len(by_row[("systems", name)]["localization"][0]) == 7
        for name in ("Deep Pneumonia", "CIA-Net", "Class-based attention")
    )
    assert (
        by_row[("systems", "Deep Pneumonia")]["balanced_accuracy"]
        == by_row[("I", "+ CB focal loss (Deep Pneumonia)")]["balanced_accuracy"]
    )
    assert by_row[("systems", "CIA-Net")]["minutes"] == by_row[("cia", "CIA-Net")]["minutes"]
    assert (tmp_path / "out" / "results.png").stat().st_size > 5000 and (
        tmp_path / "out" / "systems.png"
    ).stat().st_size > 5000
    # The baselines: majority and chance without training, each network row with its bootstrap
    # interval and recall per class; the corrected variants beside the papers'.
    assert by_row[("baselines", "Majority class")]["balanced_accuracy"][0] == pytest.approx(0.2)
    assert (
        "### Baselines" in table
        and "### The corrected variants" in table
        and "### Recall of each class" in table
    )
    for key in (
        ("baselines", "Plain ResNet18 (CE, no augmentation, fixed rate)"),
        ("systems", "CIA-Net"),
        ("options", "Class-based attention, balanced c_i"),
    ):
        low, high = by_row[key]["balanced_accuracy_interval"]
        assert (
            low <= by_row[key]["balanced_accuracy"][0] <= high and len(by_row[key]["recall"]) == 5
        )
    assert (
        train_main(
            [
                "ablation",
                "--data",
                str(dataset_dir),
                "--out",
                str(tmp_path / "x"),
                "--tables",
                "III",
            ]
        )
        == 2
    )


def test_each_comparison_row_trains_with_what_its_name_says(
    dataset_dir: Path, tmp_path: Path
) -> None:
    from dp_model.training.ablation import OPTIONS, SYSTEMS, TABLES, _recipe
    from dp_model.training.baselines import NO_AUGMENTATION
    from dp_model.training.config import STRONG_AUGMENTATION

    light = tiny(dataset_dir, tmp_path / "cache")
    # Under the default (light) augmentation, the light augmentation row is its system: trained once.
    assert OPTIONS[2].key(light) == SYSTEMS[0].key(light) and OPTIONS[0].key(light) != SYSTEMS[
        0
    ].key(light)
    # The tables' recipe: the strong augmentation, which the light augmentation row varies.
    config = replace(light, finetune=replace(light.finetune, augment=STRONG_AUGMENTATION))
    assert OPTIONS[2].key(config) != SYSTEMS[0].key(config)
    recipes = {row.name: _recipe(row, config) for rows in TABLES.values() for row in rows}
    plain = recipes["Plain ResNet18 (CE, no augmentation, fixed rate)"]
    assert (
        plain.augment == NO_AUGMENTATION
        and plain.loss.kind == "ce"
        and not plain.mgacr.enabled
        and plain.step_gamma == 1.0
    )
    # Table I's first row keeps the recipe's augmentation
    assert recipes["ResNet18"].augment == config.finetune.augment
    paper = recipes["Deep Pneumonia"]
    assert (paper.mgacr.feature_form, paper.mgacr.relative, paper.loss.kind) == (
        "paper",
        False,
        "cb_focal",
    )
    assert (
        recipes[OPTIONS[0].name].mgacr.feature_form == "detached"
        and recipes[OPTIONS[1].name].mgacr.relative
    )
    assert recipes[OPTIONS[2].name].augment.rotate_degrees < config.finetune.augment.rotate_degrees
    assert (
        recipes[OPTIONS[3].name].class_attention.class_weights == "balanced"
        and recipes["Class-based attention"].class_attention.class_weights == "paper"
    )
    # Apart from the option it names, each variant trains as the system it varies.
    for variant, system in (
        (OPTIONS[0], "Deep Pneumonia"),
        (OPTIONS[1], "Deep Pneumonia"),
        (OPTIONS[2], "Deep Pneumonia"),
        (OPTIONS[3], "Class-based attention"),
    ):
        differing = [
            f
            for f in vars(paper)
            if getattr(recipes[variant.name], f) != getattr(recipes[system], f)
        ]
        assert len(differing) == 1, (variant.name, differing)
        assert variant.name.split(",")[0] == system  # the name the paired comparison pairs by


def test_paired_comparison_pairs_each_variant_with_its_system_seed_by_seed(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "paired_options", Path(__file__).parents[1] / "benchmarks" / "paired_options.py"
    )
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)

    def result(row: str, seed: int, ba: float, auc: float, loc: float) -> dict:
        return {
            "row": row,
            "seed": seed,
            "balanced_accuracy": ba,
            "macro_auc": auc,
            "localization": [loc, 0.0],
            "extra": {"recall": [0.5, 0.5]},
        }

    systems = tmp_path / "systems.json"
    systems.write_text(
        json.dumps(
            {
                "results": [
                    result("Deep Pneumonia", 0, 0.40, 0.70, 0.0),
                    result("Deep Pneumonia", 1, 0.50, 0.80, 0.1),
                ]
            }
        )
    )
    options = tmp_path / "options.json"
    options.write_text(
        json.dumps(
            {
                "results": [
                    result("Deep Pneumonia, detached", 0, 0.45, 0.69, 0.2),
                    result("Deep Pneumonia, detached", 1, 0.52, 0.78, 0.3),
                    result("Deep Pneumonia, detached", 2, 0.99, 0.99, 0.9),
                    result("Unknown system, x", 0, 0.9, 0.9, 0.9),
                ]
            }
        )
    )
    table = paired.paired(paired.load([str(systems), str(options)]))
    ba = next(line for line in table.splitlines() if "balanced accuracy" in line)
    auc = next(line for line in table.splitlines() if "macro ROC AUC" in line)
    # seed 2 has no system to pair with
    assert "+0.050, +0.020" in ba and "+0.035" in ba and "2 of 2" in ba
    assert "-0.010, -0.020" in auc and "0 of 2" in auc
    assert "Unknown system" not in table
    assert paired.main(["paired_options.py", str(tmp_path / "missing.json")]) == 2
