"""Canonical body coordinates and the patient's position in the image.

Anatomy and lesions are described in canonical coordinates ``(u, v)``: ``u`` runs from
-1 (image left, the patient's right on a PA film) to 1, ``v`` from -1 (top) to 1
(bottom). A :class:`Frame` places the body in the image with a similarity transform
(the patient's rotation, size and offset on the detector) and provides, for every
pixel of the working grid, the canonical coordinates it shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Frame:
    """Working grid of ``res x res`` pixels and the body's placement in it.

    Attributes:
        res: side of the working grid.
        scale: body size on the detector (1.0 fills the nominal field).
        angle: rotation of the patient, radians, counter-clockwise.
        shift: ``(x, y)`` offset of the body centre, in normalised image units.
    """

    res: int
    scale: float = 1.0
    angle: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)

    @cached_property
    def grids(self) -> tuple[np.ndarray, np.ndarray]:
        """``(U, V)`` canonical coordinates of every pixel centre, float32 ``(res, res)``."""
        axis = (np.arange(self.res, dtype=np.float32) + 0.5) * (2.0 / self.res) - 1.0
        x, y = np.meshgrid(axis - self.shift[0], axis - self.shift[1])
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u = (cos * x + sin * y) / self.scale
        v = (-sin * x + cos * y) / self.scale
        return u.astype(np.float32), v.astype(np.float32)

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Canonical ``(N, 2)`` points to normalised image coordinates."""
        p = np.asarray(points, np.float64).reshape(-1, 2) * self.scale
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        x = cos * p[:, 0] - sin * p[:, 1] + self.shift[0]
        y = sin * p[:, 0] + cos * p[:, 1] + self.shift[1]
        return np.stack([x, y], axis=1)

    def to_pixels(self, points: np.ndarray, size: int | None = None) -> np.ndarray:
        """Canonical points to pixel coordinates of an image of side ``size`` (default ``res``)."""
        return (self.to_image(points) + 1.0) * (0.5 * (size or self.res))

    def window(self, centre: tuple[float, float], radius: float) -> tuple[slice, slice]:
        """Rows and columns of the working grid that can show the canonical disc ``(centre, radius)``."""
        cx, cy = centre
        return self.box_window([(cx - radius, cy - radius), (cx + radius, cy + radius)], 0.0)

    def box_window(self, points, pad: float) -> tuple[slice, slice]:
        """Rows and columns showing the canonical bounding box of ``points`` grown by ``pad``."""
        p = np.asarray(points, np.float64).reshape(-1, 2)
        (u0, v0), (u1, v1) = p.min(axis=0) - pad, p.max(axis=0) + pad
        corners = self.to_pixels(np.array([(u0, v0), (u0, v1), (u1, v0), (u1, v1)]))
        (x0, y0), (x1, y1) = corners.min(axis=0) - 1, corners.max(axis=0) + 2
        rows = slice(int(np.clip(y0, 0, self.res)), int(np.clip(y1, 0, self.res)))
        cols = slice(int(np.clip(x0, 0, self.res)), int(np.clip(x1, 0, self.res)))
        return rows, cols

    def local(self, window: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Canonical grids restricted to ``window``."""
        u, v = self.grids
        return u[window], v[window]


def soft(margin: np.ndarray | float, width: float) -> np.ndarray:
    """Smooth step from 0 (margin below -2 width) to 1 (margin above 2 width).

    A cubic smoothstep: as smooth to the eye as a logistic or tanh edge and about three
    times cheaper, which matters since an image evaluates a few hundred of them.
    """
    x = np.asarray(margin, np.float32) * np.float32(0.25 / width)
    x += np.float32(0.5)
    np.clip(x, 0.0, 1.0, out=x)
    return x * x * (np.float32(3.0) - np.float32(2.0) * x)


def ellipse_margin(
    u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float, tilt: float = 0.0
) -> np.ndarray:
    """Approximate signed distance to an ellipse's outline, positive inside."""
    du, dv = u - np.float32(cx), v - np.float32(cy)
    if tilt:
        cos, sin = np.float32(np.cos(tilt)), np.float32(np.sin(tilt))
        du, dv = cos * du + sin * dv, -sin * du + cos * dv
    radius = np.sqrt((du / np.float32(rx)) ** 2 + (dv / np.float32(ry)) ** 2)
    return (1.0 - radius) * np.float32(min(rx, ry))


def segment_distance(
    u: np.ndarray, v: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    """Distance from every point to the segment ``a``-``b``."""
    au, av = np.float32(a[0]), np.float32(a[1])
    du, dv = np.float32(b[0] - a[0]), np.float32(b[1] - a[1])
    length2 = du * du + dv * dv or np.float32(1e-12)
    t = np.clip(((u - au) * du + (v - av) * dv) / length2, 0.0, 1.0)
    return np.hypot(u - au - t * du, v - av - t * dv)


def smooth(image: np.ndarray, factor: int) -> np.ndarray:
    """A cheap low-pass: down ``factor`` times (bilinear), back up (bicubic)."""
    res = image.shape[0]
    small = Image.fromarray(image, mode="F").resize((max(1, res // factor),) * 2, Image.BILINEAR)
    return np.asarray(small.resize((res, res), Image.BICUBIC), np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a square float image to ``size x size``."""
    return np.asarray(
        Image.fromarray(image, mode="F").resize((size, size), Image.BICUBIC), np.float32
    )


def upsample_nearest(image: np.ndarray, size: int) -> np.ndarray:
    """Repeat pixels when ``size`` is a multiple of the side, else :func:`resize`."""
    factor = size // image.shape[0]
    if factor * image.shape[0] == size:
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image
    return resize(image, size)
