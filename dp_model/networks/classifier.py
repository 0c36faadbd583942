"""What every network of the framework gives: the :class:`Classifier` interface.

Training, evaluation, the model card, the out-of-distribution gate and the node's maps read
these members instead of probing a network for what it happens to have. Every network
derives from :class:`ClassifierBase`, which gives the defaults of a plain single-label
classifier without maps of its own, and overrides what it offers; ``tests/test_networks.py``
builds every entry of :data:`dp_model.networks.registry.ARCHITECTURES` and checks it against
:class:`Classifier`.

Like torchxrayvision's models, a network carries its own contract: ``multi_label`` says how
its logits become probabilities (:func:`dp_model.networks.architectures.output_probabilities`).
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

#: The residual stages of the ResNet trunks, by module name: ``attention_stages`` and
#: ``lesion_stage`` count them from 1, and the out-of-distribution gate's multi-layer detector
#: reads their pooled outputs.
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


@runtime_checkable
class Classifier(Protocol):
    """The interface of a Deep Pneumonia network.

    Attributes:
        multi_label: one sigmoid output per finding (the normal class has none), instead of
            a softmax over every class.
        attention_stages: residual stages (1 to 4) with an MGACR attention head, whose
            ``map+`` :meth:`attention_map` draws; empty for a network without them.
        lesion_stage: the stage of the supervised lesion head (:meth:`lesion_map`); 0 for none.
        has_class_maps: the network draws one map per output itself (:meth:`class_maps`).
        maps_are_detections: those maps are trained as detections, thresholded at 0.5 (CIA-Net's
            grid), rather than showing where a class looked (class attention).
        cam_exact: the logits are one linear layer over the global average of ``cam_layer``'s
            output, so CAM (Zhou et al. 2016) is exact.
        needs_references: inputs are contrasted with normal training images, which
            :meth:`set_references` must give before training (CIA-Net).
    """

    multi_label: bool
    attention_stages: tuple[int, ...]
    lesion_stage: int
    has_class_maps: bool
    maps_are_detections: bool
    cam_exact: bool
    needs_references: bool

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, outputs)`` of images ``(B, 1, H, W)`` in [0, 1], in eval and train mode."""
        ...

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output Grad-CAM weighs: the last spatial stage."""
        ...

    @property
    def classifier_layer(self) -> nn.Linear | None:
        """The linear layer whose input is the penultimate representation, one row per image,
        which the out-of-distribution gate reads; None where no such layer exists."""
        ...

    def class_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and one map per output ``(B, outputs, h, w)``, where ``has_class_maps``."""
        ...

    def attention_map(self, x: Tensor, stage: int | None = None) -> Tensor:
        """The learned ``map+`` of one of ``attention_stages``, at the input size."""
        ...

    def nearest_stage(self, preferred: int = 3) -> int:
        """The stage with an attention head nearest to ``preferred``."""
        ...

    def lesion_map(self, x: Tensor) -> Tensor:
        """The lesion head's probability map at the input size, where ``lesion_stage``."""
        ...

    def set_references(self, normals: Tensor, seed: int = 0) -> None:
        """Normal training images ``(N, 1, S, S)`` uint8 to contrast with, where ``needs_references``."""
        ...


class ClassifierBase(nn.Module):
    """The defaults of :class:`Classifier`: a single-label network without maps of its own.

    Subclasses set the flags they differ in and implement ``forward``, ``cam_layer`` and
    ``classifier_layer`` (which have no default: every network must say where they are).
    The map methods of an absent capability refuse with a one-line reason.
    """

    multi_label: ClassVar[bool] = False
    attention_stages: tuple[int, ...] = ()
    lesion_stage: int = 0
    has_class_maps: ClassVar[bool] = False
    maps_are_detections: ClassVar[bool] = False
    cam_exact: bool = False
    needs_references: ClassVar[bool] = False

    def class_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError(f"{type(self).__name__} draws no maps of its own")

    def attention_map(self, x: Tensor, stage: int | None = None) -> Tensor:
        raise ValueError("this network has no attention heads")

    def nearest_stage(self, preferred: int = 3) -> int:
        raise ValueError("this network has no attention heads")

    def lesion_map(self, x: Tensor) -> Tensor:
        raise ValueError("this network has no lesion head")

    def set_references(self, normals: Tensor, seed: int = 0) -> None:
        raise ValueError(f"{type(self).__name__} contrasts with no reference images")
