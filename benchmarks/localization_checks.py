"""Do the model's maps look at the lesion? Sanity checks (Adebayo et al. 2018) and counterfactuals.

    python benchmarks/localization_checks.py --out runs/localization_checks
    python benchmarks/localization_checks.py --out runs/lc_small --num-images 300 --size 64 --image-size 64 --epochs 2 --pretrain-epochs 1

1. Data: ``dp-synth`` with configs/synth_learning.yaml (``--num-images``, ``--size``), unless present.
2. The model: ``dp-train`` with configs/learning.yaml (``--epochs``, ``--pretrain-epochs``). Its
   bundle's contract carries every map source and the fixed prior map measured on the validation
   boxes, the chosen source on test, and whether regions are shown.
3. Model randomization: the trained network's layers re-initialised from the top (the classifier,
   the attention heads, then each residual stage down to the stem), cumulatively; after each step,
   the Spearman rank correlation of every source's map with the trained network's, on the boxed
   test images. A map that does not change when the weights that make the decision are random
   does not explain the decision.
4. Label randomization: the same recipe trained on the training split with each image's
   annotation (label and boxes together) given to another image, from the same stage I encoder
   (which never sees labels). Its maps should localize no better than the prior.
5. Counterfactuals: fresh cases of the same generator (indices after the dataset's), each
   rendered with its lesion, without it, and with it mirrored to the other lung
   (:func:`dp_model.synth.counterfactual.render_variants`): does the served decision change when
   the lesion goes, and does each map's maximum follow the lesion when it moves?
6. With ``--class-attention``: class attention trained the same way (from the same stage I
   encoder), its test normal recall and balanced accuracy with and without the logit
   adjustment (``log c_i``).

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import rankdata
from torch import nn

from dp_model.config import load_config
from dp_model.datasets import read_dataset
from dp_model.metrics import evaluate, mask_iou, pointing_game
from dp_model.networks.explain import map_sources, source_maps
from dp_model.networks.networks import DeepPneumoniaNet
from dp_model.serving.bundle import load_bundle
from dp_model.serving.contract import ModelContract
from dp_model.synth import SynthConfig, generate
from dp_model.synth.counterfactual import render_variants
from dp_model.training.config import TrainConfig
from dp_model.training.data import Resident, load_split, make_splits
from dp_model.training.engine import finetune
from dp_model.training.evaluation import predict
from dp_model.training.objectives import normal_index
from dp_model.training.regions import measure, prior_maps
from dp_model.training.run import train
from dp_model.training.runtime import Runtime
from dp_transforms import boxes_to_masks, load_letterboxed

ROOT = Path(__file__).resolve().parents[1]
CPU = Runtime(device=torch.device("cpu"), amp=False, channels_last=False, compile=False)
logger = logging.getLogger("localization_checks")


# --- model randomization ---------------------------------------------------------------------------


def cascade(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The Deep Pneumonia network's layers from the output down, for cascading re-initialisation."""
    if not isinstance(model, DeepPneumoniaNet):
        raise ValueError(
            f"the cascade is defined for the Deep Pneumonia network (resnet18), not {type(model).__name__}"
        )
    b = model.backbone
    steps = [("classifier (fc)", [b.fc])]
    if len(model.heads):
        steps.append(("attention heads", [model.heads]))
    steps += [(name, [getattr(b, name)]) for name in ("layer4", "layer3", "layer2", "layer1")]
    return [*steps, ("stem (conv1, bn1)", [b.conv1, b.bn1])]


def reinitialize(modules: list[nn.Module], seed: int) -> None:
    """Every parameterised layer of ``modules`` back to its initialisation (batch norms to their
    fresh statistics), from ``seed``."""
    torch.manual_seed(seed)
    for module in modules:
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each pair of maps ``(N, H, W)`` (NaN where a map is flat)."""
    found = []
    for x, y in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            found.append(np.nan)
            continue
        rx, ry = rankdata(x), rankdata(y)
        found.append(float(np.corrcoef(rx, ry)[0, 1]))
    return np.asarray(found)


def _maps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, source: str, normal: int
) -> np.ndarray:
    return source_maps(model, x, source, y, normal)[:, 0].float().cpu().numpy()


def model_randomization(
    model: nn.Module, data: Resident, normal: int, images: int = 96, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean rank correlation with the trained maps after each cumulative re-initialisation step."""
    boxed = torch.nonzero(data.has_boxes).flatten()[:images]
    x, _, y, _ = data.batch(boxed)
    sources = map_sources(model)
    trained = {s: _maps(model, x, y, s, normal) for s in sources}
    random = copy.deepcopy(model).eval()
    out: dict[str, dict[str, float]] = {}
    for step, (name, modules) in enumerate(cascade(random)):
        reinitialize(modules, seed + step)
        random.eval()
        out[name] = {
            s: float(np.nanmean(rank_correlation(trained[s], _maps(random, x, y, s, normal))))
            for s in sources
        }
        logger.info("randomized down to %s: %s", name, out[name])
    return out


# --- label randomization ---------------------------------------------------------------------------


def shuffled(data: Resident, seed: int) -> Resident:
    """``data`` with each image's annotation (label and boxes together) given to another image."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return Resident(
        data.images, data.boxes[order], data.labels[order], data.has_boxes[order], data.ids
    )


def label_randomization(
    config: TrainConfig,
    bundle: Path,
    splits: dict[str, Resident],
    classes: tuple[str, ...],
    seed: int,
) -> dict:
    """Train the recipe on shuffled annotations and measure its maps against the prior."""
    encoder_path = bundle / "checkpoints" / "encoder.pt"
    encoder = (
        torch.load(encoder_path, map_location="cpu", weights_only=True)
        if encoder_path.exists()
        else None
    )
    normal = normal_index(classes)
    result = finetune(
        config.finetune,
        shuffled(splits["train"], seed),
        splits["val"],
        list(classes),
        CPU,
        seed,
        encoder=encoder,
        evaluate=lambda m, s: evaluate(
            s.labels.numpy(), predict(m, s, CPU, normal=normal), classes
        ).scalars(),
    )
    model = result.model.cpu()
    model.load_state_dict(result.best_state)
    model.eval()
    located = measure(
        model, splits["train"], splits["val"], splits["test"], len(classes), normal, seed
    )
    report = evaluate(
        splits["test"].labels.numpy(), predict(model, splits["test"], CPU, normal=normal), classes
    )
    return {
        "localization": located.to_json(),
        "balanced_accuracy": report.balanced_accuracy,
        "macro_auc": report.macro_auc,
    }


# --- counterfactuals -------------------------------------------------------------------------------


def counterfactual_cases(
    synth: SynthConfig, start: int, count: int, image_size: int, folder: Path
) -> dict[str, np.ndarray]:
    """``count`` lesion cases from index ``start`` on, each variant written and read back as the
    dataset's images are (8-bit PNG, letterboxed): canvases ``(N, 3, S, S)`` in [0, 1] (with,
    without, moved), truth masks ``(N, 2, S, S)`` (as drawn, as moved), classes."""
    canvases, masks, labels, index = [], [], [], start
    while len(labels) < count:
        variants = render_variants(synth, index)
        index += 1
        if variants.label == "normal" or not len(variants.boxes):
            continue
        images, boxes = [], []
        for name, pixels, drawn in (
            ("with", variants.with_lesion, variants.boxes),
            ("without", variants.without_lesion, variants.boxes),
            ("moved", variants.moved, variants.moved_boxes),
        ):
            path = folder / f"{variants.index}_{name}.png"
            Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path)
            canvas, on_canvas, _ = load_letterboxed(path, image_size, drawn)
            images.append(canvas[0].numpy())
            boxes.append(on_canvas)
        mask = (
            boxes_to_masks(
                torch.from_numpy(np.stack([_padded(boxes[0], 4), _padded(boxes[2], 4)])).float(),
                (image_size, image_size),
            )[:, 0]
            >= 0.5
        )
        canvases.append(np.stack(images))
        masks.append(mask.numpy())
        labels.append(variants.label)
    return {
        "canvases": np.stack(canvases).astype(np.float32),
        "masks": np.stack(masks),
        "labels": np.asarray(labels),
    }


def _padded(boxes: np.ndarray, count: int) -> np.ndarray:
    out = np.zeros((count, 4), np.float32)
    out[: min(count, len(boxes))] = boxes[:count]
    return out


@torch.no_grad()
def _served(
    model: nn.Module, contract: ModelContract, canvases: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """The probability of pneumonia and the decision at the bundle's "present" point."""
    probabilities = contract.probabilities(model(canvases).cpu().numpy())
    decisions = [contract.decide(p) for p in probabilities]
    return np.array([d.pneumonia_probability for d in decisions]), np.array(
        [d.positive for d in decisions]
    )


def counterfactual_rates(
    model: nn.Module,
    contract: ModelContract,
    cases: dict[str, np.ndarray],
    prior: np.ndarray,
    normal: int = 0,
) -> dict:
    """What changes with the lesion: the served decision, and where each map points."""
    canvases = torch.from_numpy(cases["canvases"])
    with_, without, moved = canvases[:, 0:1], canvases[:, 1:2], canvases[:, 2:3]
    drawn, shifted = cases["masks"][:, 0], cases["masks"][:, 1]
    classes = torch.tensor([contract.classes.index(c) for c in cases["labels"]])
    p_with, pos_with = _served(model, contract, with_)
    p_without, pos_without = _served(model, contract, without)
    # the mirrored lesion landed elsewhere (not a bilateral one)
    apart = mask_iou(drawn, shifted) < 0.1
    out = {
        "cases": len(classes),
        "moved_apart": int(apart.sum()),
        "positive_with": float(pos_with.mean()),
        "positive_without": float(pos_without.mean()),
        "flipped_to_negative": float((pos_with & ~pos_without).sum() / max(1, pos_with.sum())),
        "probability_lower_without": float((p_without < p_with).mean()),
        "mean_probability_drop": float((p_with - p_without).mean()),
        "maps": {},
    }
    fixed = prior[classes.numpy()]
    out["maps"]["prior"] = {
        "pointing_drawn": float(pointing_game(fixed, drawn).mean()),
        "follows": float(pointing_game(fixed[apart], shifted[apart]).mean()),
        "stays": float(pointing_game(fixed[apart], drawn[apart]).mean()),
    }
    for source in map_sources(model):
        on_with, on_without, on_moved = (
            _maps(model, x, classes, source, normal) for x in (with_, without, moved)
        )
        out["maps"][source] = {
            "pointing_drawn": float(pointing_game(on_with, drawn).mean()),
            "follows": float(pointing_game(on_moved[apart], shifted[apart]).mean()),
            "stays": float(pointing_game(on_moved[apart], drawn[apart]).mean()),
            "mass_in_box_with": float(_mass_inside(on_with, drawn).mean()),
            "mass_in_box_without": float(_mass_inside(on_without, drawn).mean()),
        }
    return out


def _mass_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The share of each map's sum that lies inside the mask."""
    return (maps * masks).sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-12)


# --- class attention's logit adjustment ---------------------------------------------------------------


def logit_adjustment_effect(
    data: Path, out: Path, overrides: dict, splits_test: Resident, classes: tuple[str, ...]
) -> dict:
    """Class attention trained on the same data: test normal recall and balanced accuracy with
    and without subtracting ``log c_i`` (both at the 0.5 rule, no temperature)."""
    config = load_config(
        TrainConfig,
        ROOT / "configs" / "class_attention.yaml",
        overrides | {"data.root": str(data), "finetune.batch_size": 32},
    )
    bundle = out / "class_attention"
    encoder = out / "bundle" / "checkpoints" / "encoder.pt"
    if encoder.exists():  # stage I never sees labels: the same encoder serves both networks
        (bundle / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(encoder, bundle / "checkpoints" / "encoder.pt")
    train(config, bundle, stages=_stages(bundle))
    model, contract = load_bundle(bundle)
    normal = normal_index(classes)
    found = {"offsets": list(contract.logit_adjustment)}
    for name, offsets in (("without", ()), ("with", contract.logit_adjustment)):
        report = evaluate(
            splits_test.labels.numpy(),
            predict(model, splits_test, CPU, normal=normal, offsets=offsets),
            classes,
        )
        found[name] = {
            "balanced_accuracy": report.balanced_accuracy,
            "normal_recall": report.per_class["recall"][normal],
            "recall": report.per_class["recall"],
        }
    return found


# --- the run ---------------------------------------------------------------------------------------


def _stages(bundle: Path) -> str:
    """Stage I once: a run stopped after it, or a network that shares its encoder, goes on from it
    (the CPU runs are deterministic, so the result is the uninterrupted run's)."""
    return "finetune" if (bundle / "checkpoints" / "encoder.pt").exists() else "all"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--data",
        type=Path,
        help="synthetic data folder (default: OUT/data, generated when missing)",
    )
    p.add_argument("--num-images", type=int, default=1200)
    p.add_argument("--size", type=int, default=128, help="phantom side, pixels")
    p.add_argument("--image-size", type=int, default=128, help="model input side")
    p.add_argument("--epochs", type=int, default=8, help="stage II epochs")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--cases", type=int, default=150, help="counterfactual lesion cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--class-attention",
        action="store_true",
        help="also measure class attention's logit adjustment",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data = args.data or args.out / "data"
    synth = load_config(
        SynthConfig,
        ROOT / "configs" / "synth_learning.yaml",
        {"num_images": args.num_images, "size": args.size},
    )
    if not (data / "labels.csv").exists():
        generate(synth, data, progress=False)
    overrides = {
        "data.root": str(data),
        "data.image_size": args.image_size,
        "data.cache_dir": str(args.out / "cache"),
        "data.val_fraction": 0.2,
        "data.test_fraction": 0.2,
        "pretrain.epochs": args.pretrain_epochs,
        "finetune.epochs": args.epochs,
        "runtime.seed": args.seed,
        "baseline": False,
    }
    config = load_config(TrainConfig, ROOT / "configs" / "learning.yaml", overrides)
    bundle = args.out / "bundle"
    if not (bundle / "models" / "model.pt").exists():
        train(config, bundle, stages=_stages(bundle))
    model, contract = load_bundle(bundle)
    dataset = read_dataset(config.data.root, config.data.layout)
    found = make_splits(dataset, config.data, args.seed)
    splits = {
        name: load_split(dataset, getattr(found, name), config.data, name)
        for name in ("train", "val", "test")
    }
    normal = normal_index(dataset.classes)
    results: dict = {
        "scale": vars(args) | {"out": str(args.out), "data": str(data)},
        "localization": contract.localization.to_json(),
    }
    results["model_randomization"] = model_randomization(
        model, splits["test"], normal, seed=args.seed
    )
    results["label_randomization"] = label_randomization(
        config, bundle, splits, dataset.classes, args.seed
    )
    with tempfile.TemporaryDirectory() as folder:
        cases = counterfactual_cases(
            synth, args.num_images + 100, args.cases, args.image_size, Path(folder)
        )
    results["counterfactuals"] = counterfactual_rates(
        model, contract, cases, prior_maps(splits["train"], len(dataset.classes)), normal
    )
    if args.class_attention:
        results["class_attention"] = logit_adjustment_effect(
            data, args.out, overrides, splits["test"], dataset.classes
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    """The tables of docs/results.md's section, from ``results``."""
    lines: list[str] = []
    loc = results["localization"]
    keys = ("iou>0.1", "iou>0.3", "iou>0.5", "pointing")

    def row(name: str, figures: dict) -> str:
        return (
            f"| {name} | "
            + " | ".join("n/a" if figures.get(k) is None else f"{figures[k]:.2f}" for k in keys)
            + " |"
        )

    header = [
        "| map | IoU > 0.1 | IoU > 0.3 | IoU > 0.5 | pointing game |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"Validation, {loc['images'].get('validation')} boxed images (the trained model):",
        "",
        *header,
    ]
    lines += [
        row(f"`{s}`" + (" (chosen)" if s == loc["source"] else ""), f)
        for s, f in loc["candidates"].items()
    ]
    lines += [
        row("prior (mean training box)", loc["prior_validation"]),
        "",
        f"Test, {loc['images'].get('test')} boxed images:",
        "",
        *header,
    ]
    lines += [
        row(f"`{loc['source']}`", loc["test"]),
        row("prior (mean training box)", loc["prior_test"]),
        "",
    ]
    lines += [
        f"Regions shown: {'yes' if loc['shown'] else 'no'} (paired lower bound at IoU > 0.3: {loc['difference_low']})",
        "",
    ]
    randomized = results["model_randomization"]
    sources = list(next(iter(randomized.values())))
    lines += [
        "| re-initialised down to | " + " | ".join(f"`{s}`" for s in sources) + " |",
        "|---|" + "---|" * len(sources),
    ]
    lines += [
        f"| {step} | " + " | ".join(f"{v[s]:.2f}" for s in sources) + " |"
        for step, v in randomized.items()
    ]
    shuffled_ = results["label_randomization"]
    sl = shuffled_["localization"]
    lines += [
        "",
        f"Shuffled annotations: test balanced accuracy {shuffled_['balanced_accuracy']:.3f}, macro AUC {shuffled_['macro_auc']:.3f}.",
        "",
        *header,
    ]
    lines += [row(f"`{s}`", f) for s, f in sl["candidates"].items()] + [
        row("prior (mean training box)", sl["prior_validation"]),
        "",
    ]
    cf = results["counterfactuals"]
    lines += [
        f"Counterfactuals: {cf['cases']} lesion cases ({cf['moved_apart']} whose mirrored lesion lands apart). Served decision positive "
        f"{cf['positive_with']:.2f} with the lesion, {cf['positive_without']:.2f} without; of those positive with it, {cf['flipped_to_negative']:.2f} "
        f"turn negative without it; the probability of pneumonia is lower without the lesion in {cf['probability_lower_without']:.2f} "
        f"(mean drop {cf['mean_probability_drop']:.3f}).",
        "",
        "| map | maximum in the lesion's box | moved: maximum in the new box | moved: maximum still in the old box | map mass in the box, with / without |",
        "|---|---|---|---|---|",
    ]
    for source, m in cf["maps"].items():
        mass = (
            f"{m['mass_in_box_with']:.2f} / {m['mass_in_box_without']:.2f}"
            if "mass_in_box_with" in m
            else "-"
        )
        lines.append(
            f"| {'prior' if source == 'prior' else f'`{source}`'} | {m['pointing_drawn']:.2f} | {m['follows']:.2f} | {m['stays']:.2f} | {mass} |"
        )
    if "class_attention" in results:
        ca = results["class_attention"]
        lines += [
            "",
            "| class attention, 0.5 rule | normal recall | balanced accuracy |",
            "|---|---|---|",
        ]
        lines += [
            f"| {name} log c_i | {ca[name]['normal_recall']:.3f} | {ca[name]['balanced_accuracy']:.3f} |"
            for name in ("without", "with")
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
