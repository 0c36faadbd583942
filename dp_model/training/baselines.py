"""What a model must beat: an untuned plain ResNet18 on the same split and epochs, block
statistics (a non-deep model of coarse brightness and texture), the majority class and chance.

A model whose figures carry intervals can still be worse than answering "normal" every
time; the model card shows the three baselines beside it and says so in words.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import Report, evaluate
from .config import STRONG_AUGMENTATION, AugmentConfig, FinetuneConfig, LossConfig, MGACRConfig
from .data import Resident

logger = logging.getLogger(__name__)

#: The plain baseline's augmentation: none.
NO_AUGMENTATION = AugmentConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    rotate_degrees=0.0,
    flip_prob=0.0,
    gamma=(1.0, 1.0),
    contrast=(1.0, 1.0),
    brightness=0.0,
    blur_prob=0.0,
    noise_prob=0.0,
)


def plain_recipe(config: FinetuneConfig) -> FinetuneConfig:
    """A torchvision-style ResNet18 with cross-entropy, no augmentation, no MGACR and a fixed
    learning rate, with the model's own epochs, batch size, optimiser and rate."""
    return replace(
        config,
        architecture="resnet18",
        augment=NO_AUGMENTATION,
        mgacr=MGACRConfig(attention=False, feature_cr=False),
        loss=LossConfig(kind="ce"),
        warmup_epochs=0.0,
        schedule="step",
        step_epochs=10**6,
        step_gamma=1.0,
    )


#: The plain ResNet18's search when it is tuned as the system is: the augmentations the
#: system's own recipe was chosen from (the light default and the former strong one).
PLAIN_AUGMENTATIONS = {"light": AugmentConfig(), "strong": STRONG_AUGMENTATION}


def tuned_plain_recipe(config: FinetuneConfig, augment: AugmentConfig) -> FinetuneConfig:
    """A ResNet18 with cross-entropy and no MGACR that keeps everything else of the system's
    recipe (epochs, batch, optimiser, rate, warm-up, cosine schedule) and trains with
    ``augment``: the baseline gets the budget and the search the system gets."""
    return replace(
        config,
        architecture="resnet18",
        augment=augment,
        mgacr=MGACRConfig(attention=False, feature_cr=False),
        loss=LossConfig(kind="ce"),
    )


#: The post-hoc logit adjustment's candidates (Menon et al. 2021, "Long-tail learning via
#: logit adjustment"): 0 is no adjustment, 1 the Bayes-optimal one for balanced error under
#: a calibrated softmax; negative values undo a loss that already over-weights the tail.
TAUS = tuple(float(t) for t in np.arange(-1.0, 2.01, 0.25))


def adjusted(log_scores: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Scores after subtracting ``tau * log(prior)`` from the logits (log scores): each class's
    column is divided by ``prior ** tau``, so decisions move towards rare classes for
    ``tau > 0`` while every class's ranking, and so its ROC AUC, stays as it was."""
    return np.exp(np.asarray(log_scores, np.float64) - tau * np.log(np.asarray(prior, np.float64)))


def choose_tau(
    log_scores: np.ndarray, labels: np.ndarray, prior: np.ndarray, taus: tuple[float, ...] = TAUS
) -> float:
    """The ``tau`` with the best balanced accuracy on the given (validation) scores; ties go to
    the smallest ``|tau|``, so an adjustment is applied only when it helps."""
    labels = np.asarray(labels)
    present = np.unique(labels)

    def balanced(tau: float) -> float:
        predicted = adjusted(log_scores, prior, tau).argmax(axis=1)
        return float(np.mean([(predicted[labels == c] == c).mean() for c in present]))

    return max(sorted(taus, key=abs), key=balanced)


def tile_features(images: np.ndarray, block: int = 16) -> np.ndarray:
    """Mean and standard deviation of every ``block`` x ``block`` tile of ``(N, 1, S, S)``
    images (S a multiple of ``block``): ``(N, 2 * (S / block) ** 2)``."""
    x = np.asarray(images, np.float32)
    n, size = x.shape[0], x.shape[-1]
    if size % block:
        raise ValueError(
            f"block statistics need an image side that is a multiple of {block}, got {size}"
        )
    tiles = x.reshape(n, size // block, block, size // block, block)
    return np.concatenate(
        [tiles.mean(axis=(2, 4)).reshape(n, -1), tiles.std(axis=(2, 4)).reshape(n, -1)], axis=1
    )


#: The candidates of the selection protocol's block-statistics row (its published tables were
#: made with this search; dp-train's card and benchmarks/synth_difficulty.py use
#: :func:`fit_block_statistics`), chosen on validation balanced accuracy.
TILE_GRID = (
    {"learning_rate": 0.05, "max_leaf_nodes": 15},
    {"learning_rate": 0.1, "max_leaf_nodes": 15},
    {"learning_rate": 0.05, "max_leaf_nodes": 31},
    {"learning_rate": 0.1, "max_leaf_nodes": 31},
)


def tile_statistics(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test_images: np.ndarray,
    num_classes: int,
    seed: int = 0,
    block: int = 16,
    iterations: int = 200,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The non-deep baseline: gradient boosting on :func:`tile_features`, the candidate of
    :data:`TILE_GRID` with the best validation balanced accuracy after its logit adjustment
    (tau chosen on the same validation scores). Returns the validation and test probabilities ``(N, C)`` and the chosen settings.

    Args:
        train, val: ``(images, labels)``; images ``(N, 1, S, S)``.
        iterations: boosting rounds of every candidate.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    x_train, x_val, x_test = (tile_features(i, block) for i in (train[0], val[0], test_images))
    y_train, y_val = np.asarray(train[1]), np.asarray(val[1])
    prior = np.bincount(y_train, minlength=num_classes) / len(y_train)
    best: tuple[float, dict, object] = (-1.0, {}, None)
    for params in TILE_GRID:
        # Unweighted, as the plain ResNet18's cross-entropy: the logit adjustment chosen on
        # validation balances the classes (and weighted binning costs seconds per fit).
        model = HistGradientBoostingClassifier(
            max_iter=iterations, early_stopping=False, random_state=seed, **params
        ).fit(x_train, y_train)
        log_scores = np.log(np.clip(_full(model, x_val, num_classes), 1e-12, None))
        score = evaluate(
            y_val,
            adjusted(log_scores, prior, choose_tau(log_scores, y_val, prior)),
            tuple(map(str, range(num_classes))),
        ).balanced_accuracy
        if score > best[0]:
            best = (score, params, model)
    return _full(best[2], x_val, num_classes), _full(best[2], x_test, num_classes), dict(best[1])


def _full(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over every class, zero for a class the training split lacked."""
    return _widen(model.predict_proba(x), model.classes_, num_classes, np.float64)


def majority(
    train_labels: np.ndarray, test_labels: np.ndarray, classes: tuple[str, ...], seed: int = 0
) -> Report:
    """Always the training split's most frequent class."""
    scores = np.zeros((len(test_labels), len(classes)), np.float32)
    scores[:, np.bincount(train_labels, minlength=len(classes)).argmax()] = 1.0
    return evaluate(test_labels, scores, classes, bootstrap=1000, seed=seed)


def chance(test_labels: np.ndarray, classes: tuple[str, ...], seed: int = 0) -> Report:
    """Random scores (a uniform Dirichlet draw per image, fixed by ``seed``)."""
    scores = (
        np.random.default_rng(seed)
        .dirichlet(np.ones(len(classes)), size=len(test_labels))
        .astype(np.float32)
    )
    return evaluate(test_labels, scores, classes, bootstrap=1000, seed=seed)


#: The block-statistics baseline's input: the image at 128 px in blocks of 16 x 16.
BLOCK_IMAGE, BLOCK = 128, 16
#: Hyper-parameters it may choose from, on validation: learning rate, leaves per tree and
#: class weighting; the number of trees is chosen every 25 up to 400.
BLOCK_GRID = {
    "learning_rate": (0.05, 0.1),
    "max_leaf_nodes": (15, 31),
    "class_weight": (None, "balanced"),
}
BLOCK_TREES = (25, 400)


def block_features(images: torch.Tensor) -> np.ndarray:
    """Mean and standard deviation of each 16 x 16 block of each image resized (by area) to
    128 x 128: ``(N, 128)`` from ``(N, 1, S, S)`` uint8 or float images."""
    x = images.float().cpu()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[-1] != BLOCK_IMAGE:
        x = F.interpolate(x, size=(BLOCK_IMAGE, BLOCK_IMAGE), mode="area")
    n, side = x.shape[0], BLOCK_IMAGE // BLOCK
    blocks = (
        x.reshape(n, side, BLOCK, side, BLOCK)
        .permute(0, 1, 3, 2, 4)
        .reshape(n, side * side, BLOCK * BLOCK)
    )
    return torch.cat([blocks.mean(-1), blocks.std(-1)], dim=1).numpy()


@dataclass
class BlockModel:
    """A fitted block-statistics classifier and what validation chose: its first ``trees``
    boosting rounds (the model may hold more; the rest are not used)."""

    model: object
    trees: int
    params: dict
    classes: int
    val_balanced_accuracy: float

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """``(N, classes)`` probabilities (zero for a class absent from training)."""
        with _threads(len(images)):
            return _widen(
                _after(self.model, block_features(images), self.trees),
                self.model.classes_,
                self.classes,
            )


def _boosting(binned: dict, **params):
    """scikit-learn's ``HistGradientBoostingClassifier`` that bins its training features once
    per class weighting and reuses them across the settings of one search (``binned``, shared):
    the bins depend on the features and the sample weights only, and with weights binning
    costs seconds per fit. The trees are those of the plain classifier (a test compares them)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    class Binned(HistGradientBoostingClassifier):
        def _bin_data(self, X, sample_weight, is_training_data):
            if not is_training_data:
                return super()._bin_data(X, sample_weight, is_training_data)
            key = str(self.class_weight)
            if key not in binned:
                binned[key] = (
                    super()._bin_data(X, sample_weight, is_training_data),
                    self._bin_mapper,
                )
            X_binned, self._bin_mapper = binned[key]
            return X_binned.copy(order="F")

    return Binned(**params)


def _after(model, x: np.ndarray, rounds: int) -> np.ndarray:
    """The probabilities of a boosted model after its first ``rounds`` rounds."""
    return next(itertools.islice(model.staged_predict_proba(x), rounds - 1, None))


def fit_block_statistics(
    train: Resident,
    val: Resident,
    classes: int,
    seed: int = 0,
    grid: dict | None = None,
    trees: tuple[int, int] = BLOCK_TREES,
) -> BlockModel:
    """Fit on ``train`` each combination of ``grid`` (:data:`BLOCK_GRID`) and score it on
    ``val`` every ``trees[0]`` trees up to ``trees[1]`` (stopping after four steps without a
    better validation score); keep the combination and tree count with the best balanced
    accuracy on ``val``.

    Each combination is fitted once with every round and read at each count from its staged
    predictions: boosting without subsampling is the same model whether grown at once or 25
    rounds at a time, and one fit bins the features once (with class weights, binning costs
    seconds per fit)."""
    x_train, x_val = block_features(train.images), block_features(val.images)
    y_train, y_val = train.labels.cpu().numpy(), val.labels.cpu().numpy()
    step, most = trees
    best: tuple[float, dict, int, object] = (-1.0, {}, step, None)
    binned: dict = {}
    with _threads(len(x_train)):
        for values in itertools.product(*(grid or BLOCK_GRID).values()):
            params = dict(zip(grid or BLOCK_GRID, values))
            model = _boosting(
                binned, max_iter=most, early_stopping=False, random_state=seed, **params
            ).fit(x_train, y_train)
            here, waited = -1.0, 0
            for rounds, probabilities in enumerate(model.staged_predict_proba(x_val), start=1):
                if waited >= 4:
                    break
                if rounds % step:
                    continue
                score = mean_recall(y_val, model.classes_[probabilities.argmax(1)], classes)
                here, waited = (score, 0) if score > here else (here, waited + 1)
                if score > best[0]:
                    best = (score, params, rounds, model)
    score, params, count, model = best
    logger.info(
        "block statistics: %d trees, %s; validation balanced accuracy %.3f", count, params, score
    )
    return BlockModel(model, count, params, classes, score)


def block_statistics(
    train: Resident,
    val: Resident,
    test: Resident,
    classes: tuple[str, ...],
    seed: int = 0,
    **search,
) -> Report:
    """The non-deep baseline: mean and SD of each 16 x 16 block of the 128-px image into
    gradient boosting (scikit-learn's ``HistGradientBoostingClassifier``), hyper-parameters
    chosen on ``val`` only, measured once on ``test``. A model that does not beat it has not
    shown that it sees more than the brightness and texture of coarse regions. ``search``
    (``grid``, ``trees``) narrows the search (tests)."""
    fitted = fit_block_statistics(train, val, len(classes), seed, **search)
    return evaluate(
        test.labels.cpu().numpy(),
        fitted.probabilities(test.images),
        classes,
        bootstrap=1000,
        seed=seed,
    )


def _threads(samples: int):
    """One OpenMP thread below 10,000 samples: there, waking threads costs more than the work
    (on a busy machine, a hundred times more)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="openmp") if samples < 10_000 else contextlib.nullcontext()


def mean_recall(target: np.ndarray, predicted: np.ndarray, classes: int) -> float:
    """Balanced accuracy: the mean recall over the classes present in ``target``."""
    recalls = [
        float((predicted[target == c] == c).mean()) for c in range(classes) if (target == c).any()
    ]
    return float(np.mean(recalls)) if recalls else float("nan")


def _widen(
    probabilities: np.ndarray, present: np.ndarray, classes: int, dtype: type = np.float32
) -> np.ndarray:
    """Probabilities over every class, zero for a class the training split lacked."""
    out = np.zeros((len(probabilities), classes), dtype)
    out[:, np.asarray(present, np.int64)] = probabilities
    return out


def shortfalls(model: Report, baselines: dict[str, Report]) -> list[str]:
    """Plain words for each baseline the model does not clearly beat."""
    found = []
    chance_level = 1.0 / len(model.classes)
    low_balanced = model.intervals.get(
        "balanced_accuracy", (model.balanced_accuracy, model.balanced_accuracy)
    )[0]
    low_auc = model.intervals.get("macro_auc", (model.macro_auc, model.macro_auc))[0]
    if not low_balanced > chance_level:
        found.append(
            f"its balanced accuracy ({model.balanced_accuracy:.3f}, interval from {low_balanced:.3f}) is not clearly above "
            f"{chance_level:.3f}, what answering one class every time or guessing scores"
        )
    if not low_auc > 0.5:
        found.append(
            f"its macro ROC AUC ({model.macro_auc:.3f}, interval from {low_auc:.3f}) is not clearly above 0.5, chance"
        )
    plain = baselines.get("plain ResNet18")
    if plain is not None and not model.balanced_accuracy > plain.balanced_accuracy:
        found.append(
            f"an untuned plain ResNet18 trained on the same split and epochs does as well or better (balanced accuracy {plain.balanced_accuracy:.3f})"
        )
    if plain is not None and np.isfinite(plain.macro_auc) and not model.macro_auc > plain.macro_auc:
        found.append(
            f"the plain ResNet18's macro ROC AUC is as high or higher ({plain.macro_auc:.3f} against {model.macro_auc:.3f})"
        )
    blocks = baselines.get("block statistics")
    if blocks is not None and not model.balanced_accuracy > blocks.balanced_accuracy:
        found.append(
            f"block statistics (no deep network, only the brightness and spread of 16 x 16 blocks) do as well or better (balanced accuracy {blocks.balanced_accuracy:.3f})"
        )
    return found


def section(model: Report, baselines: dict[str, Report], majority_class: str) -> list[str]:
    """The model card's comparison: a table, then a warning in words when there is one to give."""
    names = {
        "plain ResNet18": "plain ResNet18, untuned (cross-entropy, no augmentation, fixed learning rate, no search; same split and epochs)",
        "block statistics": "block statistics (mean and SD of 16 x 16 blocks, gradient boosting)",
        "majority": f'majority class (always "{majority_class}")',
        "chance": "chance (random scores)",
    }
    rows = [
        "| | accuracy | balanced accuracy | macro F1 | macro ROC AUC |",
        "|---|---|---|---|---|",
    ]
    for name, report in [("this model", model), *baselines.items()]:
        cells = [
            _cell(report, key) for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
        ]
        rows.append(f"| {names.get(name, name)} | " + " | ".join(cells) + " |")
    found = shortfalls(model, baselines)
    words = (
        [
            "**Warning: this model is not better than its baselines:** "
            + "; ".join(found)
            + ". Do not read its other figures as evidence that it learned."
        ]
        if found
        else []
    )
    saved = (
        [
            "The trained baselines' per-image test probabilities are in `scores_baselines.npz` (same images and order as "
            "`scores_test.npz`), so that each difference can be re-checked paired.",
            "",
        ]
        if {"plain ResNet18", "block statistics"} & set(baselines)
        else []
    )
    return ["## Against its baselines", "", *rows, "", *words, *([""] if words else []), *saved]


def _cell(report: Report, key: str) -> str:
    value = report.scalars()[key]
    low, high = report.intervals.get(key, (float("nan"), float("nan")))
    return f"{value:.3f}" + (f" ({low:.3f} to {high:.3f})" if np.isfinite(low) else "")
