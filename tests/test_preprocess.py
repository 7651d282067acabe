"""The preprocess job and its image operations, on generated images."""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.preprocess.crop import (
    aspect_error,
    auto_crop_size,
    auto_sized_crop,
    center_crop,
    corner_points,
    cover_box,
    entropy_point,
    flipped,
    focal_crop,
    should_split,
    split_boxes,
    split_ratio,
    split_tiles,
)
from lib_sdtrain.core.preprocess.operations import (
    DEBUG_FOLDER,
    PreprocessConfig,
    combine_caption,
    load_image,
    output_stem,
    run_preprocess,
    to_rgb,
)

GRAY = (128, 128, 128)


# --- helpers --------------------------------------------------------------------------------------
def checker(size: int, cell: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((((yy // cell) + (xx // cell)) % 2) * 255).astype(np.uint8)


def marked(width: int, height: int, left: int, top: int, side: int = 96) -> Image.Image:
    """A flat gray picture with a high-contrast checkered square (the region of interest)."""
    a = np.full((height, width, 3), GRAY, np.uint8)
    a[top : top + side, left : left + side] = checker(side)[..., None]
    return Image.fromarray(a)


def inside(roi: tuple[float, float, float, float], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= roi[0] and box[1] <= roi[1] and roi[2] <= box[2] and roi[3] <= box[3]


def thirds(width: int, height: int) -> Image.Image:
    """Left third red, middle green, right third blue."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 3, 0] = 255
    a[:, width // 3 : 2 * width // 3, 1] = 255
    a[:, 2 * width // 3 :, 2] = 255
    return Image.fromarray(a)


def png_bytes(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG", **kw)
    return b.getvalue()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


class FakeControl:
    def __init__(self, stop_after: int | None = None):
        self.events: list[tuple[str, dict]] = []
        self.stop_after = stop_after

    def emit(self, kind: str, **data) -> None:
        self.events.append((kind, data))

    @property
    def stop_requested(self) -> bool:
        done = [d["done"] for k, d in self.events if k == "progress"]
        return self.stop_after is not None and bool(done) and done[-1] >= self.stop_after


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(folder / "red cat.png")
    Image.new("RGB", (300, 600), (30, 200, 30)).save(folder / "green dog.jpg")
    return folder


def cfg(src: Path, dst: Path, **kw) -> PreprocessConfig:
    return PreprocessConfig.from_dict({"process_src": str(src), "process_dst": str(dst), **kw})


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


# --- cover crop and flip --------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1000, 400), (400, 1000), (700, 700), (50, 30)])
@pytest.mark.parametrize("target", [(512, 512), (512, 768), (768, 384)])
def test_center_crop_sizes(size, target):
    assert center_crop(Image.new("RGB", size), *target).size == target


def test_center_crop_keeps_the_middle():
    out = np.asarray(center_crop(thirds(900, 300), 256, 256))
    assert out[:, :, 1].min() > 200 and out[:, 10:-10, 0].max() < 40 and out[:, 10:-10, 2].max() < 40


def test_flip_mirrors():
    im = thirds(90, 30)
    a, b = np.asarray(im), np.asarray(flipped(im))
    assert b.shape == a.shape and (b == a[:, ::-1]).all()


# --- split ----------------------------------------------------------------------------------------
def test_split_threshold_semantics():
    assert split_ratio((512, 2048), 512, 512) == pytest.approx(0.25)
    assert split_ratio((2048, 512), 512, 512) == pytest.approx(0.25)
    assert should_split((512, 2048), 512, 512, 0.5)
    assert not should_split((512, 900), 512, 512, 0.5)  # ratio 0.57 > threshold
    assert not should_split((512, 512), 512, 512, 1.0)  # ratio 1: never split
    assert not should_split((2048, 512), 2048, 512, 1.0)  # same shape as the target


def check_tiles(size, w, h, overlap):
    scaled, boxes = split_boxes(size, w, h, overlap)
    vertical = size[1] > size[0]
    along = 1 if vertical else 0
    length, tile = scaled[along], (h if vertical else w)
    assert len(boxes) >= 2
    for b in boxes:
        assert (b[2] - b[0], b[3] - b[1]) == (w, h)
        assert b[0] >= 0 and b[1] >= 0 and b[2] <= scaled[0] and b[3] <= scaled[1]
    covered = np.zeros(length, bool)  # union along the long side; each tile spans the short side fully
    for b in boxes:
        covered[b[along] : b[along + 2]] = True
    assert covered.all()
    overlaps = [(a[along + 2] - b[along]) / tile for a, b in itertools.pairwise(boxes)]
    assert all(o >= overlap - 1 / tile for o in overlaps)
    assert max(overlaps) - min(overlaps) <= 1 / tile + 1e-9  # evenly spaced
    # as few tiles as possible: one tile fewer could not keep the overlap
    if len(boxes) > 2:
        assert (length - tile) / (len(boxes) - 2) > tile * (1 - overlap)
    return scaled, boxes, overlaps


@pytest.mark.parametrize(
    "size,target,overlap",
    [((512, 2048), (512, 512), 0.25), ((600, 2500), (512, 512), 0.2), ((3000, 700), (512, 512), 0.2),
     ((3000, 700), (384, 640), 0.5), ((300, 1800), (512, 256), 0.0), ((1000, 1000), (256, 512), 0.3)],
)  # fmt: skip
def test_split_tiles_cover_the_image_with_the_overlap(size, target, overlap):
    check_tiles(size, *target, overlap)


def test_split_overlap_is_exact_when_it_fits():
    # 2048 = 512 + 4 * 384: five tiles, each step 384 = 512 * (1 - 0.25)
    scaled, boxes, overlaps = check_tiles((512, 2048), 512, 512, 0.25)
    assert scaled == (512, 2048) and len(boxes) == 5
    assert overlaps == [pytest.approx(0.25)] * 4


def test_split_tiles_images():
    im = Image.fromarray(np.tile((np.arange(2048) // 8).astype(np.uint8)[:, None, None], (1, 512, 3)))
    tiles = split_tiles(im, 512, 512, 0.25)
    assert [t.size for t in tiles] == [(512, 512)] * 5
    assert np.asarray(tiles[0])[0, 0, 0] == 0 and np.asarray(tiles[-1])[-1, 0, 0] == 255


def test_split_barely_elongated_does_not_divide_by_zero():
    _, boxes = split_boxes((512, 513), 512, 512, 0.2)  # rounds to one tile's length
    assert boxes and all((b[2] - b[0], b[3] - b[1]) == (512, 512) for b in boxes)


# --- auto-sized crop ------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["Maximize area", "Minimize error"])
@pytest.mark.parametrize("size", [(1000, 700), (700, 1000), (1920, 1080), (800, 800), (3000, 1000)])
def test_auto_crop_size_within_bounds(size, objective):
    bounds = {"mindim": 384, "maxdim": 768, "minarea": 64 * 64, "maxarea": 640 * 640}
    bounds.update(objective=objective, threshold=0.1)
    wh = auto_crop_size(size, **bounds)
    if size == (3000, 1000):  # 3:1 cannot be met within 10% by sides of 384..768
        assert wh is None and auto_sized_crop(Image.new("RGB", size), **bounds) is None
        return
    assert wh is not None
    w, h = wh
    assert 384 <= w <= 768 and 384 <= h <= 768 and (w - 384) % 64 == 0 and (h - 384) % 64 == 0
    assert 64 * 64 <= w * h <= 640 * 640
    assert aspect_error(size, w, h) <= 0.1
    assert auto_sized_crop(Image.new("RGB", size), **bounds).size == wh


def test_auto_crop_objectives_differ():
    size = (1000, 700)
    big = auto_crop_size(size, 384, 768, 64 * 64, 640 * 640, "Maximize area", 0.1)
    exact = auto_crop_size(size, 384, 768, 64 * 64, 640 * 640, "Minimize error", 0.1)
    assert big == (768, 512)  # the largest area under 640², 4% off
    assert aspect_error(size, *exact) < aspect_error(size, *big)


# --- focal crop -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,roi_at,target",
    [((1024, 512), (820, 200), (512, 512)), ((1024, 512), (40, 380), (512, 512)),
     ((512, 1400), (300, 1200), (512, 512)), ((1600, 900), (1350, 80), (512, 768)),
     ((900, 1600), (60, 100), (768, 512))],
)  # fmt: skip
def test_focal_crop_keeps_the_region_of_interest(size, roi_at, target):
    side = 96
    im = marked(*size, *roi_at, side=side)
    roi = (roi_at[0], roi_at[1], roi_at[0] + side, roi_at[1] + side)
    crop = focal_crop(im, *target, debug=True)
    assert crop.image.size == target
    assert inside(roi, crop.box), (roi, crop.box)
    assert crop.box[0] >= 0 and crop.box[2] <= size[0] + 1e-6 and crop.box[3] <= size[1] + 1e-6
    # meaningful: a plain centre crop would have lost it, and the crop really shows it
    assert not inside(roi, cover_box(size, *target))
    scale = max(target[0] / size[0], target[1] / size[1])
    visible = np.count_nonzero(np.abs(np.asarray(crop.image.convert("L")).astype(int) - 128) > 60)
    assert visible >= 0.8 * (side * scale) ** 2  # the crop's pixels really show the whole square
    assert crop.debug is not None and crop.debug.mode == "RGB"


def test_focal_crop_of_a_flat_image_is_centred():
    crop = focal_crop(Image.new("RGB", (1000, 500), GRAY), 500, 500)
    assert crop.box == pytest.approx((250, 0, 750, 500))
    assert crop.debug is None


def test_focal_sources_each_find_the_square():
    im = marked(1024, 512, 800, 200)
    gray = np.asarray(im.convert("L"))
    pts = corner_points(gray / 255.0)
    assert pts and all(790 <= x <= 906 and 190 <= y <= 306 for x, y in pts)
    ex, _ = entropy_point(gray, 512, 512)
    assert ex - 256 <= 800 and ex + 256 >= 896  # the window holds the whole square
    flat = np.full((100, 300), 90, np.uint8)
    assert corner_points(flat / 255.0) == [] and entropy_point(flat, 100, 100) is None


def test_focal_weights_pick_the_source():
    im = marked(1024, 512, 800, 200)
    only_edges = focal_crop(im, 512, 512, face_weight=0, entropy_weight=0, edges_weight=1)
    assert set(only_edges.points) == {"edges"}
    none = focal_crop(im, 512, 512, face_weight=0, entropy_weight=0, edges_weight=0)
    assert none.box == pytest.approx((256, 0, 768, 512))  # no source: centre crop


# --- reading odd inputs ---------------------------------------------------------------------------
def test_to_rgb_modes():
    cmyk, note = to_rgb(Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0)) == (255, 0, 0) and "CMYK" in note
    i16, note = to_rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16), "I;16"))
    assert i16.getpixel((0, 0)) == (255, 255, 255) and "I;16" in note
    mid, _ = to_rgb(Image.fromarray(np.full((4, 4), 32896, np.uint16), "I;16"))
    assert mid.getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped at 255
    rgba, note = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert rgba.getpixel((0, 0)) == (255, 255, 255) and "white" in note
    la, _ = to_rgb(Image.new("LA", (4, 4), (0, 128)))
    assert la.getpixel((0, 0)) == (127, 127, 127)
    plain, note = to_rgb(Image.new("RGB", (4, 4), (1, 2, 3)))
    assert plain.getpixel((0, 0)) == (1, 2, 3) and note is None


def test_load_image_odd_files(tmp_path: Path):
    # CMYK JPEG
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    im, notes = load_image(tmp_path / "cmyk.jpg")
    r, g, b = im.getpixel((20, 15))
    assert im.mode == "RGB" and r > 200 and g < 60 and b < 60 and any("CMYK" in n for n in notes)
    # 16-bit gray as TIFF (opens as I;16) and as PNG (opens as I)
    a16 = np.full((20, 20), 65535, np.uint16)
    a16[:, :10] = 0
    Image.fromarray(a16, "I;16").save(tmp_path / "g16.tif")
    Image.fromarray(a16, "I;16").save(tmp_path / "g16.png")
    for name in ("g16.tif", "g16.png"):
        im, notes = load_image(tmp_path / name)
        assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((15, 0)) == (255, 255, 255), name
        assert any("8-bit" in n for n in notes)
    # palette with a transparent index
    p = Image.new("P", (10, 10), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (5, 0, 10, 10))
    p.save(tmp_path / "pal.png", transparency=0)
    im, notes = load_image(tmp_path / "pal.png")
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((7, 0)) == (255, 0, 0)
    # animated GIF: the first frame
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    im, notes = load_image(tmp_path / "anim.gif")
    r, g, b = im.getpixel((8, 8))
    assert r > 200 and b < 50 and any("animated (3 frames)" in n for n in notes)
    # EXIF orientation 6 (rotate 90° clockwise to view): a 40×20 stored picture shows as 20×40
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (0, 200, 0)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    im, notes = load_image(tmp_path / "rot.jpg")
    assert im.size == (20, 40) and any("orientation 6" in n for n in notes)


# --- captions and names ---------------------------------------------------------------------------
def test_combine_caption_actions():
    assert combine_caption("gen", "old", "ignore") == "gen"
    assert combine_caption("gen", "old", "copy") == "old"
    assert combine_caption("gen", "old", "prepend") == "old gen"
    assert combine_caption("gen", "old", "append") == "gen old"
    assert combine_caption("", "old", "prepend") == "old"
    assert combine_caption("gen", None, "copy") == "gen"
    assert combine_caption("", None, "ignore") == ""


def test_output_stem():
    assert output_stem(3, 1, "/x/my cat.jpeg") == "00003-1-my cat"
    long = output_stem(0, 0, "é" * 300 + ".png")
    assert len(long.encode("utf-8")) <= 8 + 160 and long.startswith("00000-0-é")


# --- config ---------------------------------------------------------------------------------------
def test_config_defaults_and_old_api_names(src: Path, tmp_path: Path):
    c = PreprocessConfig.from_dict(
        {"id_task": "task(x)", "process_src": str(src), "process_dst": str(tmp_path / "o"),
         "split_threshold": 0.3, "overlap_ratio": 0.1, "process_multicrop_mindim": None}
    )  # fmt: skip
    assert (c.process_split_threshold, c.process_overlap_ratio) == (0.3, 0.1)
    assert (c.process_width, c.process_height, c.preprocess_txt_action) == (512, 512, "ignore")
    assert c.process_focal_crop_entropy_weight == 0.15 and c.process_multicrop_mindim == 384
    assert c.process_multicrop_maxarea == 640 * 640 and c.process_multicrop_objective == "Maximize area"
    assert PreprocessConfig.kind == "preprocess"


@pytest.mark.parametrize(
    "field,value",
    [("process_width", 100), ("process_height", 32), ("process_overlap_ratio", 0.95),
     ("process_split_threshold", -0.1), ("process_focal_crop_face_weight", 2.0),
     ("preprocess_txt_action", "keep"), ("process_multicrop_objective", "Max"),
     ("process_multicrop_threshold", 1.5), ("process_multicrop_mindim", 32)],
)  # fmt: skip
def test_config_bad_values_name_the_field(src: Path, tmp_path: Path, field, value):
    with pytest.raises(ConfigError) as e:
        cfg(src, tmp_path / "o", **{field: value})
    assert e.value.field == field


def test_config_cross_checks(src: Path, tmp_path: Path):
    out = tmp_path / "o"
    with pytest.raises(ConfigError) as e:
        cfg(src, out, process_multicrop_mindim=768, process_multicrop_maxdim=384)
    assert e.value.field == "process_multicrop_maxdim"
    with pytest.raises(ConfigError) as e:
        cfg(
            src,
            out,
            process_multicrop=True,
            process_multicrop_mindim=768,
            process_multicrop_maxarea=500 * 500,
        )
    assert e.value.field == "process_multicrop_maxarea"
    with pytest.raises(ConfigError) as e:
        cfg(src, out, bogus=1)
    assert e.value.field == "bogus"
    with pytest.raises(ConfigError) as e:
        cfg(src, out, split_threshold=0.3, process_split_threshold=0.4)
    assert e.value.field == "split_threshold"


def test_config_folders(src: Path, tmp_path: Path):
    def field_of(**kw) -> str:
        with pytest.raises(ConfigError) as e:
            PreprocessConfig.from_dict(kw)
        return e.value.field

    assert field_of(process_src="", process_dst=str(tmp_path / "o")) == "process_src"
    assert field_of(process_src=str(tmp_path / "nope"), process_dst=str(tmp_path / "o")) == "process_src"
    (tmp_path / "captions_only").mkdir()
    (tmp_path / "captions_only" / "a.txt").write_text("x")
    assert (
        field_of(process_src=str(tmp_path / "captions_only"), process_dst=str(tmp_path / "o"))
        == "process_src"
    )
    assert field_of(process_src=str(src), process_dst="") == "process_dst"
    assert field_of(process_src=str(src), process_dst=str(src)) == "process_dst"
    assert field_of(process_src=str(src), process_dst=str(src / ".." / "src")) == "process_dst"
    assert field_of(process_src=str(src), process_dst=str(src / "out")) == "process_dst"  # inside src
    (tmp_path / "file").write_text("x")
    assert field_of(process_src=str(src), process_dst=str(tmp_path / "file")) == "process_dst"
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.png").write_bytes(b"x")
    assert field_of(process_src=str(src), process_dst=str(full)) == "process_dst"
    assert cfg(src, full, overwrite=True).overwrite
    (tmp_path / "empty").mkdir()
    assert cfg(src, tmp_path / "empty").process_dst == str(tmp_path / "empty")


# --- the job --------------------------------------------------------------------------------------
def test_default_run_names_sizes_and_events(src: Path, tmp_path: Path):
    dst = tmp_path / "out"
    control = FakeControl()
    result = run_preprocess(cfg(src, dst, process_width=256, process_height=384), control)
    names = [p.name for p in pngs(dst)]
    assert names == ["00000-0-green dog.png", "00001-0-red cat.png"]  # sorted sources, host naming
    assert all(Image.open(p).size == (256, 384) for p in pngs(dst))
    assert sorted(result.written) == sorted(str(p) for p in pngs(dst))
    assert not list(dst.glob("*.txt"))  # no caption source: the file name carries the words
    assert result.skipped == [] and result.total == result.processed == 2 and not result.stopped
    progress = [d for k, d in control.events if k == "progress"]
    assert progress[0] == {"done": 0, "total": 2} and progress[-1] == {"done": 2, "total": 2}
    assert {d["path"] for k, d in control.events if k == "file"} == set(result.written)
    assert result.to_dict()["written"] == result.written and "2 images written" in str(result)


def test_flip_doubles_outputs(src: Path, tmp_path: Path):
    dst = tmp_path / "out"
    result = run_preprocess(cfg(src, dst, process_flip=True, process_width=64, process_height=64))
    names = [p.name for p in pngs(dst)]
    assert names == [
        "00000-0-green dog.png",
        "00000-1-green dog.png",
        "00001-0-red cat.png",
        "00001-1-red cat.png",
    ]
    assert len(result.images) == 4
    a, b = (np.asarray(Image.open(dst / n)) for n in ("00001-0-red cat.png", "00001-1-red cat.png"))
    assert (b == a[:, ::-1]).all()


def test_split_focal_multicrop_and_original_in_one_run(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    marked(512, 2048, 380, 1800).save(src / "tall.png")  # ratio 0.25: split into 5 tiles (overlap 0.25)
    Image.new("RGB", (1000, 700), (9, 9, 9)).save(src / "wide.png")  # not oversized
    dst = tmp_path / "out"
    run_preprocess(
        cfg(src, dst, process_split=True, process_overlap_ratio=0.25, process_focal_crop=True,
            process_focal_crop_debug=True, process_multicrop=True, process_keep_original_size=True)
    )  # fmt: skip
    sizes = {p.name: Image.open(p).size for p in pngs(dst)}
    tall = sorted(n for n in sizes if n.startswith("00000-"))
    # 5 tiles, then the focal crop, the auto-sized crop (error 0.5 > 0.1: none) and the original
    assert tall == [f"00000-{i}-tall.png" for i in range(7)]
    assert [sizes[n] for n in tall] == [(512, 512)] * 6 + [(512, 2048)]
    wide = sorted(n for n in sizes if n.startswith("00001-"))
    assert [sizes[n] for n in wide] == [(512, 512), (768, 512), (1000, 700)]  # focal, auto-sized, original
    debug = sorted(p.name for p in (dst / DEBUG_FOLDER).iterdir())
    assert debug == ["00000-5-tall.png", "00001-0-wide.png"]


def test_focal_crop_run_keeps_the_square(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    marked(1024, 512, 860, 60).save(src / "square.png")
    dst = tmp_path / "out"
    run_preprocess(cfg(src, dst, process_focal_crop=True))
    out = np.asarray(Image.open(dst / "00000-0-square.png").convert("L"))
    contrast = out.max(axis=0).astype(int) - out.min(axis=0)
    cols = np.nonzero(contrast > 100)[0]
    assert out.shape == (512, 512) and cols.size and 90 <= cols.max() - cols.min() + 1 <= 100  # all of it


def test_corrupt_and_truncated_files_are_skipped_and_named(src: Path, tmp_path: Path):
    (src / "junk.png").write_bytes(os.urandom(300))
    good = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (src / "cut.png").write_bytes(good[: len(good) // 2])
    (src / "notes.md").write_text("hello")
    dst = tmp_path / "out"
    control = FakeControl()
    result = run_preprocess(cfg(src, dst), control)
    skipped = {Path(p).name: reason for p, reason in result.skipped}
    assert set(skipped) == {"junk.png", "cut.png", "notes.md"}
    assert "truncated" in skipped["cut.png"] or "broken" in skipped["cut.png"].lower()
    assert len(result.images) == 2  # the good ones went through
    logs = [d["text"] for k, d in control.events if k == "log"]
    assert any("junk.png" in t for t in logs)


def test_odd_images_run_through(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("CMYK", (80, 60), (0, 255, 255, 0)).save(src / "a_cmyk.jpg")
    Image.fromarray(np.full((60, 80), 40000, np.uint16), "I;16").save(src / "b_16.tif")
    p = Image.new("P", (80, 60), 0)
    p.putpalette([0, 0, 0] * 256)
    p.save(src / "c_pal.png", transparency=0)
    frames = [Image.new("RGB", (80, 60), c) for c in ((0, 0, 255), (255, 0, 0))]
    frames[0].save(src / "d_anim.gif", save_all=True, append_images=frames[1:])
    dst = tmp_path / "out"
    result = run_preprocess(cfg(src, dst, process_width=64, process_height=64))
    assert result.skipped == [] and len(result.images) == 4
    colours = [Image.open(p).getpixel((32, 32)) for p in pngs(dst)]
    assert all(Image.open(p).mode == "RGB" for p in pngs(dst))
    assert colours[0][0] > 200 and colours[0][1] < 60  # CMYK red
    assert colours[1] == (156, 156, 156)  # 40000 / 257
    assert colours[2] == (255, 255, 255)  # transparent palette → white
    assert colours[3][2] > 200 and colours[3][0] < 50  # first GIF frame
    noted = {Path(p).name for p, _ in result.notes}
    assert noted == {"a_cmyk.jpg", "b_16.tif", "c_pal.png", "d_anim.gif"}


def test_source_folder_is_never_modified(src: Path, tmp_path: Path):
    (src / "red cat.txt").write_text("a red cat", encoding="utf-8")
    (src / "junk.jpg").write_bytes(b"not a jpeg")
    marked(512, 2048, 10, 10).save(src / "tall.png")
    before = tree_hashes(src)
    mtimes = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    run_preprocess(
        cfg(src, tmp_path / "out", process_flip=True, process_split=True, process_focal_crop=True,
            process_focal_crop_debug=True, process_multicrop=True, preprocess_txt_action="append"),
        captioner=lambda im: "blip", deepbooru=lambda im: "tag",
    )  # fmt: skip
    assert tree_hashes(src) == before
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == mtimes


def test_dst_with_files_refused_unless_overwrite(src: Path, tmp_path: Path):
    dst = tmp_path / "out"
    run_preprocess(cfg(src, dst, preprocess_txt_action="copy"))
    first = tree_hashes(dst)
    with pytest.raises(ConfigError) as e:
        cfg(src, dst)
    assert e.value.field == "process_dst"
    c = cfg(src, tmp_path / "later")
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "x.png").write_bytes(b"x")  # filled after validation: the run checks again
    with pytest.raises(ConfigError):
        run_preprocess(c)
    stale = dst / "00001-0-red cat.txt"
    stale.write_text("stale caption")
    result = run_preprocess(cfg(src, dst, overwrite=True))
    assert len(result.images) == 2 and not stale.exists()  # its image was replaced without a caption
    assert set(tree_hashes(dst)) == set(first)


def test_dst_equal_to_src_refused_by_run(src: Path):
    c = cfg(src, src.parent / "o")
    c.process_dst = str(src)
    with pytest.raises(ConfigError) as e:
        run_preprocess(c)
    assert e.value.field == "process_dst"


@pytest.mark.parametrize("field", ["process_caption", "process_caption_deepbooru"])
def test_caption_without_captioner_fails_before_any_output(src: Path, tmp_path: Path, field):
    dst = tmp_path / "out"
    control = FakeControl()
    with pytest.raises(ConfigError) as e:
        run_preprocess(cfg(src, dst, **{field: True}), control)
    assert e.value.field == field and "no captioner available in this host" in str(e.value)
    assert not dst.exists() and control.events == []


def test_captions_from_captioners_and_existing_txt(src: Path, tmp_path: Path):
    (src / "red cat.txt").write_text("\ufeffa red cat\n", encoding="utf-8")
    seen: list[tuple[int, int]] = []

    def blip(im: Image.Image) -> str:
        seen.append(im.size)
        return " a photo "

    expected = {
        "ignore": ("a photo, tag", "a photo, tag"),
        "copy": ("a red cat", "a photo, tag"),
        "prepend": ("a red cat a photo, tag", "a photo, tag"),
        "append": ("a photo, tag a red cat", "a photo, tag"),
    }
    for action, (cat, dog) in expected.items():
        dst = tmp_path / action
        run_preprocess(
            cfg(src, dst, process_caption=True, process_caption_deepbooru=True, process_flip=True,
                preprocess_txt_action=action, process_width=64, process_height=64),
            captioner=blip, deepbooru=lambda im: "tag",
        )  # fmt: skip
        for sub in (0, 1):  # the flipped copy carries the same caption
            assert (dst / f"00001-{sub}-red cat.txt").read_text(encoding="utf-8") == cat, action
            assert (dst / f"00000-{sub}-green dog.txt").read_text(encoding="utf-8") == dog, action
    assert set(seen) == {(64, 64)}
    assert len(seen) == 2 * 4 - 1  # once per unflipped output; "copy" skips the captioner for the cat


def test_existing_caption_copied_without_captioner(src: Path, tmp_path: Path):
    (src / "red cat.txt").write_text("a red cat", encoding="utf-8")
    dst = tmp_path / "out"
    run_preprocess(cfg(src, dst, preprocess_txt_action="copy"))
    assert (dst / "00001-0-red cat.txt").read_text(encoding="utf-8") == "a red cat"
    assert not (dst / "00000-0-green dog.txt").exists()


def test_stop_request_ends_after_the_current_image(src: Path, tmp_path: Path):
    Image.new("RGB", (64, 64)).save(src / "z.png")
    control = FakeControl(stop_after=1)
    result = run_preprocess(cfg(src, tmp_path / "out"), control)
    assert result.stopped and result.processed == 1 and len(result.images) == 1 and result.total == 3
    assert "stopped" in str(result)


def test_square_source_split_semantics_match_tiles(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (1000, 1000), (5, 5, 5)).save(src / "sq.png")
    dst = tmp_path / "out"
    run_preprocess(cfg(src, dst, process_split=True, process_width=256, process_height=512))
    tiles = pngs(dst)
    # ratio 0.5 ≤ 0.5: scaled to 512×512 and cut along x into 256-wide tiles with ≥ 20% overlap
    expected = math.ceil((512 - 256 * 0.2) / (256 * 0.8))
    assert len(tiles) == expected and all(Image.open(p).size == (256, 512) for p in tiles)


def test_faces_need_no_opencv(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 → ImportError
    from lib_sdtrain.core.preprocess.crop import face_points

    assert face_points(np.zeros((64, 64, 3), np.uint8)) == []
    crop = focal_crop(marked(1024, 512, 800, 200), 512, 512)
    assert crop.points["faces"] == [] and inside((800, 200, 896, 296), crop.box)


def test_faces_with_opencv_when_installed():
    pytest.importorskip("cv2")
    from PIL import ImageDraw

    from lib_sdtrain.core.preprocess.crop import face_points

    im = Image.new("RGB", (1024, 512), GRAY)
    d = ImageDraw.Draw(im)
    d.ellipse((700, 100, 900, 350), fill=(230, 190, 160))
    for x in (740, 820):
        d.ellipse((x, 180, x + 40, 210), fill=(20, 20, 20))
    points = face_points(np.asarray(im))
    assert all(isinstance(p[0], float) and 0 <= p[0] < 1024 for p in points)
    crop = focal_crop(im, 512, 512)
    assert crop.image.size == (512, 512) and inside((700, 100, 900, 350), crop.box)


def test_describe_lists_every_field():
    fields = {f["name"]: f for f in PreprocessConfig.describe()}
    assert fields["preprocess_txt_action"]["choices"] == ("ignore", "copy", "prepend", "append")
    assert fields["process_multicrop_objective"]["choices"] == ("Maximize area", "Minimize error")
    assert fields["overwrite"]["default"] is False and len(fields) == 26  # with validation_split


def test_failing_captioner_fails_the_job_naming_the_image(src: Path, tmp_path: Path):
    from lib_sdtrain.core.errors import SdtrainError

    def broken(im: Image.Image) -> str:
        raise RuntimeError("model not loaded")

    with pytest.raises(
        SdtrainError, match=r"deepbooru captioning of .*green dog.jpg failed.*model not loaded"
    ):
        run_preprocess(cfg(src, tmp_path / "out", process_caption_deepbooru=True), deepbooru=broken)
