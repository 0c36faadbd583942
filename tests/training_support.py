"""What the training tests share: a CPU runtime, still augmentations, a tiny run configuration."""

from __future__ import annotations

from pathlib import Path

import torch

from dp_model.synth import SynthConfig, generate
from dp_model.training.config import (
    AugmentConfig,
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
    RuntimeConfig,
    TrainConfig,
)
from dp_model.training.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), amp=False, channels_last=False, compile=False)
STILL = AugmentConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    rotate_degrees=0.0,
    gamma=(1.0, 1.0),
    contrast=(1.0, 1.0),
    brightness=0.0,
    blur_prob=0.0,
    noise_prob=0.0,
)


def tiny(dataset_dir: Path, cache: Path, **finetune) -> TrainConfig:
    return TrainConfig(
        name="tiny",
        demo=True,
        int8=False,  # the 8-bit check has its own tests (test_int8.py, the training module's bundle)
        data=DataConfig(root=str(dataset_dir), image_size=32, cache_dir=str(cache), workers=1),
        pretrain=PretrainConfig(epochs=1, batch_size=16),
        finetune=FinetuneConfig(
            **({"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3} | finetune)
        ),
        runtime=RuntimeConfig(device="cpu", threads=1),
    )


def rsna_run(tmp_path: Path, name: str) -> TrainConfig:
    """One epoch on 40 RSNA-layout phantoms at 32 px, two threads, no baselines."""
    generate(
        SynthConfig(num_images=40, size=64, workers=1, layout="rsna", seed=3),
        tmp_path / "data",
        progress=False,
    )
    return TrainConfig(
        name=name,
        baseline=False,
        int8=False,
        data=DataConfig(
            root=str(tmp_path / "data"),
            image_size=32,
            cache_dir=str(tmp_path / "cache"),
            workers=0,
            val_fraction=0.15,
            test_fraction=0.15,
        ),
        pretrain=PretrainConfig(enabled=False),
        finetune=FinetuneConfig(epochs=1, batch_size=16, optimizer="adamw", lr=1e-3),
        runtime=RuntimeConfig(device="cpu", threads=2),
    )
