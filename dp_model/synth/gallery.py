"""Pictures of the synthetic data: a gallery per class with boxes, a side-by-side with a
real radiograph, and the training augmentations applied to a synthetic case, so that
realism and augmentation can be judged at a glance.

``python -m dp_model.synth.gallery --out docs/synthetic_gallery.png --compare docs/synthetic_vs_real.png --augment docs/augmentations.png``
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from .config import CLASSES, SynthConfig
from .render import Case, render_case

TITLES = {
    "normal": "normal",
    "lobar": "lobar consolidation",
    "bronchopneumonia": "bronchopneumonia",
    "interstitial": "interstitial pneumonia",
    "cavitary": "cavitary pneumonia",
}


def collect(config: SynthConfig, per_class: int, limit: int = 5000) -> dict[str, list[Case]]:
    """The first ``per_class`` cases of each true class, in dataset order."""
    found: dict[str, list[Case]] = {name: [] for name in CLASSES}
    for index in range(limit):
        case = render_case(config, index)
        if len(found[case.label]) < per_class:
            found[case.label].append(case)
        if all(len(cases) == per_class for cases in found.values()):
            break
    return found


def write_gallery(
    config: SynthConfig, path: str | Path, per_class: int = 4, size: int = 512
) -> Path:
    """A grid, one row per class, of images with their recorded boxes (red) and any
    lesion left unboxed by label noise (dashed yellow)."""
    config = replace(config, size=min(config.size, size))
    cases = collect(config, per_class)
    fig, axes = plt.subplots(
        len(CLASSES), per_class, figsize=(2.6 * per_class, 2.75 * len(CLASSES)), squeeze=False
    )
    for row, name in enumerate(CLASSES):
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(cases[name]):
                continue
            case = cases[name][col]
            ax.imshow(case.pixels, cmap="gray", vmin=0, vmax=1)
            _draw_boxes(ax, case)
            note = (
                "" if case.recorded_label == case.label else f"  (recorded: {case.recorded_label})"
            )
            ax.set_title(f"#{case.index}{note}", fontsize=7)
        axes[row, 0].text(
            -0.06,
            0.5,
            TITLES[name],
            transform=axes[row, 0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=10,
        )
    fig.suptitle(
        f"Synthetic chest X-rays (seed {config.seed}): red = recorded lesion boxes. Not for clinical use.",
        fontsize=10,
    )
    fig.tight_layout(rect=(0.02, 0, 1, 0.98))
    return _save(fig, path)


def _draw_boxes(ax: plt.Axes, case: Case) -> None:
    for x0, y0, x1, y1 in case.boxes:
        ax.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.2)
        )
    if len(case.boxes) == 0:
        for x0, y0, x1, y1 in case.true_boxes:
            ax.add_patch(
                Rectangle(
                    (x0, y0),
                    x1 - x0,
                    y1 - y0,
                    fill=False,
                    edgecolor="yellow",
                    linewidth=1.0,
                    linestyle="--",
                )
            )


def write_comparison(config: SynthConfig, path: str | Path, size: int = 512) -> Path:
    """A real PA chest radiograph (pydicom-data's RG1_UNCR.dcm) beside synthetic ones."""
    from pydicom.data import get_testdata_file

    from dp_transforms import load_image

    real_path = get_testdata_file("RG1_UNCR.dcm")
    if real_path is None:
        raise FileNotFoundError("RG1_UNCR.dcm not found: install the pydicom-data package")
    real = load_image(real_path).pixels
    config = replace(config, size=min(config.size, size))
    found = collect(config, 1)
    shown = [("real: RG1_UNCR.dcm (CR, PA)", real, None)] + [
        (f"synthetic: {TITLES[name]}", found[name][0].pixels, found[name][0])
        for name in ("normal", "lobar", "cavitary")
    ]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6))
    for ax, (title, pixels, case) in zip(axes, shown):
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
        if case is not None:
            _draw_boxes(ax, case)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def write_augmentations(
    config: SynthConfig, path: str | Path, size: int = 224, seed: int = 0
) -> Path:
    """A lobar case as the model sees it (letterboxed to ``size``), two SimCLR views, and
    three stage-II draws where image and ``mask+`` (red outline) move together, each drawn
    with the augmentation its stage trains with by default."""
    import torch

    from dp_transforms import BoxesToMaskd, LetterboxResized

    from ..training.config import FinetuneConfig, PretrainConfig
    from ..training.runtime import augmenters

    case = collect(replace(config, size=512), 1)["lobar"][0]
    sample = LetterboxResized("image", size, box_keys="boxes")(
        {"image": torch.from_numpy(case.pixels)[None], "boxes": case.boxes}
    )
    sample = BoxesToMaskd("image")(sample)
    image, mask = sample["image"][None], sample["mask"][None]
    affine, intensity = augmenters(PretrainConfig().augment, seed)
    views = intensity(affine(image.repeat(2, 1, 1, 1)))
    affine, intensity = augmenters(FinetuneConfig().augment, seed)
    moved, moved_mask = affine(image.repeat(3, 1, 1, 1), mask.repeat(3, 1, 1, 1))
    jittered = intensity(moved)
    panels = [("input, mask+ outlined", image[0, 0], mask[0, 0])]
    panels += [(f"SimCLR view {i + 1}", views[i, 0], None) for i in range(2)]
    panels += [(f"stage II draw {i + 1}", jittered[i, 0], moved_mask[i, 0]) for i in range(3)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, pixels, outline) in zip(axes, panels):
        ax.imshow(pixels.numpy(), cmap="gray", vmin=0, vmax=1)
        if outline is not None:
            ax.contour(outline.numpy(), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write pictures of the synthetic data.")
    p.add_argument("--out", type=Path, required=True, help="gallery PNG")
    p.add_argument("--compare", type=Path, help="also write the real-versus-synthetic PNG here")
    p.add_argument("--augment", type=Path, help="also write the augmentation picture here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=4)
    args = p.parse_args(argv)
    config = SynthConfig(seed=args.seed)
    print(write_gallery(config, args.out, args.per_class))
    if args.compare:
        print(write_comparison(config, args.compare))
    if args.augment:
        print(write_augmentations(config, args.augment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
