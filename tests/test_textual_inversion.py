"""Textual-inversion jobs end to end on a tiny real-architecture SD1 model (ldm, CLIP, VAE)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from recorder import Recorder

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.formats.embedding_io import load_embedding, load_optim
from lib_sdtrain.core.formats.torchfile import load_torch_file
from lib_sdtrain.core.options.config import CreateEmbeddingConfig, TrainEmbeddingConfig
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding
from lib_sdtrain.hosts.standalone.host import StandaloneHost


def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


@pytest.fixture
def workspace(tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    return {"data": str(data), "emb": str(tmp_path / "embeddings"), "log": str(tmp_path / "log")}


def make(host, ws, name="tester", n=2, init="shape", fmt="pt"):
    return create_embedding(
        host,
        CreateEmbeddingConfig.from_dict(
            {
                "name": name,
                "num_vectors_per_token": n,
                "init_text": init,
                "embeddings_dir": ws["emb"],
                "save_format": fmt,
            }
        ),
    )


def train_cfg(ws, name="tester", **kw):
    base = {
        "embedding_name": name,
        "embeddings_dir": ws["emb"],
        "data_root": ws["data"],
        "log_directory": ws["log"],
        "training_width": 64,
        "training_height": 64,
        "steps": 12,
        "learn_rate": "0.05",
        "batch_size": 2,
        "template_filename": "subject_filewords.txt",
        "save_embedding_every": 0,
        "create_image_every": 0,
        "training_write_csv_every": 1,
        "seed": 3,
        "preview_steps": 3,
    }
    base.update(kw)
    return TrainEmbeddingConfig.from_dict(base)


def test_create_embedding_matches_host_semantics(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    path = make(host, workspace, n=3, init="shape")
    emb = load_embedding(path)
    assert path.endswith("tester.pt") and emb.step == 0 and emb.n_vectors == 3
    rows = host.initial_vectors("shape", 3)["*"]
    assert torch.equal(emb.vectors["*"], rows)
    with pytest.raises(SdtrainError, match="already exists"):
        make(host, workspace, n=3)
    st = make(host, workspace, name="st", n=1, init="", fmt="safetensors")
    assert st.endswith(".safetensors") and torch.count_nonzero(load_embedding(st).vectors["*"]) == 0


def test_training_learns_writes_host_files_and_leaves_the_model_untouched(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    make(host, workspace)
    before, flags = model_state(tiny_sd1)
    start = load_embedding(os.path.join(workspace["emb"], "tester.pt"))
    rec = Recorder()
    cfg = train_cfg(
        workspace,
        steps=40,
        save_embedding_every=20,
        create_image_every=20,
        validation_every=40,
        validation_images=4,
    )
    result = train_embedding(host, cfg, rec)

    # the loss on fixed noise and timesteps falls
    val = rec.of("validation")
    assert [v["step"] for v in val] == [0, 40]
    assert val[1]["loss"] < val[0]["loss"]
    # only the vectors changed: every model tensor and requires_grad flag is as before
    after, flags_after = model_state(tiny_sd1)
    assert flags_after == flags
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the final file in the host's .pt shape, at the last step, different from where it started
    final = load_embedding(result.embedding_file)
    assert final.step == 40 and final.name == "tester"
    assert not torch.equal(final.vectors["*"], start.vectors["*"])
    raw = load_torch_file(result.embedding_file)
    assert set(raw) == {
        "string_to_token",
        "string_to_param",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    }
    assert load_optim(result.embedding_file, final.checksum()) is not None
    # the host's log layout
    log_dir = result.log_dir
    assert os.path.basename(log_dir) == "tester"
    for rel in (
        "embeddings/tester-20.pt",
        "embeddings/tester-40.pt",
        "images/tester-20.png",
        "images/tester-40.png",
        "image_embeddings/tester-20.png",
        "loss.png",
    ):
        assert os.path.isfile(os.path.join(log_dir, rel)), rel
    inter = load_embedding(os.path.join(log_dir, "embeddings/tester-20.pt"))
    assert inter.step == 20 and inter.name == "tester-20"
    in_image = load_embedding(os.path.join(log_dir, "image_embeddings/tester-20.png"))
    assert torch.equal(in_image.vectors["*"], inter.vectors["*"]) and in_image.name == "tester-20"
    with open(result.loss_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "epoch", "epoch_step", "loss", "learn_rate"]
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    # 4 images, batch 2 → 2 steps per epoch
    assert (rows[2]["epoch"], rows[2]["epoch_step"]) == ("1", "0")
    settings = [f for f in os.listdir(log_dir) if f.startswith("settings-")]
    assert len(settings) == 1
    with open(os.path.join(log_dir, settings[0])) as fh:
        s = json.load(fh)
    assert s["embedding_name"] == "tester" and s["num_of_dataset_images"] == 4 and s["initial_step"] == 0
    steps = rec.of("step")
    assert [e["step"] for e in steps] == list(range(1, 41)) and all(e["lr"] == 0.05 for e in steps)


def test_stop_then_resume_continues_at_the_step_with_the_optimizer_state(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    path = make(host, workspace)
    first = train_embedding(host, train_cfg(workspace, steps=10), Recorder(stop_at=4))
    assert first.stopped and first.step == 4
    saved = load_embedding(path)
    assert saved.step == 4
    optim = load_optim(path, saved.checksum())
    assert optim is not None
    assert all(int(s["step"]) == 4 for s in optim["optimizer_state_dict"]["state"].values())

    # without the stopped run's resume point: from the file and its .optim, as the host resumes
    rec = Recorder()
    second = train_embedding(host, train_cfg(workspace, steps=10, resume_interrupted=False), rec)
    assert not second.stopped and second.step == 10
    assert [e["step"] for e in rec.of("step")] == list(range(5, 11))
    assert any("resumed optimizer state" in e["text"] for e in rec.of("log"))
    assert not os.path.exists(path + ".resume")
    final = load_embedding(path)
    state = load_optim(path, final.checksum())["optimizer_state_dict"]["state"]
    assert all(int(s["step"]) == 10 for s in state.values())  # 4 restored + 6 new, not 6

    # already at max steps: nothing runs, nothing changes
    again = train_embedding(host, train_cfg(workspace, steps=10), Recorder())
    assert again.step == 10 and "already trained" in again.message
    assert torch.equal(load_embedding(path).vectors["*"], final.vectors["*"])


def test_learning_rate_schedule_and_accumulation(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    make(host, workspace)
    rec = Recorder()
    # 4 images, batch 1, 2 micro-batches per step; the schedule ends at step 5 although steps=9
    result = train_embedding(
        host, train_cfg(workspace, steps=9, batch_size=1, gradient_step=2, learn_rate="0.01:2, 0.001:5"), rec
    )
    lrs = [(e["step"], e["lr"]) for e in rec.of("step")]
    assert lrs == [(1, 0.01), (2, 0.01), (3, 0.001), (4, 0.001), (5, 0.001)]
    assert result.step == 5


def test_gradient_clipping_uses_the_scheduled_value(tiny_sd1, workspace, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    make(host, workspace)
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, value, *a, **k):
        seen.append(value)
        return real(params, value, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train_embedding(
        host, train_cfg(workspace, steps=4, clip_grad_mode="norm", clip_grad_value="0.5:2, 0.1"), Recorder()
    )
    assert seen == [0.5, 0.5, 0.1, 0.1]


def test_non_finite_loss_stops_and_keeps_the_last_finite_vectors(tiny_sd1, workspace, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    path = make(host, workspace)
    calls = {"n": 0}
    real = host.predict

    def predict(x_t, t, cond):
        calls["n"] += 1
        out = real(x_t, t, cond)
        return out * float("nan") if calls["n"] > 3 else out

    monkeypatch.setattr(host, "predict", predict)
    with pytest.raises(SdtrainError, match="step 4"):
        train_embedding(host, train_cfg(workspace, steps=10), Recorder())
    saved = load_embedding(path)
    assert saved.step == 3 and torch.isfinite(saved.vectors["*"]).all()


def test_v_prediction_model_trains(tiny_sd1_v, workspace):
    host = StandaloneHost(tiny_sd1_v)
    assert host.noise_schedule().prediction == "v"
    make(host, workspace)
    rec = Recorder()
    result = train_embedding(host, train_cfg(workspace, steps=3), rec)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in rec.of("step"))


def test_wrong_width_or_missing_embedding_is_refused_before_training(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    with pytest.raises(SdtrainError, match="create it first"):
        train_embedding(host, train_cfg(workspace, name="absent"), Recorder())
    from lib_sdtrain.core.formats.embedding import Embedding
    from lib_sdtrain.core.formats.embedding_io import save_embedding_pt

    os.makedirs(workspace["emb"], exist_ok=True)
    save_embedding_pt(
        Embedding("wide", {"*": torch.zeros(1, 768)}, step=0), os.path.join(workspace["emb"], "wide.pt")
    )
    with pytest.raises(SdtrainError, match="do not fit"):
        train_embedding(host, train_cfg(workspace, name="wide"), Recorder())
