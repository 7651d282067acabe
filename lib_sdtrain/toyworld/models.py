"""Toy world: the two checkpoints (SD1 ldm LatentDiffusion, SDXL sgm DiffusionEngine), what the repo
holds of them, and how they are assembled into files any webui loads.

The repo holds only what was trained, in fp16 (`weights/`): the shared VAE (in a unit latent space,
std about 1) and each family's UNet. The text encoders are frozen at random and regenerated from a
seed, tensor by tensor, with NumPy's legacy `RandomState` (whose streams NumPy keeps bit-stable across
releases) — SDXL's 768- and 1280-wide token tables alone would be ~200 MB. `assemble()` builds the
full checkpoint plus the yaml beside it and checks the file against the SHA-256 recorded when the world
was trained; a missing or altered file is an error that names it and how to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.toyworld.vae import VAE_DDCONFIG

FAMILIES = ("sd1", "sdxl")
WEIGHTS = Path(__file__).resolve().parent / "weights"
RECORD = WEIGHTS / "record.json"
SCALE_FACTOR = {"sd1": 0.18215, "sdxl": 0.13025}  # the webuis' own per-family latent scale
TEXT_SEED = {"sd1": 181, "sdxl": 182}
CLIP_L_HUB = "openai/clip-vit-large-patch14"  # the name the webuis resolve (offline, from HF_HOME)
REBUILD = "python -m lib_sdtrain.toyworld train {family}"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

SD1_UNET: dict[str, Any] = {
    "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 64,
    "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
    "num_head_channels": 32, "use_spatial_transformer": True, "transformer_depth": 1,
    "context_dim": 768, "use_checkpoint": False, "legacy": False,
}  # fmt: skip
SDXL_UNET: dict[str, Any] = {
    "adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": False, "in_channels": 4,
    "out_channels": 4, "model_channels": 64, "attention_resolutions": [4], "num_res_blocks": 1,
    "channel_mult": [1, 2], "num_head_channels": 32, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "transformer_depth": [1, 1], "context_dim": 2048,
    "spatial_transformer_attn_type": "softmax", "legacy": False,
}  # fmt: skip


class ToyWorldFileError(SdtrainError):
    pass


def sd1_config(clip_version: str) -> Any:
    """LatentDiffusion as configs/v1-inference.yaml has it, with the toy UNet and VAE."""
    return OmegaConf.create({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
        "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": None,
        "scale_factor": SCALE_FACTOR["sd1"], "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": SD1_UNET},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": None, "ddconfig": dict(VAE_DDCONFIG),
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                              "params": {"version": clip_version, "device": "cpu"}},
    }}})  # fmt: skip


def sdxl_config(clip_l_version: str) -> Any:
    """DiffusionEngine as sd_xl_base.yaml has it (the tiny SDXL's text side), with the toy UNet and VAE."""
    from lib_sdtrain.hosts.standalone.tiny_sdxl import tiny_sdxl_config

    cfg = tiny_sdxl_config(clip_l_version)
    cfg.model.params.network_config.params = OmegaConf.create(SDXL_UNET)
    cfg.model.params.first_stage_config.params.ddconfig = OmegaConf.create(
        {"attn_type": "vanilla", **VAE_DDCONFIG}
    )
    return cfg


def _text_prefixes(family: str) -> tuple[str, ...]:
    return ("cond_stage_model.",) if family == "sd1" else ("conditioner.",)


def regenerate_text_encoders(model: torch.nn.Module, family: str) -> None:
    """Overwrite every text-encoder parameter with its seeded value (fp16-exact float32).

    Each tensor has its own stream (seed from the family and the key), so the values do not depend on
    the order of keys or on which other tensors exist. LayerNorms get weight 1 + 0.2 N and bias 0.2 N
    (fresh ones make the conditioning zero-mean, which the webuis' emphasis rescale divides by)."""
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        for key in sorted(state):
            if not key.startswith(_text_prefixes(family)) or key not in params:
                continue
            t = state[key]
            rs = np.random.RandomState((TEXT_SEED[family] * 1_000_003 + zlib.crc32(key.encode())) % 2**32)
            n = rs.standard_normal(tuple(t.shape))
            is_norm = t.ndim == 1 and ("norm" in key or ".ln_" in key)
            if key.endswith("logit_scale"):  # CLIP's own initial value (unused by the text side)
                t.fill_(math.log(1 / 0.07))
                continue
            if is_norm and key.endswith("weight"):
                v = 1.0 + 0.2 * n
            elif is_norm:
                v = 0.2 * n
            elif "position" in key:
                v = 0.01 * n
            else:
                v = 0.02 * n
            t.copy_(torch.from_numpy(np.asarray(v, dtype=np.float32)).to(torch.float16).to(t.dtype))


def _clip_folder(folder: Path) -> Path:
    """The CLIP-L tokenizer and text config (768 wide, 2 layers, 12 heads: the webui tests' CLIP), no
    weights: the text encoders are regenerated, not loaded."""
    from transformers import CLIPTextConfig

    from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

    out = write_clip_tokenizer(folder)
    CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, projection_dim=768,
                   num_hidden_layers=2, num_attention_heads=12, max_position_embeddings=MAX_LENGTH,
                   hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                   pad_token_id=49407).save_pretrained(out)
    return out


def build(family: str, workdir: str | Path, webui_dir: str | Path | None = None, *,
          init: bool = True) -> torch.nn.Module:
    """The toy world's model on the CPU with its regenerated text encoders; the UNet and VAE are
    randomly initialised (`init`, for training) or left as allocated (to be overwritten by the stored
    weights: `full_state`)."""
    import contextlib
    import io

    from lib_sdtrain.hosts.standalone.loader import clip_text_model_from_config, skip_weight_init
    from lib_sdtrain.hosts.standalone.tiny import unzero_init

    workdir = Path(workdir)
    clip = _clip_folder(workdir / "clip")
    skip = contextlib.nullcontext() if init else skip_weight_init()
    if family == "sd1":
        from lib_sdtrain.hosts.standalone.tiny import instantiate

        with clip_text_model_from_config({}), skip:
            model = instantiate(sd1_config(str(clip)))
    elif family == "sdxl":
        from lib_sdtrain.hosts.standalone.sgm_source import ensure_sgm
        from lib_sdtrain.hosts.standalone.tiny_sdxl import instantiate_sgm, register_clip_g_arch

        ensure_sgm(webui_dir)
        register_clip_g_arch(workdir / "open_clip_configs")
        with clip_text_model_from_config({}, module="sgm.modules.encoders.modules"), skip, \
                contextlib.redirect_stdout(io.StringIO()):
            model = instantiate_sgm(sdxl_config(str(clip)))
        for embedder in model.conditioner.embedders:
            if hasattr(embedder, "device"):
                embedder.device = "cpu"
    else:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    if init:
        unzero_init(model.model)
    regenerate_text_encoders(model, family)
    return model.eval()


def _scale_vae_into(state: dict[str, torch.Tensor], unit_vae: dict[str, torch.Tensor], scale: float) -> None:
    """Put the unit-latent VAE into `state` for a model that multiplies latents by `scale`: the posterior
    mean is divided by it (and the log-variance shifted to match) so scaled latents have std about 1."""
    k = 1.0 / scale
    for key, value in unit_vae.items():
        v = value.float().clone()
        if key == "quant_conv.weight":
            v[:4] *= k
        elif key == "quant_conv.bias":
            v[:4] *= k
            v[4:] += 2 * math.log(k)
        elif key == "post_quant_conv.weight":
            v *= scale
        state[VAE_PREFIX + key] = v


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_record() -> dict[str, Any]:
    try:
        return json.loads(RECORD.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ToyWorldFileError(f"{RECORD} is missing: rebuild the toy worlds with "
                                f"`{REBUILD.format(family='all')}`") from e


def stored_file(name: str) -> Path:
    """A file of `weights/`, checked against its recorded SHA-256."""
    record = _read_record()
    path = WEIGHTS / name
    family = name.split("-")[0] if not name.startswith("vae") else "vae"
    if not path.is_file():
        raise ToyWorldFileError(f"{path} is missing: restore it from git, or rebuild it with "
                                f"`{REBUILD.format(family=family)}`")
    if sha256(path) != record["files"].get(name):
        raise ToyWorldFileError(f"{path} is altered (its SHA-256 is not the recorded one): restore it from git "
                                f"(`git checkout -- {path.relative_to(WEIGHTS.parents[2])}`), or rebuild it with "
                                f"`{REBUILD.format(family=family)}`")
    return path


def full_state(family: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole fp16 state dict of a toy-world checkpoint, from `model` (text side, buffers) and the
    stored UNet and VAE."""
    from safetensors.torch import load_file

    unet = load_file(str(stored_file(f"{family}-unet.safetensors")))
    vae = load_file(str(stored_file("vae.safetensors")))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in unet.items():
        state[UNET_PREFIX + k] = v
    _scale_vae_into(state, vae, SCALE_FACTOR[family])
    stored = {UNET_PREFIX + k for k in unet} | {VAE_PREFIX + k for k in vae}
    text = {k for k in state if k.startswith(_text_prefixes(family))}
    params = {n for n, _ in model.named_parameters()}
    stray = sorted(k for k in params if k not in stored and k not in text)
    if stray:  # a parameter neither stored nor regenerated would be whatever memory held
        raise ToyWorldFileError(f"the {family} toy world's stored weights lack {stray[:5]}: rebuild with "
                                f"`{REBUILD.format(family=family)}`")
    # weights in fp16 (as most shared checkpoints); buffers (the DDPM schedule...) kept exact
    params = {n for n, _ in model.named_parameters()}
    return {k: v.to(torch.float16).contiguous() if v.is_floating_point() and k in params else v.contiguous()
            for k, v in state.items()}


def assemble(family: str, dest: str | Path, *, workdir: str | Path | None = None,
             webui_dir: str | Path | None = None, check: bool = True) -> dict[str, Path]:
    """Write `dest/toyworld-<family>.safetensors` and its `.yaml` (once; a present, intact file is kept).
    Returns {"ckpt", "yaml", "clip"}. `check` compares the file with the recorded SHA-256."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir) if workdir else dest / f".toyworld-{family}"
    ckpt = dest / f"toyworld-{family}.safetensors"
    yaml = ckpt.with_suffix(".yaml")
    record = _read_record()
    want = record.get("assembled", {}).get(family)
    model = build(family, workdir, webui_dir, init=False)
    clip = workdir / "clip"
    if not (ckpt.is_file() and want and sha256(ckpt) == want):
        state = full_state(family, model)
        tmp = ckpt.with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, ckpt)
    if check and want and sha256(ckpt) != want:
        raise ToyWorldFileError(
            f"{ckpt} does not match the recorded SHA-256 of the {family} toy world (assembled from "
            f"{WEIGHTS}; the text encoders are regenerated from a seed): rebuild it with "
            f"`{REBUILD.format(family=family)}` and commit weights/"
        )
    config = sd1_config(CLIP_L_HUB) if family == "sd1" else sdxl_config(CLIP_L_HUB)
    OmegaConf.save(config, yaml)
    return {"ckpt": ckpt, "yaml": yaml, "clip": clip}
