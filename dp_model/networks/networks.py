"""Deep Pneumonia networks: ResNet18, the MGACR attention heads, the baselines and the SimCLR
model. :data:`dp_model.networks.registry.ARCHITECTURES` names each classifier.

The ResNet18 trunk (:mod:`dp_model.networks.backbones`) is torchvision's, built with MONAI. Every
classifier gives the :class:`~dp_model.networks.classifier.Classifier` interface.

:class:`DeepPneumoniaNet` in ``forward`` returns logits only, in train and eval mode
alike, so a bundle's ``verify_net_in_out`` and the node see a plain classifier; MGACR is a
training aid (paper, section V.B) reached through :meth:`DeepPneumoniaNet.forward_train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import STAGE_CHANNELS, Normalize, pooled, resnet18, stem
from .classifier import STAGE_NAMES, ClassifierBase

# named by the configs of bundles written before 2026-12-01
from .registry import build_network as build_network


class SpatialAttention(nn.Module):
    """CBAM spatial attention: channel mean and max, a 7 x 7 convolution, a sigmoid.

    Returns a ``(B, 1, H, W)`` map in (0, 1).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        summary = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(summary))


class MGACRHead(nn.Module):
    """The two attention maps of one stage: ``map+`` (lesion) and ``map-`` (elsewhere), Eq. 2-3."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.positive = SpatialAttention(kernel_size)
        self.negative = SpatialAttention(kernel_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.positive(x), self.negative(x)


@dataclass
class StageOutput:
    """What MGACR needs from one residual stage."""

    features: Tensor
    map_pos: Tensor
    map_neg: Tensor
    name: str = ""  # the residual stage ("layer1" to "layer4"), for per-stage loss records
    #: logits of the supervised lesion head, on the stage that carries it (None elsewhere)
    lesion: Tensor | None = None


class DeepPneumoniaNet(ClassifierBase):
    """ResNet18 classifier with MGACR attention heads on the chosen residual stages.

    Args:
        num_classes: number of classes.
        in_channels: image channels (1 for radiographs).
        attention_stages: which stages (1 to 4) get an MGACR head; empty for a plain ResNet18.
        attention_kernel: kernel size of the attention convolutions.
        lesion_stage: the stage (one of ``attention_stages``) whose features also feed a
            supervised lesion head, a 1x1 convolution trained per pixel against the box mask
            (``mgacr.lesion_stage``); 0 for none. Training only, like the MGACR heads: the
            logits do not depend on it.
    """

    #: Logits are one linear layer over the global average of ``cam_layer``: CAM is exact.
    cam_exact = True

    def __init__(
        self,
        num_classes: int = 5,
        in_channels: int = 1,
        attention_stages: Sequence[int] = (1, 2, 3, 4),
        attention_kernel: int = 7,
        lesion_stage: int = 0,
    ) -> None:
        super().__init__()
        stages = tuple(int(s) for s in attention_stages)
        if any(s not in (1, 2, 3, 4) for s in stages) or len(set(stages)) != len(stages):
            raise ValueError(
                f"attention_stages must be distinct values from 1 to 4, got {list(attention_stages)}"
            )
        if lesion_stage and lesion_stage not in stages:
            raise ValueError(
                f"lesion_stage must be 0 or one of the attention stages {list(stages)}, got {lesion_stage}"
            )
        self.normalize = Normalize()
        self.backbone = resnet18(in_channels, num_classes)
        self.attention_stages = stages
        self.heads = nn.ModuleDict(
            {STAGE_NAMES[s - 1]: MGACRHead(attention_kernel) for s in stages}
        )
        self.lesion_stage = int(lesion_stage)
        self.lesion_head = (
            nn.Conv2d(STAGE_CHANNELS[lesion_stage - 1], 1, 1) if lesion_stage else None
        )

    def forward(
        self, x: Tensor, train_outputs: bool = False
    ) -> Tensor | tuple[Tensor, list[StageOutput]]:
        """Logits ``(B, num_classes)`` of images in [0, 1]; the attention heads are not run.

        With ``train_outputs`` (training only), :meth:`forward_train`'s result instead; the
        flag lets wrappers such as DistributedDataParallel, which only see ``forward``,
        reach the MGACR outputs.
        """
        if train_outputs:
            return self.forward_train(x)
        return self.backbone(self.normalize(x))

    def load_encoder(self, encoder: dict[str, Tensor]) -> None:
        """Stage I's SimCLR encoder into the trunk; only the classifier layer stays as built."""
        missing, unexpected = self.backbone.load_state_dict(encoder, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise ValueError(
                f"pre-trained encoder does not fit: missing {missing}, unexpected {unexpected}"
            )

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """Outputs of the four residual stages."""
        out, features = stem(self.backbone, self.normalize(x)), []
        for name in STAGE_NAMES:
            out = getattr(self.backbone, name)(out)
            features.append(out)
        return features

    def forward_train(self, x: Tensor) -> tuple[Tensor, list[StageOutput]]:
        """Logits and, for every stage with a head, its features and attention maps."""
        features = self.stage_features(x)
        logits = self.backbone.fc(pooled(self.backbone, features[-1]))
        outputs = []
        for name, stage in zip(STAGE_NAMES, features):
            if name in self.heads:
                map_pos, map_neg = self.heads[name](stage)
                lesion = (
                    self.lesion_head(stage)
                    if self.lesion_head is not None and name == STAGE_NAMES[self.lesion_stage - 1]
                    else None
                )
                outputs.append(StageOutput(stage, map_pos, map_neg, name, lesion))
        return logits, outputs

    @property
    def cam_layer(self) -> nn.Module:
        """Where Grad-CAM looks: the last residual stage."""
        return self.backbone.layer4

    @property
    def classifier_layer(self) -> nn.Linear:
        """The linear layer whose input (one row per image) is the penultimate representation."""
        return self.backbone.fc

    def nearest_stage(self, preferred: int = 3) -> int:
        """The stage with a head nearest to ``preferred`` (the deeper one on a tie)."""
        if not self.attention_stages:
            raise ValueError("this network has no attention heads")
        return min(self.attention_stages, key=lambda s: (abs(s - preferred), -s))

    @torch.no_grad()
    def attention_map(self, x: Tensor, stage: int | None = None) -> Tensor:
        """The learned ``map+`` of one stage (default: the deepest with a head), upsampled to the input size."""
        if not self.attention_stages:
            raise ValueError("this network has no attention heads")
        stage = stage or max(self.attention_stages)
        if stage not in self.attention_stages:
            raise ValueError(
                f"stage {stage} has no attention head; heads are on {list(self.attention_stages)}"
            )
        features = self.stage_features(x)[stage - 1]
        map_pos, _ = self.heads[STAGE_NAMES[stage - 1]](features)
        return F.interpolate(map_pos, size=x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def lesion_map(self, x: Tensor) -> Tensor:
        """The supervised lesion head's probability map, upsampled to the input size."""
        if self.lesion_head is None:
            raise ValueError("this network has no lesion head")
        features = self.stage_features(x)[self.lesion_stage - 1]
        return F.interpolate(
            self.lesion_head(features).sigmoid(),
            size=x.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )


class BaselineNet(ClassifierBase):
    """A torchvision classification model built by name, without pre-trained weights, for
    one-channel images in [0, 1] (normalised like the other networks' inputs); the paper's
    Table II baselines (ResNet-50, VGG16) and DenseNet-121 are its registry entries.

    torchvision builds the model with ``num_classes`` outputs; then the first ``nn.Conv2d`` in
    module order (the stem, in torchvision's classifiers) is replaced by a new one-channel one
    with the same output channels, kernel size, stride, padding and bias, under the same name,
    so that the state dict keeps torchvision's parameter names.

    Not every torchvision classifier fits: its ``forward`` must return the logits in training
    too (GoogLeNet and Inception v3 add auxiliary outputs) and take the training image size
    (the vision transformers and MaxViT take 224 pixels only). One that does not end in an
    ``nn.Linear`` (SqueezeNet ends in a convolution) trains, but has no
    :attr:`classifier_layer`, so the out-of-distribution gate has no penultimate
    representation to read (and ``cam_exact`` must not be declared for it).

    Args:
        architecture: a name of ``torchvision.models.list_models(torchvision.models)``
            ("resnet50", "vgg16", "densenet121", ...).
        num_classes: number of classes.
        cam_layer: dotted name of the module Grad-CAM looks at, whose output is a
            ``(B, C, h, w)`` feature map: the last convolutional stage ("layer4" of a ResNet,
            "features" of a DenseNet or an EfficientNet). Not checked here; the network tests
            draw Grad-CAM at each registry entry's.
        cam_exact: declares that the logits are one linear layer over the global average of
            ``cam_layer``'s output, so that CAM is offered. Not checked here; the network
            tests compare CAM with Grad-CAM for each registry entry that declares it.
    """

    def __init__(
        self,
        architecture: str,
        num_classes: int = 5,
        cam_layer: str = "layer4",
        cam_exact: bool = False,
    ) -> None:
        super().__init__()
        import torchvision

        if architecture not in torchvision.models.list_models(torchvision.models):
            raise ValueError(f"architecture must be a torchvision classifier, got {architecture!r}")
        self.architecture = architecture
        self.normalize = Normalize()
        net = getattr(torchvision.models, architecture)(num_classes=num_classes)
        name, first = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
        one_channel = nn.Conv2d(
            1,
            first.out_channels,
            first.kernel_size,
            first.stride,
            first.padding,
            bias=first.bias is not None,
        )
        net.set_submodule(name, one_channel)
        self.net = net
        self._cam_layer = cam_layer
        self.cam_exact = cam_exact

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    @property
    def classifier_layer(self) -> nn.Linear | None:
        """The last ``nn.Linear`` in module order, which gives the logits: its input (one row
        per image) is the penultimate representation. None for a model without one
        (SqueezeNet's logits come from a convolution)."""
        linear = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        return linear[-1] if linear else None

    @property
    def cam_layer(self) -> nn.Module:
        """Where Grad-CAM looks: the module that ``cam_layer`` names."""
        return self.net.get_submodule(self._cam_layer)


class SideBranchAttention(nn.Module):
    """Channel and spatial attention side branches fused into a residual stage (seed 004).

    Two side branches each reduce the stage's features with a stride-2 convolution and
    restore them with a stride-2 transposed convolution: one ends in a sigmoid per channel
    (after global average pooling), the other in a sigmoid per pixel. The re-weighted
    features are added to the original ones: ``x + x * channel(x) + x * spatial(x)``, so a
    freshly initialised branch starts near the identity plus a constant.

    Args:
        channels: channels of the stage output.
        reduction: channel reduction inside the branches.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        mid = max(8, channels // reduction)

        def down() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels, mid, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(mid),
                nn.ReLU(inplace=True),
            )

        self.channel_down, self.channel_up = (
            down(),
            nn.ConvTranspose2d(mid, channels, kernel_size=2, stride=2),
        )
        self.spatial_down, self.spatial_up = (
            down(),
            nn.ConvTranspose2d(mid, 1, kernel_size=2, stride=2),
        )

    def maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Channel weights ``(B, C, 1, 1)`` and the spatial map ``(B, 1, H, W)``, both in (0, 1)."""
        channel = torch.sigmoid(F.adaptive_avg_pool2d(self.channel_up(self.channel_down(x)), 1))
        # Odd sizes: the transposed convolution gives one row or column more; crop it.
        spatial = self.spatial_up(self.spatial_down(x))[..., : x.shape[-2], : x.shape[-1]]
        return channel, torch.sigmoid(spatial)

    def forward(self, x: Tensor) -> Tensor:
        channel, spatial = self.maps(x)
        return x + x * channel + x * spatial


class AttentionResNet50(ClassifierBase):
    """The attention-enhanced ResNet-50 (seed 004): torchvision's ResNet-50, one input channel,
    a :class:`SideBranchAttention` after each residual stage.

    Args:
        num_classes: number of classes.
    """

    #: Logits are one linear layer over the global average of ``cam_layer`` (attention included).
    cam_exact = True

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        import torchvision

        self.normalize = Normalize()
        net = torchvision.models.resnet50(num_classes=num_classes)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        for name, channels in zip(STAGE_NAMES, (256, 512, 1024, 2048)):
            setattr(net, name, nn.Sequential(getattr(net, name), SideBranchAttention(channels)))
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    @property
    def classifier_layer(self) -> nn.Linear:
        """The linear layer whose input (one row per image) is the penultimate representation."""
        return self.net.fc

    @property
    def cam_layer(self) -> nn.Module:
        return self.net.layer4


class SimCLRNet(nn.Module):
    """Stage I: the ResNet18 encoder and an MLP projector (SimCLR).

    The projector (``hidden_dim`` -> ReLU -> ``projection_dim``) is discarded after
    pre-training; the encoder's weights initialise stage II.
    """

    def __init__(
        self, in_channels: int = 1, hidden_dim: int = 512, projection_dim: int = 128
    ) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.encoder = resnet18(in_channels, num_classes=1)
        self.encoder.fc = nn.Identity()
        self.projector = nn.Sequential(
            nn.Linear(STAGE_CHANNELS[-1], hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Projections ``z`` ``(B, projection_dim)`` (not normalised; the loss normalises)."""
        return self.projector(self.encoder(self.normalize(x)))

    def encoder_state(self) -> dict[str, Tensor]:
        """The encoder's weights, without the classifier, for :meth:`DeepPneumoniaNet.backbone`."""
        return {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("fc.")}
