"""The out-of-distribution gate's scores, in NumPy: one implementation for every engine.

:mod:`dp_model.serving.ood` fits the detectors in PyTorch (training) and watches a network's layers;
what a fitted detector *computes* from a forward pass is here, on arrays, so that the node
serving an ONNX graph scores without PyTorch and the PyTorch detectors score by the same
code (:meth:`dp_model.serving.ood.FeatureStatistics.score` and the others call :meth:`Arrays.score`).

A detector's statistics are a dict of named arrays (the names of ``models/ood.pt``; a tuple
field ``means`` is stored as ``means.0``, ``means.1``, ...). ``dp-train`` writes them twice:
``models/ood.pt`` (PyTorch's, which bundles written before have alone) and
``models/ood.npz`` (NumPy's, :func:`save_arrays`), each with its SHA-256 in the contract.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The detectors a contract's ``ood.kind`` may name, and what each score is, in words (for the model card).
DETECTORS = {
    "mahalanobis": "squared Mahalanobis distance of the penultimate features to the nearest class mean of the training features",
    "relative_mahalanobis": "Mahalanobis distance of the penultimate features to the nearest class mean, less their distance to the training features' overall mean",
    "multilayer_mahalanobis": "mean over the four residual stages of the standardised Mahalanobis distance of each stage's pooled output to the nearest class mean",
    "knn": "distance of the normalised penultimate features to their k-th nearest training image",
    "vim": "virtual-logit score: the features' norm outside the training features' principal subspace, against the energy of the logits",
    "msp": "minus the largest softmax probability",
    "energy": "minus the log-sum-exp of the logits",
}
#: The detectors that read each residual stage's pooled output, not only the penultimate features.
STAGE_DETECTORS = ("multilayer_mahalanobis",)
#: The statistics in NumPy's form, beside ``ood.pt`` in the bundle's ``models`` folder.
ARRAYS_FILE = "ood.npz"


def needs_stages(kind: str) -> bool:
    """Whether the detector ``kind`` reads the residual stages' outputs (not only the penultimate features)."""
    known(kind)
    return kind in STAGE_DETECTORS


def known(kind: str) -> str:
    """``kind``, checked to be one of :data:`DETECTORS`.

    Raises:
        ValueError: it is not.
    """
    if kind not in DETECTORS:
        raise ValueError(
            f"out-of-distribution detector {kind!r} is not known ({', '.join(DETECTORS)})"
        )
    return kind


def nearest_distance(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row ``(N, D)`` to the nearest of ``means`` ``(K, D)``."""
    difference = np.asarray(features, np.float64)[:, None, :] - means[None]  # (N, K, D)
    return np.einsum("nkd,de,nke->nk", difference, precision, difference).min(axis=1)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    top = x.max(axis=1)
    return top + np.log(np.exp(x - top[:, None]).sum(axis=1))


@dataclass(frozen=True)
class Arrays:
    """A fitted detector of ``kind`` as its statistics, ready to score forward passes.

    Attributes:
        kind: a key of :data:`DETECTORS`.
        state: the statistics by name, float64 (a count, ``k``, as a 0-d array).
    """

    kind: str
    state: dict[str, np.ndarray]

    @property
    def needs_stages(self) -> bool:
        return needs_stages(self.kind)

    def score(
        self, logits: np.ndarray, features: np.ndarray, stages: tuple[np.ndarray, ...] = ()
    ) -> np.ndarray:
        """The score ``(N,)`` of each image of a forward pass: larger is farther from the
        training images. ``logits`` ``(N, K)``, ``features`` ``(N, D)`` the penultimate
        representation, ``stages`` each residual stage's pooled output (when read)."""
        s = self.state
        if self.kind == "mahalanobis":
            return nearest_distance(features, s["means"], s["precision"])
        if self.kind == "relative_mahalanobis":
            x = np.asarray(features, np.float64)
            difference = x[:, None, :] - s["means"][None]
            per_class = np.einsum("nkd,de,nke->nk", difference, s["precision"], difference)
            away = x - s["background_mean"]
            background = np.einsum("nd,de,ne->n", away, s["background_precision"], away)
            return (per_class - background[:, None]).min(axis=1)
        if self.kind == "multilayer_mahalanobis":
            return self._multilayer(stages)
        if self.kind == "knn":
            x, bank = _normalised(features), s["bank"]
            squared = (x * x).sum(1)[:, None] + (bank * bank).sum(1)[None] - 2 * x @ bank.T
            distances = np.sqrt(np.maximum(squared, 0.0))
            return np.partition(distances, int(s["k"]) - 1, axis=1)[:, int(s["k"]) - 1]
        if self.kind == "vim":
            centred = np.asarray(features, np.float64) - s["origin"]
            virtual = float(s["alpha"]) * np.linalg.norm(centred @ s["residual"], axis=1)
            return virtual - _logsumexp(logits)
        if self.kind == "msp":
            x = np.asarray(logits, np.float64)
            shifted = np.exp(x - x.max(axis=1, keepdims=True))
            return -(shifted / shifted.sum(axis=1, keepdims=True)).max(axis=1)
        return -_logsumexp(logits)  # energy

    def _multilayer(self, stages: tuple[np.ndarray, ...]) -> np.ndarray:
        count = _count(self.state)
        if len(stages) != count:
            raise ValueError(f"{len(stages)} stage outputs seen, the detector reads {count}")
        per_stage = np.stack(
            [
                nearest_distance(x, self.state[f"means.{i}"], self.state[f"precision.{i}"])
                for i, x in enumerate(stages)
            ],
            axis=1,
        )
        return ((per_stage - self.state["centre"]) / self.state["spread"]).mean(axis=1)

    @staticmethod
    def checked(kind: str, state: dict[str, np.ndarray], features: int | None = None) -> Arrays:
        """The detector ``kind`` of ``state``, checked: every statistic it reads present,
        finite and of fitting shapes, precisions symmetric positive-definite, ``D ==
        features`` when given.

        Raises:
            ValueError: what is wrong, in words.
        """
        state = {name: np.asarray(value, np.float64) for name, value in state.items()}
        if not all(np.isfinite(value).all() for value in state.values()):
            raise ValueError("non-finite values")
        arrays = Arrays(known(kind), state)
        _CHECKS.get(kind, lambda _state, _features: None)(state, features)
        return arrays


def _normalised(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _required(state: dict[str, np.ndarray], *keys: str) -> list[np.ndarray]:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"no {', '.join(repr(k) for k in missing)} in the statistics")
    return [state[k] for k in keys]


def _count(state: dict[str, np.ndarray]) -> int:
    return sum(1 for k in state if k.startswith("means."))


def checked_gaussian(means: np.ndarray, precision: np.ndarray, features: int | None) -> None:
    """``means (K, D)`` and a symmetric positive-definite ``precision (D, D)``, finite.

    Raises:
        ValueError: what is wrong, in words.
    """
    if (
        means.ndim != 2
        or precision.ndim != 2
        or precision.shape != (means.shape[1], means.shape[1])
        or len(means) == 0
    ):
        raise ValueError(
            f"shapes do not fit: means {tuple(means.shape)}, precision {tuple(precision.shape)}"
        )
    if features is not None and means.shape[1] != features:
        raise ValueError(f"{means.shape[1]} feature dimensions, the network has {features}")
    if not (np.isfinite(means).all() and np.isfinite(precision).all()):
        raise ValueError("non-finite values")
    if not np.allclose(precision, precision.T, rtol=1e-4, atol=1e-6):
        raise ValueError("the precision is not symmetric positive-definite")
    try:
        np.linalg.cholesky(precision)
    except np.linalg.LinAlgError:
        raise ValueError("the precision is not symmetric positive-definite") from None


def _check_mahalanobis(state: dict[str, np.ndarray], features: int | None) -> None:
    checked_gaussian(*_required(state, "means", "precision"), features)


def _check_relative(state: dict[str, np.ndarray], features: int | None) -> None:
    _check_mahalanobis(state, features)
    checked_gaussian(*_required(state, "background_mean", "background_precision"), features)


def _check_multilayer(state: dict[str, np.ndarray], features: int | None) -> None:
    count = _count(state)
    if count == 0:
        raise ValueError("no stage statistics")
    for i in range(count):
        checked_gaussian(*_required(state, f"means.{i}", f"precision.{i}"), None)
    centre, spread = _required(state, "centre", "spread")
    if centre.shape != (count,) or spread.shape != (count,) or not (spread > 0).all():
        raise ValueError(f"centre and spread must be {count} numbers, spread above 0")


def _check_knn(state: dict[str, np.ndarray], features: int | None) -> None:
    bank, k = _required(state, "bank", "k")
    if bank.ndim != 2 or (features is not None and bank.shape[1] != features):
        raise ValueError(f"a bank of shape {tuple(bank.shape)} does not fit {features} features")
    if not 1 <= int(k) <= len(bank):
        raise ValueError(f"k {int(k)} outside [1, {len(bank)}]")


def _check_vim(state: dict[str, np.ndarray], features: int | None) -> None:
    origin, residual, _ = _required(state, "origin", "residual", "alpha")
    if (
        origin.ndim != 1
        or residual.ndim != 2
        or residual.shape[0] != len(origin)
        or (features is not None and len(origin) != features)
    ):
        raise ValueError(
            f"shapes do not fit: origin {tuple(origin.shape)}, residual basis {tuple(residual.shape)}"
        )


_CHECKS = {
    "mahalanobis": _check_mahalanobis,
    "relative_mahalanobis": _check_relative,
    "multilayer_mahalanobis": _check_multilayer,
    "knn": _check_knn,
    "vim": _check_vim,
}


def arrays_path(bundle: str | Path) -> Path:
    return Path(bundle) / "models" / ARRAYS_FILE


def save_arrays(path: Path, state: dict[str, np.ndarray]) -> str:
    """``state`` into ``path`` (an uncompressed ``.npz``, no pickled objects); its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in state.items()})
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def load_arrays(path: Path, kind: str, digest: str, features: int | None = None) -> Arrays:
    """The detector ``kind`` from ``path`` (:func:`save_arrays`), checked against the SHA-256
    ``digest`` the contract records and by :meth:`Arrays.checked`.

    Raises:
        OSError: the file cannot be read.
        ValueError: another digest, or statistics that do not fit ``kind``, in words.
    """
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(
            "its SHA-256 differs from the one metadata.json records (altered or from another training)"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as found:
        state = {name: found[name] for name in found.files}
    return Arrays.checked(kind, state, features)
