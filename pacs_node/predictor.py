"""The model as the node uses it: a bundle in, :class:`Prediction` per image out.

Pure with respect to I/O: datasets in memory go in, arrays come out. One forward pass
gives both the class probabilities and the learned lesion attention ``map+`` (the MGACR
head trained against the doctors' boxes), which is the heat map and the source of the
lesion regions. The multi-label variants give a map per finding: CIA-Net's class-aware
grid, whose cells at 0.5 or more are its detections (regions labelled with their finding),
and class attention's distributions (a heat map, no regions). Other networks get a
Grad-CAM heat map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset
from scipy import ndimage

from dp_model.bundle import load_bundle
from dp_model.explain import HEATMAP_STAGE, grad_cam
from dp_model.networks import output_probabilities
from dp_transforms import ChestImage, LetterboxResize, dicom_to_image, make_square_pixels
from dp_transforms.geometry import Letterbox

logger = logging.getLogger(__name__)

#: A heat-map pixel belongs to a lesion region above this value of ``map+`` (trained
#: towards 1 inside the boxes and 0 outside).
REGION_THRESHOLD = 0.5
#: Regions smaller than this fraction of the image are noise, and at most this many are reported.
MIN_REGION_FRACTION = 0.005
MAX_REGIONS = 3


@dataclass(frozen=True)
class Prepared:
    """An image on the model's canvas and the way back to the source pixels."""

    canvas: torch.Tensor
    geometry: Letterbox
    source: ChestImage

    @property
    def source_shape(self) -> tuple[int, int]:
        return self.source.shape


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image, in the source image's pixel frame.

    Attributes:
        classes: the model's output labels, in order (for a multi-label model, the findings).
        probabilities: softmax probability of each class, or sigmoid of each finding.
        normal_class: the label meaning "no pneumonia".
        operating_point: decision threshold on the probability of pneumonia (of each
            finding, for a multi-label model).
        heatmap: ``(h, w)`` map in [0, 1] over the whole source image (coarse; resize to draw).
        boxes: ``(N, 4)`` lesion regions ``(x_min, y_min, x_max, y_max)`` in source pixels.
        multi_label: findings are decided independently.
        box_labels: the finding of each region, when the model says (else :attr:`label`).
    """

    classes: tuple[str, ...]
    probabilities: np.ndarray
    normal_class: str
    operating_point: float
    heatmap: np.ndarray
    boxes: np.ndarray
    multi_label: bool = False
    box_labels: tuple[str, ...] = ()

    @property
    def pneumonia_probability(self) -> float:
        """Of any pneumonia: ``1 - p(normal)``, or the most probable finding's probability."""
        if self.multi_label:
            return float(self.probabilities.max())
        return float(1.0 - self.probabilities[self.classes.index(self.normal_class)])

    @property
    def positive(self) -> bool:
        return self.pneumonia_probability >= self.operating_point

    @property
    def label(self) -> str:
        """The most probable pneumonia class when positive, else the normal class."""
        if not self.positive:
            return self.normal_class
        lesions = [i for i, c in enumerate(self.classes) if c != self.normal_class]
        return self.classes[max(lesions, key=lambda i: self.probabilities[i])]

    def probability(self, label: str) -> float:
        """The model's probability of ``label`` (of no finding, for the normal class of a multi-label model)."""
        if self.multi_label and label == self.normal_class:
            return 1.0 - self.pneumonia_probability
        return float(self.probabilities[self.classes.index(label)])

    @property
    def label_probability(self) -> float:
        return self.probability(self.label)

    def present(self, label: str) -> bool:
        """Whether finding ``label`` is reported present: each at the operating point when
        multi-label, else only the single decided class."""
        if self.multi_label:
            return self.probability(label) >= self.operating_point
        return self.positive and label == self.label

    @property
    def findings(self) -> list[tuple[str, float]]:
        """The findings reported present, most probable first."""
        present = [(c, self.probability(c)) for c in self.classes if c != self.normal_class and self.present(c)]
        return sorted(present, key=lambda item: -item[1])


def prepare(dataset: Dataset, size: int, name: str = "") -> Prepared:
    """The preprocessing of ``load_letterboxed`` (training's), keeping the decoded source image.

    Args:
        dataset: the received data set.
        size: the model's input side.
        name: what messages call the image (the node passes a checked SOP Instance UID).

    Raises:
        ImageError: the dataset holds no usable image.
    """
    source = dicom_to_image(dataset, name)  # decoded once: the canvas and the overlay both use it
    image = torch.from_numpy(make_square_pixels(source).pixels)[None]
    resizer = LetterboxResize(size)
    return Prepared(resizer(image), resizer.geometry(image), source)


def regions(heatmap: np.ndarray, threshold: float = REGION_THRESHOLD) -> np.ndarray:
    """Bounding boxes ``(N, 4)`` of the largest connected regions of ``heatmap >= threshold``."""
    labels, count = ndimage.label(heatmap >= threshold)
    if count == 0:
        return np.zeros((0, 4), np.float32)
    found = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        area = int((labels[window] == index).sum())
        if area >= MIN_REGION_FRACTION * heatmap.size:
            rows, cols = window
            found.append((area, [cols.start, rows.start, cols.stop, rows.stop]))
    found.sort(key=lambda item: -item[0])
    return np.asarray([box for _, box in found[:MAX_REGIONS]], np.float32).reshape(-1, 4)


class NodePredictor:
    """Batched inference with a ``dp-train`` bundle.

    Args:
        bundle: the bundle folder.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        operating_point: threshold on the probability of pneumonia.
        heatmap_stage: residual stage whose ``map+`` is drawn (nearest available head otherwise).
    """

    def __init__(self, bundle: str | Path, device: str = "auto", operating_point: float = 0.5, heatmap_stage: int = HEATMAP_STAGE) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device}: no CUDA GPU is usable here; use --device cpu (or auto)")
        self.device = torch.device(device)
        self.model, self.contract = load_bundle(bundle, self.device)
        self.operating_point = operating_point
        self.class_maps = hasattr(self.model, "class_maps")
        self.stage = self.model.nearest_stage(heatmap_stage) if getattr(self.model, "attention_stages", ()) else None

    @torch.no_grad()
    def predict(self, prepared: list[Prepared]) -> list[Prediction]:
        """One forward pass for a batch of prepared images."""
        if not prepared:
            return []
        batch = torch.stack([p.canvas for p in prepared]).to(self.device)
        probabilities, maps = self._forward(batch)
        return [self._prediction(p, probabilities[i], maps[i]) for i, p in enumerate(prepared)]

    def _forward(self, batch: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Output probabilities ``(B, K)`` and maps ``(B, 1 or K, h, w)`` on the canvas."""
        if self.class_maps:
            logits, maps = self.model.class_maps(batch)
            return output_probabilities(self.model, logits).cpu().numpy(), maps.float().cpu()
        if self.stage is None:
            logits = self.model(batch)
            maps = grad_cam(self.model, batch, self.model.cam_layer)
        else:
            logits, outputs = self.model.forward_train(batch)
            maps = outputs[self.model.attention_stages.index(self.stage)].map_pos
        return output_probabilities(self.model, logits).cpu().numpy(), maps.float().cpu()

    def _prediction(self, prepared: Prepared, probabilities: np.ndarray, canvas_maps: torch.Tensor) -> Prediction:
        contract = self.contract
        # The maps stay coarse (drawing resizes them); only the letterbox padding is cut away.
        maps = prepared.geometry.canvas_crop(canvas_maps).clamp(0, 1).numpy().astype(np.float32)
        draft = Prediction(contract.output_classes, probabilities, contract.normal_class, self.operating_point, maps[0], np.zeros((0, 4), np.float32), contract.multi_label)
        if len(maps) > 1:  # one map per finding: draw the most probable finding's
            draft = replace(draft, heatmap=maps[int(probabilities.argmax())])
        if not draft.positive or maps[0].size == 0:
            return draft
        sy, sx = prepared.source_shape[0] / maps.shape[1], prepared.source_shape[1] / maps.shape[2]
        scale = np.array([sx, sy, sx, sy], np.float32)
        if len(maps) == 1:
            # Boxes found on the coarse map, scaled to the source image's pixels.
            return replace(draft, boxes=regions(maps[0]) * scale)
        if not getattr(self.model, "maps_are_detections", False):
            return draft
        found = [(label, box) for k, label in enumerate(draft.classes) if draft.present(label) for box in regions(maps[k]) * scale]
        return replace(draft, boxes=np.asarray([box for _, box in found], np.float32).reshape(-1, 4), box_labels=tuple(label for label, _ in found))
