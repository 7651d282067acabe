"""TensorBoard logging (the host's Settings → Training → tensorboard options) on the tiny model: the
host's tags, one value per step equal to the job's loss history, the previews as images when asked,
nothing when off, and a run that goes on (saying why once) when the package is missing."""

from __future__ import annotations

import io
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import ConfigError, SdtrainError
from lib_sdtrain.core.jobs.service import Job
from lib_sdtrain.core.options.config import (
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding
from lib_sdtrain.core.training.tensorboard import MISSING_TEXT, tensorboard_status
from lib_sdtrain.hosts.standalone.host import StandaloneHost

TB_FIELDS = ("training_enable_tensorboard", "training_tensorboard_save_images", "training_tensorboard_flush_every")


@pytest.fixture
def workspace(tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    ws = {"data": str(data), "emb": str(tmp_path / "embeddings"), "hn": str(tmp_path / "hypernetworks"),
          "log": str(tmp_path / "log")}
    return ws


def common(ws, **kw):
    base = {
        "data_root": ws["data"],
        "log_directory": ws["log"],
        "training_width": 64,
        "training_height": 64,
        "steps": 6,
        "batch_size": 2,  # 4 images: 2 steps per epoch
        "create_image_every": 3,
        "training_write_csv_every": 1,
        "seed": 3,
        "preview_steps": 2,
    }
    base.update(kw)
    return base


def ti_cfg(host, ws, **kw):
    if not os.path.exists(os.path.join(ws["emb"], "tb.pt")):
        create_embedding(host, CreateEmbeddingConfig.from_dict(
            {"name": "tb", "num_vectors_per_token": 1, "init_text": "shape", "embeddings_dir": ws["emb"]}))
    return TrainEmbeddingConfig.from_dict({
        "embedding_name": "tb", "embeddings_dir": ws["emb"], "learn_rate": "0.05",
        "template_filename": "subject_filewords.txt", "save_embedding_every": 0, **common(ws, **kw)})


def hn_cfg(ws, **kw):
    if not os.path.exists(os.path.join(ws["hn"], "tbh.pt")):
        create_hypernetwork(None, CreateHypernetworkConfig.from_dict(
            {"name": "tbh", "enable_sizes": [64, 32], "activation_func": "relu", "hypernetwork_dir": ws["hn"],
             "seed": 0}))
    return TrainHypernetworkConfig.from_dict({
        "hypernetwork_name": "tbh", "hypernetwork_dir": ws["hn"], "learn_rate": "0.002",
        "save_hypernetwork_every": 0, **common(ws, **kw)})


def run_job(train, host, cfg):
    job = Job(id="t", kind=cfg.kind, config=cfg)
    result = train(host, cfg, job.control)
    return job, result


def read_events(folder):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_mod.EventAccumulator(folder, size_guidance={ea_mod.SCALARS: 0, ea_mod.IMAGES: 0})
    acc.Reload()
    return acc


def f32(x):
    return float(np.float32(x))


def check_scalars(acc, job, steps_per_epoch=2):
    """The host's tags: per step against the file's step, per epoch against the step in the epoch."""
    history = [(s, loss, lr) for s, loss, lr in job.loss]
    assert [s for s, _, _ in history] == list(range(1, len(history) + 1))
    scalars = acc.Tags()["scalars"]
    for tag, column in (("Loss/train", 1), ("Learn rate/train", 2)):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [h[0] for h in history]  # one value per step
        assert [e.value for e in events] == [f32(h[column]) for h in history]
        per_epoch = {}
        for h in history:
            epoch, in_epoch = h[0] // steps_per_epoch, h[0] % steps_per_epoch + 1
            per_epoch.setdefault(f"{tag}/epoch-{epoch}", []).append((in_epoch, f32(h[column])))
        for epoch_tag, want in per_epoch.items():
            assert [(e.step, e.value) for e in acc.Scalars(epoch_tag)] == want
        assert {t for t in scalars if t.startswith(tag + "/")} == set(per_epoch)
    return scalars


def test_status_is_empty_with_the_package_installed():
    pytest.importorskip("tensorboard")
    assert tensorboard_status() == ""


def test_embedding_run_writes_the_host_tags_and_the_previews(tiny_sd1, workspace):
    pytest.importorskip("tensorboard")
    host = StandaloneHost(tiny_sd1)
    cfg = ti_cfg(host, workspace, training_enable_tensorboard=True, training_tensorboard_save_images=True)
    assert cfg.training_tensorboard_flush_every == 120  # nothing flushed during the run: closing writes it
    job, result = run_job(train_embedding, host, cfg)
    folder = os.path.join(result.log_dir, "tensorboard")
    assert os.path.isdir(folder) and any(f.startswith("events.out.tfevents") for f in os.listdir(folder))
    acc = read_events(folder)
    check_scalars(acc, job)
    assert len(job.loss) == 6
    # previews at steps 3 and 6: epochs 3 // 2 and 6 // 2, the same pixels as the PNG beside them
    assert sorted(acc.Tags()["images"]) == ["Validation at epoch 1", "Validation at epoch 3"]
    for tag, step in (("Validation at epoch 1", 3), ("Validation at epoch 3", 6)):
        (event,) = acc.Images(tag)
        assert (event.step, event.width, event.height) == (step, 64, 64)
        got = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        png = os.path.join(result.log_dir, "images", f"tb-{step}.png")
        assert np.array_equal(got, np.asarray(Image.open(png).convert("RGB")))
    assert not [e for e in job.events if e.kind == "log" and "ensor" in e.data.get("text", "")]


def test_hypernetwork_run_writes_the_host_tags_and_no_images_unless_asked(tiny_sd1, workspace):
    pytest.importorskip("tensorboard")
    host = StandaloneHost(tiny_sd1)
    cfg = hn_cfg(workspace, training_enable_tensorboard=True, training_tensorboard_flush_every=0)
    job, result = run_job(train_hypernetwork, host, cfg)
    acc = read_events(os.path.join(result.log_dir, "tensorboard"))
    check_scalars(acc, job)
    assert len(job.loss) == 6
    assert acc.Tags()["images"] == []
    assert os.path.isfile(os.path.join(result.log_dir, "images", "tbh-6.png"))  # previews were made


def test_nothing_is_written_when_the_setting_is_off(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    cfg = ti_cfg(host, workspace, steps=3, training_tensorboard_save_images=True)
    assert cfg.training_enable_tensorboard is False
    _job, result = run_job(train_embedding, host, cfg)
    assert result.step == 3 and os.path.isfile(os.path.join(result.log_dir, "images", "tb-3.png"))
    assert not os.path.exists(os.path.join(result.log_dir, "tensorboard"))


def test_a_missing_package_is_said_once_and_the_run_completes(tiny_sd1, workspace, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import → ImportError
    assert tensorboard_status() == MISSING_TEXT
    assert "pip install tensorboard" in MISSING_TEXT and "restart" in MISSING_TEXT
    host = StandaloneHost(tiny_sd1)
    cfg = hn_cfg(workspace, training_enable_tensorboard=True, training_tensorboard_save_images=True)
    job, result = run_job(train_hypernetwork, host, cfg)
    assert result.step == 6 and not result.stopped and len(job.loss) == 6
    said = [e.data["text"] for e in job.events if e.kind == "log"]
    assert said.count(MISSING_TEXT) == 1
    assert job.message == MISSING_TEXT  # what the status line shows
    assert not os.path.exists(os.path.join(result.log_dir, "tensorboard"))


def test_the_log_is_closed_when_a_run_stops_or_fails(tiny_sd1, workspace, monkeypatch):
    tb_mod = pytest.importorskip("torch.utils.tensorboard")
    closed = []
    real_close = tb_mod.SummaryWriter.close

    def close(self):
        closed.append(self.log_dir)
        real_close(self)

    monkeypatch.setattr(tb_mod.SummaryWriter, "close", close)
    host = StandaloneHost(tiny_sd1)
    # Stop at step 4: what was logged is on disk (flush_every 120: only closing writes it)
    cfg = ti_cfg(host, workspace, steps=20, training_enable_tensorboard=True)
    job = Job(id="s", kind=cfg.kind, config=cfg)
    real_emit = job.control.emit

    def emit(kind, **data):
        real_emit(kind, **data)
        if kind == "step" and data["step"] >= 4:
            job.control.stop()

    monkeypatch.setattr(job.control, "emit", emit)
    result = train_embedding(host, cfg, job.control)
    assert result.stopped and result.step == 4 and len(closed) == 1
    acc = read_events(closed[0])
    assert [e.step for e in acc.Scalars("Loss/train")] == [1, 2, 3, 4]

    # a failure inside the loop (here a preview) still closes the log
    def broken_preview(request):
        raise SdtrainError("preview failed")

    monkeypatch.setattr(host, "render_preview", broken_preview)
    cfg = hn_cfg(workspace, training_enable_tensorboard=True)
    with pytest.raises(SdtrainError, match="preview failed"):
        train_hypernetwork(host, cfg, Job(id="f", kind=cfg.kind, config=cfg).control)
    assert len(closed) == 2 and os.path.basename(closed[1]) == "tensorboard"
    assert [e.step for e in read_events(closed[1]).Scalars("Loss/train")] == [1, 2, 3]


def test_a_failing_write_ends_the_log_not_the_run(tiny_sd1, workspace, monkeypatch):
    tb_mod = pytest.importorskip("torch.utils.tensorboard")

    def add_scalar(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tb_mod.SummaryWriter, "add_scalar", add_scalar)
    host = StandaloneHost(tiny_sd1)
    job, result = run_job(train_embedding, host, ti_cfg(host, workspace, steps=3, training_enable_tensorboard=True))
    assert result.step == 3 and len(job.loss) == 3
    said = [e.data["text"] for e in job.events if e.kind == "log" and "TensorBoard" in e.data["text"]]
    assert len(said) == 1 and said[0].startswith("TensorBoard logging stopped")
    assert "No space left on device" in said[0]


# --- the settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TrainEmbeddingConfig, TrainHypernetworkConfig])
def test_settings_have_the_host_names_labels_and_defaults(cls):
    spec = {f["name"]: f for f in cls.describe()}
    assert [(spec[n]["type"], spec[n]["default"]) for n in TB_FIELDS] == [("bool", False), ("bool", False),
                                                                         ("int", 120)]
    assert spec["training_enable_tensorboard"]["label"] == "Enable tensorboard logging"
    assert spec["training_tensorboard_save_images"]["label"] == "Save generated images within tensorboard"
    assert spec["training_tensorboard_flush_every"]["label"] == (
        "How often, in seconds, to flush the pending tensorboard events and summaries to disk")


def test_bad_values_name_their_field(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    with pytest.raises(ConfigError, match="training_tensorboard_flush_every"):
        ti_cfg(host, workspace, training_tensorboard_flush_every=-1)
    with pytest.raises(ConfigError, match="training_tensorboard_flush_every"):
        hn_cfg(workspace, training_tensorboard_flush_every="often")
    with pytest.raises(ConfigError, match="training_enable_tensorboard"):
        hn_cfg(workspace, training_enable_tensorboard="maybe")
    with pytest.raises(ConfigError, match="log_directory"):
        hn_cfg(workspace, training_enable_tensorboard=True, log_directory="", create_image_every=0,
               training_write_csv_every=0)
    cfg = ti_cfg(host, workspace, training_enable_tensorboard="yes", training_tensorboard_flush_every=30.0)
    assert cfg.training_enable_tensorboard is True and cfg.training_tensorboard_flush_every == 30


def test_tensorboard_settings_do_not_change_a_resume_fingerprint(tiny_sd1, workspace):
    from lib_sdtrain.core.training.resume import fingerprint

    base = hn_cfg(workspace)
    other = hn_cfg(workspace, training_enable_tensorboard=True, training_tensorboard_save_images=True,
                   training_tensorboard_flush_every=5)
    assert fingerprint(base) == fingerprint(other)


@pytest.mark.parametrize("registered", [True, False])
def test_job_defaults_read_the_host_settings_when_registered(monkeypatch, registered):
    from lib_sdtrain.hosts.a1111 import runtime

    values = {"training_enable_tensorboard": True, "training_tensorboard_save_images": True,
              "training_tensorboard_flush_every": 30.0}
    opts = types.SimpleNamespace(**values, data_labels=dict.fromkeys(values) if registered else {})
    shared = types.SimpleNamespace(opts=opts, cmd_opts=types.SimpleNamespace(
        embeddings_dir="emb", hypernetwork_dir="hn", textual_inversion_templates_dir=None))
    monkeypatch.setitem(sys.modules, "modules", types.SimpleNamespace(shared=shared))
    for kind in ("train_embedding", "train_hypernetwork"):
        got = runtime.job_defaults(kind)
        if registered:
            assert {k: got[k] for k in TB_FIELDS} == {"training_enable_tensorboard": True,
                                                      "training_tensorboard_save_images": True,
                                                      "training_tensorboard_flush_every": 30}
            assert type(got["training_tensorboard_flush_every"]) is int
        else:
            assert not set(TB_FIELDS) & set(got)  # the config's defaults apply
