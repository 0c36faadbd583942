"""Pneumonia lesions, each type with its own texture, size and typical location, and
distractor opacities that look lesion-like but are not pneumonia.

* lobar consolidation: a large homogeneous opacity filling part of one lobe, with a
  sharp edge along a fissure and air bronchograms; lower and middle zones mostly;
* bronchopneumonia: clusters of small fluffy nodular opacities, lower zones, often on
  both sides (one box per cluster);
* interstitial pneumonia: a faint reticular net with ground-glass haze around the
  hila and the lower zones, usually bilateral (one box per lung);
* cavitary pneumonia: a thick-walled round opacity with a lucent centre, often with an
  air-fluid level, upper zones mostly.

Every lesion is confined to the lungs. Its box is drawn around what is visible, as a
radiologist would: from the rendered opacity, with a loose margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .anatomy import Anatomy, AnatomyMaps
from .frame import Frame, ellipse_margin, segment_distance, soft

Window = tuple[slice, slice]


@dataclass
class Opacity:
    """An attenuation patch added to the image; ``boxed`` lesions get a box."""

    window: Window
    layer: np.ndarray
    boxed: bool = True

    def box(self, threshold: float = 0.25) -> tuple[float, float, float, float] | None:
        """Bounding box ``(x0, y0, x1, y1)`` in working-grid pixels of what is clearly visible."""
        peak = float(self.layer.max())
        if peak <= 0:
            return None
        rows, cols = np.nonzero(self.layer > threshold * peak)
        if rows.size == 0:
            return None
        return (
            cols.min() + self.window[1].start,
            rows.min() + self.window[0].start,
            cols.max() + 1 + self.window[1].start,
            rows.max() + 1 + self.window[0].start,
        )


@dataclass(frozen=True)
class Scene:
    """What lesion renderers need: the anatomy, its masks and the frame."""

    anatomy: Anatomy
    maps: AnatomyMaps
    frame: Frame

    def apex(self) -> float:
        return self.anatomy.lung_centre_v - self.anatomy.lung_half_height

    def lung(self, side: int) -> np.ndarray:
        return self.maps.lung_right if side < 0 else self.maps.lung_left

    def point(
        self, rng: np.random.Generator, side: int, zone: tuple[float, float]
    ) -> tuple[float, float]:
        """A random canonical point well inside one lung, in a vertical ``zone`` (0 apex, 1 base)."""
        mask, res = self.lung(side), self.frame.res
        base = self.anatomy.dome(side)
        for _ in range(60):
            u = side * rng.uniform(0.12, 0.78)
            v = self.apex() + (base - self.apex()) * rng.uniform(*zone)
            x, y = self.frame.to_pixels(np.array([u, v]))[0]
            if 0 <= x < res and 0 <= y < res and mask[int(y), int(x)] > 0.9:
                return float(u), float(v)
        return side * 0.4, 0.5 * (self.apex() + base)  # mid-lung: always inside

    def confine(self, window: Window, layer: np.ndarray) -> np.ndarray:
        """Keep an opacity inside the lungs."""
        return layer * np.clip(self.maps.lungs[window], 0.0, 1.0)


def lobar(scene: Scene, rng: np.random.Generator, density: float) -> list[Opacity]:
    side = -1 if rng.random() < 0.6 else 1
    lobe = rng.choice(["lower", "middle", "upper"], p=[0.55, 0.3, 0.15])
    zone = {"lower": (0.65, 0.85), "middle": (0.45, 0.65), "upper": (0.15, 0.35)}[lobe]
    cu, cv = scene.point(rng, side, zone)
    rx, ry = rng.uniform(0.18, 0.28), rng.uniform(0.14, 0.22)
    window = scene.frame.window((cu, cv), max(rx, ry) + 0.06)
    u, v = scene.frame.local(window)
    region = soft(ellipse_margin(u, v, cu, cv, rx, ry, rng.uniform(-0.5, 0.5)), 0.02)
    # A fissure gives one sharp, straight edge: above for a lower lobe, below for an upper one.
    slope = rng.uniform(-0.35, 0.35)
    if lobe == "upper":
        fissure = (cv + 0.5 * ry + slope * (u - cu)) - v
    else:
        fissure = v - (cv - 0.5 * ry + slope * (u - cu))
    region = region * soft(fissure, 0.004)
    mottling = 0.85 + 0.15 * _noise(rng, region.shape, 6)
    layer = (
        density
        * 0.6
        * region
        * mottling
        * (1.0 - 0.3 * _bronchograms(rng, scene.frame, window, (cu, cv), rx))
    )
    return [Opacity(window, scene.confine(window, layer))]


def bronchopneumonia(scene: Scene, rng: np.random.Generator, density: float) -> list[Opacity]:
    sides = [-1, 1] if rng.random() < 0.4 else [int(rng.choice([-1, 1]))]
    return [_cluster(scene, rng, density, side) for side in sides]


def _cluster(scene: Scene, rng: np.random.Generator, density: float, side: int) -> Opacity:
    cu, cv = scene.point(rng, side, (0.45, 0.85))
    spread = rng.uniform(0.06, 0.11)
    window = scene.frame.window((cu, cv), 2.6 * spread + 0.05)
    u, v = scene.frame.local(window)
    total = np.zeros(u.shape, np.float32)
    for _ in range(int(rng.integers(5, 13))):
        bu, bv = cu + rng.normal(0, spread), cv + rng.normal(0, spread * 0.8)
        radius = rng.uniform(0.018, 0.042)
        d2 = ((u - bu) ** 2 + (v - bv) ** 2) / radius**2
        total += np.exp(-d2) * rng.uniform(0.6, 1.0)
    fluffy = 1.0 - np.exp(-1.6 * total)  # overlapping nodules merge, without exceeding solid
    texture = 0.75 + 0.25 * _noise(rng, u.shape, 10)
    return Opacity(window, scene.confine(window, density * 0.28 * fluffy * texture))


def interstitial(scene: Scene, rng: np.random.Generator, density: float) -> list[Opacity]:
    sides = [-1, 1] if rng.random() < 0.8 else [int(rng.choice([-1, 1]))]
    out = []
    for side in sides:
        cu = side * rng.uniform(0.3, 0.45)
        cv = scene.anatomy.dome(side) - rng.uniform(0.2, 0.35)
        rx, ry = rng.uniform(0.2, 0.28), rng.uniform(0.22, 0.32)
        window = scene.frame.window((cu, cv), max(rx, ry) + 0.05)
        u, v = scene.frame.local(window)
        region = soft(ellipse_margin(u, v, cu, cv, rx, ry), 0.05)
        # A net of thin lines: where band-limited noise crosses zero.
        reticulation = soft(0.12 - np.abs(_noise(rng, u.shape, 26)), 0.04)
        haze = 0.5 + 0.5 * _noise(rng, u.shape, 4)
        layer = density * region * (0.09 * reticulation + 0.09 * haze)
        out.append(Opacity(window, scene.confine(window, layer)))
    return out


def cavitary(scene: Scene, rng: np.random.Generator, density: float) -> list[Opacity]:
    count = 2 if rng.random() < 0.15 else 1
    return [_cavity(scene, rng, density) for _ in range(count)]


def _cavity(scene: Scene, rng: np.random.Generator, density: float) -> Opacity:
    side = int(rng.choice([-1, 1]))
    cu, cv = scene.point(rng, side, (0.1, 0.4) if rng.random() < 0.65 else (0.4, 0.7))
    radius = rng.uniform(0.04, 0.08)
    wall = radius * rng.uniform(0.25, 0.45)
    window = scene.frame.window((cu, cv), 2.0 * radius + 0.03)
    u, v = scene.frame.local(window)
    # An irregular outline: the radius wobbles with the angle.
    angle = np.arctan2(v - cv, u - cu)
    wobble = 1.0 + sum(
        rng.uniform(-0.08, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    d = np.hypot(u - cu, (v - cv) * rng.uniform(0.85, 1.15)) / wobble
    outer, lumen = soft(radius - d, 0.004), soft(radius - wall - d, 0.004)
    halo = soft(1.8 * radius - d, 0.25 * radius)
    layer = (
        0.24 * (outer - lumen) * (0.8 + 0.2 * _noise(rng, u.shape, 8)) + 0.1 * halo - 0.05 * lumen
    )
    if rng.random() < 0.4:  # an air-fluid level: gravity keeps it horizontal
        level = cv + rng.uniform(-0.3, 0.5) * (radius - wall)
        layer = layer + 0.24 * lumen * soft(v - level, 0.002)
    return Opacity(window, scene.confine(window, density * layer))


#: Lesion renderers by class name; "normal" has none.
LESIONS: dict[str, Callable[[Scene, np.random.Generator, float], list[Opacity]]] = {
    "lobar": lobar,
    "bronchopneumonia": bronchopneumonia,
    "interstitial": interstitial,
    "cavitary": cavitary,
}


# --- distractors: lesion-like, not pneumonia, never boxed --------------------------------


def distractors(scene: Scene, rng: np.random.Generator, count: int) -> list[Opacity]:
    """``count`` distractor opacities of random kinds, in any class."""
    kinds = [_granuloma, _nipples, _electrode, _plate_atelectasis, _faint_nodule]
    weights = np.array([0.25, 0.15, 0.2, 0.15, 0.25])
    out = []
    for index in rng.choice(len(kinds), size=count, p=weights):
        out.extend(kinds[index](scene, rng))
    return out


def _disc(
    scene: Scene,
    centre: tuple[float, float],
    radius: float,
    edge: float,
    level: float,
    confine: bool = True,
) -> Opacity:
    window = scene.frame.window(centre, radius + 4 * edge + 0.01)
    u, v = scene.frame.local(window)
    layer = level * soft(radius - np.hypot(u - centre[0], v - centre[1]), edge)
    return Opacity(window, scene.confine(window, layer) if confine else layer, boxed=False)


def _granuloma(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    centre = scene.point(rng, int(rng.choice([-1, 1])), (0.1, 0.9))
    return [_disc(scene, centre, rng.uniform(0.005, 0.011), 0.0015, rng.uniform(0.3, 0.5))]


def _nipples(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    u, dv = rng.uniform(0.32, 0.46), rng.uniform(-0.14, 0.0)
    radius, level = rng.uniform(0.016, 0.024), rng.uniform(0.06, 0.12)
    return [
        _disc(scene, (side * u, scene.anatomy.dome(side) + dv), radius, 0.004, level, confine=False)
        for side in (-1, 1)
    ]


def _electrode(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    """An ECG electrode (metal snap in a ring) and its wire across the chest."""
    centre = (rng.uniform(-0.8, 0.8), rng.uniform(-0.6, 0.6))
    ring = _disc(scene, centre, 0.028, 0.002, 0.18, confine=False)
    snap = _disc(scene, centre, 0.009, 0.0015, 0.6, confine=False)
    end = (centre[0] + rng.uniform(-0.8, 0.8), rng.choice([-1.1, 1.1]))
    bend = (0.5 * (centre[0] + end[0]) + rng.uniform(-0.3, 0.3), 0.5 * (centre[1] + end[1]))
    window = scene.frame.box_window([centre, bend, end], 0.02)
    u, v = scene.frame.local(window)
    distance = np.minimum(segment_distance(u, v, centre, bend), segment_distance(u, v, bend, end))
    wire = Opacity(window, 0.35 * soft(0.0035 - distance, 0.001), boxed=False)
    return [ring, snap, wire]


def _plate_atelectasis(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    side = int(rng.choice([-1, 1]))
    cu, cv = scene.point(rng, side, (0.7, 0.9))
    half = rng.uniform(0.05, 0.1)
    angle = rng.uniform(-0.25, 0.25)
    a, b = (cu - half, cv - half * angle), (cu + half, cv + half * angle)
    window = scene.frame.box_window([a, b], 0.03)
    u, v = scene.frame.local(window)
    layer = rng.uniform(0.06, 0.12) * soft(0.006 - segment_distance(u, v, a, b), 0.003)
    return [Opacity(window, scene.confine(window, layer), boxed=False)]


def _faint_nodule(scene: Scene, rng: np.random.Generator) -> list[Opacity]:
    centre = scene.point(rng, int(rng.choice([-1, 1])), (0.15, 0.9))
    return [_disc(scene, centre, rng.uniform(0.015, 0.035), 0.008, rng.uniform(0.04, 0.09))]


# --- shared textures ------------------------------------------------------------------------


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1] with ``cells`` features across the larger side."""
    rows, cols = shape
    grid = rng.standard_normal(
        (max(2, cells * rows // max(rows, cols, 1)), max(2, cells * cols // max(rows, cols, 1)))
    )
    field = Image.fromarray(grid.astype(np.float32), mode="F").resize(
        (max(cols, 1), max(rows, 1)), Image.BICUBIC
    )
    return np.clip(np.asarray(field, np.float32) / 1.5, -1.0, 1.0)


def _bronchograms(
    rng: np.random.Generator,
    frame: Frame,
    window: Window,
    centre: tuple[float, float],
    radius: float,
    width_units: float = 0.006,
) -> np.ndarray:
    """Branching air-filled bronchi seen through consolidation: thin dark lines, 0..1, about
    ``width_units`` canonical units wide."""
    rows, cols = window[0].stop - window[0].start, window[1].stop - window[1].start
    canvas = Image.new("L", (max(cols, 1), max(rows, 1)))
    draw = ImageDraw.Draw(canvas)
    origin = np.array([window[1].start, window[0].start], np.float64)
    width = max(1, round(width_units * frame.scale * frame.res))
    for _ in range(int(rng.integers(2, 5))):
        start = np.array(centre) + rng.normal(0, 0.3 * radius, 2)
        angle = rng.uniform(0, 2 * np.pi)
        points = [start]
        for _ in range(3):
            angle += rng.uniform(-0.5, 0.5)
            points.append(points[-1] + 0.25 * radius * np.array([np.cos(angle), np.sin(angle)]))
        pixels = frame.to_pixels(np.array(points)) - origin
        draw.line([tuple(p) for p in pixels], fill=255, width=width)
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(width)), np.float32) / 255.0
