"""Host(standalone): a tiny, randomly initialised SDXL built from the real `sgm` code, the way the webui
builds one from sd_xl_base.yaml.

The config keeps every part of sd_xl_base.yaml — DiffusionEngine, DiscreteDenoiser over the legacy
DDPM schedule, a GeneralConditioner of FrozenCLIPEmbedder (hidden layer, penultimate) +
FrozenOpenCLIPEmbedder2 (penultimate, pooled) + three size embedders, a UNet with `adm_in_channels`
2816 and `context_dim` 2048, AutoencoderKL with `scale_factor` 0.13025 — and shrinks only the sizes
that do not show in files: the text encoders keep their real widths (768 and 1280, so embeddings have
the real `clip_l`/`clip_g` shapes) with two layers each; the UNet and VAE are toy-sized. The UNet has a
middle-block transformer (the webui takes an SDXL without one for SSD-1B and deletes blocks).

Two traps of random SDXL weights are avoided: sgm zero-initialises the UNet's output convs and
`proj_out` layers (textual-inversion gradients would be exactly 0), and fresh LayerNorms make the
conditioning zero-mean (the webui's emphasis rescale then divides by ~0).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lib_sdtrain.hosts.standalone.sgm_source import ensure_sgm
from lib_sdtrain.hosts.standalone.tiny import _randomise_layer_norms, unzero_init, write_clip_dir
from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE

CLIP_L_WIDTH, CLIP_G_WIDTH = 768, 1280
#: open_clip architecture name of the tiny CLIP-G (registered by `register_clip_g_arch`)
CLIP_G_ARCH = "sdtrain-tiny-xl-g"


def register_clip_g_arch(directory: str | Path) -> Path:
    """Write the tiny CLIP-G architecture (1280 wide, 2 layers, 20 heads, the real vocabulary) as an
    open_clip model config into `directory` and register it (process-global, like the webui's)."""
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {
        "embed_dim": CLIP_G_WIDTH,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": MAX_LENGTH, "vocab_size": VOCAB_SIZE, "width": CLIP_G_WIDTH,
                     "heads": 20, "layers": 2},
    }  # fmt: skip
    (directory / f"{CLIP_G_ARCH}.json").write_text(json.dumps(cfg), encoding="utf-8")
    open_clip.add_model_config(directory)
    return directory


def tiny_sdxl_config(
    clip_l_version: str, *, unet_channels: int = 32, prediction: str = "eps", vae_channels: int = 32
) -> Any:
    """An OmegaConf config shaped like sd_xl_base.yaml, at toy sizes; CLIP-L from `clip_l_version`
    (a local folder, or the hub name the host resolves offline), CLIP-G the registered toy arch."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    scaling = "EpsScaling" if prediction == "eps" else "VScaling"
    weighting = "EpsWeighting" if prediction == "eps" else "VWeighting"
    mod = "sgm.modules.diffusionmodules"
    size_embedder = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}}
    return OmegaConf.create({"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "disable_first_stage_autocast": True,
        "denoiser_config": {"target": f"{mod}.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": f"{mod}.denoiser_weighting.{weighting}"},
            "scaling_config": {"target": f"{mod}.denoiser_scaling.{scaling}"},
            "discretization_config": {"target": f"{mod}.discretizer.LegacyDDPMDiscretization"},
        }},
        "network_config": {"target": f"{mod}.openaimodel.UNetModel", "params": {
            "adm_in_channels": 2816,
            "num_classes": "sequential",
            "use_checkpoint": False,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": unet_channels,
            "attention_resolutions": [4, 2],  # attention at the second and third level, as SDXL
            "num_res_blocks": 1,
            "channel_mult": [1, 2, 2],
            "num_head_channels": 32,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": [1, 1, 1],
            "context_dim": CLIP_L_WIDTH + CLIP_G_WIDTH,
            "spatial_transformer_attn_type": "softmax",
            "legacy": False,
        }},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt",
             "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"version": clip_l_version, "layer": "hidden", "layer_idx": 1}},
            {"is_trainable": False, "input_key": "txt",
             "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": CLIP_G_ARCH, "version": None, "freeze": True, "layer": "penultimate",
                        "always_return_pooled": True, "legacy": False}},
            {"is_trainable": False, "input_key": "original_size_as_tuple", **size_embedder},
            {"is_trainable": False, "input_key": "crop_coords_top_left", **size_embedder},
            {"is_trainable": False, "input_key": "target_size_as_tuple", **size_embedder},
        ]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4,
            "monitor": "val/rec_loss",
            # four levels: the VAE downsamples by 8, as SDXL's (64x64 pixels -> 8x8 latent)
            "ddconfig": {"attn_type": "vanilla", "double_z": True, "z_channels": 4, "resolution": 64,
                         "in_channels": 3, "out_ch": 3, "ch": vae_channels, "ch_mult": [1, 1, 1, 1],
                         "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"},
        }},
    }}})  # fmt: skip


def instantiate_sgm(config: Any) -> torch.nn.Module:
    from sgm.util import instantiate_from_config

    with contextlib.redirect_stdout(io.StringIO()):  # sgm prints banners
        return instantiate_from_config(config.model)


def build_tiny_sdxl(
    workdir: str | Path,
    *,
    unet_channels: int = 32,
    seed: int = 0,
    prediction: str = "eps",
    webui_dir: str | Path | None = None,
) -> torch.nn.Module:
    """A tiny SDXL DiffusionEngine on the CPU, eval mode; writes its CLIP-L folder to `workdir/clip`
    and the CLIP-G architecture to `workdir/open_clip_configs`. The global RNG is left untouched."""
    ensure_sgm(webui_dir)
    workdir = Path(workdir)
    clip_dir = write_clip_dir(workdir / "clip", width=CLIP_L_WIDTH, layers=2, heads=12, seed=seed)
    register_clip_g_arch(workdir / "open_clip_configs")
    config = tiny_sdxl_config(str(clip_dir), unet_channels=unet_channels, prediction=prediction)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate_sgm(config)
        unzero_init(model.model)
        _randomise_layer_norms(model.conditioner)
    for embedder in model.conditioner.embedders:
        if hasattr(embedder, "device"):
            embedder.device = "cpu"  # sgm's text embedders default to "cuda"
    return model.eval()


def write_tiny_sdxl_yaml(path: str | Path, clip_l_version: str, *, unet_channels: int = 32,
                         prediction: str = "eps") -> Path:
    """The yaml that goes next to a tiny SDXL checkpoint (the webui prefers `<checkpoint>.yaml`)."""
    path = Path(path)
    OmegaConf.save(tiny_sdxl_config(clip_l_version, unet_channels=unet_channels, prediction=prediction), path)
    return path
