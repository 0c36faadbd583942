"""Single-image inference latency of the Deep Pneumonia classifier on the CPU.

    python benchmarks/inference_cpu.py                    # 224 px, all threads PyTorch uses
    python benchmarks/inference_cpu.py --bundle runs/demo/bundle

Times the network alone (an image already letterboxed, as the node has it after
decoding), after warm-up, and prints median and 95th percentile in milliseconds for eager
mode, channels-last, and with the heads a bundle carries. The target is at most 60 ms at
224 px on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dp_model.networks import DeepPneumoniaNet


def measure(model: torch.nn.Module, x: torch.Tensor, runs: int, warmup: int) -> tuple[float, float]:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--bundle", help="time this bundle's network instead of a fresh one")
    args = parser.parse_args()
    if args.bundle:
        from dp_model.bundle import load_bundle

        model, contract = load_bundle(args.bundle)
        args.size = contract.image_size
    else:
        model = DeepPneumoniaNet(num_classes=5).eval()
    x = torch.rand(1, 1, args.size, args.size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.size} px, {args.runs} runs after {args.warmup} warm-up\n"
    )
    print("| variant | median ms | p95 ms |")
    print("|---|---|---|")
    median, p95 = measure(model, x, args.runs, args.warmup)
    print(f"| eager, float32 | {median:.1f} | {p95:.1f} |")
    cl = model.to(memory_format=torch.channels_last)
    median, p95 = measure(
        cl, x.contiguous(memory_format=torch.channels_last), args.runs, args.warmup
    )
    print(f"| eager, float32, channels-last | {median:.1f} | {p95:.1f} |")


if __name__ == "__main__":
    main()
