"""Host(standalone): a tiny, randomly initialised SD1/SD2-architecture model built the way A1111 builds one.

The config has the shape of A1111's configs/v1-inference.yaml (LatentDiffusion over UNetModel, AutoencoderKL
and FrozenCLIPEmbedder) and goes through ldm's `instantiate_from_config`, so state-dict keys, module classes
and call paths are those of a real checkpoint. Only the sizes shrink. Nothing is downloaded: the CLIP
tokenizer is generated from open_clip's BPE file and the text model is a random `CLIPTextModel`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lib_sdtrain.hosts.standalone import silence_legacy_warnings
from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

#: What a checkpoint written by `save_tiny_checkpoint` holds, as key prefixes (those of every SD1 file).
SD1_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")


def tiny_config(
    *,
    text_width: int = 64,
    unet_channels: int = 32,
    prediction: str = "eps",
    clip_version: str | None = None,
    cond_stage: dict[str, Any] | None = None,
    inpainting: bool = False,
) -> Any:
    """An OmegaConf config shaped like v1-inference.yaml, at toy sizes.

    `clip_version` becomes FrozenCLIPEmbedder's `version` (a local folder); `cond_stage` replaces the
    whole cond_stage_config (the SD2 variant uses it); `inpainting` gives the v1-inpainting-inference.yaml
    shape (LatentInpaintDiffusion, hybrid conditioning, 9 UNet input channels).
    """
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    cond: dict[str, Any] = cond_stage or {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    if cond_stage is None and clip_version is not None:
        cond["params"] = {"version": str(clip_version), "device": "cpu"}
    params: dict[str, Any] = {
        "linear_start": 0.00085,
        "linear_end": 0.0120,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 8,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "hybrid" if inpainting else "crossattn",
        "monitor": None,
        "scale_factor": 0.18215,
        "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                "image_size": 8,
                "in_channels": 9 if inpainting else 4,  # inpainting: + mask + masked-image latent
                "out_channels": 4,
                "model_channels": unet_channels,
                # Cross-attention at both levels, so every UNet level sees the text.
                "attention_resolutions": [1, 2],
                "num_res_blocks": 1,
                "channel_mult": [1, 2],
                "num_heads": 2,
                "use_spatial_transformer": True,
                "transformer_depth": 1,
                "context_dim": text_width,
                "use_checkpoint": False,
                "legacy": False,
            },
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4,
                "monitor": None,
                # Four levels, as in SD: the VAE downsamples by 8 (64x64 pixels -> 8x8 latent).
                "ddconfig": {
                    "double_z": True,
                    "z_channels": 4,
                    "resolution": 64,
                    "in_channels": 3,
                    "out_ch": 3,
                    "ch": 32,
                    "ch_mult": [1, 1, 1, 1],
                    "num_res_blocks": 1,
                    "attn_resolutions": [],
                    "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": cond,
    }
    if prediction == "v":
        params["parameterization"] = "v"
    target = "ldm.models.diffusion.ddpm.LatentDiffusion"
    if inpainting:
        target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
        params["finetune_keys"] = None
    return OmegaConf.create({"model": {"target": target, "params": params}})


def write_clip_dir(directory: str | Path, *, width: int, layers: int, heads: int, seed: int = 0) -> Path:
    """A local stand-in for openai/clip-vit-large-patch14: generated tokenizer + random text model."""
    from transformers import CLIPTextConfig, CLIPTextModel

    out = write_clip_tokenizer(directory)
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
        _randomise_layer_norms(model)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _randomise_layer_norms(module: torch.nn.Module) -> None:
    # Fresh LayerNorms (weight 1, bias 0) make every token's final hidden state zero-mean, so a host
    # that rescales by the mean of the conditioning (A1111's emphasis) divides by ~0 and gets NaN.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))


def unzero_init(model: torch.nn.Module) -> int:
    """Re-initialise every all-zero Conv/Linear weight; returns how many.

    ldm zero-initialises the UNet output conv, each ResBlock's last conv and each SpatialTransformer
    `proj_out` (a trick for training from scratch). With random weights elsewhere that makes
    d(loss)/d(context) exactly zero, and a textual-inversion vector would never move.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.detach().any():
            m.reset_parameters()
            count += 1
    return count


def instantiate(config: Any) -> torch.nn.Module:
    silence_legacy_warnings()
    from ldm.util import instantiate_from_config

    # ldm and transformers print banners (parameter counts, attention type); keep test output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return instantiate_from_config(config.model)


def build_tiny_sd1(
    workdir: str | Path,
    *,
    text_width: int = 64,
    text_layers: int = 1,
    text_heads: int = 2,
    unet_channels: int = 32,
    seed: int = 0,
    prediction: str = "eps",
    inpainting: bool = False,
) -> torch.nn.Module:
    """A tiny SD1 LatentDiffusion on the CPU; writes its CLIP folder to `workdir/clip`.

    `unet_channels` must be a multiple of 32 (GroupNorm(32)). Latent sides must be even (one UNet
    downsample), so image sides must be multiples of 16. The global RNG state is left untouched.
    """
    workdir = Path(workdir)
    clip_dir = write_clip_dir(
        workdir / "clip", width=text_width, layers=text_layers, heads=text_heads, seed=seed
    )
    config = tiny_config(
        text_width=text_width,
        unet_channels=unet_channels,
        prediction=prediction,
        clip_version=str(clip_dir),
        inpainting=inpainting,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate(config)
        unzero_init(model)
    return model.eval()


def build_tiny_sd2(
    workdir: str | Path,
    *,
    text_width: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    unet_channels: int = 32,
    seed: int = 0,
    prediction: str = "v",
) -> torch.nn.Module:
    """A tiny SD2-style model: FrozenOpenCLIPEmbedder (penultimate layer) over a registered toy
    open_clip architecture, default v-prediction like SD 2.x 768. The arch name is registered in
    open_clip's global config table (as `sdtrain-tiny-<width>x<layers>x<heads>`)."""
    cond = sd2_cond_stage(workdir, text_width=text_width, text_layers=text_layers, text_heads=text_heads)
    config = tiny_config(
        text_width=text_width, unet_channels=unet_channels, prediction=prediction, cond_stage=cond
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate(config)
        unzero_init(model)
        _randomise_layer_norms(model.cond_stage_model)
    return model.eval()


def sd2_cond_stage(
    workdir: str | Path, *, text_width: int, text_layers: int, text_heads: int
) -> dict[str, Any]:
    """The cond_stage_config of a tiny SD2 (as in v2-inference.yaml: penultimate layer), after
    registering its toy architecture with open_clip (`open_clip.add_model_config`, process-global)."""
    import open_clip

    arch = f"sdtrain-tiny-{text_width}x{text_layers}x{text_heads}"
    cfg_dir = Path(workdir) / "open_clip_configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    arch_cfg = {
        "embed_dim": text_width,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": MAX_LENGTH, "vocab_size": VOCAB_SIZE, "width": text_width,
                     "heads": text_heads, "layers": text_layers},
    }  # fmt: skip
    (cfg_dir / f"{arch}.json").write_text(json.dumps(arch_cfg), encoding="utf-8")
    open_clip.add_model_config(cfg_dir)
    return {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": arch, "version": None, "device": "cpu", "layer": "penultimate", "freeze": True},
    }


def save_tiny_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the full state dict as a real SD1 file would hold it: `.safetensors` as is, anything else
    as a `.ckpt`-style `{"state_dict": ...}` pickle of plain tensors (loadable with weights_only)."""
    path = Path(path)
    # Clone so no two entries share storage (safetensors refuses shared tensors).
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


def write_tiny_yaml(
    path: str | Path,
    *,
    text_width: int = 64,
    unet_channels: int = 32,
    prediction: str = "eps",
    clip_dir: str | Path | None = None,
    cond_stage: dict[str, Any] | None = None,
    inpainting: bool = False,
) -> Path:
    """The config file that goes next to a tiny checkpoint, as configs/v1-inference.yaml goes next to a
    real one. With `clip_dir`, FrozenCLIPEmbedder's `version` names that local folder (the tiny text
    model's head count cannot be read from its weights); without it, the host must be given one."""
    config = tiny_config(
        text_width=text_width,
        unet_channels=unet_channels,
        prediction=prediction,
        clip_version=str(clip_dir) if clip_dir is not None else None,
        cond_stage=cond_stage,
        inpainting=inpainting,
    )
    path = Path(path)
    OmegaConf.save(config, path)
    return path
