"""Configuration of ``dp-train``: data, the two stages, losses, runtime.

Each technique of the paper's ablation (Table I) is one switch:

* ``pretrain.enabled``: contrastive pre-training (stage I);
* ``finetune.mgacr.attention``: mask-guided attention (Eq. 2-4);
* ``finetune.mgacr.feature_cr``: feature learning with contrastive regulation (Eq. 5);
* ``finetune.loss.kind``: ``cb_focal`` (Eq. 9) instead of ``ce``.

The defaults are the full Deep Pneumonia recipe; ``configs/deep_pneumonia.yaml`` lists every
key with its default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import require as _check
from ..networks.registry import ARCHITECTURES


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Random augmentation of the training batches (see ``dp_transforms.augment``).

    The defaults are the light augmentation (crops to 85 %, 5 degrees, mild gamma and contrast,
    no blur or noise), which beat ``STRONG_AUGMENTATION`` in every seed of the learning
    regime's options table (docs/decisions.md)."""

    crop_scale: tuple[float, float] = (0.85, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    rotate_degrees: float = 5.0
    flip_prob: float = 0.0
    gamma: tuple[float, float] = (0.9, 1.1)
    contrast: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.04
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.2, 1.2)
    noise_prob: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.02)


#: The framework's default until the options table: the recipe of every table in docs/results.md
#: measured before it, which those tables' configs name explicitly so that they reproduce.
STRONG_AUGMENTATION = AugmentConfig(
    crop_scale=(0.7, 1.0),
    crop_ratio=(0.8, 1.25),
    rotate_degrees=10.0,
    gamma=(0.8, 1.25),
    contrast=(0.8, 1.25),
    brightness=0.08,
    blur_prob=0.2,
    noise_prob=0.2,
)


def _simclr_augment() -> AugmentConfig:
    # Stronger views for contrastive learning (SimCLR relies on aggressive crops).
    return AugmentConfig(
        crop_scale=(0.3, 1.0),
        crop_ratio=(0.75, 1.33),
        rotate_degrees=10.0,
        blur_prob=0.5,
        noise_prob=0.5,
        gamma=(0.7, 1.4),
        contrast=(0.7, 1.4),
        brightness=0.15,
    )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are split.

    Attributes:
        root: dataset folder (or CSV file) in any layout ``dp_model.datasets`` reads.
        layout: the layout, or "auto".
        image_size: side of the square network input (the paper: 224).
        test_fraction: share of each class held out for testing (the paper: 0.1).
        val_fraction: share of the training part held out to select checkpoints.
        calibration_fraction: share of the non-test images held out (from the training part,
            after validation) to fit the temperature, place the operating points and the
            gate's threshold, so that what chose the checkpoint does not also choose them.
            0: they are chosen on the validation split, and the model card says so. On a
            small dataset the default 0.1 is small too (27 images of the 320-image demo): the
            points' targets are then not certified and the gate's bound is wide, and the model
            card says that too; ``calibration_images`` or a larger fraction buys confidence with
            training images.
        calibration_images: that many images instead of a fraction (0: use the fraction).
        split: "auto" (patient-level when patient ids exist), "stratified", "patient", "official".
        cache_dir: where decoded, resized images are cached ("" for ~/.cache/deep-pneumonia).
        workers: processes decoding images (0: all cores).
        boxed_fraction: share of the training images whose lesion boxes are used (a seeded
            subset; the others train from their label alone), to study limited supervision.
            Validation and test images keep their boxes.
    """

    root: str = ""
    layout: str = "auto"
    image_size: int = 224
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    calibration_fraction: float = 0.1
    calibration_images: int = 0
    split: Literal["auto", "stratified", "patient", "official"] = "auto"
    cache_dir: str = ""
    workers: int = 0
    boxed_fraction: float = 1.0

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.boxed_fraction <= 1.0, "boxed_fraction", self.boxed_fraction, "in [0, 1]"
        )
        _check(32 <= self.image_size <= 1024, "image_size", self.image_size, "in [32, 1024]")
        _check(0.0 < self.test_fraction < 0.5, "test_fraction", self.test_fraction, "in (0, 0.5)")
        _check(0.0 <= self.val_fraction < 0.5, "val_fraction", self.val_fraction, "in [0, 0.5)")
        _check(
            0.0 <= self.calibration_fraction < 0.5,
            "calibration_fraction",
            self.calibration_fraction,
            "in [0, 0.5)",
        )
        _check(self.calibration_images >= 0, "calibration_images", self.calibration_images, ">= 0")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Stage I: SimCLR on the training images themselves."""

    enabled: bool = True
    epochs: int = 20
    batch_size: int = 256
    optimizer: Literal["adamw", "sgd"] = "adamw"  # the Deep Pneumonia paper: SGD for both stages
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-6
    temperature: float = 0.2
    hidden_dim: int = 512
    projection_dim: int = 128
    augment: AugmentConfig = field(default_factory=_simclr_augment)

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "epochs", self.epochs, ">= 0")
        _check(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2")
        _check(self.temperature > 0, "temperature", self.temperature, "> 0")
        _check(self.optimizer in ("adamw", "sgd"), "optimizer", self.optimizer, "adamw or sgd")


@dataclass(frozen=True, kw_only=True)
class MGACRConfig:
    """Mask-guided attention with contrastive regulation (Eq. 2-6)."""

    attention: bool = True
    feature_cr: bool = True
    stages: tuple[int, ...] = (1, 2, 3, 4)
    att_weight: float = 0.1
    feat_weight: float = 0.1
    normal_images: Literal["empty_mask", "skip"] = "empty_mask"
    eps: float = 1e-3
    #: Eq. 5 as printed, or with the maps detached inside it (see ``dp_model.networks.losses.FeatureCRForm``).
    feature_form: Literal["paper", "detached"] = "paper"
    #: weigh MGACR relative to the classification loss as to plain cross-entropy (``relative_scale``).
    relative: bool = False
    #: a supervised lesion head (1x1 convolution, per-cell cross-entropy against the box mask)
    #: on this stage's features, one of ``stages``; 0: none. Not in the paper: ``map+`` does
    #: not learn the boxes under Eq. 2 (``dp_model.networks.losses.lesion_loss``).
    lesion_stage: int = 0
    lesion_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(
            self.feature_form in ("paper", "detached"),
            "feature_form",
            self.feature_form,
            "paper or detached",
        )
        _check(
            self.lesion_stage == 0 or self.lesion_stage in self.stages,
            "lesion_stage",
            self.lesion_stage,
            f"0 or one of the stages {list(self.stages)}",
        )
        _check(self.lesion_weight >= 0, "lesion_weight", self.lesion_weight, ">= 0")

    @property
    def enabled(self) -> bool:
        return self.attention or self.feature_cr


@dataclass(frozen=True)
class LossConfig:
    """Classification loss: cross-entropy, focal, class-balanced focal (Eq. 9), or the
    attention-enhanced ResNet-50's focal loss with 1/sqrt(n) class weights (``sqrt_focal``;
    ``alpha`` weighs the pneumonia classes, ``1 - alpha`` the normal class)."""

    kind: Literal["ce", "focal", "cb_focal", "sqrt_focal"] = "cb_focal"
    beta: float = 0.9999
    gamma: float = 1.0
    mode: Literal["softmax", "sigmoid"] = "softmax"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _check(0.0 < self.alpha < 1.0, "alpha", self.alpha, "between 0 and 1")
        _check(self.gamma >= 0.0, "gamma", self.gamma, ">= 0")


@dataclass(frozen=True)
class ClassAttentionConfig:
    """The class-based attention network (seed 003) and its loss (Eq. 5).

    Attributes:
        dim: width of the attention gates' common space.
        entropy_weight: ``lambda``, weight of the entropy of absent classes' attention maps.
    """

    dim: int = 64
    entropy_weight: float = 0.1
    #: ``c_i``: "paper" ``n_min^2 / n_i`` or "balanced" negatives over positives (``class_attention_weights``).
    class_weights: Literal["paper", "balanced"] = "paper"
    #: Subtract ``log c_i`` from each finding's logit when the model is used (the contract's
    #: ``logit_adjustment``): the weighted loss's optimum is ``p* = c q / (c q + 1 - q)`` for
    #: a true probability ``q``, which reaches 0.5 already at ``q = 1 / (1 + c_i)``; the
    #: offset gives back ``q``, so that the 0.5 rule and "normal" mean what they say.
    logit_adjustment: bool = True

    def __post_init__(self) -> None:
        _check(self.dim >= 1, "dim", self.dim, ">= 1")
        _check(
            self.class_weights in ("paper", "balanced"),
            "class_weights",
            self.class_weights,
            "paper or balanced",
        )
        _check(self.entropy_weight >= 0, "entropy_weight", self.entropy_weight, ">= 0")


@dataclass(frozen=True, kw_only=True)
class CIAConfig:
    """CIA-Net (seed 002): negative pairing, alignment and the weights of its losses.

    Attributes:
        negative_sampling: "hash" (nearest 16 x 16 thumbnail), "random" or "canonical" (Table 5).
        alignment: use the alignment module (Table 6).
        bank_size: normal training images kept in the model to pair with.
        box_weight: ``beta_B`` of Eq. 6.
        feature_weight: weight of the alignment's feature reconstruction loss (Eq. 2).
        consistency_weight: weight of the alignment's pixel consistency loss.
        grid_upsample: upsampling of the class maps at test time.
    """

    negative_sampling: Literal["hash", "random", "canonical"] = "hash"
    alignment: bool = True
    bank_size: int = 256
    box_weight: float = 1.0
    feature_weight: float = 1.0
    consistency_weight: float = 1.0
    grid_upsample: int = 4

    def __post_init__(self) -> None:
        _check(self.bank_size >= 2, "bank_size", self.bank_size, ">= 2")
        _check(self.grid_upsample >= 1, "grid_upsample", self.grid_upsample, ">= 1")
        for name in ("box_weight", "feature_weight", "consistency_weight"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Stage II: supervised training of the classifier.

    ``class_attention`` and ``cia_net`` train with their papers' own losses (Eq. 5 of
    seed 003; Eq. 2 and 4-6 of seed 002), configured under ``class_attention`` and ``cia``;
    ``loss`` is for the others.
    """

    #: a key of :data:`dp_model.networks.architectures.ARCHITECTURES`
    architecture: str = "resnet18"
    epochs: int = 30
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    #: "cosine" (after the warm-up) or "step": the rate times ``step_gamma`` every ``step_epochs``
    #: epochs, as CIA-Net's and the attention ResNet-50's papers train.
    schedule: Literal["cosine", "step"] = "cosine"
    step_epochs: int = 5
    step_gamma: float = 0.1
    select_metric: Literal["balanced_accuracy", "macro_f1", "accuracy"] = "balanced_accuracy"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mgacr: MGACRConfig = field(default_factory=MGACRConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    class_attention: ClassAttentionConfig = field(default_factory=ClassAttentionConfig)
    cia: CIAConfig = field(default_factory=CIAConfig)

    @property
    def multi_label(self) -> bool:
        """One sigmoid output per finding, trained with the architecture's own losses."""
        return ARCHITECTURES[self.architecture].multi_label

    def __post_init__(self) -> None:
        _check(
            self.architecture in ARCHITECTURES,
            "architecture",
            self.architecture,
            f"one of {list(ARCHITECTURES)}",
        )
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(self.schedule in ("cosine", "step"), "schedule", self.schedule, "cosine or step")
        _check(
            self.step_epochs >= 1 and 0 < self.step_gamma <= 1,
            "step_epochs / step_gamma",
            (self.step_epochs, self.step_gamma),
            ">= 1 / in (0, 1]",
        )
        if not ARCHITECTURES[self.architecture].attention and self.mgacr.enabled:
            heads = " or ".join(name for name, a in ARCHITECTURES.items() if a.attention)
            raise ValueError(
                f"MGACR needs the {heads} architecture; switch mgacr.attention and mgacr.feature_cr off for {self.architecture}"
            )


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Where and how fast.

    Attributes:
        device: "auto" (CUDA when present), "cpu" or "cuda".
        amp: bfloat16 autocast on CUDA (ignored on the CPU).
        channels_last: channels-last memory format on CUDA.
        compile: ``torch.compile`` the training step's network.
        seed: seeds data order, augmentation and initialisation.
        threads: CPU threads for PyTorch (0: leave PyTorch's default).
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    threads: int = 0


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``dp-train`` needs.

    Attributes:
        name: the bundle's name.
        version: the bundle's version.
        demo: the run is a demonstration on synthetic data; every artefact says so.
    """

    name: str = "deep_pneumonia"
    version: str = "0.1.0"
    demo: bool = False
    #: also train an untuned plain ResNet18 (cross-entropy, no augmentation, no search) on the same
    #: split and epochs, and show it, the majority class and chance beside the model in its card
    baseline: bool = True
    #: check an 8-bit copy of the served graph on the validation split and keep it where no served
    #: decision changes (dp_model.serving.quantized; minutes on a large split); false: no copy,
    #: and a node cannot serve this bundle with ``engine: onnx-int8``
    int8: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if (
            self.pretrain.enabled
            and self.pretrain.epochs > 0
            and not ARCHITECTURES[self.finetune.architecture].pretrainable
        ):
            pretrainable = [name for name, a in ARCHITECTURES.items() if a.pretrainable]
            raise ValueError(
                f"contrastive pre-training initialises ResNet18 backbones ({', '.join(pretrainable)}); set pretrain.enabled: false for {self.finetune.architecture}"
            )
