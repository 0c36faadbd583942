"""``dp-train``: train Deep Pneumonia into a MONAI bundle, or evaluate a bundle.

Examples::

    dp-train --config configs/demo.yaml --data runs/demo/data --out runs/demo/bundle
    dp-train --config configs/deep_pneumonia.yaml --data data/synth --out runs/dp
    dp-train --config configs/deep_pneumonia.yaml --data data/synth --out runs/dp --resume
    dp-train --config configs/deep_pneumonia.yaml --data data/synth --out runs/dp --stages pretrain
    dp-train evaluate --bundle runs/dp --data data/other
    dp-train ablation --config configs/deep_pneumonia.yaml --data data/synth --out runs/ablation --seeds 0 1 2

Options mirror keys of the configuration (``configs/deep_pneumonia.yaml`` lists them all);
the command line overrides the file. Multi-GPU: ``torchrun --nproc_per_node=N -m
dp_model.training.cli --config ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Light imports only, so that --help and a mistaken argument answer at once: the datasets,
# the bundle and training bring PyTorch and MONAI (seconds on two cores), after parsing.
from ..config import ConfigError, load_arguments
from .config import TrainConfig

logger = logging.getLogger("dp-train")

#: The layouts dp_model.datasets reads, for --help (importing it would take seconds; a test keeps them equal).
LAYOUT_NAMES = "deep-pneumonia, rsna, nih, pediatric or csv"

OPTIONS = {
    "data": "data.root",
    "layout": "data.layout",
    "image_size": "data.image_size",
    "pretrain_epochs": "pretrain.epochs",
    "finetune_epochs": "finetune.epochs",
    "batch_size": "finetune.batch_size",
    "device": "runtime.device",
    "seed": "runtime.seed",
    "demo": "demo",
}


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-train",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML configuration (default: the embedded default)")
    p.add_argument("--data", help="dataset folder or CSV file")
    p.add_argument("--layout", help=f"dataset layout: {LAYOUT_NAMES} (default: detected)")
    p.add_argument("--out", type=Path, help="bundle folder to write (default: runs/<name>)")
    p.add_argument("--stages", choices=["all", "pretrain", "finetune"], default="all")
    p.add_argument(
        "--resume", action="store_true", help="continue from the bundle folder's last checkpoint"
    )
    p.add_argument(
        "--validation-only",
        action="store_true",
        help="for choosing a recipe: train, measure on validation only (validation.json); the test split is never read and no bundle is written",
    )
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    p.add_argument("--image-size", type=int)
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--batch-size", type=int, help="stage II batch size")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--demo", action="store_true", default=None, help="mark every artefact as a demonstration"
    )
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-train evaluate", description="Metrics of a bundle on every image of a dataset."
    )
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, help="where metrics.md goes (default: <bundle>/eval)")
    p.add_argument(
        "--layout", default="auto", help=f"dataset layout: {LAYOUT_NAMES} (default: detected)"
    )
    p.add_argument(
        "--split",
        choices=["all", "train", "val", "calibration", "test"],
        default="all",
        help="score only the images of the bundle's own split (the data it was trained from); default: every image",
    )
    return p


def ablation_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-train ablation",
        description="The paper's Table I and Table II, and the four seed systems, on one dataset, several seeds.",
    )
    p.add_argument("--config", type=Path)
    p.add_argument("--data", required=True)
    p.add_argument(
        "--out", type=Path, required=True, help="folder for results.md, results.json, results.png"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--tables",
        default="all",
        help="all, or a comma-separated list of baselines, plain, standing, I, search, II, systems, cia, options",
    )
    p.add_argument(
        "--by-seed",
        action="store_true",
        help="every row of a seed before the next seed (a stopped run keeps whole seeds)",
    )
    p.add_argument("--image-size", type=int)
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"evaluate": (evaluate_parser, _evaluate), "ablation": (ablation_parser, _ablation)}
    make_parser, command = commands.get(argv[0], (None, None)) if argv else (None, None)
    args = make_parser().parse_args(argv[1:]) if make_parser else train_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return (command or _train)(args)
    except (ValueError, RuntimeError, OSError) as exc:
        # ConfigError, DatasetError and BundleError among them
        print(f"dp-train: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dp-train: interrupted; continue with --resume", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    config = load_arguments(TrainConfig, args, OPTIONS)
    if not config.data.root:
        raise ConfigError("no dataset: pass --data or set data.root")
    out = args.out or Path("runs") / config.name
    # under torchrun, rank 0 may already be writing
    first_process = os.environ.get("RANK", "0") == "0"
    if (
        first_process
        and out.exists()
        and any(out.iterdir())
        and not (args.resume or args.force or args.stages == "finetune")
    ):
        raise ConfigError(
            f"{out} exists and is not empty (use --resume to continue, --force to overwrite)"
        )
    check_layout(config.data.root, config.data.layout)
    from .checkpoints import load_checkpoint
    from .run import train  # heavy imports after the arguments are known good

    if (
        args.resume
        and args.stages != "pretrain"
        and (load_checkpoint(out / "checkpoints" / "last.pt") or {}).get("stage") == "done"
    ):
        print(
            f"{out}: this training is already complete; its bundle is there (use --force to train again)"
        )
        return 0

    result = train(config, out, args.stages, args.resume, validation_only=args.validation_only)
    if args.stages == "pretrain":
        print(f"stage I done: encoder in {out / 'checkpoints' / 'encoder.pt'}")
        return 0
    r = result.report
    if args.validation_only:
        print(
            f"validation (test not read): balanced accuracy {r.balanced_accuracy:.3f}, macro AUC {r.macro_auc:.3f}; {out / 'validation.json'}"
        )
        return 0
    print(f"bundle: {result.bundle}")
    print(
        f"test: accuracy {r.accuracy:.3f}, balanced accuracy {r.balanced_accuracy:.3f}, macro-F1 {r.macro_f1:.3f}, macro AUC {r.macro_auc:.3f}"
    )
    print(r.table())
    if result.baselines:
        print(
            "baselines on the same test images: "
            + ", ".join(
                f"{name} balanced accuracy {b.balanced_accuracy:.3f}, macro AUC {b.macro_auc:.3f}"
                for name, b in result.baselines.items()
            )
        )
    print(f"model card: {result.bundle / 'docs' / 'README.md'}")
    return 0


def _ablation(args: argparse.Namespace) -> int:
    from .ablation import run

    config = load_arguments(TrainConfig, args, OPTIONS)
    run(config, args.out, args.seeds, args.tables, by_seed=args.by_seed)
    print((args.out / "results.md").read_text())
    print(f"results: {args.out / 'results.md'}, {args.out / 'results.png'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if not args.bundle.exists():
        raise ConfigError(
            f"bundle {args.bundle} does not exist: pass --bundle with a folder dp-train wrote"
        )
    from ..serving.inference import Predictor

    predictor = Predictor(str(args.bundle))
    check_layout(args.data, args.layout)
    path = predictor.evaluate_dataset(
        str(args.data), str(args.out or args.bundle / "eval"), args.layout, args.split
    )
    print(path.read_text())
    return 0


def check_layout(root: str | Path, layout: str) -> None:
    """Recognise the dataset's layout before anything is trained or scored; a folder in none
    of them gets the option that names one, and its values."""
    from ..datasets import LAYOUTS, DatasetError, detect_layout

    if layout not in (None, "", "auto") or not Path(root).is_dir():
        return  # a named layout is checked by its reader; a missing folder says so there
    try:
        detect_layout(root)
    except DatasetError as exc:
        raise DatasetError(f"{exc}: --layout {'|'.join(LAYOUTS)} (config key data.layout)") from exc


if __name__ == "__main__":
    sys.exit(main())
