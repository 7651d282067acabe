"""Core: a small built-in sample dataset (drawn, not downloaded) for the demo and the benchmarks."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 70), "orange": (230, 140, 30)}


def _draw(shape: str, color: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    top = tuple(rng.randint(200, 250) for _ in range(3))
    bottom = tuple(rng.randint(120, 180) for _ in range(3))
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    for y in range(size):  # a soft vertical gradient background
        f = y / max(1, size - 1)
        d.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * f) for a, b in zip(top, bottom)))
    r = rng.uniform(0.22, 0.32) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def write_sample_dataset(folder: str | Path, *, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write `count` images of coloured shapes with `.txt` captions ("red circle, gradient")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        color = names[(i // len(SHAPES)) % len(names)]
        _draw(shape, COLORS[color], size, rng).save(folder / f"{i:02d}-{color}-{shape}.png")
        (folder / f"{i:02d}-{color}-{shape}.txt").write_text(
            f"{color} {shape}, gradient background\n", encoding="utf-8"
        )
    return folder
