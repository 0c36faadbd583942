"""How fast dp-synth generates, and what it costs on disk.

    python benchmarks/synth_speed.py                          # 2,000 images, 1024 px, PNG and DICOM
    python benchmarks/synth_speed.py --num-images 20000 --formats png

Prints a markdown table: images/s with all cores, per-image time per core, the time
20,000 images take at that rate, and bytes per image. The render-only row (one core,
no files) separates computation from file writing. The output folder is deleted
afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from dp_model.synth import SynthConfig, generate
from dp_model.synth.render import render_case


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render_only(config: SynthConfig, n: int) -> float:
    """Seconds per image on one core, rendering only."""
    render_case(config, 0)
    start = time.perf_counter()
    for index in range(1, n + 1):
        render_case(config, index)
    return (time.perf_counter() - start) / n


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--formats", nargs="+", default=["png", "dicom"], choices=["png", "dicom"])
    parser.add_argument("--workers", type=int, default=0, help="0: all cores")
    parser.add_argument("--out", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base = SynthConfig(num_images=args.num_images, size=args.size, workers=args.workers)
    print(f"machine: {cores} cores, {cpu_name()}; size {args.size} px; {args.num_images} images\n")
    print("| what | workers | images/s | ms per image per core | 20,000 images | bytes per image |")
    print("|---|---|---|---|---|---|")
    per_image = render_only(base, 20)
    print(
        f"| render only, no files | 1 | {1 / per_image:.1f} | {per_image * 1000:.0f} | {20000 * per_image / 60:.1f} min | - |"
    )
    for image_format in args.formats:
        config = replace(base, image_format=image_format)
        root = (
            args.out / image_format
            if args.out
            else Path(tempfile.mkdtemp(prefix=f"dp-synth-{image_format}-"))
        )
        try:
            summary = generate(config, root, progress=False)
            size = folder_bytes(root) / summary.images
            rate = summary.images_per_second
            print(
                f"| generate {image_format} ({config.layout}) | {summary.workers} | {rate:.1f} | "
                f"{summary.workers / rate * 1000:.0f} | {20000 / rate / 60:.1f} min | {size / 1e6:.2f} MB |"
            )
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
