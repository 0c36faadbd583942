"""Scores and localization of a trained model on a resident split (no augmentation)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dp_transforms import boxes_to_masks

from ..metrics import localization_accuracy, mask_iou
from ..networks.architectures import class_scores, output_probabilities
from ..networks.explain import localization_maps
from .data import Resident
from .runtime import Runtime, unwrap


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Resident,
    runtime: Runtime,
    batch_size: int = 256,
    normal: int = 0,
    offsets: tuple[float, ...] = (),
) -> np.ndarray:
    """Class scores ``(N, C)`` of a resident split (no augmentation): softmax probabilities,
    or for a multi-label network its findings' sigmoids with the normal class (index
    ``normal``) scoring ``1 - max`` (:func:`~dp_model.networks.architectures.class_scores`). ``offsets``
    (the contract's ``logit_adjustment``) come off the logits where the contract's calibration
    takes them off (:func:`~dp_model.serving.contract.adjusted_logits`)."""
    model.eval()
    out = []
    net = unwrap(model)
    multi_label = net.multi_label
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(len(data), start + batch_size), device=data.images.device)
        x = data.batch(index)[0].to(runtime.device)
        with runtime.autocast():
            logits = model(runtime.prepare(x))
        probabilities = output_probabilities(net, logits, offsets)
        out.append(class_scores(probabilities, multi_label, normal).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def localization(
    model: nn.Module,
    data: Resident,
    classes: tuple[str, ...],
    normal: int = 0,
    batch_size: int = 64,
) -> dict[str, list[float]]:
    """Localization accuracy at :data:`~dp_model.metrics.IOU_THRESHOLDS` on the boxed images of ``data``.

    The model's region for an image is its :func:`~dp_model.networks.explain.localization_maps` map
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
    return localization_accuracy(
        np.concatenate(predicted), np.concatenate(truth), np.concatenate(labels), classes
    )


def _truth_masks(data: Resident, index: torch.Tensor) -> np.ndarray:
    size = data.images.shape[-1]
    return (boxes_to_masks(data.boxes[index].cpu(), (size, size))[:, 0] >= 0.5).numpy()


def region_ious(
    model: nn.Module, data: Resident, normal: int = 0, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Per boxed image of ``data``: the IoU of the model's region (:func:`localization`'s map of
    the image's class at 0.5) with the union of its boxes, and its class; what a paired
    comparison of two maps, or of a map and :func:`prior_maps`, resamples."""
    model.eval()
    device = next(model.parameters()).device
    iou, labels = [], []
    for part in torch.nonzero(data.has_boxes.cpu()).flatten().split(batch_size):
        x, _, y, _ = data.batch(part.to(data.images.device))
        maps = localization_maps(model, x.to(device), y.to(device), normal)
        iou.append(mask_iou((maps[:, 0] >= 0.5).cpu().numpy(), _truth_masks(data, part)))
        labels.append(y.cpu().numpy())
    return (
        (np.concatenate(iou), np.concatenate(labels))
        if iou
        else (np.zeros(0), np.zeros(0, np.int64))
    )


def prior_maps(train: Resident, num_classes: int) -> np.ndarray:
    """``(C, S, S)``: each class's mean box mask over its boxed training images, scaled to its
    peak (zeros for a class without boxes). Handed an image's true class, this map ignores the
    image: a learned map has to beat it to show that it looks at the lesion."""
    size = train.images.shape[-1]
    total, count = np.zeros((num_classes, size, size)), np.zeros(num_classes)
    for part in torch.nonzero(train.has_boxes.cpu()).flatten().split(256):
        labels = train.labels[part].cpu().numpy()
        np.add.at(total, labels, _truth_masks(train, part))
        np.add.at(count, labels, 1)
    mean = total / np.maximum(count, 1)[:, None, None]
    return (
        mean / np.maximum(mean.reshape(num_classes, -1).max(axis=1), 1e-12)[:, None, None]
    ).astype(np.float32)


def prior_ious(prior: np.ndarray, data: Resident) -> tuple[np.ndarray, np.ndarray]:
    """:func:`region_ious` for the prior map of each boxed image's true class (region: 0.5 of its peak)."""
    boxed = torch.nonzero(data.has_boxes.cpu()).flatten()
    labels = data.labels[boxed].cpu().numpy()
    if not len(boxed):
        return np.zeros(0), labels
    return mask_iou(prior[labels] >= 0.5, _truth_masks(data, boxed)), labels
