"""The model card (``docs/README.md`` of a bundle): what the model is, on what data, how good, for what not."""

from __future__ import annotations

from pathlib import Path

from ..bundle import PAPER, ModelContract
from ..datasets import ChestDataset
from ..metrics import Report
from .config import TrainConfig

WARNING = (
    "> **Warning: demonstration model trained on synthetic images.** It has never seen a real "
    "chest radiograph. Its outputs say nothing about real patients. It is not a medical device "
    "and must not be used for any clinical purpose."
)


#: One line per architecture, for metadata.json and the model card.
DESCRIPTIONS = {
    "resnet18": "Deep Pneumonia: ResNet18 with SimCLR pre-training, mask-guided attention with contrastive regulation and a class-balanced focal loss.",
    "resnet50": "ResNet-50 baseline trained from scratch (the Deep Pneumonia paper's Table II).",
    "vgg16": "VGG16 baseline trained from scratch (the Deep Pneumonia paper's Table II).",
    "attention_resnet50": "Attention-enhanced ResNet-50: channel and spatial attention side branches in every residual stage, trained with a modified focal loss with 1/sqrt(n) class weights.",
}


def _recipe(config: TrainConfig) -> list[str]:
    f, m = config.finetune, config.finetune.mgacr
    lines = [
        f"- stage I (SimCLR, NT-Xent, tau {config.pretrain.temperature}): "
        + (f"{config.pretrain.epochs} epochs, batch {config.pretrain.batch_size}" if config.pretrain.enabled else "off"),
        f"- stage II: {f.epochs} epochs, batch {f.batch_size}, {f.optimizer} lr {f.lr}, checkpoint selected on validation {f.select_metric.replace('_', ' ')}",
        f"- network: {f.architecture}",
        f"- classification loss: {f.loss.kind}" + (f" (beta {f.loss.beta}, gamma {f.loss.gamma}, {f.loss.mode})" if f.loss.kind in ("focal", "cb_focal") else "")
        + (f" (alpha {f.loss.alpha}, gamma {f.loss.gamma})" if f.loss.kind == "sqrt_focal" else ""),
        f"- mask-guided attention: {'on, weight ' + str(m.att_weight) if m.attention else 'off'}; "
        f"feature contrastive regulation: {'on, weight ' + str(m.feat_weight) if m.feature_cr else 'off'}"
        + (f"; stages {list(m.stages)}; normal images: {m.normal_images}" if m.enabled else ""),
        f"- input: {config.data.image_size} x {config.data.image_size}, one channel, letterboxed, values in [0, 1]",
    ]
    return lines


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
) -> str:
    warning = [WARNING, ""] if contract.demo or contract.synthetic else []
    rows = ["| class | train | validation | test |", "|---|---|---|---|"]
    rows += [f"| {c} | {counts['train'][c]} | {counts['val'][c]} | {counts['test'][c]} |" for c in dataset.classes]
    minutes = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    parts = [
        f"# {contract.name} {contract.version}",
        "",
        *warning,
        (
            "Pneumonia type recognition on frontal chest radiographs: a ResNet18 pre-trained with SimCLR on the "
            "training images, then trained with mask-guided attention and contrastive regulation (MGACR) and a "
            f"class-balanced focal loss, after {PAPER}"
            if contract.architecture == "resnet18"
            else f"Pneumonia type recognition on frontal chest radiographs. {DESCRIPTIONS[contract.architecture]}"
        ),
        "",
        "## Intended use",
        "",
        "Research and software testing of the Deep Pneumonia DICOM node. Not a medical device; not for diagnosis, "
        "triage or any clinical decision. Outputs are unverified and preliminary by design.",
        "",
        "## Data",
        "",
        f"`{config.data.root}` ({dataset.name} layout), {len(dataset)} images; {split_method} split "
        f"(test {config.data.test_fraction:.0%} of each class, validation {config.data.val_fraction:.0%} of the rest).",
        "",
        *rows,
        "",
        "## Training",
        "",
        *_recipe(config),
        f"- best validation epoch: {best_epoch + 1}; seed {config.runtime.seed}; time: {minutes}",
        "",
        "## Test metrics",
        "",
        "95 % confidence intervals from 1,000 bootstrap resamples of the test images.",
        "",
        report.table(),
        "",
        f"![confusion matrix]({pictures['confusion'].name}) ![ROC curves]({pictures['roc'].name})",
        "",
        f"![training curves]({pictures['curves'].name})",
        "",
        "## Where the model looks",
        "",
        "Test images with the radiologists' boxes, the Grad-CAM of the predicted class and, with MGACR, the "
        "learned positive attention map.",
        "",
        f"![attention]({pictures['attention'].name})",
        "",
        "## Limitations",
        "",
        "- Trained and tested on one dataset; performance on other hospitals, devices and populations is unknown.",
        "- Frontal (PA/AP) adult chest radiographs only; other views and body parts are out of scope.",
        "- Accuracy rewards the majority class on long-tailed data; read balanced accuracy and per-class recall.",
        "- Small classes have wide confidence intervals.",
        "",
        "## Use",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . --input_dir samples --output_dir eval",
        "```",
        "",
        "```python",
        "from dp_model.bundle import load_bundle",
        "model, contract = load_bundle('.')  # weights loaded with torch.load(..., weights_only=True)",
        "```",
        "",
        f"Device UID (changes with the weights): `{contract.device_uid}`.",
        "",
        "Bundle configs can execute code: load only bundles from people you trust.",
        "",
    ]
    return "\n".join(parts)
