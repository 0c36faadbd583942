"""``dp-synth``: generate a synthetic chest X-ray dataset in a real layout.

Examples::

    dp-synth --out data/synth                       # 2,000 DICOM images, 1024 x 1024
    dp-synth --out data/small --num-images 500 --size 256 --image-format png
    dp-synth --out data/rsna --layout rsna --config configs/synth.yaml
    dp-synth --out data/hard --lesion-contrast 0.35 --distractor-rate 3 --gallery hard.png

Every option mirrors a key of the configuration (``configs/synth.yaml``); options given
on the command line override the file. The images are synthetic phantoms for
developing and testing this software, never for clinical use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import ConfigError, load_arguments
from .config import SynthConfig

logger = logging.getLogger("dp-synth")

#: Command-line option -> dotted configuration key.
OPTIONS = {
    "num_images": "num_images",
    "size": "size",
    "seed": "seed",
    "version": "version",
    "layout": "layout",
    "image_format": "image_format",
    "workers": "workers",
    "lesion_contrast": "difficulty.lesion_contrast",
    "contrast_spread": "difficulty.contrast_spread",
    "distractor_rate": "difficulty.distractor_rate",
    "label_noise": "difficulty.label_noise",
    "pathology_overlap": "difficulty.pathology_overlap",
    "abnormality_rate": "difficulty.abnormality_rate",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-synth",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write the dataset into (created; must be empty)",
    )
    p.add_argument(
        "--config", type=Path, help="YAML configuration (defaults: the embedded default)"
    )
    p.add_argument("--num-images", type=int, help="number of images")
    p.add_argument("--size", type=int, help="side of the square images in pixels")
    p.add_argument("--seed", type=int, help="master seed")
    p.add_argument(
        "--version",
        type=int,
        help="generator version: 2 (default) or 1 (the data of the published tables)",
    )
    p.add_argument("--layout", help="deep-pneumonia, rsna or csv")
    p.add_argument("--image-format", help="dicom or png")
    p.add_argument("--workers", type=int, help="processes (0: all cores)")
    p.add_argument(
        "--lesion-contrast",
        type=float,
        help="median lesion density (1 obvious, 0.3 barely visible)",
    )
    p.add_argument("--contrast-spread", type=float, help="log-normal spread of lesion density")
    p.add_argument(
        "--distractor-rate", type=float, help="mean lesion-like non-pneumonia findings per image"
    )
    p.add_argument("--label-noise", type=float, help="fraction of wrongly recorded labels")
    p.add_argument(
        "--pathology-overlap", type=float, help="chance of a faint unrecorded second lesion type"
    )
    p.add_argument(
        "--abnormality-rate",
        type=float,
        help="share of images with a non-pneumonia abnormality (version 2)",
    )
    p.add_argument(
        "--gallery", type=Path, help="also write a PNG gallery of a few images per class here"
    )
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s"
    )
    try:
        config = load_arguments(SynthConfig, args, OPTIONS)
    except ConfigError as exc:
        print(f"dp-synth: {exc}", file=sys.stderr)
        return 2
    if args.out.exists() and (
        not args.out.is_dir() or (any(args.out.iterdir()) and not args.force)
    ):
        print(
            f"dp-synth: {args.out} exists and is not an empty folder (use --force to write into it)",
            file=sys.stderr,
        )
        return 2
    from .generate import generate  # imported here so that --help stays fast

    try:
        summary = generate(config, args.out, progress=not args.quiet)
        if args.gallery:
            from .gallery import write_gallery

            write_gallery(config, args.gallery)
    except KeyboardInterrupt:
        print("dp-synth: interrupted; the output folder is incomplete", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"dp-synth: cannot write the dataset: {exc}", file=sys.stderr)
        return 1
    counts = ", ".join(
        f"{name} {n}" for name, n in sorted(summary.class_counts.items(), key=lambda kv: -kv[1])
    )
    print(
        f"{summary.images} synthetic images in {summary.root} ({config.layout}, {config.image_format}, {config.size} px): {counts}"
    )
    print(
        f"{summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s with {summary.workers} workers"
    )
    if args.gallery:
        print(f"gallery: {args.gallery}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
