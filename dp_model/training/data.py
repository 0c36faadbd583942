"""Training data: each split decoded once, letterboxed to the network size, kept resident.

Decoding is the slow part of a chest X-ray pipeline (a 1024 x 1024 DICOM or PNG takes
tens of milliseconds), so it happens once, in parallel, and the result is cached on disk.
A split then lives as uint8 images ``(N, 1, S, S)`` (20,000 images at 224 px are 1 GB),
zero-padded canvas boxes, labels and flags, and moves to the GPU whole; batches are
indexed there and augmented there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dp_transforms import load_letterboxed, pad_boxes

from ..datasets import ChestDataset, DatasetError, Record, split_dataset
from .config import DataConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the preprocessing changes, so old caches are not reused


@dataclass
class Resident:
    """A decoded split.

    Attributes:
        images: ``(N, 1, S, S)`` uint8 letterboxed images.
        boxes: ``(N, K, 4)`` float32 boxes on the canvas, zero-padded (zero area).
        labels: ``(N,)`` int64 class indices.
        has_boxes: ``(N,)`` bool.
        ids: the dataset's image ids.
    """

    images: Tensor
    boxes: Tensor
    labels: Tensor
    has_boxes: Tensor
    ids: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> Resident:
        return Resident(
            self.images.to(device),
            self.boxes.to(device),
            self.labels.to(device),
            self.has_boxes.to(device),
            self.ids,
        )

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Float images in [0, 1], boxes, labels and flags of the samples at ``index``."""
        return (
            self.images[index].float().div_(255.0),
            self.boxes[index],
            self.labels[index],
            self.has_boxes[index],
        )


def keep_boxes(data: Resident, fraction: float, seed: int) -> Resident:
    """``data`` with the boxes of a seeded ``1 - fraction`` of its boxed images removed.

    Those images train from their label alone, as images nobody outlined would.
    """
    boxed = torch.nonzero(data.has_boxes.cpu()).flatten()
    if fraction >= 1.0 or len(boxed) == 0:
        return data
    generator = torch.Generator().manual_seed(seed)
    dropped = boxed[
        torch.randperm(len(boxed), generator=generator)[: len(boxed) - round(fraction * len(boxed))]
    ]
    boxes, has_boxes = data.boxes.clone(), data.has_boxes.clone()
    boxes[dropped.to(boxes.device)] = 0.0
    has_boxes[dropped.to(has_boxes.device)] = False
    logger.info("boxes kept on %d of %d boxed training images", int(has_boxes.sum()), len(boxed))
    return Resident(data.images, boxes, data.labels, has_boxes, data.ids)


@dataclass(frozen=True)
class Splits:
    """Indices into the dataset's records; ``calibration`` is empty when the temperature,
    the operating points and the gate are chosen on ``val``."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    method: str
    calibration: tuple[int, ...] = ()


def make_splits(dataset: ChestDataset, config: DataConfig, seed: int) -> Splits:
    """Test split first (the paper's per-class 10 %), then a validation part of the rest,
    then a calibration part of what is left (:func:`carve_calibration`)."""
    outer = split_dataset(dataset, config.test_fraction, seed, config.split)
    if config.val_fraction <= 0:
        return carve_calibration(
            dataset, Splits(outer.train, (), outer.test, outer.method), config, seed
        )
    rest = replace(dataset, records=tuple(dataset.records[i] for i in outer.train))
    inner = split_dataset(
        rest, config.val_fraction, seed + 1, outer.method if outer.method != "official" else "auto"
    )
    splits = Splits(
        tuple(outer.train[i] for i in inner.train),
        tuple(outer.train[i] for i in inner.test),
        outer.test,
        outer.method,
    )
    return carve_calibration(dataset, splits, config, seed)


def carve_calibration(
    dataset: ChestDataset, splits: Splits, config: DataConfig, seed: int
) -> Splits:
    """``splits`` with a calibration part taken from its training part, stratified (or by
    patient) as the others: ``calibration_images`` images, or ``calibration_fraction`` of the
    non-test images. Validation and test stay as they were.

    Raises:
        ValueError: the calibration part would leave no training images.
    """
    non_test = len(splits.train) + len(splits.val)
    wanted = config.calibration_images or round(config.calibration_fraction * non_test)
    if wanted <= 0:
        return splits
    if wanted >= len(splits.train):
        raise ValueError(
            f"a calibration split of {wanted} images leaves none of the {len(splits.train)} training images; lower data.calibration_fraction or data.calibration_images"
        )
    part = replace(dataset, records=tuple(dataset.records[i] for i in splits.train))
    inner = split_dataset(
        part,
        wanted / len(splits.train),
        seed + 2,
        splits.method if splits.method != "official" else "auto",
    )
    return Splits(
        tuple(splits.train[i] for i in inner.train),
        splits.val,
        splits.test,
        splits.method,
        tuple(splits.train[i] for i in inner.test),
    )


def _decode(args: tuple[str, list[list[float]], int]) -> tuple[np.ndarray, np.ndarray]:
    """One image, in this process (its thread count left as training wants it) or in a pool's
    worker (one thread each, set by :func:`_worker_start`: the pool is the parallelism)."""
    path, boxes, size = args
    canvas, canvas_boxes, _ = load_letterboxed(path, size, boxes)
    return np.rint(canvas[0].numpy() * 255.0).astype(np.uint8), canvas_boxes


#: Images decoded in this process first, to time them before deciding on a pool.
PROBE_IMAGES = 16
#: A process pool pays only when the rest would take this long in this process: each spawned
#: worker imports PyTorch and MONAI before its first image (seconds each on a two-core machine),
#: which cost the demo's 256-pixel phantoms (about 2 ms each) more than decoding them all here.
POOL_BREAK_EVEN_S = 10.0


def _worker_start() -> None:
    torch.set_num_threads(1)  # several decoding processes share the cores


def decode(
    records: list[Record], size: int, workers: int = 0, desc: str = "decode"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Decode and letterbox ``records`` with ``workers`` processes (0: all cores), or in this
    process when the first :data:`PROBE_IMAGES` say the rest is quicker than starting a pool."""
    jobs = [(str(r.image), r.boxes.tolist(), size) for r in records]
    count = workers or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    count = max(1, min(count, len(jobs) // 32 or 1))
    images, boxes = np.zeros((len(jobs), size, size), np.uint8), []
    bar = tqdm(total=len(jobs), desc=desc, unit="img", leave=False)
    pool = None
    try:
        tick = time.perf_counter()
        for i, job in enumerate(jobs[:PROBE_IMAGES]):
            images[i], image_boxes = _decode(job)
            boxes.append(image_boxes)
            bar.update()
        rest = jobs[PROBE_IMAGES:]
        per_image = (time.perf_counter() - tick) / max(1, min(len(jobs), PROBE_IMAGES))
        if count == 1 or per_image * len(rest) < POOL_BREAK_EVEN_S:
            results = map(_decode, rest)
        else:
            # spawn, not fork: PyTorch's thread pools do not survive a fork safely. map returns
            # results in the order of the jobs, whatever order the workers finish in.
            pool = ProcessPoolExecutor(
                count, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start
            )
            results = pool.map(_decode, rest, chunksize=max(1, min(64, len(rest) // (count * 4))))
        for i, (image, image_boxes) in enumerate(results, start=len(boxes)):
            images[i] = image
            boxes.append(image_boxes)
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return images, boxes


def load_split(
    dataset: ChestDataset, indices: tuple[int, ...], config: DataConfig, desc: str
) -> Resident:
    """Decode (or read from the cache) the records at ``indices``."""
    if dataset.multi_label:
        raise DatasetError(
            f"{dataset.root}: a multi-label dataset; the Deep Pneumonia model needs one class per image"
        )
    records = [dataset.records[i] for i in indices]
    path = _cache_path(config, records)
    if path is not None and path.exists():
        try:
            return _from_cache(path)
        except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways; rebuilt, never fatal
            logger.warning("ignoring unreadable cache %s (%s)", path, exc)
    images, boxes = decode(records, config.image_size, config.workers, desc)
    index = {name: i for i, name in enumerate(dataset.classes)}
    resident = Resident(
        torch.from_numpy(images)[:, None],
        pad_boxes(boxes),
        torch.tensor([index[r.labels[0]] for r in records], dtype=torch.int64),
        torch.tensor([len(b) > 0 for b in boxes]),
        [r.image_id or str(r.image) for r in records],
    )
    if path is not None:
        _to_cache(path, resident)
    return resident


def _cache_path(config: DataConfig, records: list[Record]) -> Path | None:
    if not records:
        return None
    folder = (
        Path(config.cache_dir) if config.cache_dir else Path.home() / ".cache" / "deep-pneumonia"
    )
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, config.image_size]).encode())
    for r in records:
        stat = r.image.stat()
        digest.update(
            f"{r.image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{r.labels}|{r.boxes.tolist()}".encode()
        )
    return folder / f"{digest.hexdigest()[:32]}.pt"


def _from_cache(path: Path) -> Resident:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return Resident(
        saved["images"], saved["boxes"], saved["labels"], saved["has_boxes"], list(saved["ids"])
    )


def _to_cache(path: Path, resident: Resident) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # several processes may write the same split
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(
            {
                "images": resident.images,
                "boxes": resident.boxes,
                "labels": resident.labels,
                "has_boxes": resident.has_boxes,
                "ids": resident.ids,
            },
            temporary,
        )
        temporary.replace(path)
    except OSError as exc:
        logger.warning("could not cache decoded images in %s (%s)", path.parent, exc)


def batches(
    n: int, batch_size: int, seed: int, drop_last: bool, device: torch.device
) -> list[Tensor]:
    """A seeded permutation of ``range(n)`` in batches (the same for a given seed on every process)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    parts = list(order.split(batch_size))
    if drop_last and parts and len(parts[-1]) < batch_size:
        parts.pop()
    return [p.to(device, non_blocking=True) for p in parts]
