"""Core: a loss-curve PNG drawn with PIL alone (no matplotlib in the host)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw

from lib_sdtrain.core.formats.fsutil import atomic_write


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def draw_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    validation: Sequence[tuple[int, float]] = (),
    best: tuple[int, float] | None = None,
    title: str = "loss",
    size: tuple[int, int] = (640, 360),
) -> Image.Image:
    """Raw loss (light), its moving average (dark) and validation loss (dots) against step; `best`,
    the best validation step, as a ringed dot."""
    w, h = size
    left, right, top, bottom = 60, 16, 28, 36
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    points = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    vpoints = [(s, v) for s, v in validation if math.isfinite(v)]
    if best is not None and not math.isfinite(best[1]):
        best = None
    if not points and not vpoints:
        d.text((left, h // 2), "no data yet", fill="gray")
        return img
    shown = points + vpoints + ([best] if best is not None else [])  # a resumed run's best may be earlier
    xs = [p[0] for p in shown]
    ys = [p[1] for p in shown]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * abs(y0 or 1), y1 + 0.5 * abs(y1 or 1)

    def px(s: float, v: float) -> tuple[float, float]:
        return (
            left + (s - x0) / (x1 - x0) * (w - left - right),
            top + (y1 - v) / (y1 - y0) * (h - top - bottom),
        )

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        v = y0 + frac * (y1 - y0)
        _, y = px(x0, v)
        d.line([left - 4, y, left, y], fill="black")
        d.text((4, y - 6), f"{v:.4g}", fill="black")
        s = x0 + frac * (x1 - x0)
        x, _ = px(s, y0)
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 10, h - bottom + 8), f"{s:.0f}", fill="black")
    if len(points) > 1:
        d.line([px(s, v) for s, v in points], fill=(170, 200, 235), width=1)
        d.line(
            [px(s, v) for (s, _), v in zip(points, smooth([v for _, v in points]))],
            fill=(20, 70, 160),
            width=2,
        )
    elif points:
        x, y = px(*points[0])
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(20, 70, 160))
    for s, v in vpoints:
        x, y = px(s, v)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(210, 80, 30))
    legend: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("loss", (150, 180, 225)), ("smoothed", (20, 70, 160)), ("validation", (210, 80, 30)))
    if best is not None:
        x, y = px(*best)
        d.ellipse([x - 7, y - 7, x + 7, y + 7], outline=(20, 140, 60), width=2)
        legend += ((f"best: step {best[0]}", (20, 140, 60)),)
    widths = [d.textlength(label) for label, _ in legend]
    x = w - right - sum(widths) - 12 * (len(legend) - 1)
    for (label, color), width in zip(legend, widths):
        d.text((x, 8), label, fill=color)
        x += width + 12
    return img


def save_loss_curve(path: str, steps: Sequence[int], losses: Sequence[float], **kwargs) -> str:
    img = draw_loss_curve(steps, losses, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # a run that wrote nothing else there
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
