"""Every classifier by name: the Deep Pneumonia network, the Table II baselines and the variants.

This module sits above :mod:`dp_model.networks` and :mod:`dp_model.variants` (which builds on
the networks), so that neither imports the other's dependants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .networks import AttentionResNet50, BaselineNet, DeepPneumoniaNet
from .variants import CIANet, ClassAttentionNet

ARCHITECTURES = ("resnet18", "resnet50", "vgg16", "attention_resnet50", "class_attention", "cia_net")
#: Those with one sigmoid output per finding (the normal class is none of them).
MULTI_LABEL = ("class_attention", "cia_net")


def build_network(architecture: str, num_classes: int, attention_stages: Sequence[int] = (), **options) -> nn.Module:
    """The classifier of ``architecture``; ``attention_stages`` are MGACR heads (resnet18 only).

    ``num_classes`` counts the outputs: every class for the single-label architectures, the
    findings alone for :data:`MULTI_LABEL` ones. ``options`` go to the variant's constructor.
    """
    if architecture == "resnet18":
        return DeepPneumoniaNet(num_classes=num_classes, attention_stages=attention_stages, **options)
    if attention_stages:
        raise ValueError(f"MGACR attention heads need the resnet18 architecture, not {architecture}")
    if architecture == "attention_resnet50":
        return AttentionResNet50(num_classes, **options)
    if architecture in BaselineNet.ARCHITECTURES:
        return BaselineNet(architecture, num_classes, **options)
    if architecture in MULTI_LABEL:
        return (ClassAttentionNet if architecture == "class_attention" else CIANet)(num_classes, **options)
    raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}")


def output_probabilities(model: nn.Module, logits: Tensor) -> Tensor:
    """Probabilities of a network's logits: a sigmoid per finding, or a softmax over classes."""
    return torch.sigmoid(logits.float()) if getattr(model, "multi_label", False) else logits.float().softmax(dim=1)


def class_scores(probabilities: Tensor, multi_label: bool, normal_index: int) -> Tensor:
    """``(N, C)`` scores over every class, the normal one included, whatever the output.

    Softmax probabilities are returned as they are. For per-finding sigmoids ``(N, C - 1)``
    the normal class scores ``1 - max_k p_k`` and the findings keep theirs, so that the
    argmax is "normal" exactly when no finding reaches 0.5, and single-label metrics compare
    every architecture on the same footing.
    """
    if not multi_label:
        return probabilities
    normal = 1.0 - probabilities.amax(dim=1, keepdim=True)
    return torch.cat([probabilities[:, :normal_index], normal, probabilities[:, normal_index:]], dim=1)
