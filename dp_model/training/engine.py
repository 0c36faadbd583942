"""The two training stages, written to be read top to bottom.

Stage I (SimCLR) pre-trains the encoder on the training images; stage II trains the
classifier with the configured loss and MGACR. Data stay resident on the device; every
batch is indexed, masked from its boxes and augmented there. Each epoch ends with a
checkpoint that ``--resume`` continues from, exactly: data order and augmentation are
seeded by ``(seed, stage, epoch)``.

Under DDP (``torchrun``), every process takes its contiguous share of each global batch,
DistributedDataParallel averages the gradients, and only rank 0 writes files. BatchNorm
statistics are per process (SyncBatchNorm is used on CUDA); a single process with
``micro_batches`` equal to the number of processes computes the same thing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dp_transforms import RandChestAffine, RandChestIntensity, boxes_to_masks

from ..explain import localization_maps
from ..losses import CBFocalLoss, ClassAttentionLoss, MGACRLoss, NTXentLoss, SqrtFocalLoss, cia_loss, consistency_loss, feature_reconstruction_loss
from ..metrics import localization_accuracy
from ..networks import DeepPneumoniaNet, SimCLRNet, build_network, class_scores, output_probabilities
from .config import AugmentConfig, FinetuneConfig, PretrainConfig, RuntimeConfig
from .data import Resident, batches

logger = logging.getLogger(__name__)


# --- runtime: device, precision, processes -------------------------------------------------------


@dataclass
class Runtime:
    """Where the run executes: device, precision and the process group."""

    device: torch.device
    amp: bool
    channels_last: bool
    compile: bool
    rank: int = 0
    world: int = 1
    micro_batches: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def share(self, index: Tensor) -> list[Tensor]:
        """This process's part of a global batch, as ``micro_batches`` micro-batches."""
        parts = index.tensor_split(self.world)[self.rank] if self.world > 1 else index
        return [p for p in parts.tensor_split(self.micro_batches) if len(p)]


def make_runtime(config: RuntimeConfig, micro_batches: int = 1) -> Runtime:
    """Pick the device and join the process group when launched by ``torchrun``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return Runtime(device, config.amp and cuda, config.channels_last and cuda, config.compile, rank, world, micro_batches)


def wrap(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Device, memory format, SyncBatchNorm + DDP across processes; compile when asked."""
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if runtime.world > 1:
        if runtime.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
    if runtime.compile:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --- augmentation ----------------------------------------------------------------------------------


def augmenters(config: AugmentConfig, seed: int) -> tuple[RandChestAffine, RandChestIntensity]:
    affine = RandChestAffine(scale=config.crop_scale, ratio=config.crop_ratio, rotate_degrees=config.rotate_degrees, flip_prob=config.flip_prob)
    intensity = RandChestIntensity(
        gamma=config.gamma, contrast=config.contrast, brightness=config.brightness,
        blur_prob=config.blur_prob, blur_sigma=config.blur_sigma, noise_prob=config.noise_prob, noise_std=config.noise_std,
    )  # fmt: skip
    return affine.set_random_state(seed), intensity.set_random_state(seed + 1)


def epoch_seed(seed: int, stage: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch * 101 + rank) % (2**31 - 1)


# --- schedules ------------------------------------------------------------------------------------------


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- checkpoints --------------------------------------------------------------------------------------


@dataclass
class History:
    """Per-epoch records of both stages, for resuming, plots and TensorBoard."""

    pretrain: list[dict[str, float]] = field(default_factory=list)
    finetune: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# --- stage I: SimCLR -------------------------------------------------------------------------------------


def pretrain(
    config: PretrainConfig,
    data: Resident,
    runtime: Runtime,
    seed: int,
    checkpoint: Path | None = None,
    history: History | None = None,
    log: Callable[[str, dict, int], None] | None = None,
) -> dict[str, Tensor]:
    """Stage I: returns the encoder's weights (the projector is discarded)."""
    history = history if history is not None else History()
    torch.manual_seed(seed)
    net = SimCLRNet(hidden_dim=config.hidden_dim, projection_dim=config.projection_dim)
    model = wrap(net, runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = NTXentLoss(config.temperature)
    batch_size = min(config.batch_size, len(data))
    if batch_size < config.batch_size:
        logger.warning("stage I batch size %d exceeds the %d training images; using %d", config.batch_size, len(data), batch_size)
    if batch_size < 2:
        raise ValueError(f"stage I needs at least two training images, got {len(data)}")
    steps_per_epoch = len(data) // batch_size
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, steps_per_epoch))
    start = _resume(checkpoint, "pretrain", net, optimizer, schedule, history)
    for epoch in range(start, config.epochs):
        affine, intensity = augmenters(config.augment, epoch_seed(seed, 1, epoch, runtime.rank))
        model.train()
        sums = Sums(runtime.device)
        order = batches(len(data), batch_size, epoch_seed(seed, 1, epoch), drop_last=True, device=runtime.device)
        for index in _progress(order, f"stage I {epoch + 1}/{config.epochs}", runtime):
            optimizer.zero_grad(set_to_none=True)
            parts = runtime.share(index)
            for part in parts:
                x = data.batch(part)[0]
                v1, v2 = intensity(affine(x)), intensity(affine(x))
                with runtime.autocast():
                    z1, z2 = model(runtime.prepare(v1)), model(runtime.prepare(v2))
                loss = loss_fn(z1, z2)
                (loss / len(parts)).backward()
                sums.add({"loss": loss, "top1": _pair_accuracy(z1.detach(), z2.detach())})
            optimizer.step()
            schedule.step()
        record = sums.means() | {"lr": schedule.get_last_lr()[0]}
        history.pretrain.append(record)
        if checkpoint is not None and runtime.main:
            save_checkpoint(checkpoint, {"stage": "pretrain", "epoch": epoch + 1, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                         "schedule": schedule.state_dict(), "history": _history_state(history)})  # fmt: skip
        if log:
            log("pretrain", record, epoch)
    return net.encoder_state()


def _pair_accuracy(z1: Tensor, z2: Tensor) -> Tensor:
    """Share of views whose nearest other view is their partner (the paper's Fig. 6 'accuracy')."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    similarity = z @ z.T
    similarity.fill_diagonal_(-2.0)
    n = z1.shape[0]
    partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return (similarity.argmax(dim=1) == partner).float().mean()


class Sums:
    """Running sums kept on the device: reading a loss every step would stall the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.totals, self.count = device, {}, 0

    def add(self, values: dict[str, Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.totals[key] = self.totals[key] + value if key in self.totals else value
        self.count += 1

    def means(self) -> dict[str, float]:
        """One transfer per epoch."""
        if not self.totals:
            return {}
        keys = list(self.totals)
        values = (torch.stack([self.totals[k] for k in keys]) / max(1, self.count)).tolist()
        return dict(zip(keys, values))


# --- stage II: classifier --------------------------------------------------------------------------------


def network_options(config: FinetuneConfig, image_size: int) -> dict:
    """The constructor options of the configured network (they travel in the bundle's contract)."""
    if config.architecture == "class_attention":
        return {"dim": config.class_attention.dim}
    if config.architecture == "cia_net":
        c = config.cia
        return {"image_size": image_size, "bank_size": c.bank_size, "negative_sampling": c.negative_sampling, "alignment": c.alignment, "grid_upsample": c.grid_upsample}
    return {}


def normal_index(class_names: list[str] | tuple[str, ...]) -> int:
    """The class meaning "no pneumonia": "normal" when there is one, else the first."""
    return class_names.index("normal") if "normal" in class_names else 0


def findings(class_names: list[str] | tuple[str, ...], normal: int) -> list[int]:
    """Indices of the classes a multi-label network has an output for: all but the normal one."""
    return [i for i in range(len(class_names)) if i != normal]


def build_classifier(config: FinetuneConfig, num_classes: int, encoder: dict[str, Tensor] | None, seed: int, image_size: int = 224) -> nn.Module:
    """The stage II network: MGACR heads only when a MGACR term is switched on.

    ``num_classes`` counts every class; a multi-label network gets one output per finding.
    """
    torch.manual_seed(seed)
    if config.architecture != "resnet18":
        outputs = num_classes - 1 if config.multi_label else num_classes
        net = build_network(config.architecture, outputs, **network_options(config, image_size))
        if encoder is not None:
            net.load_encoder(encoder)
        return net
    stages = config.mgacr.stages if config.mgacr.enabled else ()
    net = DeepPneumoniaNet(num_classes=num_classes, attention_stages=stages)
    if encoder is not None:
        missing, unexpected = net.backbone.load_state_dict(encoder, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise ValueError(f"pre-trained encoder does not fit: missing {missing}, unexpected {unexpected}")
    return net


def classification_loss(config: FinetuneConfig, class_counts: list[int], class_names: list[str]) -> nn.Module:
    loss = config.loss
    if loss.kind == "ce":
        return nn.CrossEntropyLoss()
    if loss.kind == "sqrt_focal":
        return SqrtFocalLoss(class_counts, alpha=loss.alpha, gamma=loss.gamma, normal_index=normal_index(class_names), class_names=class_names)
    beta = loss.beta if loss.kind == "cb_focal" else 0.0  # beta 0: equal weights, plain focal loss
    return CBFocalLoss(class_counts, beta=beta, gamma=loss.gamma, mode=loss.mode, class_names=class_names)


@dataclass
class FinetuneResult:
    model: nn.Module
    best_state: dict[str, Tensor]
    best_epoch: int
    best_metric: float


def finetune(
    config: FinetuneConfig,
    train: Resident,
    val: Resident | None,
    class_names: list[str],
    runtime: Runtime,
    seed: int,
    encoder: dict[str, Tensor] | None = None,
    checkpoint: Path | None = None,
    history: History | None = None,
    log: Callable[[str, dict, int], None] | None = None,
    evaluate: Callable[[nn.Module, Resident], dict[str, float]] | None = None,
) -> FinetuneResult:
    """Stage II: the classifier, with checkpoints selected on ``config.select_metric`` of ``val``."""
    history = history if history is not None else History()
    counts = torch.bincount(train.labels.cpu(), minlength=len(class_names)).tolist()
    normal = normal_index(class_names)
    outputs = findings(class_names, normal)
    net = build_classifier(config, len(class_names), encoder, seed, train.images.shape[-1])
    if hasattr(net, "set_references"):  # CIA-Net pairs inputs with normal training images
        net.set_references(train.images[train.labels == normal].cpu(), seed)
    model = wrap(net, runtime)
    if config.multi_label:
        cls_loss = variant_loss(config, [counts[i] for i in outputs], [class_names[i] for i in outputs]).to(runtime.device)
    else:
        cls_loss = classification_loss(config, counts, class_names).to(runtime.device)
    mgacr = _mgacr_loss(config)
    optimizer = _optimizer(config, model)
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, int(config.warmup_epochs * steps_per_epoch)))
    best = {"state": {k: v.detach().clone() for k, v in net.state_dict().items()}, "epoch": -1, "metric": -math.inf}
    start = _resume(checkpoint, "finetune", net, optimizer, schedule, history, best)
    for epoch in range(start, config.epochs):
        affine, intensity = augmenters(config.augment, epoch_seed(seed, 2, epoch, runtime.rank))
        if config.multi_label:
            step = multi_label_step(model, cls_loss, affine, intensity, runtime, train.images.shape[-1], outputs)
        else:
            step = finetune_step(model, cls_loss, mgacr, affine, intensity, runtime, train.images.shape[-1], normal)
        model.train()
        sums = Sums(runtime.device)
        order = batches(len(train), config.batch_size, epoch_seed(seed, 2, epoch), drop_last=False, device=runtime.device)
        for index in _progress(order, f"stage II {epoch + 1}/{config.epochs}", runtime):
            optimizer.zero_grad(set_to_none=True)
            parts = runtime.share(index)
            for part in parts:
                loss, parts_of_loss = step(train.batch(part))
                (loss / len(parts)).backward()
                sums.add(parts_of_loss)
            optimizer.step()
            schedule.step()
        record = sums.means() | {"lr": schedule.get_last_lr()[0]}
        if val is not None and len(val) and evaluate is not None:
            record |= {f"val_{k}": v for k, v in evaluate(unwrap(model), val).items()}
        metric = record.get(f"val_{config.select_metric}", -record["loss"])
        if metric > best["metric"]:
            best = {"state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, "epoch": epoch, "metric": metric}
        history.finetune.append(record)
        if checkpoint is not None and runtime.main:
            save_checkpoint(
                checkpoint,
                {"stage": "finetune", "epoch": epoch + 1, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "history": _history_state(history), "best": best},
            )  # fmt: skip
        if log:
            log("finetune", record, epoch)
    return FinetuneResult(net, best["state"], int(best["epoch"]), float(best["metric"]))


def _mgacr_loss(config: FinetuneConfig) -> MGACRLoss | None:
    m = config.mgacr
    if not m.enabled:
        return None
    return MGACRLoss(m.att_weight if m.attention else 0.0, m.feat_weight if m.feature_cr else 0.0, m.normal_images, m.eps)


def _optimizer(config: FinetuneConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def finetune_step(model, cls_loss, mgacr, affine, intensity, runtime: Runtime, size: int, normal: int):
    """One micro-batch: masks from boxes, joint augmentation, losses. Returns the loss and its parts."""

    def step(batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, boxes, labels, has_boxes = batch
        if mgacr is None:
            x = intensity(affine(x))
            with runtime.autocast():
                logits = model(runtime.prepare(x))
            loss = cls_loss(logits.float(), labels)
            return loss, {"loss": loss, "cls": loss}
        mask = boxes_to_masks(boxes, (size, size))
        x, mask = affine(x, mask)
        x = intensity(x)
        with runtime.autocast():
            logits, stages = model(runtime.prepare(x), train_outputs=True)
        classification = cls_loss(logits.float(), labels)
        extra, parts = mgacr(stages, mask, has_boxes, labels == normal)
        loss = classification + extra
        return loss, {"loss": loss, "cls": classification, **parts}

    return step


def variant_loss(config: FinetuneConfig, positive_counts: list[int], names: list[str]) -> nn.Module:
    """The multi-label variants' own losses; CIA-Net's is assembled in :func:`multi_label_step`."""
    if config.architecture == "class_attention":
        return ClassAttentionLoss(positive_counts, config.class_attention.entropy_weight, names)
    return CIAObjective(config.cia.box_weight, config.cia.feature_weight, config.cia.consistency_weight)


class CIAObjective(nn.Module):
    """Eq. 6 plus the alignment's feature reconstruction (Eq. 2) and consistency losses."""

    def __init__(self, box_weight: float, feature_weight: float, consistency_weight: float) -> None:
        super().__init__()
        self.box_weight, self.feature_weight, self.consistency_weight = box_weight, feature_weight, consistency_weight

    def forward(self, net: nn.Module, outputs, targets: Tensor, mask: Tensor, has_boxes: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        grid = outputs.grid
        # A grid cell is positive for the image's class when it overlaps one of its boxes.
        cells = (F.adaptive_max_pool2d(mask, grid.shape[-2:]) > 0.01).float()
        boxed = targets * has_boxes[:, None].float()  # lambda: class k of the image has a box
        detection = cia_loss(grid, targets[:, :, None, None] * cells, boxed, targets, self.box_weight)
        parts = {"cia": detection}
        loss = detection
        if outputs.aligned is not None:
            canonical = net.canonical.expand_as(outputs.aligned)
            feature = feature_reconstruction_loss(net.probe(outputs.aligned), net.probe(canonical))
            consistency = consistency_loss(outputs.aligned, canonical)
            loss = loss + self.feature_weight * feature + self.consistency_weight * consistency
            parts |= {"align_feat": feature, "align_consistency": consistency}
        return loss, parts


def multi_label_step(model, loss_fn, affine, intensity, runtime: Runtime, size: int, outputs: list[int]):
    """One micro-batch of a multi-label variant: one-hot labels become per-finding targets."""
    net = unwrap(model)
    columns = torch.tensor(outputs, device=runtime.device)

    def step(batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, boxes, labels, has_boxes = batch
        targets = F.one_hot(labels, len(outputs) + 1).float()[:, columns]  # the normal class has no column
        mask = boxes_to_masks(boxes, (size, size))
        x, mask = affine(x, mask)
        x = intensity(x)
        with runtime.autocast():
            result = model(runtime.prepare(x), train_outputs=True)
        if isinstance(loss_fn, CIAObjective):
            loss, parts = loss_fn(net, result, targets, mask, has_boxes)
        else:
            logits, attention = result
            loss = loss_fn(logits, attention, targets)
            parts = {}
        return loss, {"loss": loss, **parts}

    return step


# --- prediction -------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, data: Resident, runtime: Runtime, batch_size: int = 256, normal: int = 0) -> np.ndarray:
    """Class scores ``(N, C)`` of a resident split (no augmentation): softmax probabilities,
    or for a multi-label network its findings' sigmoids with the normal class (index
    ``normal``) scoring ``1 - max`` (:func:`~dp_model.networks.class_scores`)."""
    model.eval()
    out = []
    net = unwrap(model)
    multi_label = getattr(net, "multi_label", False)
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(len(data), start + batch_size), device=data.images.device)
        x = data.batch(index)[0].to(runtime.device)
        with runtime.autocast():
            probabilities = output_probabilities(net, model(runtime.prepare(x)))
        out.append(class_scores(probabilities, multi_label, normal).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def localization(model: nn.Module, data: Resident, classes: tuple[str, ...], normal: int = 0, batch_size: int = 64) -> dict[str, list[float]]:
    """Localization accuracy at :data:`~dp_model.metrics.IOU_THRESHOLDS` on the boxed images of ``data``.

    The model's region for an image is its :func:`~dp_model.explain.localization_maps` map
    of the image's class at 0.5 or more; the truth is the union of the image's boxes.
    """
    model.eval()
    device = next(model.parameters()).device
    boxed = torch.nonzero(data.has_boxes.cpu()).flatten()
    predicted, truth, labels = [], [], []
    size = data.images.shape[-1]
    for part in boxed.split(batch_size):
        x, boxes, y, _ = data.batch(part.to(data.images.device))
        maps = localization_maps(model, x.to(device), y.to(device), normal)
        predicted.append((maps[:, 0] >= 0.5).cpu().numpy())
        truth.append((boxes_to_masks(boxes.cpu(), (size, size))[:, 0] >= 0.5).numpy())
        labels.append(y.cpu().numpy())
    if not predicted:
        return {}
    return localization_accuracy(np.concatenate(predicted), np.concatenate(truth), np.concatenate(labels), classes)


# --- helpers ----------------------------------------------------------------------------------------------


def _progress(items: list, desc: str, runtime: Runtime) -> Iterator:
    return iter(tqdm(items, desc=desc, unit="batch", leave=False, disable=not runtime.main))


def _history_state(history: History) -> dict:
    return {"pretrain": [dict(r) for r in history.pretrain], "finetune": [dict(r) for r in history.finetune]}


def _resume(checkpoint: Path | None, stage: str, net: nn.Module, optimizer, schedule, history: History, best: dict | None = None) -> int:
    """Load the last checkpoint of ``stage`` if there is one; returns the epoch to start from."""
    saved = load_checkpoint(checkpoint) if checkpoint is not None else None
    if not saved or saved.get("stage") != stage:
        return 0
    net.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    history.pretrain[:] = saved["history"]["pretrain"]
    history.finetune[:] = saved["history"]["finetune"]
    if best is not None and "best" in saved:
        best.update(saved["best"])
    logger.info("resuming %s from epoch %d (%s)", stage, saved["epoch"] + 1, checkpoint)
    return int(saved["epoch"])

