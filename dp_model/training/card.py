"""The model card (``docs/README.md`` of a bundle): what the model is, on what data, how good, for what not."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..datasets import ChestDataset
from ..metrics import IOU_THRESHOLDS, Report
from ..networks.architectures import ARCHITECTURES
from ..networks.registry import resolve
from ..serving.bundle import PAPER, SCHEMA_FILE
from ..serving.contract import ModelContract
from ..serving.ood import DETECTORS, FALSE_REJECTION
from ..serving.served import ServedReport
from . import baselines
from .config import TrainConfig

WARNING = (
    "> **Warning: demonstration model trained on synthetic images.** It has never seen a real "
    "chest radiograph. Its outputs say nothing about real patients. It is not a medical device "
    "and must not be used for any clinical purpose."
)


#: Each classification loss, in words.
LOSSES = {
    "ce": "cross-entropy",
    "focal": "a focal loss",
    "cb_focal": "a class-balanced focal loss",
    "sqrt_focal": "a focal loss with 1/sqrt(n) class weights",
}


def pretrained(config: TrainConfig) -> bool:
    """Whether stage I (SimCLR) gave stage II its encoder (as :func:`~dp_model.training.run.train` decides)."""
    return config.pretrain.enabled and config.pretrain.epochs > 0


def _techniques(config: TrainConfig) -> str:
    """What stage II of the Deep Pneumonia ResNet18 was trained with, as this config says."""
    m = config.finetune.mgacr
    mgacr = {
        (True, True): "mask-guided attention with contrastive regulation (MGACR)",
        (True, False): "mask-guided attention (no contrastive regulation)",
        (False, True): "feature contrastive regulation (no mask-guided attention)",
        (False, False): "no mask-guided attention",
    }[(m.attention, m.feature_cr)]
    return f"{mgacr} and {LOSSES[config.finetune.loss.kind]}"


@dataclass(frozen=True, kw_only=True)
class CardText:
    """A network's own text in the model card (its registry entry's ``card``); None where the
    generic text serves.

    Attributes:
        description: the one line of metadata.json, true to the run's switches (else the
            entry's ``description``).
        summary: the card's opening sentence (else the entry's ``description`` after a
            sentence on the task).
        loss: the recipe's loss line (else the configured classification loss's).
    """

    description: str | None = None
    summary: str | None = None
    loss: str | None = None


def _text(config: TrainConfig) -> CardText:
    card = ARCHITECTURES[config.finetune.architecture].card
    return CardText() if card is None else resolve(card)(config)


def describe(config: TrainConfig) -> str:
    """One line for metadata.json: the architecture's description, true to this run's switches."""
    own = _text(config).description
    return own if own is not None else ARCHITECTURES[config.finetune.architecture].description


def summary(config: TrainConfig) -> str:
    """The model card's opening: what the network is and how it was trained."""
    own = _text(config).summary
    if own is not None:
        return own
    description = ARCHITECTURES[config.finetune.architecture].description
    return f"Pneumonia type recognition on frontal chest radiographs. {description}"


def deep_pneumonia_text(config: TrainConfig) -> CardText:
    """Deep Pneumonia's ResNet18, with the stage I and MGACR switches this run had."""
    stage_one = (
        "SimCLR pre-training" if pretrained(config) else "no SimCLR pre-training (stage I off)"
    )
    return CardText(
        description=f"Deep Pneumonia: ResNet18 with {stage_one}, {_techniques(config)}.",
        summary="Pneumonia type recognition on frontal chest radiographs: a ResNet18 "
        + (
            "pre-trained with SimCLR on the training images, then trained"
            if pretrained(config)
            else "trained from scratch, without SimCLR pre-training (stage I was off),"
        )
        + f" with {_techniques(config)}, after {PAPER}",
    )


def class_attention_text(config: TrainConfig) -> CardText:
    c = config.finetune.class_attention
    return CardText(
        loss=f"- loss: class attention Eq. 5 (positive weights n_min^2/n_i, entropy weight {c.entropy_weight}); one sigmoid per finding"
    )


def cia_text(config: TrainConfig) -> CardText:
    c = config.finetune.cia
    return CardText(
        loss=f"- loss: CIA-Net Eq. 6 (box weight {c.box_weight}) + alignment (feature {c.feature_weight}, consistency {c.consistency_weight}"
        f"{'' if c.alignment else ', module off'}); negatives: {c.negative_sampling}; boxes used on {config.data.boxed_fraction:.0%} of boxed training images"
    )


def _recipe(config: TrainConfig) -> list[str]:
    f, m = config.finetune, config.finetune.mgacr
    lines = [
        f"- stage I (SimCLR, NT-Xent, tau {config.pretrain.temperature}): "
        + (
            f"{config.pretrain.epochs} epochs, batch {config.pretrain.batch_size}"
            if config.pretrain.enabled
            else "off"
        ),
        f"- stage II: {f.epochs} epochs, batch {f.batch_size}, {f.optimizer} lr {f.lr}, checkpoint selected on validation {f.select_metric.replace('_', ' ')}",
        f"- network: {f.architecture}",
        _loss_line(config),
        f"- mask-guided attention: {'on, weight ' + str(m.att_weight) if m.attention else 'off'}; "
        f"feature contrastive regulation: {'on, weight ' + str(m.feat_weight) if m.feature_cr else 'off'}"
        + (f"; stages {list(m.stages)}; normal images: {m.normal_images}" if m.enabled else ""),
        f"- input: {config.data.image_size} x {config.data.image_size}, one channel, letterboxed, values in [0, 1]",
    ]
    return lines


def _loss_line(config: TrainConfig) -> str:
    """The recipe's loss: the network's own text, its own loss, or the configured one."""
    f, entry = config.finetune, ARCHITECTURES[config.finetune.architecture]
    own = _text(config).loss
    if own is not None:
        return own
    if entry.loss is not None:
        return f"- loss: the network's own (`{entry.loss}`)"
    return (
        f"- classification loss: {f.loss.kind}"
        + (
            f" (beta {f.loss.beta}, gamma {f.loss.gamma}, {f.loss.mode})"
            if f.loss.kind in ("focal", "cb_focal")
            else ""
        )
        + (f" (alpha {f.loss.alpha}, gamma {f.loss.gamma})" if f.loss.kind == "sqrt_focal" else "")
    )


def localization_table(accuracy: dict[str, list[float]]) -> list[str]:
    """Localization accuracy at each IoU threshold (CIA-Net's Tables 1-3), as markdown lines."""
    if not accuracy:
        return []
    header = " | ".join(f"T(IoU) {t}" for t in IOU_THRESHOLDS)
    lines = [
        "Localization accuracy on the boxed test images of the network's own map in the papers' sense (MGACR's `map+` of "
        "stage 3, a multi-label network's map of the finding, else Grad-CAM): the share whose region at 0.5 overlaps the "
        'boxes with IoU above T. The node draws regions from the source under "Lesion regions", which may be another.',
        "",
        f"| class | {header} |",
        "|---|" + "---|" * len(IOU_THRESHOLDS),
    ]
    lines += [
        f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |"
        for name, values in accuracy.items()
    ]
    return [*lines, ""]


def stage_one_verdict(records: list[dict[str, float]], batch_size: int) -> list[str]:
    """Whether stage I left chance: NT-Xent against ``ln(2N - 1)`` and pair accuracy against
    ``1 / (2N - 1)`` for ``N`` pairs a batch (an encoder that has not left chance is no pre-training)."""
    if not records:
        return []
    last, chance_loss, chance_top1 = (
        records[-1],
        math.log(2 * batch_size - 1),
        1.0 / (2 * batch_size - 1),
    )
    top1 = last.get("top1", 0.0)
    if top1 <= 2 * chance_top1 and last["loss"] >= 0.97 * chance_loss:
        verdict = "**it did not leave chance: the encoder it gave stage II is no better than a random one**"
    elif top1 < 10 * chance_top1:
        verdict = "**it barely left chance: the encoder it gave stage II is little better than a random one**"
    else:
        verdict = "it learned"
    return [
        f"- stage I ended at NT-Xent {last['loss']:.3f} (chance {chance_loss:.3f}) and pair accuracy {last.get('top1', float('nan')):.3f} (chance {chance_top1:.3f}): {verdict}"
    ]


def _majority_class(counts: dict[str, dict[str, int]]) -> str:
    return max(counts["train"], key=counts["train"].get)


def model_card(
    config: TrainConfig,
    contract: ModelContract,
    dataset: ChestDataset,
    counts: dict[str, dict[str, int]],
    split_method: str,
    report: Report,
    best_epoch: int,
    timings: dict[str, float],
    pictures: dict[str, Path],
    localization: dict[str, list[float]] | None = None,
    turned_away: float | None = None,
    compared: dict[str, Report] | None = None,
    pretrain_history: list[dict[str, float]] | None = None,
    served: ServedReport | None = None,
    samples: dict[str, dict] | None = None,
) -> str:
    warning = [WARNING, ""] if contract.demo or contract.synthetic else []
    parts_shown = [k for k in ("train", "val", "calibration", "test") if k in counts]
    rows = [
        "| class | " + " | ".join(SPLIT_TITLES[k] for k in parts_shown) + " |",
        "|---|" + "---|" * len(parts_shown),
    ]
    rows += [
        f"| {c} | " + " | ".join(str(counts[k][c]) for k in parts_shown) + " |"
        for c in dataset.classes
    ]
    minutes = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    parts = [
        f"# {contract.name} {contract.version}",
        "",
        *warning,
        summary(config),
        "",
        "## Intended use",
        "",
        "Research and software testing of the Deep Pneumonia DICOM node. Not a medical device; not for diagnosis, "
        "triage or any clinical decision. Outputs are unverified and preliminary by design.",
        "",
        "## Data",
        "",
        f"`{Path(config.data.root).name}` ({dataset.name} layout), {len(dataset)} images; {split_method} split "
        f"(test {config.data.test_fraction:.0%} of each class, validation {config.data.val_fraction:.0%} of the rest"
        + (
            f", calibration {len_of(counts, 'calibration')} images of the rest)."
            if "calibration" in counts
            else ")."
        )
        + " Validation chose the checkpoint; "
        + ("the calibration split" if "calibration" in counts else "validation too")
        + " chose the temperature, the operating points and the gate's threshold; test chose nothing.",
        *phantoms_line(Path(config.data.root)),
        "",
        *rows,
        "",
        "## Training",
        "",
        *_recipe(config),
        *stage_one_verdict(pretrain_history or [], config.pretrain.batch_size),
        f"- best validation epoch: {best_epoch + 1}; seed {config.runtime.seed}; time: {minutes}",
        "",
        "## Test metrics",
        "",
        "95 % confidence intervals from 1,000 bootstrap resamples of the test images.",
        "These are the network's own outputs (argmax over the classes, AUCs of each class's probability before "
        'temperature scaling), not what the node reports: that is under "The served decision on the test split".',
        "",
        report.table(),
        "",
        *(baselines.section(report, compared, _majority_class(counts)) if compared else []),
        *localization_table(localization or {}),
        *regions_section(contract),
        f"![confusion matrix]({pictures['confusion'].name}) ![ROC curves]({pictures['roc'].name})",
        "",
        f"![training curves]({pictures['curves'].name})",
        "",
        *calibration_section(contract, pictures, turned_away),
        *served_section(contract, served, pictures),
        "## Where the model looks",
        "",
        "Test images with the radiologists' boxes, the Grad-CAM of the predicted class and the model's own map: "
        "the box-supervised lesion head's where the network has one, else with MGACR the learned positive attention map, "
        "for a multi-label variant its map of the true finding.",
        "",
        *looks_line(contract),
        f"![attention]({pictures['attention'].name})",
        "",
        *(
            [
                "Each finding's map on an image of each finding, and each finding's map averaged over its test images:",
                "",
                f"![per-finding maps]({pictures['class_maps'].name})",
                "",
            ]
            if "class_maps" in pictures
            else []
        ),
        "## Limitations",
        "",
        *(
            [
                "- Trained and tested on synthetic phantoms made by `dp-synth` (settings under Data). Nothing here says how it "
                "reads a real radiograph; the demonstration's phantoms are deliberately easy, lesions at full density.",
            ]
            if contract.demo or contract.synthetic
            else []
        ),
        "- Trained and tested on one dataset; performance on other hospitals, devices and populations is unknown.",
        "- Frontal (PA/AP) adult chest radiographs only; other views and body parts are out of scope.",
        "- Accuracy rewards the majority class on long-tailed data; read balanced accuracy and per-class recall.",
        "- Small classes have wide confidence intervals.",
        "",
        "## Use",
        "",
        *samples_lines(samples or {}),
        "In this folder, with the Deep Pneumonia virtualenv active (`. <repository>/.venv/bin/activate`: MONAI and the "
        "network's code live there); the second command checks `configs/metadata.json` against MONAI's schema offline, "
        "with the copy kept in the package:",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . --input_dir samples --output_dir eval",
        "python -m monai.bundle verify_metadata --meta_file configs/metadata.json \\",
        f"    --filepath \"$(python -c \"from importlib.resources import files; print(files('dp_model.schemas') / '{SCHEMA_FILE}')\")\"",
        "```",
        "",
        "```python",
        "from dp_model.serving.bundle import load_bundle",
        "model, contract = load_bundle('.')  # weights loaded with torch.load(..., weights_only=True)",
        "```",
        "",
        f"Device UID (changes with the weights): `{contract.device_uid}`.",
        "",
        "Bundle configs can execute code: load only bundles from people you trust.",
        "",
    ]
    return "\n".join(parts)


#: Column titles of the splits.
SPLIT_TITLES = {"train": "train", "val": "validation", "calibration": "calibration", "test": "test"}


def samples_lines(samples: dict[str, dict]) -> list[str]:
    """What ``samples/`` holds and the ground truth of each (``samples/truth.json``)."""
    if not samples:
        return []

    def truth(entry: dict) -> str:
        boxes = entry.get("boxes") or []
        where = "; ".join(f"box x {b[0]:g}-{b[2]:g}, y {b[1]:g}-{b[3]:g}" for b in boxes)
        return ", ".join(entry.get("labels") or ["no finding"]) + (f" ({where})" if where else "")

    return [
        f"`samples/` holds {len(samples)} test images, picked after every figure above as examples the model gets right "
        "(the test figures say how often it is); their ground truth, from `samples/truth.json`, in the image's own pixels:",
        "",
        *[f"- `{name}`: {truth(entry)}" for name, entry in samples.items()],
        "",
    ]


def looks_line(contract: ModelContract) -> list[str]:
    """Whether the node draws any of these maps: only the source that earned it on validation."""
    located = contract.localization
    if located is None:
        return [
            "The node draws none of these maps: this model's localization was not measured.",
            "",
        ]
    if not located.shown:
        return [
            f"The node draws none of these maps: its best source, `{located.source}`, did not beat the fixed prior map "
            'on validation ("Lesion regions" above).',
            "",
        ]
    return [
        f'The node draws regions from `{located.source}` only (chosen on validation, "Lesion regions" above).',
        "",
    ]


def phantoms_line(root: Path) -> list[str]:
    """How hard the synthetic phantoms were (``dp-synth`` leaves its configuration beside
    them): figures on easy phantoms say nothing about hard ones. Nothing for other data."""
    import yaml

    found = root / "synth_config.yaml"
    if not found.exists():
        return []
    try:
        settings = yaml.safe_load(found.read_text()) or {}
        difficulty = settings.get("difficulty") or {}
        text = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in difficulty.items())
        weights = settings.get("class_weights")
    except (yaml.YAMLError, AttributeError):
        return []
    return [
        "",
        f"Synthetic phantoms (`dp-synth`, {settings.get('size')} px): {text}"
        + (f"; class weights {', '.join(str(w) for w in weights)}" if weights else "")
        + ".",
    ]


def len_of(counts: dict[str, dict[str, int]], part: str) -> int:
    return sum(counts[part].values())


def served_section(
    contract: ModelContract, served: ServedReport | None, pictures: dict[str, Path]
) -> list[str]:
    """What the node reports, measured once on the test split with intervals, and on which
    split each number was chosen and on which it was measured, as markdown lines."""
    if served is None:
        return []
    sizes = contract.splits
    where = sizes.get("calibrated_on", "validation")
    chosen_on = f"{where} ({sizes.get(where, '?')} images)"
    lines = [
        "## The served decision on the test split",
        "",
        f"What the node reports, measured once on the {served.all.images} test images ({served.all.positives} with pneumonia): the contract's rule "
        "(`dp_model.serving.contract.decide`) at the bundle's operating points, on the temperature-scaled probabilities, behind the "
        "out-of-distribution gate. An image the gate stops is not reported positive: on every image it counts as missed if it has "
        f"pneumonia. Rates with exact (Clopper-Pearson) {served.confidence:.0%} intervals; the AUC with 1,000 bootstrap resamples. "
        "Per-image scores of every held-out split are in `scores_test.npz`, `scores_val.npz` and `scores_calibration.npz` "
        "(ids hashed as in `configs/split.json`); `dp_model.serving.served.evaluate_scores_file` recomputes this table from them.",
        "",
        served.table(),
        "",
        "| number | chosen on | measured on |",
        "|---|---|---|",
        f"| checkpoint | validation ({sizes.get('validation', '?')} images) | test: the metrics above |",
        f"| temperature T = {contract.temperature:.3f} | {chosen_on} | test: Brier, ECE, AUC of the probability of pneumonia |",
        *(
            f'| "{name}" threshold {p.threshold:.4f} ({p.target}) | {chosen_on} | test: the table above |'
            for name, p in contract.operating_points.items()
        ),
        *(
            [f"| gate threshold {contract.ood.threshold:.1f} | {chosen_on} | test: not assessed |"]
            if contract.ood is not None
            else []
        ),
        "",
    ]
    if "triage" not in contract.operating_points:
        lines += [_no_triage(contract, where), ""]
    if "served_reliability" in pictures:
        lines += [
            f"![reliability of the served probability of pneumonia]({pictures['served_reliability'].name})",
            "",
        ]
    return lines


def calibration_section(
    contract: ModelContract, pictures: dict[str, Path], turned_away: float | None
) -> list[str]:
    """Calibration, operating points and the out-of-distribution gate, as markdown lines."""
    lines = ["## Calibration, operating points, out-of-distribution gate", ""]
    found = contract.calibration
    if found:
        b, a = found["test_before"], found["test_after"]
        lines += [
            f"Temperature scaling on the {found.get('split', 'validation')} split: T = {contract.temperature:.3f}. Expected calibration error of the "
            f"top-class probability on the {a['images']} test images ({15} bins; 95 % bootstrap intervals): "
            f"{b['ece']:.3f} [{b['ece_low']:.3f}, {b['ece_high']:.3f}] before, {a['ece']:.3f} [{a['ece_low']:.3f}, {a['ece_high']:.3f}] after."
            + _calibration_verdict(b, a, found.get("split", "validation")),
            "",
        ]
    rows = [
        f"| {name} | {p.threshold:.4f} | {p.target} | {_rate(p.sensitivity)} | {_rate(p.specificity)} |"
        for name, p in contract.operating_points.items()
    ]
    lines += [
        f"Probability of pneumonia: {'the largest' if contract.multi_label else 'the sum'} of the calibrated probabilities of "
        f'{", ".join(contract.pneumonia)}. The node reports pneumonia present at the "present" point and raises a triage flag at the "triage" point:',
        "",
        "| operating point | threshold | chosen for | sensitivity (where chosen) | specificity (where chosen) |",
        "|---|---|---|---|---|",
        *(rows or ["| present | 0.5000 | no operating point could be placed | - | - |"]),
        "",
        "The sensitivity and specificity in this table are those of the split that chose each point: they placed it and do not "
        'estimate how it performs. The test split measures that, under "The served decision on the test split".',
        "",
    ]
    if contract.ood is not None and contract.ood.false_rejection is not None:
        gate = contract.ood
        if gate.kind == "mahalanobis":
            opening = (
                f"Out-of-distribution gate: an image whose penultimate features lie farther than {gate.threshold:.1f} (squared Mahalanobis "
                f"distance to the nearest class mean of the training features, covariance shrunk {gate.shrinkage or 0:.2f} towards a scaled identity "
                f"by Ledoit-Wolf) is not assessed. The threshold is the {_rank(gate.rank, gate.held_out)} distance of the {gate.held_out} {gate.split} images, "
            )
        else:
            opening = (
                f"Out-of-distribution gate ({gate.kind}): an image whose score ({DETECTORS[gate.kind]}) is above {gate.threshold:.4g} is not "
                f"assessed. The threshold is the {_rank(gate.rank, gate.held_out)} score of the {gate.held_out} {gate.split} images, "
            )
        lines += [
            opening
            + f"so that it turns away at most {gate.false_rejection:.1%} of in-distribution images with {gate.confidence:.0%} confidence"
            + (
                f" (too few images for {FALSE_REJECTION:.0%}: that needs {math.ceil(math.log(1 - gate.confidence) / math.log(1 - FALSE_REJECTION))})."
                if gate.false_rejection > FALSE_REJECTION * 1.001
                else "."
            )
            + (
                ""
                if turned_away is None
                else f" It turns away {turned_away:.1%} of the test images."
            ),
            "",
        ]
    elif contract.ood is not None:
        share = (
            ""
            if turned_away is None
            else f" It turns away {turned_away:.1%} of the held-out test images."
        )
        lines += [
            f"Out-of-distribution gate: an image whose penultimate features lie farther than {contract.ood.threshold:.1f} (squared "
            f"Mahalanobis distance to the nearest class mean of the training features) is not assessed; the threshold is the "
            f"{contract.ood.quantile:.0%} quantile of {contract.ood.held_out} validation images.{share}",
            "",
        ]
    else:
        lines += ["No out-of-distribution gate: every image is assessed.", ""]
    if "calibration" in pictures:
        lines += [f"![calibration]({pictures['calibration'].name})", ""]
    return lines


def _rank(rank: int | None, n: int) -> str:
    """ "the largest", or "the 996th smallest"."""
    if rank is None or rank >= n:
        return "largest"
    suffix = "th" if 10 <= rank % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(rank % 10, "th")
    return f"{rank}{suffix} smallest"


def _no_triage(contract: ModelContract, where: str) -> str:
    """Why the bundle raises no triage flag, as far as the contract tells."""
    negatives = contract.present_point.negatives
    if negatives is None:
        return "No triage point: the node raises no triage flag."
    from ..serving.calibration import CONFIDENCE
    from .calibrate import TRIAGE_SPECIFICITY

    needed = math.ceil(math.log(1 - CONFIDENCE) / math.log(TRIAGE_SPECIFICITY))
    if negatives < needed:
        return (
            f"No triage point, so no triage flag: a specificity of {TRIAGE_SPECIFICITY:.2f} cannot be certified at {CONFIDENCE:.0%} on the "
            f"{where} split's {negatives} images without pneumonia (it needs at least {needed})."
        )
    return f'No triage point, so no triage flag: its certified threshold on the {where} split fell below the "present" point, or none reached it.'


def _calibration_verdict(before: dict, after: dict, split: str = "validation") -> str:
    """A word when temperature scaling did not lower the test error (a number left alone reads as a success)."""
    if after["ece"] <= before["ece"]:
        return ""
    overlap = after["ece_low"] <= before["ece_high"] and before["ece_low"] <= after["ece_high"]
    return (
        f" **Calibration did not help on the test images: the error rose from {before['ece']:.3f} to {after['ece']:.3f}**"
        + (
            "; the intervals overlap, so the change is within what so few test images can tell apart"
            if overlap
            else ""
        )
        + f". The temperature fitted on the {split} split does not carry over to the test split; "
        "read the probabilities as scores, not as frequencies."
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def regions_section(contract: ModelContract) -> list[str]:
    """Whether the node draws lesion regions, and the evidence: every map source and the fixed
    prior on the boxed validation images, the chosen one and the prior on test (markdown lines)."""
    located = contract.localization
    if located is None:
        return []
    keys = ("iou>0.1", "iou>0.3", "iou>0.5", "pointing")

    def row(name: str, figures: dict[str, float]) -> str:
        return (
            f"| {name} | "
            + " | ".join(
                "n/a" if not math.isfinite(figures.get(k, math.nan)) else f"{figures[k]:.2f}"
                for k in keys
            )
            + " |"
        )

    header = [
        "| map | IoU > 0.1 | IoU > 0.3 | IoU > 0.5 | pointing game |",
        "|---|---|---|---|---|",
    ]
    verdict = (
        f"**Regions are shown**, from `{located.source}`."
        if located.shown
        else f"**Regions are not shown**: the best map, `{located.source}`, does not beat the prior by the rule. The node reports the classification without regions and says so."
    )
    low = "n/a" if not math.isfinite(located.difference_low) else f"{located.difference_low:+.3f}"
    return [
        "## Lesion regions: measured against a fixed prior",
        "",
        "The node draws lesion regions only when the model's maps localize the boxed validation images better than a map that "
        "ignores the image: each class's mean training box, at half its peak, handed the true class (the prior). Each map is "
        "handed the true class too; its region is where it reaches 0.5. Figures are shares of boxed images (IoU of the region "
        "with the union of the boxes above T; the map's maximum inside a box), averaged within each class, then over classes. "
        f"Rule: IoU > 0.3 at least {located.margin:.2f} above the prior's, the lower end of its 95 % paired bootstrap interval "
        "above 0, and the pointing game above the prior's, on validation; the source with the best validation IoU > 0.3 is chosen.",
        "",
        f"Validation ({located.images.get('validation', 0)} boxed images):",
        "",
        *header,
        *(
            row(f"`{name}`" + (" (chosen)" if name == located.source else ""), figures)
            for name, figures in located.candidates.items()
        ),
        row("prior (mean training box)", located.prior_validation),
        "",
        f"Test ({located.images.get('test', 0)} boxed images, reported once):",
        "",
        *header,
        row(f"`{located.source}`", located.test),
        row("prior (mean training box)", located.prior_test),
        "",
        f"Difference at IoU > 0.3 on validation, chosen minus prior: lower end of its 95 % interval {low}. {verdict}",
        "",
    ]
