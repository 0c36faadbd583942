"""Multi-label variants: class-based attention (seed 003) and CIA-Net (seed 002).

Both answer "is finding k present?" for each pneumonia class independently (a sigmoid per
class; an image with none is normal), where Deep Pneumonia picks one class of several
(a softmax that includes "normal"). Both keep a ResNet18 backbone, so they start from the
same SimCLR encoder as Deep Pneumonia when stage I runs (the papers start from ImageNet
weights, which this project cannot fetch), and both give a map per class that the node
draws: the class attention distribution, and CIA-Net's class-aware grid.

Like every network of the framework, ``forward`` in eval mode takes images in [0, 1] and
returns logits ``(B, K)``, one per finding; the training-only outputs come from
``forward(x, train_outputs=True)``, and :meth:`class_maps` gives logits and maps together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Normalize, pooled, resnet18, stem
from .classifier import STAGE_NAMES, ClassifierBase


def _backbone(in_channels: int = 1) -> nn.Module:
    net = resnet18(in_channels, num_classes=1)
    net.fc = nn.Identity()  # the variants have their own heads
    return net


def _load_encoder(backbone: nn.Module, encoder: dict[str, Tensor]) -> None:
    """Stage I's encoder weights into a ResNet18 trunk (all of it, or the stages it has)."""
    own = backbone.state_dict()
    chosen = {k: v for k, v in encoder.items() if k in own}
    missing = set(own) - set(chosen)
    if not chosen or any(not k.startswith(("fc.", "layer4.")) for k in missing):
        raise ValueError(f"pre-trained encoder does not fit: missing {sorted(missing)[:5]}")
    backbone.load_state_dict(chosen, strict=False)


# --- class-based attention (seed 003) ------------------------------------------------------------


class AttentionGate(nn.Module):
    """Attention gates of one stage (Eq. 1-3), ``heads`` of them with independent parameters.

    ``c_i = A . (B . l_i + P g)``: local features ``l`` and the global feature ``g``
    (projected by ``P`` to match) are mapped to a common space, scored by ``A``, turned into a
    distribution over the stage's pixels by a softmax (Eq. 2), and the local features are
    averaged under it (Eq. 3). With ``heads = k`` this is the class-based gate of Eq. 4.

    Returns ``(B, heads, C)`` pooled features and ``(B, heads, H, W)`` distributions.
    """

    def __init__(self, channels: int, global_channels: int, dim: int = 64, heads: int = 1) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.local = nn.Conv2d(channels, heads * dim, 1)  # B_s (B_sj per head)
        self.project = nn.Linear(global_channels, heads * dim, bias=False)  # g projected to match
        self.score = nn.Conv2d(heads * dim, heads, 1, groups=heads)  # A_s (A_sj per head)

    def forward(self, local: Tensor, global_features: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = local.shape
        mixed = self.local(local) + self.project(global_features)[:, :, None, None]
        weights = self.score(mixed).flatten(2).float().softmax(dim=-1)  # Eq. 2, over pixels
        features = torch.einsum("bkn,bcn->bkc", weights, local.flatten(2).float())  # Eq. 3
        return features.to(local.dtype), weights.view(b, self.heads, h, w)


class ClassAttentionNet(ClassifierBase):
    """ResNet18 with attention gates on stages 1-3 and the third gate replicated per class.

    The local features of layers 1, 2 and 3 are gated by the global feature of layer 4
    (pooled). Gates 1 and 2 are shared; gate 3 has one copy per class (Eq. 4), and class
    ``j`` is decided from ``(g_1, g_2, g_3j)`` by its own binary classifier.

    Args:
        num_classes: number of findings ``k`` (the normal class is not one).
        dim: width of the gates' common space.
    """

    multi_label = True
    has_class_maps = True
    maps_are_detections = False  # the distributions show where the class looked, not lesions

    def __init__(self, num_classes: int = 4, in_channels: int = 1, dim: int = 64) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.normalize = Normalize()
        self.backbone = _backbone(in_channels)
        self.gates = nn.ModuleList(
            [
                AttentionGate(64, 512, dim),
                AttentionGate(128, 512, dim),
                AttentionGate(256, 512, dim, heads=num_classes),
            ]
        )
        self.shared = nn.Linear(64 + 128, num_classes)  # class j's weights on (g_1, g_2)
        self.own = nn.Parameter(torch.empty(num_classes, 256))  # class j's weights on g_3j
        nn.init.normal_(self.own, std=1.0 / math.sqrt(256 + 192))

    @property
    def classifier_layer(self) -> nn.Linear:
        """The shared linear layer over (g_1, g_2), one row per image: the gate's features (the
        per-finding g_3 terms are not in them)."""
        return self.shared

    def forward(self, x: Tensor, train_outputs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``(B, k)``; with ``train_outputs``, also the class maps ``w_3j`` ``(B, k, H, W)``."""
        out = stem(self.backbone, self.normalize(x))
        locals_ = []
        for name in STAGE_NAMES:
            out = getattr(self.backbone, name)(out)
            locals_.append(out)
        g = pooled(self.backbone, locals_[-1])
        (g1, _), (g2, _), (g3, w3) = (
            gate(local, g) for gate, local in zip(self.gates, locals_[:3])
        )
        logits = self.shared(torch.cat([g1[:, 0], g2[:, 0]], dim=1)) + (g3 * self.own).sum(dim=-1)
        return (logits, w3) if train_outputs else logits

    @torch.no_grad()
    def class_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and each class's attention distribution, scaled so its peak is 1."""
        logits, w3 = self.forward(x, train_outputs=True)
        return logits, w3 / w3.flatten(2).amax(dim=-1).clamp_min(1e-12)[..., None, None]

    @property
    def cam_layer(self) -> nn.Module:
        return self.backbone.layer4

    def load_encoder(self, encoder: dict[str, Tensor]) -> None:
        _load_encoder(self.backbone, encoder)


# --- CIA-Net (seed 002) ------------------------------------------------------------------------


class FeatureProbe(nn.Module):
    """``N_feat`` of the alignment's feature reconstruction loss (Eq. 2): a fixed network.

    No pre-trained network can be fetched offline, so this is a small convolutional net with
    seeded random weights that are never trained (random convolutions keep structure and
    edges, which is what the loss compares). Its weights are buffers of the state dict.
    """

    def __init__(self, seed: int = 1234) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        shapes = ((16, 1, 5, 5), (32, 16, 3, 3), (32, 32, 3, 3))
        for i, shape in enumerate(shapes):
            fan_in = shape[1] * shape[2] * shape[3]
            self.register_buffer(
                f"w{i}", torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
            )

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.conv2d(x, self.w0, stride=2, padding=2))
        x = F.relu(F.conv2d(x, self.w1, stride=2, padding=1))
        return F.conv2d(x, self.w2, padding=1)


class AlignmentModule(nn.Module):
    """The alignment network (section 3.1): an affine spatial transformer towards the canonical chest.

    A light convolutional net predicts ``(t_x, t_y, s_x, s_y, theta)``; the image is resampled
    bilinearly on the transformed regular grid (Eq. 1). The last layer starts at zero, so
    the module starts as the identity. Translations are bounded to a quarter of the image,
    scales to [0.78, 1.28] and the angle to 15 degrees, so that it cannot fold the image away.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.parameters_out = nn.Linear(64, 5)
        nn.init.zeros_(self.parameters_out.weight)
        nn.init.zeros_(self.parameters_out.bias)

    def transform(self, x: Tensor) -> Tensor:
        """``(B, 2, 3)`` matrices of Eq. 1, in the normalised coordinates of ``affine_grid``."""
        raw = torch.tanh(self.parameters_out(self.features(x)).float())
        tx, ty = 0.5 * raw[:, 0], 0.5 * raw[:, 1]  # half the [-1, 1] span: a quarter of the image
        sx, sy = torch.exp(0.25 * raw[:, 2]), torch.exp(0.25 * raw[:, 3])
        theta = (math.pi / 12) * raw[:, 4]
        cos, sin = torch.cos(theta), torch.sin(theta)
        return torch.stack(
            [torch.stack([sx * cos, -sy * sin, tx], 1), torch.stack([sx * sin, sy * cos, ty], 1)], 1
        )

    def forward(self, x: Tensor) -> Tensor:
        return warp(x, self.transform(x), padding="border")


def warp(x: Tensor, theta: Tensor, padding: str = "zeros") -> Tensor:
    """``x`` seen in the aligned frame: ``out(u) = x(theta u)`` (Eq. 1), in ``affine_grid``'s
    normalised coordinates, so the same ``theta`` serves any resolution (an image, a mask, a grid)."""
    grid = F.affine_grid(theta.float(), list(x.shape), align_corners=False)
    return F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode=padding, align_corners=False
    ).to(x.dtype)


def unwarp(x: Tensor, theta: Tensor) -> Tensor:
    """The inverse of :func:`warp`: an aligned-frame map back in the input's frame (zero where
    the aligned view did not reach)."""
    linear, shift = theta[:, :, :2].float(), theta[:, :, 2:].float()
    inverse = torch.linalg.inv(linear)
    return warp(x, torch.cat([inverse, -inverse @ shift], dim=2))


#: How CIA-Net picks the negative image of each input (the paper's Table 5).
NegativeSampling = Literal["hash", "random", "canonical"]


@dataclass
class CIAOutputs:
    """What training needs from one CIA-Net forward pass.

    Attributes:
        grid: ``(B, k, h, w)`` class-aware grid logits.
        attention: ``(B, 1, h, w)`` the normalised contrast map ``Delta M``.
        aligned: ``(B, 1, H, W)`` the aligned inputs (``None`` without alignment).
        theta: ``(B, 2, 3)`` the alignment of each input (``None`` without alignment): the
            grid lives in the aligned frame, so box targets are warped by it (:func:`warp`).
    """

    grid: Tensor
    attention: Tensor
    aligned: Tensor | None
    theta: Tensor | None = None


class CIANet(ClassifierBase):
    """Contrast-induced attention network with the alignment module (seed 002).

    * Alignment (optional): every input, positive or negative, is first transformed towards
      the canonical chest by :class:`AlignmentModule`.
    * Feature branch: ResNet18 to C5 gives ``F+`` ``(512, h, w)``.
    * Attention branch: a second ResNet18 trunk to C4, 2 x 2 max-pooling (to C5's size) and a
      1 x 1 convolution with a sigmoid, shared by the input and its negative, gives ``M+``
      and ``M-``; ``Delta M = |M+ - M-|`` is normalised to sum to ``h * w`` and multiplies
      ``F+`` (Eq. 3).
    * Head: two 1 x 1 convolutions to the ``(k, h, w)`` class-aware grid of logits. The image
      probability of class ``k`` is the MIL one, ``1 - prod_j (1 - p_jk)`` (Eq. 5), which is
      what ``forward`` returns as a logit. For maps, :meth:`class_maps` upsamples the weighted
      features ``grid_upsample`` times before the head (the paper: 16 -> 128).
    * Negatives: a bank of normal training images is kept in the state dict, with their
      16 x 16 thumbnails ("perceptual hash"); an input is paired with the negative whose
      thumbnail is nearest by cosine similarity, a random one, or the canonical chest (the
      mean of the normal training images), by ``negative_sampling``.

    Args:
        num_classes: number of findings ``k``.
        image_size: side of the input canvas (the bank stores images of this size).
        bank_size: normal images kept for pairing.
        negative_sampling: "hash", "random" or "canonical".
        alignment: use the alignment module.
        grid_upsample: upsampling of the class maps at test time.
    """

    multi_label = True
    has_class_maps = True
    maps_are_detections = True
    needs_references = True
    HASH_SIDE = 16

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 224,
        bank_size: int = 256,
        negative_sampling: NegativeSampling = "hash",
        alignment: bool = True,
        grid_upsample: int = 4,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if negative_sampling not in ("hash", "random", "canonical"):
            raise ValueError(
                f"negative_sampling must be hash, random or canonical, got {negative_sampling!r}"
            )
        if bank_size < 1 or grid_upsample < 1:
            raise ValueError(
                f"bank_size and grid_upsample must be positive, got {bank_size}, {grid_upsample}"
            )
        self.negative_sampling, self.grid_upsample = negative_sampling, grid_upsample
        self.normalize = Normalize()
        self.align = AlignmentModule() if alignment else None
        self.probe = FeatureProbe() if alignment else None
        self.backbone = _backbone(in_channels)
        self.attention_trunk = _backbone(in_channels)
        self.attention_trunk.layer4 = nn.Identity()  # C4 only
        self.attention_head = nn.Conv2d(256, 1, 1)
        self.head = nn.Sequential(
            nn.Conv2d(512, 256, 1), nn.ReLU(inplace=True), nn.Conv2d(256, num_classes, 1)
        )
        # A prior of about 2 % per cell: with every cell at 0.5, MIL's image probability
        # 1 - prod(1 - p) would start at 1 for every class and image.
        nn.init.constant_(self.head[-1].bias, -4.0)
        self.register_buffer(
            "bank", torch.zeros(bank_size, 1, image_size, image_size, dtype=torch.uint8)
        )
        self.register_buffer("bank_codes", torch.zeros(bank_size, self.HASH_SIDE**2))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("canonical", torch.zeros(1, 1, image_size, image_size))

    # -- references -----------------------------------------------------------------------------

    @torch.no_grad()
    def set_references(self, normals: Tensor, seed: int = 0) -> None:
        """Fill the negative bank and the canonical chest from normal training images.

        Args:
            normals: ``(N, 1, S, S)`` uint8 canvases of images labelled normal.
        """
        if (
            normals.ndim != 4
            or normals.shape[1:] != self.bank.shape[1:]
            or normals.dtype != torch.uint8
        ):
            raise ValueError(
                f"normal images must be uint8 {tuple(self.bank.shape[1:])}, got {normals.dtype} {tuple(normals.shape[1:])}"
            )
        if len(normals) < 2:
            raise ValueError(
                f"CIA-Net needs at least two normal training images to contrast with, got {len(normals)}"
            )
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(normals), generator=generator)
        chosen = normals[order[: self.bank.shape[0]].to(normals.device)].to(self.bank.device)
        self.bank.zero_()
        self.bank[: len(chosen)] = chosen
        self.bank_count.fill_(len(chosen))
        self.bank_codes.zero_()
        self.bank_codes[: len(chosen)] = self.hash_codes(chosen.float() / 255.0)
        # the paper averages 500
        mean = normals[order[:500].to(normals.device)].float().mean(dim=0, keepdim=True) / 255.0
        self.canonical.copy_(mean.to(self.canonical.device))

    def hash_codes(self, x: Tensor) -> Tensor:
        """Unit-length 16 x 16 thumbnails, flattened: cosine similarity is a dot product."""
        return F.normalize(F.adaptive_avg_pool2d(x.float(), self.HASH_SIDE).flatten(1), dim=1)

    def negatives(self, x: Tensor) -> Tensor:
        """The negative image paired with each input, in [0, 1]."""
        count = int(self.bank_count)
        if count == 0:
            raise RuntimeError(
                "CIA-Net has no negative images; call set_references with normal training images first"
            )
        if self.negative_sampling == "canonical":
            return self.canonical.expand(len(x), -1, -1, -1).to(x.dtype)
        codes = self.hash_codes(x)
        if self.negative_sampling == "hash":
            similarity = codes @ self.bank_codes[:count].T
            # An input that is itself in the bank is paired with its nearest other image.
            similarity = similarity.masked_fill(similarity > 1 - 1e-6, -2.0)
            index = similarity.argmax(dim=1)
        elif self.training:
            index = torch.randint(0, count, (len(x),), device=x.device)
        else:  # random but repeatable: the same image always gets the same partner
            index = (codes * 1e4).round().long().sum(dim=1).abs() % count
        return self.bank[index].to(x.dtype) / 255.0

    # -- forward --------------------------------------------------------------------------------

    def _aligned(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The input in the aligned frame, and the alignment (None without the module)."""
        if self.align is None:
            return x, None
        theta = self.align.transform(x)
        return warp(x, theta, padding="border"), theta

    def _attention_map(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        out = stem(self.attention_trunk, self.normalize(x))
        for name in STAGE_NAMES[:3]:
            out = getattr(self.attention_trunk, name)(out)
        return torch.sigmoid(self.attention_head(F.adaptive_max_pool2d(out, size)))

    def weighted_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``F+`` weighted by ``Delta M`` (Eq. 3), ``Delta M``, the aligned input and its alignment."""
        negative = self.negatives(x)
        (x, theta), (negative, _) = self._aligned(x), self._aligned(negative)
        out = stem(self.backbone, self.normalize(x))
        for name in STAGE_NAMES:
            out = getattr(self.backbone, name)(out)
        size = out.shape[-2:]
        both = self._attention_map(torch.cat([x, negative]), size)
        delta = (both[: x.shape[0]] - both[x.shape[0] :]).abs()
        delta = (
            delta
            * (size[0] * size[1])
            / delta.flatten(1).sum(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
        )
        return out * delta, delta, x, theta

    def forward(self, x: Tensor, train_outputs: bool = False) -> Tensor | CIAOutputs:
        """Image logits ``(B, k)`` (MIL over the grid); with ``train_outputs``, :class:`CIAOutputs`."""
        features, delta, aligned, theta = self.weighted_features(x)
        grid = self.head(features)
        if train_outputs:
            return CIAOutputs(grid, delta, aligned if theta is not None else None, theta)
        return mil_logits(grid)

    @torch.no_grad()
    def class_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image logits and the class-aware grid probabilities, upsampled before the head, in the
        input's frame (the grid is computed in the aligned one and warped back)."""
        features, _, _, theta = self.weighted_features(x)
        logits = mil_logits(self.head(features))
        if self.grid_upsample > 1:
            features = F.interpolate(
                features, scale_factor=self.grid_upsample, mode="bilinear", align_corners=False
            )
        maps = torch.sigmoid(self.head(features).float())
        return logits, maps if theta is None else unwarp(maps, theta)

    @property
    def cam_layer(self) -> nn.Module:
        return self.backbone.layer4

    @property
    def classifier_layer(self) -> None:
        """None: the last linear layers belong to the alignment module and see other images
        too, so no layer's input is this image's penultimate representation."""
        return None

    def load_encoder(self, encoder: dict[str, Tensor]) -> None:
        _load_encoder(self.backbone, encoder)
        _load_encoder(self.attention_trunk, encoder)


def mil_logits(grid: Tensor) -> Tensor:
    """The logit of ``1 - prod_j (1 - sigmoid(z_j))`` over each class's grid, computed stably.

    With ``S = sum_j softplus(z_j) = -log prod_j (1 - p_j)``, the image probability is
    ``1 - exp(-S)`` and its logit ``log(exp(S) - 1) = S + log(1 - exp(-S))``.
    """
    s = F.softplus(grid.float()).flatten(2).sum(dim=-1).clamp_min(1e-7)
    return s + torch.log(-torch.expm1(-s))
