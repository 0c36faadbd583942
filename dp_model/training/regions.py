"""Whether a bundle's lesion regions are worth drawing: every map source against a fixed prior.

A map that ignores the image can localize: each class's mean training box, handed the true
class, overlaps many boxes because lesions of a type sit in the same zones. So a learned map
is measured against that prior, on the same held-out images, handed the same class, and the
regions are shown only when it beats it by the contract's rule
(:func:`~dp_model.serving.contract.regions_earned`). The source is chosen on the validation split;
the test split is reported once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from dp_transforms import boxes_to_masks

from ..metrics import localization_figures, mask_iou, paired_difference_low, pointing_game
from ..networks.explain import CAM, CLASS_MAPS, GRAD_CAM, default_source, map_sources, source_maps
from ..serving.contract import REGION_MARGIN, Localization, regions_earned
from .data import Resident

logger = logging.getLogger(__name__)

#: A pixel belongs to a map's region at this value (the node's ``REGION_THRESHOLD``); the
#: prior map is scaled to its peak first, so its region is where it reaches half its peak.
THRESHOLD = 0.5
#: Ties on validation go to the cheaper source at inference: the network's own maps come
#: with the forward pass, CAM needs the classifier's weights, Grad-CAM a backward pass.
COST = {CLASS_MAPS: 0, CAM: 1, GRAD_CAM: 2}  # map+ comes with the forward pass too: 0


@dataclass(frozen=True)
class Scores:
    """Per boxed image: the IoU of the region with the union of the boxes, the pointing game,
    and the class."""

    iou: np.ndarray
    pointing: np.ndarray
    labels: np.ndarray

    def figures(self) -> dict[str, float]:
        return localization_figures(self.iou, self.pointing, self.labels)


def _truth(data: Resident, index: Tensor) -> np.ndarray:
    size = data.images.shape[-1]
    return (boxes_to_masks(data.boxes[index].cpu(), (size, size))[:, 0] >= 0.5).numpy()


def _boxed(data: Resident) -> Tensor:
    return torch.nonzero(data.has_boxes.cpu()).flatten()


def prior_maps(train: Resident, num_classes: int) -> np.ndarray:
    """``(C, S, S)``: each class's mean box mask over its boxed training images, scaled to its
    peak (zeros for a class without boxes)."""
    size = train.images.shape[-1]
    total, count = np.zeros((num_classes, size, size), np.float64), np.zeros(num_classes)
    boxed = _boxed(train)
    for part in boxed.split(256):
        masks, labels = _truth(train, part), train.labels[part].cpu().numpy()
        np.add.at(total, labels, masks)
        np.add.at(count, labels, 1)
    mean = total / np.maximum(count, 1)[:, None, None]
    return (
        mean / np.maximum(mean.reshape(num_classes, -1).max(axis=1), 1e-12)[:, None, None]
    ).astype(np.float32)


def _score(maps: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return mask_iou(maps >= THRESHOLD, truth), pointing_game(maps, truth)


def prior_scores(prior: np.ndarray, data: Resident, batch_size: int = 256) -> Scores:
    """The prior map of each boxed image's true class, scored against its boxes."""
    iou, pointing, labels = [], [], []
    for part in _boxed(data).split(batch_size):
        y = data.labels[part].cpu().numpy()
        found = _score(prior[y], _truth(data, part))
        iou.append(found[0]), pointing.append(found[1]), labels.append(y)
    return _joined(iou, pointing, labels)


def source_scores(
    model: nn.Module, data: Resident, source: str, normal: int = 0, batch_size: int = 64
) -> Scores:
    """The maps of ``source`` for each boxed image's true class, scored against its boxes."""
    model.eval()
    device = next(model.parameters()).device
    iou, pointing, labels = [], [], []
    for part in _boxed(data).split(batch_size):
        x, _, y, _ = data.batch(part.to(data.images.device))
        maps = (
            source_maps(model, x.to(device), source, y.to(device), normal)[:, 0]
            .float()
            .cpu()
            .numpy()
        )
        found = _score(maps, _truth(data, part))
        iou.append(found[0]), pointing.append(found[1]), labels.append(y.cpu().numpy())
    return _joined(iou, pointing, labels)


def _joined(iou: list, pointing: list, labels: list) -> Scores:
    if not iou:
        return Scores(np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
    return Scores(np.concatenate(iou), np.concatenate(pointing), np.concatenate(labels))


def _order(source: str, figures: dict[str, float]) -> tuple:
    """Sort key: the best validation IoU > 0.3 accuracy, then pointing game, then the cheapest."""
    nan_last = [-v if np.isfinite(v) else np.inf for v in (figures["iou>0.3"], figures["pointing"])]
    return (*nan_last, COST.get(source, 0), source)


def measure(
    model: nn.Module,
    train: Resident,
    val: Resident,
    test: Resident,
    num_classes: int,
    normal: int = 0,
    seed: int = 0,
) -> Localization:
    """Every map source of ``model`` and the prior on validation, the chosen one on test, and
    the decision (:func:`~dp_model.serving.contract.regions_earned`)."""
    prior = prior_maps(train, num_classes)
    prior_val, prior_test = prior_scores(prior, val), prior_scores(prior, test)
    scored = {source: source_scores(model, val, source, normal) for source in map_sources(model)}
    candidates = {source: scores.figures() for source, scores in scored.items()}
    chosen = (
        min(candidates, key=lambda s: _order(s, candidates[s]))
        if candidates
        else default_source(model)
    )
    if chosen not in scored:  # a network with no map at all: nothing to measure
        return Localization(
            source=chosen,
            shown=False,
            images={"validation": len(prior_val.iou), "test": len(prior_test.iou)},
        )
    low = (
        paired_difference_low(
            scored[chosen].iou > 0.3, prior_val.iou > 0.3, prior_val.labels, seed=seed
        )
        if len(prior_val.iou)
        else float("nan")
    )
    shown = regions_earned(candidates[chosen], prior_val.figures(), low, REGION_MARGIN)
    located = Localization(
        source=chosen,
        shown=shown,
        margin=REGION_MARGIN,
        validation=candidates[chosen],
        test=source_scores(model, test, chosen, normal).figures(),
        prior_validation=prior_val.figures(),
        prior_test=prior_test.figures(),
        difference_low=low,
        candidates=candidates,
        images={"validation": len(prior_val.iou), "test": len(prior_test.iou)},
    )
    logger.info(
        "localization: %s chosen on validation (IoU>0.3 %.3f, pointing %.3f; prior %.3f, %.3f): regions %s",
        chosen,
        located.validation["iou>0.3"],
        located.validation["pointing"],
        located.prior_validation["iou>0.3"],
        located.prior_validation["pointing"],
        "shown" if shown else "not shown",
    )
    return located
