"""Is the synthetic benchmark hard enough? A plain ResNet18 on default and easy settings.

    python benchmarks/synth_difficulty.py                     # default difficulty vs easy
    python benchmarks/synth_difficulty.py --num-images 6000 --epochs 12 --size 224

Generates a dataset per setting with dp-synth, reads it back with the project's dataset
reader and image pipeline, trains torchvision's ResNet18 (one input channel, no
pre-training, cross-entropy, the project's batch augmentation) on a stratified 90/10
split, and prints accuracy and balanced accuracy against the recorded labels and
against the true ones (``synth_truth.csv``), with per-class recall. The defaults must
leave a plain classifier well below 100 %; the easy setting shows the benchmark is
learnable at all.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from dp_model.datasets import read_dataset, split_dataset
from dp_model.synth import CLASSES, Difficulty, SynthConfig, generate
from dp_transforms import LetterboxResize, RandChestAffine, RandChestIntensity, load_image

SETTINGS = {
    "default": Difficulty(),
    "easy": Difficulty(lesion_contrast=1.5, contrast_spread=0.1, distractor_rate=0.0, label_noise=0.0, pathology_overlap=0.0),
}


def load_tensors(root: Path, size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[int], list[int]]:
    dataset = read_dataset(root)
    split = split_dataset(dataset, 0.1, seed=0, method="stratified")
    resize = LetterboxResize(size)
    images = torch.stack([resize(torch.from_numpy(load_image(r.image).pixels)[None]) for r in tqdm(dataset.records, desc="load", leave=False)])
    truth = {row["image_id"]: row["true_label"] for row in csv.DictReader((root / "synth_truth.csv").open())}
    recorded = dataset.targets()
    true = np.array([CLASSES.index(truth[r.image_id]) for r in dataset.records])
    return images, recorded, true, list(split.train), list(split.test)


def resnet18() -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def train(images: torch.Tensor, labels: np.ndarray, train_idx: list[int], epochs: int, batch: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = resnet18()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * (len(train_idx) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    affine = RandChestAffine(scale=(0.7, 1.0), rotate_degrees=8).set_random_state(seed)
    intensity = RandChestIntensity().set_random_state(seed)
    targets = torch.as_tensor(labels)
    rng = np.random.default_rng(seed)
    model.train()
    with tqdm(total=steps, desc="train", leave=False) as bar:
        for _ in range(epochs):
            order = rng.permutation(train_idx)
            for start in range(0, len(order) - batch + 1, batch):
                index = torch.as_tensor(order[start : start + batch])
                x = intensity(affine(images[index]))
                loss = F.cross_entropy(model(x), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, index: list[int]) -> np.ndarray:
    return np.concatenate([model(images[index[i : i + 128]]).argmax(1).numpy() for i in range(0, len(index), 128)])


def scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float, list[float]]:
    recalls = [float((pred[target == c] == c).mean()) if (target == c).any() else float("nan") for c in range(len(CLASSES))]
    return float((pred == target).mean()), float(np.nanmean(recalls)), recalls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=128, help="network input size (the paper: 224)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"plain ResNet18, {args.num_images} images rendered at {max(args.size, 256)} px, input {args.size} px, {args.epochs} epochs, stratified 90/10\n")
    print("| setting | acc (recorded) | bal. acc (recorded) | acc (true) | bal. acc (true) | recall per class (true): " + ", ".join(CLASSES) + " | minutes |")
    print("|---|---|---|---|---|---|---|")
    for name in args.settings:
        start = time.perf_counter()
        config = replace(SynthConfig(num_images=args.num_images, size=max(args.size, 256), image_format="png"), difficulty=SETTINGS[name])
        with tempfile.TemporaryDirectory() as tmp:
            generate(config, tmp, progress=False)
            images, recorded, true, train_idx, test_idx = load_tensors(Path(tmp), args.size)
        model = train(images, recorded, train_idx, args.epochs, args.batch, seed=0)
        pred = predict(model, images, test_idx)
        acc_r, bal_r, _ = scores(pred, recorded[test_idx])
        acc_t, bal_t, recalls = scores(pred, true[test_idx])
        minutes = (time.perf_counter() - start) / 60
        print(f"| {name} | {acc_r:.3f} | {bal_r:.3f} | {acc_t:.3f} | {bal_t:.3f} | {', '.join(f'{r:.2f}' for r in recalls)} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main()
