"""Out-of-distribution scores: Mahalanobis distance of the penultimate features.

Lee et al. (NeurIPS 2018): class-conditional Gaussians with a shared covariance, fitted on
the training split's features (the input of the network's last linear layer); an image's
score is its squared distance to the nearest class mean. The covariance is shrunk towards
a scaled identity, since a training split holds fewer images than the features have
dimensions. The threshold that :class:`~dp_model.contract.OODGate` holds is a quantile of
the scores of held-out in-distribution images (the validation split).

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

#: Weight of the scaled identity in the shrunk covariance.
SHRINKAGE = 0.1
#: The share of held-out in-distribution images that the gate lets through.
QUANTILE = 0.99


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
    """Class means ``(K, D)`` and the shared precision ``(D, D)`` of the training features."""

    means: Tensor
    precision: Tensor

    @staticmethod
    def fit(features: Tensor, labels: np.ndarray, shrinkage: float = SHRINKAGE) -> FeatureStatistics:
        """From training features ``(N, D)`` and class indices ``(N,)`` (classes with images only)."""
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
        shrunk = (1 - shrinkage) * covariance + shrinkage * scale * torch.eye(len(covariance), dtype=covariance.dtype)
        return FeatureStatistics(torch.stack(means).float(), torch.linalg.inv(shrunk).float())

    def scores(self, features: Tensor) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``features`` to the nearest class mean."""
        difference = features.float()[:, None, :] - self.means[None]  # (N, K, D)
        distances = torch.einsum("nkd,de,nke->nk", difference, self.precision, difference)
        return distances.min(dim=1).values.cpu().numpy()

    def to(self, device: torch.device | str) -> FeatureStatistics:
        return FeatureStatistics(self.means.to(device), self.precision.to(device))

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
