"""Core: the preprocess job — turn a folder of raw pictures into a training folder (PNGs + captions).

The host's old Train→Preprocess tab (A1111 1.6 `modules/textual_inversion/preprocess.py`, removed in
1.7; its operations live on in `extensions-builtin/postprocessing-for-training`). Field names are the
old request's, so `PreprocessConfig.from_dict` takes a 1.6 `/sdapi/v1/preprocess` body as it was.
The image operations themselves are in `preprocess_crop`. The source folder is only ever read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps

from lib_sdtrain.core.errors import ConfigError, SdtrainError
from lib_sdtrain.core.formats.fsutil import atomic_write, atomic_write_bytes
from lib_sdtrain.core.formats.limits import open_image
from lib_sdtrain.core.options.config import ConfigBase, _opt
from lib_sdtrain.core.options.holdout import held_out
from lib_sdtrain.core.preprocess.crop import (
    MULTICROP_STEP,
    OBJECTIVES,
    auto_sized_crop,
    center_crop,
    flipped,
    focal_crop,
    should_split,
    split_tiles,
)

log = logging.getLogger(__name__)

#: What to do with a `<name>.txt` caption found beside a source image (the host's choices).
TXT_ACTIONS = ("ignore", "copy", "prepend", "append")
#: The old API's names for two fields (the 1.6 function's parameters; its UI used the process_ names).
API_ALIASES = {"split_threshold": "process_split_threshold", "overlap_ratio": "process_overlap_ratio"}
#: with validation_split: the training and the validation folder inside the destination
SPLIT_FOLDERS = ("train", "validation")
DEBUG_FOLDER = "focal-crop-debug"  # debug images go here, so training never picks them up
MAX_BASENAME_BYTES = 160  # keeps "{index:05}-{sub}-{name}.png" and its temporary twin under 255 bytes
MAX_SIDE = 8192

Captioner = Callable[[Image.Image], str]


def _require(cond: Any, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(name, message)


def _source_files(folder: Path) -> list[Path]:
    """Files to preprocess, sorted by name: every regular file except `.txt` captions."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".txt")


@dataclass
class PreprocessConfig(ConfigBase):
    """A1111 1.6 `preprocess(...)` fields (Train → Preprocess images), plus sdtrain's `overwrite`."""

    kind: ClassVar[str] = "preprocess"
    WRITE_FOLDERS: ClassVar[tuple[str, ...]] = ("process_dst",)

    process_src: str = _opt("", "Source directory")
    process_dst: str = _opt("", "Destination directory")
    process_width: int = _opt(512, "Width", minimum=64, maximum=2048, step=8)
    process_height: int = _opt(512, "Height", minimum=64, maximum=2048, step=8)
    preprocess_txt_action: str = _opt(
        "ignore",
        "Existing Caption txt Action",
        help="A <name>.txt beside a source image: ignore it, copy it as the caption, or put it "
        "before/after the generated caption",
        choices=TXT_ACTIONS,
    )
    process_keep_original_size: bool = _opt(False, "Keep original size")
    process_flip: bool = _opt(False, "Create flipped copies")
    process_split: bool = _opt(False, "Split oversized images")
    process_caption: bool = _opt(False, "Use BLIP for caption")
    process_caption_deepbooru: bool = _opt(False, "Use deepbooru for caption")
    process_split_threshold: float = _opt(0.5, "Split image threshold", minimum=0.0, maximum=1.0, step=0.05)
    process_overlap_ratio: float = _opt(0.2, "Split image overlap ratio", minimum=0.0, maximum=0.9, step=0.05)
    process_focal_crop: bool = _opt(False, "Auto focal point crop")
    process_focal_crop_face_weight: float = _opt(
        0.9, "Focal point face weight", minimum=0.0, maximum=1.0, step=0.05
    )
    process_focal_crop_entropy_weight: float = _opt(
        0.15, "Focal point entropy weight", minimum=0.0, maximum=1.0, step=0.05
    )
    process_focal_crop_edges_weight: float = _opt(
        0.5, "Focal point edges weight", minimum=0.0, maximum=1.0, step=0.05
    )
    process_focal_crop_debug: bool = _opt(False, "Create debug image")
    process_multicrop: bool = _opt(False, "Auto-sized crop")
    process_multicrop_mindim: int = _opt(384, "Dimension lower bound", minimum=64, maximum=2048, step=8)
    process_multicrop_maxdim: int = _opt(768, "Dimension upper bound", minimum=64, maximum=2048, step=8)
    process_multicrop_minarea: int = _opt(64 * 64, "Area lower bound", minimum=64 * 64, maximum=2048 * 2048)
    process_multicrop_maxarea: int = _opt(640 * 640, "Area upper bound", minimum=64 * 64, maximum=2048 * 2048)
    process_multicrop_objective: str = _opt("Maximize area", "Resizing objective", choices=OBJECTIVES)
    process_multicrop_threshold: float = _opt(0.1, "Error threshold", minimum=0.0, maximum=1.0, step=0.01)
    overwrite: bool = _opt(False, "Write into a destination that already has files (same names are replaced)")
    validation_split: float = _opt(
        0.0, "Hold out this fraction of the pictures for validation (0: none)", minimum=0.0, maximum=0.9, step=0.05,
        help="writes <destination>/train and <destination>/validation; every output of one picture (flips, "
        "tiles, crops) goes to the same one; chosen from the file names, the same every run",
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, ignore: tuple[str, ...] = ()) -> Any:
        """Also takes the 1.6 API body as it was: `split_threshold`, `overlap_ratio`, `id_task`."""
        data = dict(data or {})
        for old, new in API_ALIASES.items():
            if old in data:
                _require(new not in data, old, f"given together with {new}; send one of them")
                data[new] = data.pop(old)
        return super().from_dict(data, ignore=(*ignore, "id_task"))

    def validate(self) -> None:
        super().validate()
        self._validate_src()
        self._validate_dst()
        self._validate_sizes()
        self._validate_ratios()
        self._validate_multicrop()
        _require(0.0 <= self.validation_split < 1.0, "validation_split",
                 f"must be 0 (off) or a fraction below 1, got {self.validation_split}")

    def _validate_src(self) -> None:
        _require(self.process_src.strip(), "process_src", "Source directory is empty")
        src = Path(self.process_src).expanduser()
        _require(src.is_dir(), "process_src", f"Source directory doesn't exist or is not a folder: {src}")
        _require(_source_files(src), "process_src", f"Source directory has no files to preprocess: {src}")

    def _validate_dst(self) -> None:
        _require(self.process_dst.strip(), "process_dst", "Destination directory is empty")
        src, dst = self.src_path(), self.dst_path()
        _require(dst != src, "process_dst", "same directory specified as source and destination")
        _require(
            src not in dst.parents,
            "process_dst",
            f"{dst} is inside the source directory {src}; the source folder is never written to",
        )
        if dst.exists():
            _require(dst.is_dir(), "process_dst", f"{dst} exists and is not a folder")
            _require(
                self.overwrite or not any(dst.iterdir()),
                "process_dst",
                f"Destination directory {dst} is not empty; choose an empty one or set overwrite",
            )

    def _validate_sizes(self) -> None:
        for name in ("process_width", "process_height"):
            value = getattr(self, name)
            _require(
                64 <= value <= MAX_SIDE and value % 8 == 0,
                name,
                f"must be a multiple of 8 between 64 and {MAX_SIDE}, got {value}",
            )

    def _validate_ratios(self) -> None:
        limits = {
            "process_split_threshold": 1.0,
            "process_overlap_ratio": 0.9,
            "process_focal_crop_face_weight": 1.0,
            "process_focal_crop_entropy_weight": 1.0,
            "process_focal_crop_edges_weight": 1.0,
            "process_multicrop_threshold": 1.0,
        }
        for name, top in limits.items():
            value = getattr(self, name)
            _require(0.0 <= value <= top, name, f"must be between 0 and {top}, got {value}")

    def _validate_multicrop(self) -> None:
        lo, hi = self.process_multicrop_mindim, self.process_multicrop_maxdim
        _require(
            64 <= lo <= MAX_SIDE, "process_multicrop_mindim", f"must be between 64 and {MAX_SIDE}, got {lo}"
        )
        _require(
            lo <= hi <= MAX_SIDE, "process_multicrop_maxdim", f"must be between {lo} and {MAX_SIDE}, got {hi}"
        )
        amin, amax = self.process_multicrop_minarea, self.process_multicrop_maxarea
        _require(amin >= 1, "process_multicrop_minarea", f"must be positive, got {amin}")
        _require(
            amax >= amin, "process_multicrop_maxarea", f"must be at least the lower bound {amin}, got {amax}"
        )
        if self.process_multicrop:
            dims = range(lo, hi + 1, MULTICROP_STEP)
            _require(
                any(amin <= w * h <= amax for w in dims for h in dims),
                "process_multicrop_maxarea",
                f"no size with sides in {list(dims)} has an area between {amin} and {amax}",
            )

    def src_path(self) -> Path:
        return Path(self.process_src).expanduser().resolve()

    def dst_path(self) -> Path:
        return Path(self.process_dst).expanduser().resolve()


# --- reading source images ------------------------------------------------------------------------
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_EXIF_ORIENTATION = 0x0112


def _wide_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale → 8-bit, scaled (Pillow's own convert would clip at 255)."""
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":  # floats: 0..1 when they fit there, else taken as 0..255
        a = a * 255.0 if a.size and float(a.max()) <= 1.0 else a
    else:  # "I;16*", and "I", which is how 16-bit PNG and PGM files open
        a = np.clip(a, 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Core: an RGB copy of `im` and a note saying what was converted (None when it was plain RGB).
    Transparency (alpha channel, palette or colour-key) is composited on white."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.copy(), None
    if mode in _WIDE_MODES:
        return _wide_to_8bit(im).convert("RGB"), f"converted {mode} (high bit depth) to 8-bit RGB"
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB"), f"converted {mode} to RGB, transparency composited on white"
    return im.convert("RGB"), f"converted {mode} to RGB"


def load_image(path: str | os.PathLike[str]) -> tuple[Image.Image, list[str]]:
    """Core: read an image fully as RGB, EXIF orientation applied, first frame of an animation.
    Returns the image and notes on what was changed. Raises whatever PIL raises on a bad file."""
    notes: list[str] = []
    with open_image(path) as im:
        if getattr(im, "is_animated", False):
            notes.append(f"animated ({getattr(im, 'n_frames', '?')} frames): first frame used")
            im.seek(0)
        im.load()
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION)
            upright = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block: keep the pixels as stored
            orientation, upright = None, im
        if orientation not in (None, 1):
            notes.append(f"EXIF orientation {orientation} applied")
        rgb, note = to_rgb(upright)
    if note:
        notes.append(note)
    return rgb, notes


# --- captions -------------------------------------------------------------------------------------
def read_source_caption(path: str | os.PathLike[str]) -> str | None:
    """Core: the text of `<stem>.txt` beside a source image, stripped, or None."""
    txt = Path(os.path.splitext(path)[0] + ".txt")
    if not txt.is_file():
        return None
    return txt.read_text(encoding="utf-8-sig", errors="replace").strip() or None


def combine_caption(generated: str, existing: str | None, action: str) -> str:
    """Core: the host's rule: copy → the existing caption; prepend/append → existing before/after the
    generated one (space-joined); ignore, or no existing caption → the generated one."""
    caption = generated
    if existing:
        if action == "copy":
            caption = existing
        elif action == "prepend":
            caption = f"{existing} {generated}"
        elif action == "append":
            caption = f"{generated} {existing}"
    return caption.strip()


def output_stem(index: int, subindex: int, source: str | os.PathLike[str]) -> str:
    """Core: the host's output name `{index:05}-{subindex}-{source stem}` (stem cut to a safe length)."""
    stem = Path(source).stem.encode("utf-8")[:MAX_BASENAME_BYTES].decode("utf-8", "ignore")
    return f"{index:05}-{subindex}-{stem}"


# --- the job --------------------------------------------------------------------------------------
@dataclass
class PreprocessResult:
    """What a run wrote. `skipped`: (source, reason) of inputs that gave no output; `notes`: (source,
    note) on conversions and partial results."""

    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    total: int = 0
    processed: int = 0
    stopped: bool = False
    #: with validation_split: the two folders written
    train_dir: str | None = None
    validation_dir: str | None = None

    @property
    def images(self) -> list[str]:
        return [p for p in self.written if p.endswith(".png") and os.sep + DEBUG_FOLDER + os.sep not in p]

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": list(self.written),
            "skipped": [list(s) for s in self.skipped],
            "notes": [list(n) for n in self.notes],
            "total": self.total,
            "processed": self.processed,
            "stopped": self.stopped,
            "train_dir": self.train_dir,
            "validation_dir": self.validation_dir,
        }

    def __str__(self) -> str:
        head = "Preprocessing stopped" if self.stopped else "Preprocessing finished"
        text = (
            f"{head}: {self.processed}/{self.total} source files, {len(self.images)} images written, "
            f"{len(self.skipped)} skipped"
        )
        if self.train_dir and self.validation_dir:
            held = sum(1 for p in self.images if Path(p).parent == Path(self.validation_dir))
            text += (f"; training images in {self.train_dir}, {held} held-out validation images in "
                     f"{self.validation_dir}")
        return text


@dataclass
class _Output:
    image: Image.Image
    debug: bool = False  # debug images: own folder, no caption, no flip


@dataclass
class _Run:
    cfg: PreprocessConfig
    dst: Path
    control: Any
    captioner: Captioner | None
    deepbooru: Captioner | None
    result: PreprocessResult = field(default_factory=PreprocessResult)

    def emit(self, kind: str, **data: Any) -> None:
        if self.control is not None:
            self.control.emit(kind, **data)

    def note(self, source: Path, text: str) -> None:
        self.result.notes.append((str(source), text))
        self.emit("log", text=f"{source.name}: {text}")

    def skip(self, source: Path, reason: str) -> None:
        log.warning("preprocess: skipping %s (%s)", source, reason)
        self.result.skipped.append((str(source), reason))
        self.emit("log", text=f"skipped {source.name}: {reason}")

    def wrote(self, path: Path, what: str) -> None:
        self.result.written.append(str(path))
        self.emit("file", path=str(path), what=what)

    @property
    def stop_requested(self) -> bool:
        return bool(self.control is not None and self.control.stop_requested)


def _operations(run: _Run, image: Image.Image, source: Path) -> Iterator[_Output]:
    """The host's order: split, focal crop, auto-sized crop, original size — each from the original
    image, each adding outputs; the plain cover crop only when none of them applied."""
    cfg, w, h = run.cfg, run.cfg.process_width, run.cfg.process_height
    default = True
    if cfg.process_split and should_split(image.size, w, h, cfg.process_split_threshold):
        default = False
        for tile in split_tiles(image, w, h, cfg.process_overlap_ratio):
            yield _Output(tile)
    if cfg.process_focal_crop:
        default = False
        crop = focal_crop(
            image,
            w,
            h,
            face_weight=cfg.process_focal_crop_face_weight,
            entropy_weight=cfg.process_focal_crop_entropy_weight,
            edges_weight=cfg.process_focal_crop_edges_weight,
            debug=cfg.process_focal_crop_debug,
        )
        yield _Output(crop.image)
        if crop.debug is not None:
            yield _Output(crop.debug, debug=True)
    if cfg.process_multicrop:
        default = False
        cropped = auto_sized_crop(
            image,
            cfg.process_multicrop_mindim,
            cfg.process_multicrop_maxdim,
            cfg.process_multicrop_minarea,
            cfg.process_multicrop_maxarea,
            cfg.process_multicrop_objective,
            cfg.process_multicrop_threshold,
        )
        if cropped is None:
            run.note(
                source,
                f"auto-sized crop: no size fits a {image.width}x{image.height} image within the error threshold",
            )
        else:
            yield _Output(cropped)
    if cfg.process_keep_original_size:
        default = False
        yield _Output(image)
    if default:
        yield _Output(center_crop(image, w, h))


def _generated_caption(run: _Run, image: Image.Image, source: Path) -> str:
    """BLIP, then deepbooru, joined by ", " (the host's order). A failing captioner ends the job."""
    parts = []
    for name, captioner in (("BLIP", run.captioner), ("deepbooru", run.deepbooru)):
        wanted = run.cfg.process_caption if name == "BLIP" else run.cfg.process_caption_deepbooru
        if not wanted or captioner is None:
            continue
        try:
            text = captioner(image)
        except Exception as e:
            raise SdtrainError(f"{name} captioning of {source} failed: {type(e).__name__}: {e}") from e
        parts.append(str(text or "").strip())
    return ", ".join(p for p in parts if p)


def _caption(run: _Run, image: Image.Image, source: Path, existing: str | None) -> str:
    action = run.cfg.preprocess_txt_action
    if existing and action == "copy":
        return existing  # the generated caption would be thrown away: don't run the captioners
    return combine_caption(_generated_caption(run, image, source), existing, action)


def _save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _save_pair(run: _Run, stem: str, image: Image.Image, caption: str) -> None:
    png, txt = run.dst / f"{stem}.png", run.dst / f"{stem}.txt"
    _save_png(png, image)
    run.wrote(png, "image")
    if caption:
        atomic_write_bytes(txt, caption.encode("utf-8"))
        run.wrote(txt, "caption")
    elif txt.is_file():  # overwrite: a stale caption would attach itself to the new image
        txt.unlink()


def _save_debug(run: _Run, stem: str, image: Image.Image) -> None:
    folder = run.dst / DEBUG_FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / f"{stem}.png"
    _save_png(path, image)
    run.wrote(path, "debug")


def _save_outputs(run: _Run, index: int, source: Path, outputs: Iterator[_Output]) -> int:
    existing = read_source_caption(source) if run.cfg.preprocess_txt_action != "ignore" else None
    sub = last = 0
    for out in outputs:
        if out.debug:  # named after the image it explains
            _save_debug(run, output_stem(index, last, source), out.image)
            continue
        caption = _caption(run, out.image, source, existing)
        last = sub
        _save_pair(run, output_stem(index, sub, source), out.image, caption)
        sub += 1
        if run.cfg.process_flip:  # same picture mirrored: same caption, captioners not run again
            _save_pair(run, output_stem(index, sub, source), flipped(out.image), caption)
            sub += 1
    return sub


def _process_one(run: _Run, index: int, source: Path) -> None:
    try:
        image, notes = load_image(source)
    except Exception as e:  # corrupt, truncated, not an image, unsupported mode, decompression bomb
        run.skip(source, f"cannot read image: {type(e).__name__}: {e}")
        return
    for text in notes:
        run.note(source, text)
    if not _save_outputs(run, index, source, _operations(run, image, source)):
        run.skip(source, "no output (auto-sized crop found no size within the error threshold)")


def check_captioners(
    cfg: PreprocessConfig, captioner: Captioner | None, deepbooru: Captioner | None
) -> None:
    if cfg.process_caption and captioner is None:
        raise ConfigError(
            "process_caption",
            "BLIP captions were requested, but there is no captioner available in this host",
        )
    if cfg.process_caption_deepbooru and deepbooru is None:
        raise ConfigError(
            "process_caption_deepbooru",
            "deepbooru captions were requested, but there is no captioner available in this host",
        )


def run_preprocess(
    cfg: PreprocessConfig,
    control: Any = None,
    captioner: Captioner | None = None,
    deepbooru: Captioner | None = None,
) -> PreprocessResult:
    """Core: preprocess every file of `cfg.process_src` into `cfg.process_dst`.

    `captioner` (BLIP) and `deepbooru` map an RGB image to text; asking for a caption kind without its
    captioner raises ConfigError before anything is written. `control` (a JobControl or None) gets
    "progress" (done, total), "file" (path, what) and "log" (text) events; a stop request ends the
    run after the current image. Unreadable files are skipped and listed, never fatal.
    """
    cfg.validate()  # again: the destination may have been filled since the job was queued
    check_captioners(cfg, captioner, deepbooru)
    sources = _source_files(cfg.src_path())
    run = _Run(cfg, cfg.dst_path(), control, captioner, deepbooru)
    run.result.total = len(sources)
    held = held_out([s.name for s in sources], cfg.validation_split) if cfg.validation_split else set()
    run.dst.mkdir(parents=True, exist_ok=True)
    folders = {False: run.dst, True: run.dst}  # held out → its folder
    if cfg.validation_split:
        folders = {False: run.dst / SPLIT_FOLDERS[0], True: run.dst / SPLIT_FOLDERS[1]}
        for folder in folders.values():
            folder.mkdir(exist_ok=True)
        run.result.train_dir, run.result.validation_dir = str(folders[False]), str(folders[True])
    run.emit("progress", done=0, total=len(sources))
    for index, source in enumerate(sources):
        if run.stop_requested:
            run.result.stopped = True
            break
        run.dst = folders[source.name in held]
        _process_one(run, index, source)
        run.result.processed = index + 1
        run.emit("progress", done=index + 1, total=len(sources))
    run.emit("log", text=str(run.result))
    return run.result
