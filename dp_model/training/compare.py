"""The selection protocol: choose on validation, report test once, compare with paired intervals.

Every row of a comparison table (``dp-train ablation``) saves, per seed, the per-image scores of
its validation and test splits (``scores/<row>_seed<N>.npz``). From those alone:

* :func:`select` picks a recipe, option or default among candidate rows on the VALIDATION
  split (the mean over seeds of a metric) and returns the test figures of the chosen one only,
  so that no test figure can take part in a choice;
* :func:`paired` compares two rows image by image on the same test images: a percentile
  bootstrap of the difference (balanced accuracy, macro ROC AUC) over the images within each
  seed, and over seeds too, with a verdict at a stated margin (:func:`verdict`).

The seeds' intervals are combined by a two-level bootstrap: draw the seeds with replacement,
then each drawn seed's images with replacement, and average the seeds' differences. That
interval holds the test images' sampling and the training's seed-to-seed variation; an
interval over images alone (``images_only``, seeds held fixed) says only how sure the figure
is for these particular trained models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..metrics import roc_auc

#: The stated margin: a difference smaller than this is not worth a claim either way.
MARGIN = 0.02
#: Below this many seeds a seed bootstrap means little, and no verdict is given.
MIN_SEEDS = 5
SPLITS = ("val", "test")


@dataclass(frozen=True)
class Scores:
    """One split of one row and seed: hashed image ids, labels, and log class scores ``(N, C)``.

    ``log_scores`` are the logarithms of the scores the row's metrics use (a softmax network's
    log-probabilities); ``tau`` and ``prior`` give the post-hoc logit adjustment chosen on
    validation (:func:`~dp_model.training.baselines.adjusted`)."""

    ids: np.ndarray
    labels: np.ndarray
    log_scores: np.ndarray
    prior: np.ndarray | None = None
    tau: float = 0.0

    def probabilities(self, adjust: bool = True) -> np.ndarray:
        """The scores, logit-adjusted when ``adjust`` and a prior is known. Each class's column
        is divided by ``prior_c ** tau``, which changes the decisions (the argmax) and leaves
        every class's ranking, so its ROC AUC, as it was."""
        log = self.log_scores.astype(np.float64)
        if adjust and self.prior is not None and self.tau:
            log = log - self.tau * np.log(self.prior)
        return np.exp(log)


def save_scores(path: Path, splits: dict[str, tuple[list[str], np.ndarray, np.ndarray]], train_counts: np.ndarray, tau: float, classes: Iterable[str], extra: dict | None = None) -> None:
    """Write one row and seed: for each split its hashed ids (16 hex digits as uint64), labels
    and log scores (float16, the precision every figure is computed at), the training counts
    (the prior of the logit adjustment), the chosen ``tau`` and the class names."""
    arrays: dict[str, np.ndarray] = {"train_counts": np.asarray(train_counts, np.int64), "tau": np.float64(tau), "classes": np.array(list(classes))}
    for name, (ids, labels, log_scores) in splits.items():
        arrays[f"{name}_ids"] = np.array([int(i, 16) for i in ids], np.uint64)
        arrays[f"{name}_labels"] = np.asarray(labels, np.int8)
        arrays[f"{name}_log_scores"] = np.asarray(log_scores, np.float16)
    for key, value in (extra or {}).items():
        arrays[key] = np.asarray(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def rounded(log_scores: np.ndarray) -> np.ndarray:
    """Log scores at the precision they are saved with, so that every figure in results.json
    can be recomputed from the saved files exactly."""
    return np.asarray(log_scores, np.float16).astype(np.float64)


def load_scores(path: Path, split: str) -> Scores:
    """One split of a saved row and seed."""
    with np.load(path) as found:
        counts = found["train_counts"].astype(np.float64)
        prior = counts / counts.sum() if counts.sum() > 0 else None
        return Scores(found[f"{split}_ids"], found[f"{split}_labels"].astype(np.int64), found[f"{split}_log_scores"].astype(np.float64), prior, float(found["tau"]))


def slug(text: str) -> str:
    """A file name for a row: lower case, words joined by underscores."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# --- metrics on scores ----------------------------------------------------------------------------------


def balanced_accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean recall over the classes present."""
    predicted = probabilities.argmax(axis=1)
    present = np.unique(labels)
    return float(np.mean([(predicted[labels == c] == c).mean() for c in present]))


def macro_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """One-versus-rest ROC AUC averaged over the classes with positives and negatives."""
    values = [roc_auc(labels == c, probabilities[:, c]) for c in range(probabilities.shape[1])]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"balanced_accuracy": balanced_accuracy, "macro_auc": macro_auc}


# --- choosing on validation -----------------------------------------------------------------------------


@dataclass
class Selection:
    """What :func:`select` chose, on which split, and the chosen row's test figures."""

    chosen: str
    metric: str
    seeds: list[int]
    validation: dict[str, float]  # every candidate's mean validation metric
    test: dict[str, float]  # the chosen row's mean test figures, the only test figures looked at
    test_per_seed: dict[int, dict[str, float]] = field(default_factory=dict)


def select(candidates: dict[str, dict[int, Path]], metric: str = "balanced_accuracy", adjust: bool = True) -> Selection:
    """The candidate with the best mean VALIDATION ``metric`` over the seeds every candidate
    has (ties: the first named), then its test figures, computed once.

    Args:
        candidates: row name -> seed -> its saved scores (:func:`save_scores`).
        metric: a key of :data:`METRICS`.
        adjust: apply each row's logit adjustment (its ``tau`` was chosen on validation).
    """
    if not candidates:
        raise ValueError("no candidates to choose from")
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in candidates.values())))
    if not seeds:
        raise ValueError(f"the candidates {', '.join(candidates)} share no seed")
    validation = {}
    for name, by_seed in candidates.items():
        values = []
        for s in seeds:
            found = load_scores(by_seed[s], "val")
            values.append(METRICS[metric](found.labels, found.probabilities(adjust)))
        validation[name] = float(np.mean(values))
    chosen = max(validation, key=lambda n: (validation[n], -list(candidates).index(n)))
    per_seed = {}
    for s in seeds:
        found = load_scores(candidates[chosen][s], "test")
        per_seed[s] = {k: f(found.labels, found.probabilities(adjust)) for k, f in METRICS.items()}
    test = {k: float(np.mean([v[k] for v in per_seed.values()])) for k in METRICS}
    return Selection(chosen, metric, seeds, validation, test, per_seed)


# --- paired comparison ----------------------------------------------------------------------------------


def verdict(low: float, high: float, margin: float = MARGIN) -> str:
    """"better" when the interval's lower end exceeds ``+margin``, "worse" when its upper end is
    below ``-margin``, "level" when the whole interval lies within ``+-margin``, otherwise
    "not resolved" (the interval straddles a margin: more seeds or images are needed)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "not resolved"
    if low > margin:
        return "better"
    if high < -margin:
        return "worse"
    if -margin <= low and high <= margin:
        return "level"
    return "not resolved"


@dataclass
class Comparison:
    """``a - b`` of one metric: per seed and combined, with 95 % percentile intervals."""

    metric: str
    difference: float
    interval: tuple[float, float]  # seeds and images resampled
    images_only: tuple[float, float]  # seeds held fixed, images resampled within each
    per_seed: dict[int, tuple[float, float, float]]  # seed -> (difference, low, high)
    margin: float
    verdict: str

    def to_json(self) -> dict:
        return {"metric": self.metric, "difference": self.difference, "interval": list(self.interval), "images_only": list(self.images_only),
                "per_seed": {str(s): list(v) for s, v in self.per_seed.items()}, "margin": self.margin, "verdict": self.verdict}  # fmt: skip


def _paired_seed(a: Scores, b: Scores, metric: Callable, resamples: int, rng: np.random.Generator, adjust: bool) -> tuple[float, np.ndarray]:
    """The difference on one seed's images and its bootstrap draws, the same images for both."""
    if a.ids.shape != b.ids.shape or not np.array_equal(a.ids, b.ids) or not np.array_equal(a.labels, b.labels):
        raise ValueError("a paired comparison needs the same images with the same labels in both rows")
    pa, pb, labels = a.probabilities(adjust), b.probabilities(adjust), a.labels
    draws = np.empty(resamples)
    for r in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        draws[r] = metric(labels[index], pa[index]) - metric(labels[index], pb[index])
    return metric(labels, pa) - metric(labels, pb), draws


def paired(a: dict[int, Scores], b: dict[int, Scores], metric: str = "balanced_accuracy", margin: float = MARGIN, resamples: int = 1000,
           seed: int = 0, adjust: bool = True, min_seeds: int = MIN_SEEDS) -> Comparison:  # fmt: skip
    """Row ``a`` against row ``b`` on the test images of the seeds both have.

    Within a seed the two rows are scored on the same resampled images (paired). Combined: the
    mean over seeds of the per-seed difference, with the two-level interval (seeds, then
    images) deciding the verdict; with fewer than ``min_seeds`` seeds it is "not resolved".
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two rows share no seed")
    rng = np.random.default_rng(seed)
    found = {s: _paired_seed(a[s], b[s], METRICS[metric], resamples, rng, adjust) for s in seeds}
    per_seed = {s: (float(d), *_percentiles(draws)) for s, (d, draws) in found.items()}
    draws = np.stack([found[s][1] for s in seeds])  # (seeds, resamples)
    images_only = _percentiles(draws.mean(axis=0))
    picked_seeds = rng.integers(0, len(seeds), (resamples, len(seeds)))
    picked_draws = rng.integers(0, resamples, (resamples, len(seeds)))
    both = _percentiles(draws[picked_seeds, picked_draws].mean(axis=1))
    difference = float(np.mean([found[s][0] for s in seeds]))
    decided = verdict(*both, margin) if len(seeds) >= min_seeds else "not resolved"
    return Comparison(metric, difference, both, images_only, per_seed, margin, decided)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def scores_of(files: dict[int, Path], split: str = "test") -> dict[int, Scores]:
    """Seed -> the saved scores of one split."""
    return {s: load_scores(p, split) for s, p in files.items()}
