"""Running a bundle's classifier on image files: what a bundle's ``inference.json`` and
``evaluate.json`` call (``dp-train evaluate`` too), through :class:`dp_model.serving.runner.Runner`,
the node's runner."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dp_transforms import ImageError, load_letterboxed

from ..networks.architectures import class_scores
from .contract import ModelContract
from .gate import Arrays
from .loading import IMAGE_SUFFIXES, BundleError
from .ood import Detector
from .runner import Runner

logger = logging.getLogger(__name__)


class Predictor:
    """Runs a bundle's classifier on image files; used by the bundle's own configs."""

    def __init__(
        self, bundle_root: str, network: nn.Module | None = None, device: str | torch.device = "cpu"
    ) -> None:
        self.root = Path(bundle_root)
        self.runner = Runner(bundle=self.root, device=device, network=network)
        self.assessed: list[bool] = []  # of the images of the last call, as the node's gate decides
        # of the images of the last call (NaN: no gate, or unreadable)
        self.ood_scores: list[float] = []

    @property
    def contract(self) -> ModelContract:
        return self.runner.contract

    @property
    def model(self) -> nn.Module:
        """The network that runs: the configs' own ``network`` when given, else the bundle's."""
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return torch.device(self.runner.device)

    @property
    def statistics(self) -> Detector | Arrays | None:
        return self.runner.statistics

    def probabilities(self, paths: list[Path]) -> tuple[np.ndarray, list[str]]:
        """Output probabilities of the images that load (NaN rows for the others); the reasons
        of those that do not. :attr:`assessed` says, per image, whether the out-of-distribution
        gate lets it through (:meth:`~dp_model.serving.contract.ModelContract.admits`, as in the node)."""
        out, problems, self.assessed, self.ood_scores = [], [], [], []
        for path in paths:
            try:
                canvas, _, _ = load_letterboxed(path, self.contract.image_size)
            except ImageError as exc:
                problems.append(str(exc))
                out.append(np.full(len(self.contract.output_classes), np.nan))
                self.assessed.append(False)
                self.ood_scores.append(float("nan"))
                continue
            outputs = self.runner.run(canvas[None])
            out.append(outputs.probabilities[0])
            score = None if outputs.ood_scores is None else float(outputs.ood_scores[0])
            self.assessed.append(self.contract.admits(score))
            self.ood_scores.append(float("nan") if score is None else score)
        return np.asarray(out), problems

    def predict_folder(self, input_dir: str, output_dir: str) -> Path:
        """Write ``predictions.csv`` (file, prediction, probability of each output; none when not assessed) for every image in ``input_dir``.

        The prediction follows the contract's rule (:meth:`~dp_model.serving.contract.ModelContract.decide`)
        at the bundle's operating point: the normal class, or the pneumonia finding(s) present
        joined by "+"; "not assessed" for an image the out-of-distribution gate stops.
        """
        paths = sorted(p for p in Path(input_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise BundleError(f"{input_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        probabilities, problems = self.probabilities(paths)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "predictions.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "prediction", *self.contract.output_classes])
            for path, p, assessed in zip(paths, probabilities, self.assessed):
                label = (
                    "unreadable"
                    if np.isnan(p).any()
                    else self._label(p)
                    if assessed
                    else "not assessed"
                )
                # Not assessed: no finding and no probability stated, the cells left empty (as in the node's SR).
                writer.writerow([str(path), label, *(f"{v:.4f}" if assessed else "" for v in p)])
        for problem in problems:
            logger.warning("skipped %s", problem)
        logger.info("predictions for %d images in %s", len(paths), out / "predictions.csv")
        return out / "predictions.csv"

    def _label(self, p: np.ndarray) -> str:
        decision = self.contract.decide(p)
        return "+".join(c for c, _ in decision.findings) or decision.label

    def evaluate_dataset(
        self, dataset_dir: str, output_dir: str, layout: str = "auto", split: str = "all"
    ) -> Path:
        """Metrics of the bundle on a dataset, written as ``metrics.md``: every image, or only
        those of the bundle's own ``split`` (train, val, calibration or test) when it is the data it was trained from.

        ``metrics.md`` holds the network's class metrics and then the served decision
        (:meth:`served`); ``served.json``, ``scores.npz`` and ``served_reliability.png`` go beside it."""
        from ..datasets import read_dataset
        from ..datasets.splits import split_subset
        from ..metrics import evaluate

        dataset = read_dataset(dataset_dir, layout)
        if tuple(dataset.classes) != self.contract.classes:
            raise BundleError(
                f"{dataset_dir}: classes {list(dataset.classes)} differ from the bundle's {list(self.contract.classes)}"
            )
        if split != "all":
            split_file = self.root / "configs" / "split.json"
            if not split_file.is_file():
                raise BundleError(
                    f"{self.root}: no configs/split.json, so no {split} split to score; use --split all"
                )
            dataset = split_subset(dataset, json.loads(split_file.read_text()), split)
        probabilities, problems = self.probabilities([r.image for r in dataset.records])
        keep = ~np.isnan(probabilities).any(axis=1)
        normal = self.contract.classes.index(self.contract.normal_class)
        scores = class_scores(
            torch.from_numpy(probabilities[keep]), self.contract.multi_label, normal
        ).numpy()
        report = evaluate(dataset.targets()[keep], scores, self.contract.classes, bootstrap=200)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        served = self.served(dataset, probabilities, keep, out)
        (out / "metrics.md").write_text(report.table() + "\n\n" + served + "\n")
        logger.info(
            "%d images evaluated, %d unreadable; %s",
            int(keep.sum()),
            len(problems),
            out / "metrics.md",
        )
        return out / "metrics.md"

    def served(self, dataset, probabilities: np.ndarray, keep: np.ndarray, out: Path) -> str:
        """The node's decision on the readable images of ``dataset`` (:func:`dp_model.serving.served.evaluate_served`),
        from the probabilities and gate scores of the last :meth:`probabilities` call; writes
        ``served.json``, ``scores.npz`` (image ids hashed as in ``split.json``) and the reliability
        diagram into ``out``, and returns the markdown."""
        from ..datasets.splits import hashed_id
        from .served import (
            evaluate_served,
            is_pneumonia,
            reliability_diagram,
            save_scores,
            served_decisions,
        )

        labels, ood = dataset.targets()[keep], np.asarray(self.ood_scores, np.float64)[keep]
        ood = None if self.statistics is None else ood
        report = evaluate_served(probabilities[keep], ood, labels, self.contract)
        (out / "served.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
        ids = [hashed_id(r.image_id) for r, kept in zip(dataset.records, keep) if kept]
        save_scores(out / "scores.npz", ids, labels, probabilities[keep], ood, self.contract)
        decided = served_decisions(probabilities[keep], ood, self.contract)
        truth = is_pneumonia(labels, self.contract)
        reliability_diagram(
            decided.pneumonia_probability[decided.assessed],
            truth[decided.assessed],
            out / "served_reliability.png",
            "served P(pneumonia), assessed images",
        )
        return "## Served decision\n\n" + report.table()
