"""One training run from a config to a bundle: data, stage I, stage II, test metrics, bundle."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import from_mapping, to_mapping
from ..datasets import ChestDataset, read_dataset
from ..datasets.splits import hashed_id
from ..metrics import Report, evaluate
from ..serving import quantized
from ..serving.bundle import (
    LICENSE,
    weights_uid,
    write_configs,
    write_metadata,
    write_model,
    write_samples,
)
from ..serving.contract import ModelContract, within_gate
from ..serving.onnx_graph import write_onnx
from ..serving.ood import write_statistics
from ..serving.runner import Runner
from ..serving.served import (
    ServedReport,
    evaluate_served,
    is_pneumonia,
    reliability_diagram,
    save_scores,
    scores_path,
    served_decisions,
)
from . import baselines, calibrate, plots, regions
from .card import describe, model_card
from .checkpoints import History, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Resident, Splits, keep_boxes, load_split, make_splits
from .engine import finetune, pretrain
from .evaluation import localization, predict
from .objectives import logit_adjustment, network_options, normal_index
from .runtime import Runtime, make_runtime

logger = logging.getLogger(__name__)

Stages = Literal["all", "pretrain", "finetune"]


@dataclass
class RunResult:
    """What a run produced."""

    bundle: Path
    report: Report
    history: History
    seconds: dict[str, float]
    baselines: dict[str, Report] = field(default_factory=dict)


def train(
    config: TrainConfig,
    out: str | Path,
    stages: Stages = "all",
    resume: bool = False,
    validation_only: bool = False,
) -> RunResult:
    """Train and write the bundle into ``out`` (the bundle's root).

    ``stages="pretrain"`` stops after stage I (its encoder is kept in
    ``checkpoints/encoder.pt``); ``"finetune"`` starts from that encoder when present.
    ``validation_only``: for choosing a recipe. The test split is never decoded, nothing is
    measured on it; the run writes ``validation.json`` (the chosen epoch, the validation
    figures and per-image validation scores) and its checkpoint, not a bundle, and its
    report is the validation one.
    """
    out = Path(out)
    runtime = make_runtime(config.runtime)
    seed = config.runtime.seed
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset = read_dataset(config.data.root, config.data.layout)
    splits = make_splits(dataset, config.data, seed)
    # Stage I needs only the training split; validation and test are decoded for stage II.
    needed = (
        ("train",)
        if stages == "pretrain"
        else ("train", "val")
        if validation_only
        else ("train", "val", "test") + (("calibration",) if splits.calibration else ())
    )
    data = {
        name: load_split(dataset, getattr(splits, name), config.data, f"decode {name}")
        for name in needed
    }
    train_data = keep_boxes(data["train"], config.data.boxed_fraction, seed).to(runtime.device)
    normal = normal_index(dataset.classes)
    offsets = logit_adjustment(
        config.finetune,
        torch.bincount(train_data.labels.cpu(), minlength=len(dataset.classes)).tolist(),
        normal,
    )
    timings["data"] = time.perf_counter() - start
    logger.info("%s", dataset.summary())
    logger.info(
        "%s split: %d train, %d validation, %d calibration, %d test images",
        splits.method,
        len(splits.train),
        len(splits.val),
        len(splits.calibration),
        len(splits.test),
    )
    log, close = _tensorboard(out / "logs", runtime)
    history = History()
    checkpoint = out / "checkpoints" / "last.pt"
    if not resume and runtime.main and checkpoint.exists():
        checkpoint.unlink()  # a fresh run never continues a stale one
    encoder = _stage_one(
        config, train_data, runtime, checkpoint, stages, resume, history, log, timings
    )
    if stages == "pretrain":
        close()
        return RunResult(out, _empty_report(dataset), history, timings)
    tick = time.perf_counter()

    def validate(model, split: Resident, adjusted: tuple[float, ...] = ()) -> dict[str, float]:
        return evaluate(
            split.labels.cpu().numpy(),
            predict(model, split, runtime, normal=normal, offsets=adjusted),
            dataset.classes,
        ).scalars()

    result = finetune(
        config.finetune,
        train_data,
        data["val"],
        list(dataset.classes),
        runtime,
        seed,
        encoder=encoder,
        checkpoint=checkpoint if runtime.main else None,
        history=history,
        log=log,
        evaluate=lambda m, s: validate(m, s, offsets),
        run_config=to_mapping(config),
    )
    timings["finetune"] = time.perf_counter() - tick
    model = result.model.cpu()
    model.load_state_dict(result.best_state)
    close()
    if not runtime.main:
        return RunResult(out, _empty_report(dataset), history, timings)
    cpu = Runtime(device=torch.device("cpu"), amp=False, channels_last=False, compile=False)
    if validation_only:
        return _validation_only(
            out,
            model,
            data["val"],
            dataset,
            splits,
            cpu,
            normal,
            offsets,
            result.best_epoch,
            history,
            timings,
            seed,
        )
    probabilities = predict(model, data["test"], cpu, normal=normal, offsets=offsets)
    labels = data["test"].labels.numpy()
    report = evaluate(labels, probabilities, dataset.classes, bootstrap=1000, seed=seed)
    tick = time.perf_counter()
    baseline_scores: dict[str, np.ndarray] = {}
    compared = (
        _baselines(config, train_data, data, dataset.classes, runtime, validate, baseline_scores)
        if config.baseline
        else {}
    )
    timings["baselines"] = time.perf_counter() - tick
    for line in baselines.shortfalls(report, compared):
        logger.warning("not better than its baselines: %s", line)
    located = localization(model, data["test"], dataset.classes, normal)
    shown = regions.measure(
        model, train_data.to("cpu"), data["val"], data["test"], len(dataset.classes), normal, seed
    )
    pneumonia = dataset.pneumonia_classes(dataset.classes[normal])
    fitted = calibrate.fit(
        model, data, dataset.classes, normal, pneumonia, model.multi_label, seed, offsets
    )
    timings["total"] = time.perf_counter() - start
    fitted = replace(fitted, localization=shown, logit_adjustment=offsets)
    _write_bundle(
        out,
        config,
        model,
        dataset,
        splits,
        data,
        report,
        history,
        labels,
        probabilities,
        result.best_epoch,
        timings,
        located,
        fitted,
        compared,
    )
    if baseline_scores:
        # the baselines' own per-image test scores, so that "better than its baselines" can be
        # re-checked
        np.savez_compressed(
            out / "docs" / "scores_baselines.npz",
            ids=np.asarray(
                [hashed_id(dataset.records[i].image_id) for i in splits.test], dtype=str
            ),
            labels=labels.astype(np.int64),
            classes=np.asarray(dataset.classes, dtype=str),
            **baseline_scores,
        )
    save_checkpoint(
        checkpoint, {"stage": "done", "epoch": config.finetune.epochs}, to_mapping(config)
    )
    return RunResult(out, report, history, timings, compared)


def _baselines(
    config: TrainConfig,
    train_data: Resident,
    data: dict[str, Resident],
    classes: tuple[str, ...],
    runtime: Runtime,
    validate,
    scores: dict[str, np.ndarray] | None = None,
) -> dict[str, Report]:
    """The plain ResNet18 (same split, epochs, batch and optimiser), block statistics (chosen on
    validation), the majority class and chance, on the test split. ``scores`` receives the
    trained baselines' per-image test probabilities (``plain_resnet18``, ``block_statistics``)."""
    seed = config.runtime.seed
    # Its epoch lines read like the model's ("stage II 1/N"): say whose they are.
    logger.info(
        "baseline: a plain ResNet18 (cross-entropy, no augmentation, no MGACR), same split, %d epochs, from scratch",
        config.finetune.epochs,
    )
    plain = finetune(
        baselines.plain_recipe(config.finetune),
        train_data,
        data["val"],
        list(classes),
        runtime,
        seed,
        evaluate=validate,
    )
    model = plain.model.cpu()
    model.load_state_dict(plain.best_state)
    cpu = Runtime(device=torch.device("cpu"), amp=False, channels_last=False, compile=False)
    labels = data["test"].labels.numpy()
    found = {"plain_resnet18": predict(model, data["test"], cpu, normal=0)}
    if len(data["val"]):
        found["block_statistics"] = baselines.fit_block_statistics(
            data["train"], data["val"], len(classes), seed
        ).probabilities(data["test"].images)
    if scores is not None:
        scores.update(found)
    return {
        "plain ResNet18": evaluate(
            labels, found["plain_resnet18"], classes, bootstrap=1000, seed=seed
        ),
        **(
            {
                "block statistics": evaluate(
                    labels, found["block_statistics"], classes, bootstrap=1000, seed=seed
                )
            }
            if "block_statistics" in found
            else {}
        ),
        "majority": baselines.majority(data["train"].labels.cpu().numpy(), labels, classes, seed),
        "chance": baselines.chance(labels, classes, seed),
    }


def _stage_one(
    config: TrainConfig,
    data: Resident,
    runtime: Runtime,
    checkpoint: Path,
    stages: Stages,
    resume: bool,
    history: History,
    log,
    timings: dict,
) -> dict | None:
    """Run or reuse stage I; returns the encoder's weights, or None without pre-training.

    With pre-training switched off, no encoder is used, not even one left in the folder.
    """
    if not config.pretrain.enabled or config.pretrain.epochs == 0:
        return None
    encoder_path = checkpoint.parent / "encoder.pt"
    saved = load_checkpoint(checkpoint) if resume else None
    if stages == "finetune" or (saved and saved.get("stage") in ("finetune", "done")):
        if saved and saved.get("history"):
            history.pretrain[:] = saved["history"]["pretrain"]
        return (
            torch.load(encoder_path, map_location="cpu", weights_only=True)
            if encoder_path.exists()
            else None
        )
    tick = time.perf_counter()
    encoder = pretrain(
        config.pretrain,
        data,
        runtime,
        config.runtime.seed,
        checkpoint if runtime.main else None,
        history,
        log,
        to_mapping(config),
    )
    if runtime.main:
        encoder_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(encoder, encoder_path)
    timings["pretrain"] = time.perf_counter() - tick
    return encoder


def _tensorboard(folder: Path, runtime: Runtime):
    """A logging function writing each epoch's record to TensorBoard (rank 0 only)."""
    if not runtime.main:
        return (lambda *args: None), (lambda: None)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))

    def log(stage: str, record: dict[str, float], epoch: int) -> None:
        for key, value in record.items():
            writer.add_scalar(f"{stage}/{key}", value, epoch + 1)
        writer.flush()

    return log, writer.close


def _validation_only(
    out: Path,
    model,
    val: Resident,
    dataset: ChestDataset,
    splits: Splits,
    cpu: Runtime,
    normal: int,
    offsets: tuple[float, ...],
    best_epoch: int,
    history: History,
    timings: dict,
    seed: int,
) -> RunResult:
    """A run for choosing: the chosen checkpoint's validation figures and per-image scores, no test."""
    labels = val.labels.numpy()
    probabilities = predict(model, val, cpu, normal=normal, offsets=offsets)
    report = evaluate(labels, probabilities, dataset.classes, bootstrap=1000, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    ids = [hashed_id(dataset.records[i].image_id) for i in splits.val]
    summary = {
        "split": "validation",
        "test": "never decoded nor measured (--validation-only)",
        "best_epoch": best_epoch,
        "validation": report.scalars(),
        "classes": list(dataset.classes),
        "images": [
            {"id": i, "label": int(y), "probabilities": [round(float(v), 6) for v in row]}
            for i, y, row in zip(ids, labels, probabilities, strict=True)
        ],
    }
    (out / "validation.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info(
        "validation only: balanced accuracy %.3f at epoch %d; %s (the test split was not read)",
        report.balanced_accuracy,
        best_epoch,
        out / "validation.json",
    )
    return RunResult(out, report, history, timings)


def _int8(out: Path, contract: ModelContract, data: dict[str, Resident], seed: int) -> str:
    """The graph's 8-bit copy, kept where it changes no served decision on the validation split
    (:func:`dp_model.serving.quantized.choose`); its SHA-256, or "". Its ranges come from
    seeded training canvases, never from a held-out image."""
    train = data["train"]
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    calibration = train.batch(chosen[: quantized.CALIBRATION_IMAGES].cpu())[0].cpu().numpy()

    def run(
        engine: str, split: str, candidate: ModelContract
    ) -> tuple[tuple[np.ndarray, np.ndarray | None], np.ndarray]:
        runner = Runner(bundle=out, device="cpu", engine=engine, contract=candidate)
        return calibrate.calibrated_outputs(runner, data[split]), data[split].labels.cpu().numpy()

    return quantized.choose(out, contract, calibration, run, seed)


def _empty_report(dataset: ChestDataset) -> Report:
    nan = float("nan")
    return Report(
        classes=dataset.classes,
        accuracy=nan,
        balanced_accuracy=nan,
        macro_f1=nan,
        macro_auc=nan,
        per_class={},
        confusion=[],
    )


def _write_bundle(
    out: Path,
    config: TrainConfig,
    model,
    dataset: ChestDataset,
    splits: Splits,
    data: dict[str, Resident],
    report: Report,
    history: History,
    labels: np.ndarray,
    probabilities: np.ndarray,
    best_epoch: int,
    timings: dict,
    located: dict[str, list[float]],
    fitted: calibrate.Fitted,
    compared: dict[str, Report] | None = None,
) -> None:
    synthetic = (Path(config.data.root) / "synth_config.yaml").exists() or (
        Path(config.data.root).parent / "synth_config.yaml"
    ).exists()
    state = write_model(out, model, config.data.image_size)
    normal = normal_index(dataset.classes)
    gate = fitted.ood
    if fitted.statistics is not None and gate is not None:
        digest, arrays = write_statistics(fitted.statistics, out / "models")
        gate = replace(gate, digest=digest, arrays_digest=arrays)
    contract = ModelContract(
        classes=dataset.classes,
        image_size=config.data.image_size,
        attention_stages=tuple(model.attention_stages),
        normal_class=dataset.classes[normal],
        name=config.name,
        version=config.version,
        device_uid=weights_uid(state),
        demo=config.demo,
        synthetic=synthetic,
        architecture=config.finetune.architecture,
        options=network_options(config.finetune, config.data.image_size),
        pneumonia_classes=dataset.pneumonia_classes(dataset.classes[normal]),
        temperature=round(fitted.temperature, 6),
        calibration=fitted.calibration,
        operating_points=fitted.operating_points,
        ood=gate,
        splits=split_sizes(splits, fitted),
    )
    contract = replace(
        contract, localization=fitted.localization, logit_adjustment=fitted.logit_adjustment
    )
    # The graph of what the node runs (maps of the source just chosen, the gate's features).
    contract = replace(contract, onnx_digest=write_onnx(out, model, contract))
    description = describe(config)
    if config.demo or synthetic:
        description = (
            "DEMONSTRATION MODEL trained on synthetic images; not for clinical use. " + description
        )
    if config.int8 and contract.onnx_digest and len(data["val"]) and len(data["test"]):
        # recorded only once it has earned its place: a bundle never names an unchecked graph
        contract = replace(contract, int8_digest=_int8(out, contract, data, config.runtime.seed))
    # Where the data came from, by layout and folder name: an absolute path says too much about a site.
    write_metadata(
        out,
        contract,
        description,
        report.scalars(),
        f"{dataset.name} layout, folder {Path(config.data.root).name}",
    )
    write_configs(out, contract, to_mapping(config))
    (out / "LICENSE").write_text(LICENSE)
    docs = out / "docs"
    pictures = {
        "curves": plots.curves(history, docs / "curves.png"),
        "confusion": plots.confusion(report, docs / "confusion.png"),
        "roc": plots.roc(labels, probabilities, report, docs / "roc.png"),
        "attention": plots.attention_gallery(
            model,
            data["test"],
            dataset.classes,
            docs / "attention.png",
            normal=normal,
            offsets=contract.logit_adjustment,
        ),
    }
    # What the node serves, by the node's runner: the bundle just written (its contract, its
    # gate's statistics) on the network in memory, which holds the weights written.
    runner = Runner(bundle=out, device="cpu", network=model, engine="torch")
    served_outputs = {
        name: calibrate.calibrated_outputs(runner, data[name])
        for name in ("test", "val", "calibration")
        if name in data and len(data[name])
    }
    test_scores = served_outputs["test"][1]
    pictures["calibration"] = plots.reliability(
        fitted.before,
        fitted.after,
        docs / "calibration.png",
        None if test_scores is None else (test_scores, np.zeros(0)),
        fitted.ood and fitted.ood.threshold,
    )
    turned_away = (
        None
        if test_scores is None or fitted.ood is None
        # as the node decides it: a NaN score is turned away too
        else float(
            1.0 - within_gate(np.asarray(test_scores, np.float64), fitted.ood.threshold).mean()
        )
    )
    if model.has_class_maps:
        pictures["class_maps"] = plots.class_attention_maps(
            model, data["test"], dataset.classes, docs / "class_maps.png", normal
        )
    served = served_on_test(docs, runner.contract, served_outputs, data, config.runtime.seed)
    pictures["served_reliability"] = docs / "served_reliability.png"
    chosen = [
        dataset.records[i] for i in example_images(scores_path(out, "test"), splits.test, normal)
    ]
    truths = [
        {"labels": list(r.labels), "boxes": [[round(float(v), 1) for v in box] for box in r.boxes]}
        for r in chosen
    ]
    samples = write_samples(out, [r.image for r in chosen], truths)
    parts = (
        ("train", "val", "calibration", "test") if splits.calibration else ("train", "val", "test")
    )
    counts = {name: dataset.class_counts(getattr(splits, name)) for name in parts}
    (docs / "README.md").write_text(
        model_card(
            config,
            contract,
            dataset,
            counts,
            splits.method,
            report,
            best_epoch,
            timings,
            pictures,
            located,
            turned_away,
            compared,
            history.pretrain,
            served,
            samples,
        )
    )
    # The split by hashed image id: enough to check two bundles used the same split, no patient's id.
    (out / "configs" / "split.json").write_text(
        json.dumps(
            {"hashed": "sha256 of the image id, 16 hex digits"}
            | {
                k: [hashed_id(dataset.records[i].image_id) for i in getattr(splits, k)]
                for k in parts
            }
        )
        + "\n"
    )


def example_images(
    scores_file: Path, test: tuple[int, ...], normal: int, count: int = 3
) -> list[int]:
    """Dataset indices of the test images ``samples/`` holds, for the README's walkthrough: a
    pneumonia the node reports present with its type right, a normal image it reports
    negative, then more of other types it gets right; the first test images fill up what is
    missing. Picked from the saved test scores after every figure was computed: they show what
    an answer looks like, the test figures say how often it is right."""
    with np.load(scores_file, allow_pickle=False) as saved:
        labels, right = (
            saved["labels"],
            saved["assessed"] & (saved["probabilities"].argmax(axis=1) == saved["labels"]),
        )
        right &= saved["positive"] == (labels != normal)
    chosen: list[int] = []
    pneumonia = [i for i in range(len(test)) if right[i] and labels[i] != normal]
    negative = [i for i in range(len(test)) if right[i] and labels[i] == normal]
    for pool in (
        pneumonia[:1],
        negative[:1],
        [i for i in pneumonia if labels[i] != labels[pneumonia[0]]] if pneumonia else [],
        range(len(test)),
    ):
        chosen += [i for i in pool if i not in chosen][: count - len(chosen)]
    return [test[i] for i in chosen[:count]]


def split_sizes(splits: Splits, fitted: calibrate.Fitted) -> dict:
    """Images in each split, and the split that chose the temperature, the points and the gate."""
    sizes = {
        "train": len(splits.train),
        "validation": len(splits.val),
        "calibration": len(splits.calibration),
        "test": len(splits.test),
    }
    return sizes | {"calibrated_on": fitted.calibration.get("split", "validation")}


def served_on_test(
    docs: Path,
    contract: ModelContract,
    outputs: dict[str, tuple[np.ndarray, np.ndarray | None]],
    data: dict[str, Resident],
    seed: int,
) -> ServedReport:
    """The node's rule measured on the test split, once: ``docs/served_test.json``, the
    reliability diagram of the probability of pneumonia, and each split's per-image scores
    (``docs/scores_<split>.npz``, ids hashed as in ``split.json``) to recompute every figure
    from. ``outputs``: each split's calibrated probabilities and gate scores, by the bundle's
    runner (:func:`~.calibrate.calibrated_outputs`)."""
    for name, (probabilities, ood) in outputs.items():
        save_scores(
            scores_path(docs.parent, name),
            [hashed_id(i) for i in data[name].ids],
            data[name].labels.cpu().numpy(),
            probabilities,
            ood,
            contract,
        )
    probabilities, ood = outputs["test"]
    labels = data["test"].labels.cpu().numpy()
    served = evaluate_served(probabilities, ood, labels, contract, bootstrap=1000, seed=seed)
    (docs / "served_test.json").write_text(json.dumps(served.to_json(), indent=1) + "\n")
    decided, truth = served_decisions(probabilities, ood, contract), is_pneumonia(labels, contract)
    kept = decided.assessed
    reliability_diagram(
        decided.pneumonia_probability[kept],
        truth[kept],
        docs / "served_reliability.png",
        f"served P(pneumonia), {int(kept.sum())} assessed test images",
    )
    logger.info("served decision on test:\n%s", served.table())
    return served


class BundleTrainer:
    """``train#trainer`` of a bundle's ``configs/train.json``: re-runs the training that made it."""

    def __init__(self, config: dict, bundle_root: str = ".") -> None:
        self.config = from_mapping(TrainConfig, config, "configs/train.json")
        self.root = Path(bundle_root)

    def run(self) -> RunResult:
        return train(self.config, self.root)
