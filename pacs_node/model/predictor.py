"""The model as the node uses it: a bundle in, :class:`Prediction` per image out.

Pure with respect to I/O: datasets in memory go in, arrays come out. The bundle runs through
:class:`dp_model.serving.runner.Runner`, as in the bundle's own evaluation. The heat map comes from
the map source the bundle's contract names (:class:`~dp_model.serving.contract.Localization`): the
learned lesion attention ``map+`` of a stage (the MGACR head trained against the doctors'
boxes, from the same forward pass), a multi-label variant's map per finding (CIA-Net's
class-aware grid, class attention's distributions; regions labelled with their finding),
CAM or Grad-CAM. Lesion regions are drawn only when the contract says that source beat a
fixed prior map on held-out images; otherwise a positive result carries no regions and says
why (:attr:`Prediction.regions_withheld`). A bundle that names no source (written before
sources were measured) gets the former default map and no regions.

Serving a bundle's ONNX graph on the CPU, nothing here imports PyTorch or MONAI: the
canvas comes from training's own preprocessing, NumPy and SimpleITK alone
(:func:`dp_transforms.io.model_canvas`), the maps are cut and the
regions found in NumPy and SciPy, and PyTorch is loaded only where the runner runs in it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from dp_model.serving.contract import NOT_MEASURED, ModelContract
from dp_model.serving.gate import Arrays
from dp_model.serving.runner import Runner
from dp_model.serving.sources import HEATMAP_STAGE
from dp_transforms.dicom import ChestImage, dicom_to_image
from dp_transforms.geometry import Letterbox, resize
from dp_transforms.io import model_canvas
from pacs_node.model.prediction import Prediction

if TYPE_CHECKING:
    from dp_model.networks.classifier import ClassifierBase
    from dp_model.serving.ood import Detector

__all__ = ["NodePredictor", "Prediction", "Prepared", "held_bytes", "prepare", "regions"]

logger = logging.getLogger(__name__)

#: A heat-map pixel belongs to a lesion region above this value of ``map+`` (trained
#: towards 1 inside the boxes and 0 outside).
REGION_THRESHOLD = 0.5
#: Regions smaller than this fraction of the image are noise, and at most this many are reported.
MIN_REGION_FRACTION = 0.005
MAX_REGIONS = 3
#: The overlay's largest side unless the node's configuration says otherwise (overlay_max_side).
OVERLAY_MAX_SIDE = 2048


@dataclass(frozen=True)
class Prepared:
    """An image on the model's canvas, the image the overlay draws on, and the way back.

    Attributes:
        canvas: the model's input.
        geometry: the letterbox between the canvas and the (square-pixel) working image.
        source: the received image as displayed, at most the overlay's size: what a batch
            holds of each image until its results are written.
        source_shape: ``(rows, columns)`` of the received image; predictions are in its pixels.
    """

    canvas: np.ndarray
    geometry: Letterbox
    source: ChestImage
    source_shape: tuple[int, int]

    def on_source(self, prediction: Prediction) -> Prediction:
        """``prediction`` with its boxes in the pixels of :attr:`source` (for the overlay)."""
        sy, sx = (
            self.source.shape[0] / self.source_shape[0],
            self.source.shape[1] / self.source_shape[1],
        )
        if (sy, sx) == (1.0, 1.0) or not len(prediction.boxes):
            return prediction
        return replace(prediction, boxes=prediction.boxes * np.array([sx, sy, sx, sy], np.float32))


def prepare(
    dataset: Dataset, size: int, name: str = "", max_side: int = OVERLAY_MAX_SIDE
) -> Prepared:
    """The preprocessing of training (:func:`~dp_transforms.io.model_canvas`, which
    ``load_letterboxed`` calls too), keeping an overlay-sized source image.

    The image is decoded once, within the decode budget; a very large one is reduced on the
    way (see :func:`~dp_transforms.dicom.dicom_to_image`). The canvas comes from it, the
    overlay's image is it at most ``max_side`` pixels a side.

    Args:
        dataset: the received data set.
        size: the model's input side.
        name: what messages call the image (the node passes a checked SOP Instance UID).
        max_side: the overlay's largest side (the node's ``overlay_max_side``).

    Raises:
        ImageError: the dataset holds no usable image.
    """
    decoded = dicom_to_image(dataset, name)
    canvas, geometry = model_canvas(decoded, size)
    shape = decoded.original_shape or decoded.shape
    return Prepared(canvas, geometry, overlay_image(decoded, shape, max_side), shape)


def overlay_image(image: ChestImage, shape: tuple[int, int], max_side: int) -> ChestImage:
    """``image`` (of a received ``shape``) at the size the overlay draws it: at most ``max_side`` a side."""
    scale = min(1.0, max_side / max(shape))
    target = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
    if image.shape == target:
        return image
    pixels = resize(image.pixels[None], target)[0]
    spacing = (
        None
        if image.spacing is None
        else (
            image.spacing[0] * image.shape[0] / target[0],
            image.spacing[1] * image.shape[1] / target[1],
        )
    )
    return ChestImage(pixels, spacing, image.source, shape)


def held_bytes(rows: int, columns: int, size: int, max_side: int = OVERLAY_MAX_SIDE) -> int:
    """What a :class:`Prepared` of a ``rows x columns`` image holds until its batch is written:
    the overlay-sized image and the canvas, float32."""
    scale = min(1.0, max_side / max(rows, columns, 1))
    return 4 * (max(1, round(rows * scale)) * max(1, round(columns * scale)) + size * size)


def regions(
    heatmap: np.ndarray, threshold: float = REGION_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """The largest connected regions of ``heatmap >= threshold``: boxes ``(N, 4)``
    ``(x_min, y_min, x_max, y_max)`` in map pixels, and each region's peak value ``(N,)``."""
    labels, count = ndimage.label(heatmap >= threshold)
    found = []
    for index, window in enumerate(ndimage.find_objects(labels) if count else [], start=1):
        inside = labels[window] == index
        if inside.sum() >= MIN_REGION_FRACTION * heatmap.size:
            rows, cols = window
            found.append(
                (
                    int(inside.sum()),
                    [cols.start, rows.start, cols.stop, rows.stop],
                    float(heatmap[window][inside].max()),
                )
            )
    found.sort(key=lambda item: -item[0])
    found = found[:MAX_REGIONS]
    return np.asarray([box for _, box, _ in found], np.float32).reshape(-1, 4), np.asarray(
        [peak for _, _, peak in found], np.float32
    )


class NodePredictor:
    """Batched inference with a ``dp-train`` bundle.

    Args:
        bundle: the bundle folder.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        operating_point: threshold on the probability of pneumonia; None: the bundle's
            "present" point (0.5 for a bundle that states none).
        heatmap_stage: for a bundle that names no map source: the residual stage whose ``map+``
            is drawn (nearest available head otherwise). A bundle's own source always wins.
        ood_gate: apply the bundle's out-of-distribution gate (off: every image is assessed,
            as when validating a model on a site's own images; the score is still reported).
        engine: who runs the model (:data:`dp_model.serving.runner.ENGINES`): ``auto`` runs the
            bundle's ONNX graph in ONNX Runtime on the CPU where it has one.
    """

    def __init__(
        self,
        bundle: str | Path,
        device: str = "auto",
        operating_point: float | None = None,
        heatmap_stage: int = HEATMAP_STAGE,
        ood_gate: bool = True,
        *,
        engine: str = "auto",
    ) -> None:
        self.runner = Runner(
            bundle=bundle, device=device, maps=True, heatmap_stage=heatmap_stage, engine=engine
        )
        self.operating_point = (
            self.contract.present_point.threshold if operating_point is None else operating_point
        )
        self.ood_gate = ood_gate
        located = self.contract.localization
        #: Why a positive result carries no regions ("": they are drawn).
        self.regions_withheld = NOT_MEASURED if located is None else located.reason
        self._announce(operating_point)

    @property
    def contract(self) -> ModelContract:
        return self.runner.contract

    @property
    def model(self) -> ClassifierBase:
        """The bundle's network in PyTorch (loaded, with PyTorch, on first use where the
        graph serves)."""
        from dp_model.networks.classifier import ClassifierBase

        model = self.runner.model
        assert isinstance(model, ClassifierBase), (
            "a bundle's network is built from dp_model's registry"
        )
        return model

    @property
    def statistics(self) -> Detector | Arrays | None:
        """The out-of-distribution detector (None: the bundle has no gate)."""
        return self.runner.statistics

    @property
    def device(self) -> str:
        """The device's name (``cpu``, ``cuda:0``)."""
        return self.runner.device

    @property
    def source(self) -> str:
        """The map source of the heat map and the regions."""
        assert self.runner.source is not None  # the runner was asked for maps
        return self.runner.source

    def _announce(self, override: float | None) -> None:
        """Say at start how the model decides: where each setting comes from."""
        point = self.contract.present_point
        if override is None:
            logger.info(
                "operating point %.4f from the bundle (%s)",
                point.threshold,
                point.target or "no target stated",
            )
        else:
            logger.info(
                "operating point %.4f set in the node's configuration (the bundle's is %.4f, %s)",
                override,
                point.threshold,
                point.target or "no target stated",
            )
        triage = self.contract.triage_point
        if override is not None and triage is not None and override > triage.threshold:
            logger.warning(
                "the configured operating point %.4f lies above the bundle's triage point %.4f: every positive image is also flagged",
                override,
                triage.threshold,
            )
        for default in self.contract.defaults():
            logger.info("the bundle states no %s", default)
        located = self.contract.localization
        if located is not None and located.shown:
            logger.info(
                "lesion regions from %s: on validation IoU>0.3 %.3f against the prior's %.3f",
                located.source,
                located.validation["iou>0.3"],
                located.prior_validation["iou>0.3"],
            )
        elif located is not None:  # a bundle without the field is named among the defaults above
            logger.info(
                "%s (%s; IoU>0.3 %.3f against the prior's %.3f on validation)",
                self.regions_withheld,
                located.source,
                located.validation.get("iou>0.3", float("nan")),
                located.prior_validation.get("iou>0.3", float("nan")),
            )
        if self.contract.ood is not None and not self.ood_gate:
            logger.warning(
                "the out-of-distribution gate is switched off: every image is assessed, however unlike the training images"
            )

    def predict(self, prepared: list[Prepared]) -> list[Prediction]:
        """One forward pass for a batch of prepared images.

        Raises:
            ValueError: the model gave non-finite outputs (the batch fails: no report on
                numbers that mean nothing).
        """
        if not prepared:
            return []
        outputs = self.runner.run(np.stack([p.canvas for p in prepared]))
        if not np.isfinite(outputs.probabilities).all():
            raise ValueError("the model gave non-finite outputs")
        assert outputs.maps is not None  # the runner was asked for maps
        # The gate fails closed, never open: a NaN score is not assessed (Prediction.assessed).
        scores = outputs.ood_scores
        return [
            self._prediction(
                p,
                outputs.probabilities[i],
                outputs.maps[i],
                None if scores is None else float(scores[i]),
            )
            for i, p in enumerate(prepared)
        ]

    def _prediction(
        self,
        prepared: Prepared,
        probabilities: np.ndarray,
        canvas_maps: np.ndarray,
        ood_score: float | None,
    ) -> Prediction:
        contract = self.contract
        # The maps stay coarse (drawing resizes them); only the letterbox padding is cut away.
        maps = np.clip(prepared.geometry.canvas_crop(canvas_maps), 0, 1).astype(np.float32)
        draft = Prediction(
            classes=contract.output_classes,
            probabilities=probabilities,
            normal_class=contract.normal_class,
            operating_point=self.operating_point,
            heatmap=maps[0],
            boxes=np.zeros((0, 4), np.float32),
            multi_label=contract.multi_label,
            box_labels=(),
            pneumonia=contract.pneumonia,
            triage_point=None if contract.triage_point is None else contract.triage_point.threshold,
            ood_score=ood_score,
            ood_threshold=None
            if ood_score is None or contract.ood is None or not self.ood_gate
            else contract.ood.threshold,
            engine=self.runner.engine,
        )
        if len(maps) > 1:  # one map per finding: draw the most probable finding's
            draft = replace(draft, heatmap=maps[int(probabilities.argmax())])
        if not draft.positive or maps[0].size == 0:
            return draft  # no region on a negative or not-assessed result, whatever the map says
        if self.regions_withheld:
            return replace(draft, regions_withheld=self.regions_withheld)
        sy, sx = prepared.source_shape[0] / maps.shape[1], prepared.source_shape[1] / maps.shape[2]
        scale = np.array([sx, sy, sx, sy], np.float32)
        if len(maps) == 1:
            # Boxes found on the coarse map, scaled to the source image's pixels.
            boxes, peaks = regions(maps[0])
            return replace(draft, boxes=boxes * scale, box_scores=tuple(peaks.tolist()))
        found = [
            (label, box, peak)
            for k, label in enumerate(draft.classes)
            if draft.present(label)
            for box, peak in zip(*regions(maps[k]))
        ]
        return replace(
            draft,
            boxes=np.asarray([box for _, box, _ in found], np.float32).reshape(-1, 4) * scale,
            box_labels=tuple(label for label, _, _ in found),
            box_scores=tuple(float(peak) for _, _, peak in found),
        )
