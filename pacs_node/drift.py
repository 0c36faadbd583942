"""Is the node still seeing the population its model was validated on? Rolling rates and a
distance between score distributions, per model version, as gauges of ``/metrics``.

Over the last ``drift_window`` images processed (:class:`Watch`, a subscriber of the node's
outcome events) the node exposes the fraction not assessed (turned away by the
out-of-distribution gate), positive and flagged for triage, and, where the bundle carries its
validation images' scores (``docs/scores_val.npz``, :func:`dp_model.serving.served.scores_path`), the
same fractions on those images and the Wasserstein-1 distance between the served probability of
pneumonia of the window's assessed images and the validation images' (:func:`wasserstein`), with
a bootstrap interval.

The alert threshold is the bundle's own, never a number chosen here: the
:data:`NULL_QUANTILE` quantile of the distance between random windows of ``drift_window``
validation images and the validation images themselves, both drawn again with replacement
(:func:`null_distances`: the two-sample bootstrap, so that the reference's own sampling noise
is in it as well as the window's). A population like the validation images crosses it in one
window out of a hundred; ``deploy/prometheus/rules.yml`` asks for it to stay crossed a while.
The bound of the not-assessed fraction is the same quantile over the same windows.

A bundle without the file exposes the rates alone (one INFO line at start); an unreadable file
is a WARNING, never a failure: watching must not stop the node.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dp_model.serving.served import scores_path
from pacs_node.metrics import Labels, Metrics
from pacs_node.outcomes import Event, Processed

if TYPE_CHECKING:
    from dp_model.serving.contract import ModelContract

logger = logging.getLogger(__name__)

#: The split whose served scores are the reference population.
REFERENCE_SPLIT = "val"
#: The alert threshold: this quantile of the distance between validation windows and the validation images.
NULL_QUANTILE = 0.99
#: Random validation windows drawn to find the threshold (seeded: the same bundle, the same threshold).
NULL_DRAWS = 2000
#: Confidence of the interval around the window's distance, and its bootstrap draws.
INTERVAL = 0.90
INTERVAL_DRAWS = 200
SEED = 0
#: The fractions of a window, by the name their gauges carry.
RATES = ("not_assessed", "positive", "triage")


def wasserstein(u: np.ndarray, v: np.ndarray) -> float:
    """The Wasserstein-1 distance between two samples: the area between their empirical
    distribution functions, in the units of the values (NaN when either is empty)."""
    if not len(u) or not len(v):
        return float("nan")
    u, v = np.sort(u), np.sort(v)
    values = np.sort(np.concatenate([u, v]))
    below_u = np.searchsorted(u, values[:-1], side="right") / len(u)
    below_v = np.searchsorted(v, values[:-1], side="right") / len(v)
    return float(np.sum(np.abs(below_u - below_v) * np.diff(values)))


@dataclass(frozen=True, kw_only=True)
class Population:
    """Images as the node served them: the probability of pneumonia and the three decisions."""

    probability: np.ndarray
    assessed: np.ndarray
    positive: np.ndarray
    triage: np.ndarray

    def __len__(self) -> int:
        return len(self.probability)

    def take(self, index: np.ndarray) -> Population:
        return Population(
            probability=self.probability[index],
            assessed=self.assessed[index],
            positive=self.positive[index],
            triage=self.triage[index],
        )

    @property
    def scores(self) -> np.ndarray:
        """The served probabilities: of the assessed images alone (no other is stated)."""
        return np.asarray(self.probability[self.assessed], np.float64)

    def rates(self) -> dict[str, float]:
        """The fraction of images not assessed, positive and flagged (:data:`RATES`)."""
        if not len(self):
            return {}
        return {
            "not_assessed": float(1.0 - self.assessed.mean()),
            "positive": float(self.positive.mean()),
            "triage": float(self.triage.mean()),
        }


def load_reference(bundle: str | Path, temperature: float) -> Population | None:
    """The bundle's validation images as the node would serve them, or None (logged) when the
    bundle has none, or scores of another calibration than its contract's ``temperature``."""
    path = scores_path(Path(bundle), REFERENCE_SPLIT)
    if not path.is_file():
        logger.info("no drift reference in the bundle (%s): the drift gauges are off", path)
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            found = Population(
                probability=np.asarray(saved["pneumonia_probability"], np.float64),
                assessed=np.asarray(saved["assessed"], bool),
                positive=np.asarray(saved["positive"], bool),
                triage=np.asarray(saved["triage"], bool),
            )
            saved_temperature = float(saved["temperature"])
    except (OSError, KeyError, ValueError) as exc:
        logger.warning("drift reference %s is unreadable (%s): the drift gauges are off", path, exc)
        return None
    if not np.isclose(saved_temperature, temperature) or not found.scores.size:
        logger.warning(
            "drift reference %s was scored at temperature %s, the contract says %s (or holds no assessed image): the drift gauges are off",
            path,
            saved_temperature,
            temperature,
        )
        return None
    return found


def null_distances(
    reference: Population, window: int, draws: int = NULL_DRAWS, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """The distance and the not-assessed fraction of ``draws`` windows of ``window`` images drawn
    with replacement from ``reference``, each distance to a resample of the reference of its
    own size: what a population like the validation images shows."""
    rng = np.random.default_rng(seed)
    size = len(reference)
    distances, turned_away = np.empty(draws), np.empty(draws)
    for i in range(draws):
        drawn = reference.take(rng.integers(0, size, window))
        again = reference.take(rng.integers(0, size, size))
        distances[i] = wasserstein(drawn.scores, again.scores)
        turned_away[i] = 1.0 - drawn.assessed.mean()
    return distances, turned_away


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """The alert thresholds of one bundle at one window size (:func:`bounds`)."""

    distance: float
    not_assessed: float


def bounds(reference: Population, window: int, quantile: float = NULL_QUANTILE) -> Bounds:
    """The ``quantile`` of the distance and of the not-assessed fraction over validation windows."""
    distances, turned_away = null_distances(reference, window)
    finite = distances[np.isfinite(distances)]
    return Bounds(
        distance=float(np.quantile(finite, quantile)) if finite.size else float("nan"),
        not_assessed=float(np.quantile(turned_away, quantile)),
    )


def interval(
    window: Population,
    reference: Population,
    confidence: float = INTERVAL,
    draws: int = INTERVAL_DRAWS,
    seed: int = SEED,
) -> tuple[float, float]:
    """A percentile bootstrap interval of the window's distance to the reference (both resampled)."""
    rng = np.random.default_rng(seed)
    found = np.array(
        [
            wasserstein(
                window.take(rng.integers(0, len(window), len(window))).scores,
                reference.take(rng.integers(0, len(reference), len(reference))).scores,
            )
            for _ in range(draws)
        ]
    )
    found = found[np.isfinite(found)]
    if not found.size:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2
    return float(np.quantile(found, tail)), float(np.quantile(found, 1.0 - tail))


class Watch:
    """Outcomes as rolling rates per model version, and as the drift of the served
    probability from the reference of the node's own model (``model``: its name and version).

    Args:
        metrics: where the gauges go.
        window: images per window (``drift_window``).
        model: the name and version of the bundle ``reference`` belongs to.
        reference: its validation images (None: rates alone).
    """

    def __init__(
        self,
        metrics: Metrics,
        window: int,
        model: tuple[str, str],
        reference: Population | None,
    ) -> None:
        self.window, self.model, self.reference = window, model, reference
        self._recent: dict[tuple[str, str], deque[tuple[float, bool, bool, bool]]] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._cached: tuple[int, tuple[float, float, float]] | None = None
        self.bounds = None if reference is None else bounds(reference, window)
        if reference is not None and self.bounds is not None:
            logger.info(
                "drift reference: %d validation images; over windows of %d images, alert above a distance of %.4f or %.1f%% not assessed (the %g quantile of %d validation windows)",
                len(reference),
                window,
                self.bounds.distance,
                100 * self.bounds.not_assessed,
                NULL_QUANTILE,
                NULL_DRAWS,
            )
        self._register(metrics)

    @classmethod
    def of_bundle(
        cls, metrics: Metrics, bundle: str | Path, contract: ModelContract, window: int
    ) -> Watch:
        """The watch of the node's own model: ``contract``'s name and version, and the
        reference ``bundle`` carries (:func:`load_reference`)."""
        return cls(
            metrics,
            window,
            (contract.name, contract.version),
            load_reference(bundle, contract.temperature),
        )

    def __call__(self, event: Event) -> None:
        if not isinstance(event, Processed):
            return
        key = (event.model.name, event.model.version)
        p = event.prediction
        with self._lock:
            recent = self._recent.setdefault(key, deque(maxlen=self.window))
            recent.append((p.pneumonia_probability, p.assessed, p.positive, p.triage))
            self._seen[key] = self._seen.get(key, 0) + 1

    def population(self, key: tuple[str, str]) -> Population:
        """The images of ``key``'s current window."""
        with self._lock:
            rows = list(self._recent.get(key, ()))
        columns = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
        return Population(
            probability=np.asarray(columns[0], np.float64),
            assessed=np.asarray(columns[1], bool),
            positive=np.asarray(columns[2], bool),
            triage=np.asarray(columns[3], bool),
        )

    def drift(self) -> tuple[float, float, float] | None:
        """The distance of the node's model's window to its reference and its interval (None:
        no reference, or no assessed image yet); computed once per new image."""
        if self.reference is None:
            return None
        with self._lock:
            seen = self._seen.get(self.model, 0)
        if self._cached is not None and self._cached[0] == seen:
            return self._cached[1]
        window = self.population(self.model)
        if not window.scores.size:
            return None
        found = (
            wasserstein(window.scores, self.reference.scores),
            *interval(window, self.reference),
        )
        self._cached = (seen, found)
        return found

    # --- the gauges -------------------------------------------------------------------------------

    def _register(self, metrics: Metrics) -> None:
        def per_model(
            read: Callable[[Population], float | None],
        ) -> Callable[[], dict[Labels, float]]:
            def values() -> dict[Labels, float]:
                with self._lock:
                    keys = list(self._recent)
                found = {_labels(key): read(self.population(key)) for key in keys}
                return {labels: value for labels, value in found.items() if value is not None}

            return values

        metrics.gauge(
            "window_images",
            per_model(lambda window: float(len(window))),
            "images in the recent window of each model version (at most window_size)",
        )
        metrics.gauge(
            "window_size",
            per_model(lambda _window: float(self.window)),
            "images a full recent window holds (drift_window)",
        )
        for rate, what in (
            ("not_assessed", "not assessed (outside the model's training distribution)"),
            ("positive", "positive"),
            ("triage", "flagged for triage"),
        ):
            metrics.gauge(
                f"window_{rate}_ratio",
                per_model(_rate_of(rate)),
                f"fraction of the recent window's images {what}",
            )
        if self.reference is None:
            return
        self._register_drift(metrics, self.reference)

    def _register_drift(self, metrics: Metrics, reference: Population) -> None:
        labels = _labels(self.model)
        assert self.bounds is not None  # computed with the reference

        def of_drift(index: int) -> Callable[[], dict[Labels, float]]:
            def read() -> dict[Labels, float]:
                found = self.drift()
                return {} if found is None else {labels: found[index]}

            return read

        def constant(value: float) -> Callable[[], dict[Labels, float]]:
            return lambda: {labels: value}

        for rate, value in reference.rates().items():
            metrics.gauge(
                f"reference_{rate}_ratio",
                constant(value),
                f"the same fraction as window_{rate}_ratio, on the bundle's validation images",
            )
        for name, index, text in (
            (
                "drift_distance",
                0,
                "Wasserstein-1 distance between the served probability of pneumonia of the window's assessed images and of the bundle's validation images",
            ),
            (
                "drift_distance_low",
                1,
                f"lower end of the {INTERVAL:.0%} bootstrap interval of drift_distance",
            ),
            (
                "drift_distance_high",
                2,
                f"upper end of the {INTERVAL:.0%} bootstrap interval of drift_distance",
            ),
        ):
            metrics.gauge(name, of_drift(index), text)
        metrics.gauge(
            "drift_threshold",
            constant(self.bounds.distance),
            f"alert above: the {NULL_QUANTILE} quantile of drift_distance over {NULL_DRAWS} random windows of validation images",
        )
        metrics.gauge(
            "window_not_assessed_threshold",
            constant(self.bounds.not_assessed),
            f"alert above: the {NULL_QUANTILE} quantile of window_not_assessed_ratio over the same validation windows",
        )
        metrics.gauge(
            "drift_reference_images",
            constant(float(len(reference))),
            "validation images in the drift reference (assessed or not)",
        )


def _rate_of(rate: str) -> Callable[[Population], float | None]:
    """What reads one of :data:`RATES` from a window (None while it is empty)."""
    return lambda window: window.rates().get(rate)


def _labels(key: tuple[str, str]) -> Labels:
    return (("model", key[0]), ("model_version", key[1]))
