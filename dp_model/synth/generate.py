"""Generate a synthetic dataset with all cores, with a progress bar."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .config import SynthConfig
from .layouts import Row, prepare, write_image, write_tables
from .render import render_case

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Summary:
    """What a generation run produced, and how fast."""

    root: Path
    images: int
    seconds: float
    workers: int
    class_counts: dict[str, int]

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def worker_count(config: SynthConfig) -> int:
    available = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, min(config.workers or available, config.num_images))


def generate(config: SynthConfig, root: str | Path, progress: bool = True) -> Summary:
    """Render ``config.num_images`` cases into ``root`` in ``config.layout``.

    Work is split by image index; each image depends only on ``(seed, index)``, so the
    output is the same for any number of workers.
    """
    root = Path(root)
    prepare(root, config)
    workers = worker_count(config)
    start = time.perf_counter()
    rows = []
    bar = tqdm(
        total=config.num_images, desc="dp-synth", unit="img", disable=not progress, smoothing=0.05
    )
    with bar:
        if workers == 1:
            for index in range(config.num_images):
                rows.append(_one(root, config, index))
                bar.update()
        else:
            # fork: workers start at once and share the imported modules.
            context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                chunk = max(1, min(64, config.num_images // (workers * 8)))
                for row in pool.map(
                    _one,
                    [root] * config.num_images,
                    [config] * config.num_images,
                    range(config.num_images),
                    chunksize=chunk,
                ):
                    rows.append(row)
                    bar.update()
    write_tables(root, config, rows)
    seconds = time.perf_counter() - start
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.recorded_label] = counts.get(row.recorded_label, 0) + 1
    summary = Summary(root, len(rows), seconds, workers, counts)
    logger.info(
        "wrote %d images to %s in %.1f s (%.1f images/s, %d workers)",
        summary.images,
        root,
        seconds,
        summary.images_per_second,
        workers,
    )
    return summary


def _one(root: Path, config: SynthConfig, index: int) -> Row:
    return write_image(root, config, render_case(config, index))
