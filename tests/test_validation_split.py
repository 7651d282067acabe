"""Held-out validation and the best step (issue 13, item 5): a split chosen from the file names
(deterministic, disjoint, copies of one picture on one side), a separate validation folder, the
held-out images never in a training batch, early stopping at the evaluation the recorded history
says, the final file holding the best step's tensors bit for bit, a resumed run deciding as an
uninterrupted one, the CSV and chart, and preprocess writing the two folders."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from recorder import Recorder

import lib_sdtrain.core.training.run as run_module
from lib_sdtrain.core.data.dataset import DatasetOptions, TrainDataset
from lib_sdtrain.core.data.holdout import relative_name, split_dataset
from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.formats.torchfile import load_torch_file
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork
from lib_sdtrain.core.jobs.service import Job
from lib_sdtrain.core.options.config import (
    DEFAULT_TEMPLATES_DIR,
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.options.holdout import group_key, held_out
from lib_sdtrain.core.preprocess.operations import PreprocessConfig, run_preprocess
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding
from lib_sdtrain.core.training.best import VALIDATION_CSV, BestTracker
from lib_sdtrain.core.training.plot import draw_loss_curve
from lib_sdtrain.core.training.resume import fingerprint
from lib_sdtrain.hosts.standalone.host import StandaloneHost


def options(root, seed=3, **kw) -> DatasetOptions:
    return DatasetOptions(data_root=root, width=64, height=64, placeholder_token="e", seed=seed,
                          template_file=os.path.join(DEFAULT_TEMPLATES_DIR, "subject_filewords.txt"), **kw)


def names(ds: TrainDataset | None) -> list[str]:
    return [] if ds is None else [rec.path.name for rec in ds.images]


# -- the split ------------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_keeps_copies_of_one_picture_together(tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=12, size=64, seed=1)
    splits = [split_dataset(options(data, seed=s), split=0.25) for s in (1, 2, 99)]
    train, val = splits[0]
    assert len(names(val)) == 3 and len(names(train)) == 9  # round(0.25 × 12)
    assert set(names(train)).isdisjoint(names(val))
    assert set(names(train)) | set(names(val)) == {p.name for p in data.glob("*.png")}
    # the same images whatever the seed (and on every run)
    assert all(names(v) == names(val) and names(t) == names(train) for t, v in splits)
    # the held-out set is what the names say, not the folder's order: an added image moves no other
    write_sample_dataset(tmp_path / "more", count=13, size=64, seed=1)
    _, more_val = split_dataset(options(tmp_path / "more"), split=0.25)  # round(0.25 × 13) = 3 again
    added = {p.name for p in (tmp_path / "more").glob("*.png")} - {p.name for p in data.glob("*.png")}
    assert len(names(more_val)) == 3 and set(names(more_val)) <= set(names(val)) | added
    # preprocessed copies of one source picture (flips, tiles) are one group
    assert group_key("00003-0-photo") == group_key("00003-1-photo") == "/00003"
    assert group_key("sub/00003-2-photo.png") == "sub/00003" != group_key("00003-0-photo")
    assert group_key("03-red-square.png") == "03-red-square.png"
    pre = tmp_path / "pre"
    pre.mkdir()
    for i in range(6):
        for k in range(3):
            Image.new("RGB", (64, 64), (i * 30, k * 60, 0)).save(pre / f"{i:05}-{k}-pic{i}.png")
    t, v = split_dataset(options(pre), split=0.34)
    held = {n[:5] for n in names(v)}
    assert len(held) == 2 and len(names(v)) == 6 and not held & {n[:5] for n in names(t)}
    # a fraction that leaves nothing (or too few images) names the field
    with pytest.raises(ConfigError) as e:
        held_out(["a", "b"], 0.75)
    assert e.value.field == "validation_split"
    with pytest.raises(ConfigError):
        held_out(["a"], 0.1)
    assert held_out(["a", "b"], 0.1) == held_out(["b", "a"], 0.4)  # at least one: the same one


def test_a_validation_folder_is_read_apart_with_its_captions(tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    vdir = tmp_path / "val"
    vdir.mkdir()
    Image.new("RGB", (80, 64), (10, 20, 30)).save(vdir / "v1.png")
    (vdir / "v1.txt").write_text("held out caption", encoding="utf-8")
    train, val = split_dataset(options(data, shuffle_tags=True, flip_p=0.5), validation_dir=str(vdir))
    assert len(names(train)) == 4 and names(val) == ["v1.png"]
    assert "held out caption" in val.text(0) and " e" in val.text(0)  # its caption, in a template line
    assert val.texts_fixed  # one prompt, drawn once
    assert val.opts.flip_p == 0 and not val.opts.shuffle_tags  # the validation images as they are


def test_fields_are_checked_and_decide_the_resume_fingerprint(tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    (tmp_path / "val").mkdir()

    def cfg(**kw):
        return TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": str(data), **kw})

    c = cfg()
    assert (c.validation_split, c.validation_dir, c.early_stop_patience, c.early_stop_min_delta, c.final_file) == (
        0.0, "", 0, 0.0, "last")
    for kw, field in (
        ({"validation_split": 0.2}, "validation_every"),
        ({"early_stop_patience": 3}, "validation_every"),
        ({"final_file": "best"}, "validation_every"),
        ({"validation_every": 5, "validation_split": 1.0}, "validation_split"),
        ({"validation_every": 5, "validation_split": 0.2, "validation_dir": str(tmp_path / "val")}, "validation_dir"),
        ({"validation_every": 5, "validation_dir": str(tmp_path / "nope")}, "validation_dir"),
        ({"validation_every": 5, "validation_dir": str(data)}, "validation_dir"),
        ({"validation_every": 5, "early_stop_patience": -1}, "early_stop_patience"),
        ({"validation_every": 5, "early_stop_min_delta": -0.1}, "early_stop_min_delta"),
        ({"validation_every": 5, "final_file": "first"}, "final_file"),
        ({"validation_every": 5, "final_file": "best", "ema_decay": 0.9, "ema_for_output": True}, "final_file"),
    ):
        with pytest.raises(ConfigError) as e:
            cfg(**kw)
        assert e.value.field == field, kw
    # the cadence is neutral for a resume only while nothing depends on it
    assert fingerprint(cfg(validation_every=5)) == fingerprint(cfg(validation_every=7))
    assert fingerprint(cfg(validation_every=5, final_file="best")) != fingerprint(
        cfg(validation_every=7, final_file="best"))
    assert fingerprint(cfg(validation_every=5, early_stop_patience=2)) != fingerprint(
        cfg(validation_every=5, early_stop_patience=3))


def test_tracker_counts_improvements_with_min_delta():
    t = BestTracker(patience=2, min_delta=0.1)
    assert t.observe(0, float("nan")) is False and t.best_step is None  # not finite: never the best
    assert t.observe(1, 1.0) and t.best_step == 1
    assert not t.observe(2, 0.95) and t.since_best == 1  # less than min_delta better
    assert t.observe(3, 0.85) and t.since_best == 0
    assert not t.observe(4, 0.9) and not t.should_stop
    assert not t.observe(5, 0.8) and t.should_stop and t.best_step == 3
    again = BestTracker(patience=2, min_delta=0.1)
    again.load(t.state())
    assert again.state() == t.state() and again.should_stop


# -- runs on the tiny models ----------------------------------------------------------------------------
def ti_workspace(host, root, data, **kw):
    emb = root / "embeddings"
    create_embedding(host, CreateEmbeddingConfig.from_dict(
        {"name": "tester", "num_vectors_per_token": 2, "init_text": "shape", "embeddings_dir": str(emb)}))
    return {"embedding_name": "tester", "embeddings_dir": str(emb), "data_root": str(data),
            "log_directory": str(root / "log"), "training_width": 64, "training_height": 64, "steps": 40,
            "learn_rate": "0.05", "batch_size": 2, "template_filename": "subject_filewords.txt",
            "save_embedding_every": 1, "create_image_every": 0, "training_write_csv_every": 0, "seed": 3,
            "resume_point_minutes": 0, **kw}


def expected_decisions(losses: list[tuple[int, float]], patience: int, min_delta: float = 0.0):
    """(stop step or None, best step, evaluations made) from a validation history, by hand."""
    best, best_step, since = math.inf, None, 0
    for i, (step, loss) in enumerate(losses):
        if math.isfinite(loss) and loss < best - min_delta:
            best, best_step, since = loss, step, 0
        else:
            since += 1
        if patience and since >= patience:
            return step, best_step, i + 1
    return None, best_step, len(losses)


def assert_same_state_dict(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state_dict(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_held_out_images_never_enter_a_training_batch(tiny_sd1, tmp_path, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=8, size=64, seed=1)
    trained: list[str] = []
    batch = TrainDataset.batch

    def recording(self, items):
        trained.extend(str(self.images[self.item_image[i]].path) for i in items)
        return batch(self, items)

    monkeypatch.setattr(TrainDataset, "batch", recording)
    seen = {}
    prepare = run_module.prepare_training_data
    monkeypatch.setattr(run_module, "prepare_training_data",
                        lambda *a, **k: seen.setdefault("data", prepare(*a, **k)))
    rec = Recorder()
    ws = ti_workspace(host, tmp_path / "r", data, steps=12, validation_every=4, validation_split=0.25,
                      flip_p=0.5, shuffle_tags=True, save_embedding_every=0)
    result = train_embedding(host, TrainEmbeddingConfig.from_dict(ws), rec)
    assert result.step == 12
    held = seen["data"].validation_paths
    assert len(held) == 2 and len(seen["data"]) == 6
    assert [relative_name(p, data) for p in held] == sorted(
        relative_name(p, data) for p in held)  # read in name order
    assert len(seen["data"].validation_set) == 2  # every held-out image makes the validation loss
    assert trained and set(trained).isdisjoint(held)
    assert set(trained) == {str(p) for p in data.glob("*.png")} - set(held)  # the others all trained
    line = next(e["text"] for e in rec.of("log") if e["text"].startswith("validation:"))
    assert "2 held-out images" in line and all(os.path.basename(p) in line for p in held)
    assert [v["step"] for v in rec.of("validation")] == [0, 4, 8, 12]


def test_early_stop_on_a_real_run_saves_the_best_steps_file(tiny_sd1, tmp_path):
    """Validation on the training images (the tiny model's loss falls there), every step: the run
    ends at the evaluation its own history says, and the final file is the best step's save."""
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=8, size=64, seed=1)
    rec = Recorder()
    ws = ti_workspace(host, tmp_path / "r", data, validation_every=1, validation_images=8,
                      early_stop_patience=4, final_file="best", save_embedding_every=1)
    result = train_embedding(host, TrainEmbeddingConfig.from_dict(ws), rec)
    history = [(v["step"], v["loss"]) for v in rec.of("validation")]
    stop, best, evaluations = expected_decisions(history, 4)
    assert stop is not None and 0 < best < stop < 40  # it did stop early, and the best is a trained step
    assert result.step == stop and len(history) == evaluations and history[-1][0] == stop
    assert result.saved_step == best and f"Early stop at step {stop}" in result.message
    assert f"The file holds the best step ({best})" in result.message
    assert rec.of("validation")[-1]["best_step"] == best
    final = load_embedding(result.embedding_file)
    inter_path = os.path.join(result.log_dir, "embeddings", f"tester-{best}.pt")
    inter = load_embedding(inter_path)
    assert final.step == best and all(torch.equal(final.vectors[k], inter.vectors[k]) for k in inter.vectors)
    last = load_embedding(os.path.join(result.log_dir, "embeddings", f"tester-{stop}.pt"))
    assert not torch.equal(final.vectors["*"], last.vectors["*"])  # not the last step's
    # its optimizer state is the best step's too
    a, b = load_torch_file(result.embedding_file + ".optim"), load_torch_file(inter_path + ".optim")
    assert a["step"] == b["step"] == best
    assert_same_state_dict(a["optimizer_state_dict"], b["optimizer_state_dict"])
    # the CSV has one row per evaluation with the best so far; the chart was drawn
    with open(os.path.join(result.log_dir, VALIDATION_CSV), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [s for s, _ in history]
    assert int(rows[-1]["best_step"]) == best and float(rows[-1]["best_loss"]) == pytest.approx(
        min(v for _, v in history), abs=1e-7)
    assert result.loss_curve and os.path.isfile(result.loss_curve)
    assert not os.path.exists(result.embedding_file + ".resume")  # finished


def test_a_resumed_run_decides_as_an_uninterrupted_one(tiny_sd1, tmp_path):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=8, size=64, seed=1)
    opts = {"validation_every": 1, "validation_images": 8, "early_stop_patience": 4, "final_file": "best",
            "save_embedding_every": 0}
    ref_rec = Recorder()
    ref = train_embedding(host, TrainEmbeddingConfig.from_dict(ti_workspace(host, tmp_path / "ref", data, **opts)),
                          ref_rec)
    stop, best, _ = expected_decisions([(v["step"], v["loss"]) for v in ref_rec.of("validation")], 4)
    assert ref.step == stop and best is not None and best < stop - 1
    ws = ti_workspace(host, tmp_path / "run", data, **opts)
    first_rec, second_rec = Recorder(stop_at=best + 1), Recorder()
    first = train_embedding(host, TrainEmbeddingConfig.from_dict(ws), first_rec)  # stopped past the best
    assert first.stopped and first.step == best + 1 and first.saved_step == best
    point = load_torch_file(os.path.join(ws["embeddings_dir"], "tester.pt.resume"))
    assert point["validation"]["best_step"] == best and point["validation"]["tensors"] is not None
    torch.manual_seed(12345)
    second = train_embedding(host, TrainEmbeddingConfig.from_dict(ws), second_rec)
    assert "(resumed from step" in second.message
    # the same evaluations (none made twice), the same stop, the same best step and file
    both = [(v["step"], v["loss"], v["best_step"]) for v in first_rec.of("validation") + second_rec.of("validation")]
    assert both == [(v["step"], v["loss"], v["best_step"]) for v in ref_rec.of("validation")]
    assert second.step == ref.step == stop and second.saved_step == ref.saved_step == best
    want = load_embedding(ref.embedding_file)
    got = load_embedding(os.path.join(ws["embeddings_dir"], "tester.pt"))
    assert got.step == want.step == best and all(torch.equal(got.vectors[k], want.vectors[k]) for k in want.vectors)
    with open(os.path.join(second.log_dir, VALIDATION_CSV), newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [s for s, _, _ in both]


def scripted(monkeypatch, losses):
    """The validation loss returns `losses` in turn (the run's evaluations at its cadence)."""
    it = iter(losses)
    monkeypatch.setattr(run_module, "validation_loss", lambda *a, **k: next(it))


SCRIPT = [1.0, 0.9, 0.8, 0.795, 0.7, 0.72, 0.71, 0.705, 0.5, 0.4]  # min_delta 0.01, patience 3


def test_scripted_losses_stop_at_the_third_evaluation_without_improvement(tiny_sd1, tmp_path, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    scripted(monkeypatch, SCRIPT)
    rec = Recorder()
    result = train_embedding(host, TrainEmbeddingConfig.from_dict(ti_workspace(
        host, tmp_path / "r", data, steps=30, validation_every=3, save_embedding_every=3, early_stop_patience=3,
        early_stop_min_delta=0.01, final_file="best", validation_split=0.25)), rec)
    # evaluations at 0, 3, ..., 21: best 1.0@0, 0.9@3, 0.8@6, (0.795 is < 0.01 better), 0.7@12, then 3 worse
    assert expected_decisions(list(zip(range(0, 30, 3), SCRIPT)), 3, 0.01) == (21, 12, 8)
    assert result.step == 21 and result.saved_step == 12
    assert [v["best_step"] for v in rec.of("validation")] == [0, 3, 6, 6, 12, 12, 12, 12]
    final = load_embedding(result.embedding_file)
    inter = load_embedding(os.path.join(result.log_dir, "embeddings", "tester-12.pt"))
    assert final.step == 12 and torch.equal(final.vectors["*"], inter.vectors["*"])
    # "last" keeps the last step's tensors and ends at the same evaluation
    scripted(monkeypatch, SCRIPT)
    last = train_embedding(host, TrainEmbeddingConfig.from_dict(ti_workspace(
        host, tmp_path / "l", data, steps=30, validation_every=3, save_embedding_every=3, early_stop_patience=3,
        early_stop_min_delta=0.01, validation_split=0.25)))
    assert last.step == last.saved_step == 21 and load_embedding(last.embedding_file).step == 21
    inter21 = load_embedding(os.path.join(last.log_dir, "embeddings", "tester-21.pt"))
    assert torch.equal(load_embedding(last.embedding_file).vectors["*"], inter21.vectors["*"])


def test_hypernetwork_early_stop_saves_the_best_step(tiny_sd1, tmp_path, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    hn_dir = tmp_path / "hn"
    create_hypernetwork(None, CreateHypernetworkConfig.from_dict(
        {"name": "h", "enable_sizes": [64, 32], "hypernetwork_dir": str(hn_dir), "seed": 0}))
    scripted(monkeypatch, SCRIPT)
    result = train_hypernetwork(host, TrainHypernetworkConfig.from_dict({
        "hypernetwork_name": "h", "hypernetwork_dir": str(hn_dir), "data_root": str(data),
        "log_directory": str(tmp_path / "log"), "training_width": 64, "training_height": 64, "steps": 30,
        "learn_rate": "0.002", "batch_size": 2, "save_hypernetwork_every": 3, "create_image_every": 0,
        "seed": 3, "validation_every": 3, "early_stop_patience": 3, "early_stop_min_delta": 0.01,
        "final_file": "best", "validation_split": 0.25}))
    assert result.step == 21 and result.saved_step == 12
    saved = load_hypernetwork(result.hypernetwork_file)
    inter = load_hypernetwork(os.path.join(result.log_dir, "hypernetworks", "h-12.pt"))
    assert saved.step == 12
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(saved.trainable_params(), inter.trainable_params()))
    last = load_hypernetwork(os.path.join(result.log_dir, "hypernetworks", "h-21.pt"))
    assert not all(torch.equal(a.detach(), b.detach())
                   for a, b in zip(saved.trainable_params(), last.trainable_params()))


def test_sd2_with_a_validation_folder(tiny_sd2, tmp_path):
    host = StandaloneHost(tiny_sd2)
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    vdir = write_sample_dataset(tmp_path / "val", count=2, size=64, seed=5)
    rec = Recorder()
    result = train_embedding(host, TrainEmbeddingConfig.from_dict(ti_workspace(
        host, tmp_path / "r", data, steps=4, validation_every=2, validation_dir=str(vdir), final_file="best",
        save_embedding_every=2)), rec)
    val = rec.of("validation")
    assert [v["step"] for v in val] == [0, 2, 4] and all(math.isfinite(v["loss"]) for v in val)
    best = min(val, key=lambda v: v["loss"])["step"]
    assert result.saved_step == best == val[-1]["best_step"]
    assert any("2 held-out images (from" in e["text"] for e in rec.of("log"))


def test_sdxl_with_a_split(tiny_sdxl, tmp_path):
    host = StandaloneHost(tiny_sdxl)
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    rec = Recorder()
    result = train_embedding(host, TrainEmbeddingConfig.from_dict(ti_workspace(
        host, tmp_path / "r", data, steps=2, batch_size=1, validation_every=1, validation_split=0.25,
        early_stop_patience=1, final_file="best", save_embedding_every=1)), rec)
    history = [(v["step"], v["loss"]) for v in rec.of("validation")]
    stop, best, n = expected_decisions(history, 1)
    assert result.step == (stop if stop is not None else 2) and result.saved_step == best and len(history) == n
    assert load_embedding(result.embedding_file).step in (best, None)  # an SDXL .pt keeps its step in the .optim


# -- chart, job, preprocess ------------------------------------------------------------------------------
def test_chart_and_job_mark_the_best_step():
    steps = list(range(1, 21))
    plain = draw_loss_curve(steps, [1.0 / s for s in steps], validation=[(5, 0.3), (10, 0.2)])
    marked = draw_loss_curve(steps, [1.0 / s for s in steps], validation=[(5, 0.3), (10, 0.2)], best=(10, 0.2))
    green = (20, 140, 60)
    assert green not in set(plain.getdata()) and green in set(marked.getdata())
    job = Job(id="j", kind="train_embedding", config=CreateEmbeddingConfig(name="x"))
    job.control.emit("validation", step=0, loss=1.0, best_step=0, best_loss=1.0)
    job.control.emit("validation", step=5, loss=0.7, best_step=5, best_loss=0.7)
    job.control.emit("validation", step=10, loss=0.8, best_step=5, best_loss=0.7)
    assert job.to_dict()["validation_best"] == [5, 0.7]
    pytest.importorskip("pandas")
    from lib_sdtrain.ui.train_tabs import loss_frame

    frame = loss_frame([[1, 1.0, 0.1], [10, 0.5, 0.1]], job.to_dict()["validation_history"], [5, 0.7])
    best = frame[frame.series == "best validation"]
    assert list(best.step) == [5, 5] and max(best.value) == 0.7


def test_preprocess_writes_two_disjoint_folders(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        Image.new("RGB", (96, 64), (i * 20, 100, 50)).save(src / f"pic{i}.png")
        (src / f"pic{i}.txt").write_text(f"picture {i}", encoding="utf-8")
    results = []
    for dst in ("a", "b"):
        cfg = PreprocessConfig.from_dict({"process_src": str(src), "process_dst": str(tmp_path / dst),
                                          "process_width": 64, "process_height": 64, "process_flip": True,
                                          "preprocess_txt_action": "copy", "validation_split": 0.2})
        results.append(run_preprocess(cfg))
    res = results[0]
    train, val = Path(res.train_dir), Path(res.validation_dir)
    assert train == tmp_path / "a" / "train" and val == tmp_path / "a" / "validation"
    assert str(train) in str(res) and str(val) in str(res)
    t = sorted(p.name for p in train.iterdir())
    v = sorted(p.name for p in val.iterdir())
    assert len([n for n in v if n.endswith(".png")]) == 4  # 2 pictures × (image + flipped copy)
    assert len([n for n in t if n.endswith(".png")]) == 16 and len([n for n in t if n.endswith(".txt")]) == 16
    source = {n.split("-", 2)[2].rsplit(".", 1)[0] for n in v}
    assert len(source) == 2 and source.isdisjoint({n.split("-", 2)[2].rsplit(".", 1)[0] for n in t})
    assert all((val / n).with_suffix(".txt").is_file() for n in v if n.endswith(".png"))
    # the same split every run; nothing at the destination's top level
    assert v == sorted(p.name for p in (tmp_path / "b" / "validation").iterdir())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train", "validation"]
    with pytest.raises(ConfigError) as e:
        PreprocessConfig.from_dict({"process_src": str(src), "process_dst": str(tmp_path / "c"),
                                    "validation_split": 1.0})
    assert e.value.field == "validation_split"
