"""Aspect-ratio buckets (issue 13, item 1): the bucket list and the choice of bucket pinned against values
worked out by hand; a folder of mixed shapes read into buckets (one latent shape per batch, each image at
the bucket closest to its aspect, nothing cropped, nothing enlarged unless asked); the config fields and
their errors; real runs on the tiny SD1 and SDXL, where SDXL's size conditioning is (source size, no
crop, bucket size); and bucketing off reading exactly the images it read before."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from recorder import Recorder

from lib_sdtrain.core.data.buckets import BucketPlan, aspect_error, bucket_sizes, resolve_step
from lib_sdtrain.core.data.dataset import DatasetOptions, TrainDataset, load_images
from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork
from lib_sdtrain.core.options.config import (
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.port import ImageSize, LatentDist
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding
from lib_sdtrain.core.training.batches import prepare_training_data
from lib_sdtrain.core.training.resume import fingerprint
from lib_sdtrain.hosts.standalone.host import StandaloneHost

BUCKET_FIELDS = ("bucketing", "bucket_step", "bucket_max_aspect", "bucket_upscale")


# -- the bucket math, by hand ---------------------------------------------------------------------------
def test_buckets_of_512_area_step_64_by_hand():
    # for each width w (multiple of 64) the height is the largest multiple of 64 with w·h ≤ 512² = 262144:
    # 256 → 1024, 320 → ⌊819.2⌋ → 768, 384 → ⌊682.7⌋ → 640, 448 → ⌊585.1⌋ → 576, 512 → 512, 576 → ⌊455.1⌋ → 448,
    # 640 → ⌊409.6⌋ → 384, 704 → ⌊372.4⌋ → 320, 768 → ⌊341.3⌋ → 320, 832/896/960/1024 → 256; both ways turned,
    # and nothing more elongated than 4:1 (192 → 1344 is 7:1)
    want = {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
            (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)}
    want |= {(h, w) for w, h in want}
    assert set(bucket_sizes(512, 512, 64)) == want and len(want) == 17
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in want)
    plan = BucketPlan(512, 512, 64)
    # 800×400 (2:1): 704×320 is 2.2 (|ln 1.1| = 0.095); 640×384 is 1.667 and 768×320 is 2.4 (both |ln 1.2| = 0.18)
    assert plan.closest((800, 400)) == plan.pick((800, 400)) == (704, 320)
    assert aspect_error((704, 320), (800, 400)) == pytest.approx(math.log(1.1))
    assert plan.pick((400, 800)) == (320, 704)  # the same turned
    assert plan.pick((1000, 1000)) == (512, 512)
    assert plan.pick((3000, 2000)) == (640, 384)  # 1.5: 640×384 (1.667, |ln 1.111|) beats 576×448 (1.286, |ln 1.167|)
    # SDXL's 1024² area in steps of 32 has the known 1344×768 bucket for 16:9
    assert BucketPlan(1024, 1024, 32).pick((1920, 1080)) == (1344, 768)
    assert (1344, 768) in bucket_sizes(1024, 1024, 32) and (768, 1344) in bucket_sizes(1024, 1024, 32)
    # up to 8:1 adds the widths 192 (→ ⌊1365.3⌋ → 1344, 7:1) and 1088..1344 (→ 192); 128 → 2048 (16:1) stays out
    more = {(192, 1344), (1088, 192), (1152, 192), (1216, 192), (1280, 192), (1344, 192)}
    assert set(bucket_sizes(512, 512, 64, 8.0)) - want == more | {(h, w) for w, h in more}
    assert set(bucket_sizes(512, 512, 64, 1.0)) == {(512, 512)}


def test_small_images_are_not_enlarged_unless_asked():
    plan, up = BucketPlan(512, 512, 64), BucketPlan(512, 512, 64, upscale=True)
    # 300×200 belongs to 640×384, larger than itself: without upscale the largest 64-multiple inside it
    assert up.pick((300, 200)) == (640, 384) and plan.pick((300, 200)) == (256, 192)
    # 700×350 would grow 4 px wide in 704×320: 640×320 instead
    assert plan.pick((700, 350)) == (640, 320) and up.pick((700, 350)) == (704, 320)
    # 530×500 would grow in height in 512×512: 512×448
    assert plan.pick((530, 500)) == (512, 448)
    assert not plan.upscales((300, 200)) and up.upscales((300, 200))
    # a side below one step cannot fit: one step (and a warning when read)
    assert plan.pick((50, 300)) == (64, 256) and plan.upscales((50, 300))
    # rounded down beyond the aspect limit: the longer side is shortened until it is within 4:1
    assert plan.pick((1000, 100)) == (256, 64)


def test_step_by_model_family():
    assert resolve_step(0, "sd1") == resolve_step(0, "sd2") == 64 and resolve_step(0, "sdxl") == 32
    assert resolve_step(128, "sd1") == 128 and resolve_step(96, "sdxl") == 96 and resolve_step(64, "sdxl") == 64
    for step, family in ((32, "sd1"), (96, "sd2"), (48, "sdxl"), (8, "sdxl")):
        with pytest.raises(ConfigError) as e:
            resolve_step(step, family)
        assert e.value.field == "bucket_step" and str(64 if family != "sdxl" else 32) in e.value.message


# -- a folder of mixed shapes --------------------------------------------------------------------------
SHAPES = {"a-wide": (512, 256), "b-wide": (300, 150), "c-tall": (256, 512), "d-square": (400, 400),
          "e-square": (260, 260), "f-small": (100, 100), "g-16x9": (640, 360), "h-tall": (180, 300)}


def write_mixed(folder, shapes=SHAPES, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (w, h) in shapes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"{name} noise", encoding="utf-8")
    return folder


def options(tmp_path, data, **kw):
    tpl = tmp_path / "tmpl.txt"
    tpl.write_text("[filewords]\n", encoding="utf-8")
    kw.setdefault("seed", 1234)
    return DatasetOptions(data_root=data, width=256, height=256, placeholder_token="tok", template_file=tpl,
                          require_name_in_template=False, **kw)


def pool_encode(px: torch.Tensor) -> LatentDist:
    """A stand-in VAE: 8×8 mean pooling, so a latent's shape is its image's size / 8."""
    mean = F.avg_pool2d(px, 8)
    return LatentDist(mean=mean, std=torch.zeros_like(mean))


def test_mixed_shapes_train_in_buckets_of_one_shape_without_a_crop(tmp_path):
    data = write_mixed(tmp_path / "data")
    ds = TrainDataset.from_options(options(tmp_path, data, bucketing=True, batch_size=2))
    # the 256² area in steps of 64: by hand (see the first test's rule) and each image's bucket
    assert BucketPlan(256, 256, 64).sizes == ((128, 384), (128, 448), (128, 512), (192, 320), (256, 256),
                                               (320, 192), (384, 128), (448, 128), (512, 128))
    want = {"a-wide": (320, 192), "b-wide": (256, 128), "c-tall": (192, 320), "d-square": (256, 256),
            "e-square": (256, 256), "f-small": (64, 64), "g-16x9": (320, 192), "h-tall": (128, 256)}
    got = {rec.path.stem: rec.size for rec in ds.images}
    assert got == want
    # the large ones sit in the bucket closest to their aspect; b-wide (300 < 320) and h-tall (180 < 192 wide)
    # would be enlarged there, so each takes the largest 64-multiple inside it, f-small 64×64
    for rec in ds.images:
        src = rec.source_size
        w, h = rec.size
        assert w <= src[0] and h <= src[1], rec.path.name  # nothing enlarged
        if rec.path.stem not in ("b-wide", "h-tall", "f-small"):
            best = min(aspect_error(b, src) for b in BucketPlan(256, 256, 64).sizes)
            assert aspect_error(rec.size, src) == pytest.approx(best)
        # no crop: the whole source stretched to the bucket, pixel for pixel what a plain resize gives
        assert rec.crop_left_top == (0, 0) and rec.resized_size == rec.size
        with Image.open(rec.path) as im:
            ref = np.asarray(im.convert("RGB").resize(rec.size, Image.Resampling.BICUBIC))
        assert torch.equal(rec.rgb, torch.from_numpy(ref.copy()).permute(2, 0, 1))
        assert ds.image_size(ds.images.index(rec)) == ImageSize((src[1], src[0]), (0, 0), (h, w))
    ds.cache_latents(pool_encode)
    shapes_seen = set()
    for _ in range(20):
        for items in ds.epoch():
            batch = ds.batch(items)
            sizes = {ds.images[ds.item_image[i]].size for i in items}
            assert len(sizes) == 1  # one bucket per batch
            (w, h), = sizes
            assert tuple(batch.latents.shape) == (2, 3, h // 8, w // 8)
            assert {s.target_size for s in batch.sizes} == {(h, w)}
            assert all(s.crop_top_left == (0, 0) for s in batch.sizes)
            shapes_seen.add((w, h))
    # the host's grouped sampler: a group of one image still trains, drawn with replacement
    assert shapes_seen == set(want.values())
    assert ds.bucket_note() == ("aspect-ratio buckets (area 256x256, step 64 px, 9 sizes): 8 images in 6 buckets: "
                                "256x256: 2, 320x192: 2, 64x64: 1, 128x256: 1, 192x320: 1, 256x128: 1")


def test_upscale_and_crop_modes(tmp_path, caplog):
    data = write_mixed(tmp_path / "data")
    up = {r.path.stem: r.size for r in load_images(options(tmp_path, data, bucketing=True, bucket_upscale=True)).images}
    assert up["b-wide"] == (320, 192) and up["h-tall"] == (192, 320) and up["f-small"] == (256, 256)
    assert up["a-wide"] == (320, 192)
    # crop center: resized keeping the aspect to cover the bucket, the small remainder cropped and recorded
    recs = {r.path.stem: r for r in load_images(options(tmp_path, data, bucketing=True, crop="center")).images}
    a = recs["a-wide"]  # 512×256 → cover 320×192: scale 0.75 → 384×192, 32 px off each side
    assert a.size == (320, 192) and a.resized_size == (384, 192) and a.crop_left_top == (32, 0)
    assert a.geometry() == ((256, 512), (0, 32), (192, 320))
    g = recs["g-16x9"]  # 640×360 → 320×192: scale 0.5333 → 341×192, (341 - 320) // 2 = 10
    assert g.size == (320, 192) and g.resized_size == (341, 192) and g.crop_left_top == (10, 0)
    for r in recs.values():  # one side cropped, by no more than the aspect mismatch with the bucket
        (rw, rh), (w, h) = r.resized_size, r.size
        assert rw == w or rh == h
        assert max(rw / w, rh / h) <= math.exp(aspect_error(r.size, r.source_size)) + 0.01
    # a side below one step is enlarged, with a warning naming the file
    (tmp_path / "thin").mkdir()
    Image.new("RGB", (40, 300)).save(tmp_path / "thin" / "thin.png")
    caplog.set_level("WARNING")
    assert load_images(options(tmp_path, tmp_path / "thin", bucketing=True)).images[0].size == (64, 256)
    assert "thin.png (40x300) is enlarged to 64x256" in caplog.text
    assert "aspect ratio of 7.50, beyond bucket_max_aspect 4" in caplog.text


def test_bucketing_off_reads_exactly_as_before(tmp_path):
    data = write_mixed(tmp_path / "data")
    for crop in ("resize", "center", "random"):
        plain = load_images(options(tmp_path, data, crop=crop)).images
        # the bucket settings without bucketing change nothing
        other = load_images(options(tmp_path, data, crop=crop, bucket_step=128, bucket_upscale=True,
                                    bucket_max_aspect=2.0)).images
        assert all(r.size == (256, 256) for r in plain)
        for a, b in zip(plain, other):
            assert torch.equal(a.rgb, b.rgb) and a.geometry() == b.geometry()
    ds = TrainDataset.from_options(options(tmp_path, data))
    assert ds.bucket_note() == ""


# -- the config fields ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TrainEmbeddingConfig, TrainHypernetworkConfig])
def test_fields_defaults_and_errors_name_the_field(cls, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    name = "embedding_name" if cls is TrainEmbeddingConfig else "hypernetwork_name"
    base = {name: "x", "data_root": str(tmp_path)}
    cfg = cls.from_dict(base)
    assert [getattr(cfg, f) for f in BUCKET_FIELDS] == [False, 0, 4.0, False]
    spec = {f["name"]: f for f in cls.describe()}
    assert all(spec[f]["label"] for f in BUCKET_FIELDS)
    ok = cls.from_dict({**base, "bucketing": True, "bucket_step": 128, "bucket_max_aspect": 2, "bucket_upscale": True})
    assert (ok.bucketing, ok.bucket_step, ok.bucket_max_aspect, ok.bucket_upscale) == (True, 128, 2.0, True)
    for extra, field in (({"bucketing": True, "varsize": True}, "bucketing"), ({"bucket_step": 12}, "bucket_step"),
                         ({"bucket_step": -64}, "bucket_step"), ({"bucket_max_aspect": 0.5}, "bucket_max_aspect")):
        with pytest.raises(ConfigError) as e:
            cls.from_dict({**base, **extra})
        assert e.value.field == field, extra
    # each changes what is trained: part of the resume fingerprint
    ref = fingerprint(cfg)
    for key, value in (("bucketing", True), ("bucket_step", 128), ("bucket_max_aspect", 2.0), ("bucket_upscale", True)):
        assert fingerprint(cls.from_dict({**base, key: value})) != ref, key


def test_the_step_follows_the_model_family(tmp_path):
    data = write_mixed(tmp_path / "data")

    def prepared(family, **kw):
        cfg = TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": str(data), "bucketing": True,
                                              "training_width": 256, "training_height": 256, **kw})
        return prepare_training_data(cfg, placeholder="e", seed=1, family=family).dataset

    assert prepared("sd1").opts.bucket_step == 64 and prepared("sdxl").opts.bucket_step == 32
    xl = {r.path.stem: r.size for r in prepared("sdxl").images}
    # 2:1 at 256² in steps of 32: 352×160 (2.2, |ln 1.1|) beats 320×192 and 384×160 (|ln 1.2|); 64 px: 320×192
    assert xl["a-wide"] == (352, 160) and {r.path.stem: r.size for r in prepared("sd1").images}["a-wide"] == (320, 192)
    with pytest.raises(ConfigError) as e:
        prepared("sd2", bucket_step=32)
    assert e.value.field == "bucket_step"
    assert prepared("sdxl", bucket_step=64).opts.bucket_step == 64


# -- real runs ---------------------------------------------------------------------------------------------
class Spy(StandaloneHost):
    """The standalone host, recording the shape of every latent batch and the sizes every prompt batch gets."""

    def __init__(self, model):
        super().__init__(model)
        self.x_shapes: list[tuple[int, ...]] = []
        self.sizes: list[list[ImageSize] | None] = []

    def predict(self, x_t, t, cond):
        self.x_shapes.append(tuple(x_t.shape))
        return super().predict(x_t, t, cond)

    def encode_text(self, prompts, sizes=None):
        self.sizes.append(list(sizes) if sizes is not None else None)
        return super().encode_text(prompts, sizes)


def run_ti(host, tmp_path, data, **kw):
    emb = str(tmp_path / "embeddings")
    create_embedding(host, CreateEmbeddingConfig.from_dict(
        {"name": "tester", "num_vectors_per_token": 2, "init_text": "shape", "embeddings_dir": emb}))
    start = load_embedding(os.path.join(emb, "tester.pt"))
    cfg = {"embedding_name": "tester", "embeddings_dir": emb, "data_root": str(data),
           "log_directory": str(tmp_path / "log"), "training_width": 128, "training_height": 128,
           "steps": 8, "learn_rate": "0.05", "batch_size": 2, "template_filename": "subject_filewords.txt",
           "save_embedding_every": 0, "create_image_every": 0, "training_write_csv_every": 0, "seed": 3,
           "resume_point_minutes": 0, "bucketing": True, **kw}
    rec = Recorder()
    result = train_embedding(host, TrainEmbeddingConfig.from_dict(cfg), rec)
    return rec, start, load_embedding(result.embedding_file)


TRAIN_SHAPES = {"wide": (256, 128), "wide2": (260, 130), "tall": (128, 256), "tall2": (130, 260),
                "square": (160, 160), "square2": (200, 200)}


def test_sd1_trains_in_buckets(tiny_sd1, tmp_path):
    host = Spy(tiny_sd1)
    data = write_mixed(tmp_path / "data", TRAIN_SHAPES)
    rec, start, end = run_ti(host, tmp_path, data, validation_every=8, validation_images=6)
    losses = [e["loss"] for e in rec.of("step")]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses) and len(set(losses)) > 1
    assert not any(torch.equal(start.vectors[k], end.vectors[k]) for k in start.vectors)
    # 128² area, step 64: wide → 192×64 (latent 8×24), tall → 64×192, square → 128×128; one shape per batch
    train = [s for s in host.x_shapes if s[0] == 2]
    assert len(train) == 8 and set(train) <= {(2, 4, 8, 24), (2, 4, 24, 8), (2, 4, 16, 16)}
    assert len(set(train)) >= 2
    # the validation loss takes one image at a time (4 timesteps each), whatever its shape: all three here
    assert {s[2:] for s in host.x_shapes if s[0] == 4} == {(8, 24), (24, 8), (16, 16)}
    assert [v["step"] for v in rec.of("validation")] == [0, 8]
    assert all(math.isfinite(v["loss"]) for v in rec.of("validation"))
    logs = [e["text"] for e in rec.of("log")]
    assert ("aspect-ratio buckets (area 128x128, step 64 px, 5 sizes): 6 images in 3 buckets: "
            "64x192: 2, 128x128: 2, 192x64: 2") in logs


def test_sd1_hypernetwork_trains_in_buckets(tiny_sd1, tmp_path):
    host = Spy(tiny_sd1)
    data = write_mixed(tmp_path / "data", TRAIN_SHAPES)
    hn = str(tmp_path / "hn")
    create_hypernetwork(None, CreateHypernetworkConfig.from_dict(
        {"name": "h", "enable_sizes": [64, 32], "hypernetwork_dir": hn, "seed": 0}))
    before = [p.detach().clone() for p in load_hypernetwork(os.path.join(hn, "h.pt")).trainable_params()]
    rec = Recorder()
    result = train_hypernetwork(host, TrainHypernetworkConfig.from_dict(
        {"hypernetwork_name": "h", "hypernetwork_dir": hn, "data_root": str(data), "log_directory": str(tmp_path / "log"),
         "training_width": 128, "training_height": 128, "learn_rate": "0.002", "batch_size": 2, "steps": 6,
         "save_hypernetwork_every": 0, "create_image_every": 0, "seed": 3, "bucketing": True}), rec)
    after = load_hypernetwork(result.file).trainable_params()
    assert result.step == 6 and all(math.isfinite(e["loss"]) for e in rec.of("step"))
    assert any(not torch.equal(x, y) for x, y in zip(before, after))
    assert set(host.x_shapes) <= {(2, 4, 8, 24), (2, 4, 24, 8), (2, 4, 16, 16)} and len(set(host.x_shapes)) >= 2
    assert any(e["text"].startswith("aspect-ratio buckets (area 128x128, step 64 px") for e in rec.of("log"))


def test_sdxl_gets_source_size_no_crop_and_bucket_size(tiny_sdxl, tmp_path):
    host = Spy(tiny_sdxl)
    data = write_mixed(tmp_path / "data", TRAIN_SHAPES)
    rec, start, end = run_ti(host, tmp_path, data, steps=6)
    losses = [e["loss"] for e in rec.of("step")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(start.vectors["clip_g"], end.vectors["clip_g"])
    # 128² area in SDXL's steps of 32: 2:1 → 160×96 (1.667) — 192×64 (3) is farther; 1:1 → 128×128
    bucket = {"wide": (160, 96), "wide2": (160, 96), "tall": (96, 160), "tall2": (96, 160),
              "square": (128, 128), "square2": (128, 128)}
    allowed = {ImageSize((h, w), (0, 0), (bucket[n][1], bucket[n][0])) for n, (w, h) in TRAIN_SHAPES.items()}
    train_calls = [s for s in host.sizes if s is not None and len(s) == 2]
    assert len(train_calls) == 6
    for sizes in train_calls:
        assert set(sizes) <= allowed  # each item: (source (h, w), no crop, its bucket (h, w))
        assert len({s.target_size for s in sizes}) == 1
    assert len({s.target_size for c in train_calls for s in c}) >= 2
    assert set(host.x_shapes) <= {(2, 4, 12, 20), (2, 4, 20, 12), (2, 4, 16, 16)}
