"""Every classifier by name, and how their outputs become class scores.

The table itself is :data:`dp_model.networks.registry.ARCHITECTURES` (light: no PyTorch); this module
gives its names where bundle configs (``dp_model.networks.architectures.build_network``), tests and
the training code look for them; which are multi-label or pre-trainable is each entry's own flag.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..serving.contract import no_finding_probability, probabilities
from .classifier import Classifier
from .registry import ARCHITECTURES, Architecture, build_network

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "build_network",
    "class_scores",
    "output_probabilities",
]


def output_probabilities(
    model: Classifier, logits: Tensor, adjustment: tuple[float, ...] = ()
) -> Tensor:
    """Probabilities of a network's logits, uncalibrated: a sigmoid per finding, or a softmax
    over classes (:func:`dp_model.serving.contract.probabilities` at temperature 1, with the
    logit ``adjustment`` subtracted there), float32 on the logits' device; no gradient flows
    through them."""
    found = probabilities(
        logits.detach().float().cpu().numpy(), multi_label=model.multi_label, adjustment=adjustment
    )
    return torch.from_numpy(found).float().to(logits.device)


def class_scores(probabilities: Tensor, multi_label: bool, normal_index: int) -> Tensor:
    """``(N, C)`` scores over every class, the normal one included, whatever the output.

    Softmax probabilities are returned as they are. For per-finding sigmoids ``(N, C - 1)``
    the normal class scores :func:`~dp_model.serving.contract.no_finding_probability` (``1 - max_k
    p_k``) and the findings keep theirs, so that the argmax is "normal" exactly when no
    finding reaches 0.5, and single-label metrics compare every architecture on the same footing.
    """
    if not multi_label:
        return probabilities
    normal = no_finding_probability(probabilities)[:, None]
    return torch.cat(
        [probabilities[:, :normal_index], normal, probabilities[:, normal_index:]], dim=1
    )
