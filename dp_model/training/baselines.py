"""What a model must beat: a plain ResNet18 on the same split with the same budget, the
majority class and chance.

A model whose figures carry intervals can still be worse than answering "normal" every
time; the model card shows the three baselines beside it and says so in words.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..metrics import Report, evaluate
from .config import AugmentConfig, FinetuneConfig, LossConfig, MGACRConfig

#: The plain baseline's augmentation: none.
NO_AUGMENTATION = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotate_degrees=0.0, flip_prob=0.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0),
    brightness=0.0, blur_prob=0.0, noise_prob=0.0,
)  # fmt: skip


def plain_recipe(config: FinetuneConfig) -> FinetuneConfig:
    """A torchvision-style ResNet18 with cross-entropy, no augmentation, no MGACR and a fixed
    learning rate, with the model's own epochs, batch size, optimiser and rate."""
    return replace(
        config, architecture="resnet18", augment=NO_AUGMENTATION, mgacr=MGACRConfig(attention=False, feature_cr=False),
        loss=LossConfig(kind="ce"), warmup_epochs=0.0, schedule="step", step_epochs=10**6, step_gamma=1.0,
    )  # fmt: skip


def majority(train_labels: np.ndarray, test_labels: np.ndarray, classes: tuple[str, ...], seed: int = 0) -> Report:
    """Always the training split's most frequent class."""
    scores = np.zeros((len(test_labels), len(classes)), np.float32)
    scores[:, np.bincount(train_labels, minlength=len(classes)).argmax()] = 1.0
    return evaluate(test_labels, scores, classes, bootstrap=1000, seed=seed)


def chance(test_labels: np.ndarray, classes: tuple[str, ...], seed: int = 0) -> Report:
    """Random scores (a uniform Dirichlet draw per image, fixed by ``seed``)."""
    scores = np.random.default_rng(seed).dirichlet(np.ones(len(classes)), size=len(test_labels)).astype(np.float32)
    return evaluate(test_labels, scores, classes, bootstrap=1000, seed=seed)


def shortfalls(model: Report, baselines: dict[str, Report]) -> list[str]:
    """Plain words for each baseline the model does not clearly beat."""
    found = []
    chance_level = 1.0 / len(model.classes)
    low_balanced = model.intervals.get("balanced_accuracy", (model.balanced_accuracy, model.balanced_accuracy))[0]
    low_auc = model.intervals.get("macro_auc", (model.macro_auc, model.macro_auc))[0]
    if not low_balanced > chance_level:
        found.append(
            f"its balanced accuracy ({model.balanced_accuracy:.3f}, interval from {low_balanced:.3f}) is not clearly above "
            f"{chance_level:.3f}, what answering one class every time or guessing scores"
        )
    if not low_auc > 0.5:
        found.append(f"its macro ROC AUC ({model.macro_auc:.3f}, interval from {low_auc:.3f}) is not clearly above 0.5, chance")
    plain = baselines.get("plain ResNet18")
    if plain is not None and not model.balanced_accuracy > plain.balanced_accuracy:
        found.append(f"the plain ResNet18 trained on the same split with the same budget does as well or better (balanced accuracy {plain.balanced_accuracy:.3f})")
    if plain is not None and np.isfinite(plain.macro_auc) and not model.macro_auc > plain.macro_auc:
        found.append(f"the plain ResNet18's macro ROC AUC is as high or higher ({plain.macro_auc:.3f} against {model.macro_auc:.3f})")
    return found


def section(model: Report, baselines: dict[str, Report], majority_class: str) -> list[str]:
    """The model card's comparison: a table, then a warning in words when there is one to give."""
    names = {"plain ResNet18": "plain ResNet18 (cross-entropy, no augmentation, same split and budget)",
             "majority": f'majority class (always "{majority_class}")', "chance": "chance (random scores)"}  # fmt: skip
    rows = ["| | accuracy | balanced accuracy | macro F1 | macro ROC AUC |", "|---|---|---|---|---|"]
    for name, report in [("this model", model), *baselines.items()]:
        cells = [_cell(report, key) for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")]
        rows.append(f"| {names.get(name, name)} | " + " | ".join(cells) + " |")
    found = shortfalls(model, baselines)
    words = ["**Warning: this model is not better than its baselines:** " + "; ".join(found) + ". Do not read its other figures as evidence that it learned."] if found else []
    return ["## Against its baselines", "", *rows, "", *words, *([""] if words else [])]


def _cell(report: Report, key: str) -> str:
    value = report.scalars()[key]
    low, high = report.intervals.get(key, (float("nan"), float("nan")))
    return f"{value:.3f}" + (f" ({low:.3f} to {high:.3f})" if np.isfinite(low) else "")
