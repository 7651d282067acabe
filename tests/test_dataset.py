"""Training data: the host's PersonalizedBase/GroupedBatchSampler behaviour without a model."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lib_sdtrain.core.data.dataset import (
    DatasetOptions,
    GroupedBatchSampler,
    TrainDataset,
    filename_caption,
    load_images,
    read_template,
)
from lib_sdtrain.core.errors import ConfigError, DatasetError
from lib_sdtrain.core.port import ImageSize, LatentDist


def save(path, size=(64, 64), color=(200, 30, 30), mode="RGB", alpha=None):
    img = Image.new(mode, size, color if mode == "RGB" else (*color, 255))
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha))
    img.save(path)
    return path


def template(tmp_path, text="a photo of [name], [filewords]\n", name="tmpl.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def options(tmp_path, data, **kw):
    kw.setdefault("template_file", template(tmp_path))
    kw.setdefault("seed", 1234)
    return DatasetOptions(data_root=data, width=32, height=32, placeholder_token="tok", **kw)


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


def fake_encode(pixels: torch.Tensor) -> LatentDist:
    """[1,3,H,W] → 4-channel latent at H/8×W/8, std 1 so samples differ from the mean."""
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    mean = torch.cat([pooled, pooled[:, :1]], dim=1)
    return LatentDist(mean, torch.ones_like(mean))


# ---- captions ----------------------------------------------------------------------------------


def test_txt_caption_beats_filename(data):
    save(data / "cat.png")
    (data / "cat.txt").write_text("fluffy cat, sofa\n", encoding="utf-8")
    save(data / "01-dog on grass.png")
    assert filename_caption(data / "cat.png") == "fluffy cat, sofa"
    # leading numbers, dashes and spaces are stripped (host re_numbers_at_start)
    assert filename_caption(data / "01-dog on grass.png") == "dog on grass"
    assert filename_caption(data / "2023-05 12 x.png") == "12 x"  # only the first run goes


def test_filename_regex_and_join(data):
    assert filename_caption(data / "12 red_car_fast.png", r"[a-z]+", ", ") == "red, car, fast"
    assert filename_caption(data / "12 red_car.png", r"[a-z]+", "") == "redcar"


def test_load_images_captions_and_non_images_ignored(data, tmp_path):
    save(data / "b.png")
    save(data / "a.jpg")
    (data / "a.txt").write_text("from text", encoding="utf-8")
    (data / "notes.md").write_text("not an image", encoding="utf-8")
    (data / "sub").mkdir()
    s = load_images(options(tmp_path, data))
    assert [r.path.name for r in s.images] == ["a.jpg", "b.png"]
    assert [r.filename_text for r in s.images] == ["from text", "b"]
    assert s.skipped == []
    assert s.images[0].rgb.shape == (3, 32, 32) and s.images[0].rgb.dtype == torch.uint8


def test_template_expansion(data, tmp_path):
    save(data / "x.png")
    (data / "x.txt").write_text("red hat,blue scarf", encoding="utf-8")
    ds = TrainDataset.from_options(options(tmp_path, data))
    assert ds.text(0) == "a photo of tok, red hat,blue scarf"
    assert ds.texts_fixed
    # without shuffle/dropout the prompt is drawn once per item, at load (host quirk)
    tpl = template(tmp_path, "one [name]\ntwo [name]\nthree [name]\n", "multi.txt")
    ds2 = TrainDataset.from_options(options(tmp_path, data, template_file=tpl))
    assert len({ds2.text(0) for _ in range(20)}) == 1


def test_shuffle_and_dropout_deterministic_and_effective(data, tmp_path):
    save(data / "x.png")
    tags = ",".join(f"t{i}" for i in range(12))
    (data / "x.txt").write_text(tags, encoding="utf-8")
    tpl = template(tmp_path, "[filewords]\n", "fw.txt")

    def texts(**kw):
        opts = options(tmp_path, data, template_file=tpl, require_name_in_template=False, **kw)
        ds = TrainDataset.from_options(opts)
        assert not ds.texts_fixed
        return [ds.text(0) for _ in range(10)]

    shuffled = texts(shuffle_tags=True)
    assert shuffled == texts(shuffle_tags=True)  # same seed, same prompts
    assert shuffled != texts(shuffle_tags=True, seed=99)
    assert any(t != tags for t in shuffled)
    assert all(sorted(t.split(",")) == sorted(tags.split(",")) for t in shuffled)

    dropped = texts(tag_drop_out=0.5)
    assert dropped == texts(tag_drop_out=0.5)
    counts = [len(t.split(",")) for t in dropped]
    assert min(counts) < 12 and all(set(t.split(",")) <= set(tags.split(",")) for t in dropped if t)


# ---- errors before model work ------------------------------------------------------------------


def test_missing_empty_and_imageless_folders(tmp_path, data):
    with pytest.raises(DatasetError, match="does not exist"):
        load_images(options(tmp_path, tmp_path / "nope"))
    with pytest.raises(DatasetError, match="empty"):
        load_images(options(tmp_path, data))
    (data / "readme.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DatasetError, match="No usable images"):
        load_images(options(tmp_path, data))
    with pytest.raises(DatasetError, match="No dataset directory"):
        load_images(options(tmp_path, ""))


def test_corrupt_image_skipped_and_named(data, tmp_path, caplog):
    save(data / "good.png")
    (data / "bad.png").write_bytes(b"definitely not a png")
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "big.png")
    (data / "trunc.png").write_bytes((data / "big.png").read_bytes()[:2000])
    with caplog.at_level(logging.WARNING):
        s = load_images(options(tmp_path, data))
    assert [r.path.name for r in s.images] == ["big.png", "good.png"]
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in s.skipped) == ["bad.png", "trunc.png"]
    assert all(reason for _, reason in s.skipped)
    assert "bad.png" in caplog.text and "trunc.png" in caplog.text
    (data / "good.png").unlink()
    (data / "big.png").unlink()
    with pytest.raises(DatasetError, match=r"bad\.png"):
        load_images(options(tmp_path, data))


def test_exif_orientation_applied(data, tmp_path):
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(data / "rot.jpg", exif=exif)
    s = load_images(options(tmp_path, data, varsize=True))
    assert s.images[0].size == (32, 64)


def test_template_checks(tmp_path, data):
    save(data / "a.png")
    with pytest.raises(DatasetError, match="not found"):
        read_template(tmp_path / "missing.txt")
    no_name = template(tmp_path, "a photo of [filewords]\n", "hypernetwork.txt")
    with pytest.raises(DatasetError, match=r"hypernetwork\.txt.*\[name\].*learn\s+nothing"):
        TrainDataset.from_options(options(tmp_path, data, template_file=no_name))
    ds = TrainDataset.from_options(
        options(tmp_path, data, template_file=no_name, require_name_in_template=False)
    )
    assert ds.text(0) == "a photo of a"
    with pytest.raises(DatasetError, match="no prompt lines"):
        read_template(template(tmp_path, "\n  \n", "blank.txt"))


def test_bad_options_are_config_errors(tmp_path, data):
    for field, kw in [
        ("batch_size", {"batch_size": 0}),
        ("tag_drop_out", {"tag_drop_out": 1.5}),
        ("crop", {"crop": "zoom"}),
        ("latent_sampling_method", {"latent_sampling_method": "sometimes"}),
        ("filename_word_regex", {"filename_word_regex": "(["}),
    ]:
        with pytest.raises(ConfigError) as e:
            load_images(options(tmp_path, data, **kw))
        assert e.value.field == field


def test_shipped_templates():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "textual_inversion_templates"
    names = {p.name for p in root.glob("*.txt")}
    assert names == {
        f"{n}.txt"
        for n in ("hypernetwork", "none", "style", "style_filewords", "subject", "subject_filewords")
    }
    assert read_template(root / "none.txt", require_name=False) == ["picture"]
    for n in ("hypernetwork", "none"):
        assert not any("[name]" in ln for ln in read_template(root / f"{n}.txt", require_name=False))
    assert all("[filewords]" in ln for ln in read_template(root / "hypernetwork.txt", require_name=False))
    for n in ("style", "subject"):
        lines = read_template(root / f"{n}.txt")
        assert all("[name]" in ln and "[filewords]" not in ln for ln in lines)
        lines = read_template(root / f"{n}_filewords.txt")
        assert all("[name]" in ln and "[filewords]" in ln for ln in lines)


# ---- pixels and weights ------------------------------------------------------------------------


def test_pixels_range_and_crop(data, tmp_path):
    img = np.zeros((32, 64, 3), dtype=np.uint8)
    img[:, :32] = 255
    Image.fromarray(img).save(data / "wide.png")
    ds = TrainDataset.from_options(options(tmp_path, data))
    x = ds.pixels(0)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    center = TrainDataset.from_options(options(tmp_path, data, crop="center")).pixels(0)
    assert center[:, :, 2].mean() > 0.9 and center[:, :, -3].mean() < -0.9  # left white, right black
    assert torch.equal(ds.pixels(0, flipped=True), x.flip(-1))


def test_sdxl_size_conditioning_follows_resize_crop_and_flip(data, tmp_path):
    """SDXL's (original size, crop top-left, target size) per item, as SDXL was trained: the crop's
    offset in the resized source, mirrored with the image."""
    Image.new("RGB", (96, 48), (10, 20, 30)).save(data / "wide.png")  # resized to 64x32, then cropped to 32x32
    Image.new("RGB", (40, 80), (10, 20, 30)).save(data / "tall.png")  # resized to 32x64
    stretched = TrainDataset.from_options(options(tmp_path, data))
    assert stretched.image_size(1) == ImageSize((48, 96), (0, 0), (32, 32))  # the host's stretch: no crop
    center = TrainDataset.from_options(options(tmp_path, data, crop="center"))
    assert center.image_size(0) == ImageSize((80, 40), (16, 0), (32, 32))
    assert center.image_size(1) == ImageSize((48, 96), (0, 16), (32, 32))
    assert center.image_size(1, flipped=True) == ImageSize((48, 96), (0, 16), (32, 32))  # centred: symmetric
    lefts = set()
    for seed in range(12):
        rnd = TrainDataset.from_options(options(tmp_path, data, crop="random", seed=seed))
        s, f = rnd.image_size(1), rnd.image_size(1, flipped=True)
        assert s.original_size == (48, 96) and s.target_size == (32, 32) and s.crop_top_left[0] == 0
        assert f.crop_top_left[1] == 64 - 32 - s.crop_top_left[1]  # mirrored offset in the 64-wide resize
        lefts.add(s.crop_top_left[1])
    assert len(lefts) > 1
    varsize = TrainDataset.from_options(options(tmp_path, data, varsize=True))
    assert varsize.image_size(1) == ImageSize((48, 96), (0, 0), (48, 96))
    ds = TrainDataset.from_options(options(tmp_path, data, crop="center", flip_p=1.0))
    ds.cache_latents(fake_encode)
    batch = ds.batch([0, 1])
    assert batch.sizes == [ds.image_size(0, True), ds.image_size(1, True)]


def test_alpha_weights(data, tmp_path):
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255
    save(data / "a_half.png", mode="RGBA", alpha=alpha)
    save(data / "b_uniform.png", mode="RGBA", alpha=np.full((64, 64), 255, np.uint8))
    save(data / "c_rgb.png")
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.paste(1, (0, 0, 64, 16))
    pal.info["transparency"] = 0  # palette index 0 transparent: the host ignores this kind
    pal.save(data / "d_palette.png", transparency=0)
    ds = TrainDataset.from_options(options(tmp_path, data, use_weight=True))
    w = ds.weight_map(0)
    assert w.shape == (4, 4)
    assert float(w.min()) == 0.0 and float(w.mean()) == pytest.approx(1.0)
    assert w[:, 0].eq(0).all() and (w[:, -1] > 1).all()
    for i in (1, 2):  # uniform alpha (host: NaN) and no alpha: ones
        assert torch.equal(ds.weight_map(i), torch.ones(4, 4))
    wp = ds.weight_map(3)
    assert wp[0].gt(0).all() and wp[-1].eq(0).all() and float(wp.mean()) == pytest.approx(1.0)
    # without use_weight alpha is dropped
    plain = TrainDataset.from_options(options(tmp_path, data))
    assert all(r.alpha is None for r in plain.images)


def test_non_square_weights_follow_the_image(data, tmp_path):
    alpha = np.zeros((32, 64), dtype=np.uint8)
    alpha[:, :16] = 255  # left quarter opaque
    save(data / "w.png", size=(64, 32), mode="RGBA", alpha=alpha)
    ds = TrainDataset.from_options(options(tmp_path, data, use_weight=True, varsize=True))
    w = ds.weight_map(0)
    assert w.shape == (4, 8)
    assert (w[:, :2] > 0).all() and w[:, 3:].eq(0).all()


# ---- batching ----------------------------------------------------------------------------------


def test_varsize_groups_same_sizes(data, tmp_path):
    for i in range(5):
        save(data / f"s{i}.png", size=(32, 32))
    for i in range(4):
        save(data / f"w{i}.png", size=(48, 32))
    ds = TrainDataset.from_options(options(tmp_path, data, varsize=True, batch_size=2))
    assert sorted(r.size for r in ds.images) == [(32, 32)] * 5 + [(48, 32)] * 4
    assert len(ds.sampler) == 4 and ds.batches_per_epoch == 4
    seen = 0
    for _ in range(10):
        batches = list(ds.epoch())
        assert len(batches) == 4
        for b in batches:
            assert len(b) == 2 and len({ds.images[ds.item_image[i]].size for i in b}) == 1
            seen += 1
    assert seen == 40


def test_batch_and_gradient_step_clamped(data, tmp_path):
    for i in range(3):
        save(data / f"{i}.png")
    ds = TrainDataset.from_options(options(tmp_path, data, batch_size=8, gradient_step=4))
    assert (ds.batch_size, ds.gradient_step, ds.steps_per_epoch, ds.batches_per_epoch) == (3, 1, 1, 1)
    ds = TrainDataset.from_options(options(tmp_path, data, batch_size=2, gradient_step=4))
    assert (ds.batch_size, ds.gradient_step, ds.steps_per_epoch) == (2, 1, 1)
    for i in range(3, 11):
        save(data / f"{i}.png")
    ds = TrainDataset.from_options(options(tmp_path, data, batch_size=2, gradient_step=2))
    # 11 images: 5 batches, 2 steps of 2 micro-batches; the 5th batch is dropped like the host
    assert (len(ds), ds.steps_per_epoch, ds.batches_per_epoch) == (11, 2, 4)
    assert len(list(ds.epoch())) == 4
    ds = TrainDataset.from_options(options(tmp_path, data, repeats=3))
    assert len(ds) == 33 and Counter(ds.item_image) == dict.fromkeys(range(11), 3)


def test_sampler_random_batches_follow_host_math():
    import random

    s = GroupedBatchSampler([[0, 1], [2, 3, 4]], 2, random.Random(0))
    assert (len(s), s.n_rand_batches) == (2, 1)
    # expected shares 1.6 and 2.4 → left-overs 1.6 % 2 and 2.4 % 2 → probabilities 0.8 and 0.2
    assert s.probs == pytest.approx([0.8, 0.2])
    batches = list(s)
    assert len(batches) == 3  # host quirk: more than len(); the train loop caps the epoch
    assert all(set(b) <= {0, 1} or set(b) <= {2, 3, 4} for b in batches)


def test_epochs_are_reproducible(data, tmp_path):
    for i in range(6):
        save(data / f"{i}.png")

    def run(seed):
        ds = TrainDataset.from_options(options(tmp_path, data, batch_size=2, seed=seed))
        return [list(ds.epoch()) for _ in range(3)]

    assert run(5) == run(5) and run(5) != run(6)


# ---- latents -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["once", "deterministic", "random"])
def test_latent_sampling_methods(data, tmp_path, method):
    save(data / "a.png", color=(10, 200, 90))
    save(data / "b.png", color=(250, 250, 0))
    ds = TrainDataset.from_options(options(tmp_path, data, latent_sampling_method=method, batch_size=2))
    with pytest.raises(DatasetError, match="cache_latents"):
        ds.latent(0)
    calls = []
    ds.cache_latents(fake_encode, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]
    assert all(r.rgb is None for r in ds.images)  # pixels released after caching
    mean = fake_encode(torch.zeros(1, 3, 32, 32)).mean[0]
    mean[:3] = (torch.tensor([10, 200, 90]) / 127.5 - 1).view(3, 1, 1)
    mean[3] = mean[0]
    first, second = ds.latent(0), ds.latent(0)
    assert first.shape == (4, 4, 4)
    if method == "once":
        assert torch.equal(first, second) and not torch.allclose(first, mean)
    elif method == "deterministic":
        assert torch.allclose(first, mean) and torch.equal(first, second)
    else:
        assert not torch.equal(first, second)
        assert not torch.allclose(first, mean)
    b = ds.batch([0, 1])
    assert b.latents.shape == (2, 4, 4, 4) and b.weights is None and len(b.texts) == 2


def test_random_latents_reproducible_with_seed(data, tmp_path):
    save(data / "a.png")

    def draws(seed):
        ds = TrainDataset.from_options(options(tmp_path, data, latent_sampling_method="random", seed=seed))
        ds.cache_latents(fake_encode)
        return torch.stack([ds.latent(0) for _ in range(3)])

    assert torch.equal(draws(3), draws(3)) and not torch.equal(draws(3), draws(4))


def test_flip_and_weights_in_batches(data, tmp_path):
    alpha = np.zeros((32, 32), dtype=np.uint8)
    alpha[:, :8] = 255
    save(data / "a.png", size=(32, 32), mode="RGBA", alpha=alpha)
    ds = TrainDataset.from_options(options(tmp_path, data, use_weight=True, flip_p=0.5))
    ds.cache_latents(fake_encode, keep_pixels=True)
    assert ds.images[0].rgb is not None
    flips = set()
    for _ in range(20):
        b = ds.batch([0])
        f = b.flipped[0]
        flips.add(f)
        assert b.weights.shape == b.latents.shape == (1, 4, 4, 4)
        opaque_col = 3 if f else 0
        assert (b.weights[0, :, :, opaque_col] > 0).all()
        assert torch.equal(b.latents[0], ds.latent(0, f))
    assert flips == {False, True}
