"""A frontal chest radiograph's anatomy as an attenuation map.

Values are line integrals of attenuation in arbitrary units (soft tissue through the
chest about 1): larger means more attenuating, i.e. brighter on the final image.
Components: body soft tissue, lungs (air), heart and mediastinum, aortic knob, trachea
and main bronchi, spine, posterior and anterior ribs, clavicles, scapulae, humeral heads,
diaphragm domes with costophrenic angles, gastric air bubble, breasts, hila and a
vascular tree, and lung texture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .frame import Frame, ellipse_margin, segment_distance, soft


@dataclass(frozen=True, kw_only=True)
class Anatomy:
    """One patient's anatomy (canonical units), drawn by :func:`sample_anatomy`."""

    female: bool
    ap_view: bool
    habitus: float  # soft tissue thickness factor
    thorax_half_width: float  # inner rib cage, at its widest
    lung_centre_v: float  # vertical centre of the lateral wall's ellipse
    lung_half_height: float
    dome_right: float  # v of the right hemidiaphragm's peak (image left)
    dome_left: float
    costophrenic_depth: float
    heart: tuple[float, float, float, float, float]  # cx, cy, rx, ry, tilt
    mediastinum_half_width: float
    rib_gap: float
    rib_curvature: float
    rib_phase: float
    rib_weights: tuple[float, ...]  # visibility of each rib, from the top
    clavicle: tuple[float, float]  # v at the medial end, rise to the lateral end
    gastric_bubble: bool
    vessel_seed: int

    def dome(self, side: int) -> float:
        return self.dome_right if side < 0 else self.dome_left


def sample_anatomy(rng: np.random.Generator, unrecorded_cardiomegaly: bool = True) -> Anatomy:
    """Draw a plausible adult patient; about one film in five is an AP (portable) view.

    With ``unrecorded_cardiomegaly`` (generator version 1) one patient in ten has an
    enlarged heart that no label records; version 2 records cardiomegaly as a finding
    instead and passes False. The same random numbers are drawn either way.
    """
    ap = bool(rng.random() < 0.2)
    dome_right = rng.uniform(0.22, 0.36)
    cardiomegaly = rng.uniform(1.12, 1.3) if rng.random() < 0.1 else 1.0
    if not unrecorded_cardiomegaly:
        cardiomegaly = 1.0
    heart_rx = rng.uniform(0.25, 0.31) * cardiomegaly * (1.1 if ap else 1.0)
    heart_ry = rng.uniform(0.18, 0.23) * (1.05 if ap else 1.0)
    return Anatomy(
        female=bool(rng.random() < 0.5),
        ap_view=ap,
        habitus=rng.uniform(0.8, 1.25),
        thorax_half_width=rng.uniform(0.74, 0.86),
        lung_centre_v=rng.uniform(0.12, 0.2),
        lung_half_height=rng.uniform(0.86, 0.95),
        dome_right=dome_right,
        dome_left=dome_right + rng.uniform(0.02, 0.08),
        costophrenic_depth=rng.uniform(0.12, 0.2),
        heart=(
            rng.uniform(0.07, 0.14),
            dome_right + rng.uniform(-0.1, -0.03),
            heart_rx,
            heart_ry,
            rng.uniform(0.15, 0.45),
        ),
        mediastinum_half_width=rng.uniform(0.08, 0.105),
        rib_gap=rng.uniform(0.115, 0.135),
        rib_curvature=rng.uniform(0.32, 0.48),
        rib_phase=rng.uniform(0.0, 1.0),
        rib_weights=tuple(rng.uniform(0.6, 1.2, 16)),
        clavicle=(rng.uniform(-0.6, -0.52) - (0.06 if ap else 0.0), rng.uniform(0.03, 0.1)),
        gastric_bubble=bool(rng.random() < 0.6),
        vessel_seed=int(rng.integers(2**31)),
    )


@dataclass
class AnatomyMaps:
    """The rendered anatomy: attenuation, and the lung masks lesions are placed in."""

    attenuation: np.ndarray
    lungs: np.ndarray  # 0..1, both lungs, where air is
    lung_right: np.ndarray  # image left
    lung_left: np.ndarray


def render_anatomy(anatomy: Anatomy, frame: Frame, rng: np.random.Generator) -> AnatomyMaps:
    """Render the whole anatomy on ``frame``'s working grid.

    Structures that cover a small part of the image (heart and mediastinum, bones of the
    shoulder girdle, stomach bubble) are evaluated only in their own window.
    """
    u, v = frame.grids
    lung_right, lung_left = _lung(u, v, anatomy, -1), _lung(u, v, anatomy, 1)
    window, heart, centre = _centre(frame, anatomy)
    for lung in (lung_right, lung_left):
        lung[window] *= centre
    lungs = lung_right + lung_left
    attenuation = _body(u, v, anatomy) - 0.55 * lungs * _lung_depth(u, v, anatomy)
    attenuation[window] += (
        0.06 * heart + _spine(*frame.local(window), heart) + _airways(*frame.local(window))
    )
    attenuation += _ribs(u, v, anatomy) * (0.45 + 0.55 * lungs)
    _add_clavicles(attenuation, frame, anatomy)
    _add_shoulders(attenuation, frame, anatomy)
    _add_breasts(attenuation, frame, anatomy)
    _add_gastric_bubble(attenuation, frame, anatomy)
    attenuation += lungs * (_vessels(frame, anatomy) + _texture(rng, frame.res))
    return AnatomyMaps(attenuation, lungs, lung_right, lung_left)


def _centre(frame: Frame, anatomy: Anatomy) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The central window: heart, and the factor (no heart, no mediastinum) that cuts the lungs."""
    cx, cy, rx, ry, _ = anatomy.heart
    window = frame.box_window([(min(cx - rx, -0.2), -1.3), (max(cx + rx, 0.2), 1.3)], 0.06)
    u, v = frame.local(window)
    heart = soft(ellipse_margin(u, v, *anatomy.heart), 0.012)
    return window, heart, (1.0 - heart) * (1.0 - _mediastinum(u, v, anatomy))


def lung_outline(u: np.ndarray, v: np.ndarray, anatomy: Anatomy, side: int) -> np.ndarray:
    """Signed margin of one lung's outer outline (apex and lateral wall): a tilted ellipse."""
    half_width = 0.5 * anatomy.thorax_half_width + 0.05
    centre = side * (anatomy.thorax_half_width - half_width)
    return ellipse_margin(
        u, v, centre, anatomy.lung_centre_v, half_width, anatomy.lung_half_height, side * 0.1
    )


def lateral_wall(v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Half-width of the inner rib cage at height ``v`` (an ellipse, closing at the apex)."""
    z = (v - anatomy.lung_centre_v) / anatomy.lung_half_height
    return anatomy.thorax_half_width * np.sqrt(np.clip(1.0 - z * z, 0.0, 1.0))


def diaphragm(a: np.ndarray, anatomy: Anatomy, side: int) -> np.ndarray:
    """Height of the hemidiaphragm at lateral distance ``a``: a dome peaking mid-lung,
    falling steeply to the costophrenic angle and gently to the heart."""
    peak_a = 0.38 * anatomy.thorax_half_width
    k = anatomy.costophrenic_depth / (anatomy.thorax_half_width - peak_a) ** 2
    return anatomy.dome(side) + np.where(a > peak_a, k, 0.25 * k) * (a - peak_a) ** 2


def _lung(u: np.ndarray, v: np.ndarray, anatomy: Anatomy, side: int) -> np.ndarray:
    a = side * u  # lateral distance on this side
    outer = soft(lung_outline(u, v, anatomy, side), 0.012)
    above_dome = soft(diaphragm(a, anatomy, side) - v, 0.008)
    return outer * above_dome


def _lung_depth(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Air path length through the lung: largest mid-lung, thinner at the edges and the apex."""
    a = np.abs(u) / anatomy.thorax_half_width
    apex = anatomy.lung_centre_v - anatomy.lung_half_height
    towards_apex = np.clip((v - apex) / 0.45, 0.0, 1.0)
    return np.clip(1.0 - 0.9 * (a - 0.5) ** 2, 0.6, 1.0) * (0.55 + 0.45 * towards_apex)


def _mediastinum(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    width = anatomy.mediastinum_half_width + 0.03 * soft(v + 0.1, 0.1)
    band = soft(width - np.abs(u - 0.01), 0.012)
    knob = soft(
        ellipse_margin(
            u, v, anatomy.mediastinum_half_width + 0.005, anatomy.heart[1] - 0.48, 0.055, 0.07
        ),
        0.015,
    )
    return np.maximum(band, knob)


def _body(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Soft tissue: an elliptical chest that widens into the shoulders at the top."""
    chest = (anatomy.thorax_half_width + 0.14) * np.sqrt(
        np.clip(1.0 - ((v - 0.3) / 1.5) ** 2, 0.05, 1.0)
    )
    shoulders = soft(-0.58 - v, 0.06)
    half = chest * (1.0 - shoulders) + 1.25 * shoulders
    thickness = np.sqrt(np.clip(1.0 - (u / half) ** 2, 0.0, 1.0))
    return anatomy.habitus * (0.35 + 0.65 * thickness) * soft(half - np.abs(u), 0.012)


def _add_breasts(out: np.ndarray, frame: Frame, anatomy: Anatomy) -> None:
    if not anatomy.female:
        return
    for side in (-1, 1):
        centre = (side * 0.5, anatomy.dome_right + 0.12)
        window = frame.window(centre, 0.34)
        out[window] += 0.1 * soft(ellipse_margin(*frame.local(window), *centre, 0.3, 0.24), 0.04)


def _spine(u: np.ndarray, v: np.ndarray, heart: np.ndarray) -> np.ndarray:
    column = soft(0.058 - np.abs(u), 0.006)
    endplates = np.cos(np.pi * v / 0.075) ** 8  # bright endplates between vertebral bodies
    pedicles = (
        soft(0.012 - np.abs(np.abs(u) - 0.04), 0.004) * np.cos(np.pi * (v + 0.02) / 0.075) ** 2
    )
    return (0.03 + 0.012 * endplates + 0.02 * pedicles) * column * (1.0 - 0.6 * heart)


def _airways(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    carina = -0.3
    trachea = soft(0.03 - np.abs(u + 0.01), 0.006) * soft(carina - v, 0.01) * soft(v + 1.0, 0.05)
    bronchi = sum(
        soft(0.022 - segment_distance(u, v, (0.0, carina), (s * 0.15, carina + 0.17)), 0.006)
        for s in (-1, 1)
    )
    return -0.1 * np.clip(trachea + bronchi, 0.0, 1.0)


def _rib_band(t: np.ndarray, width: float, weights: tuple[float, ...]) -> np.ndarray:
    """Periodic rib profile: a band of ``width`` (fraction of the period) with bright
    cortices; rib ``k`` (``floor(t)``) is scaled by ``weights[k]``."""
    d = np.abs(t - np.floor(t) - 0.5)  # 0 at the band centre, 0.5 between bands
    inside = soft(width / 2 - d, 0.025)
    cortex = np.exp(-(((width / 2 - d) / 0.05) ** 2))
    rib = np.take(np.asarray(weights, np.float32), np.clip(t.astype(np.int32), 0, len(weights) - 1))
    return (0.6 * inside + 0.4 * cortex * inside) * rib


def _ribs(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    a = np.abs(u)
    wall = lateral_wall(v, anatomy)
    apex = anatomy.lung_centre_v - anatomy.lung_half_height
    region = soft(wall + 0.06 - a, 0.02) * soft(a - 0.06, 0.01) * soft(v - apex + 0.06, 0.02)
    region *= soft(
        0.5 * (anatomy.dome_right + anatomy.dome_left) + anatomy.costophrenic_depth + 0.08 - v, 0.04
    )
    # Posterior ribs leave the spine almost level, then arch down laterally; the spaces
    # between them widen towards the base.
    drop = v - apex + 0.05 * a - anatomy.rib_curvature * 1.9 * (a - 0.05) ** 2
    t_post = (np.clip(drop, 0.0, None) / anatomy.rib_gap) ** 0.9 + anatomy.rib_phase
    # Anterior ribs climb laterally and fade medially, where they become cartilage.
    rise = v - apex + 0.55 * a - 0.15 * a * a
    t_ant = np.clip(rise, 0.0, None) / (anatomy.rib_gap * 1.25) + 0.3 + anatomy.rib_phase
    posterior = 0.085 * _rib_band(t_post, 0.4, anatomy.rib_weights) * soft(drop + 0.03, 0.02)
    anterior = 0.035 * _rib_band(t_ant, 0.34, anatomy.rib_weights[::-1]) * soft(a - 0.28, 0.06)
    return (posterior + anterior) * region


def _add_clavicles(out: np.ndarray, frame: Frame, anatomy: Anatomy) -> None:
    medial_v, rise = anatomy.clavicle
    for side in (-1, 1):
        points = [
            (side * 0.06, medial_v),
            (side * 0.22, medial_v - 0.01),
            (side * 0.42, medial_v - 0.3 * rise),
            (side * 0.62, medial_v - rise),
        ]
        window = frame.box_window(points, 0.04)
        u, v = frame.local(window)
        distance = np.minimum.reduce(
            [segment_distance(u, v, a, b) for a, b in zip(points, points[1:])]
        )
        thickness = 0.024
        bone = soft(thickness - distance, 0.005)
        cortex = np.exp(-(((thickness - distance) / 0.006) ** 2)) * bone
        out[window] += 0.09 * bone + 0.05 * cortex


def _add_shoulders(out: np.ndarray, frame: Frame, anatomy: Anatomy) -> None:
    """Humeral heads and the scapulae."""
    for side in (-1, 1):
        window = frame.window((side * 0.98, -0.74), 0.18)
        out[window] += 0.15 * soft(
            ellipse_margin(*frame.local(window), side * 0.98, -0.74, 0.15, 0.16), 0.01
        )
        window = frame.window((side * 0.8, -0.4), 0.4)
        scapula = ellipse_margin(*frame.local(window), side * 0.8, -0.4, 0.18, 0.36, side * -0.25)
        out[window] += (0.08 if anatomy.ap_view else 0.04) * soft(scapula, 0.015)


def _add_gastric_bubble(out: np.ndarray, frame: Frame, anatomy: Anatomy) -> None:
    """Air in the stomach, under the left hemidiaphragm."""
    if not anatomy.gastric_bubble:
        return
    centre = (0.4, float(diaphragm(np.float32(0.4), anatomy, 1)) + 0.1)
    window = frame.window(centre, 0.1)
    out[window] -= 0.3 * soft(ellipse_margin(*frame.local(window), *centre, 0.09, 0.055), 0.01)


def _vessels(frame: Frame, anatomy: Anatomy) -> np.ndarray:
    """Hila and a branching pulmonary vascular tree, drawn as tapering lines."""
    rng = np.random.default_rng(anatomy.vessel_seed)
    canvas = Image.new("L", (frame.res, frame.res))
    draw = ImageDraw.Draw(canvas)
    px_per_unit = 0.5 * frame.res * frame.scale
    for side in (-1, 1):
        hilum = np.array([side * 0.2, anatomy.heart[1] - 0.18])
        angles = np.linspace(-2.4, 2.4, 7) + rng.normal(0, 0.15, 7)
        starts = np.repeat(hilum[None], 7, axis=0)
        directions = np.stack([side * np.sin(np.abs(angles)), -np.cos(angles) * 0.9], axis=1)
        length, width = 0.2, 0.014 * px_per_unit
        for depth in range(4):
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
            ends = starts + directions * length
            pixels = frame.to_pixels(np.concatenate([starts, ends]))
            for (x0, y0), (x1, y1) in zip(pixels[: len(starts)], pixels[len(starts) :]):
                draw.line([(x0, y0), (x1, y1)], fill=190 - 25 * depth, width=max(1, round(width)))
            turns = rng.uniform(-0.6, 0.6, (len(ends), 2)).reshape(-1)
            starts, directions = (
                np.repeat(ends, 2, axis=0),
                _rotate(np.repeat(directions, 2, axis=0), turns),
            )
            length, width = length * rng.uniform(0.6, 0.8), width * 0.7
        hx, hy = frame.to_pixels(hilum[None])[0]
        r = 0.06 * px_per_unit
        draw.ellipse([hx - r, hy - 1.5 * r, hx + r, hy + 1.5 * r], fill=150)
    blurred = canvas.filter(ImageFilter.GaussianBlur(max(0.6, frame.res / 500)))
    return np.asarray(blurred, np.float32) * np.float32(0.09 / 255.0)


def _rotate(vectors: np.ndarray, angles: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angles), np.sin(angles)
    return np.stack(
        [cos * vectors[:, 0] - sin * vectors[:, 1], sin * vectors[:, 0] + cos * vectors[:, 1]],
        axis=1,
    )


def _texture(rng: np.random.Generator, res: int) -> np.ndarray:
    """Band-limited parenchymal texture: coarse and fine noise, upsampled."""
    out = np.zeros((res, res), np.float32)
    for cells, amplitude in ((12, 0.03), (48, 0.012)):
        noise = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode="F")
        out += amplitude * np.asarray(noise.resize((res, res), Image.BICUBIC), np.float32)
    return out
