"""Generator version 2's findings: pneumonia that differs by pattern only, abnormalities that
are not pneumonia, and distractors that any image may carry.

In version 1 each pneumonia type had its own density, size and zone (a lobar
consolidation was large, dense and low; a cavity small and high), so a block's mean
and spread could tell the types apart without seeing either pattern. Here every focus,
whatever its type, draws its extent, density, zone and heterogeneity from the same
ranges (each type leans to its usual zone, but the ranges overlap); only the pattern
inside differs:

* lobar: homogeneous consolidation with one straight fissure edge and air bronchograms;
* bronchopneumonia: a cluster of fluffy acinar nodules;
* interstitial: a reticular net over ground glass;
* cavitary: consolidation around a thick-walled cavity, sometimes with an air-fluid level.

Each pattern is scaled so that its mean density over its extent is the drawn density.

Abnormalities that are not pneumonia (the RSNA challenge's "No Lung Opacity / Not
Normal"): cardiomegaly, a pleural effusion blunting a costophrenic angle, a solitary
nodule, a band of atelectasis, a device (a pacemaker and its lead). Distractors (calcified granulomas, nipple shadows, ECG
electrodes and their wires) are normal findings and appear in every class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .anatomy import Anatomy, lateral_wall
from .frame import ellipse_margin, segment_distance, soft
from .lesions import Opacity, Scene, _bronchograms, _disc, _electrode, _granuloma, _nipples, _noise

#: Mean density of a focus per unit of ``Difficulty.lesion_contrast``.
DENSITY = 0.3
#: Extent (half-size, canonical units) of a focus: log-uniform over this range, every type.
EXTENT = (0.08, 0.2)
#: Where each type leans: half its foci fall in this vertical band of the lung (0 apex,
#: 1 base), the other half anywhere from 0.15 to 0.85.
ZONES = {
    "lobar": (0.5, 0.85),
    "bronchopneumonia": (0.5, 0.85),
    "interstitial": (0.35, 0.85),
    "cavitary": (0.15, 0.5),
}
#: Chance of a second focus, by type.
SECOND_FOCUS = {"lobar": 0.2, "bronchopneumonia": 0.35, "interstitial": 0.45, "cavitary": 0.25}


@dataclass(frozen=True)
class Focus:
    """Where a focus is and how it looks, drawn from ranges every type shares."""

    side: int
    centre: tuple[float, float]
    extent: float
    density: float
    heterogeneity: float  # 0: smooth inside, 1: patchy


def draw_focus(scene: Scene, rng: np.random.Generator, kind: str, density: float) -> Focus:
    side = -1 if rng.random() < 0.5 else 1
    band = ZONES[kind] if rng.random() < 0.5 else (0.15, 0.85)
    zone = rng.uniform(*band)
    centre = scene.point(rng, side, (max(0.05, zone - 0.05), min(0.95, zone + 0.05)))
    extent = float(np.exp(rng.uniform(np.log(EXTENT[0]), np.log(EXTENT[1]))))
    return Focus(
        side, centre, extent, DENSITY * density * rng.uniform(0.75, 1.25), rng.uniform(0.0, 1.0)
    )


def pneumonia(kind: str, scene: Scene, rng: np.random.Generator, density: float) -> list[Opacity]:
    """The foci of one pneumonia ``kind``: one, sometimes two."""
    count = 2 if rng.random() < SECOND_FOCUS[kind] else 1
    return [PATTERNS[kind](scene, rng, draw_focus(scene, rng, kind, density)) for _ in range(count)]


def _frame_focus(
    scene: Scene, focus: Focus, reach: float = 1.5
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    window = scene.frame.window(focus.centre, reach * focus.extent + 0.04)
    u, v = scene.frame.local(window)
    return window, u, v


def _scaled(
    scene: Scene, window, region: np.ndarray, pattern: np.ndarray, density: float
) -> Opacity:
    """``pattern`` inside ``region``, confined to the lungs, scaled to mean ``density`` over
    the box a reader would draw around it: every type adds the same density to its box on
    average, whatever its pattern."""
    opacity = Opacity(window, scene.confine(window, region * pattern))
    box = opacity.box()
    if box is None:
        return opacity
    x0, y0, x1, y1 = (int(b) for b in box)
    mean = float(
        opacity.layer[
            y0 - window[0].start : y1 - window[0].start, x0 - window[1].start : x1 - window[1].start
        ].mean()
    )
    opacity.layer *= np.float32(density / mean)
    return opacity


def _cells(focus: Focus, period: float) -> int:
    """Feature count across a focus's window for features ``period`` canonical units apart."""
    return max(2, int(round(2 * (1.5 * focus.extent + 0.04) / period)))


def lobar(scene: Scene, rng: np.random.Generator, focus: Focus) -> Opacity:
    window, u, v = _frame_focus(scene, focus)
    cu, cv = focus.centre
    rx, ry = focus.extent * rng.uniform(0.9, 1.2), focus.extent * rng.uniform(0.75, 1.05)
    region = soft(ellipse_margin(u, v, cu, cv, rx, ry, rng.uniform(-0.5, 0.5)), 0.15 * focus.extent)
    # a fissure: one sharp straight edge
    slope, upper = rng.uniform(-0.35, 0.35), rng.random() < 0.5
    fissure = (
        (cv + 0.5 * ry + slope * (u - cu)) - v if upper else v - (cv - 0.5 * ry + slope * (u - cu))
    )
    region = region * soft(fissure, 0.004)
    mottling = 0.8 + 0.35 * focus.heterogeneity * _noise(rng, u.shape, _cells(focus, 0.08))
    bronchi = _bronchograms(rng, scene.frame, window, focus.centre, max(rx, ry), width_units=0.012)
    return _scaled(scene, window, region, mottling * (1.0 - 0.5 * bronchi), focus.density)


def bronchopneumonia(scene: Scene, rng: np.random.Generator, focus: Focus) -> Opacity:
    window, u, v = _frame_focus(scene, focus)
    cu, cv = focus.centre
    total = np.zeros(u.shape, np.float32)
    radius_range = (0.028, 0.048)
    count = int(
        round(
            rng.uniform(0.8, 1.2) * (focus.extent / 0.038) ** 2 * (1.5 - 0.7 * focus.heterogeneity)
        )
    )
    for _ in range(max(5, count)):
        bu, bv = cu + rng.normal(0, 0.55 * focus.extent), cv + rng.normal(0, 0.45 * focus.extent)
        radius = rng.uniform(*radius_range)
        total += np.exp(-((u - bu) ** 2 + (v - bv) ** 2) / radius**2) * rng.uniform(0.6, 1.0)
    fluffy = 1.0 - np.exp(-1.6 * total)  # overlapping nodules merge, without exceeding solid
    region = soft(
        ellipse_margin(u, v, cu, cv, 1.3 * focus.extent, 1.1 * focus.extent), 0.2 * focus.extent
    )
    return _scaled(
        scene, window, region, 0.25 * (1.0 - focus.heterogeneity) + fluffy, focus.density
    )


def interstitial(scene: Scene, rng: np.random.Generator, focus: Focus) -> Opacity:
    window, u, v = _frame_focus(scene, focus)
    cu, cv = focus.centre
    region = soft(
        ellipse_margin(
            u, v, cu, cv, focus.extent * rng.uniform(1.0, 1.3), focus.extent * rng.uniform(1.0, 1.3)
        ),
        0.25 * focus.extent,
    )
    # A net of lines where band-limited noise crosses zero, over a ground-glass haze.
    net = soft(0.18 - np.abs(_noise(rng, u.shape, _cells(focus, 0.085))), 0.05)
    haze = 0.7 + 0.3 * _noise(rng, u.shape, _cells(focus, 0.2))
    weight = 0.3 + 0.4 * focus.heterogeneity
    return _scaled(scene, window, region, weight * net + (1.0 - weight) * haze, focus.density)


def cavitary(scene: Scene, rng: np.random.Generator, focus: Focus) -> Opacity:
    window, u, v = _frame_focus(scene, focus)
    cu, cv = focus.centre
    radius = focus.extent * rng.uniform(0.45, 0.7)
    wall = radius * rng.uniform(0.3, 0.45)
    angle = np.arctan2(v - cv, u - cu)
    wobble = 1.0 + sum(
        rng.uniform(-0.08, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    d = np.hypot(u - cu, (v - cv) * rng.uniform(0.85, 1.15)) / wobble
    outer, lumen = soft(radius - d, 0.004), soft(radius - wall - d, 0.004)
    region = soft(
        ellipse_margin(u, v, cu, cv, focus.extent * 1.15, focus.extent), 0.2 * focus.extent
    )
    halo = 0.45 + 0.3 * (1.0 - focus.heterogeneity)
    pattern = halo * (1.0 - outer) + (outer - lumen) * (
        0.85 + 0.15 * _noise(rng, u.shape, _cells(focus, 0.06))
    )
    if rng.random() < 0.4:  # an air-fluid level: gravity keeps it horizontal
        level = cv + rng.uniform(-0.3, 0.5) * (radius - wall)
        pattern = pattern + 0.85 * lumen * soft(v - level, 0.002)
    return _scaled(scene, window, np.maximum(region, outer), pattern, focus.density)


#: Pneumonia patterns by class name; "normal" has none.
PATTERNS: dict[str, Callable[[Scene, np.random.Generator, Focus], Opacity]] = {
    "lobar": lobar,
    "bronchopneumonia": bronchopneumonia,
    "interstitial": interstitial,
    "cavitary": cavitary,
}


# --- abnormal, not pneumonia ----------------------------------------------------------------------

#: Abnormalities that are not pneumonia, and how often each is the one drawn.
ABNORMALITIES = ("cardiomegaly", "effusion", "nodule", "atelectasis", "pacemaker")
ABNORMALITY_WEIGHTS = (0.25, 0.25, 0.2, 0.15, 0.15)


def draw_abnormalities(rng: np.random.Generator, rate: float) -> tuple[str, ...]:
    """None, with probability ``1 - rate``; else one abnormality, sometimes two."""
    if rng.random() >= rate:
        return ()
    count = 2 if rng.random() < 0.2 else 1
    picks = rng.choice(len(ABNORMALITIES), size=count, replace=False, p=ABNORMALITY_WEIGHTS)
    return tuple(ABNORMALITIES[i] for i in sorted(picks))


def enlarged_heart(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Cardiomegaly: the heart widened to a cardiothoracic ratio of 0.53 to 0.62 (above 0.5
    is enlarged), the chest measured at the inner rib cage at the height of the domes."""
    cx, cy, rx, ry, tilt = anatomy.heart
    chest = float(lateral_wall(np.float32(anatomy.dome_right), anatomy))
    wider = max(rx, rng.uniform(0.53, 0.62) * chest)
    return replace(anatomy, heart=(cx, cy, wider, ry * (1.0 + 0.5 * (wider / rx - 1.0)), tilt))


def effusion(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    """Fluid in the pleural space: the costophrenic angle blunted under a meniscus that
    climbs the lateral wall (one side, sometimes both)."""
    sides = [-1, 1] if rng.random() < 0.25 else [int(rng.choice([-1, 1]))]
    out = []
    anatomy = scene.anatomy
    for side in sides:
        angle_v = anatomy.dome(side) + anatomy.costophrenic_depth
        height = rng.uniform(0.08, 0.22)
        top = angle_v - height - 0.1
        window = scene.frame.box_window(
            [(side * 0.1, top), (side * (anatomy.thorax_half_width + 0.05), angle_v + 0.05)], 0.03
        )
        u, v = scene.frame.local(window)
        a = np.clip(side * u / anatomy.thorax_half_width, 0.0, 1.0)
        meniscus = angle_v - height * (0.25 + 0.75 * a**3)
        fluid = soft(v - meniscus, 0.012) * rng.uniform(0.35, 0.5)
        out.append(Opacity(window, scene.confine(window, fluid), boxed=False))
    return out


def nodule(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    """A solitary pulmonary nodule, larger and denser than a distractor's faint one."""
    centre = scene.point(rng, int(rng.choice([-1, 1])), (0.15, 0.85))
    return [_disc(scene, centre, rng.uniform(0.025, 0.05), 0.005, rng.uniform(0.15, 0.3))]


def atelectasis(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    """A band of plate atelectasis: a dense line, roughly horizontal, in a lower zone."""
    side = int(rng.choice([-1, 1]))
    cu, cv = scene.point(rng, side, (0.55, 0.9))
    half, angle = rng.uniform(0.08, 0.16), rng.uniform(-0.3, 0.3)
    a, b = (cu - half, cv - half * angle), (cu + half, cv + half * angle)
    window = scene.frame.box_window([a, b], 0.04)
    u, v = scene.frame.local(window)
    layer = rng.uniform(0.15, 0.28) * soft(
        rng.uniform(0.008, 0.014) - segment_distance(u, v, a, b), 0.004
    )
    return [Opacity(window, scene.confine(window, layer), boxed=False)]


def pacemaker(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    """A device: a pacemaker's generator in the subcutaneous pocket under a clavicle (the
    patient's left mostly), and its lead down the superior vena cava into the heart."""
    anatomy = scene.anatomy
    side = 1 if rng.random() < 0.8 else -1
    cu, cv = side * rng.uniform(0.42, 0.58), anatomy.clavicle[0] + rng.uniform(0.1, 0.18)
    half_u, half_v = rng.uniform(0.06, 0.08), rng.uniform(0.045, 0.06)
    window = scene.frame.window((cu, cv), max(half_u, half_v) + 0.03)
    u, v = scene.frame.local(window)
    case = soft(ellipse_margin(u, v, cu, cv, half_u, half_v, rng.uniform(-0.3, 0.3)), 0.003)
    battery = soft(
        ellipse_margin(u, v, cu - 0.3 * side * half_u, cv, 0.45 * half_u, 0.6 * half_v), 0.003
    )
    generator = Opacity(window, (0.7 + 0.25 * battery) * case, boxed=False)
    hx, hy, hrx, hry, _ = anatomy.heart
    points = [
        (cu - side * 0.6 * half_u, cv),
        (0.03, -0.4),
        (0.0, hy - 0.6 * hry),
        (hx - 0.2 * hrx, hy),
        (hx + 0.6 * hrx, hy + 0.5 * hry),
    ]
    points = [(pu + rng.normal(0, 0.01), pv + rng.normal(0, 0.01)) for pu, pv in points]
    window = scene.frame.box_window(points, 0.02)
    u, v = scene.frame.local(window)
    distance = np.minimum.reduce([segment_distance(u, v, a, b) for a, b in zip(points, points[1:])])
    lead = Opacity(window, 0.45 * soft(0.005 - distance, 0.0015), boxed=False)
    return [generator, lead]


#: Renderers of the abnormalities drawn as opacities (cardiomegaly changes the anatomy instead).
ABNORMAL_OPACITIES: dict[str, Callable[[Scene, np.random.Generator], list[Opacity]]] = {
    "effusion": effusion,
    "nodule": nodule,
    "atelectasis": atelectasis,
    "pacemaker": pacemaker,
}


def distractors(scene: Scene, rng: np.random.Generator, count: int) -> list[Opacity]:
    """``count`` normal findings and devices, in any class: granulomas, nipple shadows, ECG electrodes."""
    kinds = [_granuloma, _nipples, _electrode]
    out = []
    for index in rng.choice(len(kinds), size=count, p=[0.4, 0.3, 0.3]):
        out.extend(kinds[index](scene, rng))
    return out
