"""Training throughput: the model-only ceiling against the real training step, in one run.

    python benchmarks/train_speed.py                       # on the GPU when there is one
    python benchmarks/train_speed.py --device cpu --steps 3 --batch 16 --size 64   # a smoke run

Prints, for the same device and the same process:

1. the ceiling: torchvision-equivalent ResNet18, compiled (when --compile), bfloat16
   autocast and channels-last on CUDA, SGD, on tensors already on the device;
2. stage II end to end: the trainer's own step (``engine.finetune_step``) on a resident
   uint8 split with boxes: indexing, masks from boxes, joint affine and intensity
   augmentation, MGACR on four stages, class-balanced focal loss, optimizer;
3. the same without MGACR;
4. stage I: SimCLR pairs per second (two augmented views, NT-Xent).

Targets on an H100 at 224 px: stage II at least 75 % of the ceiling, stage I at least
5,000 pairs/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from dp_model.networks.losses import CBFocalLoss, MGACRLoss, NTXentLoss
from dp_model.networks.networks import DeepPneumoniaNet, SimCLRNet
from dp_model.training.config import FinetuneConfig, MGACRConfig, PretrainConfig, RuntimeConfig
from dp_model.training.data import Resident
from dp_model.training.engine import finetune_step
from dp_model.training.runtime import augmenters, make_runtime, wrap


def resident(n: int, size: int, device: torch.device, seed: int = 0) -> Resident:
    """Random images with one box on half of them (the speed does not depend on content)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    boxes = torch.zeros(n, 2, 4)
    corner = torch.rand(n // 2, 2, generator=g) * size * 0.6
    boxes[: n // 2, 0, :2], boxes[: n // 2, 0, 2:] = corner, corner + size * 0.3
    labels = torch.randint(0, 5, (n,), generator=g)
    return Resident(
        images, boxes, labels, boxes[:, :, 2].sum(1) > 0, [str(i) for i in range(n)]
    ).to(device)


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step after warm-up (compilation happens during warm-up)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def ceiling(runtime, batch: int, size: int, steps: int, warmup: int) -> float:
    net = wrap(DeepPneumoniaNet(attention_stages=()), runtime)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = runtime.prepare(torch.rand(batch, 1, size, size, device=runtime.device))
    y = torch.randint(0, 5, (batch,), device=runtime.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        optimizer.step()

    return batch / timed(step, steps, warmup, runtime.device)


def stage_two(runtime, data: Resident, batch: int, steps: int, warmup: int, mgacr: bool) -> float:
    config = FinetuneConfig(
        mgacr=MGACRConfig() if mgacr else MGACRConfig(attention=False, feature_cr=False)
    )
    net = DeepPneumoniaNet(attention_stages=config.mgacr.stages if mgacr else ())
    model = wrap(net, runtime)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    cls = CBFocalLoss([1000, 400, 240, 130, 50]).to(runtime.device)
    extra = MGACRLoss() if mgacr else None
    affine, intensity = augmenters(config.augment, 0)
    one = finetune_step(
        model, cls, extra, affine, intensity, runtime, data.images.shape[-1], normal=0
    )
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        index = torch.randint(0, len(data), (batch,), generator=g).to(
            runtime.device, non_blocking=True
        )
        optimizer.zero_grad(set_to_none=True)
        loss, _ = one(data.batch(index))
        loss.backward()
        optimizer.step()

    return batch / timed(step, steps, warmup, runtime.device)


def stage_one(runtime, data: Resident, batch: int, steps: int, warmup: int) -> float:
    config = PretrainConfig()
    model = wrap(SimCLRNet(), runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = NTXentLoss(config.temperature)
    affine, intensity = augmenters(config.augment, 0)
    g = torch.Generator().manual_seed(2)

    def step() -> None:
        index = torch.randint(0, len(data), (batch,), generator=g).to(
            runtime.device, non_blocking=True
        )
        x = data.batch(index)[0]
        v1, v2 = intensity(affine(x)), intensity(affine(x))
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            z1, z2 = model(runtime.prepare(v1)), model(runtime.prepare(v2))
        loss_fn(z1, z2).backward()
        optimizer.step()

    return batch / timed(step, steps, warmup, runtime.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="resident images to index into")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="torch.compile every network")
    args = parser.parse_args()
    runtime = make_runtime(RuntimeConfig(device=args.device, compile=args.compile))
    name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "CPU"
    print(
        f"{name}; torch {torch.__version__}; {args.size} px, batch {args.batch}, bf16 {runtime.amp}, channels-last {runtime.channels_last}, compile {args.compile}\n"
    )
    data = resident(args.images, args.size, runtime.device)
    top = ceiling(runtime, args.batch, args.size, args.steps, args.warmup)
    full = stage_two(runtime, data, args.batch, args.steps, args.warmup, mgacr=True)
    plain = stage_two(runtime, data, args.batch, args.steps, args.warmup, mgacr=False)
    pairs = stage_one(runtime, data, args.batch, args.steps, args.warmup)
    print("| what | images/s | share of ceiling |")
    print("|---|---|---|")
    print(f"| ceiling: ResNet18 step on device tensors | {top:,.0f} | 100 % |")
    print(f"| stage II end to end, MGACR + CB focal | {full:,.0f} | {full / top:.0%} |")
    print(f"| stage II end to end, no MGACR | {plain:,.0f} | {plain / top:.0%} |")
    print(f"| stage I SimCLR (pairs/s) | {pairs:,.0f} | - |")


if __name__ == "__main__":
    main()
