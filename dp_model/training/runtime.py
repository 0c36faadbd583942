"""Where a run executes: device, precision, processes (DDP), seeds, augmenters, the LR schedule.

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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dp_transforms import RandChestAffine, RandChestIntensity

from .config import AugmentConfig, RuntimeConfig

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
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
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cuda
        else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        # CPU kernels split their sums by thread: the same run with another thread count
        # gives other (equally valid) weights, so the count is part of what reproduces a run.
        logger.info(
            "training on the CPU with %d PyTorch threads (runtime.threads pins the count; the weights depend on it)",
            torch.get_num_threads(),
        )
    return Runtime(
        device=device,
        amp=config.amp and cuda,
        channels_last=config.channels_last and cuda,
        compile=config.compile,
        rank=rank,
        world=world,
        micro_batches=micro_batches,
    )


def wrap(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Device, memory format, SyncBatchNorm + DDP across processes; compile when asked."""
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if runtime.world > 1:
        if runtime.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=False
        )
    if runtime.compile:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def augmenters(config: AugmentConfig, seed: int) -> tuple[RandChestAffine, RandChestIntensity]:
    affine = RandChestAffine(
        scale=config.crop_scale,
        ratio=config.crop_ratio,
        rotate_degrees=config.rotate_degrees,
        flip_prob=config.flip_prob,
    )
    intensity = RandChestIntensity(
        gamma=config.gamma,
        contrast=config.contrast,
        brightness=config.brightness,
        blur_prob=config.blur_prob,
        blur_sigma=config.blur_sigma,
        noise_prob=config.noise_prob,
        noise_std=config.noise_std,
    )
    return affine.set_random_state(seed), intensity.set_random_state(seed + 1)


def epoch_seed(seed: int, stage: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch * 101 + rank) % (2**31 - 1)


def warmup_step(step: int, warmup: int, every: int, gamma: float) -> float:
    """Learning-rate factor: linear warm-up, then ``gamma`` times less every ``every`` steps (StepLR)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return gamma ** ((step - warmup) // max(1, every))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
