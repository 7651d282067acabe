"""Caption options (issue 13, item 7): kohya's keep_tokens, caption dropout and `N_name` folder
repeats. Each is off by default and then draws, reads and counts exactly as the host does."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from PIL import Image

from lib_sdtrain.core.data.dataset import DatasetOptions, TrainDataset, load_images
from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.options.config import TrainEmbeddingConfig
from lib_sdtrain.core.training.batches import prepare_training_data
from lib_sdtrain.core.training.resume import fingerprint

TAGS = [f"t{i}" for i in range(8)]


def save(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)
    return path


def options(tmp_path, data, text="[filewords]\n", **kw):
    tpl = tmp_path / "tmpl.txt"
    tpl.write_text(text, encoding="utf-8")
    kw.setdefault("seed", 1234)
    return DatasetOptions(data_root=data, width=32, height=32, placeholder_token="tok", template_file=tpl,
                          require_name_in_template=False, **kw)


@pytest.fixture
def one_image(tmp_path):
    data = tmp_path / "data"
    save(data / "x.png")
    (data / "x.txt").write_text(",".join(TAGS), encoding="utf-8")
    return data


def host_create_text(rng: random.Random, lines, filename_text, tag_drop_out, shuffle_tags, token="tok"):
    """A1111 v1.10.1 PersonalizedBase.create_text, on a given generator (the reference)."""
    text = rng.choice(lines)
    tags = filename_text.split(",")
    if tag_drop_out != 0:
        tags = [t for t in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    return text.replace("[filewords]", ",".join(tags)).replace("[name]", token)


def test_options_off_draw_exactly_as_the_host(tmp_path, one_image):
    lines = ["a [name], [filewords]", "[filewords] by [name]"]
    for kw in ({"shuffle_tags": True}, {"tag_drop_out": 0.3}, {"shuffle_tags": True, "tag_drop_out": 0.5}):
        ds = TrainDataset.from_options(options(tmp_path, one_image, "\n".join(lines), **kw))
        ds.rng, ref = random.Random(7), random.Random(7)
        ours = [ds.text(0) for _ in range(200)]
        want = [host_create_text(ref, lines, ",".join(TAGS), kw.get("tag_drop_out", 0.0),
                                 kw.get("shuffle_tags", False)) for _ in range(200)]
        assert ours == want and ds.rng.getstate() == ref.getstate()


def test_keep_tokens_hold_the_first_tags_in_place(tmp_path, one_image):
    ds = TrainDataset.from_options(options(tmp_path, one_image, shuffle_tags=True, keep_tokens=3))
    texts = [ds.text(0).split(",") for _ in range(300)]
    assert all(t[:3] == TAGS[:3] for t in texts)  # in place over every shuffle
    assert all(sorted(t[3:]) == sorted(TAGS[3:]) for t in texts)
    assert len({tuple(t[3:]) for t in texts}) > 50  # the rest is shuffled
    # without keep_tokens the first tags move
    ds = TrainDataset.from_options(options(tmp_path, one_image, shuffle_tags=True))
    assert sum(ds.text(0).split(",")[:3] != TAGS[:3] for _ in range(300)) > 250
    # kept tags are never dropped either (kohya); the others are
    ds = TrainDataset.from_options(options(tmp_path, one_image, tag_drop_out=0.5, keep_tokens=2))
    texts = [ds.text(0).split(",") for _ in range(300)]
    assert all(t[:2] == TAGS[:2] for t in texts)
    assert min(len(t) for t in texts) < len(TAGS) and all(set(t) <= set(TAGS) for t in texts)
    # with neither shuffle nor drop-out, keep_tokens changes nothing: the prompt is fixed at load
    ds = TrainDataset.from_options(options(tmp_path, one_image, keep_tokens=2))
    assert ds.texts_fixed and ds.text(0) == ",".join(TAGS)


def test_caption_dropout_empties_filewords_at_its_rate(tmp_path, one_image):
    def prompts(rate, **kw):
        ds = TrainDataset.from_options(options(tmp_path, one_image, "a photo of [name], [filewords]\n",
                                               caption_dropout_rate=rate, **kw))
        return ds, [ds.text(0) for _ in range(2000)]

    ds, never = prompts(0.0)
    assert ds.texts_fixed and set(never) == {"a photo of tok, " + ",".join(TAGS)}
    ds, texts = prompts(0.25)
    assert not ds.texts_fixed  # drawn per fetch, like shuffled tags
    bare = sum(t == "a photo of tok, " for t in texts)
    assert bare == 483  # seed 1234: 24.15%
    assert abs(bare / len(texts) - 0.25) < 0.03
    assert all(t == "a photo of tok, " or t == "a photo of tok, " + ",".join(TAGS) for t in texts)
    assert prompts(0.25)[1] == texts  # the same seed, the same prompts
    # with shuffled tags the caption that is kept is shuffled as before
    _, texts = prompts(0.5, shuffle_tags=True, keep_tokens=1)
    kept = [t for t in texts if t != "a photo of tok, "]
    assert 900 < len(kept) < 1100 and all(t.startswith("a photo of tok, t0,") for t in kept)
    assert prompts(1.0)[1] == ["a photo of tok, "] * 2000


def folders(tmp_path):
    data = tmp_path / "data"
    save(data / "root-a.png")
    save(data / "root-b.png")
    save(data / "10_concept" / "c1.png")
    save(data / "10_concept" / "c2.png")
    (data / "10_concept" / "c2.txt").write_text("concept caption", encoding="utf-8")
    save(data / "plain" / "p.png")
    save(data / "0_off" / "o.png")
    save(data / "3_deep" / "sub" / "d.png")  # two levels down: not read
    save(data / ".hidden" / "h.png")
    return data


def names_per_epoch(ds, epochs=1):
    seen = Counter()
    for _ in range(epochs):
        for batch in ds.epoch():
            seen.update(ds.images[ds.item_image[i]].path.name for i in batch)
    return seen


def test_folder_repeats_count_each_image_n_times_per_epoch(tmp_path):
    data = folders(tmp_path)
    # off (the default): the directory's own files only, as the host's os.listdir
    ds = TrainDataset.from_options(options(tmp_path, data))
    assert sorted(r.path.name for r in ds.images) == ["root-a.png", "root-b.png"] and len(ds) == 2
    # on: 10_concept's images 10 times, a folder without N_ once, 0_ never, nothing deeper
    ds = TrainDataset.from_options(options(tmp_path, data, folder_repeats=True))
    assert len(ds) == 2 + 20 + 1 and ds.steps_per_epoch == 23
    assert names_per_epoch(ds) == {"c1.png": 10, "c2.png": 10, "p.png": 1, "root-a.png": 1, "root-b.png": 1}
    assert names_per_epoch(ds, 3) == {"c1.png": 30, "c2.png": 30, "p.png": 3, "root-a.png": 3, "root-b.png": 3}
    captions = {r.path.name: r.filename_text for r in ds.images}
    assert captions["c2.png"] == "concept caption" and captions["c1.png"] == "c1"
    # the first pass lists every image once, in order (the validation set takes items 0..n-1)
    assert ds.item_image[: len(ds.images)] == list(range(len(ds.images)))
    # batches of 4 (drop-last, as the host): 23 // 4 = 5 steps
    ds = TrainDataset.from_options(options(tmp_path, data, folder_repeats=True, batch_size=4))
    assert ds.steps_per_epoch == 5 and sum(names_per_epoch(ds).values()) == 20
    assert [r.repeats for r in load_images(options(tmp_path, data, folder_repeats=True)).images] == [10, 10, 1, 1, 1]


def test_training_config_fields_reach_the_dataset_and_host_repeats_stay_display_only(tmp_path):
    data = folders(tmp_path)

    def cfg(**kw):
        return TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": str(data), **kw})

    default = cfg()
    assert (default.keep_tokens, default.caption_dropout_rate, default.folder_repeats) == (0, 0.0, False)
    ds = prepare_training_data(default, placeholder="e", seed=1).dataset
    assert len(ds) == 2
    # the host's training_image_repeats_per_epoch is for the epoch display only: no more items
    on = cfg(folder_repeats=True, keep_tokens=2, caption_dropout_rate=0.1, training_image_repeats_per_epoch=5)
    ds = prepare_training_data(on, placeholder="e", seed=1).dataset
    assert len(ds) == 23
    assert (ds.opts.keep_tokens, ds.opts.caption_dropout_rate, ds.opts.folder_repeats) == (2, 0.1, True)
    # each changes what is trained: part of the resume fingerprint
    base = fingerprint(default)
    for kw in ({"keep_tokens": 1}, {"caption_dropout_rate": 0.1}, {"folder_repeats": True}):
        assert fingerprint(cfg(**kw)) != base, kw
    for kw, field in (({"keep_tokens": -1}, "keep_tokens"), ({"caption_dropout_rate": 1.5}, "caption_dropout_rate")):
        with pytest.raises(ConfigError) as e:
            cfg(**kw)
        assert e.value.field == field
