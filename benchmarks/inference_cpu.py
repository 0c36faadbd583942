"""Single-image inference latency of the Deep Pneumonia classifier on the CPU.

    python benchmarks/inference_cpu.py                    # 224 px, all threads PyTorch uses
    python benchmarks/inference_cpu.py --bundle runs/demo/bundle
    python benchmarks/inference_cpu.py --engines --threads 2 --runs 50   # PyTorch against ONNX Runtime

Times the network alone (an image already letterboxed, as the node has it after
decoding), after warm-up, and prints median and 95th percentile in milliseconds for eager
mode, channels-last, and with the heads a bundle carries. The target is at most 60 ms at
224 px on a 2-core machine.

With ``--engines``: the node's forward pass (:class:`dp_model.serving.onnx_graph.ServedGraph`: the
logits, the ``map+`` of stage 3 and the gate's features of every stage, as the demo bundle
serves them; and the logits alone) in PyTorch eager, in ONNX Runtime from the exported graph
and from its 8-bit copy (:mod:`dp_model.serving.quantized`), one image, and the largest
difference of each graph's outputs from PyTorch's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dp_model.networks.networks import DeepPneumoniaNet


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


def alternated(calls, runs: int, warmup: int) -> list[tuple[float, float]]:
    """Median and fastest milliseconds of each of ``calls``, run in turn within every round, so
    that a load that comes and goes on a shared machine falls on all of them alike (the
    fastest run is the one least disturbed by it)."""
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for round_ in range(warmup + runs):
            for call, found in zip(calls, times):
                start = time.perf_counter()
                call()
                if round_ >= warmup:
                    found.append((time.perf_counter() - start) * 1000)
    return [(statistics.median(found), min(found)) for found in times]


def engines(model: torch.nn.Module, size: int, runs: int, warmup: int, threads: int) -> None:
    """PyTorch eager against ONNX Runtime for the node's forward pass of ``model``."""
    from dp_model.serving.onnx_graph import OnnxGraph, ServedGraph, export

    x = torch.rand(1, 1, size, size)
    from dp_model.serving.quantized import quantize

    print(
        "| forward pass | PyTorch eager median (fastest) ms | ONNX Runtime median (fastest) ms "
        "| ONNX Runtime 8-bit median (fastest) ms | speed-up of the medians, float / 8-bit "
        "| max abs difference, float / 8-bit |"
    )
    print("|---|---|---|---|---|---|")
    cases = (
        ("logits", ServedGraph(model, None)),
        (
            "served: logits, map+ of stage 3, gate features",
            ServedGraph(model, "map+:3", gate=True, stages=True),
        ),
    )
    with tempfile.TemporaryDirectory() as folder:
        for label, graph in cases:
            path, int8_path = Path(folder) / "graph.onnx", Path(folder) / "graph.int8.onnx"
            export(graph, path, size, "2.25.0")
            # ranges from random canvases: the speed is what is measured here; a bundle's own
            # copy is calibrated on training images and judged on its validation decisions
            quantize(path, int8_path, torch.rand(16, 1, size, size).numpy())
            session, int8 = OnnxGraph(path, threads), OnnxGraph(int8_path, threads)
            batch = x.numpy()
            # PyTorch's OpenMP threads spin on after each call and slow whatever runs next:
            # eager is timed on its own, the two graphs in turn
            (eager,) = alternated((lambda g=graph: g(x),), runs, warmup)
            onnx, eight = alternated(
                (lambda s=session, b=batch: s.run(b), lambda s=int8, b=batch: s.run(b)),
                runs,
                warmup,
            )
            with torch.no_grad():
                want = [t.numpy() for t in graph(x)]
            gaps = [
                max(float(np.abs(found[n] - w).max()) for n, w in zip(graph.output_names, want))
                for found in (session.run(batch), int8.run(batch))
            ]
            print(
                f"| {label} | {eager[0]:.1f} ({eager[1]:.1f}) | {onnx[0]:.1f} ({onnx[1]:.1f}) "
                f"| {eight[0]:.1f} ({eight[1]:.1f}) | {eager[0] / onnx[0]:.2f} / {eager[0] / eight[0]:.2f} "
                f"| {gaps[0]:.1e} / {gaps[1]:.1e} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--bundle", help="time this bundle's network instead of a fresh one")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument(
        "--engines",
        action="store_true",
        help="PyTorch eager against ONNX Runtime (the node's forward pass)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bundle:
        from dp_model.serving.bundle import load_bundle

        model, contract = load_bundle(args.bundle)
        args.size = contract.image_size
    else:
        model = DeepPneumoniaNet(num_classes=5).eval()
    x = torch.rand(1, 1, args.size, args.size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.size} px, {args.runs} runs after {args.warmup} warm-up\n"
    )
    if args.engines:
        engines(model, args.size, args.runs, args.warmup, torch.get_num_threads())
        return
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
