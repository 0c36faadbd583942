"""The Deep Pneumonia losses: NT-Xent (Eq. 1), MGACR (Eq. 2-6) and class-balanced focal (Eq. 9),
and the losses of the other seed systems: the 1/sqrt(n) focal loss (seed 004), the class
attention loss (seed 003, Eq. 5) and CIA-Net's grid, MIL and alignment losses (seed 002).

Each loss is a pure function of tensors, computed in float32 whatever the autocast
context, with a thin ``nn.Module`` that validates its settings once.

Decisions the paper leaves open, and what is done here:

* NT-Xent: the denominator runs over every other sample of the 2N views, the sample
  itself excluded (SimCLR's definition; Eq. 1's ``[k != j]`` reads as that). Under DDP the
  projections of all processes are gathered (with gradients) so that every process sees
  the negatives of the global batch.
* MGACR: the MSE and L1 terms are means over each image's pixels (and channels), the ratios
  are taken per image, and the per-image losses averaged over the images that take part.
  Denominators are clamped to at least ``eps`` so that a degenerate map gives a large but
  finite loss. Images without a lesion mask take part as follows: an image labelled
  normal takes the attention terms with an empty ``mask+`` (nothing is a lesion), never
  the feature term (which would ask ``map+`` to cover the whole image); a lesion image
  without boxes (nobody outlined it) takes no MGACR term at all.
* Class-balanced weights: ``(1 - beta) / (1 - beta ** n_c)`` from the training split's
  counts, normalised to sum to the number of classes; a class absent from the split gets
  the weight of a class with one image. Softmax (Eq. 9) or sigmoid focal loss.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .networks import StageOutput

logger = logging.getLogger(__name__)


def _float32(fn):
    """Run a loss with autocast disabled on its tensors' device, so it computes in float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(
            (a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu"
        )
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


# --- NT-Xent (SimCLR, Eq. 1) -------------------------------------------------------------------


@_float32
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2, gather: bool = False) -> Tensor:
    """NT-Xent / InfoNCE for ``N`` positive pairs ``(z1[i], z2[i])``.

    One matrix product of the L2-normalised projections, the self-similarities masked,
    then cross-entropy with the partner view as target.

    Args:
        z1, z2: ``(N, D)`` projections of two views of the same ``N`` images.
        temperature: tau (the paper: 0.2).
        gather: gather the projections of all processes (DDP) as negatives.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D): views 1 then views 2
    everyone, offset, world = _gather(local) if gather else (local, 0, 1)
    n = z1.shape[0]
    logits = local @ everyone.T / temperature  # (2N, 2N * world)
    rows = torch.arange(2 * n, device=local.device)
    logits[rows, rows + offset] = float("-inf")  # a view is not its own negative
    # Gathered layout: process p holds columns [2Np, 2N(p+1)), views 1 then views 2; one
    # process: offset 0.
    partner = offset + (rows + n) % (2 * n)
    return F.cross_entropy(logits, partner)


def _gather(local: Tensor) -> tuple[Tensor, int, int]:
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if not (dist.is_available() and dist.is_initialized()):
        return local, 0, 1
    world, rank = dist.get_world_size(), dist.get_rank()
    return torch.cat(all_gather(local)), rank * local.shape[0], world


class NTXentLoss(nn.Module):
    """:func:`nt_xent` with a fixed temperature; gathers across processes when DDP is initialised."""

    def __init__(self, temperature: float = 0.2, gather: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.gather = float(temperature), gather

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, self.temperature, self.gather)


# --- MGACR (Eq. 2-6) ---------------------------------------------------------------------------


def _mean_per_image(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


@_float32
def attention_losses(
    map_pos: Tensor, map_neg: Tensor, mask_pos: Tensor, eps: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Per-image ``L_att+`` (Eq. 2) and ``L_att-`` (Eq. 3).

    ``L_att+ = MSE(map+, mask+) / MSE(map+, mask-)``, ``L_att- = MSE(map-, mask-)``,
    ``mask- = 1 - mask+``; all ``(B, 1, H, W)`` at the stage's resolution.
    """
    map_pos, map_neg, mask_pos = map_pos.float(), map_neg.float(), mask_pos.float()
    mask_neg = 1.0 - mask_pos
    towards = _mean_per_image((map_pos - mask_pos) ** 2)
    away = _mean_per_image((map_pos - mask_neg) ** 2)
    return towards / away.clamp_min(eps), _mean_per_image((map_neg - mask_neg) ** 2)


#: Eq. 5 as printed ("paper"), or with the maps held fixed inside it ("detached"). As printed,
#: ``L1(f, f * map+) = mean |f| (1 - map+)`` is smallest at ``map+ = 1`` everywhere, pulling
#: the maps away from the masks Eq. 2-3 train them towards; detached, Eq. 5 shapes the
#: features only, and the attention optimum (maps equal to masks) stays an optimum.
FeatureCRForm = Literal["paper", "detached"]


@_float32
def feature_cr_loss(
    features: Tensor,
    map_pos: Tensor,
    map_neg: Tensor,
    eps: float = 1e-3,
    form: FeatureCRForm = "paper",
) -> Tensor:
    """Per-image ``L_feat_cr = L1(f, f * map+) / L1(f, f * map-)`` (Eq. 5), in ``form``."""
    f, map_pos, map_neg = features.float(), map_pos.float(), map_neg.float()
    if form == "detached":
        map_pos, map_neg = map_pos.detach(), map_neg.detach()
    elif form != "paper":
        raise ValueError(f"form must be 'paper' or 'detached', got {form!r}")
    towards = _mean_per_image((f - f * map_pos).abs())
    away = _mean_per_image((f - f * map_neg).abs())
    return towards / away.clamp_min(eps)


@_float32
def mgacr_loss(
    stages: Sequence[StageOutput],
    mask_pos: Tensor,
    attention_images: Tensor,
    feature_images: Tensor,
    eps: float = 1e-3,
    form: FeatureCRForm = "paper",
) -> dict[str, Tensor]:
    """MGACR over all stages (Eq. 4 and 6), averaged over stages and over the images that take part.

    Args:
        stages: features and maps of each stage with an attention head.
        mask_pos: ``(B, 1, H, W)`` lesion mask at the input's resolution (after augmentation);
            it is area-downsampled to each stage.
        attention_images: ``(B,)`` bool, images that take the attention terms.
        feature_images: ``(B,)`` bool, images that take the feature term.

    Returns:
        ``att_pos``, ``att_neg``, ``feat_cr`` (each a scalar; zero when no image takes part),
        and the same terms of each stage alone as ``"<term>@<stage>"``, for the training record.
    """
    totals = {"att_pos": [], "att_neg": [], "feat_cr": []}
    each: dict[str, Tensor] = {}
    att_weight = attention_images.float()
    feat_weight = feature_images.float()
    for stage in stages:
        mask = F.adaptive_avg_pool2d(mask_pos.float(), stage.map_pos.shape[-2:])
        att_pos, att_neg = attention_losses(stage.map_pos, stage.map_neg, mask, eps)
        feat = feature_cr_loss(stage.features, stage.map_pos, stage.map_neg, eps, form)
        totals["att_pos"].append(_masked_mean(att_pos, att_weight))
        totals["att_neg"].append(_masked_mean(att_neg, att_weight))
        totals["feat_cr"].append(_masked_mean(feat, feat_weight))
        for key in totals:
            each[f"{key}@{stage.name or len(totals[key])}"] = totals[key][-1].detach()
    return {
        k: torch.stack(v).mean() if v else mask_pos.new_zeros(()) for k, v in totals.items()
    } | each


@_float32
def relative_scale(classification: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """``L_cls / CE`` on the same batch, without gradient: the factor by which the
    classification loss's weighting (class-balanced, focal) shrinks plain cross-entropy.
    MGACR multiplied by it keeps one weight relative to the classification loss whatever
    that weighting does (Table I's rows 4 and 5 otherwise change MGACR's weight too)."""
    ce = F.cross_entropy(logits.float(), labels)
    return (classification.float() / ce.clamp_min(1e-8)).detach()


def _masked_mean(values: Tensor, weight: Tensor) -> Tensor:
    # Multiply, not index: keeps shapes static for torch.compile and CUDA graphs.
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


class MGACRLoss(nn.Module):
    """Weighted MGACR: ``att_weight * (L_att+ + L_att-) + feat_weight * L_feat_cr``.

    Args:
        att_weight: weight of the attention terms (Song et al. used 0.1 for their mask loss).
        feat_weight: weight of the feature contrastive-regulation term.
        normal_images: "empty_mask" to train the attention of images labelled normal
            towards an empty ``mask+``, "skip" to leave them out.
        eps: lower bound of the ratios' denominators.
        feature_form: Eq. 5 as printed or with detached maps (:data:`FeatureCRForm`).
        relative: weigh MGACR against the classification loss as against plain cross-entropy
            (:func:`relative_scale`), so that class-balanced and focal weighting, which shrink
            the classification loss, do not make MGACR heavier.
        lesion_weight: weight of the supervised lesion head's loss (:func:`lesion_loss`), on
            the images that take the attention terms; it counts only where a stage carries
            the head.
    """

    def __init__(
        self,
        att_weight: float = 0.1,
        feat_weight: float = 0.1,
        normal_images: Literal["empty_mask", "skip"] = "empty_mask",
        eps: float = 1e-3,
        feature_form: FeatureCRForm = "paper",
        relative: bool = False,
        lesion_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if att_weight < 0 or feat_weight < 0 or lesion_weight < 0 or eps <= 0:
            raise ValueError(
                f"weights must be >= 0 and eps > 0, got {att_weight}, {feat_weight}, {lesion_weight}, {eps}"
            )
        if normal_images not in ("empty_mask", "skip"):
            raise ValueError(f"normal_images must be 'empty_mask' or 'skip', got {normal_images!r}")
        if feature_form not in ("paper", "detached"):
            raise ValueError(f"feature_form must be 'paper' or 'detached', got {feature_form!r}")
        self.att_weight, self.feat_weight, self.normal_images, self.eps = (
            att_weight,
            feat_weight,
            normal_images,
            eps,
        )
        self.feature_form, self.relative, self.lesion_weight = feature_form, relative, lesion_weight

    def forward(
        self, stages: Sequence[StageOutput], mask_pos: Tensor, has_boxes: Tensor, is_normal: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total weighted loss and its parts.

        Args:
            has_boxes: ``(B,)`` bool, the image has at least one lesion box.
            is_normal: ``(B,)`` bool, the image is labelled with the normal class.
        """
        attention = has_boxes | is_normal if self.normal_images == "empty_mask" else has_boxes
        parts = mgacr_loss(stages, mask_pos, attention, has_boxes, self.eps, self.feature_form)
        total = (
            self.att_weight * (parts["att_pos"] + parts["att_neg"])
            + self.feat_weight * parts["feat_cr"]
        )
        for stage in stages:
            if stage.lesion is not None:
                parts["lesion"] = _masked_mean(
                    lesion_loss(stage.lesion, mask_pos), attention.float()
                )
                total = total + self.lesion_weight * parts["lesion"]
        return total, parts


@_float32
def lesion_loss(logits: Tensor, mask_pos: Tensor) -> Tensor:
    """Per image: binary cross-entropy of the lesion head's logits ``(B, 1, h, w)``, resized
    bilinearly to the mask's ``(H, W)`` as the regions are drawn from them, against the lesion
    mask, averaged over the pixels. A pixel inside a box is learnt above 0.5, the region
    threshold, and one outside below it.

    Not in the paper: Eq. 2's ratio is near its optimum for a map low everywhere when lesions
    cover a few per cent of the image, and the CBAM-style gate sees only the channel mean and
    maximum, so ``map+`` does not learn the boxes (docs/decisions.md). A per-pixel target on
    the features themselves does.
    """
    resized = F.interpolate(
        logits.float(), size=mask_pos.shape[-2:], mode="bilinear", align_corners=False
    )
    return _mean_per_image(
        F.binary_cross_entropy_with_logits(resized, mask_pos.float(), reduction="none")
    )


# --- Class-balanced focal loss (Eq. 9) ----------------------------------------------------------


def class_balanced_weights(counts: Sequence[int], beta: float) -> Tensor:
    """``(1 - beta) / (1 - beta ** n_c)`` per class, normalised to sum to the number of classes."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if n.numel() == 0 or (n < 0).any():
        raise ValueError(f"class counts must be non-negative, got {list(counts)}")
    effective = (
        (1.0 - torch.pow(beta, n.clamp_min(1.0))) / (1.0 - beta) if beta > 0 else torch.ones_like(n)
    )
    weights = 1.0 / effective
    return (weights * len(n) / weights.sum()).float()


@_float32
def cb_focal_loss(
    logits: Tensor,
    target: Tensor,
    weights: Tensor,
    gamma: float = 1.0,
    mode: Literal["softmax", "sigmoid"] = "softmax",
) -> Tensor:
    """Class-balanced focal loss, averaged over the batch.

    softmax (Eq. 9): ``-w_y (1 - p_t) ** gamma * log(p_t)`` with ``p_t`` the softmax
    probability of the true class. sigmoid (Cui et al.'s reference): the focal binary
    cross-entropy over every class, weighted by the true class's ``w_y``, summed over
    classes. With ``gamma = 0`` and equal weights softmax mode is cross-entropy.
    """
    logits = logits.float()
    w = weights.to(logits.device, torch.float32)[target]
    if mode == "softmax":
        log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
        modulator = (1.0 - log_p.exp()).clamp_min(0.0) ** gamma if gamma else 1.0
        return (-w * modulator * log_p).mean()
    if mode == "sigmoid":
        y = F.one_hot(target, logits.shape[1]).float()
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        # (1 - p_t) ** gamma in a stable form: p_t = sigmoid(x) for y = 1, 1 - sigmoid(x) for y = 0.
        modulator = torch.exp(-gamma * y * logits - gamma * F.softplus(-logits)) if gamma else 1.0
        return (w[:, None] * modulator * bce).sum(dim=1).mean()
    raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")


class CBFocalLoss(nn.Module):
    """:func:`cb_focal_loss` with weights computed once from the training split's class counts.

    Args:
        class_counts: training images per class, in class-index order.
        beta: effective-number hyper-parameter (0 gives equal weights).
        gamma: focusing parameter (0 gives cross-entropy).
        mode: "softmax" (Eq. 9) or "sigmoid".
        class_names: for the log line that records the weights.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        beta: float = 0.9999,
        gamma: float = 1.0,
        mode: Literal["softmax", "sigmoid"] = "softmax",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if mode not in ("softmax", "sigmoid"):
            raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
        self.register_buffer("weights", class_balanced_weights(class_counts, beta))
        self.gamma, self.mode = float(gamma), mode
        names = list(class_names or range(len(class_counts)))
        logger.info(
            "class-balanced weights (beta %s, gamma %s, %s): %s",
            beta,
            gamma,
            mode,
            ", ".join(
                f"{name} {n} images -> {w:.3f}"
                for name, n, w in zip(names, class_counts, self.weights.tolist())
            ),
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cb_focal_loss(logits, target, self.weights, self.gamma, self.mode)


def inverse_sqrt_weights(
    class_counts: Sequence[int], alpha: float, normal_index: int = 0, normalize: bool = True
) -> Tensor:
    """Per-class weights of the attention-enhanced ResNet-50's modified focal loss (seed 004).

    ``w_c = a_c / sqrt(n_c)`` with ``a_c = 1 - alpha`` for the normal class and ``alpha``
    for every pneumonia class. The printed equation pairs each term with the *other*
    class's count, which would up-weight the majority class against the paper's stated
    aim; each class's own count is used here (docs/decisions.md). With ``normalize`` the
    weights are scaled to average 1 over the classes, so the loss keeps cross-entropy's
    scale and learning rates carry over; ``normalize=False`` is the equation as printed.
    """
    n = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if (n < 0).any():
        raise ValueError(f"class counts must be non-negative, got {list(class_counts)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    a = torch.full_like(n, alpha)
    a[normal_index] = 1.0 - alpha
    weights = a / n.clamp_min(1.0).sqrt()
    return (weights * len(n) / weights.sum() if normalize else weights).float()


class SqrtFocalLoss(nn.Module):
    """The modified focal loss of seed 004: :func:`cb_focal_loss` (softmax) with :func:`inverse_sqrt_weights`.

    Args:
        class_counts: training images per class, in class-index order.
        alpha: weight of the pneumonia classes (``1 - alpha`` for the normal class).
        gamma: focusing parameter.
        normal_index: index of the normal class.
        class_names: for the log line that records the weights.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        alpha: float = 0.5,
        gamma: float = 2.0,
        normal_index: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.register_buffer("weights", inverse_sqrt_weights(class_counts, alpha, normal_index))
        self.gamma = float(gamma)
        names = list(class_names or range(len(class_counts)))
        logger.info(
            "1/sqrt(n) focal weights (alpha %s, gamma %s): %s",
            alpha,
            gamma,
            ", ".join(
                f"{c} {n} -> {w:.3f}" for c, n, w in zip(names, class_counts, self.weights.tolist())
            ),
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cb_focal_loss(logits, target, self.weights, self.gamma, "softmax")


# --- class-based attention (seed 003, Eq. 5) ----------------------------------------------------------


#: ``c_i`` of the class attention loss: the paper's ``n_min^2 / n_i`` ("paper"), or the ratio of
#: each finding's negatives to its positives ("balanced"), which does not grow with the dataset.
ClassWeighting = Literal["paper", "balanced"]


def class_attention_weights(
    positive_counts: Sequence[int], weighting: ClassWeighting = "paper", total: int | None = None
) -> Tensor:
    """``c_i`` from each class's number of positive training images.

    "paper": ``n_min^2 / n_i``, which grows with the dataset (ten times the images, ten times
    the weights); "balanced": ``(N - n_i) / n_i`` for ``total`` images ``N``, the weight that
    makes a class's positives weigh as much as its negatives. A class without positives counts
    as one image, so that its weight stays finite.
    """
    n = torch.as_tensor(list(positive_counts), dtype=torch.float64).clamp_min(1.0)
    if weighting == "paper":
        return (n.min() ** 2 / n).float()
    if weighting != "balanced":
        raise ValueError(f"weighting must be 'paper' or 'balanced', got {weighting!r}")
    if total is None or total < n.max():
        raise ValueError(
            f"balanced weights need the number of training images, at least each class's count; got {total}"
        )
    return ((total - n).clamp_min(1.0) / n).float()


@_float32
def class_attention_loss(
    logits: Tensor, attention: Tensor, target: Tensor, weights: Tensor, entropy_weight: float
) -> Tensor:
    """Eq. 5 of the class-based attention paper, summed over classes, averaged over images.

    ``-(c_i y log p + (1 - y)(log(1 - p) + lambda H(w_3i)))``: a weighted binary
    cross-entropy per class, and for each class absent from an image, the entropy of its
    attention distribution is maximised (a flat map: nothing to look at).

    Args:
        logits: ``(B, k)``.
        attention: ``(B, k, H, W)`` class attention distributions (each sums to 1).
        target: ``(B, k)`` 0/1.
        weights: ``(k,)`` positive weights ``c_i``.
        entropy_weight: ``lambda``.
    """
    logits, target = logits.float(), target.float()
    w = attention.float().flatten(2)
    entropy = -(w * w.clamp_min(1e-12).log()).sum(dim=-1)  # (B, k)
    positive = weights.to(logits.device) * target * F.logsigmoid(logits)
    negative = (1.0 - target) * (F.logsigmoid(-logits) + entropy_weight * entropy)
    return -(positive + negative).sum(dim=1).mean()


class ClassAttentionLoss(nn.Module):
    """:func:`class_attention_loss` with the weights of the training split's counts."""

    def __init__(
        self,
        positive_counts: Sequence[int],
        entropy_weight: float = 0.1,
        class_names: Sequence[str] | None = None,
        weighting: ClassWeighting = "paper",
        total: int | None = None,
    ) -> None:
        super().__init__()
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        self.register_buffer("weights", class_attention_weights(positive_counts, weighting, total))
        self.entropy_weight = float(entropy_weight)
        names = list(class_names or range(len(positive_counts)))
        logger.info(
            f"class attention positive weights ({weighting}): %s",
            ", ".join(
                f"{c} {n} -> {w:.2f}"
                for c, n, w in zip(names, positive_counts, self.weights.tolist())
            ),
        )

    def forward(self, logits: Tensor, attention: Tensor, target: Tensor) -> Tensor:
        return class_attention_loss(logits, attention, target, self.weights, self.entropy_weight)


# --- CIA-Net (seed 002, Eq. 2, 4-6) -----------------------------------------------------------------


@_float32
def cia_loss(
    grid: Tensor, grid_target: Tensor, boxed: Tensor, target: Tensor, box_weight: float = 1.0
) -> Tensor:
    """Eq. 6: ``sum_k lambda_k beta_B L_k(B) + (1 - lambda_k) L_k(I)``, averaged over images.

    Args:
        grid: ``(B, k, h, w)`` grid logits.
        grid_target: ``(B, k, h, w)`` 1 where a grid cell overlaps a box of class k.
        boxed: ``(B, k)`` ``lambda``: class k of the image has box annotation.
        target: ``(B, k)`` image labels.
        box_weight: ``beta_B``.

    ``L(B)`` (Eq. 4) is the binary cross-entropy summed over the grid cells; ``L(I)`` (Eq. 5)
    is the MIL loss ``-y log(1 - prod_j (1 - p_j)) - (1 - y) log prod_j (1 - p_j)``, which is
    the binary cross-entropy of the image probability :func:`~dp_model.networks.variants.mil_logits`.
    """
    from .variants import mil_logits

    grid, grid_target, boxed, target = (
        grid.float(),
        grid_target.float(),
        boxed.float(),
        target.float(),
    )
    box_level = (
        F.binary_cross_entropy_with_logits(grid, grid_target, reduction="none")
        .flatten(2)
        .sum(dim=-1)
    )
    image_level = F.binary_cross_entropy_with_logits(mil_logits(grid), target, reduction="none")
    return (boxed * box_weight * box_level + (1.0 - boxed) * image_level).sum(dim=1).mean()


@_float32
def feature_reconstruction_loss(features: Tensor, target_features: Tensor) -> Tensor:
    """Eq. 2: ``||N(phi(I)) - N(T)||_2 / (C H W)`` per image, averaged over images."""
    c, h, w = features.shape[1:]
    return (
        (features.float() - target_features.float()).flatten(1).norm(dim=1) / (c * h * w)
    ).mean()


@_float32
def consistency_loss(aligned: Tensor, target: Tensor) -> Tensor:
    """Mean Euclidean distance between corresponding pixels of the aligned image and the target."""
    return (aligned.float() - target.float()).abs().mean()
