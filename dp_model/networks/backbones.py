"""The ResNet18 trunk every ResNet18-based network shares, and the input normalisation.

The backbone is MONAI's ``ResNet`` configured to equal torchvision's ResNet18 exactly
(7 x 7 stride-2 first convolution, max-pool, [2, 2, 2, 2] basic blocks, no bias on the
down-sampling convolutions): same parameter names, same outputs. MONAI's own defaults
(3-D, stride-1 first convolution, biased down-sampling) would cost about four times the
compute in 2-D.

This is the lowest of the network modules: :mod:`dp_model.networks.networks` and
:mod:`dp_model.networks.variants` both build on it, and it imports neither.
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet
from torch import Tensor, nn

#: MONAI ResNet arguments that make it torchvision's ResNet18.
RESNET18 = dict(
    block="basic",
    layers=[2, 2, 2, 2],
    block_inplanes=[64, 128, 256, 512],
    spatial_dims=2,
    conv1_t_size=7,
    conv1_t_stride=2,
    no_max_pool=False,
    shortcut_type="B",
    bias_downsample=False,
)
STAGE_CHANNELS = (64, 128, 256, 512)
#: Downsampling of each stage's output relative to the input (224 -> 56, 28, 14, 7).
STAGE_STRIDES = (4, 8, 16, 32)


def resnet18(in_channels: int = 1, num_classes: int = 5) -> ResNet:
    """torchvision's ResNet18, built with MONAI, for ``in_channels``-channel images."""
    if in_channels < 1 or num_classes < 1:
        raise ValueError(
            f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}"
        )
    return ResNet(n_input_channels=in_channels, num_classes=num_classes, **RESNET18)


#: Intensity normalisation applied inside the networks: inputs are images in [0, 1] as
#: ``dp_transforms`` produces them, so the contract travels with the weights.
INPUT_MEAN, INPUT_STD = 0.5, 0.25


class Normalize(nn.Module):
    """``(x - mean) / std`` with the constants stored in the state dict."""

    def __init__(self, mean: float = INPUT_MEAN, std: float = INPUT_STD) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def stem(resnet: ResNet, x: Tensor) -> Tensor:
    """The layers before the first residual stage."""
    x = resnet.act(resnet.bn1(resnet.conv1(x)))
    return resnet.maxpool(x) if not resnet.no_max_pool else x


def pooled(resnet: ResNet, features: Tensor) -> Tensor:
    """Global average pooling of the last stage, flattened: the representation ``h``."""
    return torch.flatten(resnet.avgpool(features), 1)
