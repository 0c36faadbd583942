"""Out-of-distribution scores: Mahalanobis distance of the penultimate features.

Lee et al. (NeurIPS 2018): class-conditional Gaussians with a shared covariance, fitted on
the training split's features (the input of the network's last linear layer); an image's
score is its squared distance to the nearest class mean. The covariance is shrunk towards
a scaled identity, since a training split holds fewer images than the features have
dimensions; how far is estimated from the features themselves (Ledoit and Wolf, 2004),
not fixed, so that a large split is shrunk little and a small one much.

The threshold that :class:`~dp_model.contract.OODGate` holds is an order statistic of the
scores of held-out in-distribution images (the calibration split), chosen so that the share
of in-distribution images it turns away is at most ``FALSE_REJECTION`` with probability
``CONFIDENCE``: the ``r``-th smallest of ``n`` exchangeable scores lets through a share
distributed as Beta(r, n - r + 1) of future in-distribution images, whatever their
distribution. The 99 % quantile of 44 images, what bundles held before, turns away 3 % on
average and more than 1 % in most draws.

The statistics live in the bundle's ``models/ood.pt`` (tensors only; loaded with
``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

#: Weight of the scaled identity in the shrunk covariance, in bundles written before it was estimated.
SHRINKAGE = 0.1
#: The share of held-out in-distribution images that the gate lets through.
QUANTILE = 0.99
#: The gate turns away at most this share of in-distribution images ...
FALSE_REJECTION = 0.01
#: ... with this probability over the draw of the held-out images.
CONFIDENCE = 0.95


def classifier_layer(model: nn.Module) -> nn.Linear | None:
    """The layer whose input is the penultimate representation, one row per image, as the
    network names it (``classifier_layer``); None for a network that names none (CIA-Net,
    whose last linear layers belong to its alignment module and see other images too)."""
    return getattr(model, "classifier_layer", None)


@contextmanager
def penultimate(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, every forward pass appends its penultimate features ``(B, D)`` to the list."""
    layer = classifier_layer(model)
    if layer is None:
        raise ValueError(f"{type(model).__name__} names no classifier layer: no penultimate features for an out-of-distribution gate")
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().flatten(1).float()))
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
class FeatureStatistics:
    """Class means ``(K, D)`` and the shared precision ``(D, D)`` of the training features,
    and the shrinkage the covariance was fitted with (None when loaded: the file holds tensors only)."""

    means: Tensor
    precision: Tensor
    shrinkage: float | None = None

    @staticmethod
    def fit(features: Tensor, labels: np.ndarray, shrinkage: float | None = None) -> FeatureStatistics:
        """From training features ``(N, D)`` and class indices ``(N,)`` (classes with images only).

        ``shrinkage``: the weight of the scaled identity; None estimates it (Ledoit-Wolf on
        the class-centred features, whose target is the same scaled identity). Ledoit-Wolf
        rather than OAS: OAS assumes Gaussian features, and pooled ReLU features are not.
        """
        features = features.double()
        labels = np.asarray(labels)
        means, centred = [], []
        for k in np.unique(labels):
            rows = features[torch.from_numpy(labels == k)]
            means.append(rows.mean(0))
            centred.append(rows - rows.mean(0))
        centred_all = torch.cat(centred)
        covariance = centred_all.T @ centred_all / max(1, len(centred_all) - 1)
        scale = covariance.diagonal().mean().clamp_min(1e-12)
        if shrinkage is None:
            shrinkage = estimated_shrinkage(centred_all)
        shrunk = (1 - shrinkage) * covariance + shrinkage * scale * torch.eye(len(covariance), dtype=covariance.dtype)
        return FeatureStatistics(torch.stack(means).float(), torch.linalg.inv(shrunk).float(), float(shrinkage))

    def scores(self, features: Tensor) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``features`` to the nearest class mean."""
        difference = features.float()[:, None, :] - self.means[None]  # (N, K, D)
        distances = torch.einsum("nkd,de,nke->nk", difference, self.precision, difference)
        return distances.min(dim=1).values.cpu().numpy()

    def to(self, device: torch.device | str) -> FeatureStatistics:
        return FeatureStatistics(self.means.to(device), self.precision.to(device), self.shrinkage)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"means": self.means.contiguous(), "precision": self.precision.contiguous()}, path)

    @staticmethod
    def load(path: Path, features: int | None = None) -> FeatureStatistics:
        """Read and check: means ``(K, D)``, a symmetric positive-definite precision ``(D, D)``,
        finite, ``D == features`` when given.

        Raises:
            ValueError: what is wrong, in words.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor) for k in ("means", "precision")):
            raise ValueError("not a dict of tensors 'means' and 'precision'")
        means, precision = state["means"].float(), state["precision"].float()
        if means.ndim != 2 or precision.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]) or len(means) == 0:
            raise ValueError(f"shapes do not fit: means {tuple(means.shape)}, precision {tuple(precision.shape)}")
        if features is not None and means.shape[1] != features:
            raise ValueError(f"{means.shape[1]} feature dimensions, the network has {features}")
        if not (torch.isfinite(means).all() and torch.isfinite(precision).all()):
            raise ValueError("non-finite values")
        if not torch.allclose(precision, precision.T, rtol=1e-4, atol=1e-6) or torch.linalg.cholesky_ex(precision.double()).info != 0:
            raise ValueError("the precision is not symmetric positive-definite")
        return FeatureStatistics(means, precision)


def digest(path: Path) -> str:
    """SHA-256 of the statistics file: the contract records it, the loader checks it."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def threshold(held_out_scores: np.ndarray, quantile: float = QUANTILE) -> float:
    """The gate's threshold: the ``quantile`` of held-out in-distribution scores."""
    return float(np.quantile(np.asarray(held_out_scores, np.float64), quantile))


def estimated_shrinkage(centred: Tensor) -> float:
    """The Ledoit-Wolf weight of the scaled identity for centred features ``(N, D)``, in [0, 1].

    A single feature or a single image gives nothing to estimate from: full shrinkage."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    if centred.shape[0] < 2 or centred.shape[1] < 2:
        return 1.0
    return float(np.clip(ledoit_wolf_shrinkage(centred.double().cpu().numpy(), assume_centered=True), 0.0, 1.0))


def gate_rank(n: int, false_rejection: float = FALSE_REJECTION, confidence: float = CONFIDENCE) -> tuple[int, float]:
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
        raise ValueError(f"false_rejection and confidence lie in (0, 1), got {false_rejection}, {confidence}")
    reached = np.nonzero(binom.cdf(np.arange(n), n, 1 - false_rejection) >= confidence)[0]
    if len(reached):
        return int(reached[0]) + 1, float(false_rejection)
    return n, float(1 - (1 - confidence) ** (1 / n))


def certified_threshold(held_out_scores: np.ndarray, false_rejection: float = FALSE_REJECTION, confidence: float = CONFIDENCE) -> tuple[float, int, float]:
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
