"""dp-train: the bundle it writes, evaluation, the command line, baselines and the card."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_engines_agree, assert_saved_scores_are_the_nodes
from training_support import CPU, rsna_run, tiny

from dp_model.config import to_mapping
from dp_model.datasets import read_dataset
from dp_model.serving.bundle import BundleError, load_bundle, validate_metadata
from dp_model.synth import SynthConfig, generate
from dp_model.training.cli import main as train_main
from dp_model.training.config import (
    DataConfig,
)
from dp_model.training.data import load_split, make_splits
from dp_model.training.engine import epoch_line, finetune, pretrain
from dp_model.training.run import train


@pytest.fixture(scope="module")
def bundle(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    config = tiny(dataset_dir, out.parent / "cache")
    # 12 calibration images: enough for a gate
    train(replace(config, int8=True, data=replace(config.data, calibration_fraction=0.15)), out)
    return out


# --- the bundle ---------------------------------------------------------------------------------


def test_bundle_layout_and_offline_metadata_validation(bundle: Path) -> None:
    for part in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/evaluate.json",
        "configs/train.json",
        "configs/multi_gpu_train.json",
        "configs/logging.conf",
        "models/model.pt",
        "models/model.ts",
        "docs/README.md",
        "LICENSE",
    ):
        assert (bundle / part).is_file(), part
    validate_metadata(bundle / "configs" / "metadata.json")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["0"] == "normal"
    assert set(meta["eval_metrics"]) == {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc"}
    broken = bundle / "broken.json"
    broken.write_text(json.dumps({k: v for k, v in meta.items() if k != "network_data_format"}))
    with pytest.raises(BundleError, match="network_data_format"):
        validate_metadata(broken)


def test_the_bundle_carries_its_forward_pass_as_an_onnx_graph_with_the_numbers_of_pytorch(
    bundle: Path,
) -> None:
    from dp_model.serving.onnx_graph import file_digest

    _, contract = load_bundle(bundle)
    assert contract.onnx_digest == file_digest(bundle / "models" / "model.onnx")
    assert_engines_agree(bundle)


def test_the_bundle_records_whether_its_8bit_graph_earned_its_place_on_validation(
    bundle: Path,
) -> None:
    from dp_model.serving.onnx_graph import file_digest
    from dp_model.serving.quantized import MAX_AUC_GAP, record_path

    _, contract = load_bundle(bundle)
    record = json.loads(record_path(bundle).read_text())
    graph = bundle / "models" / "model.int8.onnx"
    assert record["validation"]["images"] == contract.splits["validation"]
    from dp_model.serving.isa import int8_features

    assert record["cpu"]["int8_features"] == int8_features(), "the CPU it was validated on"
    if record["kept"]:
        assert contract.int8_digest == file_digest(graph)
        assert record["validation"]["decisions_changed"] == 0
        assert record["validation"]["auc_gap"] <= MAX_AUC_GAP
        assert record["test"]["images"] == contract.splits["test"]
    else:  # refused: no file, no digest, the reason, and the test split never read for it
        assert not graph.exists() and contract.int8_digest == ""
        assert record["why_not"] and record["test"] is None


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_weights_load_with_weights_only_and_no_wrapper_prefixes(bundle: Path) -> None:
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not [k for k in state if k.startswith(("module.", "_orig_mod."))]
    model, contract = load_bundle(bundle)
    x = torch.rand(2, 1, 64, 64)
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    torch.testing.assert_close(scripted(x), model(x))
    assert contract.demo and contract.synthetic and contract.device_uid.startswith("2.25.")


def test_monai_bundle_runner_runs_the_inference_config(bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--bundle_root",
            str(bundle),
            "--output_dir",
            str(tmp_path),
        ],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (tmp_path / "predictions.csv").read_text().strip().splitlines()
    assert rows[0].startswith("image,prediction,normal") and len(rows) == 4
    probabilities = np.array([[float(v) for v in row.split(",")[2:]] for row in rows[1:]])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)


def test_the_bundle_train_config_reruns_the_training(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("logs", "checkpoints"))
    before = torch.load(copy / "models" / "model.pt", weights_only=True)
    (copy / "models" / "model.pt").unlink()
    (copy / "docs" / "scores_baselines.npz").unlink()
    config = json.loads((copy / "configs" / "train.json").read_text())
    assert (
        config["train"]["trainer"]["_target_"].endswith("BundleTrainer")
        and "handlers" in config["train"]
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/train.json",
            "--bundle_root",
            str(copy),
            # a bundle's user overrides any key, as MONAI bundles allow; without the plain
            # baselines, the contrastive stage and the second epoch the rerun takes a fifth
            # of the time and still runs every step after them
            "--config#baseline",
            "False",
            "--config#pretrain#enabled",
            "False",
            "--config#finetune#epochs",
            "1",
        ],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    after = torch.load(copy / "models" / "model.pt", weights_only=True)
    assert set(after) == set(before)
    # the override reached the training: no baseline trained, so none of their scores saved
    assert not (copy / "docs" / "scores_baselines.npz").exists()
    validate_metadata(copy / "configs" / "metadata.json")


def test_model_card_warns_and_reports(bundle: Path) -> None:
    card = (bundle / "docs" / "README.md").read_text()
    assert "demonstration model trained on synthetic images" in card
    assert "95 % CI" in card and "| cavitary |" in card
    for picture in ("curves.png", "confusion.png", "roc.png", "attention.png"):
        assert (bundle / "docs" / picture).stat().st_size > 5000


def test_the_card_measures_the_served_decision_on_test_and_its_saved_scores_recompute_it(
    bundle: Path,
) -> None:
    from dp_model.serving.served import evaluate_scores_file

    _, contract = load_bundle(bundle)
    split = json.loads((bundle / "configs" / "split.json").read_text())
    sizes = contract.splits
    assert sizes["calibrated_on"] == "calibration" and {
        k: sizes[k] for k in ("train", "calibration", "test")
    } == {k: len(split[k]) for k in ("train", "calibration", "test")}
    assert (
        contract.present_point.split == "calibration"
        and contract.present_point.lower_bound is not None
    )
    # 12 images bound little
    assert (
        contract.ood.split == "calibration"
        and contract.ood.held_out == sizes["calibration"]
        and contract.ood.false_rejection > 0.01
    )
    card = (bundle / "docs" / "README.md").read_text()
    served = card[card.index("## The served decision on the test split") :]
    assert (
        "Clopper-Pearson" in served
        and "| present |" in served
        and "not assessed:" in served
        and "| number | chosen on | measured on |" in served
    )
    assert f"calibration ({sizes['calibration']} images)" in served and "Brier" in served
    # the points' own figures are not passed off as validation, or as performance
    assert "sensitivity (validation)" not in card
    assert (bundle / "docs" / "served_reliability.png").stat().st_size > 5000
    with np.load(bundle / "docs" / "scores_test.npz", allow_pickle=False) as saved:
        assert sorted(saved["ids"].tolist()) == sorted(split["test"]) and saved[
            "probabilities"
        ].shape == (len(split["test"]), len(contract.classes))
        np.testing.assert_allclose(
            saved["pneumonia_probability"], contract.pneumonia_probability(saved["probabilities"])
        )
    for name in ("val", "calibration"):
        assert (bundle / "docs" / f"scores_{name}.npz").is_file()
    recomputed = evaluate_scores_file(
        bundle / "docs" / "scores_test.npz", contract, bootstrap=1000, seed=0
    )
    assert recomputed.to_json() == json.loads((bundle / "docs" / "served_test.json").read_text())


def test_the_saved_scores_are_what_the_node_computes_for_the_same_images(
    bundle: Path, dataset_dir: Path
) -> None:
    """Training saves each test image's scores by the node's runner: the node's
    ``NodePredictor`` on the same canvases gives them again, within 1e-4."""
    assert_saved_scores_are_the_nodes(bundle, dataset_dir)


def test_the_contract_carries_every_map_source_against_the_prior_and_the_card_shows_them(
    bundle: Path,
) -> None:
    _, contract = load_bundle(bundle)
    located = contract.localization
    assert (
        set(located.candidates) == {"map+:1", "map+:2", "map+:3", "map+:4", "grad_cam", "cam"}
        and located.source in located.candidates
    )
    assert (
        set(located.prior_validation)
        == set(located.test)
        == {"iou>0.1", "iou>0.3", "iou>0.5", "pointing"}
    )
    # offsets are class attention's alone
    assert located.images["validation"] > 0 and not contract.logit_adjustment
    card = (bundle / "docs" / "README.md").read_text()
    assert (
        "## Lesion regions: measured against a fixed prior" in card
        and "prior (mean training box)" in card
    )


def test_every_checkpoint_carries_the_runs_configuration(dataset_dir: Path, tmp_path: Path) -> None:
    from dp_model.training.checkpoints import load_checkpoint

    config = tiny(dataset_dir, tmp_path / "cache", epochs=1)
    seen: list[dict] = []

    def look(stage: str, record: dict, epoch: int) -> None:  # called after each epoch's checkpoint
        seen.append(load_checkpoint(checkpoint))

    checkpoint = tmp_path / "last.pt"
    data = load_split(read_dataset(str(dataset_dir)), list(range(40)), config.data, "decode")
    pretrain(config.pretrain, data, CPU, 0, checkpoint, log=look, run_config=to_mapping(config))
    finetune(
        config.finetune,
        data,
        None,
        list(read_dataset(str(dataset_dir)).classes),
        CPU,
        0,
        checkpoint=checkpoint,
        log=look,
    )
    assert [c["stage"] for c in seen] == ["pretrain", "finetune"]
    # the whole run's
    assert seen[0]["config"]["name"] == "tiny" and seen[0]["config"]["finetune"]["epochs"] == 1
    # the stage's, when no run is given
    assert seen[1]["config"]["epochs"] == 1 and "mgacr" in seen[1]["config"]


def test_evaluate_command_on_the_dataset(
    bundle: Path, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        train_main(
            [
                "evaluate",
                "--bundle",
                str(bundle),
                "--data",
                str(dataset_dir),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "balanced accuracy" in capsys.readouterr().out
    assert (tmp_path / "metrics.md").exists()


def test_evaluate_reports_the_served_decision_as_the_node_makes_it(
    bundle: Path, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        train_main(
            [
                "evaluate",
                "--bundle",
                str(bundle),
                "--data",
                str(dataset_dir),
                "--split",
                "test",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "balanced accuracy" in printed
        and "## Served decision" in printed
        and "| present |" in printed
        and "not assessed:" in printed
    )
    served = json.loads((tmp_path / "served.json").read_text())
    _, contract = load_bundle(bundle)
    card = json.loads((bundle / "docs" / "served_test.json").read_text())
    assert (
        served["thresholds"] == card["thresholds"]
        and served["all"]["images"] == card["all"]["images"] == contract.splits["test"]
    )
    assert (
        served["all"]["positives"] == card["all"]["positives"]
        and served["all"]["present"]["sensitivity"]["low"] is not None
    )
    with (
        np.load(tmp_path / "scores.npz") as files,
        np.load(bundle / "docs" / "scores_test.npz") as resident,
    ):
        a, b = np.argsort(files["ids"]), np.argsort(resident["ids"])
        assert (files["ids"][a] == resident["ids"][b]).all()
        # The image files are read as floats, the card's copy was kept as 8-bit: the same model says nearly the same.
        np.testing.assert_allclose(
            files["probabilities"][a], resident["probabilities"][b], atol=0.05
        )
        assert (files["assessed"][a] == resident["assessed"][b]).mean() >= 0.8
    assert (tmp_path / "served_reliability.png").stat().st_size > 5000


def test_evaluate_scores_the_bundles_own_test_split_only(
    bundle: Path, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    split = json.loads((bundle / "configs" / "split.json").read_text())
    assert (
        train_main(
            [
                "evaluate",
                "--bundle",
                str(bundle),
                "--data",
                str(dataset_dir),
                "--layout",
                "auto",
                "--split",
                "test",
                "--out",
                str(tmp_path / "test"),
            ]
        )
        == 0
    )
    table = (tmp_path / "test" / "metrics.md").read_text()
    supports = [
        int(line.split("|")[2])
        for line in table.splitlines()
        if line.startswith("| ") and line.split("|")[2].strip().isdigit()
    ]
    assert sum(supports) == len(split["test"])  # the held-out images, not the whole dataset
    # Another dataset holds none of the bundle's images: one clear line, exit 2.
    other = tmp_path / "other"
    generate(SynthConfig(num_images=12, size=64, workers=1, seed=99), other, progress=False)
    for table in ("labels.csv", "boxes.csv", "synth_truth.csv"):
        # images of another site, named its own way
        (other / table).write_text((other / table).read_text().replace("syn", "site"))
    for image in (other / "images").iterdir():
        image.rename(image.with_name(image.name.replace("syn", "site")))
    capsys.readouterr()
    assert (
        train_main(["evaluate", "--bundle", str(bundle), "--data", str(other), "--split", "test"])
        == 2
    )
    assert "none of its 12 images is in the bundle's test split" in capsys.readouterr().err


def test_a_calibration_split_comes_out_of_the_training_part_and_leaves_validation_and_test_as_they_were(
    dataset_dir: Path,
) -> None:
    dataset = read_dataset(dataset_dir)
    shared = DataConfig(root=str(dataset_dir), calibration_fraction=0.0)
    before = make_splits(dataset, shared, 0)
    after = make_splits(dataset, replace(shared, calibration_fraction=0.2), 0)
    assert before.calibration == () and (after.val, after.test) == (before.val, before.test)
    assert set(after.calibration) | set(after.train) == set(before.train) and not set(
        after.calibration
    ) & set(after.train)
    assert abs(len(after.calibration) - 0.2 * (len(before.train) + len(before.val))) <= len(
        dataset.classes
    )
    # stratified: every class
    assert {dataset.records[i].labels for i in after.calibration} == {
        dataset.records[i].labels for i in after.test
    }
    counted = make_splits(dataset, replace(shared, calibration_images=15), 0)
    assert abs(len(counted.calibration) - 15) <= len(dataset.classes)
    with pytest.raises(ValueError, match="calibration"):
        make_splits(dataset, replace(shared, calibration_images=len(before.train)), 0)


# --- command line ----------------------------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train_main(["--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == "dp-train: no dataset: pass --data or set data.root"
    assert train_main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert train_main(["--data", str(tmp_path), "--out", str(tmp_path / "full")]) == 2
    assert "use --resume" in capsys.readouterr().err
    assert train_main(["evaluate", "--bundle", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a Deep Pneumonia bundle" in capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_config_produces_a_valid_bundle(demo_bundle: Path) -> None:
    validate_metadata(demo_bundle / "configs" / "metadata.json")
    state = torch.load(demo_bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    model, contract = load_bundle(demo_bundle)
    assert set(state) == set(model.state_dict())
    assert contract.demo and contract.image_size == 64 and len(contract.classes) == 5
    assert "demonstration model" in (demo_bundle / "docs" / "README.md").read_text()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--bundle_root",
            str(demo_bundle),
        ],
        cwd=demo_bundle,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (demo_bundle / "eval" / "predictions.csv").read_text().count("\n") == 4


def test_resume_of_a_complete_run_does_not_train_again(
    bundle: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = (bundle / "models" / "model.pt").read_bytes()
    assert train_main(["--data", "unused-when-complete", "--out", str(bundle), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (bundle / "models" / "model.pt").read_bytes() == weights


def test_each_epoch_prints_its_losses_validation_and_how_far_from_chance() -> None:
    """A stuck run shows on the console while it runs, not at the end."""
    line = epoch_line(
        "stage II 2/10",
        {
            "loss": 1.5,
            "cls": 1.2,
            "feat_cr": 3.0,
            "lr": 0.001,
            "val_balanced_accuracy": 0.41,
            "val_macro_auc": 0.71,
        },
    )
    assert (
        line
        == "stage II 2/10: loss 1.500 (cls 1.200, feat_cr 3.000); val balanced accuracy 0.410, macro auc 0.710; lr 0.001"
    )
    stuck = epoch_line(
        "stage I 1/5",
        {"loss": 4.845, "top1": 0.008, "lr": 0.1, "chance_loss": 4.844, "chance_top1": 1 / 127},
    )
    assert "loss 4.845 (top1 0.008) [chance: loss 4.844, top1 0.008]" in stuck


def test_the_papers_optimisers_and_step_schedule_train(
    dataset_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stage I with SGD, stage II with a StepLR-like schedule: the rate falls tenfold each step,
    and each epoch's line reaches the console."""
    caplog.set_level("INFO", logger="dp_model.training.engine")
    config = tiny(
        dataset_dir,
        tmp_path / "cache",
        epochs=3,
        schedule="step",
        step_epochs=1,
        step_gamma=0.1,
        warmup_epochs=0.0,
        optimizer="sgd",
        lr=0.01,
    )
    data = load_split(read_dataset(str(dataset_dir)), list(range(32)), config.data, "decode")
    records: list[tuple[str, dict]] = []
    encoder = pretrain(
        replace(config.pretrain, optimizer="sgd", lr=0.05),
        data,
        CPU,
        0,
        log=lambda stage, record, epoch: records.append((stage, record)),
    )
    finetune(
        config.finetune,
        data,
        None,
        list(read_dataset(str(dataset_dir)).classes),
        CPU,
        0,
        encoder=encoder,
        log=lambda stage, record, epoch: records.append((stage, record)),
    )
    rates = [record["lr"] for stage, record in records if stage == "finetune"]
    # after each epoch's steps: 0.01 x 0.1 per epoch
    assert rates == pytest.approx([1e-3, 1e-4, 1e-5])
    assert all(np.isfinite(record["loss"]) for _, record in records)
    assert (
        "stage I 1/1: loss" in caplog.text
        and "[chance: loss" in caplog.text
        and "stage II 3/3: loss" in caplog.text
    )


def test_the_card_sets_the_model_beside_a_plain_resnet18_the_majority_class_and_chance(
    bundle: Path,
) -> None:
    card = (bundle / "docs" / "README.md").read_text()
    assert "## Against its baselines" in card
    for row in (
        "| this model |",
        "| plain ResNet18, untuned (cross-entropy, no augmentation, fixed learning rate, no search; same split and epochs) |",
        '| majority class (always "',
        "| chance (random scores) |",
    ):
        assert row in card, row


def test_baselines_are_what_they_say_and_a_model_that_does_not_beat_them_is_told_so() -> None:
    from dp_model.metrics import evaluate
    from dp_model.training import baselines

    classes = ("normal", "a", "b")
    train_labels, test = (
        np.array([0] * 60 + [1] * 20 + [2] * 20),
        np.array([0] * 30 + [1] * 10 + [2] * 10),
    )
    majority = baselines.majority(train_labels, test, classes)
    assert (
        majority.accuracy == pytest.approx(0.6)
        and majority.balanced_accuracy == pytest.approx(1 / 3)
        and majority.macro_auc == pytest.approx(0.5)
    )
    # random scores: chance, on enough images
    assert abs(baselines.chance(np.repeat(test, 40), classes).macro_auc - 0.5) < 0.05
    good = evaluate(test, np.eye(3)[test] * 0.9 + 0.05, classes, bootstrap=200)
    assert baselines.shortfalls(good, {"majority": majority}) == []
    words = baselines.shortfalls(majority, {"plain ResNet18": good})
    assert any("not clearly above 0.333" in w for w in words) and any(
        "plain ResNet18" in w for w in words
    )
    section = "\n".join(baselines.section(majority, {"plain ResNet18": good}, "normal"))
    assert "**Warning: this model is not better than its baselines:**" in section


def test_a_stage_one_that_never_left_chance_is_called_so() -> None:
    from dp_model.training.card import stage_one_verdict

    # ln(127) = 4.844
    stuck = stage_one_verdict([{"loss": 4.853, "top1": 0.008}, {"loss": 4.845, "top1": 0.008}], 64)
    assert "did not leave chance" in stuck[0] and "chance 4.844" in stuck[0]
    learned = stage_one_verdict([{"loss": 4.8, "top1": 0.01}, {"loss": 1.2, "top1": 0.7}], 64)
    assert "it learned" in learned[0]
    # the learning regime's ten epochs: 4 x chance
    barely = stage_one_verdict([{"loss": 5.030, "top1": 0.017}], 128)
    assert "barely left chance" in barely[0]
    assert stage_one_verdict([], 64) == []


def _resident(images: torch.Tensor, labels: np.ndarray):
    from dp_model.training.data import Resident

    n = len(labels)
    return Resident(
        images,
        torch.zeros(n, 1, 4),
        torch.as_tensor(labels, dtype=torch.int64),
        torch.zeros(n, dtype=torch.bool),
        [str(i) for i in range(n)],
    )


def test_block_statistics_read_the_brightness_of_blocks_and_nothing_finer() -> None:
    """Gradient boosting on the mean and SD of 16 x 16 blocks: it learns a class written in
    one block's brightness, and stays at chance when the classes differ only in a pattern
    finer than a block with the same mean and spread (stripes one way or the other)."""
    from dp_model.training import baselines

    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 60)
    # any size: resized to 128
    base = torch.as_tensor(rng.integers(60, 120, (120, 1, 64, 64)), dtype=torch.uint8)
    assert baselines.block_features(base).shape == (120, 128)
    bright = base.clone()
    bright[labels == 1, :, 8:16, 40:48] += 60
    parts = [slice(0, 60), slice(60, 90), slice(90, 120)]
    split = [_resident(bright[p], labels[p]) for p in parts]
    quick = {
        "grid": {
            "learning_rate": (0.1,),
            "max_leaf_nodes": (7,),
            "class_weight": (None, "balanced"),
        },
        "trees": (10, 30),
    }
    report = baselines.block_statistics(*split, ("a", "b"), **quick)
    assert report.balanced_accuracy > 0.9
    stripes = torch.zeros(120, 1, 64, 64, dtype=torch.uint8)
    rows, cols = torch.arange(64)[:, None].expand(64, 64), torch.arange(64)[None, :].expand(64, 64)
    # horizontal stripes, period 2 px (4 px at 128)
    stripes[labels == 0] = (100 + 40 * (rows % 2)).to(torch.uint8)
    # vertical: same block mean and SD
    stripes[labels == 1] = (100 + 40 * (cols % 2)).to(torch.uint8)
    fitted = baselines.fit_block_statistics(
        *[_resident(stripes[p], labels[p]) for p in parts[:2]], classes=2, **quick
    )
    assert fitted.val_balanced_accuracy == pytest.approx(0.5)


def test_the_block_statistics_search_reads_one_fit_per_setting_as_growing_it_25_trees_at_a_time_would():
    """Grown at once and read from its staged predictions, each setting chooses the tree count
    and gives the probabilities that refitting it step by step (warm start) does."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from dp_model.training import baselines

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 150)
    images = torch.as_tensor(rng.integers(50, 150, (150, 1, 32, 32)), dtype=torch.uint8)
    images[labels == 1, :, :8, :8] += 40
    images[labels == 2, :, 20:, 20:] += 25
    train, val = _resident(images[:100], labels[:100]), _resident(images[100:], labels[100:])
    grid, trees = (
        {"learning_rate": (0.1,), "max_leaf_nodes": (7,), "class_weight": (None, "balanced")},
        (5, 40),
    )
    fitted = baselines.fit_block_statistics(train, val, 3, seed=0, grid=grid, trees=trees)
    x_train, x_val = baselines.block_features(train.images), baselines.block_features(val.images)
    best = (-1.0, None, 0)
    for weight in grid["class_weight"]:  # the step-by-step search, as it was written before
        model = HistGradientBoostingClassifier(
            max_iter=5,
            warm_start=True,
            early_stopping=False,
            random_state=0,
            learning_rate=0.1,
            max_leaf_nodes=7,
            class_weight=weight,
        )
        here, waited = -1.0, 0
        while model.max_iter <= 40 and waited < 4:
            model.fit(x_train, labels[:100])
            score = baselines.mean_recall(
                labels[100:], model.classes_[model.predict_proba(x_val).argmax(1)], 3
            )
            here, waited = (score, 0) if score > here else (here, waited + 1)
            if score > best[0]:
                best = (score, weight, model.max_iter)
            model.set_params(max_iter=model.max_iter + 5)
    assert (fitted.val_balanced_accuracy, fitted.params["class_weight"], fitted.trees) == best
    again = HistGradientBoostingClassifier(
        max_iter=best[2],
        early_stopping=False,
        random_state=0,
        learning_rate=0.1,
        max_leaf_nodes=7,
        class_weight=best[1],
    )
    np.testing.assert_allclose(
        fitted.probabilities(val.images),
        again.fit(x_train, labels[:100]).predict_proba(x_val),
        rtol=1e-6,
        atol=1e-9,
    )


@pytest.mark.parametrize(
    ("scores", "chosen"),
    [
        ((0.5, 0.4, 0.4, 0.4, 0.9, 0.1, 0.1, 0.1), 25),
        ((0.5, 0.4, 0.4, 0.4, 0.4, 0.95, 0.1, 0.1), 5),
    ],
)
def test_the_block_statistics_search_reads_on_through_three_steps_without_gain_and_stops_after_four(
    monkeypatch, scores, chosen: int
) -> None:
    """Validation scores scripted per step of 5 trees: a gain after three flat steps is found;
    after four flat steps the search stops and never reads the next one."""
    from dp_model.training import baselines

    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 30)
    images = torch.as_tensor(rng.integers(50, 150, (60, 1, 32, 32)), dtype=torch.uint8)
    read = iter(scores)
    monkeypatch.setattr(baselines, "mean_recall", lambda *_: next(read))
    grid = {"learning_rate": (0.1,), "max_leaf_nodes": (7,), "class_weight": (None,)}
    fitted = baselines.fit_block_statistics(
        _resident(images[:40], labels[:40]),
        _resident(images[40:], labels[40:]),
        2,
        grid=grid,
        trees=(5, 40),
    )
    assert fitted.trees == chosen and fitted.val_balanced_accuracy == max(scores[: chosen // 5 + 4])


def test_a_validation_only_run_never_reads_the_test_split_and_writes_validation_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Choosing a recipe must leave test unseen: the run decodes no test image, measures
    nothing on it, writes no bundle, and keeps per-image validation scores to re-check."""
    import dp_model.training.run as run_module

    config = rsna_run(tmp_path, "choose")
    decoded: list[str] = []
    load = run_module.load_split
    monkeypatch.setattr(
        run_module,
        "load_split",
        lambda dataset, indices, data, what: (
            decoded.append(what) or load(dataset, indices, data, what)
        ),
    )
    result = train(config, tmp_path / "out", validation_only=True)
    assert decoded == ["decode train", "decode val"]
    summary = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert summary["split"] == "validation" and "never" in summary["test"]
    assert summary["validation"]["balanced_accuracy"] == pytest.approx(
        result.report.balanced_accuracy
    )
    assert len(summary["images"]) == sum(map(sum, result.report.confusion)) > 0, (
        "one row per validation image"
    )
    assert (
        not (tmp_path / "out" / "configs" / "metadata.json").exists()
        and not (tmp_path / "out" / "docs").exists()
    )
