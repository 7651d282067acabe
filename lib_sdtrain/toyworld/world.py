"""Toy world: pictures of one coloured shape, drawn in code, with captions that name what is drawn.

A scene has a shape (circle, square, triangle, star), one of eight named hues, a size (small, medium,
large), a background (light, dark) and a free position. Its caption names those attributes as tags in
a fixed order ("star, orange, small, dark background"); the world's models are trained on captions that
name any subset of them, so a prompt that names only some attributes leaves the others to chance.

Everything here is deterministic for a given seed (Python's `random`, PIL drawing), so pictures and
captions are reproducible on any machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
#: Saturated hues, at least 25 degrees apart, each clearly its own colour name.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (235, 225, 30),
    "green": (40, 175, 60),
    "cyan": (30, 195, 205),
    "blue": (40, 80, 225),
    "purple": (145, 55, 205),
    "pink": (245, 95, 185),
}
#: Radius of each size as a fraction of the picture side (every shape's box is 2r x 2r).
SIZES: dict[str, float] = {"small": 0.16, "medium": 0.23, "large": 0.31}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"light": (228, 228, 228), "dark": (36, 36, 36)}
ATTRIBUTES = ("shape", "color", "size", "background")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "background": tuple(BACKGROUNDS),
}
#: Supersampling factor of the drawing (edges are anti-aliased by the downscale).
_SUPER = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    background: str
    x: float = 0.5  # centre, as a fraction of the side
    y: float = 0.5

    def tags(self) -> list[str]:
        return [self.shape, self.color, self.size, f"{self.background} background"]

    def caption(self, keep: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> str:
        """The tags kept, in the world's order, joined by ", " ("" when none is kept)."""
        return ", ".join(t for t, k in zip(self.tags(), keep) if k)

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "background": self.background}


def random_scene(rng: random.Random, **fixed: str) -> Scene:
    """A scene with every attribute drawn uniformly unless fixed (shape=, color=, size=, background=)."""
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown scene attribute(s): {sorted(unknown)}")
    attrs = {}
    for name in ATTRIBUTES:
        value = fixed.get(name)
        if value is None:
            value = rng.choice(VALUES[name])
        elif value not in VALUES[name]:
            raise ValueError(f"{name} must be one of {VALUES[name]}, not {value!r}")
        attrs[name] = value
    r = SIZES[attrs["size"]]
    margin = r + 0.02
    return Scene(**attrs, x=rng.uniform(margin, 1 - margin), y=rng.uniform(margin, 1 - margin))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    inner = r * 0.42
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rad = r if i % 2 == 0 else inner
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB picture of `size` x `size` pixels."""
    big = size * _SUPER
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    r = SIZES[scene.size] * big
    cx, cy = scene.x * big, scene.y * big
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.86  # about the circle's area, so size is not read from area alone
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif scene.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif scene.shape == "star":
        d.polygon(_star(cx, cy + 0.1 * r, 1.1 * r), fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, not {scene.shape!r}")
    return img.resize((size, size), Image.BOX)


def random_keep(rng: random.Random, p_keep: float = 0.75) -> tuple[bool, bool, bool, bool]:
    """Which tags a training caption names: each with probability `p_keep`."""
    return tuple(rng.random() < p_keep for _ in ATTRIBUTES)  # type: ignore[return-value]


def all_captions() -> list[str]:
    """Every caption the world can give (each attribute named or not), "" first: 540 strings."""
    out = {""}
    options = [(None, *VALUES["shape"]), (None, *VALUES["color"]), (None, *VALUES["size"]),
               (None, *(f"{b} background" for b in VALUES["background"]))]  # fmt: skip
    for s in options[0]:
        for c in options[1]:
            for z in options[2]:
                for b in options[3]:
                    out.add(", ".join(t for t in (s, c, z, b) if t))
    return sorted(out, key=lambda t: (t != "", t))
