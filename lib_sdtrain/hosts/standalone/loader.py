"""Host(standalone): builds an ldm LatentDiffusion from a real SD1/SD2 checkpoint and its yaml, offline.

Follows what A1111 does when it loads a checkpoint (config through `instantiate_from_config`, no EMA copy, no
ldm gradient checkpointing, old CLIP keys renamed, non-strict load), minus everything that would reach the
network: FrozenCLIPEmbedder's `version` is pointed at a local folder and its text model is built from a config
(the weights come from the checkpoint); FrozenOpenCLIPEmbedder gets `version=None` (no pretrained download).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lib_sdtrain.core.errors import FormatError
from lib_sdtrain.hosts.standalone.tiny import instantiate
from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

CLIP_PREFIX = "cond_stage_model.transformer.text_model."
#: Checkpoints saved with transformers < 4.22 lack the `text_model.` level (A1111 renames them the same way).
_OLD_CLIP_KEYS = {
    "cond_stage_model.transformer.embeddings.": CLIP_PREFIX + "embeddings.",
    "cond_stage_model.transformer.encoder.": CLIP_PREFIX + "encoder.",
    "cond_stage_model.transformer.final_layer_norm.": CLIP_PREFIX + "final_layer_norm.",
}
_REQUIRED = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
_INIT_FUNCS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
               "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")  # fmt: skip


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.ckpt` file on the CPU, `state_dict` nesting removed, old CLIP keys
    renamed. `.ckpt` goes through `torch.load(weights_only=True)`: no arbitrary unpickling."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure means "not a checkpoint we can read"
        raise FormatError(str(path), f"cannot read checkpoint: {e}") from e
    while isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise FormatError(str(path), "not a state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue  # global_step and other bookkeeping in .ckpt files
        for old, new in _OLD_CLIP_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out


def file_shorthash(path: str | Path) -> str:
    """A1111's checkpoint short hash: the first 10 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def clip_config_from_state(state: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, Any]:
    """CLIPTextConfig fields read off the weights. Heads are width/64, true of every released SD1/SDXL
    CLIP-L text encoder (ViT-L/14: 768/12); a toy encoder needs a clip_dir with its own config.json."""
    width = int(state[prefix + "embeddings.token_embedding.weight"].shape[1])
    layer_keys = [k for k in state if k.startswith(prefix + "encoder.layers.")]
    layers = 1 + max(int(k[len(prefix + "encoder.layers.") :].split(".")[0]) for k in layer_keys)
    inner = int(state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0])
    return {
        "vocab_size": VOCAB_SIZE, "hidden_size": width, "intermediate_size": inner, "projection_dim": width,
        "num_hidden_layers": layers, "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": MAX_LENGTH, "hidden_act": "quick_gelu",
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    }  # fmt: skip


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Skip random initialisation while building (about 17 s of CPU for SD1, all overwritten by the
    checkpoint). Every parameter that stays uninitialised is caught by the missing-keys check."""
    from transformers.modeling_utils import no_init_weights

    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCS}
    try:
        for name in _INIT_FUNCS:
            setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
        with no_init_weights():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


@contextlib.contextmanager
def clip_text_model_from_config(
    state: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX, module: str = "ldm.modules.encoders.modules"
) -> Iterator[None]:
    """Make FrozenCLIPEmbedder build its CLIPTextModel from a config instead of loading hub weights."""
    import importlib

    from transformers import CLIPTextConfig, CLIPTextModel

    encoders = importlib.import_module(module)

    class _FromConfig:
        @staticmethod
        def from_pretrained(version: str, **_: Any) -> CLIPTextModel:
            cfg_file = Path(version) / "config.json"
            if cfg_file.is_file():
                return CLIPTextModel(CLIPTextConfig.from_pretrained(version))
            return CLIPTextModel(CLIPTextConfig(**clip_config_from_state(state, prefix)))

    original = encoders.CLIPTextModel
    encoders.CLIPTextModel = _FromConfig  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        encoders.CLIPTextModel = original  # type: ignore[misc]


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], ckpt_path: str | Path,
                  yaml_path: str | Path, required: tuple[str, ...]) -> None:
    """Non-strict load, as the webui's; a shape mismatch or a missing weight under `required` means the
    yaml does not describe this checkpoint."""
    try:
        missing, _unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise FormatError(str(ckpt_path), f"does not fit {Path(yaml_path).name}: {e}") from e
    missing = [k for k in missing if k.startswith(required) and not k.endswith("position_ids")]
    if missing:
        raise FormatError(str(ckpt_path), f"{len(missing)} weights missing for this config, e.g. {missing[:3]}")


def _local_dir(value: Any) -> Path | None:
    return Path(str(value)) if value and Path(str(value)).is_dir() else None


def load_ldm_model(
    ckpt_path: str | Path,
    yaml_path: str | Path,
    clip_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A LatentDiffusion in eval mode with the checkpoint's weights, on `device`.

    `dtype` applies to the UNet, VAE and text encoder; the schedule buffers stay float32. The CLIP
    tokenizer folder is, in order: `clip_dir`, the yaml's `version` if it is a local folder, or one
    generated from open_clip's vocabulary (the text-model shape is then read off the weights).
    """
    state = read_state_dict(ckpt_path)
    try:
        config = OmegaConf.load(yaml_path)
        params = config.model.params
        cond = params.cond_stage_config
        target = str(cond.target)
    except Exception as e:
        raise FormatError(str(yaml_path), f"not an ldm model config: {e}") from e
    params.use_ema = False  # EMA copies in the file are ignored, as A1111 does for inference
    params.pop("ckpt_path", None)
    if "unet_config" in params:
        # ldm's own checkpointing cannot differentiate through frozen weights; A1111 turns it off too.
        params.unet_config.params.use_checkpoint = False
        params.unet_config.params.use_fp16 = dtype == torch.float16
    if "params" not in cond or cond.params is None:
        cond.params = {}
    cond.params.device = str(device)
    with tempfile.TemporaryDirectory(prefix="sdtrain-clip-") as tmp, skip_weight_init():
        if target.endswith(".FrozenCLIPEmbedder"):
            version = _local_dir(clip_dir) or _local_dir(cond.params.get("version"))
            if version is None:
                version = write_clip_tokenizer(tmp)
                (version / "config.json").write_text(json.dumps(clip_config_from_state(state)))
            cond.params.version = str(version)
            with clip_text_model_from_config(state):
                model = instantiate(config)
        elif target.endswith(".FrozenOpenCLIPEmbedder"):
            cond.params.version = None  # open_clip would otherwise download the pretrained weights
            model = instantiate(config)
        else:
            raise FormatError(str(yaml_path), f"unsupported text encoder {target} (SD1/SD2 only)")
    # The schedule buffers (betas, alphas_cumprod, ...: the only top-level keys) are recomputed from the
    # yaml, in float32, rather than taken from the file, where fp16-pruned checkpoints store them rounded.
    state = {k: v for k, v in state.items() if "." in k}
    _load_weights(model, state, ckpt_path, yaml_path, _REQUIRED)
    del state
    model = model.to(device).eval()
    if dtype != torch.float32:
        for part in (model.model, model.first_stage_model, model.cond_stage_model):
            part.to(dtype)
    return model


#: the webui's sign of an SDXL base checkpoint (modules/sd_models_config.py): CLIP-G's final norm
SDXL_MARKER = "conditioner.embedders.1.model.ln_final.weight"
_SDXL_REQUIRED = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")
_SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."


def is_sdxl_checkpoint(state_or_path: dict[str, torch.Tensor] | str | Path) -> bool:
    if isinstance(state_or_path, dict):
        return SDXL_MARKER in state_or_path
    if Path(state_or_path).suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(state_or_path), framework="pt") as f:
                return SDXL_MARKER in set(f.keys())
        except Exception:  # not a safetensors file: the full reader names the problem
            pass
    return SDXL_MARKER in read_state_dict(state_or_path)


def load_sgm_model(
    ckpt_path: str | Path,
    yaml_path: str | Path,
    clip_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """An sgm DiffusionEngine (SDXL base) in eval mode with the checkpoint's weights, on `device`; `sgm`
    must be importable (`sgm_source.ensure_sgm`). As the webui loads it: sgm's own gradient
    checkpointing off (it cannot differentiate through frozen weights), xformers attention only where
    xformers is installed; offline: CLIP-L from `clip_dir` / the yaml's local `version` / a generated
    tokenizer with the shape read off the weights, CLIP-G with `version: null` (no pretrained download)."""
    from lib_sdtrain.hosts.standalone.tiny_sdxl import instantiate_sgm

    state = read_state_dict(ckpt_path)
    try:
        config = OmegaConf.load(yaml_path)
        params = config.model.params
        embedders = params.conditioner_config.params.emb_models
        unet = params.network_config.params
    except Exception as e:
        raise FormatError(str(yaml_path), f"not an sgm (SDXL) model config: {e}") from e
    unet.use_checkpoint = False
    try:
        import xformers  # noqa: F401

        has_xformers = True
    except ImportError:
        has_xformers = False
    if not has_xformers:
        ddconfig = params.first_stage_config.params.ddconfig
        if str(ddconfig.get("attn_type", "")) == "vanilla-xformers":
            ddconfig.attn_type = "vanilla"
    for emb in embedders:
        target = str(emb.target)
        if "params" not in emb or emb.params is None:
            emb.params = {}
        if target.endswith(".FrozenOpenCLIPEmbedder2"):
            emb.params.version = None
        if target.endswith(".FrozenCLIPEmbedder") or target.endswith(".FrozenOpenCLIPEmbedder2"):
            emb.params.device = str(device)
    with tempfile.TemporaryDirectory(prefix="sdtrain-clip-") as tmp, skip_weight_init():
        for emb in embedders:
            if str(emb.target).endswith(".FrozenCLIPEmbedder"):
                version = _local_dir(clip_dir) or _local_dir(emb.params.get("version"))
                if version is None:
                    version = write_clip_tokenizer(tmp)
                    cfg = clip_config_from_state(state, _SDXL_CLIP_L_PREFIX)
                    (version / "config.json").write_text(json.dumps(cfg))
                emb.params.version = str(version)
        with clip_text_model_from_config(state, _SDXL_CLIP_L_PREFIX, "sgm.modules.encoders.modules"):
            model = instantiate_sgm(config)
    _load_weights(model, state, ckpt_path, yaml_path, _SDXL_REQUIRED)
    del state
    model = model.to(device).eval()
    for emb in model.conditioner.embedders:
        if hasattr(emb, "device"):
            emb.device = str(device)
    if dtype != torch.float32:
        for part in (model.model, model.first_stage_model, model.conditioner):
            part.to(dtype)
    return model
