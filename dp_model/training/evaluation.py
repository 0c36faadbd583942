"""Scores and localization of a trained model on a resident split (no augmentation)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dp_transforms import boxes_to_masks

from ..architectures import class_scores, output_probabilities
from ..explain import localization_maps
from ..metrics import localization_accuracy
from .data import Resident
from .runtime import Runtime, unwrap


@torch.no_grad()
def predict(model: nn.Module, data: Resident, runtime: Runtime, batch_size: int = 256, normal: int = 0, offsets: tuple[float, ...] = ()) -> np.ndarray:
    """Class scores ``(N, C)`` of a resident split (no augmentation): softmax probabilities,
    or for a multi-label network its findings' sigmoids with the normal class (index
    ``normal``) scoring ``1 - max`` (:func:`~dp_model.networks.class_scores`). ``offsets``
    are subtracted from the logits first (the contract's ``logit_adjustment``)."""
    model.eval()
    out = []
    net = unwrap(model)
    multi_label = getattr(net, "multi_label", False)
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(len(data), start + batch_size), device=data.images.device)
        x = data.batch(index)[0].to(runtime.device)
        with runtime.autocast():
            logits = model(runtime.prepare(x))
        if offsets:
            logits = logits.float() - torch.tensor(offsets, device=logits.device)
        probabilities = output_probabilities(net, logits)
        out.append(class_scores(probabilities, multi_label, normal).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def localization(model: nn.Module, data: Resident, classes: tuple[str, ...], normal: int = 0, batch_size: int = 64) -> dict[str, list[float]]:
    """Localization accuracy at :data:`~dp_model.metrics.IOU_THRESHOLDS` on the boxed images of ``data``.

    The model's region for an image is its :func:`~dp_model.explain.localization_maps` map
    of the image's class at 0.5 or more; the truth is the union of the image's boxes.
    """
    model.eval()
    device = next(model.parameters()).device
    boxed = torch.nonzero(data.has_boxes.cpu()).flatten()
    predicted, truth, labels = [], [], []
    size = data.images.shape[-1]
    for part in boxed.split(batch_size):
        x, boxes, y, _ = data.batch(part.to(data.images.device))
        maps = localization_maps(model, x.to(device), y.to(device), normal)
        predicted.append((maps[:, 0] >= 0.5).cpu().numpy())
        truth.append((boxes_to_masks(boxes.cpu(), (size, size))[:, 0] >= 0.5).numpy())
        labels.append(y.cpu().numpy())
    if not predicted:
        return {}
    return localization_accuracy(np.concatenate(predicted), np.concatenate(truth), np.concatenate(labels), classes)
