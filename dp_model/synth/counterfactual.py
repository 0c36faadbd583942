"""One synthetic case rendered three ways: as the dataset has it, without its lesion, and with
its lesion moved to the mirror place in the other lung.

Counterfactual checks of a model ask what changes when only the lesion changes: does the
prediction drop without it, does the map follow it when it moves? Everything else is the
case's own: the patient, the frame, the faint unrecorded overlap, the distractors, the
detector's processing draws and noise, the laterality marker. :func:`render_variants` makes
the same random draws in the same order as :func:`~dp_model.synth.render.render_case`, so
its first image is exactly the dataset's (a test holds it to that), and only the lesion's
attenuation differs between the three. (Detector processing depends on the image, as a
real one does: its tone curve follows the image's percentiles, so the background may shift
slightly when the lesion goes.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import render_anatomy, sample_anatomy
from .config import SynthConfig
from .frame import Frame
from .lesions import LESIONS, Opacity, Scene, distractors
from .render import (
    MAX_WORK_RES,
    _boxes,
    _burn_marker,
    _overlap,
    _record,
    _sample_class,
    form_image,
    patient_of,
)

__all__ = ["Variants", "render_variants"]

#: A lesion's box is what is clearly visible: above this share of its peak (as ``Opacity.box``).
VISIBLE = 0.25


@dataclass(frozen=True, kw_only=True)
class Variants:
    """Case ``index`` three ways, each ``(size, size)`` float32 in [0, 1].

    Attributes:
        index, label: the case and its true class.
        with_lesion: the dataset's image.
        without_lesion: the same image without the lesion (a normal case: the same image).
        moved: the lesion mirrored to the other lung, kept inside the lungs.
        boxes, moved_boxes: ``(N, 4)`` tight boxes ``(x0, y0, x1, y1)`` of each visible part of
            the lesion as drawn and as moved, in output pixels (no reader's margin).
    """

    index: int
    label: str
    with_lesion: np.ndarray
    without_lesion: np.ndarray
    moved: np.ndarray
    boxes: np.ndarray
    moved_boxes: np.ndarray


def render_variants(config: SynthConfig, index: int) -> Variants:
    """Render case ``index`` of ``config`` with its lesion, without it, and moved.

    Generator version 1 only: the variants repeat its random draws in its order (the data of
    the localization tables, configs/synth_learning.yaml). A version 2 config is refused, so
    that a variant is never passed off as a case it is not."""
    if config.version != 1:
        raise ValueError(
            f"counterfactual variants follow generator version 1's draws; this config is version {config.version} (set version: 1)"
        )
    rng = np.random.default_rng([config.seed, 1, index])
    patient = patient_of(index, config)
    patient_rng = np.random.default_rng([config.seed, 2, patient])
    anatomy = sample_anatomy(patient_rng)
    label = _sample_class(rng, config)
    res = min(config.size, MAX_WORK_RES)
    frame = Frame(
        res,
        scale=rng.uniform(1.0, 1.12),
        angle=rng.normal(0, 0.035),
        shift=(rng.normal(0, 0.025), rng.normal(0.07, 0.03)),
    )
    scene = Scene(anatomy, render_anatomy(anatomy, frame, patient_rng), frame)
    difficulty = config.difficulty
    density = difficulty.lesion_contrast * float(np.exp(rng.normal(0, difficulty.contrast_spread)))
    lesions = LESIONS[label](scene, rng, density) if label in LESIONS else []
    extra = _overlap(scene, rng, label, density, difficulty.pathology_overlap)
    clutter = distractors(scene, rng, int(rng.poisson(difficulty.distractor_rate)))
    parts = [_placed(opacity, res) for opacity in lesions]
    moved = [_mirrored(part, scene) for part in parts]

    def attenuation(first: list[Opacity]) -> np.ndarray:
        # added in render_case's order, so that the sums match to the bit
        found = scene.maps.attenuation.copy()
        for opacity in (*first, *extra, *clutter):
            found[opacity.window] += opacity.layer
        return found

    def finish(attenuation: np.ndarray) -> np.ndarray:
        # the rest of render_case's draws, from the same state
        own = copy.deepcopy(rng)
        pixels = form_image(attenuation, config.size, own)
        _record(own, label, _boxes(lesions, res, config.size, own), difficulty.label_noise)
        if own.random() < 0.3:
            _burn_marker(pixels, own)
        return pixels

    scale = config.size / res
    return Variants(
        index=index,
        label=label,
        with_lesion=finish(attenuation(lesions)),
        without_lesion=finish(attenuation([])),
        moved=finish(attenuation([Opacity((slice(None), slice(None)), part) for part in moved])),
        boxes=_tight_boxes(parts, scale),
        moved_boxes=_tight_boxes(moved, scale),
    )


def _placed(opacity: Opacity, res: int) -> np.ndarray:
    """One part of the lesion on the whole working grid."""
    layer = np.zeros((res, res), np.float32)
    layer[opacity.window] += opacity.layer
    return layer


def _mirrored(layer: np.ndarray, scene: Scene) -> np.ndarray:
    """``layer`` mirrored about the body's midline (canonical ``u -> -u``), inside the lungs."""
    if not layer.any():
        return layer
    u, v = scene.frame.grids
    source = scene.frame.to_pixels(np.stack([-u.ravel(), v.ravel()], axis=1)) - 0.5  # pixel centres
    mirrored = ndimage.map_coordinates(
        layer, [source[:, 1], source[:, 0]], order=1, mode="constant"
    ).reshape(layer.shape)
    return (mirrored * np.clip(scene.maps.lungs, 0.0, 1.0)).astype(np.float32)


def _tight_boxes(layers: list[np.ndarray], scale: float) -> np.ndarray:
    """``(N, 4)`` boxes of what is clearly visible of each part, in output pixels."""
    found = []
    for layer in layers:
        peak = float(layer.max())
        if peak > 0:
            rows, cols = np.nonzero(layer > VISIBLE * peak)
            found.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    return np.asarray(found, np.float32).reshape(-1, 4) * scale
