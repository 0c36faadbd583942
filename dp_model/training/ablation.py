"""The paper's Table I (ablation) and Table II (baselines), and the four seed systems side by
side, measured on one dataset with several seeds.

Table I adds the four techniques to a plain ResNet18 one at a time: contrastive
pre-training, mask-guided attention, feature contrastive regulation, class-balanced focal
loss. Table II compares ResNet18, ResNet50 and VGG16 (from scratch, cross-entropy) and
five scikit-learn classifiers on downsampled pixels with the full Deep Pneumonia recipe.
Every row reports accuracy (the paper's metric), balanced accuracy and macro-F1 on the same
test split, and its training time; a row's time includes the stage I it starts from.

The systems table compares Deep Pneumonia, the attention-enhanced ResNet-50, class-based
attention and CIA-Net, adding the macro ROC AUC and the localization accuracy at CIA-Net's
IoU thresholds (every network's own map of the true class, see
:func:`~dp_model.networks.explain.localization_maps`). ``data.boxed_fraction`` below 1 trains every
row with boxes on only part of the images, which is the supervision CIA-Net is built for.
The "cia" table is CIA-Net's own ablation: negative sampling (its Table 5) and the
alignment module (its Table 6).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from ..datasets import read_dataset
from ..datasets.splits import hashed_id
from ..metrics import IOU_THRESHOLDS, evaluate
from . import baselines, compare
from .config import (
    STRONG_AUGMENTATION,
    AugmentConfig,
    CIAConfig,
    ClassAttentionConfig,
    LossConfig,
    MGACRConfig,
    TrainConfig,
)
from .data import Resident, keep_boxes, load_split, make_splits
from .engine import finetune, pretrain
from .evaluation import predict, prior_ious, prior_maps, region_ious
from .objectives import normal_index
from .runtime import Runtime, make_runtime

logger = logging.getLogger(__name__)

OFF = MGACRConfig(attention=False, feature_cr=False)
CE = LossConfig(kind="ce")


@dataclass(frozen=True)
class Row:
    """One configuration of the comparison."""

    name: str
    table: str
    _: KW_ONLY
    pretrain: bool = False
    mgacr: MGACRConfig = OFF
    loss: LossConfig = CE
    architecture: str = "resnet18"
    sklearn: str = ""
    cia: CIAConfig | None = None  # None: the configuration's
    #: "plain" (:func:`baselines.plain_recipe`), "tuned" (:func:`baselines.tuned_plain_recipe`
    #: with the row's augmentation), "majority", "chance", "block" (block statistics) or "prior"
    #: (the prior map); "" for the row's own recipe.
    baseline: str = ""
    augment: AugmentConfig | None = None  # None: the configuration's
    class_attention: ClassAttentionConfig | None = None  # None: the configuration's

    def key(self, config: TrainConfig) -> tuple:
        """What the row trains under ``config``; rows with the same key (in several tables, or a
        variant whose option the configuration already has) are trained once per seed."""
        # A tuned plain row is its recipe and nothing else: the same training as Table I's first
        # row when its augmentation is the configuration's.
        return (
            self.pretrain,
            self.sklearn,
            "" if self.baseline == "tuned" else self.baseline,
            _recipe(self, config),
        )


#: What every other row must beat (the model card shows the same three).
BASELINES = (
    Row("Plain ResNet18 (CE, no augmentation, fixed rate)", "baselines", baseline="plain"),
    Row("Majority class", "baselines", baseline="majority"),
    Row("Chance (random scores)", "baselines", baseline="chance"),
)
#: The light augmentation the options table measured: small crops and rotations, mild intensity
#: changes, no blur or noise. It is also ``AugmentConfig``'s default now (a test pins the two).
LIGHT_AUGMENTATION = AugmentConfig(
    crop_scale=(0.85, 1.0),
    crop_ratio=(0.9, 1.1),
    rotate_degrees=5.0,
    gamma=(0.9, 1.1),
    contrast=(0.9, 1.1),
    brightness=0.04,
    blur_prob=0.0,
    noise_prob=0.0,
)
TABLE_I = (
    Row("ResNet18", "I"),
    Row("+ contrastive pre-training", "I", pretrain=True),
    Row("+ mask-guided attention", "I", pretrain=True, mgacr=MGACRConfig(feature_cr=False)),
    Row("+ feature contrastive regulation", "I", pretrain=True, mgacr=MGACRConfig()),
    Row(
        "+ CB focal loss (Deep Pneumonia)",
        "I",
        pretrain=True,
        mgacr=MGACRConfig(),
        loss=LossConfig(),
    ),
)
TABLE_II = (
    Row("KNN", "II", sklearn="knn"),
    Row("Decision tree", "II", sklearn="tree"),
    Row("AdaBoost", "II", sklearn="adaboost"),
    Row("Random forest", "II", sklearn="forest"),
    Row("SVM (polynomial)", "II", sklearn="svm"),
    Row("VGG16", "II", architecture="vgg16"),
    Row("ResNet50", "II", architecture="resnet50"),
    # The other seed systems, as variants in the same framework.
    Row(
        "Attention-enhanced ResNet-50",
        "II",
        architecture="attention_resnet50",
        loss=LossConfig(kind="sqrt_focal", gamma=2.0),
    ),
)
SYSTEMS = (
    Row("Deep Pneumonia", "systems", pretrain=True, mgacr=MGACRConfig(), loss=LossConfig()),
    Row(
        "Attention-enhanced ResNet-50",
        "systems",
        architecture="attention_resnet50",
        loss=LossConfig(kind="sqrt_focal", gamma=2.0),
    ),
    Row("Class-based attention", "systems", pretrain=True, architecture="class_attention"),
    Row("CIA-Net", "systems", pretrain=True, architecture="cia_net"),
)
CIA_ABLATION = (
    Row("CIA-Net", "cia", pretrain=True, architecture="cia_net"),
    Row(
        "CIA-Net, random negatives",
        "cia",
        pretrain=True,
        architecture="cia_net",
        cia=CIAConfig(negative_sampling="random"),
    ),
    Row(
        "CIA-Net, canonical chest as negative",
        "cia",
        pretrain=True,
        architecture="cia_net",
        cia=CIAConfig(negative_sampling="canonical"),
    ),
    Row(
        "CIA-Net without alignment",
        "cia",
        pretrain=True,
        architecture="cia_net",
        cia=CIAConfig(alignment=False),
    ),
)
#: The corrected variants of the papers' choices (docs/decisions.md), each beside the paper's.
OPTIONS = (
    Row(
        "Deep Pneumonia, Eq. 5 with detached maps",
        "options",
        pretrain=True,
        mgacr=MGACRConfig(feature_form="detached"),
        loss=LossConfig(),
    ),
    Row(
        "Deep Pneumonia, MGACR relative to the loss",
        "options",
        pretrain=True,
        mgacr=MGACRConfig(relative=True),
        loss=LossConfig(),
    ),
    Row(
        "Deep Pneumonia, light augmentation",
        "options",
        pretrain=True,
        mgacr=MGACRConfig(),
        loss=LossConfig(),
        augment=LIGHT_AUGMENTATION,
    ),
    Row(
        "Class-based attention, balanced c_i",
        "options",
        pretrain=True,
        architecture="class_attention",
        class_attention=ClassAttentionConfig(class_weights="balanced"),
    ),
)
#: The plain ResNet18 with the search the system gets: each augmentation the system's recipe was
#: chosen from, the system's cosine schedule and epochs; the protocol picks one on validation.
PLAIN_SEARCH = tuple(
    Row(f"Plain ResNet18, {name} augmentation, cosine", "plain", baseline="tuned", augment=augment)
    for name, augment in baselines.PLAIN_AUGMENTATIONS.items()
)
#: The rows that stand in every table of the protocol: what answers without learning, what
#: learns without depth, and for localization what ignores the image.
STANDING = (
    Row("Majority class", "standing", baseline="majority"),
    Row("Chance (random scores)", "standing", baseline="chance"),
    Row("Block statistics (16 x 16 mean and SD, gradient boosting)", "standing", baseline="block"),
    Row("Prior map (each class's mean training box)", "standing", baseline="prior"),
)
#: The system's other recipe: the augmentation it was chosen against.
SYSTEM_SEARCH = (
    Row(
        "Deep Pneumonia, strong augmentation",
        "search",
        pretrain=True,
        mgacr=MGACRConfig(),
        loss=LossConfig(),
        augment=STRONG_AUGMENTATION,
    ),
)
#: What the protocol chooses on validation (:func:`~dp_model.training.compare.select`): the
#: name of the choice -> the rows it chooses among.
SELECTIONS = {
    "Plain ResNet18, tuned on validation": tuple(r.name for r in PLAIN_SEARCH),
    "Deep Pneumonia, tuned on validation": (TABLE_I[-1].name, SYSTEM_SEARCH[0].name),
}
#: The protocol's report on Table I (:func:`~dp_model.training.compare.protocol_report`): the
#: choices above, each step of Table I against the one before, the full system against the
#: plain network and the tuned systems against each other and the block statistics, every map
#: against the prior map.
PROTOCOL = compare.Plan(
    SELECTIONS,
    tuple(r.name for r in TABLE_I),
    (
        (TABLE_I[-1].name, TABLE_I[0].name),
        ("Deep Pneumonia, tuned on validation", "Plain ResNet18, tuned on validation"),
        ("Deep Pneumonia, tuned on validation", STANDING[2].name),
        ("Plain ResNet18, tuned on validation", STANDING[2].name),
    ),
    STANDING[3].name,
    tuple(r.name for r in STANDING[:3]),
)
TABLES = {
    "baselines": BASELINES,
    "plain": PLAIN_SEARCH,
    "standing": STANDING,
    "I": TABLE_I,
    "search": SYSTEM_SEARCH,
    "II": TABLE_II,
    "systems": SYSTEMS,
    "cia": CIA_ABLATION,
    "options": OPTIONS,
}


@dataclass(kw_only=True)
class Result:
    row: str
    table: str
    seed: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    minutes: float
    extra: dict = field(default_factory=dict)
    macro_auc: float = float("nan")
    localization: list[float] = field(default_factory=list)  # mean over classes, at IOU_THRESHOLDS
    #: The same scalars on the validation split, which every choice is made on.
    validation: dict = field(default_factory=dict)
    #: The post-hoc logit adjustment: ``tau`` chosen on validation, and the scalars after it on
    #: ``validation`` and ``test`` (ROC AUC does not move: the adjustment keeps every ranking).
    adjusted: dict = field(default_factory=dict)
    #: The per-image scores of both splits, relative to results.json (:func:`compare.save_scores`).
    scores: str = ""


def run(
    config: TrainConfig,
    out: str | Path,
    seeds: list[int],
    tables: str = "all",
    sklearn_pixels: int = 32,
    svm_limit: int = 5000,
    by_seed: bool = False,
) -> list[Result]:
    """Train every row of ``tables`` ("all", or names of :data:`TABLES` joined by commas) for
    every seed; write ``results.json``, ``results.md``, ``results.png`` and every row's
    per-image scores (``scores/<row>_seed<N>.npz``) to ``out``.

    Row by row, every seed of a row before the next row (a comparison stopped early holds
    whole rows), or with ``by_seed`` every row of a seed before the next seed (a run stopped
    early holds whole seeds, which paired comparisons need)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(TABLES) if tables == "all" else tables.split(",")
    unknown = [t for t in chosen if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown table {unknown[0]!r}; tables are {', '.join(TABLES)} or all")
    rows = [r for t in chosen for r in TABLES[t]]
    runtime = make_runtime(config.runtime)
    dataset = read_dataset(config.data.root, config.data.layout)
    classes = list(dataset.classes)
    results: list[Result] = []
    # Each seed's split, training images and stage I encoder are kept for its other rows.
    per_seed: dict[int, dict] = {}
    done: dict[tuple, Result] = {}
    order = (
        [(row, seed) for seed in seeds for row in rows]
        if by_seed
        else [(row, seed) for row in rows for seed in seeds]
    )
    for row, seed in order:
        if by_seed:
            for finished in [s for s in per_seed if s != seed]:
                del per_seed[finished]  # whole seeds are done: free their images
        if seed not in per_seed:
            # No row calibrates or places operating points: the calibration images train, as before they existed.
            splits = make_splits(
                dataset, replace(config.data, calibration_fraction=0.0, calibration_images=0), seed
            )
            data = {
                k: load_split(dataset, getattr(splits, k), config.data, f"decode {k}")
                for k in ("train", "val", "test")
            }
            per_seed[seed] = {
                "data": data,
                "train": keep_boxes(data["train"], config.data.boxed_fraction, seed).to(
                    runtime.device
                ),
                "encoder": None,
                "minutes": 0.0,
            }
        state, key = per_seed[seed], (seed, row.key(config))
        if key in done:  # the same training under another name: its scores under this name too
            results.append(_renamed(done[key], row, out))
        else:
            results.append(
                _row(row, config, state, classes, runtime, seed, out, sklearn_pixels, svm_limit)
            )
        done[key] = results[-1]
        logger.info("seed %d, %s: %s", seed, row.name, results[-1])
        _write(out, results, config, plot=False)
    _write(out, results, config)
    return results


def _row(
    row: Row,
    config: TrainConfig,
    state: dict,
    classes: list[str],
    runtime: Runtime,
    seed: int,
    out: Path,
    sklearn_pixels: int,
    svm_limit: int,
) -> Result:
    """Train and measure one row on one seed."""
    finish = _Finisher(row, seed, classes, state["data"], out)
    if row.baseline in ("majority", "chance"):
        return _trivial_row(row, state["data"], classes, seed, finish)
    if row.baseline == "block":
        return _block_row(state["data"], classes, seed, finish)
    if row.baseline == "prior":
        return _prior_row(state["train"], state["data"]["test"], classes, finish)
    if row.sklearn:
        return _sklearn_row(row, state["data"], classes, seed, sklearn_pixels, svm_limit, finish)
    if row.pretrain and state["encoder"] is None:
        tick = time.perf_counter()
        state["encoder"] = pretrain(config.pretrain, state["train"], runtime, seed)
        state["minutes"] = (time.perf_counter() - tick) / 60
    encoder, minutes = (state["encoder"], state["minutes"]) if row.pretrain else (None, 0.0)
    return _network_row(
        row, config, state["train"], state["data"], classes, runtime, seed, encoder, minutes, finish
    )


def _recipe(row: Row, config: TrainConfig):
    """The stage II configuration a row trains with."""
    cfg = replace(
        config.finetune,
        architecture=row.architecture,
        mgacr=row.mgacr,
        loss=row.loss,
        cia=row.cia or config.finetune.cia,
        augment=row.augment or config.finetune.augment,
        class_attention=row.class_attention or config.finetune.class_attention,
    )
    if row.baseline == "tuned":
        return baselines.tuned_plain_recipe(cfg, cfg.augment)
    return baselines.plain_recipe(cfg) if row.baseline == "plain" else cfg


def _log_scores(probabilities: np.ndarray) -> np.ndarray:
    """Log scores at the saved precision (:func:`compare.rounded`); 1e-12 stands for zero."""
    return compare.rounded(np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, None)))


class _Finisher:
    """Turns a row's validation and test scores into its :class:`Result`: metrics on both
    splits, the logit adjustment chosen on validation, and the saved per-image scores."""

    def __init__(
        self, row: Row, seed: int, classes: list[str], data: dict[str, Resident], out: Path
    ) -> None:
        self.row, self.seed, self.classes, self.data, self.out = row, seed, classes, data, out
        self.counts = np.bincount(data["train"].labels.cpu().numpy(), minlength=len(classes))

    def path(self, row: Row) -> Path:
        return Path("scores") / f"{compare.slug(row.table + ' ' + row.name)}_seed{self.seed}.npz"

    def __call__(
        self,
        val: np.ndarray,
        test: np.ndarray,
        minutes: float,
        located: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Result:
        names = tuple(self.classes)
        val_log, test_log = _log_scores(val), _log_scores(test)
        val_labels, test_labels = (self.data[k].labels.cpu().numpy() for k in ("val", "test"))
        prior = self.counts / max(1, self.counts.sum())
        tau = baselines.choose_tau(val_log, val_labels, prior)
        report = evaluate(test_labels, np.exp(test_log), names, bootstrap=1000, seed=self.seed)
        checked = evaluate(val_labels, np.exp(val_log), names).scalars()
        # No interval here: differences between rows are judged by compare.paired on the saved scores.
        after = evaluate(test_labels, baselines.adjusted(test_log, prior, tau), names)
        adjusted = {
            "tau": tau,
            "validation": evaluate(
                val_labels, baselines.adjusted(val_log, prior, tau), names
            ).scalars(),
            "test": after.scalars(),
            "recall": after.per_class["recall"],
        }
        splits = {
            k: ([hashed_id(i) for i in self.data[k].ids], labels, scores)
            for k, labels, scores in (("val", val_labels, val_log), ("test", test_labels, test_log))
        }
        extra = (
            {
                "test_iou": np.asarray(located[0], np.float16),
                "test_iou_labels": np.asarray(located[1], np.int8),
            }
            if located is not None
            else {}
        )
        compare.save_scores(self.out / self.path(self.row), splits, self.counts, tau, names, extra)
        located_mean = _located(*located, len(names)) if located is not None else []
        result = _result(self.row, self.seed, report, minutes, located_mean)
        result.validation, result.adjusted, result.scores = (
            checked,
            adjusted,
            str(self.path(self.row)),
        )
        return result


def _renamed(found: Result, row: Row, out: Path) -> Result:
    """A result trained once and shown under another row's name, its scores file copied."""
    result = replace(found, row=row.name, table=row.table)
    if found.scores:
        target = Path("scores") / (
            compare.slug(row.table + " " + row.name) + f"_seed{found.seed}.npz"
        )
        (out / target).write_bytes((out / found.scores).read_bytes())
        result.scores = str(target)
    return result


def _located(iou: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """Mean over the classes with boxed images of the share with IoU above each of
    :data:`IOU_THRESHOLDS` (the "mean" of :func:`~dp_model.metrics.localization_accuracy`)."""
    present = [c for c in range(num_classes) if (labels == c).any()]
    if not present:
        return []
    return [
        float(np.mean([(iou[labels == c] > t).mean() for c in present])) for t in IOU_THRESHOLDS
    ]


def _network_row(
    row: Row,
    config: TrainConfig,
    train_data: Resident,
    data: dict,
    classes: list[str],
    runtime: Runtime,
    seed: int,
    encoder,
    encoder_minutes: float,
    finish: _Finisher,
) -> Result:
    tick = time.perf_counter()
    cfg = _recipe(row, config)
    normal = normal_index(classes)

    def validate(model, split: Resident) -> dict[str, float]:
        return evaluate(
            split.labels.cpu().numpy(),
            predict(model, split, runtime, normal=normal),
            tuple(classes),
        ).scalars()

    result = finetune(
        cfg, train_data, data["val"], classes, runtime, seed, encoder=encoder, evaluate=validate
    )
    minutes = encoder_minutes + (time.perf_counter() - tick) / 60
    model = result.model
    model.load_state_dict(result.best_state)
    model.to(runtime.device)
    val, test = (predict(model, data[k], runtime, normal=normal) for k in ("val", "test"))
    return finish(val, test, minutes, region_ious(model, data["test"].to(runtime.device), normal))


def _trivial_row(row: Row, data: dict, classes: list[str], seed: int, finish: _Finisher) -> Result:
    counts = np.bincount(data["train"].labels.numpy(), minlength=len(classes))
    rng = np.random.default_rng(seed)

    def scores(n: int) -> np.ndarray:
        if row.baseline == "majority":  # always the training split's most frequent class
            return np.eye(len(classes))[np.full(n, counts.argmax())]
        return rng.dirichlet(np.ones(len(classes)), size=n)  # random scores, fixed by the seed

    return finish(scores(len(data["val"])), scores(len(data["test"])), 0.0)


def _block_row(data: dict, classes: list[str], seed: int, finish: _Finisher) -> Result:
    tick = time.perf_counter()
    numpy = {
        k: (data[k].images.cpu().numpy(), data[k].labels.cpu().numpy())
        for k in ("train", "val", "test")
    }
    val, test, params = baselines.tile_statistics(
        numpy["train"], numpy["val"], numpy["test"][0], len(classes), seed
    )
    result = finish(val, test, (time.perf_counter() - tick) / 60)
    result.extra["chosen_on_validation"] = params
    return result


def _prior_row(train: Resident, test: Resident, classes: list[str], finish: _Finisher) -> Result:
    """The prior map localizes; it does not classify (its class scores are uniform, chance)."""
    tick = time.perf_counter()
    located = prior_ious(prior_maps(train.to("cpu"), len(classes)), test.to("cpu"))
    uniform = {
        k: np.full((len(finish.data[k]), len(classes)), 1.0 / len(classes)) for k in ("val", "test")
    }
    result = finish(uniform["val"], uniform["test"], (time.perf_counter() - tick) / 60, located)
    nan = float("nan")
    return replace(
        result,
        accuracy=nan,
        balanced_accuracy=nan,
        macro_f1=nan,
        macro_auc=nan,
        extra={},
        validation={},
        adjusted={},
    )


def _result(row: Row, seed: int, report, minutes: float, located: list[float]) -> Result:
    extra = {
        "classes": list(report.classes),
        "recall": report.per_class["recall"],
        "auc": report.per_class["auc"],
        "intervals": {
            k: report.intervals[k]
            for k in ("balanced_accuracy", "macro_auc")
            if k in report.intervals
        },
    }
    return Result(
        row=row.name,
        table=row.table,
        seed=seed,
        accuracy=report.accuracy,
        balanced_accuracy=report.balanced_accuracy,
        macro_f1=report.macro_f1,
        minutes=minutes,
        extra=extra,
        macro_auc=report.macro_auc,
        localization=located,
    )


def _pixels(data: Resident, side: int) -> np.ndarray:
    x = data.images.float().div(255)
    return F.adaptive_avg_pool2d(x, side).flatten(1).numpy()


def _sklearn_row(
    row: Row,
    data: dict,
    classes: list[str],
    seed: int,
    side: int,
    svm_limit: int,
    finish: _Finisher,
) -> Result:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.decomposition import PCA
    from sklearn.ensemble import AdaBoostClassifier, RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    tick = time.perf_counter()
    x_train, y_train = _pixels(data["train"], side), data["train"].labels.numpy()
    models = {
        "knn": lambda: make_pipeline(PCA(64, random_state=seed), KNeighborsClassifier(5)),
        "tree": lambda: DecisionTreeClassifier(random_state=seed),
        "adaboost": lambda: AdaBoostClassifier(random_state=seed),
        "forest": lambda: RandomForestClassifier(300, n_jobs=-1, random_state=seed),
        "svm": lambda: CalibratedClassifierCV(
            SVC(kernel="poly", degree=3, random_state=seed), ensemble=False
        ),
    }
    if row.sklearn == "svm" and len(x_train) > svm_limit:
        # kernel SVMs grow with the square of the data
        keep = np.random.default_rng(seed).choice(len(x_train), svm_limit, replace=False)
        x_train, y_train = x_train[keep], y_train[keep]
    model = models[row.sklearn]().fit(x_train, y_train)
    scores = {}
    for k in ("val", "test"):
        scores[k] = np.zeros((len(data[k]), len(classes)))
        scores[k][:, model.classes_] = model.predict_proba(_pixels(data[k], side))
    return finish(scores["val"], scores["test"], (time.perf_counter() - tick) / 60)


def summarise(results: list[Result]) -> list[dict]:
    """Mean and standard deviation over seeds of every row, in table order, with the mean of
    the seeds' 95 % bootstrap intervals and the mean recall of each class."""
    out = []
    for table, name in dict.fromkeys((r.table, r.row) for r in results):
        chosen = [r for r in results if (r.table, r.row) == (table, name)]
        entry = {"row": name, "table": chosen[0].table, "seeds": [r.seed for r in chosen]}
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "minutes"):
            values = np.array([getattr(r, metric) for r in chosen])
            entry[metric] = (
                float(values.mean()),
                float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            )
        for metric in ("balanced_accuracy", "macro_auc"):
            bounds = [r.extra.get("intervals", {}).get(metric) for r in chosen]
            if all(b is not None for b in bounds):
                entry[f"{metric}_interval"] = tuple(
                    float(v) for v in np.mean(np.array(bounds, dtype=float), axis=0)
                )
        if all("recall" in r.extra and "classes" in r.extra for r in chosen):
            entry["classes"] = chosen[0].extra["classes"]
            entry["recall"] = np.nanmean(
                np.array([r.extra["recall"] for r in chosen], dtype=float), axis=0
            ).tolist()
        if all(r.validation for r in chosen):
            values = np.array([r.validation["balanced_accuracy"] for r in chosen])
            entry["validation_balanced_accuracy"] = (
                float(values.mean()),
                float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            )
        if all(r.adjusted for r in chosen):
            values = np.array([r.adjusted["test"]["balanced_accuracy"] for r in chosen])
            entry["adjusted_balanced_accuracy"] = (
                float(values.mean()),
                float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            )
            entry["tau"] = [r.adjusted["tau"] for r in chosen]
        if all(r.localization for r in chosen):
            values = np.array([r.localization for r in chosen])
            entry["localization"] = (
                values.mean(axis=0).tolist(),
                (values.std(axis=0, ddof=1) if len(values) > 1 else 0 * values[0]).tolist(),
            )
        out.append(entry)
    return out


TITLES = {
    "baselines": "Baselines: what every row must beat",
    "plain": "The plain ResNet18 with the system's search (chosen on validation by the protocol)",
    "standing": "Standing rows: no learning, no depth, no image",
    "I": "Table I: ablation on ResNet18",
    "II": "Table II: other methods",
    "systems": "The four systems",
    "cia": "CIA-Net: negative sampling and alignment",
    "search": "The system's other recipe (chosen on validation by the protocol)",
    "options": "The corrected variants",
}


def markdown(summary: list[dict]) -> str:
    """One table per comparison: mean ± sd over seeds, the seeds' mean 95 % bootstrap interval,
    localization where maps exist, then every row's mean recall per class."""
    lines = []
    # ResNet18 and Deep Pneumonia appear in both tables
    anchors = {TABLE_I[0].name, TABLE_I[-1].name}
    shown = (0.1, 0.3, 0.5, 0.7)
    for table, title in TITLES.items():
        rows = [
            e
            for e in summary
            if e["table"] == table
            or (
                table == "II"
                and e["row"] in anchors
                and e["table"] == "I"
                and any(x["table"] == "II" for x in summary)
            )
        ]
        if not rows:
            continue
        located = any(e.get("localization") for e in rows)
        protocol = any(e.get("validation_balanced_accuracy") for e in rows)
        head = [
            "method",
            "accuracy",
            "balanced accuracy",
            "its 95 % interval",
            "macro-F1",
            "macro ROC AUC",
            "its 95 % interval",
        ]
        head += (
            ["val. balanced accuracy", "balanced accuracy, logit-adjusted (tau on val.)"]
            if protocol
            else []
        )
        head += [f"loc. acc. T(IoU) {t}" for t in shown] if located else []
        lines += [
            f"### {title}",
            "",
            "| " + " | ".join(head + ["training minutes", "seeds"]) + " |",
            "|---" * (len(head) + 2) + "|",
        ]
        for e in rows:
            cells = [
                _spread(e.get("accuracy")),
                _spread(e.get("balanced_accuracy")),
                _interval(e, "balanced_accuracy"),
                _spread(e.get("macro_f1")),
                _spread(e.get("macro_auc")),
                _interval(e, "macro_auc"),
            ]
            cells += (
                [
                    _spread(e.get("validation_balanced_accuracy")),
                    _spread(e.get("adjusted_balanced_accuracy")),
                ]
                if protocol
                else []
            )
            if located:
                loc = e.get("localization")
                cells += [
                    f"{loc[0][IOU_THRESHOLDS.index(t)]:.2f} ± {loc[1][IOU_THRESHOLDS.index(t)]:.2f}"
                    if loc
                    else "n/a"
                    for t in shown
                ]
            lines.append(
                f"| {e['row']} | "
                + " | ".join(cells)
                + f" | {e['minutes'][0]:.2f} | {len(e['seeds'])} |"
            )
        lines.append("")
    with_recall = [e for e in summary if e.get("recall")]
    if with_recall:
        classes = with_recall[0]["classes"]
        lines += [
            "### Recall of each class (mean over seeds)",
            "",
            "| method | " + " | ".join(classes) + " |",
            "|---" * (len(classes) + 1) + "|",
        ]
        for e in {e["row"]: e for e in with_recall}.values():
            lines.append(f"| {e['row']} | " + " | ".join(f"{v:.2f}" for v in e["recall"]) + " |")
        lines.append("")
    return "\n".join(lines)


def _spread(value: tuple[float, float] | None) -> str:
    """``mean ± sd``, or n/a for a figure a row does not have (the prior map classifies nothing)."""
    return (
        f"{value[0]:.3f} ± {value[1]:.3f}" if value is not None and np.isfinite(value[0]) else "n/a"
    )


def _interval(entry: dict, metric: str) -> str:
    bounds = entry.get(f"{metric}_interval")
    return f"{bounds[0]:.3f} to {bounds[1]:.3f}" if bounds else "n/a"


def _write(out: Path, results: list[Result], config: TrainConfig, plot: bool = True) -> None:
    """results.json and results.md after every row (a stopped run keeps its rows), the plots at the end."""
    summary = summarise(results)
    (out / "results.json").write_text(
        json.dumps({"results": [r.__dict__ for r in results], "summary": summary}, indent=2) + "\n"
    )
    (out / "results.md").write_text(markdown(summary) + "\n")
    if not plot:
        return
    _plot(summary, out / "results.png")
    systems = [e for e in summary if e["table"] in ("systems", "cia", "options")]
    if systems:
        _plot_systems(systems, out / "systems.png")


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["row"] for e in summary]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 1.8))
    y = np.arange(len(names))
    for offset, metric, colour in (
        (-0.2, "accuracy", "tab:blue"),
        (0.2, "balanced_accuracy", "tab:orange"),
    ):
        axes[0].barh(
            y + offset,
            [e[metric][0] for e in summary],
            0.38,
            xerr=[e[metric][1] for e in summary],
            color=colour,
            label=metric.replace("_", " "),
        )
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].set(xlim=(0, 1), xlabel="test score (mean ± sd over seeds)")
    axes[0].legend(loc="lower right", fontsize=8)
    for e in summary:
        axes[1].errorbar(
            e["minutes"][0], e["balanced_accuracy"][0], yerr=e["balanced_accuracy"][1], fmt="o"
        )
        axes[1].annotate(
            e["row"],
            (e["minutes"][0], e["balanced_accuracy"][0]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    axes[1].set(
        xlabel="training minutes",
        ylabel="balanced accuracy",
        title="accuracy against training time (cf. the paper's Fig. 7)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_systems(summary: list[dict], path: Path) -> None:
    """Scores of the systems side by side, and their localization accuracy against the IoU threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["row"] for e in summary]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(names) + 2.6))
    y = np.arange(len(names))
    for offset, metric, colour in (
        (-0.27, "accuracy", "tab:blue"),
        (0.0, "balanced_accuracy", "tab:orange"),
        (0.27, "macro_auc", "tab:green"),
    ):
        axes[0].barh(
            y + offset,
            [e[metric][0] for e in summary],
            0.26,
            xerr=[e[metric][1] for e in summary],
            color=colour,
            label=metric.replace("_", " "),
        )
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].axvline(0.5, color="grey", linewidth=0.6, linestyle=":")
    axes[0].set(xlim=(0, 1), xlabel="test score (mean ± sd over seeds)")
    axes[0].legend(loc="lower right", fontsize=8)
    for e in summary:
        if e.get("localization"):
            mean, sd = (np.array(v) for v in e["localization"])
            axes[1].errorbar(IOU_THRESHOLDS, mean, yerr=sd, marker="o", capsize=2, label=e["row"])
    axes[1].set(xlabel="T(IoU)", ylabel="share of boxed test images localized", ylim=(0, 1))
    axes[1].set_title("localization accuracy (cf. CIA-Net's Tables 1-3)", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
