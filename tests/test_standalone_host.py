"""Tests for hosts/standalone: the offline tokenizer, the tiny ldm models and the TrainingHost port over them."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lib_sdtrain.core.port import PreviewRequest, SessionOptions, TrainingHost
from lib_sdtrain.hosts.standalone.host import StandaloneHost
from lib_sdtrain.hosts.standalone.tiny import (
    SD1_PREFIXES,
    build_tiny_sd1,
    save_tiny_checkpoint,
    sd2_cond_stage,
    write_tiny_yaml,
)

LATENT_64 = (4, 8, 8)


def params_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), k


def grad_flags(model):
    return [p.requires_grad for p in model.parameters()]


@pytest.fixture
def host(tiny_sd1):
    return StandaloneHost(tiny_sd1, checkpoint_name="tiny")


def token_row(host, text):
    (tid,) = host.texts[0].tokenize(text)
    return host.texts[0].token_embedding.weight[tid].detach()


# -- tokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("hello world", [49406, 3306, 1002, 49407]),
        ("A red DOG, sitting.", [49406, 320, 736, 1929, 267, 4919, 269, 49407]),
        ("(masterpiece:1.2)", [49406, 263, 12066, 281, 272, 269, 273, 264, 49407]),
        ("", [49406, 49407]),
    ],
)
def test_tokenizer_ids(clip_tokenizer_dir, text, ids):
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(clip_tokenizer_dir)(text)["input_ids"] == ids


def test_tokenizer_files_match_open_clip(clip_tokenizer_dir):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    vocab = json.loads((clip_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab[",</w>"] == 267
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (clip_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 49152 - 256 - 2
    tok = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    assert tok.model_max_length == 77 and tok.pad_token_id == tok.eos_token_id == 49407
    reference = SimpleTokenizer()
    for text in ["naïve café 😀 don't", "x" * 100, "a<lora:foo:0.5> b", "1girl, solo"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text)


# -- tiny model --------------------------------------------------------------------------------------


def test_tiny_sd1_shapes_and_keys(tiny_sd1):
    assert type(tiny_sd1).__name__ == "LatentDiffusion"
    assert type(tiny_sd1.cond_stage_model).__name__ == "FrozenCLIPEmbedder"
    dist = tiny_sd1.encode_first_stage(torch.zeros(2, 3, 64, 64))
    assert tuple(dist.mean.shape) == (2, *LATENT_64)
    keys = list(tiny_sd1.state_dict())
    for prefix in SD1_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    # The zero-init fix: no all-zero conv/linear weight is left in the UNet.
    for name, m in tiny_sd1.model.diffusion_model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert m.weight.detach().any(), name
    norms = [m for m in tiny_sd1.cond_stage_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(not torch.all(m.weight == 1) for m in norms)


def test_tiny_build_is_seeded_and_leaves_global_rng(tmp_path, tiny_sd1):
    rng = torch.get_rng_state()
    again = build_tiny_sd1(tmp_path, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_state(again, params_snapshot(tiny_sd1))
    other = build_tiny_sd1(tmp_path / "other", seed=5)
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(other.state_dict()[key], tiny_sd1.state_dict()[key])


# -- describe / schedule / predict -----------------------------------------------------------------------


def sd1_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.0120**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_describe(host):
    assert isinstance(host, TrainingHost)
    info = host.describe()
    assert info.family == "sd1" and info.checkpoint_name == "tiny" and info.checkpoint_hash == ""
    assert [(e.key, e.width) for e in info.text_encoders] == [("*", 64)]
    assert info.device == torch.device("cpu") and info.autocast_dtype is None and info.latent_downscale == 8


@pytest.mark.parametrize(("fixture", "prediction"), [("tiny_sd1", "eps"), ("tiny_sd1_v", "v")])
def test_schedule_and_predict(request, fixture, prediction):
    model = request.getfixturevalue(fixture)
    host = StandaloneHost(model)
    schedule = host.noise_schedule()
    assert schedule.prediction == prediction and schedule.num_timesteps == 1000
    assert schedule.alphas_cumprod.dtype == torch.float32 and schedule.alphas_cumprod.device.type == "cpu"
    torch.testing.assert_close(schedule.alphas_cumprod, sd1_alphas_cumprod())
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, *LATENT_64, generator=gen)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        cond = host.encode_text(["a cat", "a dog"])
        out = host.predict(x_t, t, cond)
        direct = model.apply_model(x_t, t, cond)
    assert cond.shape == (2, 77, 64) and out.shape == x_t.shape and out.dtype == torch.float32
    assert torch.equal(out, direct)
    torch.testing.assert_close(cond, model.cond_stage_model(["a cat", "a dog"]))


def test_encode_images(host, tiny_sd1):
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = host.encode_images(pixels)
    assert dist.mean.shape == dist.std.shape == (3, *LATENT_64)
    assert not dist.mean.requires_grad and bool((dist.std > 0).all())
    posterior = tiny_sd1.encode_first_stage(pixels)
    torch.testing.assert_close(dist.mean, posterior.mean * 0.18215)
    torch.testing.assert_close(dist.std, posterior.std * 0.18215)


# -- embeddings --------------------------------------------------------------------------------------


def test_initial_vectors(host):
    a, cat = token_row(host, "a"), token_row(host, "cat")
    (one,) = host.initial_vectors("a cat", 1).values()
    assert one.shape == (1, 64) and torch.equal(one[0], a)
    three = host.initial_vectors("a cat", 3)["*"]
    assert torch.equal(three, torch.stack([a, a, cat]))  # rows[i * 2 // 3] = 0, 0, 1
    assert torch.equal(host.initial_vectors("", 2)["*"], torch.zeros(2, 64))
    assert host.initial_vectors("a cat", 2)["*"].dtype == torch.float32


def test_embedding_splice_and_gradients(host, tiny_sd1):
    before = params_snapshot(tiny_sd1)
    vec = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with torch.no_grad():
        plain = host.encode_text(["a photo of sks", "a photo of a cat"])
    with host.gpu_session("ti", SessionOptions()) as session, host.use_embedding("sks", {"*": vec}):
        assert not any(grad_flags(tiny_sd1))
        cond = host.encode_text(["a photo of sks", "a photo of a cat"])
        # The prompt without the name encodes exactly as before; the one with it changes from the
        # name's position on (CLIP attention is causal: earlier positions cannot see it).
        assert torch.equal(cond[1], plain[1])
        assert torch.equal(cond[0, :4], plain[0, :4]) and not torch.allclose(cond[0, 4:], plain[0, 4:])
        x_t = torch.randn(2, *LATENT_64, generator=torch.Generator().manual_seed(3))
        host.predict(x_t, torch.tensor([500, 500]), cond).pow(2).mean().backward()
        session.report(1, 10, "loss 1.0")
        assert session.last == (1, 10, "loss 1.0") and not session.interrupted()
    assert vec.grad is not None and bool((vec.grad.abs().sum(dim=1) > 0).all())
    assert all(p.grad is None for p in tiny_sd1.parameters())
    assert_same_state(tiny_sd1, before)


def test_splice_positions(host):
    with (
        host.use_embedding("sks", {"*": torch.zeros(2, 64)}),
        host.use_embedding("sks sks", {"*": torch.zeros(3, 64)}),
    ):
        (sks,) = host.texts[0].tokenize("sks")
        ids, fixes = host._splice(host.texts[0], "sks sks and sks")
        # Longest name first: "sks sks" takes 3 slots, then "sks" takes 2.
        assert [(p, n) for p, n, _ in fixes] == [
            (1, "sks sks"),
            (2, "sks sks"),
            (3, "sks sks"),
            (5, "sks"),
            (6, "sks"),
        ]
        assert [k for _, _, k in fixes] == [0, 1, 2, 0, 1] and sks not in ids
        long_ids, long_fixes = host._splice(host.texts[0], "word " * 74 + "sks")
        assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407
        assert [p for p, _, _ in long_fixes] == [75]  # the second vector falls past the 75-token cut


def test_use_embedding_restores(host):
    with torch.no_grad():
        base = host.encode_text(["sks on a table"])
        with host.use_embedding("sks", {"*": torch.ones(1, 64)}):
            inner = host.encode_text(["sks on a table"])
            with host.use_embedding("sks", {"*": torch.full((2, 64), 0.5)}):
                nested = host.encode_text(["sks on a table"])
            assert torch.equal(host.encode_text(["sks on a table"]), inner)
        after = host.encode_text(["sks on a table"])
    assert not torch.equal(base, inner) and not torch.equal(inner, nested)
    assert torch.equal(after, base) and host._embeddings == {}
    for bad in ({"*": torch.zeros(1, 65)}, {"clip_l": torch.zeros(1, 64), "clip_g": torch.zeros(1, 64)}):
        with pytest.raises(ValueError), host.use_embedding("bad", bad):
            pass


# -- sessions ----------------------------------------------------------------------------------------


def test_gpu_session_restores_flags_and_modes(host, tiny_sd1):
    params = list(tiny_sd1.parameters())
    original = grad_flags(tiny_sd1)
    mixed = [i % 3 == 0 for i in range(len(params))]
    for p, flag in zip(params, mixed):
        p.requires_grad_(flag)
    tiny_sd1.model.train()
    modes = [m.training for m in tiny_sd1.modules()]
    try:
        with host.gpu_session("a", SessionOptions()):
            assert not any(grad_flags(tiny_sd1)) and not tiny_sd1.model.training
        assert grad_flags(tiny_sd1) == mixed and [m.training for m in tiny_sd1.modules()] == modes
        with pytest.raises(RuntimeError), host.gpu_session("b", SessionOptions()) as session:
            host.interrupt()
            assert session.interrupted()
            raise RuntimeError("boom")
        assert grad_flags(tiny_sd1) == mixed and [m.training for m in tiny_sd1.modules()] == modes
        with host.gpu_session("c", SessionOptions()) as session:
            assert not session.interrupted()  # a new session starts uninterrupted
    finally:
        for p, flag in zip(params, original):
            p.requires_grad_(flag)
        tiny_sd1.eval()
    assert not host._lock.locked()


def test_gradient_checkpointing_same_gradients(host, tiny_sd1):
    x_t = torch.randn(1, *LATENT_64, generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointing in (False, True):
        vec = torch.linspace(-1, 1, 2 * 64).reshape(2, 64).requires_grad_(True)
        with (
            host.gpu_session("ti", SessionOptions(gradient_checkpointing=checkpointing)),
            host.use_embedding("sks", {"*": vec}),
        ):
            host.predict(x_t, torch.tensor([300]), host.encode_text(["sks"])).pow(2).mean().backward()
        grads.append(vec.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert all("forward" not in vars(b) for b in tiny_sd1.model.diffusion_model.input_blocks)


# -- preview -----------------------------------------------------------------------------------------


def test_render_preview(host, tiny_sd1):
    before = params_snapshot(tiny_sd1)
    vec = torch.randn(2, 64, requires_grad=True)
    flags, rng = grad_flags(tiny_sd1), torch.get_rng_state()
    request = PreviewRequest(
        prompt="a photo of sks", negative_prompt="blurry", steps=3, seed=7, width=64, height=48
    )
    with host.use_embedding("sks", {"*": vec}):
        image = host.render_preview(request)
        again = host.render_preview(request)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert image.tobytes() == again.tobytes()
    assert host.render_preview(PreviewRequest(prompt="x", steps=2, seed=-1, width=32, height=32)).size == (
        32,
        32,
    )
    assert_same_state(tiny_sd1, before)
    assert grad_flags(tiny_sd1) == flags and torch.equal(torch.get_rng_state(), rng)
    assert vec.grad is None


def test_render_preview_v(tiny_sd1_v):
    image = StandaloneHost(tiny_sd1_v).render_preview(
        PreviewRequest(prompt="a cat", steps=2, seed=1, width=32, height=64)
    )
    assert image.size == (32, 64)


# -- checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_checkpoint_roundtrip(tmp_path, tiny_sd1, tiny_sd1_dir, suffix):
    ckpt = save_tiny_checkpoint(tiny_sd1, tmp_path / f"tiny{suffix}")
    yaml = write_tiny_yaml(tmp_path / "tiny.yaml", clip_dir=tiny_sd1_dir / "clip")
    loaded = StandaloneHost.load_checkpoint(ckpt, yaml)
    assert torch.nn.init.kaiming_uniform_.__module__ == "torch.nn.init"  # the loader's init patch is undone
    info = loaded.describe()
    assert info.checkpoint_name == "tiny" and info.family == "sd1"
    assert info.checkpoint_hash == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    assert_same_state(loaded.model, params_snapshot(tiny_sd1))
    x_t = torch.randn(1, *LATENT_64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = StandaloneHost(tiny_sd1)
        assert torch.equal(loaded.encode_text(["a cat"]), ref.encode_text(["a cat"]))
        assert torch.equal(
            loaded.predict(x_t, torch.tensor([99]), loaded.encode_text(["a cat"])),
            ref.predict(x_t, torch.tensor([99]), ref.encode_text(["a cat"])),
        )


def test_load_checkpoint_without_clip_dir(tmp_path):
    # One head per 64 channels is what the host assumes when it must read the CLIP shape off the weights.
    model = build_tiny_sd1(tmp_path / "m", text_heads=1, seed=3)
    ckpt = save_tiny_checkpoint(model, tmp_path / "one_head.safetensors")
    loaded = StandaloneHost.load_checkpoint(ckpt, write_tiny_yaml(tmp_path / "plain.yaml"))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(["a dog"]), StandaloneHost(model).encode_text(["a dog"]))


def test_load_checkpoint_errors(tmp_path, tiny_sd1_dir):
    from lib_sdtrain.core.errors import FormatError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    yaml = write_tiny_yaml(tmp_path / "tiny.yaml", clip_dir=tiny_sd1_dir / "clip")
    with pytest.raises(FormatError):
        StandaloneHost.load_checkpoint(bad, yaml)
    other = build_tiny_sd1(tmp_path / "wide", text_width=96, seed=0)
    with pytest.raises(FormatError):
        StandaloneHost.load_checkpoint(save_tiny_checkpoint(other, tmp_path / "wide.ckpt"), yaml)


# -- SD2 ---------------------------------------------------------------------------------------------


def test_sd2_host(tiny_sd2):
    host = StandaloneHost(tiny_sd2)
    info = host.describe()
    assert info.family == "sd2" and [(e.key, e.width) for e in info.text_encoders] == [("*", 64)]
    assert host.noise_schedule().prediction == "v"
    with torch.no_grad():
        torch.testing.assert_close(host.encode_text(["a cat"]), tiny_sd2.cond_stage_model(["a cat"]))
    # SD2's init text is not cut to n_vectors (A1111's open_clip path does not truncate).
    two = host.initial_vectors("a photo of", 2)["*"]
    rows = [token_row(host, w) for w in ("a", "photo", "of")]
    assert torch.equal(two, torch.stack([rows[0], rows[1]]))  # rows[i * 3 // 2] = 0, 1
    vec = torch.randn(1, 64, requires_grad=True)
    with host.gpu_session("ti", SessionOptions()), host.use_embedding("sks", {"*": vec}):
        cond = host.encode_text(["sks on a table"])
        host.predict(torch.randn(1, *LATENT_64), torch.tensor([400]), cond).pow(2).mean().backward()
    assert vec.grad is not None and bool(vec.grad.abs().sum() > 0)
    assert all(p.grad is None for p in tiny_sd2.parameters())


def test_sd2_load_checkpoint(tmp_path, tiny_sd2):
    cond = sd2_cond_stage(tmp_path, text_width=64, text_layers=2, text_heads=2)  # the fixture's architecture
    yaml = write_tiny_yaml(tmp_path / "sd2.yaml", prediction="v", cond_stage=cond)
    loaded = StandaloneHost.load_checkpoint(
        save_tiny_checkpoint(tiny_sd2, tmp_path / "sd2.safetensors"), yaml
    )
    assert loaded.describe().family == "sd2" and loaded.noise_schedule().prediction == "v"
    assert_same_state(loaded.model, params_snapshot(tiny_sd2))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(["a cat"]), StandaloneHost(tiny_sd2).encode_text(["a cat"]))


# -- inpainting --------------------------------------------------------------------------------------


def test_inpainting_model_gets_full_mask_conditioning(tmp_path):
    model = build_tiny_sd1(tmp_path, seed=4, inpainting=True)
    host = StandaloneHost(model)
    x_t = torch.randn(2, *LATENT_64, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        cond = host.encode_text(["a cat", "a dog"])
        out = host.predict(x_t, t, cond)
        grey = model.encode_first_stage(torch.zeros(1, 3, 64, 64)).mean * model.scale_factor
        c_concat = torch.cat([torch.ones(1, 1, 8, 8), grey], dim=1).expand(2, -1, -1, -1)
        direct = model.apply_model(x_t, t, {"c_concat": [c_concat], "c_crossattn": [cond]})
    assert out.shape == x_t.shape
    torch.testing.assert_close(out, direct)
    assert host.render_preview(PreviewRequest(prompt="a cat", steps=2, seed=3, width=64, height=32)).size == (
        64,
        32,
    )
