"""Core: the preprocessing image operations — cover crop, split, focal-point crop, auto-sized crop, flip.

Pure functions on PIL images (nothing is read or written here), after the host's old Train→Preprocess
tab (A1111 1.6 `modules/textual_inversion/preprocess.py`) and its 1.10 successors
(`extensions-builtin/postprocessing-for-training`, `modules/textual_inversion/autocrop.py`).
Every resize is one LANCZOS resample from the source pixels. OpenCV is optional: when `cv2` imports,
faces are found with the Haar cascades shipped inside the cv2 package; nothing is ever downloaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageOps

Box = tuple[int, int, int, int]
Point = tuple[float, float]

_LANCZOS = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0  # resize huge sources in two stages (reduce, then LANCZOS): same look, much faster

MAXIMIZE_AREA = "Maximize area"
MINIMIZE_ERROR = "Minimize error"
OBJECTIVES = (MAXIMIZE_AREA, MINIMIZE_ERROR)
MULTICROP_STEP = 64  # the host tries widths and heights mindim, mindim+64, ... maxdim

#: Analysis runs on a copy whose short side is at most this many pixels (points scale back exactly).
ANALYSIS_SIDE = 512
#: Haar cascades tried in order (the host's list and minimum sizes); the first one that finds anything wins.
_CASCADES = (
    ("haarcascade_eye.xml", 0.01),
    ("haarcascade_frontalface_default.xml", 0.05),
    ("haarcascade_profileface.xml", 0.05),
    ("haarcascade_frontalface_alt.xml", 0.05),
    ("haarcascade_frontalface_alt2.xml", 0.05),
    ("haarcascade_frontalface_alt_tree.xml", 0.05),
    ("haarcascade_eye_tree_eyeglasses.xml", 0.05),
    ("haarcascade_upperbody.xml", 0.05),
)


# --- cover crop (the default path) and flips ------------------------------------------------------
def cover_box(size: tuple[int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """The centred source box with the target's aspect ratio, as large as the image allows."""
    iw, ih = size
    if iw * height > ih * width:  # wider than the target: trim left and right
        sw = width * ih / height
        return ((iw - sw) / 2, 0.0, (iw + sw) / 2, float(ih))
    sh = height * iw / width
    return (0.0, (ih - sh) / 2, float(iw), (ih + sh) / 2)


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Core: resize to cover `width`×`height`, keeping the aspect ratio, and cut the centre out."""
    box = cover_box(image.size, width, height)
    return image.resize((width, height), _LANCZOS, box=box, reducing_gap=_REDUCING_GAP)


def flipped(image: Image.Image) -> Image.Image:
    """Core: the horizontally mirrored copy ("Create flipped copies")."""
    return ImageOps.mirror(image)


# --- split oversized images -----------------------------------------------------------------------
def split_ratio(size: tuple[int, int], width: int, height: int) -> float:
    """How the image's shape compares with the target's along the image's long side (host semantics):
    below 1 the image is more elongated than `width`×`height`; square images count as landscape."""
    iw, ih = size
    if ih > iw:
        return (iw * height) / (ih * width)
    return (ih * width) / (iw * height)


def should_split(size: tuple[int, int], width: int, height: int, threshold: float) -> bool:
    """The host splits when the ratio is below 1 and at most `threshold`."""
    ratio = split_ratio(size, width, height)
    return ratio < 1.0 and ratio <= threshold


def split_boxes(
    size: tuple[int, int], width: int, height: int, overlap_ratio: float
) -> tuple[tuple[int, int], list[Box]]:
    """Core: the tiles of a split, as (scaled image size, tile boxes in that scaled image).

    The image is scaled so that its short side matches the target's matching side, then cut along its
    long side into `width`×`height` tiles that overlap by at least `overlap_ratio` of a tile and
    together cover the whole scaled image (first tile at the start, last at the end, even spacing).
    """
    iw, ih = size
    vertical = ih > iw
    across, along = (iw, ih) if vertical else (ih, iw)
    tile_across, tile_along = (width, height) if vertical else (height, width)
    length = max(tile_along, along * tile_across // across)
    stride = tile_along * (1.0 - overlap_ratio)
    count = max(1, math.ceil((length - tile_along * overlap_ratio) / stride - 1e-9))
    if count == 1:
        offsets = [(length - tile_along) // 2]
    else:
        offsets = [i * (length - tile_along) // (count - 1) for i in range(count)]
    if vertical:
        return (tile_across, length), [(0, o, tile_across, o + tile_along) for o in offsets]
    return (length, tile_across), [(o, 0, o + tile_along, tile_across) for o in offsets]


def split_tiles(image: Image.Image, width: int, height: int, overlap_ratio: float) -> list[Image.Image]:
    """Core: split an oversized image into overlapping `width`×`height` tiles (see `split_boxes`)."""
    scaled_size, boxes = split_boxes(image.size, width, height, overlap_ratio)
    scaled = image.resize(scaled_size, _LANCZOS, reducing_gap=_REDUCING_GAP)
    return [scaled.crop(box) for box in boxes]


# --- auto-sized crop ------------------------------------------------------------------------------
def aspect_error(size: tuple[int, int], width: int, height: int) -> float:
    """0 when `width`×`height` has the image's aspect ratio, towards 1 as they differ (host formula)."""
    r = (size[0] / size[1]) / (width / height)
    return 1.0 - min(r, 1.0 / r)


def auto_crop_size(
    size: tuple[int, int],
    mindim: int,
    maxdim: int,
    minarea: int,
    maxarea: int,
    objective: str = MAXIMIZE_AREA,
    threshold: float = 0.1,
) -> tuple[int, int] | None:
    """Core: the crop size the host's "Auto-sized crop" picks, or None when none fits the threshold.

    Candidates are widths and heights mindim, mindim+64, ... up to maxdim, with an area within
    [minarea, maxarea] and an aspect error at most `threshold`. "Maximize area" takes the largest
    (then the lowest error); "Minimize error" the lowest error (then the largest).
    """
    dims = range(mindim, maxdim + 1, MULTICROP_STEP)
    fits = [
        (w, h)
        for w in dims
        for h in dims
        if minarea <= w * h <= maxarea and aspect_error(size, w, h) <= threshold + 1e-12
    ]
    if not fits:
        return None
    if objective == MAXIMIZE_AREA:
        return max(fits, key=lambda wh: (wh[0] * wh[1], -aspect_error(size, *wh)))
    return max(fits, key=lambda wh: (-aspect_error(size, *wh), wh[0] * wh[1]))


def auto_sized_crop(image: Image.Image, *args, **kwargs) -> Image.Image | None:
    """Core: centre-crop to `auto_crop_size(image.size, ...)`, or None when no size fits."""
    size = auto_crop_size(image.size, *args, **kwargs)
    return center_crop(image, *size) if size else None


# --- focal-point crop: points of interest ---------------------------------------------------------
def _box_sum(a: np.ndarray, r: int) -> np.ndarray:
    """Sum over a (2r+1)² window around each pixel (edges repeated), from an integral image."""
    k = 2 * r + 1
    c = np.pad(np.pad(a, r, mode="edge"), ((1, 0), (1, 0))).cumsum(axis=0).cumsum(axis=1)
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def _local_maxima(r: np.ndarray) -> np.ndarray:
    """True where a pixel is at least as large as its 8 neighbours."""
    p = np.pad(r, 1, mode="constant", constant_values=-np.inf)
    h, w = r.shape
    peak = np.ones_like(r, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                peak &= r >= p[dy : dy + h, dx : dx + w]
    return peak


def _spread_out(xs: np.ndarray, ys: np.ndarray, min_distance: float, limit: int) -> list[Point]:
    """Greedy: keep points (strongest first) at least `min_distance` from every kept one."""
    kept: list[Point] = []
    d2 = min_distance * min_distance
    for x, y in zip(xs.tolist(), ys.tolist()):
        if all((x - kx) ** 2 + (y - ky) ** 2 >= d2 for kx, ky in kept):
            kept.append((float(x), float(y)))
            if len(kept) >= limit:
                break
    return kept


def corner_points(
    gray: np.ndarray, max_points: int = 100, quality: float = 0.04, min_distance: float | None = None
) -> list[Point]:
    """Core: strong corners (Shi–Tomasi minimum eigenvalue, numpy only) of a 0..1 grayscale array.

    Like the host's `cv2.goodFeaturesToTrack(maxCorners=100, qualityLevel=0.04, minDistance=6% of the
    short side)`, and like the host the bottom tenth is greyed out first (watermarks live there).
    Returns (x, y) pixel positions, strongest first; [] for a flat image.
    """
    g = np.asarray(gray, dtype=np.float64).copy()
    h, w = g.shape
    if h < 3 or w < 3:
        return []
    g[int(h * 0.9) :, :] = 0.6
    gy, gx = np.gradient(g)
    sxx, syy, sxy = _box_sum(gx * gx, 1), _box_sum(gy * gy, 1), _box_sum(gx * gy, 1)
    response = (sxx + syy) / 2 - np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    top = float(response.max())
    if top <= 1e-9:
        return []
    ys, xs = np.nonzero((response >= quality * top) & _local_maxima(response))
    order = np.argsort(-response[ys, xs], kind="stable")[:4000]
    distance = min(h, w) * 0.06 if min_distance is None else min_distance
    return _spread_out(xs[order], ys[order], distance, max_points)


def _window_entropies(gray_u8: np.ndarray, window: int, axis: int, bins: int = 32) -> np.ndarray:
    """Shannon entropy (bits) of the gray-level histogram of every full-span window along `axis`."""
    levels = (gray_u8.astype(np.int64) * bins) // 256
    lines = levels if axis == 0 else levels.T  # one row per position along the sliding axis
    n = lines.shape[0]
    index = np.arange(n)[:, None] * bins + lines
    counts = np.bincount(index.ravel(), minlength=n * bins).reshape(n, bins)
    cum = np.concatenate([np.zeros((1, bins), dtype=np.int64), np.cumsum(counts, axis=0)])
    hist = (cum[window:] - cum[:-window]).astype(np.float64)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)


def entropy_point(gray_u8: np.ndarray, crop_width: float, crop_height: float) -> Point | None:
    """Core: the centre of the crop-sized window with the most detail (highest gray-level entropy).

    The window slides along the image's free axis (after a cover resize only one axis is free); when
    several positions tie (a detailed region fully inside each), the middle of that run is taken.
    None when the window cannot move or the image is flat.
    """
    h, w = gray_u8.shape
    cw, ch = min(w, round(crop_width)), min(h, round(crop_height))
    if w - cw <= 0 and h - ch <= 0:
        return None
    axis, window = (1, cw) if w - cw >= h - ch else (0, ch)
    ent = _window_entropies(gray_u8, window, axis)
    best = float(ent.max())
    if best <= 1e-9:
        return None
    near = ent >= best - 1e-9 * max(1.0, best)
    first = int(np.argmax(near))
    run = int(np.argmin(near[first:])) if not near[first:].all() else len(near) - first
    center = first + (run - 1) / 2 + window / 2
    return (center, h / 2) if axis == 1 else (w / 2, center)


def face_points(rgb: np.ndarray) -> list[Point]:
    """Core: face centres from OpenCV's shipped Haar cascades; [] when cv2 or its data is missing."""
    try:
        import cv2  # optional: present in most webui installs, never required
    except ImportError:
        return []
    folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
    if not folder:
        return []
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    short = min(gray.shape[:2])
    for name, fraction in _CASCADES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        classifier = cv2.CascadeClassifier(path)
        if classifier.empty():
            continue
        side = max(1, int(short * fraction))
        try:
            found = classifier.detectMultiScale(
                gray, scaleFactor=1.1, minNeighbors=7, minSize=(side, side), flags=cv2.CASCADE_SCALE_IMAGE
            )
        except Exception:  # cv2.error on odd inputs: try the next cascade, as the host does
            continue
        if len(found):
            return [(float(x + fw / 2), float(y + fh / 2)) for x, y, fw, fh in found]
    return []


# --- focal-point crop: putting it together --------------------------------------------------------
@dataclass
class FocalCrop:
    """A focal-point crop. `box` and `point` are in source-image pixels; `points` in analysis pixels."""

    image: Image.Image
    box: tuple[float, float, float, float]
    point: Point
    points: dict[str, list[Point]] = field(default_factory=dict)
    debug: Image.Image | None = None


def _centroid(points: Sequence[Point]) -> Point:
    return (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))


def focal_point(points: dict[str, list[Point]], weights: dict[str, float], fallback: Point) -> Point:
    """Core: the weighted average of each source's centroid (sources with no points drop out and the
    remaining weights are renormalised, as in the host); `fallback` when nothing is left."""
    parts = [(weights[k], _centroid(v)) for k, v in points.items() if v and weights.get(k, 0) > 0]
    total = sum(w for w, _ in parts)
    if total <= 0:
        return fallback
    return (sum(w * p[0] for w, p in parts) / total, sum(w * p[1] for w, p in parts) / total)


def _cover_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    scale = max(width / size[0], height / size[1])
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def _clamp(v: float, low: int, high: int) -> int:
    return int(min(max(round(v), low), high))


def _analysis_points(
    analysis: Image.Image, crop: tuple[float, float], weights: dict[str, float]
) -> dict[str, list[Point]]:
    gray = np.asarray(analysis.convert("L"))
    points: dict[str, list[Point]] = {}
    if weights["edges"] > 0:
        points["edges"] = corner_points(gray / 255.0)
    if weights["entropy"] > 0:
        p = entropy_point(gray, *crop)
        points["entropy"] = [p] if p else []
    if weights["faces"] > 0:
        points["faces"] = face_points(np.asarray(analysis))
    return points


def _draw_debug(
    analysis: Image.Image, points: dict[str, list[Point]], focus: Point, box: tuple[float, ...]
) -> Image.Image:
    """The analysis image with each source's points, the focal point and the crop drawn on it."""
    im = analysis.convert("RGB")
    d = ImageDraw.Draw(im)
    radius = max(3.0, min(im.size) * 0.03)
    colors = {"edges": "#00F", "entropy": "#FF0", "faces": "#F00"}
    for name, pts in points.items():
        for x, y in pts:
            d.rectangle((x - 2, y - 2, x + 2, y + 2), outline=colors[name])
        if pts:
            cx, cy = _centroid(pts)
            d.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=colors[name])
            d.text((cx - radius, cy - radius - 12), name, fill=colors[name])
    fx, fy = focus
    d.ellipse((fx - 2 * radius, fy - 2 * radius, fx + 2 * radius, fy + 2 * radius), outline="#0F0", width=2)
    d.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline="#0F0", width=2)
    return im


def focal_crop(
    image: Image.Image,
    width: int,
    height: int,
    *,
    face_weight: float = 0.9,
    entropy_weight: float = 0.15,
    edges_weight: float = 0.5,
    debug: bool = False,
) -> FocalCrop:
    """Core: crop `width`×`height` around the image's focal point ("Auto focal point crop").

    The image is resized to cover the target (aspect kept); the focal point is the weighted average
    of the centroids of corner points, the highest-entropy window and faces (if OpenCV is there);
    the crop is centred on it and pushed back inside the image. With no points at all it is a centre
    crop. `debug` adds an annotated copy (points, focal point, crop).
    """
    cover_w, cover_h = _cover_size(image.size, width, height)
    a = min(1.0, ANALYSIS_SIDE / min(cover_w, cover_h))
    analysis = image.resize(
        (max(1, round(cover_w * a)), max(1, round(cover_h * a))), Image.Resampling.BILINEAR
    )
    ax, ay = analysis.width / cover_w, analysis.height / cover_h  # analysis px per cover px
    weights = {"faces": face_weight, "entropy": entropy_weight, "edges": edges_weight}
    points = _analysis_points(analysis, (width * ax, height * ay), weights)
    fx, fy = focal_point(points, weights, (analysis.width / 2, analysis.height / 2))
    x1 = _clamp(fx / ax - width / 2, 0, cover_w - width)
    y1 = _clamp(fy / ay - height / 2, 0, cover_h - height)
    sx, sy = image.width / cover_w, image.height / cover_h  # source px per cover px
    box = (x1 * sx, y1 * sy, (x1 + width) * sx, (y1 + height) * sy)
    out = image.resize((width, height), _LANCZOS, box=box, reducing_gap=_REDUCING_GAP)
    dbg = None
    if debug:
        dbg = _draw_debug(
            analysis, points, (fx, fy), (x1 * ax, y1 * ay, (x1 + width) * ax, (y1 + height) * ay)
        )
    return FocalCrop(out, box, (fx / ax * sx, fy / ay * sy), points, dbg)
