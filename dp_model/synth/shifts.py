"""Near-out-of-distribution phantoms: what a chest X-ray model meets that it was not trained on.

Each *shift* renders radiographs that differ from the generator's in one way a site can
produce: another view (lateral), another patient (paediatric proportions), another processing
(look-up curve, heavy edge enhancement), a film fed wrongly (rotated, cropped, polarity
inverted: a MONOCHROME1 / MONOCHROME2 mix-up, PS3.3 C.7.6.3.1.2) or another examination
altogether (a CT scout: long, chest to pelvis). The generator's own images are never
changed: every shift draws from its own random streams, tagged by its name, so image ``i``
of a shift depends only on ``(config.seed, shift, i)`` and the settings.

The images are for measuring out-of-distribution detectors (``benchmarks/ood_benchmark.py``);
they are caricatures of the real shifts, close enough to ask whether a detector notices a
change of view, patient, processing or orientation, not a model of any vendor's images.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from .anatomy import Anatomy, _body, _spine, _texture, render_anatomy, sample_anatomy
from .config import SynthConfig
from .frame import Frame, ellipse_margin, soft
from .lesions import LESIONS, Scene, distractors
from .render import MAX_WORK_RES, _resize, _sample_class, _smooth, form_image, render_case

__all__ = ["SHIFTS", "render_shifted"]

#: The shifts, and what each changes.
SHIFTS = {
    "lateral": "a lateral view: one superimposed lung field, the heart anterior, the spine posterior",
    "paediatric": "a child's proportions: a large heart and thymus, short wide thorax, horizontal ribs, small on the detector",
    "lut": "another look-up curve: a clipped linear window, histogram equalisation or a strong gamma instead of the sigmoid",
    "edge": "heavy edge enhancement: unsharp masking at 5-10 times the generator's gain, at two scales",
    "rotated": "a film rotated by 90, 180 or 270 degrees, or tilted by 20 to 45 degrees",
    "cropped": "a detail: 35 to 60 % of the film's side, letterboxed to the model's input",
    "inverted": "polarity inverted, as a MONOCHROME1 image read as MONOCHROME2",
    "ct_scout": "a CT scout (topogram): 2.3 times as tall as wide, chest to pelvis, linear display, no processing",
}


def render_shifted(config: SynthConfig, index: int, shift: str) -> np.ndarray:
    """Image ``index`` of ``shift``: ``(rows, columns)`` float32 in ``[0, 1]``, larger brighter
    (square but for ``cropped`` and ``ct_scout``)."""
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {', '.join(SHIFTS)}, got {shift!r}")
    rng = np.random.default_rng([config.seed, 77, list(SHIFTS).index(shift), index])
    if shift in ("rotated", "cropped", "inverted"):
        # The generator's own image of another seed, fed wrongly.
        pixels = render_case(replace(config, seed=_seed(config, shift)), index).pixels
        return _FILM[shift](pixels, rng)
    return _RENDER[shift](config, rng)


def _seed(config: SynthConfig, shift: str) -> int:
    """A seed of the generator no training set of ``config`` uses (one per shift)."""
    return config.seed + 1_000_003 * (1 + list(SHIFTS).index(shift))


# --- whole-film changes ------------------------------------------------------------------------


def _rotated(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return np.ascontiguousarray(np.rot90(pixels, int(rng.integers(1, 4))))
    angle = float(rng.uniform(20.0, 45.0) * rng.choice([-1.0, 1.0]))
    return np.asarray(
        Image.fromarray(pixels, mode="F").rotate(angle, Image.BILINEAR, fillcolor=0.0), np.float32
    )


def _cropped(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = pixels.shape[0]
    rows, cols = (int(size * rng.uniform(0.35, 0.6)) for _ in range(2))
    top, left = int(rng.integers(0, size - rows + 1)), int(rng.integers(0, size - cols + 1))
    return np.ascontiguousarray(pixels[top : top + rows, left : left + cols])


def _inverted(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (1.0 - pixels).astype(np.float32)


_FILM = {"rotated": _rotated, "cropped": _cropped, "inverted": _inverted}


# --- other anatomy, other processing -------------------------------------------------------------


def _frontal(
    config: SynthConfig, rng: np.random.Generator, anatomy: Anatomy, frame: Frame
) -> np.ndarray:
    """The attenuation of a frontal chest with ``anatomy`` on ``frame``, with a lesion of a class
    drawn as the generator draws it and its distractors (no label is recorded)."""
    scene = Scene(anatomy, render_anatomy(anatomy, frame, rng), frame)
    label = _sample_class(rng, config)
    density = config.difficulty.lesion_contrast * float(
        np.exp(rng.normal(0, config.difficulty.contrast_spread))
    )
    opacities = (LESIONS[label](scene, rng, density) if label in LESIONS else []) + distractors(
        scene, rng, int(rng.poisson(config.difficulty.distractor_rate))
    )
    attenuation = scene.maps.attenuation
    for opacity in opacities:
        attenuation[opacity.window] += opacity.layer
    return attenuation


def _default_frame(config: SynthConfig, rng: np.random.Generator) -> Frame:
    res = min(config.size, MAX_WORK_RES)
    return Frame(
        res,
        scale=rng.uniform(1.0, 1.12),
        angle=rng.normal(0, 0.035),
        shift=(rng.normal(0, 0.025), rng.normal(0.07, 0.03)),
    )


def _paediatric(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    adult = sample_anatomy(rng)
    cx, cy, rx, ry, tilt = adult.heart
    child = replace(
        adult,
        female=False,
        habitus=rng.uniform(0.5, 0.7),
        lung_half_height=adult.lung_half_height * rng.uniform(0.74, 0.82),
        lung_centre_v=adult.lung_centre_v - 0.05,
        dome_right=adult.dome_right - 0.12,
        dome_left=adult.dome_left - 0.12,
        heart=(cx, cy - 0.1, rx * rng.uniform(1.3, 1.45), ry * rng.uniform(1.15, 1.3), tilt * 0.5),
        mediastinum_half_width=adult.mediastinum_half_width * rng.uniform(1.6, 2.0),  # the thymus
        rib_curvature=adult.rib_curvature * 0.35,
        rib_gap=adult.rib_gap * 0.85,
        clavicle=(adult.clavicle[0] + 0.08, 0.0),
    )
    res = min(config.size, MAX_WORK_RES)
    frame = Frame(
        res,
        scale=rng.uniform(0.62, 0.8),
        angle=rng.normal(0, 0.05),
        shift=(rng.normal(0, 0.04), rng.normal(0.0, 0.05)),
    )
    return form_image(_frontal(config, rng, child, frame), config.size, rng)


def _lateral(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """A lateral chest: ``u`` runs from anterior (image left) to posterior, ``v`` from the top."""
    res = min(config.size, MAX_WORK_RES)
    frame = Frame(
        res,
        scale=rng.uniform(0.95, 1.1),
        angle=rng.normal(0, 0.04),
        shift=(rng.normal(0, 0.03), rng.normal(0.05, 0.03)),
    )
    u, v = frame.grids
    depth = rng.uniform(0.5, 0.62)  # half the chest's front-to-back depth
    dome = rng.uniform(0.25, 0.38)
    body = soft(depth + 0.08 * soft(v - 0.4, 0.2) - np.abs(u - 0.02), 0.015) * soft(v + 0.95, 0.05)
    lung = soft(ellipse_margin(u, v, 0.05, dome - 0.55, depth * 0.82, 0.85), 0.015) * soft(
        dome + 0.12 * (u - 0.1) ** 2 * 4 - v, 0.01
    )
    heart = soft(
        ellipse_margin(
            u, v, -0.2, dome - 0.12, rng.uniform(0.25, 0.32), rng.uniform(0.22, 0.28), 0.4
        ),
        0.015,
    )
    lung = lung * (1.0 - heart)
    attenuation = rng.uniform(1.3, 1.6) * body - 0.75 * lung + 0.05 * heart
    column = soft(0.09 - np.abs(u - depth * 0.72), 0.008)
    # vertebral bodies, through the lung
    attenuation += (0.2 + 0.08 * np.cos(np.pi * v / 0.09) ** 8) * column * soft(v + 0.9, 0.04)
    # sternum
    attenuation += (
        0.06
        * soft(0.025 - np.abs(u + depth * 0.92), 0.006)
        * soft(dome + 0.2 - v, 0.03)
        * soft(v + 0.5, 0.03)
    )
    # trachea
    attenuation -= 0.12 * soft(0.035 - np.abs(u - 0.08 + 0.1 * v), 0.008) * soft(-0.25 - v, 0.02)
    ribs = np.cos(np.pi * (v + 0.6 * u * u) / rng.uniform(0.11, 0.14)) ** 12 * lung
    attenuation += 0.03 * ribs + lung * _texture(rng, res)
    return form_image(attenuation.astype(np.float32), config.size, rng)


def _processed(
    attenuation: np.ndarray, size: int, rng: np.random.Generator, curve: str, edge_gain: float
) -> np.ndarray:
    """:func:`~dp_model.synth.render.form_image` with another edge gain and display curve:
    ``sigmoid`` (the generator's), ``linear`` (a window that clips), ``equalised`` or ``gamma``."""
    coarse, fine = _smooth(attenuation, 24), _smooth(attenuation, 4)
    processed = attenuation - rng.uniform(0.3, 0.6) * (coarse - float(coarse.mean()))
    processed += edge_gain * (attenuation - fine) + 0.5 * edge_gain * (
        attenuation - _smooth(attenuation, 12)
    )
    if curve == "linear":
        low, high = np.percentile(processed, [rng.uniform(15, 35), rng.uniform(65, 85)])
        display = np.clip((processed - low) / max(high - low, 1e-6), 0.0, 1.0)
    elif curve == "equalised":
        ranks = np.argsort(np.argsort(processed, axis=None)).reshape(processed.shape)
        display = ranks.astype(np.float32) / processed.size
    else:
        centre, width = float(np.percentile(processed, 60)), rng.uniform(0.14, 0.26)
        display = 1.0 / (1.0 + np.exp(-(processed - centre) / width))
        display = (display - display.min()) / max(float(np.ptp(display)), 1e-6)
        if curve == "gamma":
            display = display ** rng.choice([0.35, 2.8])
    full = np.array(
        _resize(display.astype(np.float32), size) if size != display.shape[0] else display,
        np.float32,
    )
    full += rng.normal(0, 0.01, full.shape).astype(np.float32)
    return np.clip(full, 0.0, 1.0).astype(np.float32)


def _lut(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    attenuation = _frontal(config, rng, sample_anatomy(rng), _default_frame(config, rng))
    return _processed(
        attenuation,
        config.size,
        rng,
        str(rng.choice(["linear", "equalised", "gamma"])),
        rng.uniform(0.1, 0.6),
    )


def _edge(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    attenuation = _frontal(config, rng, sample_anatomy(rng), _default_frame(config, rng))
    return _processed(attenuation, config.size, rng, "sigmoid", rng.uniform(3.0, 6.0))


def _ct_scout(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """A frontal topogram: the chest at the top of a square working grid 2.3 times the
    image's width, the abdomen and pelvis below it, displayed linearly; the central
    columns are the image."""
    width = min(config.size, MAX_WORK_RES) // 2
    res = int(round(width * 2.3))
    anatomy = replace(sample_anatomy(rng), female=False)
    scale = rng.uniform(0.36, 0.42)
    frame = Frame(
        res,
        scale=scale,
        angle=rng.normal(0, 0.01),
        shift=(rng.normal(0, 0.01), -1.0 + scale * 1.05),
    )
    attenuation = render_anatomy(anatomy, frame, rng).attenuation
    u, v = frame.grids
    below = soft(v - 0.55, 0.15)
    half = anatomy.thorax_half_width + 0.16 + 0.12 * soft(v - 2.3, 0.3)
    abdomen = (
        anatomy.habitus
        * (0.35 + 0.65 * np.sqrt(np.clip(1.0 - (u / half) ** 2, 0.0, 1.0)))
        * soft(half - np.abs(u), 0.012)
    )
    attenuation += below * np.clip(abdomen - _body(u, v, anatomy), 0.0, None)
    attenuation += below * _spine(u, v, np.zeros_like(u))
    for side in (-1.0, 1.0):
        # iliac wings
        attenuation += 0.1 * soft(
            ellipse_margin(u, v, side * 0.45, 2.55, 0.33, 0.28, side * 0.4), 0.02
        )
        # femoral heads
        attenuation += 0.14 * soft(ellipse_margin(u, v, side * 0.6, 3.05, 0.13, 0.13), 0.01)
    for _ in range(int(rng.integers(6, 14))):  # bowel gas
        centre = (rng.uniform(-0.6, 0.6), rng.uniform(1.0, 2.5))
        attenuation -= 0.15 * soft(
            ellipse_margin(u, v, *centre, rng.uniform(0.04, 0.12), rng.uniform(0.03, 0.08)), 0.02
        )
    low, high = np.percentile(attenuation, [1.0, 99.5])
    display = np.clip((attenuation - low) / max(high - low, 1e-6), 0.0, 1.0)
    display = _smooth(display.astype(np.float32), 2)  # a scout's coarse sampling
    left = (res - width) // 2
    strip = display[:, left : left + width]
    rows, cols = config.size, max(8, int(round(config.size * width / res)))
    image = np.array(
        Image.fromarray(np.ascontiguousarray(strip), mode="F").resize((cols, rows), Image.BICUBIC),
        np.float32,
    )
    image += rng.normal(0, 0.004, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


_RENDER = {
    "lateral": _lateral,
    "paediatric": _paediatric,
    "lut": _lut,
    "edge": _edge,
    "ct_scout": _ct_scout,
}
