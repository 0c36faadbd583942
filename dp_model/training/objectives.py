"""What stage II builds from its configuration: the network, the losses, the optimizer, the class helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks.architectures import ARCHITECTURES, build_network
from ..networks.losses import (
    CBFocalLoss,
    ClassAttentionLoss,
    MGACRLoss,
    SqrtFocalLoss,
    cia_loss,
    class_attention_weights,
    consistency_loss,
    feature_reconstruction_loss,
)
from ..networks.registry import resolve
from ..networks.variants import warp
from .config import FinetuneConfig, PretrainConfig


def network_options(config: FinetuneConfig, image_size: int) -> dict:
    """The constructor options of the configured network (they travel in the bundle's contract),
    as its registry entry's ``options`` sets them."""
    options = ARCHITECTURES[config.architecture].options
    return {} if options is None else resolve(options)(config, image_size)


def lesion_head_options(config: FinetuneConfig, image_size: int) -> dict:
    """Deep Pneumonia's lesion head, where a MGACR term is on and ``mgacr.lesion_stage`` names one."""
    m = config.mgacr
    return {"lesion_stage": m.lesion_stage} if m.enabled and m.lesion_stage else {}


def class_attention_options(config: FinetuneConfig, image_size: int) -> dict:
    return {"dim": config.class_attention.dim}


def cia_options(config: FinetuneConfig, image_size: int) -> dict:
    c = config.cia
    return {
        "image_size": image_size,
        "bank_size": c.bank_size,
        "negative_sampling": c.negative_sampling,
        "alignment": c.alignment,
        "grid_upsample": c.grid_upsample,
    }


def normal_index(class_names: list[str] | tuple[str, ...]) -> int:
    """The class meaning "no pneumonia": "normal" when there is one, else the first."""
    return class_names.index("normal") if "normal" in class_names else 0


def findings(class_names: list[str] | tuple[str, ...], normal: int) -> list[int]:
    """Indices of the classes a multi-label network has an output for: all but the normal one."""
    return [i for i in range(len(class_names)) if i != normal]


def build_classifier(
    config: FinetuneConfig,
    num_classes: int,
    encoder: dict[str, Tensor] | None,
    seed: int,
    image_size: int = 224,
) -> nn.Module:
    """The stage II network: MGACR heads (where its entry takes them) only when a MGACR term
    is switched on; ``encoder`` (stage I's) initialises its ResNet18 trunk.

    ``num_classes`` counts every class; a multi-label network gets one output per finding.
    """
    torch.manual_seed(seed)
    entry = ARCHITECTURES[config.architecture]
    outputs = num_classes - 1 if entry.multi_label else num_classes
    stages = config.mgacr.stages if entry.attention and config.mgacr.enabled else ()
    net = build_network(config.architecture, outputs, stages, **network_options(config, image_size))
    if encoder is not None:
        net.load_encoder(encoder)
    return net


def classification_loss(
    config: FinetuneConfig, class_counts: list[int], class_names: list[str]
) -> nn.Module:
    loss = config.loss
    if loss.kind == "ce":
        return nn.CrossEntropyLoss()
    if loss.kind == "sqrt_focal":
        return SqrtFocalLoss(
            class_counts,
            alpha=loss.alpha,
            gamma=loss.gamma,
            normal_index=normal_index(class_names),
            class_names=class_names,
        )
    beta = loss.beta if loss.kind == "cb_focal" else 0.0  # beta 0: equal weights, plain focal loss
    return CBFocalLoss(
        class_counts, beta=beta, gamma=loss.gamma, mode=loss.mode, class_names=class_names
    )


def mgacr_loss(config: FinetuneConfig) -> MGACRLoss | None:
    m = config.mgacr
    if not m.enabled:
        return None
    return MGACRLoss(
        m.att_weight if m.attention else 0.0,
        m.feat_weight if m.feature_cr else 0.0,
        m.normal_images,
        m.eps,
        m.feature_form,
        m.relative,
        m.lesion_weight,
    )


def make_optimizer(
    config: FinetuneConfig | PretrainConfig, model: nn.Module
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW, from a stage's configuration."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=True,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def stage_two_loss(
    config: FinetuneConfig, class_counts: list[int], class_names: list[str]
) -> nn.Module:
    """The loss stage II trains with: the one of the network's own paper (its registry entry's
    ``loss``), or else the configured classification loss.

    ``class_counts`` and ``class_names`` cover every class of the training split; an entry's
    loss gets those of the network's outputs (the findings alone for a multi-label network)
    and the number of training images (the balanced class weights need it).
    """
    entry = ARCHITECTURES[config.architecture]
    if entry.loss is None:
        if entry.multi_label:
            raise ValueError(f"the multi-label architecture {entry.name} names no loss of its own")
        return classification_loss(config, class_counts, class_names)
    outputs = (
        findings(class_names, normal_index(class_names))
        if entry.multi_label
        else range(len(class_names))
    )
    return resolve(entry.loss)(
        config,
        [class_counts[i] for i in outputs],
        [class_names[i] for i in outputs],
        sum(class_counts),
    )


def class_attention_objective(
    config: FinetuneConfig, positive_counts: list[int], names: list[str], total: int
) -> nn.Module:
    """Class-based attention's Eq. 5."""
    c = config.class_attention
    return ClassAttentionLoss(positive_counts, c.entropy_weight, names, c.class_weights, total)


def cia_objective(
    config: FinetuneConfig, positive_counts: list[int], names: list[str], total: int
) -> nn.Module:
    """CIA-Net's Eq. 6 and alignment losses; assembled in :func:`multi_label_step`."""
    c = config.cia
    return CIAObjective(c.box_weight, c.feature_weight, c.consistency_weight)


def grid_targets(mask: Tensor, theta: Tensor | None, size: tuple[int, int]) -> Tensor:
    """CIA-Net's positive cells: those overlapping a box projected into the grid's frame.

    The grid is computed on the aligned input, so the mask (in the input's frame) is first
    warped by the same alignment (the paper's "projected ground truth box").
    """
    if theta is not None:
        mask = warp(mask, theta)
    return (F.adaptive_max_pool2d(mask.float(), tuple(size)) > 0.01).float()


class CIAObjective(nn.Module):
    """Eq. 6 plus the alignment's feature reconstruction (Eq. 2) and consistency losses."""

    def __init__(self, box_weight: float, feature_weight: float, consistency_weight: float) -> None:
        super().__init__()
        self.box_weight, self.feature_weight, self.consistency_weight = (
            box_weight,
            feature_weight,
            consistency_weight,
        )

    def forward(
        self, net: nn.Module, outputs, targets: Tensor, mask: Tensor, has_boxes: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        grid = outputs.grid
        cells = grid_targets(mask, outputs.theta, grid.shape[-2:])
        boxed = targets * has_boxes[:, None].float()  # lambda: class k of the image has a box
        detection = cia_loss(
            grid, targets[:, :, None, None] * cells, boxed, targets, self.box_weight
        )
        parts = {"cia": detection}
        loss = detection
        if outputs.aligned is not None:
            canonical = net.canonical.expand_as(outputs.aligned)
            feature = feature_reconstruction_loss(net.probe(outputs.aligned), net.probe(canonical))
            consistency = consistency_loss(outputs.aligned, canonical)
            loss = loss + self.feature_weight * feature + self.consistency_weight * consistency
            parts |= {"align_feat": feature, "align_consistency": consistency}
        return loss, parts


def logit_adjustment(
    config: FinetuneConfig, class_counts: list[int], normal: int
) -> tuple[float, ...]:
    """The contract's logit offsets, as the network's registry entry computes them from the
    training split's ``class_counts``, else none."""
    rule = ARCHITECTURES[config.architecture].logit_adjustment
    return () if rule is None else tuple(resolve(rule)(config, class_counts, normal))


def class_attention_offsets(
    config: FinetuneConfig, class_counts: list[int], normal: int
) -> tuple[float, ...]:
    """``log c_i`` per finding with ``class_attention.logit_adjustment`` on (the weights its
    loss trained with, from the training split's counts), else none."""
    if not config.class_attention.logit_adjustment:
        return ()
    positives = [class_counts[i] for i in findings(list(range(len(class_counts))), normal)]
    weights = class_attention_weights(
        positives, config.class_attention.class_weights, sum(class_counts)
    )
    return tuple(round(float(w), 6) for w in torch.log(weights.double()))
