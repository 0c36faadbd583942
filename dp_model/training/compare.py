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

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

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


def save_scores(
    path: Path,
    splits: dict[str, tuple[list[str], np.ndarray, np.ndarray]],
    train_counts: np.ndarray,
    tau: float,
    classes: Iterable[str],
    extra: dict | None = None,
) -> None:
    """Write one row and seed: for each split its hashed ids (16 hex digits as uint64), labels
    and log scores (float16, the precision every figure is computed at), the training counts
    (the prior of the logit adjustment), the chosen ``tau`` and the class names."""
    arrays: dict[str, np.ndarray] = {
        "train_counts": np.asarray(train_counts, np.int64),
        "tau": np.float64(tau),
        "classes": np.array(list(classes)),
    }
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
        return Scores(
            found[f"{split}_ids"],
            found[f"{split}_labels"].astype(np.int64),
            found[f"{split}_log_scores"].astype(np.float64),
            prior,
            float(found["tau"]),
        )


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


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "balanced_accuracy": balanced_accuracy,
    "macro_auc": macro_auc,
}


# --- choosing on validation -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class Selection:
    """What :func:`select` chose, on which split, and the chosen row's test figures."""

    chosen: str
    metric: str
    seeds: list[int]
    validation: dict[str, float]  # every candidate's mean validation metric
    test: dict[str, float]  # the chosen row's mean test figures, the only test figures looked at
    test_per_seed: dict[int, dict[str, float]] = field(default_factory=dict)


def select(
    candidates: dict[str, dict[int, Path]], metric: str = "balanced_accuracy", adjust: bool = True
) -> Selection:
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
    return Selection(
        chosen=chosen,
        metric=metric,
        seeds=seeds,
        validation=validation,
        test=test,
        test_per_seed=per_seed,
    )


# --- paired comparison ----------------------------------------------------------------------------------


def verdict(low: float, high: float, margin: float = MARGIN) -> str:
    """ "better" when the interval's lower end exceeds ``+margin``, "worse" when its upper end is
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


@dataclass(kw_only=True)
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
        return {
            "metric": self.metric,
            "difference": self.difference,
            "interval": list(self.interval),
            "images_only": list(self.images_only),
            "per_seed": {str(s): list(v) for s, v in self.per_seed.items()},
            "margin": self.margin,
            "verdict": self.verdict,
        }


def _paired_seed(
    a: np.ndarray,
    b: np.ndarray,
    labels: np.ndarray,
    metric: Callable,
    resamples: int,
    rng: np.random.Generator,
) -> tuple[float, np.ndarray]:
    """The difference on one seed's images and its bootstrap draws, the same images for both."""
    draws = np.empty(resamples)
    for r in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        draws[r] = metric(labels[index], a[index]) - metric(labels[index], b[index])
    return metric(labels, a) - metric(labels, b), draws


def _same_images(a: Scores, b: Scores) -> None:
    if (
        a.ids.shape != b.ids.shape
        or not np.array_equal(a.ids, b.ids)
        or not np.array_equal(a.labels, b.labels)
    ):
        raise ValueError(
            "a paired comparison needs the same images with the same labels in both rows"
        )


def paired(
    a: dict[int, Scores],
    b: dict[int, Scores],
    metric: str = "balanced_accuracy",
    margin: float = MARGIN,
    resamples: int = 1000,
    seed: int = 0,
    adjust: bool = True,
    min_seeds: int = MIN_SEEDS,
) -> Comparison:
    """Row ``a`` against row ``b`` on the test images of the seeds both have.

    Within a seed the two rows are scored on the same resampled images (paired). Combined: the
    mean over seeds of the per-seed difference, with the two-level interval (seeds, then
    images) deciding the verdict; with fewer than ``min_seeds`` seeds it is "not resolved".
    """
    seeds = sorted(set(a) & set(b))
    for s in seeds:
        _same_images(a[s], b[s])
    values = {
        s: (a[s].probabilities(adjust), b[s].probabilities(adjust), a[s].labels) for s in seeds
    }
    return _combine(values, METRICS[metric], metric, margin, resamples, seed, min_seeds)


def class_mean(labels: np.ndarray, hits: np.ndarray) -> float:
    """The share of hits within each class, averaged over the classes present (CIA-Net's "mean")."""
    return (
        float(np.mean([hits[labels == c].mean() for c in np.unique(labels)]))
        if len(labels)
        else float("nan")
    )


def paired_localization(
    a: dict[int, tuple[np.ndarray, np.ndarray]],
    b: dict[int, tuple[np.ndarray, np.ndarray]],
    threshold: float = 0.1,
    margin: float = MARGIN,
    resamples: int = 1000,
    seed: int = 0,
    min_seeds: int = MIN_SEEDS,
) -> Comparison:
    """Localization accuracy at IoU > ``threshold`` (class-averaged) of ``a`` minus ``b``, on the
    same boxed test images: seed -> ``(iou, labels)`` per boxed image, in the same order."""
    seeds = sorted(set(a) & set(b))
    values = {}
    for s in seeds:
        (iou_a, labels), (iou_b, labels_b) = a[s], b[s]
        if iou_a.shape != iou_b.shape or not np.array_equal(labels, labels_b):
            raise ValueError(
                "a paired comparison needs the same images with the same labels in both rows"
            )
        values[s] = (
            (np.asarray(iou_a) > threshold).astype(float),
            (np.asarray(iou_b) > threshold).astype(float),
            np.asarray(labels),
        )
    return _combine(
        values, class_mean, f"loc. IoU > {threshold}", margin, resamples, seed, min_seeds
    )


def _combine(
    values: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    metric: Callable,
    name: str,
    margin: float,
    resamples: int,
    seed: int,
    min_seeds: int,
) -> Comparison:
    """Per-seed paired bootstraps, then the images-only and the two-level combinations."""
    seeds = sorted(values)
    if not seeds:
        raise ValueError("the two rows share no seed")
    rng = np.random.default_rng(seed)
    found = {s: _paired_seed(*values[s], metric, resamples, rng) for s in seeds}
    per_seed = {s: (float(d), *_percentiles(draws)) for s, (d, draws) in found.items()}
    draws = np.stack([found[s][1] for s in seeds])  # (seeds, resamples)
    images_only = _percentiles(draws.mean(axis=0))
    picked_seeds = rng.integers(0, len(seeds), (resamples, len(seeds)))
    picked_draws = rng.integers(0, resamples, (resamples, len(seeds)))
    both = _percentiles(draws[picked_seeds, picked_draws].mean(axis=1))
    difference = float(np.mean([found[s][0] for s in seeds]))
    decided = verdict(*both, margin) if len(seeds) >= min_seeds else "not resolved"
    return Comparison(
        metric=name,
        difference=difference,
        interval=both,
        images_only=images_only,
        per_seed=per_seed,
        margin=margin,
        verdict=decided,
    )


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def scores_of(files: dict[int, Path], split: str = "test") -> dict[int, Scores]:
    """Seed -> the saved scores of one split."""
    return {s: load_scores(p, split) for s, p in files.items()}


# --- the protocol's report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a protocol report chooses and compares, by row name.

    Attributes:
        selections: the name of a choice -> the rows it chooses among on validation.
        ladder: rows that each add one thing to the one before (the paper's Table I).
        against: ``(a, b)`` pairs to compare; a name of ``selections`` stands for its chosen row.
        prior: the prior map's row, which every map is compared with.
        standing: rows shown beside the others in every table (majority, chance, block statistics).
    """

    selections: dict[str, tuple[str, ...]]
    ladder: tuple[str, ...]
    against: tuple[tuple[str, str], ...]
    prior: str
    standing: tuple[str, ...] = ()


def _files(results: list[dict], out: Path) -> dict[str, dict[int, Path]]:
    files: dict[str, dict[int, Path]] = {}
    for r in results:
        if r.get("scores"):
            files.setdefault(r["row"], {})[r["seed"]] = out / r["scores"]
    return files


def _complete(files: dict[str, dict[int, Path]], names: Iterable[str]) -> list[int]:
    """The seeds every named row has: a comparison uses whole seeds only."""
    sets = [set(files.get(n, {})) for n in names]
    return sorted(set.intersection(*sets)) if sets else []


def _ious(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as found:
        return found["test_iou"].astype(np.float64), found["test_iou_labels"].astype(np.int64)


def protocol_report(
    results_json: Path,
    plan: Plan,
    margin: float = MARGIN,
    resamples: int = 1000,
    min_seeds: int = MIN_SEEDS,
) -> dict:
    """Every selection on validation, then every paired comparison on test, from a results.json
    of ``dp-train ablation`` and the score files beside it; seeds missing a row are left out."""
    out = results_json.parent
    files = _files(json.loads(results_json.read_text())["results"], out)
    names = (
        {n for rows in plan.selections.values() for n in rows}
        | set(plan.ladder)
        | {n for pair in plan.against for n in pair if n not in plan.selections}
        | {plan.prior}
        | set(plan.standing)
    )
    seeds = _complete(files, names)
    files = {n: {s: p for s, p in by.items() if s in seeds} for n, by in files.items()}
    report: dict = {
        "margin": margin,
        "resamples": resamples,
        "min_seeds": min_seeds,
        "seeds": seeds,
        "selections": {},
        "rows": {},
        "comparisons": [],
    }
    for choice, candidates in plan.selections.items():
        found = select({n: files[n] for n in candidates})
        report["selections"][choice] = found.__dict__ | {
            "test_per_seed": {str(k): v for k, v in found.test_per_seed.items()}
        }
        files[choice] = files[found.chosen]
    # Test figures of the rows that are measured, not chosen among: the non-chosen candidates
    # of a selection show their validation figure only.
    for name in (*plan.standing, *plan.selections, *plan.ladder):
        report["rows"][name] = _row_figures(files[name])

    def compare(a: str, b: str) -> None:
        for metric in METRICS:
            found = paired(
                scores_of(files[a]),
                scores_of(files[b]),
                metric,
                margin,
                resamples,
                min_seeds=min_seeds,
            )
            report["comparisons"].append({"a": a, "b": b} | found.to_json())

    for before, after in zip(plan.ladder, plan.ladder[1:]):
        compare(after, before)
    for a, b in plan.against:
        compare(a, b)
    prior = {s: _ious(p) for s, p in files[plan.prior].items()}
    for name in plan.ladder:
        for threshold in (0.1, 0.3):
            found = paired_localization(
                {s: _ious(p) for s, p in files[name].items()},
                prior,
                threshold,
                margin,
                resamples,
                min_seeds=min_seeds,
            )
            report["comparisons"].append({"a": name, "b": plan.prior} | found.to_json())
    report["rows"][plan.prior] = {"localization": _located(prior)}
    return report


def _located(ious: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean over seeds of the class-averaged share of boxed test images above 0.1 and 0.3 IoU."""
    return {
        f"IoU > {t}": float(
            np.mean([class_mean(lab, (iou > t).astype(float)) for iou, lab in ious.values()])
        )
        for t in (0.1, 0.3)
    }


def _row_figures(files: dict[int, Path]) -> dict:
    """Mean over seeds: validation and test balanced accuracy (logit-adjusted), test macro AUC,
    the chosen taus."""
    val, test = scores_of(files, "val"), scores_of(files, "test")
    with np.load(next(iter(files.values()))) as first:
        located = (
            {"localization": _located({s: _ious(p) for s, p in files.items()})}
            if "test_iou" in first
            else {}
        )
    return located | {
        "validation_balanced_accuracy": float(
            np.mean([balanced_accuracy(v.labels, v.probabilities()) for v in val.values()])
        ),
        "balanced_accuracy": float(
            np.mean([balanced_accuracy(t.labels, t.probabilities()) for t in test.values()])
        ),
        "balanced_accuracy_unadjusted": float(
            np.mean([balanced_accuracy(t.labels, t.probabilities(False)) for t in test.values()])
        ),
        "macro_auc": float(
            np.mean([macro_auc(t.labels, t.probabilities()) for t in test.values()])
        ),
        "tau": [t.tau for t in test.values()],
    }


def protocol_markdown(report: dict) -> str:
    """The report as tables: the choices made on validation, then every paired difference."""
    margin = report["margin"]
    lines = [
        f"Seeds: {', '.join(map(str, report['seeds']))} ({len(report['seeds'])}). Margin: {margin}. "
        f"Intervals: 95 % percentile, {report['resamples']} paired resamples of seeds and of the test images within each seed.",
        "",
    ]
    lines += [
        "### Chosen on validation, measured once on test",
        "",
        "| choice | candidates (mean validation balanced accuracy, logit-adjusted) | chosen | test balanced accuracy | test macro ROC AUC |",
        "|---|---|---|---|---|",
    ]
    for choice, found in report["selections"].items():
        candidates = "; ".join(f"{n}: {v:.3f}" for n, v in found["validation"].items())
        lines.append(
            f"| {choice} | {candidates} | {found['chosen']} | {found['test']['balanced_accuracy']:.3f} | {found['test']['macro_auc']:.3f} |"
        )
    lines += [
        "",
        "### Every row: validation figure, test figures",
        "",
        "| row | validation balanced accuracy (logit-adjusted) | test balanced accuracy (logit-adjusted) | without the adjustment | test macro ROC AUC | loc. IoU > 0.1 | loc. IoU > 0.3 | tau chosen (range over seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        located = row.get("localization", {})
        figures = [
            row.get(k)
            for k in (
                "validation_balanced_accuracy",
                "balanced_accuracy",
                "balanced_accuracy_unadjusted",
                "macro_auc",
            )
        ] + [located.get("IoU > 0.1"), located.get("IoU > 0.3")]
        taus = row.get("tau")
        cells = [f"{v:.3f}" if v is not None and np.isfinite(v) else "n/a" for v in figures] + [
            f"{min(taus):+.2f} to {max(taus):+.2f}" if taus else "n/a"
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Paired differences (a − b) on the test images",
        "",
        "| a | b | metric | difference | 95 % interval (seeds and images) | images only | seeds where a > b | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        ahead = sum(v[0] > 0 for v in c["per_seed"].values())
        lines.append(
            f"| {c['a']} | {c['b']} | {c['metric'].replace('_', ' ')} | {c['difference']:+.3f} | {c['interval'][0]:+.3f} to {c['interval'][1]:+.3f} | "
            f"{c['images_only'][0]:+.3f} to {c['images_only'][1]:+.3f} | {ahead} of {len(c['per_seed'])} | **{c['verdict']}** |"
        )
    return "\n".join(lines) + "\n"


def pairs_report(
    results_json: Path,
    pairs: Iterable[tuple[str, str]],
    margin: float = MARGIN,
    resamples: int = 1000,
    min_seeds: int = MIN_SEEDS,
) -> dict:
    """Named pairs of rows compared on the test images of every seed the two rows share.

    The protocol's report (:func:`protocol_report`) cuts every row to the seeds all of its rows
    have; a run stopped part-way leaves some rows with more seeds than others, and a named pair
    here keeps all of its own. Nothing is chosen: both rows are named, so no test figure takes
    part in a choice."""
    out = results_json.parent
    files = _files(json.loads(results_json.read_text())["results"], out)
    report: dict = {
        "margin": margin,
        "resamples": resamples,
        "min_seeds": min_seeds,
        "comparisons": [],
    }
    for a, b in pairs:
        for name in (a, b):
            if name not in files:
                raise ValueError(f"no row named {name!r} with saved scores in {results_json}")
        for metric in METRICS:
            found = paired(
                scores_of(files[a]),
                scores_of(files[b]),
                metric,
                margin,
                resamples,
                min_seeds=min_seeds,
            )
            # What the interval alone says, shown beside the verdict: with fewer seeds than the
            # protocol asks the verdict stays "not resolved" whatever the interval.
            report["comparisons"].append(
                {"a": a, "b": b}
                | found.to_json()
                | {"interval_alone": verdict(*found.interval, margin)}
            )
    return report


def pairs_markdown(report: dict) -> str:
    """:func:`pairs_report` as one table, with the seeds each pair shares."""
    lines = [
        f"Margin: {report['margin']}. Intervals: 95 % percentile, {report['resamples']} paired resamples of seeds and of the test images within each seed; "
        f"a verdict needs {report['min_seeds']} seeds.",
        "",
        f"| a | b | metric | seeds | difference | 95 % interval (seeds and images) | images only | seeds where a > b | verdict | the interval alone at ±{report['margin']} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        ahead = sum(v[0] > 0 for v in c["per_seed"].values())
        lines.append(
            f"| {c['a']} | {c['b']} | {c['metric'].replace('_', ' ')} | {', '.join(c['per_seed'])} | {c['difference']:+.3f} | "
            f"{c['interval'][0]:+.3f} to {c['interval'][1]:+.3f} | {c['images_only'][0]:+.3f} to {c['images_only'][1]:+.3f} | "
            f"{ahead} of {len(c['per_seed'])} | **{c['verdict']}** | {c['interval_alone']} |"
        )
    return "\n".join(lines) + "\n"
