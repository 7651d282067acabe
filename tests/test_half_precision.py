"""The GPU path on the CPU: half-precision model weights, float32 trained tensors, autocast, and the
loss scaler for fp16 — what a webui on a GPU does (weights in fp16, training under autocast).

The CPU's group_norm cannot take half weights with a float32 input (ldm's GroupNorm32 upcasts its
input), which CUDA's autocast handles by running norms in float32; here the norm layers are kept in
float32 the same way and every other weight is half."""

from __future__ import annotations

import pytest
import torch
from recorder import Recorder

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.options.config import CreateEmbeddingConfig, TrainEmbeddingConfig
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding
from lib_sdtrain.hosts.standalone.host import StandaloneHost

NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def halve(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    for module in model.modules():
        if not isinstance(module, NORMS):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_ti(host, tmp_path, steps=8, **kw):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    emb_dir = str(tmp_path / "emb")
    create_embedding(host, CreateEmbeddingConfig.from_dict({"name": "half", "num_vectors_per_token": 2,
                                                            "init_text": "shape", "embeddings_dir": emb_dir}))
    start = load_embedding(f"{emb_dir}/half.pt")
    rec = Recorder()
    result = train_embedding(host, TrainEmbeddingConfig.from_dict({
        "embedding_name": "half", "embeddings_dir": emb_dir, "data_root": str(data), "log_directory": str(tmp_path / "log"),
        "training_width": 64, "training_height": 64, "steps": steps, "learn_rate": "0.05", "batch_size": 2,
        "template_filename": "subject_filewords.txt", "save_embedding_every": 0, "create_image_every": steps,
        "preview_steps": 2, "validation_every": steps, "seed": 3, **kw}), rec)
    return start, load_embedding(result.embedding_file), rec


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_train_float32_vectors_under_autocast(tmp_path, dtype, monkeypatch):
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1

    model = halve(build_tiny_sd1(tmp_path / "m", seed=0), dtype)
    host = StandaloneHost(model)
    assert host.describe().autocast_dtype == dtype  # "auto" mixed precision follows the weights
    scaled = []
    real = torch.amp.GradScaler

    class Spy(real):
        def step(self, optimizer, *a, **k):
            scaled.append(self.get_scale())
            return super().step(optimizer, *a, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    before = snapshot(model)
    start, final, rec = run_ti(host, tmp_path)
    # the trained tensors stay float32 and move; the loss and the validation loss are finite
    assert final.vectors["*"].dtype == torch.float32 and torch.isfinite(final.vectors["*"]).all()
    assert not torch.equal(final.vectors["*"], start.vectors["*"])
    assert all(v["loss"] == v["loss"] for v in rec.of("validation")) and len(rec.of("validation")) == 2
    assert rec.of("preview"), "a preview was rendered in half precision"
    # the half weights are untouched, dtypes included
    after = snapshot(model)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    # fp16 trains through the loss scaler (bf16 needs none)
    assert (len(scaled) == 8 and scaled[0] > 1) if dtype == torch.float16 else scaled == []


def test_sdxl_in_bf16(tiny_sdxl_dir, sgm_dir, tmp_path):
    from lib_sdtrain.hosts.standalone.tiny_sdxl import build_tiny_sdxl

    host = StandaloneHost(halve(build_tiny_sdxl(tmp_path / "xl", seed=5), torch.bfloat16))
    assert host.describe().autocast_dtype == torch.bfloat16
    start, final, _ = run_ti(host, tmp_path, steps=3)
    for key in ("clip_l", "clip_g"):
        assert final.vectors[key].dtype == torch.float32 and torch.isfinite(final.vectors[key]).all()
        assert not torch.equal(final.vectors[key], start.vectors[key])
