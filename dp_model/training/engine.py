"""The two training stages, written to be read top to bottom.

Stage I (SimCLR) pre-trains the encoder on the training images; stage II trains the
classifier with the configured loss and MGACR. Data stay resident on the device; every
batch is indexed, masked from its boxes and augmented there. Each epoch ends with a
checkpoint that ``--resume`` continues from, exactly: data order and augmentation are
seeded by ``(seed, stage, epoch)``.

Around them: :mod:`.runtime` (device, processes, seeds, schedule), :mod:`.checkpoints`,
:mod:`.objectives` (networks, losses, optimizer) and :mod:`.evaluation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dp_transforms import boxes_to_masks

from ..config import to_mapping
from ..networks.losses import NTXentLoss, relative_scale
from ..networks.networks import SimCLRNet
from .checkpoints import History, history_state, resume, save_checkpoint
from .config import FinetuneConfig, PretrainConfig
from .data import Resident, batches
from .objectives import (
    CIAObjective,
    build_classifier,
    findings,
    make_optimizer,
    mgacr_loss,
    normal_index,
    stage_two_loss,
)
from .runtime import Runtime, augmenters, epoch_seed, unwrap, warmup_cosine, warmup_step, wrap

__all__ = ["FinetuneResult", "finetune", "finetune_step", "multi_label_step", "pretrain"]

logger = logging.getLogger(__name__)


# --- stage I: SimCLR -------------------------------------------------------------------------------------


def pretrain(
    config: PretrainConfig,
    data: Resident,
    runtime: Runtime,
    seed: int,
    checkpoint: Path | None = None,
    history: History | None = None,
    log: Callable[[str, dict, int], None] | None = None,
    run_config: dict | None = None,
) -> dict[str, Tensor]:
    """Stage I: returns the encoder's weights (the projector is discarded).

    Checkpoints carry ``run_config`` (the whole run's), or else this stage's configuration.
    """
    history = history if history is not None else History()
    torch.manual_seed(seed)
    net = SimCLRNet(hidden_dim=config.hidden_dim, projection_dim=config.projection_dim)
    model = wrap(net, runtime)
    optimizer = make_optimizer(config, model)
    loss_fn = NTXentLoss(config.temperature)
    batch_size = min(config.batch_size, len(data))
    if batch_size < config.batch_size:
        logger.warning(
            "stage I batch size %d exceeds the %d training images; using %d",
            config.batch_size,
            len(data),
            batch_size,
        )
    if batch_size < 2:
        raise ValueError(f"stage I needs at least two training images, got {len(data)}")
    steps_per_epoch = len(data) // batch_size
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total, steps_per_epoch)
    )
    start = resume(checkpoint, "pretrain", net, optimizer, schedule, history)
    for epoch in range(start, config.epochs):
        affine, intensity = augmenters(config.augment, epoch_seed(seed, 1, epoch, runtime.rank))
        model.train()
        sums = Sums(runtime.device)
        order = batches(
            len(data), batch_size, epoch_seed(seed, 1, epoch), drop_last=True, device=runtime.device
        )
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
        if runtime.main:  # NT-Xent at chance is ln(2N - 1), pair accuracy 1 / (2N - 1)
            chance = {
                "chance_loss": math.log(2 * batch_size - 1),
                "chance_top1": 1.0 / (2 * batch_size - 1),
            }
            logger.info("%s", epoch_line(f"stage I {epoch + 1}/{config.epochs}", record | chance))
        if checkpoint is not None and runtime.main:
            save_checkpoint(
                checkpoint,
                {
                    "stage": "pretrain",
                    "epoch": epoch + 1,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "history": history_state(history),
                },
                run_config or to_mapping(config),
            )
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


# --- stage II ----------------------------------------------------------------------------------------------


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
    run_config: dict | None = None,
) -> FinetuneResult:
    """Stage II: the classifier, with checkpoints selected on ``config.select_metric`` of ``val``.

    Checkpoints carry ``run_config`` (the whole run's), or else this stage's configuration.
    """
    history = history if history is not None else History()
    counts = torch.bincount(train.labels.cpu(), minlength=len(class_names)).tolist()
    normal = normal_index(class_names)
    outputs = findings(class_names, normal)
    net = build_classifier(config, len(class_names), encoder, seed, train.images.shape[-1])
    if net.needs_references:  # CIA-Net pairs inputs with normal training images
        net.set_references(train.images[train.labels == normal].cpu(), seed)
    model = wrap(net, runtime)
    cls_loss = stage_two_loss(config, counts, class_names).to(runtime.device)
    mgacr = mgacr_loss(config)
    optimizer = make_optimizer(config, model)
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "step":
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: warmup_step(
                s, warmup, config.step_epochs * steps_per_epoch, config.step_gamma
            ),
        )
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, total, warmup)
        )
    best = {
        "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "epoch": -1,
        "metric": -math.inf,
    }
    start = resume(checkpoint, "finetune", net, optimizer, schedule, history, best)
    for epoch in range(start, config.epochs):
        affine, intensity = augmenters(config.augment, epoch_seed(seed, 2, epoch, runtime.rank))
        if config.multi_label:
            step = multi_label_step(
                model, cls_loss, affine, intensity, runtime, train.images.shape[-1], outputs
            )
        else:
            step = finetune_step(
                model, cls_loss, mgacr, affine, intensity, runtime, train.images.shape[-1], normal
            )
        model.train()
        sums = Sums(runtime.device)
        order = batches(
            len(train),
            config.batch_size,
            epoch_seed(seed, 2, epoch),
            drop_last=False,
            device=runtime.device,
        )
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
            best = {
                "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                "epoch": epoch,
                "metric": metric,
            }
        history.finetune.append(record)
        if runtime.main:
            logger.info("%s", epoch_line(f"stage II {epoch + 1}/{config.epochs}", record))
        if checkpoint is not None and runtime.main:
            save_checkpoint(
                checkpoint,
                {
                    "stage": "finetune",
                    "epoch": epoch + 1,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "history": history_state(history),
                    "best": best,
                },
                run_config or to_mapping(config),
            )
        if log:
            log("finetune", record, epoch)
    return FinetuneResult(net, best["state"], int(best["epoch"]), float(best["metric"]))


def epoch_line(stage: str, record: dict[str, float]) -> str:
    """One console line per epoch: the loss and its terms, then the validation metrics
    (per-stage terms, ``"<term>@<stage>"``, stay in the record and the model card's plot).

    >>> epoch_line("stage II 2/10", {"loss": 1.5, "cls": 1.2, "feat_cr": 3.0, "lr": 0.001, "val_macro_auc": 0.71})
    'stage II 2/10: loss 1.500 (cls 1.200, feat_cr 3.000); val macro auc 0.710; lr 0.001'
    """
    terms = [
        f"{k} {v:.3f}"
        for k, v in record.items()
        if k not in ("loss", "lr") and not k.startswith(("val_", "chance_")) and "@" not in k
    ]
    line = f"{stage}: loss {record.get('loss', float('nan')):.3f}" + (
        f" ({', '.join(terms)})" if terms else ""
    )
    if "chance_loss" in record:
        line += f" [chance: loss {record['chance_loss']:.3f}, top1 {record['chance_top1']:.3f}]"
    validation = [
        f"{k[4:].replace('_', ' ')} {v:.3f}" for k, v in record.items() if k.startswith("val_")
    ]
    if validation:
        line += "; val " + ", ".join(validation)
    return line + f"; lr {record.get('lr', float('nan')):.3g}"


def finetune_step(
    model, cls_loss, mgacr, affine, intensity, runtime: Runtime, size: int, normal: int
):
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
        if mgacr.relative:
            parts["mgacr_scale"] = relative_scale(classification, logits, labels)
            extra = extra * parts["mgacr_scale"]
        loss = classification + extra
        return loss, {"loss": loss, "cls": classification, "mgacr": extra.detach(), **parts}

    return step


def multi_label_step(
    model, loss_fn, affine, intensity, runtime: Runtime, size: int, outputs: list[int]
):
    """One micro-batch of a multi-label variant: one-hot labels become per-finding targets."""
    net = unwrap(model)
    columns = torch.tensor(outputs, device=runtime.device)

    def step(batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, boxes, labels, has_boxes = batch
        # the normal class has no column
        targets = F.one_hot(labels, len(outputs) + 1).float()[:, columns]
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


def _progress(items: list, desc: str, runtime: Runtime) -> Iterator:
    return iter(tqdm(items, desc=desc, unit="batch", leave=False, disable=not runtime.main))
