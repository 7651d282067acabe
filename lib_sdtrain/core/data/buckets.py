"""Core: aspect-ratio buckets (host-free). Each image trains at the bucket whose aspect ratio is closest
to its own, so images of any shape train without a crop; images of one bucket batch together.

The buckets of a training area W×H and a step s are the sizes (w, h), both multiples of s, of the
largest area ≤ W×H for each width (and the same turned by 90°), kohya's `make_bucket_resolutions`
rule, as far as the aspect ratio stays within `max_aspect`; the square of side ⌊√(W·H)/s⌋·s is
always one. The step keeps the latent divisible as the UNet needs: SD1/SD2 halve the latent three
times (a multiple of 8 latent pixels, 64 px), SDXL twice (32 px).

Without upscaling (the default), an image smaller than its bucket in width or height trains at the
largest step-multiple size that fits inside it (each side rounded down to the step), so no image is
enlarged; only an image with a side below one step is (to one step), with a warning.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from lib_sdtrain.core.errors import ConfigError

#: pixels the bucket sides must be a multiple of, by model family (the UNet's latent divisibility × 8)
SIZE_MULTIPLE = {"sd1": 64, "sd2": 64, "sdxl": 32}
DEFAULT_STEP = 64


def size_multiple(family: str | None) -> int:
    """What each bucket side must be a multiple of for `family` (64 when unknown)."""
    return SIZE_MULTIPLE.get(family or "", DEFAULT_STEP)


def resolve_step(step: int, family: str | None) -> int:
    """The bucket step to use: `step`, or for 0 the family's own (64 px SD1/SD2, 32 px SDXL).
    A step the model cannot take raises ConfigError naming `bucket_step`."""
    need = size_multiple(family)
    if step == 0:
        return need
    if step < 0 or step % need:
        which = f"{family.upper()} models" if family else "this model"
        raise ConfigError(
            "bucket_step",
            f"must be 0 (auto: {need}) or a multiple of {need} px for {which} (the UNet halves the latent "
            f"{int(math.log2(need // 8))} times), got {step}",
        )
    return step


@functools.lru_cache(maxsize=32)
def bucket_sizes(width: int, height: int, step: int, max_aspect: float = 4.0) -> tuple[tuple[int, int], ...]:
    """The (width, height) buckets of the training area width×height, sorted."""
    area = width * height
    side = math.isqrt(area) // step * step
    sizes = {(side, side)} if side >= step else set()
    w = step
    while w * step <= area:
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_aspect:
            sizes.update({(w, h), (h, w)})
        w += step
    if not sizes:
        raise ConfigError(
            "bucket_step", f"{step} px leaves no bucket inside the training area {width}×{height}"
        )
    return tuple(sorted(sizes))


def aspect_error(size: tuple[int, int], other: tuple[int, int]) -> float:
    """|log| of the ratio of the two aspect ratios: 0 for the same shape, symmetric in portrait/landscape."""
    return abs(math.log((size[0] / size[1]) / (other[0] / other[1])))


@dataclass(frozen=True)
class BucketPlan:
    """The buckets of one run, and which an image of a given size trains at."""

    width: int
    height: int
    step: int = DEFAULT_STEP
    max_aspect: float = 4.0
    upscale: bool = False

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return bucket_sizes(self.width, self.height, self.step, self.max_aspect)

    def closest(self, size: tuple[int, int]) -> tuple[int, int]:
        """The bucket of the area whose aspect ratio is closest to `size`'s (ties: the larger, then the wider)."""
        return min(self.sizes, key=lambda b: (round(aspect_error(b, size), 12), -b[0] * b[1], -b[0]))

    def pick(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) an image of `size` trains at (see the module docstring)."""
        bucket = self.closest(size)
        if self.upscale or (bucket[0] <= size[0] and bucket[1] <= size[1]):
            return bucket
        s = self.step
        w, h = size[0] // s * s, size[1] // s * s
        # rounded down it may still exceed the area or the aspect limit: shorten the longer side
        w, h = max(w, s), max(h, s)
        while max(w, h) > s and (w * h > self.width * self.height or max(w / h, h / w) > self.max_aspect):
            if w >= h:
                w -= s
            else:
                h -= s
        return w, h

    def upscales(self, size: tuple[int, int]) -> bool:
        """Whether an image of `size` is enlarged in width or height to its bucket."""
        w, h = self.pick(size)
        return w > size[0] or h > size[1]
