"""EMA of the trained tensors (issue 13, item 3): the closed form over a known sequence, the final
file holding the EMA when chosen (the trained tensors otherwise), previews and validation on it,
training itself unchanged, and a stopped run resuming bit-identical with its average."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from recorder import Recorder

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.formats.torchfile import load_torch_file
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork
from lib_sdtrain.core.options.config import (
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.textual_inversion import EmbeddingTraining, create_embedding, train_embedding
from lib_sdtrain.core.training.ema import Ema, swapped_in
from lib_sdtrain.core.training.resume import fingerprint
from lib_sdtrain.core.training.run import run_training
from lib_sdtrain.hosts.standalone.host import StandaloneHost


# -- the average itself ---------------------------------------------------------------------------------
def closed_form(thetas: list[torch.Tensor], decay: float, start: int, n: int) -> torch.Tensor:
    """decay^(n-s)·θ_s + Σ_{k=s+1..n} (1-decay)·decay^(n-k)·θ_k."""
    out = decay ** (n - start) * thetas[start]
    for k in range(start + 1, n + 1):
        out = out + (1 - decay) * decay ** (n - k) * thetas[k]
    return out


@pytest.mark.parametrize("start", [0, 3])
def test_ema_equals_the_closed_form_over_a_known_sequence(start):
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(13)]
    live = [thetas[0].clone()]
    ema = Ema(0.9, start_step=start)
    ema.begin(live, 0)  # the run begins at step 0
    assert ema.started == (start == 0)
    for n in range(1, 13):
        live[0].copy_(thetas[n])  # the optimizer step that made n steps done
        ema.update(live, n)
        if n < start:
            assert not ema.started and ema.state() is None
            continue
        assert torch.allclose(ema.tensors[0], closed_form(thetas, 0.9, start, n), rtol=1e-12, atol=1e-12), n
    assert not torch.equal(ema.tensors[0], thetas[12])
    # a resume point's copy put back goes on the same way
    again = Ema(0.9, start_step=start)
    again.load(ema.state(), live)
    again.update(live, 13)
    ema.update(live, 13)
    assert torch.equal(again.tensors[0], ema.tensors[0])
    # swapped in for a save or a preview, then the live tensors back bit for bit
    before = live[0].clone()
    with swapped_in(live, ema.tensors):
        assert torch.equal(live[0], ema.tensors[0])
    assert torch.equal(live[0], before)
    with pytest.raises(ValueError):
        Ema(1.0)


def test_ema_fields_validated_and_fingerprinted(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")

    def cfg(**kw):
        return TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": str(tmp_path), **kw})

    c = cfg()
    assert (c.ema_decay, c.ema_start_step, c.ema_for_output, c.ema_for_previews) == (0.0, 0, False, False)
    for kw, field in (({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": -0.1}, "ema_decay"),
                      ({"ema_start_step": -1}, "ema_start_step")):
        with pytest.raises(ConfigError) as e:
            cfg(**kw)
        assert e.value.field == field
    base = fingerprint(cfg(ema_decay=0.99))
    assert fingerprint(cfg(ema_decay=0.999)) != base and fingerprint(cfg(ema_decay=0.99, ema_start_step=5)) != base
    # what the average is used for does not change it: a resumed run may choose differently
    assert fingerprint(cfg(ema_decay=0.99, ema_for_output=True, ema_for_previews=True)) == base


# -- runs on the tiny model -----------------------------------------------------------------------------
def workspace(host, root, data, **kw):
    emb = root / "embeddings"
    create_embedding(host, CreateEmbeddingConfig.from_dict(
        {"name": "tester", "num_vectors_per_token": 2, "init_text": "shape", "embeddings_dir": str(emb)}))
    return {"embedding_name": "tester", "embeddings_dir": str(emb), "data_root": str(data),
            "log_directory": str(root / "log"), "training_width": 64, "training_height": 64, "steps": 6,
            "learn_rate": "0.05", "batch_size": 2, "template_filename": "subject_filewords.txt",
            "save_embedding_every": 1, "create_image_every": 3, "training_write_csv_every": 0, "seed": 3,
            "validation_every": 6, "validation_images": 2, "resume_point_minutes": 0, **kw}



def train(host, cfg_dict):
    """A run whose previews record the live vectors instead of rendering."""
    cfg = TrainEmbeddingConfig.from_dict(cfg_dict)
    kind = EmbeddingTraining(host, cfg)
    seen: dict[int, torch.Tensor] = {}
    rec = Recorder()
    host.render_preview = lambda req: seen.__setitem__(len(seen), kind.vectors["*"].detach().clone())
    result = run_training(host, cfg, rec, kind)
    del host.render_preview
    return result, rec, seen


def raw_steps(result) -> list[torch.Tensor]:
    """θ_1..θ_n from the intermediate saves (which keep the trained tensors)."""
    folder = os.path.join(result.log_dir, "embeddings")
    return [None] + [load_embedding(os.path.join(folder, f"tester-{k}.pt")).vectors["*"]
                     for k in range(1, result.step + 1)]


def test_final_file_holds_the_ema_when_chosen_and_the_trained_tensors_otherwise(tiny_sd1, tmp_path):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    runs = {}
    for name, kw in (("ema", {"ema_decay": 0.6, "ema_start_step": 2, "ema_for_output": True, "ema_for_previews": True}),
                     ("kept", {"ema_decay": 0.6, "ema_start_step": 2}),
                     ("off", {})):
        runs[name] = train(host, workspace(host, tmp_path / name, data, **kw))
    (ema_res, ema_rec, ema_seen), (kept_res, kept_rec, kept_seen), (off_res, off_rec, _) = runs.values()
    # the EMA never changes the training: the same losses and trained tensors at every step
    losses = [[e["loss"] for e in r.of("step")] for r in (ema_rec, kept_rec, off_rec)]
    assert losses[0] == losses[1] == losses[2] and len(losses[0]) == 6
    thetas = raw_steps(ema_res)
    assert all(torch.equal(a, b) for a, b in zip(thetas[1:], raw_steps(off_res)[1:]))
    # the expected average, from step 2 on, by the same float32 operations
    expected = {}
    avg = thetas[2].clone()
    for k in range(3, 7):
        avg.mul_(0.6).add_(thetas[k], alpha=0.4)
        expected[k] = avg.clone()
    final = load_embedding(ema_res.embedding_file)
    assert final.step == 6 and torch.equal(final.vectors["*"], expected[6])
    assert not torch.equal(final.vectors["*"], thetas[6])
    # not chosen (or off): the trained tensors
    for res in (kept_res, off_res):
        assert torch.equal(load_embedding(res.embedding_file).vectors["*"], thetas[6])
    # previews (steps 3 and 6) saw the average when chosen, the trained tensors otherwise
    assert torch.equal(ema_seen[0], expected[3]) and torch.equal(ema_seen[1], expected[6])
    assert torch.equal(kept_seen[0], thetas[3]) and torch.equal(kept_seen[1], thetas[6])
    # so did the validation loss: equal at step 0 (the EMA begins at 2), not at step 6
    val = [[e["loss"] for e in r.of("validation")] for r in (ema_rec, kept_rec)]
    assert val[0][0] == val[1][0] and val[0][1] != val[1][1]


def test_hypernetwork_ema_from_the_start_is_saved(tiny_sd1, tmp_path):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    hn_dir = tmp_path / "hn"
    path = create_hypernetwork(None, CreateHypernetworkConfig.from_dict(
        {"name": "h", "enable_sizes": [64, 32], "hypernetwork_dir": str(hn_dir), "seed": 0}))
    start = [p.detach().clone() for p in load_hypernetwork(path).trainable_params()]
    result = train_hypernetwork(host, TrainHypernetworkConfig.from_dict({
        "hypernetwork_name": "h", "hypernetwork_dir": str(hn_dir), "data_root": str(data),
        "log_directory": str(tmp_path / "log"), "training_width": 64, "training_height": 64, "steps": 4,
        "learn_rate": "0.002", "batch_size": 2, "save_hypernetwork_every": 1, "create_image_every": 0,
        "seed": 3, "ema_decay": 0.5, "ema_for_output": True}))
    folder = os.path.join(result.log_dir, "hypernetworks")
    avg = start  # begun as the run began (start step 0 ≤ the file's step)
    for k in range(1, 5):
        theta = load_hypernetwork(os.path.join(folder, f"h-{k}.pt")).trainable_params()
        avg = [a.mul_(0.5).add_(t.detach(), alpha=0.5) for a, t in zip(avg, theta)]
    saved = load_hypernetwork(result.hypernetwork_file)
    assert saved.step == 4
    assert all(torch.equal(a, b.detach()) for a, b in zip(avg, saved.trainable_params()))


def test_a_stopped_run_with_ema_and_caption_options_resumes_bit_identical(tiny_sd1, tmp_path):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=2, size=64, seed=1)
    write_sample_dataset(tmp_path / "data" / "3_more", count=2, size=64, seed=2)
    opts = {"steps": 8, "save_embedding_every": 0, "create_image_every": 0, "validation_every": 0,
            "ema_decay": 0.7, "ema_start_step": 2, "ema_for_output": True, "folder_repeats": True,
            "shuffle_tags": True, "keep_tokens": 1, "tag_drop_out": 0.2, "caption_dropout_rate": 0.3,
            "flip_p": 0.5}
    ref, run = workspace(host, tmp_path / "ref", data, **opts), workspace(host, tmp_path / "run", data, **opts)
    train_embedding(host, TrainEmbeddingConfig.from_dict(ref))
    first = train_embedding(host, TrainEmbeddingConfig.from_dict(run), Recorder(stop_at=4))
    point = os.path.join(run["embeddings_dir"], "tester.pt.resume")
    assert first.stopped and first.step == 4 and load_torch_file(point)["ema"] is not None
    torch.manual_seed(12345)  # whatever the process did meanwhile
    second = train_embedding(host, TrainEmbeddingConfig.from_dict(run))
    assert second.step == 8 and "(resumed from step 4)" in second.message and not os.path.exists(point)
    want = load_embedding(os.path.join(ref["embeddings_dir"], "tester.pt")).vectors["*"]
    got = load_embedding(os.path.join(run["embeddings_dir"], "tester.pt")).vectors["*"]
    assert torch.equal(want, got)
    shutil.rmtree(tmp_path / "run")
