"""Core: reading a training folder: options, images, captions and prompt templates (host-free).

What the host's PersonalizedBase does before it touches the model (modules/textual_inversion/
dataset.py:32-90): list the folder, decode and resize images, keep alpha for loss weights and find
each image's caption. Errors surface here, before any model work, as `DatasetError`/`ConfigError`.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from lib_sdtrain.core.data.buckets import BucketPlan
from lib_sdtrain.core.errors import ConfigError, DatasetError
from lib_sdtrain.core.formats.limits import open_image

log = logging.getLogger(__name__)

LatentSampling = Literal["once", "deterministic", "random"]
Crop = Literal["resize", "center", "random"]
LATENT_SAMPLING_METHODS = ("once", "deterministic", "random")
CROPS = ("resize", "center", "random")

_RE_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")  # host: modules/textual_inversion/dataset.py:17
_BICUBIC = Image.Resampling.BICUBIC


@dataclass
class DatasetOptions:
    data_root: str | os.PathLike[str]
    width: int
    height: int
    placeholder_token: str
    template_file: str | os.PathLike[str]
    batch_size: int = 1
    gradient_step: int = 1
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    varsize: bool = False  # "do not resize images": keep each image's size, batch same sizes together
    use_weight: bool = False  # PNG alpha as per-pixel loss weight
    repeats: int = 1  # items per image per epoch (the host has the setting but ignores it: keep 1)
    flip_p: float = 0.0  # random horizontal flip per fetch (the host builds one but never applies it)
    crop: Crop = "resize"  # resize = the host's stretch to width×height
    filename_word_regex: str = ""
    filename_join_string: str = " "
    require_name_in_template: bool = True  # textual inversion only learns where [name] appears
    latent_sampling_method: LatentSampling = "once"
    latent_downscale: int = 8
    seed: int | None = None  # None or < 0: fresh randomness each run
    # captions and folder repeats (kohya's options; all off by default, as the host)
    keep_tokens: int = 0  # the first N comma-separated tags are neither shuffled nor dropped
    caption_dropout_rate: float = 0.0  # chance that a prompt's [filewords] is empty (the bare template)
    folder_repeats: bool = False  # also read `N_name` subfolders of data_root, each image counting N times
    # aspect-ratio buckets (core.data.buckets): each image fits the bucket of width×height's area closest
    # to its aspect ratio, by `crop` (resize: stretched to it, no crop); off: every image is width×height
    bucketing: bool = False
    bucket_step: int = 64  # px; a multiple of 8 the model's UNet can take (64 SD1/SD2, 32 SDXL)
    bucket_max_aspect: float = 4.0
    bucket_upscale: bool = False  # enlarge an image smaller than its bucket (off: a smaller bucket fits it)

    def buckets(self) -> BucketPlan | None:
        if not self.bucketing:
            return None
        return BucketPlan(self.width, self.height, self.bucket_step, self.bucket_max_aspect, self.bucket_upscale)

    def validate(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ConfigError(field, msg)

        for name in ("width", "height", "batch_size", "gradient_step", "repeats", "latent_downscale"):
            v = getattr(self, name)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                name,
                f"must be a whole number > 0, got {v!r}",
            )
        need(
            0.0 <= self.tag_drop_out <= 1.0,
            "tag_drop_out",
            f"must be between 0 and 1, got {self.tag_drop_out}",
        )
        need(0.0 <= self.flip_p <= 1.0, "flip_p", f"must be between 0 and 1, got {self.flip_p}")
        need(
            isinstance(self.keep_tokens, int) and not isinstance(self.keep_tokens, bool) and self.keep_tokens >= 0,
            "keep_tokens",
            f"must be 0 (off) or a positive whole number, got {self.keep_tokens!r}",
        )
        need(
            0.0 <= self.caption_dropout_rate <= 1.0,
            "caption_dropout_rate",
            f"must be between 0 and 1, got {self.caption_dropout_rate}",
        )
        need(self.crop in CROPS, "crop", f"must be one of {', '.join(CROPS)}, got {self.crop!r}")
        need(
            self.latent_sampling_method in LATENT_SAMPLING_METHODS,
            "latent_sampling_method",
            f"must be one of {', '.join(LATENT_SAMPLING_METHODS)}, got {self.latent_sampling_method!r}",
        )
        if self.bucketing:
            need(not self.varsize, "bucketing", "cannot be used with varsize (do not resize images): choose one")
            need(
                isinstance(self.bucket_step, int) and self.bucket_step > 0 and self.bucket_step % 8 == 0,
                "bucket_step",
                f"must be a positive multiple of 8, got {self.bucket_step!r}",
            )
            need(self.bucket_max_aspect >= 1, "bucket_max_aspect", f"must be 1 or more, got {self.bucket_max_aspect}")
            self.buckets().sizes  # noqa: B018 -- raises ConfigError when the step leaves no bucket
        try:
            re.compile(self.filename_word_regex or "")
        except re.error as e:
            raise ConfigError("filename_word_regex", f"not a valid regular expression: {e}") from None


@dataclass
class ImageRecord:
    path: Path
    filename_text: str  # caption source: the .txt file or the cleaned filename
    size: tuple[int, int]  # (width, height) of the training pixels
    rgb: torch.Tensor | None  # uint8 [3, H, W]; None after `release_pixels`
    alpha: np.ndarray | None  # uint8 [H, W], aligned with rgb; only with use_weight and transparency
    #: where the pixels came from (SDXL's size conditioning): the source's (width, height), its size
    #: once resized, and the crop's (left, top) in that resized image; defaults: no resize, no crop
    source_size: tuple[int, int] | None = None
    resized_size: tuple[int, int] | None = None
    crop_left_top: tuple[int, int] = (0, 0)
    repeats: int = 1  # items per epoch from its folder's `N_` prefix (folder_repeats); 1 otherwise

    def geometry(self, flipped: bool = False) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(original (h, w), crop (top, left), target (h, w)) as SDXL takes them; a mirrored
        image's crop starts as far from the left as the unmirrored one ends from the right."""
        w, h = self.size
        src_w, src_h = self.source_size or self.size
        res_w, _ = self.resized_size or self.size
        left, top = self.crop_left_top
        if flipped:
            left = res_w - left - w
        return (src_h, src_w), (top, left), (h, w)


@dataclass
class ImageSet:
    images: list[ImageRecord]
    skipped: list[tuple[str, str]]  # (path, reason) of image files that could not be read


def read_template(path: str | os.PathLike[str], require_name: bool = True) -> list[str]:
    """Template lines, stripped. Deviation: blank lines are dropped (the host keeps them as empty prompts)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"Prompt template file not found: {p}")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DatasetError(f"Prompt template file {p} has no prompt lines.")
    if require_name and not any("[name]" in ln for ln in lines):
        raise DatasetError(
            f"Prompt template {p.name} ({p}) has no [name] placeholder: textual inversion would learn "
            "nothing, since only prompts containing the embedding's name train it. Pick a template "
            "with [name] (e.g. subject.txt or style_filewords.txt)."
        )
    if require_name and not all("[name]" in ln for ln in lines):
        log.warning("Some lines of prompt template %s have no [name]; steps using them train nothing.", p)
    return lines


def filename_caption(path: Path, word_regex: str = "", join_string: str = " ") -> str:
    """The host's caption source: `<stem>.txt` if present, else the cleaned filename (dataset.py:73-84).

    Deviations: a UTF-8 BOM and trailing line breaks of the .txt are removed (the host keeps them).
    """
    text_file = path.with_name(path.stem + ".txt")  # host: os.path.splitext(path)[0] + ".txt"
    if text_file.is_file():
        return text_file.read_text(encoding="utf-8-sig").rstrip("\r\n")
    text = _RE_NUMBERS_AT_START.sub("", path.stem)
    if word_regex:
        text = (join_string or "").join(re.findall(word_regex, text))
    return text


def resolve_seed(seed: int | None) -> int | None:
    """None for "no fixed seed" (None or negative, like the UI's -1)."""
    return None if seed is None or seed < 0 else seed


def _image_extensions() -> frozenset[str]:
    return frozenset(Image.registered_extensions())


def _read_image(
    path: Path, opts: DatasetOptions, rng: random.Random
) -> tuple[Image.Image, Image.Image | None, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(rgb, alpha, source size, size once resized, crop (left, top) in it) of one training image."""
    with open_image(path) as im:
        im.load()
        try:
            im = ImageOps.exif_transpose(im)  # host images.read; a broken EXIF block is ignored there too
        except Exception:
            pass
        alpha = None
        if opts.use_weight:
            if "transparency" in im.info and "A" not in im.getbands():
                im = im.convert("RGBA")  # palette/colour-key transparency (the host misses most of it)
            if "A" in im.getbands():
                alpha = im.getchannel("A")
        rgb = im.convert("RGB")
    if opts.varsize:
        return rgb, alpha, rgb.size, rgb.size, (0, 0)
    buckets = opts.buckets()
    w, h = buckets.pick(rgb.size) if buckets is not None else (opts.width, opts.height)
    if opts.crop == "resize":
        box = None
        size = (w, h)
        left = top = 0
    else:
        scale = max(w / rgb.width, h / rgb.height)
        size = (max(w, round(rgb.width * scale)), max(h, round(rgb.height * scale)))
        if opts.crop == "center":
            left, top = (size[0] - w) // 2, (size[1] - h) // 2
        else:
            left, top = rng.randint(0, size[0] - w), rng.randint(0, size[1] - h)
        box = (left, top, left + w, top + h)

    def fit(img: Image.Image) -> Image.Image:
        img = img.resize(size, _BICUBIC)
        return img.crop(box) if box else img

    return fit(rgb), (fit(alpha) if alpha is not None else None), rgb.size, size, (left, top)


def _check_bucket_fit(path: Path, source: tuple[int, int], bucket: tuple[int, int], plan: BucketPlan) -> None:
    """Warn about an image its bucket enlarges without bucket_upscale (a side below one step) or whose
    shape is beyond the buckets' aspect-ratio limit (stretched or cropped to a bucket of another shape)."""
    if not plan.upscale and (bucket[0] > source[0] or bucket[1] > source[1]):
        log.warning("%s (%dx%d) is enlarged to %dx%d: a side is below the bucket step %d px",
                    path, *source, *bucket, plan.step)
    aspect = max(source[0] / source[1], source[1] / source[0])
    if aspect > plan.max_aspect:
        log.warning("%s (%dx%d) has an aspect ratio of %.2f, beyond bucket_max_aspect %g: it trains at %dx%d",
                    path, *source, aspect, plan.max_aspect, *bucket)


_RE_FOLDER_REPEATS = re.compile(r"^(\d+)_(.+)$")  # kohya's `10_concept`


def folder_repeats(name: str) -> int:
    """The repeat count a subfolder's name gives (kohya's `N_name`), 1 for a name without it."""
    m = _RE_FOLDER_REPEATS.match(name)
    return int(m.group(1)) if m else 1


def _image_candidates(root: Path, names: list[str], subfolders: bool) -> list[tuple[Path, int]]:
    """(path, repeats) of every file to try: the folder's own files (the host reads only those), and
    with `subfolders` the files of each subfolder one level down, counted N times for `N_name`
    (a `0_name` folder is left out, as kohya does; dot-folders are skipped)."""
    out: list[tuple[Path, int]] = []
    for name in names:
        path = root / name
        if not (subfolders and path.is_dir()):
            out.append((path, 1))
            continue
        if name.startswith("."):
            continue
        n = folder_repeats(name)
        if n == 0:
            log.info("Leaving out %s: a 0_ folder repeats its images 0 times", path)
            continue
        out.extend((path / sub, n) for sub in sorted(os.listdir(path)))
    return out


def load_images(opts: DatasetOptions) -> ImageSet:
    """Read every image of `opts.data_root` (sorted by name; with `folder_repeats` also those of its
    subfolders, see `_image_candidates`). Non-image files are ignored; files with an image extension
    that fail to decode are skipped, logged and listed in `skipped`."""
    opts.validate()
    root = Path(opts.data_root) if str(opts.data_root).strip() else None
    if root is None:
        raise DatasetError("No dataset directory given.")
    if not root.is_dir():
        raise DatasetError(f"Dataset directory {root} does not exist or is not a directory.")
    names = sorted(os.listdir(root))
    if not names:
        raise DatasetError(f"Dataset directory {root} is empty.")
    image_exts = _image_extensions()
    seed = resolve_seed(opts.seed)
    rng = random.Random(f"{seed}-crop" if seed is not None else None)
    images: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    buckets = opts.buckets()
    for path, repeats in _image_candidates(root, names, opts.folder_repeats):
        if not path.is_file():
            continue
        if path.suffix.lower() == ".txt":
            continue
        is_image_ext = path.suffix.lower() in image_exts
        try:
            rgb, alpha, source_size, resized, crop = _read_image(path, opts, rng)
        except Exception as e:  # corrupt, truncated, unsupported mode, decompression bomb...
            if is_image_ext:
                reason = f"{type(e).__name__}: {e}"
                log.warning("Skipping unreadable image %s (%s)", path, reason)
                skipped.append((str(path), reason))
            continue  # other files that are not images are ignored silently, like the host
        if buckets is not None:
            _check_bucket_fit(path, source_size, rgb.size, buckets)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        images.append(
            ImageRecord(
                path=path,
                filename_text=filename_caption(path, opts.filename_word_regex, opts.filename_join_string),
                size=rgb.size,
                rgb=pixels,
                alpha=np.asarray(alpha, dtype=np.uint8).copy() if alpha is not None else None,
                source_size=source_size,
                resized_size=resized,
                crop_left_top=crop,
                repeats=repeats,
            )
        )
    if not images:
        detail = "".join(f"\n  {p}: {r}" for p, r in skipped)
        raise DatasetError(f"No usable images found in {root}.{detail}")
    return ImageSet(images, skipped)
