"""Every classifier a bundle can name, as data: :data:`ARCHITECTURES`.

Configuration checks, the model card, which networks are multi-label or pre-trainable, and
the command line all read this one table, built by :func:`by_name`, which refuses two entries
of one name. It imports no PyTorch (a network class is named by its import
path, as a bundle config's ``_target_`` names it, and imported when built), so that
``dp-train --help`` and config validation stay light, and so that :mod:`dp_model.networks.networks`,
which gives ``build_network`` to the configs of older bundles, can import it plainly.
``tests/test_networks.py`` builds every entry and checks it against
:class:`~dp_model.networks.classifier.Classifier`.

What stage II does differently for a network (its constructor options from the training
config, a loss of its own paper, logit offsets, its model card's text) is data of its entry
too: ``"module:function"`` names, resolved on use like ``network``, so that the training code
compares no architecture names and this module imports none of it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .classifier import Classifier


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """One network a bundle can name.

    Attributes:
        name: the key that ``finetune.architecture`` and a bundle's contract use.
        network: ``"module:Class"`` of the network, called as ``Class(num_classes=...,
            **arguments, **options)``; ``num_classes`` counts its outputs (the findings
            alone where ``multi_label``), ``options`` are the contract's.
        description: one line for metadata.json and the model card.
        arguments: constructor arguments fixed by this entry (a torchvision model's name).
        multi_label: one sigmoid output per finding (equals the built network's own flag).
        pretrainable: a ResNet18 trunk that stage I's SimCLR encoder initialises.
        attention: takes MGACR attention heads (``attention_stages``); stage II gives it
            ``mgacr.stages`` when a MGACR term is on.
        options: ``"module:function"`` of the constructor options a training config sets,
            ``(FinetuneConfig, image_size) -> dict`` (they travel in the contract); None: none.
        loss: ``"module:function"`` building the loss of the network's own paper,
            ``(FinetuneConfig, counts, names, total) -> nn.Module`` with the training split's
            counts and names of the network's outputs (the findings alone where
            ``multi_label``) and its number of images; None: the configured ``finetune.loss``
            (single-label networks only).
        logit_adjustment: ``"module:function"`` of the contract's logit offsets,
            ``(FinetuneConfig, class_counts, normal_index) -> tuple[float, ...]``; None: none.
        card: ``"module:function"`` of the network's own text in the model card,
            ``(TrainConfig) -> CardText``; None: ``description`` and the configured loss.
    """

    name: str
    network: str
    description: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    multi_label: bool = False
    pretrainable: bool = False
    attention: bool = False
    options: str | None = None
    loss: str | None = None
    logit_adjustment: str | None = None
    card: str | None = None

    def build(self, num_classes: int, **options: Any) -> Classifier:
        """The network with ``num_classes`` outputs; ``options`` go to its constructor."""
        network = resolve(self.network)
        return network(num_classes=num_classes, **self.arguments, **options)


def resolve(path: str) -> Any:
    """What a ``"module:name"`` of an entry names, imported now."""
    module, _, name = path.partition(":")
    return vars(importlib.import_module(module))[name]


def by_name(entries: Iterable[Architecture]) -> dict[str, Architecture]:
    """The table of ``entries`` by their names.

    Raises:
        ValueError: two entries have one name; the later would otherwise replace the earlier
            without a word, and configs naming it would train another network.
    """
    table: dict[str, Architecture] = {}
    for entry in entries:
        if entry.name in table:
            raise ValueError(
                f"architecture {entry.name!r} is registered twice ({table[entry.name].network} and {entry.network}); give each entry its own name"
            )
        table[entry.name] = entry
    return table


_PAPER_BASELINE = "baseline trained from scratch (the Deep Pneumonia paper's Table II)."

ARCHITECTURES: dict[str, Architecture] = by_name(
    (
        Architecture(
            name="resnet18",
            network="dp_model.networks.networks:DeepPneumoniaNet",
            pretrainable=True,
            attention=True,
            options="dp_model.training.objectives:lesion_head_options",
            card="dp_model.training.card:deep_pneumonia_text",
            description="Deep Pneumonia: ResNet18 with SimCLR pre-training, mask-guided attention with contrastive regulation and a class-balanced focal loss.",
        ),
        Architecture(
            name="resnet50",
            network="dp_model.networks.networks:BaselineNet",
            arguments={"architecture": "resnet50", "cam_layer": "layer4", "cam_exact": True},
            description=f"ResNet-50 {_PAPER_BASELINE}",
        ),
        # three linear layers after the pool: CAM is not exact; features.28 is the last convolution
        Architecture(
            name="vgg16",
            network="dp_model.networks.networks:BaselineNet",
            arguments={"architecture": "vgg16", "cam_layer": "features.28"},
            description=f"VGG16 {_PAPER_BASELINE}",
        ),
        # features ends in a batch norm; a ReLU comes before the pool, so CAM is not exact
        Architecture(
            name="densenet121",
            network="dp_model.networks.networks:BaselineNet",
            arguments={"architecture": "densenet121", "cam_layer": "features"},
            description="DenseNet-121 baseline trained from scratch (the network of CheXNet, Rajpurkar et al. 2017).",
        ),
        Architecture(
            name="attention_resnet50",
            network="dp_model.networks.networks:AttentionResNet50",
            description="Attention-enhanced ResNet-50: channel and spatial attention side branches in every residual stage, trained with a modified focal loss with 1/sqrt(n) class weights.",
        ),
        Architecture(
            name="class_attention",
            network="dp_model.networks.variants:ClassAttentionNet",
            multi_label=True,
            pretrainable=True,
            options="dp_model.training.objectives:class_attention_options",
            loss="dp_model.training.objectives:class_attention_objective",
            logit_adjustment="dp_model.training.objectives:class_attention_offsets",
            card="dp_model.training.card:class_attention_text",
            description="Class-based attention: attention gates on three residual stages with the third replicated per finding, one sigmoid per finding, "
            "trained with positive weights n_min^2/n_i and the entropy of absent findings' attention maps maximised.",
        ),
        Architecture(
            name="cia_net",
            network="dp_model.networks.variants:CIANet",
            multi_label=True,
            pretrainable=True,
            options="dp_model.training.objectives:cia_options",
            loss="dp_model.training.objectives:cia_objective",
            card="dp_model.training.card:cia_text",
            description="CIA-Net: contrast-induced attention against the most similar normal image, an alignment module towards a canonical chest, "
            "and a class-aware grid trained with box-level and MIL losses, so that images without boxes train too.",
        ),
    )
)


def build_network(
    architecture: str, num_classes: int, attention_stages: Sequence[int] = (), **options: Any
) -> Classifier:
    """The classifier of ``architecture`` (a key of :data:`ARCHITECTURES`); ``attention_stages``
    are MGACR heads, for the architectures that take them.

    ``num_classes`` counts the outputs: every class for the single-label architectures, the
    findings alone for the multi-label ones. Bundle configs name this function (as
    ``dp_model.networks.architectures.build_network``; bundles written before 2026-12-06 as
    ``dp_model.architectures.build_network``, and before 2026-12-01 as
    ``dp_model.networks.build_network``).
    """
    entry = ARCHITECTURES.get(architecture)
    if entry is None:
        raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}")
    if entry.attention:
        return entry.build(num_classes, attention_stages=attention_stages, **options)
    if attention_stages:
        heads = " or ".join(name for name, a in ARCHITECTURES.items() if a.attention)
        raise ValueError(f"MGACR attention heads need the {heads} architecture, not {architecture}")
    return entry.build(num_classes, **options)
