"""Out-of-distribution scores of a trained classifier, all post hoc, and the gate's threshold.

Every detector here scores what one forward pass shows (:class:`Seen`: the logits, the
penultimate features, and on request each residual stage's pooled output); larger means
farther from the training distribution. The node gates on one of them, named by the
contract's ``ood.kind``:

* ``mahalanobis`` (Lee et al., NeurIPS 2018): class-conditional Gaussians with a shared
  covariance, fitted on the training split's penultimate features; the squared distance to
  the nearest class mean. The covariance is shrunk towards a scaled identity, since a
  training split holds fewer images than the features have dimensions; how far is
  estimated from the features themselves (Ledoit and Wolf, 2004; or Chen et al.'s OAS,
  2010), not fixed, so that a large split is shrunk little and a small one much.
* ``relative_mahalanobis`` (Ren et al., 2021): that distance minus the distance to one
  Gaussian fitted on all training features, which discounts directions every image varies in.
* ``multilayer_mahalanobis`` (Lee et al.'s feature ensemble, without its OOD-trained
  weights): the Mahalanobis score of every residual stage's pooled output, each
  standardised by its training images' scores, averaged.
* ``knn`` (Sun et al., ICML 2022): distance of the L2-normalised features to their k-th
  nearest training image.
* ``vim`` (Wang et al., CVPR 2022): the norm of the features outside the training
  features' principal subspace, scaled to the logits, as a virtual logit against the
  classes' energy.
* ``msp`` (Hendrycks and Gimpel, 2017): minus the largest softmax probability.
* ``energy`` (Liu et al., NeurIPS 2020): minus the log-sum-exp of the logits.

The threshold that :class:`~dp_model.serving.contract.OODGate` holds is an order statistic of the
scores of held-out in-distribution images (the calibration split), chosen so that the share
of in-distribution images it turns away is at most ``FALSE_REJECTION`` with probability
``CONFIDENCE``: the ``r``-th smallest of ``n`` exchangeable scores lets through a share
distributed as Beta(r, n - r + 1) of future in-distribution images, whatever their
distribution. The 99 % quantile of 44 images, what bundles held before, turns away 3 % on
average and more than 1 % in most draws.

A detector's statistics live in the bundle's ``models/ood.pt`` (tensors only; loaded with
``weights_only=True``); which detector new bundles get, and why, is docs/decisions.md's
"Out-of-distribution detection" and the benchmark ``benchmarks/ood_benchmark.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..networks.classifier import STAGE_NAMES, Classifier
from . import gate
from .gate import DETECTORS, Arrays
from .gate import needs_stages as needs_stages

#: Weight of the scaled identity in the shrunk covariance, in bundles written before it was estimated.
SHRINKAGE = 0.1
#: The share of held-out in-distribution images that the gate lets through.
QUANTILE = 0.99
#: The gate turns away at most this share of in-distribution images ...
FALSE_REJECTION = 0.01
#: ... with this probability over the draw of the held-out images.
CONFIDENCE = 0.95

#: How the covariance of the Mahalanobis detectors is shrunk (sklearn.covariance's estimates of the weight).
SHRINKAGE_METHODS = ("ledoit-wolf", "oas")
#: The detector new bundles are gated by: chosen on validation by the rule in docs/decisions.md
#: ("Out-of-distribution detection"), from benchmarks/ood_benchmark.py (docs/results.md: mean
#: near-OOD AUROC 0.997 against Mahalanobis's 0.988 on the learning-regime bundle's validation).
DEFAULT_DETECTOR = "multilayer_mahalanobis"
#: Neighbours of the k-NN detector: about 1 % of a learning-regime training split.
KNN_K = 10


def classifier_layer(model: Classifier) -> nn.Linear | None:
    """The layer whose input is the penultimate representation, one row per image, as the
    network names it (``classifier_layer``); None for a network that names none (CIA-Net,
    whose last linear layers belong to its alignment module and see other images too)."""
    return model.classifier_layer


def stage_modules(model: nn.Module) -> list[nn.Module] | None:
    """The residual stages ``layer1`` to ``layer4`` (the shallowest module of each name), or
    None for a network that has not all four (a VGG): no multi-layer detector for it."""
    found: dict[str, tuple[int, nn.Module]] = {}
    for name, module in model.named_modules():
        leaf, depth = name.rsplit(".", 1)[-1], name.count(".")
        if leaf in STAGE_NAMES and (leaf not in found or depth < found[leaf][0]):
            found[leaf] = (depth, module)
    return [found[n][1] for n in STAGE_NAMES] if len(found) == len(STAGE_NAMES) else None


@contextmanager
def penultimate(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, every forward pass appends its penultimate features ``(B, D)`` to the list."""
    layer = classifier_layer(model)
    if layer is None:
        raise ValueError(
            f"{type(model).__name__} names no classifier layer: no penultimate features for an out-of-distribution gate"
        )
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].detach().flatten(1).float())
    )
    try:
        yield seen
    finally:
        handle.remove()


def one_pass(seen: list[Tensor], rows: int) -> Tensor:
    """The features of the single forward pass :func:`penultimate` saw since the last call
    (the list is emptied), one row per image.

    Raises:
        ValueError: not exactly one pass of ``rows`` rows: a gate must not guess which.
    """
    passes = list(seen)
    seen.clear()
    if len(passes) != 1 or passes[0].shape[0] != rows:
        raise ValueError(f"{len(passes)} feature passes for {rows} image(s), not one")
    return passes[0]


@dataclass(frozen=True)
class Seen:
    """What one or more forward passes show a detector, one row per image.

    Attributes:
        logits: ``(N, K)`` the network's outputs before the softmax or sigmoid.
        features: ``(N, D)`` the penultimate representation (the classifier layer's input).
        stages: each residual stage's output, average-pooled, ``(N, C_l)``; empty unless asked for.
    """

    logits: Tensor
    features: Tensor
    stages: tuple[Tensor, ...] = ()

    def __len__(self) -> int:
        return len(self.features)

    def to(self, device: torch.device | str) -> Seen:
        return Seen(
            self.logits.to(device),
            self.features.to(device),
            tuple(s.to(device) for s in self.stages),
        )

    def take(self, index: Tensor | np.ndarray) -> Seen:
        """The rows at ``index`` (a boolean mask or indices)."""
        index = torch.as_tensor(index)
        return Seen(self.logits[index], self.features[index], tuple(s[index] for s in self.stages))

    @staticmethod
    def cat(parts: Iterable[Seen]) -> Seen:
        parts = list(parts)
        if not parts:
            raise ValueError("no forward passes to join")
        stages = (
            tuple(torch.cat(layer) for layer in zip(*(p.stages for p in parts)))
            if parts[0].stages
            else ()
        )
        return Seen(
            torch.cat([p.logits for p in parts]), torch.cat([p.features for p in parts]), stages
        )


class Watch:
    """Hooks on a network that collect what its forward passes show a detector; see :func:`watching`."""

    def __init__(self, model: nn.Module, stages: bool = False) -> None:
        layer = classifier_layer(model)
        if layer is None:
            raise ValueError(
                f"{type(model).__name__} names no classifier layer: no penultimate features for an out-of-distribution gate"
            )
        modules = stage_modules(model) if stages else []
        if modules is None:
            raise ValueError(
                f"{type(model).__name__} has no residual stages {', '.join(STAGE_NAMES)}: no multi-layer detector for it"
            )
        self._features: list[Tensor] = []
        self._stages: list[list[Tensor]] = [[] for _ in modules]
        self._handles = [
            layer.register_forward_hook(
                lambda module, inputs, output: self._features.append(
                    inputs[0].detach().flatten(1).float()
                )
            )
        ]
        for found, module in zip(self._stages, modules):
            self._handles.append(
                module.register_forward_hook(
                    lambda module, inputs, output, found=found: found.append(_pooled(output))
                )
            )

    def seen(self, logits: Tensor, rows: int) -> Seen:
        """What the single forward pass since the last call showed, with its ``logits``.

        Raises:
            ValueError: not exactly one pass of ``rows`` rows, at the classifier or at any stage.
        """
        stages = tuple(one_pass(found, rows) for found in self._stages)
        return Seen(logits.detach().float(), one_pass(self._features, rows), stages)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _pooled(output: Tensor) -> Tensor:
    """A stage's output averaged over its spatial positions, one row per image."""
    output = output.detach().float()
    return output.flatten(2).mean(2) if output.ndim > 2 else output.flatten(1)


@contextmanager
def watching(model: nn.Module, stages: bool = False) -> Iterator[Watch]:
    """Within the block, forward passes of ``model`` are watched: ``watch.seen(logits, rows)``
    returns what the last one showed (the penultimate features, and each residual stage's
    pooled output when ``stages``)."""
    watch = Watch(model, stages)
    try:
        yield watch
    finally:
        watch.close()


@torch.no_grad()
def observe(model: nn.Module, batches: Iterable[Tensor], stages: bool = False) -> Seen:
    """Run ``model`` (in eval mode) over ``batches`` of images and collect what a detector reads."""
    model = model.eval()
    found = []
    with watching(model, stages) as watch:
        for x in batches:
            found.append(watch.seen(model(x), len(x)))
    return Seen.cat(found)


class Detector(Protocol):
    """An out-of-distribution score: larger is farther from the training images."""

    kind: str
    needs_stages: bool

    def score(self, seen: Seen) -> np.ndarray: ...

    @property
    def arrays(self) -> Arrays: ...

    def to(self, device: torch.device | str) -> Detector: ...

    def save(self, path: Path) -> None: ...


# --- Gaussians -----------------------------------------------------------------------------------


def estimated_shrinkage(centred: Tensor, method: str = "ledoit-wolf") -> float:
    """The weight of the scaled identity for centred features ``(N, D)``, in [0, 1], by
    Ledoit-Wolf or OAS (both shrink towards ``trace / D`` times the identity).

    A single feature or a single image gives nothing to estimate from: full shrinkage."""
    from sklearn.covariance import OAS, ledoit_wolf_shrinkage

    if method not in SHRINKAGE_METHODS:
        raise ValueError(f"shrinkage method must be one of {SHRINKAGE_METHODS}, got {method!r}")
    if centred.shape[0] < 2 or centred.shape[1] < 2:
        return 1.0
    x = centred.double().cpu().numpy()
    weight = (
        ledoit_wolf_shrinkage(x, assume_centered=True)
        if method == "ledoit-wolf"
        else OAS(assume_centered=True).fit(x).shrinkage_
    )
    return float(np.clip(weight, 0.0, 1.0))


def shrunk_precision(
    centred: Tensor, shrinkage: float | None = None, method: str = "ledoit-wolf"
) -> tuple[Tensor, float]:
    """The inverse of the covariance of centred rows ``(N, D)`` shrunk towards a scaled
    identity (``shrinkage``; None: estimated by ``method``), float64, and the weight used."""
    centred = centred.double()
    covariance = centred.T @ centred / max(1, len(centred) - 1)
    scale = covariance.diagonal().mean().clamp_min(1e-12)
    if shrinkage is None:
        shrinkage = estimated_shrinkage(centred, method)
    shrunk = (1 - shrinkage) * covariance + shrinkage * scale * torch.eye(
        len(covariance), dtype=covariance.dtype
    )
    return torch.linalg.inv(shrunk), float(shrinkage)


def _class_gaussians(
    features: Tensor, labels: np.ndarray, shrinkage: float | None, method: str
) -> tuple[Tensor, Tensor, float]:
    """Class means ``(K, D)`` (classes with images only), the shared precision, the shrinkage."""
    features, labels = features.double(), np.asarray(labels)
    means, centred = [], []
    for k in np.unique(labels):
        rows = features[torch.from_numpy(labels == k)]
        means.append(rows.mean(0))
        centred.append(rows - rows.mean(0))
    precision, weight = shrunk_precision(torch.cat(centred), shrinkage, method)
    return torch.stack(means).float(), precision.float(), weight


def nearest_distance(features: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """Squared Mahalanobis distance of each row to the nearest of ``means`` ``(K, D)``
    (:func:`dp_model.serving.gate.nearest_distance`, on the CPU), float32."""
    found = gate.nearest_distance(_numpy(features), _numpy(means), _numpy(precision))
    return torch.from_numpy(found).float()


def _numpy(value: Tensor) -> np.ndarray:
    return value.detach().cpu().double().numpy()


def scored(arrays: Arrays, seen: Seen) -> np.ndarray:
    """The score of each image of ``seen`` by the one implementation, :meth:`dp_model.serving.gate.Arrays.score`."""
    return arrays.score(
        _numpy(seen.logits), _numpy(seen.features), tuple(_numpy(s) for s in seen.stages)
    )


@dataclass(frozen=True)
class FeatureStatistics:
    """The ``mahalanobis`` detector: class means ``(K, D)`` and the shared precision ``(D, D)``
    of the training features, and the shrinkage the covariance was fitted with (None when
    loaded: the file holds tensors only)."""

    means: Tensor
    precision: Tensor
    shrinkage: float | None = None
    kind = "mahalanobis"
    needs_stages = gate.needs_stages(kind)

    @staticmethod
    def fit(
        features: Tensor,
        labels: np.ndarray,
        shrinkage: float | None = None,
        method: str = "ledoit-wolf",
    ) -> FeatureStatistics:
        """From training features ``(N, D)`` and class indices ``(N,)`` (classes with images only).

        ``shrinkage``: the weight of the scaled identity; None estimates it by ``method``
        (on the class-centred features, whose target is the same scaled identity).
        Ledoit-Wolf by default: OAS assumes Gaussian features, and pooled ReLU features are not.
        """
        means, precision, weight = _class_gaussians(features, labels, shrinkage, method)
        return FeatureStatistics(means, precision, weight)

    def scores(self, features: Tensor) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``features`` to the nearest class mean."""
        return self.arrays.score(np.zeros((len(features), 0)), _numpy(features))

    def score(self, seen: Seen) -> np.ndarray:
        return scored(self.arrays, seen)

    def state(self) -> dict[str, np.ndarray]:
        """The statistics as arrays, by the names of the saved file."""
        return {"means": _numpy(self.means), "precision": _numpy(self.precision)}

    @cached_property
    def arrays(self) -> Arrays:
        """This detector as the NumPy one that scores (:class:`dp_model.serving.gate.Arrays`)."""
        return Arrays(self.kind, self.state())

    def to(self, device: torch.device | str) -> FeatureStatistics:
        return FeatureStatistics(self.means.to(device), self.precision.to(device), self.shrinkage)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"means": self.means.contiguous(), "precision": self.precision.contiguous()}, path
        )

    @staticmethod
    def load(path: Path, features: int | None = None) -> FeatureStatistics:
        """Read and check: means ``(K, D)``, a symmetric positive-definite precision ``(D, D)``,
        finite, ``D == features`` when given.

        Raises:
            ValueError: what is wrong, in words.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(
            isinstance(state.get(k), torch.Tensor) for k in ("means", "precision")
        ):
            raise ValueError("not a dict of tensors 'means' and 'precision'")
        return FeatureStatistics(*_checked_gaussian(state["means"], state["precision"], features))


def _checked_gaussian(
    means: Tensor, precision: Tensor, features: int | None
) -> tuple[Tensor, Tensor]:
    """``means (K, D)`` and a symmetric positive-definite ``precision (D, D)``, finite, checked.

    Raises:
        ValueError: what is wrong, in words.
    """
    gate.checked_gaussian(_numpy(means), _numpy(precision), features)
    return means.float(), precision.float()


# --- the other detectors -------------------------------------------------------------------------


class _Stored:
    """Saving and loading for a frozen dataclass of tensors (and plain numbers, stored as 0-d tensors)."""

    def to(self, device: torch.device | str):
        return type(self)(**{f.name: _moved(getattr(self, f.name), device) for f in fields(self)})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self._tensors(), path)

    def _tensors(self) -> dict[str, Tensor]:
        state = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                state |= {f"{f.name}.{i}": v.contiguous().cpu() for i, v in enumerate(value)}
            else:
                state[f.name] = (
                    value.contiguous().cpu()
                    if isinstance(value, Tensor)
                    else torch.tensor(float(value))
                )
        return state

    def state(self) -> dict[str, np.ndarray]:
        """The statistics as arrays, by the names of the saved file."""
        return {name: _numpy(value) for name, value in self._tensors().items()}

    @cached_property
    def arrays(self) -> Arrays:
        """This detector as the NumPy one that scores (:class:`dp_model.serving.gate.Arrays`)."""
        return Arrays(self.kind, self.state())

    def score(self, seen: Seen) -> np.ndarray:
        return scored(self.arrays, seen)

    @classmethod
    def _state(cls, path: Path, features: int | None = None) -> dict[str, Tensor]:
        """The saved statistics, checked by the NumPy detector's checks
        (:meth:`dp_model.serving.gate.Arrays.checked`: one set of checks for both forms)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
        ):
            raise ValueError("not a dict of named tensors")
        Arrays.checked(cls.kind, {name: _numpy(value) for name, value in state.items()}, features)
        return state


def _moved(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(v.to(device) for v in value)
    return value


@dataclass(frozen=True)
class MaxSoftmax(_Stored):
    """``msp``: minus the largest softmax probability of the logits (nothing to fit)."""

    kind = "msp"
    needs_stages = gate.needs_stages(kind)

    @classmethod
    def load(cls, path: Path, features: int | None = None) -> MaxSoftmax:
        cls._state(path)
        return cls()


@dataclass(frozen=True)
class Energy(_Stored):
    """``energy``: minus the log-sum-exp of the logits, at temperature 1 (nothing to fit)."""

    kind = "energy"
    needs_stages = gate.needs_stages(kind)

    @classmethod
    def load(cls, path: Path, features: int | None = None) -> Energy:
        cls._state(path)
        return cls()


@dataclass(frozen=True)
class RelativeMahalanobis(_Stored):
    """``relative_mahalanobis``: the class-conditional distance less the distance to one
    Gaussian of all training features (Ren et al., 2021), minimised over the classes."""

    means: Tensor
    precision: Tensor
    background_mean: Tensor
    background_precision: Tensor
    kind = "relative_mahalanobis"
    needs_stages = gate.needs_stages(kind)

    @staticmethod
    def fit(
        features: Tensor, labels: np.ndarray, method: str = "ledoit-wolf"
    ) -> RelativeMahalanobis:
        """The background covariance is shrunk by the weight estimated for the classes' one:
        in the directions the training features hardly span, each distance is the shrinkage
        target's, and two different weights would make their difference an artefact of the
        two estimates (estimated apart, the Ledoit-Wolf weights differed enough to turn
        every near-OOD image of the learning-regime bundle more "in-distribution" than the
        in-distribution ones: AUROC 0.01)."""
        means, precision, weight = _class_gaussians(features, labels, None, method)
        centre = features.double().mean(0)
        background, _ = shrunk_precision(features.double() - centre, weight, method)
        return RelativeMahalanobis(means, precision, centre[None].float(), background.float())

    @classmethod
    def load(cls, path: Path, features: int | None = None) -> RelativeMahalanobis:
        state = cls._state(path, features)
        names = ("means", "precision", "background_mean", "background_precision")
        return cls(*(state[name].float() for name in names))


@dataclass(frozen=True)
class MultiLayerMahalanobis(_Stored):
    """``multilayer_mahalanobis``: for each residual stage, the squared Mahalanobis distance of
    its pooled output to the nearest class mean, standardised by the training images' own
    scores (``centre``, ``spread``), then averaged over the stages.

    Lee et al. weigh the stages by a regression fitted on out-of-distribution images; with
    none to be had before deployment, every stage weighs the same."""

    means: tuple[Tensor, ...]
    precision: tuple[Tensor, ...]
    centre: Tensor
    spread: Tensor
    kind = "multilayer_mahalanobis"
    needs_stages = gate.needs_stages(kind)

    @staticmethod
    def fit(
        stages: tuple[Tensor, ...], labels: np.ndarray, method: str = "ledoit-wolf"
    ) -> MultiLayerMahalanobis:
        if not stages:
            raise ValueError("no stage features to fit a multi-layer detector on")
        means, precisions, centres, spreads = [], [], [], []
        for x in stages:
            m, p, _ = _class_gaussians(x, labels, None, method)
            own = nearest_distance(x, m, p).double()
            (
                means.append(m),
                precisions.append(p),
                centres.append(own.mean()),
                spreads.append(own.std().clamp_min(1e-6)),
            )
        return MultiLayerMahalanobis(
            tuple(means),
            tuple(precisions),
            torch.stack(centres).float(),
            torch.stack(spreads).float(),
        )

    @classmethod
    def load(cls, path: Path, features: int | None = None) -> MultiLayerMahalanobis:
        state = cls._state(path)
        count = sum(1 for k in state if k.startswith("means."))
        return cls(
            tuple(state[f"means.{i}"].float() for i in range(count)),
            tuple(state[f"precision.{i}"].float() for i in range(count)),
            state["centre"].float(),
            state["spread"].float(),
        )


@dataclass(frozen=True)
class NearestNeighbour(_Stored):
    """``knn``: Euclidean distance of the L2-normalised features to the ``k``-th nearest of
    the normalised training features ``bank`` (Sun et al., 2022)."""

    bank: Tensor
    k: int = KNN_K
    kind = "knn"
    needs_stages = gate.needs_stages(kind)

    @staticmethod
    def fit(features: Tensor, k: int = KNN_K) -> NearestNeighbour:
        if not 1 <= k <= len(features):
            raise ValueError(f"k must lie in [1, {len(features)}] (the training images), got {k}")
        return NearestNeighbour(_normalised(features), int(k))

    @classmethod
    def load(cls, path: Path, features: int | None = None) -> NearestNeighbour:
        state = cls._state(path, features)
        return cls(state["bank"].float(), int(state["k"]))


def _normalised(features: Tensor) -> Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1, eps=1e-12)


@dataclass(frozen=True)
class VirtualLogit(_Stored):
    """``vim`` (Wang et al., 2022): with ``origin = -pinv(W) b`` of the classifier, the norm of
    ``features - origin`` outside the ``dim`` principal directions of the training features
    (``residual``: an orthonormal basis of the rest), times ``alpha`` (the training images'
    mean largest logit over their mean residual norm), less the log-sum-exp of the logits.

    It assumes the logits are the classifier layer's output (``W h + b``); class attention
    adds per-finding terms to it, so ViM is not meant for that network."""

    origin: Tensor
    residual: Tensor
    alpha: float
    kind = "vim"
    needs_stages = gate.needs_stages(kind)

    @staticmethod
    def fit(
        features: Tensor, logits: Tensor, classifier: nn.Linear, dim: int | None = None
    ) -> VirtualLogit:
        """``dim``: the principal subspace's dimension. Default: half the features' (the
        published choice for 512-dimensional ResNet-18 features), but at most half the
        training images, so that the training features do vary outside it (with fewer images
        than dimensions they span no more than their number, and a residual that is zero on
        every training image makes ``alpha`` meaningless)."""
        x = features.double()
        weight = classifier.weight.detach().double().cpu()
        bias = (
            classifier.bias.detach().double().cpu()
            if classifier.bias is not None
            else torch.zeros(len(weight), dtype=torch.float64)
        )
        origin = -torch.linalg.pinv(weight) @ bias
        centred = x.cpu() - origin
        dim = max(1, min(x.shape[1] // 2, len(x) // 2)) if dim is None else dim
        if not 1 <= dim < x.shape[1]:
            raise ValueError(
                f"the principal subspace's dimension must lie in [1, {x.shape[1] - 1}], got {dim}"
            )
        _, vectors = torch.linalg.eigh(centred.T @ centred / len(centred))  # ascending eigenvalues
        residual = vectors[:, : x.shape[1] - dim]
        norms = (centred @ residual).norm(dim=1)
        alpha = float(logits.double().max(dim=1).values.mean() / norms.mean().clamp_min(1e-12))
        return VirtualLogit(origin.float(), residual.float(), alpha)

    @classmethod
    def load(cls, path: Path, features: int | None = None) -> VirtualLogit:
        state = cls._state(path, features)
        return cls(state["origin"].float(), state["residual"].float(), float(state["alpha"]))


_CLASSES = {
    "mahalanobis": FeatureStatistics,
    "relative_mahalanobis": RelativeMahalanobis,
    "multilayer_mahalanobis": MultiLayerMahalanobis,
    "knn": NearestNeighbour,
    "vim": VirtualLogit,
    "msp": MaxSoftmax,
    "energy": Energy,
}


def _known(kind: str):
    if kind not in _CLASSES:
        raise ValueError(
            f"out-of-distribution detector {kind!r} is not known ({', '.join(DETECTORS)})"
        )
    return _CLASSES[kind]


def fit_detector(
    kind: str,
    train: Seen,
    labels: np.ndarray,
    classifier: nn.Linear | None = None,
    method: str = "ledoit-wolf",
) -> Detector:
    """The detector ``kind`` fitted on the training split's forward passes ``train`` and class
    indices ``labels``; ``classifier`` is the network's classifier layer (ViM needs its weights),
    ``method`` how the Mahalanobis detectors shrink their covariance."""
    labels = np.asarray(labels)
    if kind == "mahalanobis":
        return FeatureStatistics.fit(train.features, labels, method=method)
    if kind == "relative_mahalanobis":
        return RelativeMahalanobis.fit(train.features, labels, method)
    if kind == "multilayer_mahalanobis":
        return MultiLayerMahalanobis.fit(train.stages, labels, method)
    if kind == "knn":
        return NearestNeighbour.fit(train.features, min(KNN_K, len(train)))
    if kind == "vim":
        if classifier is None:
            raise ValueError("ViM needs the network's classifier layer")
        return VirtualLogit.fit(train.features, train.logits, classifier)
    return _known(kind)()


def load_detector(path: Path, kind: str = "mahalanobis", features: int | None = None) -> Detector:
    """The detector ``kind`` from its statistics file, checked (``features``: the network's
    penultimate dimension, when known).

    Raises:
        ValueError: an unknown kind, or statistics that do not fit it, in words.
    """
    return _known(kind).load(path, features)


def write_statistics(detector: Detector, models: Path) -> tuple[str, str]:
    """``detector``'s statistics into the bundle's ``models`` folder twice: ``ood.pt`` for
    PyTorch and ``ood.npz`` for the node serving without it (:func:`dp_model.serving.gate.save_arrays`).

    Returns:
        the SHA-256 of each, for the contract's ``ood.digest`` and ``ood.arrays_digest``.
    """
    detector.save(models / "ood.pt")
    arrays = gate.save_arrays(models / gate.ARRAYS_FILE, detector.arrays.state)
    return digest(models / "ood.pt"), arrays


def digest(path: Path) -> str:
    """SHA-256 of the statistics file: the contract records it, the loader checks it."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def threshold(held_out_scores: np.ndarray, quantile: float = QUANTILE) -> float:
    """The gate's threshold: the ``quantile`` of held-out in-distribution scores."""
    return float(np.quantile(np.asarray(held_out_scores, np.float64), quantile))


def gate_rank(
    n: int, false_rejection: float = FALSE_REJECTION, confidence: float = CONFIDENCE
) -> tuple[int, float]:
    """The smallest rank ``r`` (1-based, of ``n`` held-out scores) whose order statistic turns
    away at most ``false_rejection`` of in-distribution images with probability ``confidence``,
    and the bound it gives.

    The share let through by the ``r``-th smallest of ``n`` scores is Beta(r, n - r + 1), so
    ``P(share >= 1 - eps) = P(Binomial(n, 1 - eps) <= r - 1)``. When even the largest score is
    not enough (``n < log(1 - confidence) / log(1 - eps)``, 299 for 1 % at 95 %), the rank is
    ``n`` and the bound the one it does give: ``1 - (1 - confidence)^(1/n)``.
    """
    from scipy.stats import binom

    if n < 1:
        raise ValueError("no held-out images to place an out-of-distribution gate")
    if not (0 < false_rejection < 1 and 0 < confidence < 1):
        raise ValueError(
            f"false_rejection and confidence lie in (0, 1), got {false_rejection}, {confidence}"
        )
    reached = np.nonzero(binom.cdf(np.arange(n), n, 1 - false_rejection) >= confidence)[0]
    if len(reached):
        return int(reached[0]) + 1, float(false_rejection)
    return n, float(1 - (1 - confidence) ** (1 / n))


def certified_threshold(
    held_out_scores: np.ndarray,
    false_rejection: float = FALSE_REJECTION,
    confidence: float = CONFIDENCE,
) -> tuple[float, int, float]:
    """The gate's threshold: the :func:`gate_rank`-th smallest held-out score; with the rank and
    the false-rejection bound it holds at ``confidence``.

    Raises:
        ValueError: no scores, or a non-finite one.
    """
    scores = np.sort(np.asarray(held_out_scores, np.float64))
    if not np.isfinite(scores).all():
        raise ValueError("non-finite held-out out-of-distribution scores")
    rank, bound = gate_rank(len(scores), false_rejection, confidence)
    return float(scores[rank - 1]), rank, bound
