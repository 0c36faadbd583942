"""Checkpoints and the per-epoch history: written atomically, resumed exactly.

Every checkpoint carries the run's configuration (``"config"``), so that a checkpoint found
alone says how it was made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class History:
    """Per-epoch records of both stages, for resuming, plots and TensorBoard."""

    pretrain: list[dict[str, float]] = field(default_factory=list)
    finetune: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(path: Path, state: dict, config: dict) -> None:
    """Write ``state`` and the run's ``config`` atomically: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state | {"config": config}, temporary)
    temporary.replace(path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def history_state(history: History) -> dict:
    return {
        "pretrain": [dict(r) for r in history.pretrain],
        "finetune": [dict(r) for r in history.finetune],
    }


def resume(
    checkpoint: Path | None,
    stage: str,
    net: nn.Module,
    optimizer,
    schedule,
    history: History,
    best: dict | None = None,
) -> int:
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
