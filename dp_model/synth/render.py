"""One synthetic case: a patient, a class, an image formed as a detector would, boxes.

Image ``i`` of a configuration depends only on ``(seed, i)`` and the settings, so any
subset can be regenerated, in any order, by any number of workers. A patient's
anatomy depends on ``(seed, patient)``: follow-up images of a patient share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import detector, findings
from .anatomy import render_anatomy, sample_anatomy
from .config import CLASSES, SynthConfig
from .frame import Frame
from .frame import resize as _resize
from .frame import smooth as _smooth
from .frame import upsample_nearest as _upsample_nearest
from .lesions import LESIONS, Opacity, Scene, distractors

#: Attenuation per unit of the maps, for the detector's exponential law.
MU = 2.0
#: Working grid: smooth anatomy is rendered here and upsampled; detail and noise are
#: added at full resolution.
MAX_WORK_RES = 384


@dataclass(kw_only=True)
class Case:
    """A rendered image and everything recorded about it.

    Attributes:
        index: position in the dataset.
        patient: patient number (several images may share one).
        label: the true class.
        recorded_label: the class written to the dataset (differs under label noise).
        pixels: ``(size, size)`` float32 in [0, 1], larger brighter.
        boxes: ``(N, 4)`` recorded boxes in pixels (empty when the label says normal).
        true_boxes: boxes of every lesion actually rendered, recorded or not.
        info: patient and acquisition details (sex, age, view, lesion density, ...).
    """

    index: int
    patient: int
    label: str
    recorded_label: str
    pixels: np.ndarray
    boxes: np.ndarray
    true_boxes: np.ndarray
    info: dict = field(default_factory=dict)


def patient_of(index: int, config: SynthConfig) -> int:
    """Consecutive images share a patient; on average ``1 / patients_per_image`` each."""
    return int(np.floor(index * config.patients_per_image))


def render_case(config: SynthConfig, index: int) -> Case:
    """Render image ``index`` of the dataset described by ``config``, with its generator version."""
    return _render_v1(config, index) if config.version == 1 else _render_v2(config, index)


def _render_v2(config: SynthConfig, index: int) -> Case:
    """Version 2: see :mod:`.detector` and :mod:`.findings` for what changed and why."""
    rng = np.random.default_rng([config.seed, 1, index])
    patient = patient_of(index, config)
    patient_rng = np.random.default_rng([config.seed, 2, patient])
    anatomy = sample_anatomy(patient_rng, unrecorded_cardiomegaly=False)
    label = _sample_class(rng, config)
    difficulty = config.difficulty
    abnormal = findings.draw_abnormalities(rng, difficulty.abnormality_rate)
    if "cardiomegaly" in abnormal:
        anatomy = findings.enlarged_heart(anatomy, rng)
    res = min(config.size, MAX_WORK_RES)
    frame = Frame(
        res,
        scale=rng.uniform(1.0, 1.12),
        angle=rng.normal(0, 0.035),
        shift=(rng.normal(0, 0.025), rng.normal(0.07, 0.03)),
    )
    scene = Scene(anatomy, render_anatomy(anatomy, frame, patient_rng), frame)
    anatomy_only = scene.maps.attenuation.copy()
    density = difficulty.lesion_contrast * float(np.exp(rng.normal(0, difficulty.contrast_spread)))
    lesions = findings.pneumonia(label, scene, rng, density) if label in findings.PATTERNS else []
    extra = []
    if lesions and rng.random() < difficulty.pathology_overlap:  # a faint, unrecorded second type
        extra = findings.pneumonia(
            str(rng.choice([k for k in findings.PATTERNS if k != label])), scene, rng, 0.4 * density
        )
        for opacity in extra:
            opacity.boxed = False
    others = [
        o
        for name in abnormal
        if name in findings.ABNORMAL_OPACITIES
        for o in findings.ABNORMAL_OPACITIES[name](scene, rng)
    ]
    clutter = findings.distractors(scene, rng, int(rng.poisson(difficulty.distractor_rate)))
    attenuation = scene.maps.attenuation
    for opacity in (*lesions, *extra, *others, *clutter):
        attenuation[opacity.window] += opacity.layer
    acquisition = detector.acquire(rng, anatomy)
    pixels = detector.form_image(attenuation, anatomy_only, config.size, acquisition, rng)
    true_boxes = _boxes(lesions, res, config.size, rng)
    recorded, boxes = _record(rng, label, true_boxes, difficulty.label_noise)
    if rng.random() < 0.3:
        _burn_marker(pixels, rng)
    info = dict(
        sex="F" if anatomy.female else "M",
        age=int(patient_rng.integers(18, 90)),
        view="AP" if anatomy.ap_view else "PA",
        lesion_density=round(density, 4) if lesions else 0.0,
        distractors=len(clutter),
        abnormalities=list(abnormal),
        device=acquisition.device.name,
    )
    return Case(
        index=index,
        patient=patient,
        label=label,
        recorded_label=recorded,
        pixels=pixels,
        boxes=boxes,
        true_boxes=true_boxes,
        info=info,
    )


def _render_v1(config: SynthConfig, index: int) -> Case:
    """Version 1, kept bit for bit: the data of the published tables."""
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
    attenuation = scene.maps.attenuation
    for opacity in (*lesions, *extra, *clutter):
        attenuation[opacity.window] += opacity.layer
    pixels = form_image(attenuation, config.size, rng)
    true_boxes = _boxes(lesions, res, config.size, rng)
    recorded, boxes = _record(rng, label, true_boxes, difficulty.label_noise)
    if rng.random() < 0.3:
        _burn_marker(pixels, rng)
    info = dict(
        sex="F" if anatomy.female else "M",
        age=int(patient_rng.integers(18, 90)),
        view="AP" if anatomy.ap_view else "PA",
        lesion_density=round(density, 4) if lesions else 0.0,
        distractors=len(clutter),
    )
    return Case(
        index=index,
        patient=patient,
        label=label,
        recorded_label=recorded,
        pixels=pixels,
        boxes=boxes,
        true_boxes=true_boxes,
        info=info,
    )


def _sample_class(rng: np.random.Generator, config: SynthConfig) -> str:
    weights = np.asarray(config.class_weights, np.float64)
    return CLASSES[int(rng.choice(len(CLASSES), p=weights / weights.sum()))]


def _overlap(
    scene: Scene, rng: np.random.Generator, label: str, density: float, probability: float
) -> list[Opacity]:
    """A faint, unrecorded lesion of another type: real patients rarely show one pattern only."""
    if label not in LESIONS or rng.random() >= probability:
        return []
    other = rng.choice([name for name in LESIONS if name != label])
    faint = LESIONS[other](scene, rng, 0.4 * density)
    for opacity in faint:
        opacity.boxed = False
    return faint


def form_image(attenuation: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Detector and processing: CR/DR-style processing, a tone curve, quantum noise; ``[0, 1]`` out.

    Processing compresses the dynamic range (large-scale variation damped, as vendors'
    processing does so that lungs and mediastinum fit one window) and enhances edges.
    The noise follows the detector's physics: fewer photons reach it behind dense
    tissue, so the mediastinum and abdomen are noisier than the lungs. All smooth work
    happens on the working grid; at full resolution there is one resize and the noise.
    """
    res = attenuation.shape[0]
    coarse, fine = _smooth(attenuation, 24), _smooth(attenuation, 4)
    processed = attenuation - rng.uniform(0.3, 0.6) * (coarse - float(coarse.mean()))
    processed += rng.uniform(0.1, 0.6) * (attenuation - fine)
    centre = float(np.percentile(processed, 60)) + rng.uniform(-0.08, 0.08)
    width = rng.uniform(0.14, 0.26)
    display = 1.0 / (1.0 + np.exp(-(processed - centre) / width))
    low, high = np.percentile(display, [0.5, 99.8])
    scale = 1.0 / max(high - low, 1e-3)
    # Noise: std in attenuation units from the photon count, through the tone curve's slope.
    photons = rng.uniform(1500.0, 5000.0) * (1024.0 / size) ** 2
    sigma = (1.0 / MU) / np.sqrt(photons * np.exp(-MU * np.clip(attenuation, 0.0, None)))
    sigma *= display * (1.0 - display) / width * scale
    full = _resize(display, size) if size != res else display
    full = (full - low) * scale
    noise = rng.standard_normal(full.shape, dtype=np.float32)
    noise *= _upsample_nearest(sigma.astype(np.float32), size)
    full += noise
    return np.clip(full, 0.0, 1.0, out=full).astype(np.float32, copy=False)


def _boxes(lesions: list[Opacity], res: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boxes of the visible lesions, in output pixels, drawn loosely as a person would."""
    out = []
    for lesion in lesions:
        box = lesion.box()
        if box is None:
            continue
        x0, y0, x1, y1 = np.array(box, np.float64) * (size / res)
        w, h = x1 - x0, y1 - y0
        grow = rng.uniform(-0.04, 0.12, 4) * np.array([w, h, w, h])
        x0, y0, x1, y1 = x0 - grow[0], y0 - grow[1], x1 + grow[2], y1 + grow[3]
        out.append(
            [max(0.0, round(x0)), max(0.0, round(y0)), min(size, round(x1)), min(size, round(y1))]
        )
    return np.asarray(out, np.float32).reshape(-1, 4)


def _record(
    rng: np.random.Generator, label: str, boxes: np.ndarray, noise: float
) -> tuple[str, np.ndarray]:
    """Label noise as readers make it: confused types, missed lesions, over-called normals."""
    if rng.random() >= noise:
        return label, boxes
    recorded = CLASSES[int(rng.choice([i for i, name in enumerate(CLASSES) if name != label]))]
    if recorded == CLASSES[0]:
        return recorded, np.zeros((0, 4), np.float32)  # a missed lesion: no box either
    if label == CLASSES[0]:
        return recorded, np.zeros((0, 4), np.float32)  # over-called: nothing was outlined
    return recorded, boxes  # the right place, the wrong type


def _burn_marker(pixels: np.ndarray, rng: np.random.Generator) -> None:
    """A burned-in laterality marker, as many real films carry."""
    size = pixels.shape[0]
    font = ImageFont.load_default(size=max(10, size // 22))
    canvas = Image.new("L", (size, size))
    x = rng.uniform(0.03, 0.1) * size
    ImageDraw.Draw(canvas).text((x, rng.uniform(0.03, 0.1) * size), "R", fill=255, font=font)
    mark = np.asarray(canvas, np.float32) / 255.0
    np.maximum(pixels, mark * rng.uniform(0.85, 1.0), out=pixels)
