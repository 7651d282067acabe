"""SDXL on a tiny model built from the real `sgm` code: textual inversion on both text encoders, and
hypernetworks, through the standalone host (the same core loop as SD1/SD2)."""

from __future__ import annotations

import os

import pytest
import torch
from recorder import Recorder

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.formats.embedding_io import load_embedding, load_optim
from lib_sdtrain.core.formats.torchfile import load_torch_file
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork
from lib_sdtrain.core.options.config import (
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.port import ImageSize
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding
from lib_sdtrain.hosts.standalone.host import StandaloneHost


def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


@pytest.fixture(scope="module")
def host(tiny_sdxl):
    return StandaloneHost(tiny_sdxl)


@pytest.fixture
def ws(tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    return {"data": str(data), "emb": str(tmp_path / "embeddings"), "hn": str(tmp_path / "hypernetworks"),
            "log": str(tmp_path / "log")}


def make_embedding(host, ws, name="xl", fmt="safetensors", n=2):
    return create_embedding(host, CreateEmbeddingConfig.from_dict({
        "name": name, "num_vectors_per_token": n, "init_text": "shape", "embeddings_dir": ws["emb"],
        "save_format": fmt}))


def ti_cfg(ws, name="xl", **kw):
    return TrainEmbeddingConfig.from_dict({
        "embedding_name": name, "embeddings_dir": ws["emb"], "data_root": ws["data"], "log_directory": ws["log"],
        "training_width": 64, "training_height": 64, "steps": 20, "learn_rate": "0.05", "batch_size": 2,
        "template_filename": "subject_filewords.txt", "save_embedding_every": 0, "create_image_every": 0,
        "seed": 3, "preview_steps": 2, "save_format": "safetensors", **kw})


def test_conditioning_is_what_sgm_builds(host, tiny_sdxl):
    """crossattn = [CLIP-L hidden | CLIP-G penultimate]; vector = [CLIP-G pooled | sizes], exactly as
    sgm's GeneralConditioner gives them for the same prompts and size conditioning."""
    assert host.describe().family == "sdxl" and host.describe().context_width == 2048
    prompts = ["a photo of a cat", "dog"]
    sizes = [ImageSize((96, 64), (16, 0), (64, 64)), ImageSize.plain(64, 64)]
    with torch.no_grad():
        ours = host.encode_text(prompts, sizes)
        ref = tiny_sdxl.conditioner({
            "txt": prompts, "original_size_as_tuple": torch.tensor([[96, 64], [64, 64]]),
            "crop_coords_top_left": torch.tensor([[16, 0], [0, 0]]),
            "target_size_as_tuple": torch.tensor([[64, 64], [64, 64]])})
    assert tuple(ours["crossattn"].shape) == (2, 77, 2048) and tuple(ours["vector"].shape) == (2, 2816)
    assert torch.equal(ours["crossattn"], ref["crossattn"]) and torch.equal(ours["vector"], ref["vector"])


def test_ddpm_step_is_sgms_denoiser(host, tiny_sdxl):
    """The loop's x_t/t form gives sgm's own denoiser output: D(x0 + σε) = (x_t - sqrt(1-ᾱ)ε̂)/sqrt(ᾱ)."""
    sched = host.noise_schedule()
    assert sched.prediction == "eps" and sched.num_timesteps == 1000
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        cond = host.encode_text(["a", "b"])
        a = sched.alphas_cumprod[t].view(2, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        ours = (x_t - (1 - a).sqrt() * host.predict(x_t, t, cond)) / a.sqrt()
        sigma = tiny_sdxl.denoiser.sigmas[t]
        ref = tiny_sdxl.denoiser(tiny_sdxl.model, x0 + eps * sigma.view(2, 1, 1, 1), sigma, cond)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_embedding_trains_both_encoders_and_only_them(host, tiny_sdxl, ws):
    path = make_embedding(host, ws)
    start = load_embedding(path)
    assert {k: tuple(v.shape) for k, v in start.vectors.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    before, flags = model_state(tiny_sdxl)
    rec = Recorder()
    # a random SDXL's loss is mostly noise the vectors cannot explain: 60 steps of 4 show the fall
    result = train_embedding(host, ti_cfg(ws, steps=60, batch_size=4, learn_rate="0.03", validation_every=60,
                                          validation_images=4, save_embedding_every=30, create_image_every=60), rec)
    val = rec.of("validation")
    assert [v["step"] for v in val] == [0, 60] and val[1]["loss"] < val[0]["loss"]
    after, flags_after = model_state(tiny_sdxl)
    assert flags_after == flags and all(torch.equal(before[k], after[k]) for k in before)
    # the file is exactly the webui's SDXL form and reads back identical
    from safetensors import safe_open

    with safe_open(result.embedding_file, framework="pt") as f:
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict) == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    final = load_embedding(result.embedding_file)
    assert final.step == 60 and final.is_sdxl
    for key in ("clip_l", "clip_g"):
        assert not torch.equal(final.vectors[key], start.vectors[key]), key
    again = load_embedding(result.embedding_file)
    assert all(torch.equal(again.vectors[k], final.vectors[k]) for k in final.vectors)
    # intermediate saves and the PNG-embedded copy carry both sets too
    inter = load_embedding(os.path.join(result.log_dir, "embeddings", "xl-30.safetensors"))
    assert inter.is_sdxl and inter.step == 30
    png = load_embedding(os.path.join(result.log_dir, "image_embeddings", "xl-60.png"))
    assert all(torch.equal(png.vectors[k], final.vectors[k]) for k in final.vectors)


@pytest.mark.parametrize("frozen", ["clip_l", "clip_g"])
def test_one_encoder_can_be_frozen(host, ws, frozen):
    trained = "clip_g" if frozen == "clip_l" else "clip_l"
    start = load_embedding(make_embedding(host, ws))
    result = train_embedding(host, ti_cfg(ws, steps=6, train_encoders=trained))
    final = load_embedding(result.embedding_file)
    assert torch.equal(final.vectors[frozen], start.vectors[frozen])
    assert not torch.equal(final.vectors[trained], start.vectors[trained])


def test_pt_holds_only_the_two_tensors_and_resume_finds_its_step(host, ws):
    """The webui's SDXL .pt branch takes nothing but {clip_l, clip_g}: the step goes to the .optim."""
    path = make_embedding(host, ws, fmt="pt")
    first = train_embedding(host, ti_cfg(ws, steps=4, save_format="pt"))
    assert first.embedding_file == path and set(load_torch_file(path)) == {"clip_l", "clip_g"}
    emb = load_embedding(path)
    assert emb.step is None and load_optim(path, emb.checksum())["step"] == 4
    rec = Recorder()
    train_embedding(host, ti_cfg(ws, steps=7, save_format="pt", training_write_csv_every=1), rec)
    assert load_optim(path, load_embedding(path).checksum())["step"] == 7
    steps = [e["step"] for e in rec.of("step")]
    assert steps == [5, 6, 7]


def test_sdxl_hypernetwork_trains_changes_the_unet_and_zero_is_none(host, tiny_sdxl, ws):
    path = create_hypernetwork(host, CreateHypernetworkConfig.from_dict({
        "name": "xlhn", "enable_sizes": [64, 2048], "layer_structure": "1, 1", "hypernetwork_dir": ws["hn"]}))
    before, flags = model_state(tiny_sdxl)
    result = train_hypernetwork(host, TrainHypernetworkConfig.from_dict({
        "hypernetwork_name": "xlhn", "hypernetwork_dir": ws["hn"], "data_root": ws["data"],
        "log_directory": ws["log"], "training_width": 64, "training_height": 64, "steps": 8,
        "learn_rate": "0.001", "batch_size": 2, "template_filename": "style_filewords.txt",
        "save_hypernetwork_every": 0, "create_image_every": 0, "seed": 2}))
    assert result.step == 8 and os.path.samefile(result.file, path)
    after, flags_after = model_state(tiny_sdxl)
    assert flags_after == flags and all(torch.equal(before[k], after[k]) for k in before)
    hn = load_hypernetwork(path)
    assert sorted(hn.layers) == [64, 2048]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])
    with torch.no_grad():
        cond = host.encode_text(["a red square"])
        plain = host.predict(x, t, cond)
        with host.use_hypernetwork([hn.set_multiplier(1.0).eval()]):
            with_hn = host.predict(x, t, cond)
        with host.use_hypernetwork([hn.set_multiplier(0.0)]):
            zero = host.predict(x, t, cond)
    assert not torch.allclose(with_hn, plain) and torch.equal(zero, plain)


def test_v_prediction_sdxl_trains(sgm_dir, tmp_path, ws):
    from lib_sdtrain.hosts.standalone.tiny_sdxl import build_tiny_sdxl

    host = StandaloneHost(build_tiny_sdxl(tmp_path / "v", seed=4, prediction="v"))
    assert host.noise_schedule().prediction == "v"
    make_embedding(host, ws, n=1)
    rec = Recorder()
    result = train_embedding(host, ti_cfg(ws, steps=4, validation_every=4), rec)
    assert result.step == 4 and all(v["loss"] == v["loss"] for v in rec.of("validation"))


def test_checkpoint_and_yaml_load_as_the_webui_loads_them(sgm_dir, tiny_sdxl, tiny_sdxl_dir, tmp_path):
    """A tiny SDXL written as a webui checkpoint + yaml loads back through the standalone loader."""
    from lib_sdtrain.hosts.standalone.tiny import save_tiny_checkpoint
    from lib_sdtrain.hosts.standalone.tiny_sdxl import write_tiny_sdxl_yaml

    ckpt = save_tiny_checkpoint(tiny_sdxl, tmp_path / "xl.safetensors")
    yaml = write_tiny_sdxl_yaml(tmp_path / "xl.yaml", str(tiny_sdxl_dir / "clip"))
    loaded = StandaloneHost.load_checkpoint(ckpt, yaml)
    assert loaded.describe().family == "sdxl"
    size = [ImageSize.plain(64, 64)]
    with torch.no_grad():
        a = loaded.encode_text(["a dog"], size)
        b = StandaloneHost(tiny_sdxl).encode_text(["a dog"], size)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_an_sdxl_embedding_given_the_webui_folder(sgm_dir, tiny_sdxl, tiny_sdxl_dir, tmp_path, ws, capsys):
    """`python -m lib_sdtrain train-embedding --ckpt ... --webui DIR`: sgm comes from the webui's
    repositories (the checkout the tests unpacked), the files are the webui's SDXL form."""
    import sys
    from pathlib import Path

    from lib_sdtrain.__main__ import _checkpoint, _tiny
    from lib_sdtrain.cli import HostFactories, main
    from lib_sdtrain.hosts.standalone.tiny import save_tiny_checkpoint
    from lib_sdtrain.hosts.standalone.tiny_sdxl import write_tiny_sdxl_yaml

    webui = Path(sgm_dir).parents[1]
    assert (webui / "repositories" / "generative-models" / "sgm").is_dir()
    ckpt = save_tiny_checkpoint(tiny_sdxl, tmp_path / "xl.safetensors")
    yaml = write_tiny_sdxl_yaml(tmp_path / "xl.yaml", str(tiny_sdxl_dir / "clip"))
    common = ["--ckpt", str(ckpt), "--yaml", str(yaml), "--webui", str(webui), "--embeddings-dir", ws["emb"]]
    hosts = HostFactories(checkpoint=_checkpoint, tiny=_tiny)
    saved_path = list(sys.path)
    try:
        assert main(["create-embedding", *common, "--name", "clixl", "--num-vectors-per-token", "1",
                     "--save-format", "safetensors"], hosts) == 0
        assert main(["train-embedding", *common, "--embedding-name", "clixl", "--data-root", ws["data"],
                     "--steps", "3", "--training-width", "64", "--training-height", "64", "--save-format",
                     "safetensors", "--create-image-every", "0", "--save-embedding-every", "0",
                     "--log-directory", ws["log"], "--train-encoders", "clip_g"], hosts) == 0
    finally:
        sys.path[:] = saved_path
    emb = load_embedding(os.path.join(ws["emb"], "clixl.safetensors"))
    assert emb.step == 3 and {k: tuple(v.shape) for k, v in emb.vectors.items()} == {"clip_l": (1, 768),
                                                                                    "clip_g": (1, 1280)}
    assert "done:" in capsys.readouterr().out
