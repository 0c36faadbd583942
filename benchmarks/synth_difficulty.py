"""Is the synthetic benchmark hard, and hard in the right way? Block statistics against a
plain ResNet18 on the same split.

    python benchmarks/synth_difficulty.py                                   # default generator
    python benchmarks/synth_difficulty.py --num-images 4000 --epochs 10 --json out.json
    python benchmarks/synth_difficulty.py --version 1 --settings default easy

Generates a dataset per setting with dp-synth (PNG, rendered at 256 px), reads it back
with the project's dataset reader and decoder (letterboxed to 128 px, as ``dp-train``
does), splits it by patient into train, validation and test, and trains two classifiers
on the same split:

* block statistics: the mean and SD of each 16 x 16 block into gradient boosting, its
  hyper-parameters and tree count chosen on validation
  (``dp_model.training.baselines.block_statistics``);
* a plain ResNet18 (torchvision's, one input channel, from scratch, cross-entropy, light
  batch augmentation, one-cycle schedule); its epoch and a post-hoc logit adjustment
  (``log p - tau log prior``, for balanced accuracy) chosen on validation.

It prints balanced accuracy and macro ROC AUC on validation and test against the recorded
labels, test recall per class, and a paired bootstrap interval of the test difference in
balanced accuracy. A generator whose classes the block statistics read as well as the
network does tests nothing about seeing a lesion; the default generator must leave them
well behind. Choose generator settings on the validation figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from dp_model.datasets import read_dataset
from dp_model.metrics import evaluate
from dp_model.synth import CLASSES, Difficulty, SynthConfig, generate
from dp_model.training.baselines import fit_block_statistics, mean_recall
from dp_model.training.config import DataConfig
from dp_model.training.data import Resident, load_split, make_splits
from dp_transforms import RandChestAffine, RandChestIntensity

SETTINGS = {
    "default": Difficulty(),
    "easy": Difficulty(
        lesion_contrast=1.5,
        contrast_spread=0.1,
        distractor_rate=0.0,
        label_noise=0.0,
        pathology_overlap=0.0,
    ),
}
TAUS = (0.0, 0.5, 1.0)


def splits(root: Path, size: int, seed: int, cache: Path) -> tuple[Resident, Resident, Resident]:
    """Patient-level train / validation / test (60 / 20 / 20), decoded as dp-train decodes."""
    dataset = read_dataset(root)
    config = DataConfig(
        root=str(root),
        image_size=size,
        test_fraction=0.2,
        val_fraction=0.25,
        calibration_fraction=0.0,
        cache_dir=str(cache),
    )
    parts = make_splits(dataset, config, seed)
    return tuple(
        load_split(dataset, getattr(parts, name), config, f"decode {name}")
        for name in ("train", "val", "test")
    )  # type: ignore[return-value]


def resnet18() -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def probabilities(model: torch.nn.Module, data: Resident, bf16: bool) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(data), 256):
        x = (
            data.images[start : start + 256]
            .float()
            .div_(255.0)
            .contiguous(memory_format=torch.channels_last)
        )
        with autocast(bf16):
            out.append(torch.softmax(model(x).float(), dim=1))
    return torch.cat(out).numpy()


def adjust(scores: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment: ``log p - tau log prior``, renormalised."""
    logits = np.log(np.clip(scores, 1e-8, None)) - tau * np.log(prior)
    logits -= logits.max(axis=1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def train_resnet(
    train: Resident, val: Resident, epochs: int, batch: int, seed: int, bf16: bool
) -> tuple[torch.nn.Module, dict]:
    """Train; keep the epoch and tau with the best validation balanced accuracy."""
    torch.manual_seed(seed)
    model = resnet18().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * (len(train) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    affine = RandChestAffine(scale=(0.7, 1.0), rotate_degrees=8).set_random_state(seed)
    intensity = RandChestIntensity().set_random_state(seed)
    prior = np.bincount(train.labels.numpy(), minlength=len(CLASSES)) / len(train)
    y_val = val.labels.numpy()
    rng = np.random.default_rng(seed)
    best = {"score": -1.0}
    with tqdm(total=steps, desc="ResNet18", leave=False) as bar:
        for epoch in range(epochs):
            model.train()
            order = rng.permutation(len(train))
            for start in range(0, len(order) - batch + 1, batch):
                index = torch.as_tensor(order[start : start + batch])
                x, _, y, _ = train.batch(index)
                x = intensity(affine(x)).contiguous(memory_format=torch.channels_last)
                with autocast(bf16):
                    loss = F.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            scores = probabilities(model, val, bf16)
            for tau in TAUS:
                score = mean_recall(y_val, adjust(scores, prior, tau).argmax(1), len(CLASSES))
                if score > best["score"]:
                    best = {
                        "score": score,
                        "epoch": epoch + 1,
                        "tau": tau,
                        "state": {k: v.clone() for k, v in model.state_dict().items()},
                    }
            print(
                f"  ResNet18 epoch {epoch + 1}/{epochs}: validation balanced accuracy {max(mean_recall(y_val, adjust(scores, prior, t).argmax(1), len(CLASSES)) for t in TAUS):.3f}",
                flush=True,
            )
    model.load_state_dict(best.pop("state"))
    return model, best | {"prior": prior}


def paired_difference(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int, resamples: int = 1000
) -> tuple[float, float, float]:
    """Balanced accuracy of predictions ``a`` minus ``b`` on ``labels``, with a paired bootstrap 95 % interval."""
    rng = np.random.default_rng(seed)
    point = mean_recall(labels, a, len(CLASSES)) - mean_recall(labels, b, len(CLASSES))
    draws = []
    for _ in range(resamples):
        i = rng.integers(0, len(labels), len(labels))
        draws.append(
            mean_recall(labels[i], a[i], len(CLASSES)) - mean_recall(labels[i], b[i], len(CLASSES))
        )
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(point), float(low), float(high)


def figures(labels: np.ndarray, scores: np.ndarray) -> dict:
    report = evaluate(labels, scores, CLASSES)
    recall = [float(r) for r in report.per_class["recall"]]
    return {
        "accuracy": report.accuracy,
        "balanced_accuracy": report.balanced_accuracy,
        "macro_auc": report.macro_auc,
        "recall": recall,
    }


def run_setting(name: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    config = replace(
        SynthConfig(
            num_images=args.num_images,
            size=args.render,
            image_format="png",
            seed=args.seed,
            version=args.version,
        ),
        difficulty=SETTINGS[name],
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = generate(config, Path(tmp) / "data", progress=False)
        train, val, test = splits(Path(tmp) / "data", args.size, args.seed, Path(tmp) / "cache")
    measured = {"val": val} if args.validation_only else {"val": val, "test": test}
    result: dict = {
        "setting": name,
        "images": {"train": len(train), "validation": len(val), "test": len(test)},
        "generation_images_per_second": summary.images_per_second,
    }
    scores: dict[str, dict[str, np.ndarray]] = {}
    if "block" in args.baselines:
        tick = time.perf_counter()
        with threadpool_limits(args.threads or None):
            fitted = fit_block_statistics(train, val, len(CLASSES), args.seed)
            scores["block statistics"] = {
                split: fitted.probabilities(data.images) for split, data in measured.items()
            }
        result["block statistics"] = {
            "chosen": {"trees": fitted.trees, **fitted.params},
            "minutes": (time.perf_counter() - tick) / 60,
        }
    if "resnet" in args.baselines:
        tick = time.perf_counter()
        model, chosen = train_resnet(train, val, args.epochs, args.batch, args.seed, args.bf16)
        prior = chosen.pop("prior")
        scores["plain ResNet18"] = {
            split: adjust(probabilities(model, data, args.bf16), prior, chosen["tau"])
            for split, data in measured.items()
        }
        result["plain ResNet18"] = {"chosen": chosen, "minutes": (time.perf_counter() - tick) / 60}
    for name_, by_split in scores.items():
        result[name_] |= {
            split: figures(measured[split].labels.numpy(), values)
            for split, values in by_split.items()
        }
    if len(scores) == 2 and "test" in measured:
        labels = test.labels.numpy()
        point, low, high = paired_difference(
            labels,
            scores["plain ResNet18"]["test"].argmax(1),
            scores["block statistics"]["test"].argmax(1),
            args.seed,
        )
        result["test difference, ResNet18 minus block statistics"] = {
            "balanced_accuracy": point,
            "interval": [low, high],
        }
    result["minutes"] = (time.perf_counter() - start) / 60
    return result


def table(results: list[dict]) -> str:
    """Validation and (when measured) test figures; recall per class on the last split measured."""
    rows = [
        "| setting | classifier | val. bal. acc. | val. macro AUC | test bal. acc. | test macro AUC | recall (test, else val.): "
        + ", ".join(CLASSES)
        + " | chosen on validation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for name in ("block statistics", "plain ResNet18"):
            if name in result:
                r = result[name]
                test = r.get("test", {})
                chosen = ", ".join(f"{k} {v}" for k, v in r["chosen"].items() if k != "score")
                cells = [
                    f"{r['val']['balanced_accuracy']:.3f}",
                    f"{r['val']['macro_auc']:.3f}",
                    f"{test['balanced_accuracy']:.3f}" if test else "-",
                    f"{test['macro_auc']:.3f}" if test else "-",
                ]
                recall = (test or r["val"])["recall"]
                rows.append(
                    f"| {result['setting']} | {name} | {' | '.join(cells)} | {', '.join(f'{x:.2f}' for x in recall)} | {chosen} |"
                )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=128, help="network input size")
    parser.add_argument("--render", type=int, default=256, help="size the phantoms are rendered at")
    parser.add_argument(
        "--version", type=int, default=SynthConfig().version, help="generator version"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator, split and training seed")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for PyTorch and scikit-learn (0: their defaults)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for the ResNet18 (about twice as fast on CPUs with AVX-512 BF16)",
    )
    parser.add_argument(
        "--baselines", nargs="+", default=["block", "resnet"], choices=["block", "resnet"]
    )
    parser.add_argument("--settings", nargs="+", default=["default"], choices=list(SETTINGS))
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="measure on validation only (while choosing settings)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"generator version {args.version}, {args.num_images} images rendered at {args.render} px, input {args.size} px, seed {args.seed}, "
        f"ResNet18 {args.epochs} epochs{' (bf16 autocast)' if args.bf16 else ''}, patient-level 60/20/20 split\n",
        flush=True,
    )
    results = [run_setting(name, args) for name in args.settings]
    print(table(results))
    for result in results:
        if "test difference, ResNet18 minus block statistics" in result:
            d = result["test difference, ResNet18 minus block statistics"]
            print(
                f"\n{result['setting']}: test balanced accuracy, ResNet18 minus block statistics: {d['balanced_accuracy']:+.3f} (95 % paired bootstrap {d['interval'][0]:+.3f} to {d['interval'][1]:+.3f}); {result['minutes']:.1f} min"
            )
    if args.json:
        meta = {
            "command": "python benchmarks/synth_difficulty.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"
            ),
            "date": datetime.date.today().isoformat(),
            "machine": platform.machine(),
            "torch": torch.__version__,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(meta | {"results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
