"""Toy world: read shape, colour, size and background back from a picture, with fixed arithmetic.

No learned weights: the background is the median of the picture's border; the object is every pixel
far enough from it; its colour is the hue of its most saturated pixels, named by the nearest of the
world's hues; its size is its extent, corrected for the shape; its shape comes from how concave it
is (area / convex hull: only a star is), how full its bounding box's corners are (top and bottom) and
how much of the box it fills. The reader is what every
"does the picture show it" figure of sdtrain is measured with (tests/test_toyworld.py measures the
reader itself, on fresh drawings and on the world's VAE reconstructions).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lib_sdtrain.toyworld.world import COLORS, SIZES

NONE = "none"
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLORS.items()}
#: Extent (the larger side of the bounding box) of each shape, in radii (world.draw).
_EXTENT = {"circle": 2.0, "square": 1.72, "triangle": 2.0, "star": 2.09}
_SIZE_CUTS = ((SIZES["small"] + SIZES["medium"]) / 2, (SIZES["medium"] + SIZES["large"]) / 2)


@dataclass(frozen=True)
class Reading:
    shape: str
    color: str
    size: str
    background: str
    features: tuple[float, ...] = ()

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "background": self.background}


def _hue_name(hue_deg: float) -> str:
    def dist(name: str) -> float:
        d = abs(hue_deg - _HUES[name]) % 360
        return min(d, 360 - d)

    return min(_HUES, key=dist)


def _convex_area(points: np.ndarray) -> float:
    """Area of the convex hull of integer points (monotone chain), in pixel units."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return float(len(pts))
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq: np.ndarray) -> list:
        hull: list = []
        for p in seq:
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) > 0:
                    break
                hull.pop()
            hull.append((float(p[0]), float(p[1])))
        return hull

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    x = np.array([h[0] for h in hull])
    y = np.array([h[1] for h in hull])
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def features(img: Image.Image) -> dict:
    """The object's mask (pixels at least half as far from the background as the farthest ones) and
    the measures the reading uses."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    h, w, _ = a.shape
    ring = 2  # the outermost pixels of a decoded picture are the least reliable: read the next ring
    border = np.concatenate([a[ring], a[-1 - ring], a[:, ring], a[:, -1 - ring]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((a - bg) ** 2).sum(-1))
    far = float(np.percentile(dist, 99.5))
    mask = (dist > max(35.0, 0.5 * far)) if far > 50.0 else np.zeros_like(dist, dtype=bool)
    return {"a": a, "bg": bg, "dist": dist, "mask": mask, "side": float(max(h, w))}


def read(img: Image.Image) -> Reading:
    """What the picture shows; attributes that cannot be read (no object) are "none"."""
    f = features(img)
    a, bg, dist, mask, side = f["a"], f["bg"], f["dist"], f["mask"], f["side"]
    background = "light" if float(np.mean(bg)) > 128 else "dark"
    area = int(mask.sum())
    if area < 0.004 * side * side:
        return Reading(NONE, NONE, NONE, background)
    rows = np.where(mask.sum(1) > 0)[0]
    cols = np.where(mask.sum(0) > 0)[0]
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    bh, bw = box.shape
    fill = float(box.mean())
    kh, kw = max(1, round(0.22 * bh)), max(1, round(0.22 * bw))
    top = (box[:kh, :kw].mean() + box[:kh, -kw:].mean()) / 2  # how full the box's corners are
    bottom = (box[-kh:, :kw].mean() + box[-kh:, -kw:].mean()) / 2
    ys, xs = np.nonzero(mask)
    solidity = area / max(1.0, _convex_area(np.stack([xs, ys], 1)) + 0.5 * len(xs) ** 0.5 * 2)
    if top < 0.2 and bottom > 0.7:  # empty top corners, full bottom ones (sides may bow inwards)
        shape = "triangle"
    elif solidity < 0.9:  # otherwise only a star is concave
        shape = "star"
    elif top > 0.45 and bottom > 0.6:  # full corners
        shape = "square"
    elif fill < 0.72:  # a blurred star: convex, but fills less of its box than a circle (pi/4)
        shape = "star"
    else:
        shape = "circle"
    # colour: the object's pixels farthest from the background (its core, not the blended edge)
    d_obj = dist[mask]
    core = a[mask][d_obj >= np.quantile(d_obj, 0.5)]
    rgb = core.mean(0) / 255.0
    hue, sat, _val = colorsys.rgb_to_hsv(*rgb)
    color = _hue_name(hue * 360) if sat > 0.25 else NONE
    radius = max(bh, bw) / side / _EXTENT[shape]
    size = "small" if radius < _SIZE_CUTS[0] else ("medium" if radius < _SIZE_CUTS[1] else "large")
    return Reading(shape, color, size, background, (fill, float(top), float(bottom), solidity, radius, hue * 360))
