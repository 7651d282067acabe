"""The tiny random SD1 of the A1111 tests, loaded by reForge as its own SD1.5 model, with no change to
any reForge file: the checkpoint as the A1111 tests write it, plus a test-only extension (the shim).

Why reForge needs help, and where it can take it (Panchovix/stable-diffusion-webui-reForge 3b56b268):

* reForge builds the model from the state dict, not from a yaml: `modules_forge/forge_loader.py:433`
  (`load_model_for_a1111`) calls its own `load_state_dict_guess_config` (forge_loader.py:234-311), which
  reads the UNet shapes from the weights (`ldm_patched/modules/model_detection.py:37`,
  `detect_unet_config`) and takes the first class of `ldm_patched/modules/supported_models.py:1242`
  `models` whose `unet_config` items all equal the detected ones (model_detection.py:608-614;
  `BASE.matches`, supported_models_base.py:41-49). `SD15` (supported_models.py:30-37) asks for
  `model_channels` 320: the tiny UNet (32) matches nothing, "no match {...}" is logged and the load
  ends in "Could not detect model type" (forge_loader.py:231). `models` is a plain module-level list
  read at each call, so a subclass of `SD15` with the tiny `unet_config`, put first by an extension
  script (the webui imports those at start-up, before the model loads), is chosen instead, and inherits
  SD15's `process_clip_state_dict` (`cond_stage_model.` -> `clip_l.`), EPS and `latent_format` SD15
  (0.18215, the tiny yaml's `scale_factor`). Its `unet_extra_config` builds 2 heads of `ch // 2` as ldm's
  tiny UNet has (`num_heads` 2, `legacy: False`; SD15's 8 heads would load, head count is no weight
  shape, but compute another function).
* The text encoder comes from the model class too: `clip_target()` (forge_loader.py:282) names the
  tokenizer and text-model classes, and `SD1ClipModel` builds CLIP-L from `sd1_clip_config.json`
  (12 layers, sd1_clip.py:95-96). The subclass returns `SDClipModel` subclasses built from the tiny
  CLIP's own `config.json` (2 x 768, 12 heads) and a tokenizer read from the same folder.
* The VAE is the one thing no model class can shape: forge_loader.py:279 calls `VAE(sd=vae_sd)` with no
  config, and `VAE.__init__` builds SD's first stage at fixed sizes (ch 128, ch_mult [1, 2, 4, 4], two
  res blocks; `ldm_patched/modules/sd.py:395-406`), so the tiny VAE (ch 32, [1, 1, 1, 1], one res block)
  ends in a size-mismatch RuntimeError in `load_state_dict`. `VAE` takes a `config`
  (`AutoencoderKL(**config["params"])`, sd.py:540-541) that nobody passes. So the shim rebinds the name
  `forge_loader.VAE` (a module attribute, looked up at call time) to a subclass that adds the tiny
  config when, and only when, the state dict is one the tiny model class's `process_vae_state_dict`
  marked; every other VAE is built exactly as before. (The alternative, a VAE prefix that yields no
  weights and a VAE swapped in after the load, would log "No VAE weights detected" and leave
  `first_stage_model` None while sd_vae.load_vae runs.)

reForge reports mismatches through `logging`: "unet missing:" / "unet unexpected:" (warning,
ldm_patched/modules/model_base.py:293-297), "clip missing:" (warning, forge_loader.py:292) and "Missing
VAE keys" (warning, sd.py:546); "clip unexpected", "Leftover VAE keys" and "left over keys:" are *debug*
(forge_loader.py:297, :303; sd.py:549) and do not reach the log at the default level. With the shim the
only such line is reForge's own, printed for every SD1 file (the full-size random SD1.5 too):
"WARNING:root:clip missing: ['clip_l.text_projection', 'clip_l.logit_scale']" (SDClipModel's identity
projection and logit scale, which no SD1 file holds and SD1 never uses: `return_projected_pooled` is
False). At debug level the rest is "clip unexpected [...embeddings.position_ids]" and the DDPM schedule
buffers as "left over keys", as for a real SD1.5. A test should assert the log has no "unet missing",
"unet unexpected", "Missing VAE keys" and no "clip missing" other than that one line; the shim prints
"[sdtrain-test] registered SdtrainTinySD1 with reForge's model detector" once.

No yaml goes next to the checkpoint. reForge reads one (`find_checkpoint_config`, modules/
sd_models_config.py:117-128, via forge_loader.py:395) only for the A1111-side LatentDiffusion shell, whose UNet
and first stage become `FakeObject`s and whose `FrozenCLIPEmbedder` is built under `no_clip()` (its
`from_pretrained` faked) and then given reForge's tokenizer and transformer (forge_loader.py:396-404,
489-495): the shell holds no weights, so its shapes do not matter. Without a yaml it is
configs/v1-inference.yaml (linear 0.00085..0.012 over 1000 steps, eps, `scale_factor` 0.18215), the tiny
model's values. The A1111 tests' tiny yaml (`write_tiny_yaml`) builds the same shell and changes nothing
reForge computes; the only thing a yaml changes is `parameterization` ("v" swaps the sampling,
forge_loader.py:510-511).

Two things a test must do itself (as for the full-size SD1.5, webui_hosts.REFORGE.settings): turn live
previews off and turn "Use cross attention optimizations while training" on.
"""

from __future__ import annotations

from pathlib import Path

#: the tiny SD1 UNet as `detect_unet_config` reads it back (channel_mult [1, 2], one res block per
#: level, a conv-projected transformer at both levels): the keys `SdtrainTinySD1.matches` compares. No
#: `in_channels`, as SD15 has none: a tiny inpainting SD1 (9 input channels) would match too (not tried).
TINY_SD1_UNET_MATCH = {
    "model_channels": 32,
    "use_linear_in_transformer": False,
    "transformer_depth": [1, 1],
    "context_dim": 768,
    "adm_in_channels": None,
    "use_temporal_attention": False,
}
#: the tiny first stage (lib_sdtrain.hosts.standalone.tiny.tiny_config), as ldm_patched's AutoencoderKL
#: takes it
TINY_VAE_PARAMS = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    },
}  # fmt: skip
SHIM_SCRIPT = "scripts/register_tiny_sd1_reforge.py"
CLASS_NAME = "SdtrainTinySD1"

_SHIM_TEMPLATE = '''"""Test-only (sdtrain tests/webui/reforge_tiny.py): make reForge's model detector take the tiny SD1
as an SD1.5, its CLIP built from the tiny CLIP's config and tokenizer and its VAE at the tiny sizes.
The webui imports this at start-up, before it loads any model; importing it again changes nothing."""
import os

from ldm_patched.modules import sd1_clip, supported_models, supported_models_base
from modules_forge import forge_loader

_CLIP_DIR = {clip_dir!r}
_VAE_PARAMS = {vae!r}


class SdtrainTinyClipL(sd1_clip.SDClipModel):
    """SD1CheckpointClipModel, from the tiny CLIP's config.json instead of sd1_clip_config.json"""

    def __init__(self, device="cpu", dtype=None, model_options={{}}):
        super().__init__(device=device, dtype=dtype, model_options=model_options, return_projected_pooled=False,
                         textmodel_json_config=os.path.join(_CLIP_DIR, "config.json"))


class SdtrainTinyClip(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={{}}):
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=SdtrainTinyClipL)


class SdtrainTinyTokenizerL(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={{}}):
        super().__init__(tokenizer_path=_CLIP_DIR, embedding_directory=embedding_directory,
                         tokenizer_data=tokenizer_data)


class SdtrainTinyTokenizer(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={{}}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         tokenizer=SdtrainTinyTokenizerL)


class _VAEStateDict(dict):
    """the tiny model's VAE weights, carrying the config its VAE is built from"""


class {cls}(supported_models.SD15):
    unet_config = {match!r}
    unet_extra_config = {{"num_heads": 2, "num_head_channels": -1}}

    def process_vae_state_dict(self, state_dict):
        out = _VAEStateDict(super().process_vae_state_dict(state_dict))
        out.sdtrain_vae_config = {{"params": _VAE_PARAMS}}
        return out

    def clip_target(self, state_dict={{}}):
        return supported_models_base.ClipTarget(SdtrainTinyTokenizer, SdtrainTinyClip)


if not getattr(forge_loader.VAE, "sdtrain_tiny_vae", False):
    class SdtrainTinyAwareVAE(forge_loader.VAE):
        """reForge's VAE; given the weights {cls} marked, built with their config instead of SD's sizes"""

        sdtrain_tiny_vae = True

        def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None, no_init=False):
            if config is None:
                config = getattr(sd, "sdtrain_vae_config", None)
            super().__init__(sd=sd, device=device, config=config, dtype=dtype, metadata=metadata, no_init=no_init)

    forge_loader.VAE = SdtrainTinyAwareVAE

if not any(getattr(m, "__name__", None) == {cls!r} for m in supported_models.models):
    supported_models.models.insert(0, {cls})
    print("[sdtrain-test] registered {cls} with reForge's model detector")
'''

def write_tiny_sd1_for_reforge(root: Path, clip_dir: Path, seed: int = 0) -> dict:
    """Write `root/tiny-sd1-reforge.safetensors` (ldm key layout, fp32: the tiny SD1 of `webui_assets`,
    768-wide 2-layer 12-head CLIP, 32-channel UNet, 32-channel VAE) and return {"ckpt": Path,
    "shim": {relative_path: text}}, the shim to be installed as extensions/<name>/<relative_path> of the
    reForge server. No yaml is written (see the module docstring).

    `clip_dir` holds the CLIP tokenizer files and text `config.json` the tiny CLIP is built from (the
    offline hub snapshot `webui_assets` writes); the shim names it by its absolute path, so it must stay
    where it is while the server runs. A ValueError if its config is not the one `build_tiny_sd1` builds.
    Needs ldm importable (as `build_tiny_sd1` does); leaves the global RNG untouched."""

    root = Path(root).resolve()
    clip_dir = Path(clip_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    from forge_tiny_sdxl import save_checked_tiny_sd1

    ckpt = save_checked_tiny_sd1(root / "tiny-sd1-reforge.safetensors", clip_dir, seed)
    script = _SHIM_TEMPLATE.format(clip_dir=str(clip_dir), vae=TINY_VAE_PARAMS, cls=CLASS_NAME,
                                   match=TINY_SD1_UNET_MATCH)  # fmt: skip
    return {"ckpt": ckpt, "shim": {SHIM_SCRIPT: script}}


# --- SD2 (v-prediction, OpenCLIP text tower) ---------------------------------------------------------
#
# The tiny SD2 of the A1111 tests (conftest `sd2_assets`: ldm's FrozenOpenCLIPEmbedder, layer "penultimate",
# over a toy open_clip architecture 64 wide, 2 layers, 2 heads; v-prediction), with its yaml beside it as on
# A1111. reForge builds the A1111 shell from that yaml (forge_loader.py:395: its FrozenOpenCLIPEmbedder under
# `no_clip()`, `parameterization: "v"` swapping the sampling, :510-511) and the real model from the detector's
# class. `SD20` (supported_models.py:76-118) asks for `model_channels` 320 and context 1024, and its CLIP is
# `SD2ClipModel` from `text_encoders/sd2_clip_config.json` (1024 x 24): a subclass with the tiny shapes,
# `model_type` V_PREDICTION (SD20 guesses from a norm bias the tiny UNet lacks), its VAE marked with the tiny
# config as for SD1, and a CLIP-H built from the toy tower's transformers config (GELU, mlp_ratio 4, LayerNorm
# eps 1e-5, square text_projection, open_clip's pad id 0). SD20's `process_clip_state_dict` converts the
# open_clip keys (`cond_stage_model.model.` -> `clip_h.`, utils.clip_text_transformers_convert, by key). The
# penultimate layer is chosen by the A1111 side (forge_clip.py CLIP_SD_21_H: `hidden_states[-2]`, then
# `final_layer_norm`), the same function as ldm's `encode_with_transformer` on 2 layers.
SD2_SHIM_SCRIPT = "scripts/register_tiny_sd2_reforge.py"
SD2_CLASS_NAME = "SdtrainTinySD2"

_SD2_SHIM_TEMPLATE = '''"""Test-only (sdtrain tests/webui/reforge_tiny.py): make reForge's model detector take the tiny SD2
(v-prediction) as an SD2, its CLIP-H built from the toy OpenCLIP tower's config, its VAE at the tiny sizes.
The webui imports this at start-up, before it loads any model; importing it again changes nothing."""
import torch
from ldm_patched.modules import model_base, sd1_clip, supported_models, supported_models_base
from modules_forge import forge_loader

_TOKENIZER_DIR = {tokenizer_dir!r}
_TEXT_CONFIG = {text_config!r}
_VAE_PARAMS = {vae!r}


class SdtrainTinyClipH(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={{}}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options, textmodel_json_config=_TEXT_CONFIG,
                         special_tokens={{"start": 49406, "end": 49407, "pad": 0}}, return_projected_pooled=True)


class SdtrainTinySD2Clip(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={{}}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_name="h",
                         clip_model=SdtrainTinyClipH)


class SdtrainTinyTokenizerH(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={{}}):
        super().__init__(tokenizer_path=_TOKENIZER_DIR, pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size={width}, embedding_key="clip_h", tokenizer_data=tokenizer_data)


class SdtrainTinySD2Tokenizer(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={{}}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, clip_name="h",
                         tokenizer=SdtrainTinyTokenizerH)


class _VAEStateDict(dict):
    """the tiny model's VAE weights, carrying the config its VAE is built from"""


class {cls}(supported_models.SD20):
    unet_config = {match!r}
    unet_extra_config = {{"num_heads": 2, "num_head_channels": -1, "attn_precision": torch.float32}}

    def model_type(self, state_dict, prefix=""):
        return model_base.ModelType.V_PREDICTION

    def process_vae_state_dict(self, state_dict):
        out = _VAEStateDict(super().process_vae_state_dict(state_dict))
        out.sdtrain_vae_config = {{"params": _VAE_PARAMS}}
        return out

    def clip_target(self, state_dict={{}}):
        return supported_models_base.ClipTarget(SdtrainTinySD2Tokenizer, SdtrainTinySD2Clip)


if not getattr(forge_loader.VAE, "sdtrain_tiny_vae", False):
    class SdtrainTinyAwareVAE(forge_loader.VAE):
        """reForge's VAE; given the weights a tiny class marked, built with their config instead of SD's sizes"""

        sdtrain_tiny_vae = True

        def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None, no_init=False):
            if config is None:
                config = getattr(sd, "sdtrain_vae_config", None)
            super().__init__(sd=sd, device=device, config=config, dtype=dtype, metadata=metadata, no_init=no_init)

    forge_loader.VAE = SdtrainTinyAwareVAE

if not any(getattr(m, "__name__", None) == {cls!r} for m in supported_models.models):
    supported_models.models.insert(0, {cls})
    print("[sdtrain-test] registered {cls} with reForge's model detector")
'''


def tiny_sd2_shim_for_reforge(root: Path, *, width: int, layers: int, heads: int) -> dict:
    """The test-only extension that registers the tiny SD2 (`sd2_assets`'s checkpoint and yaml, unchanged)
    with reForge's detector: {relative path: text}. Its tokenizer files go to `root/tiny-sd2-tokenizer`
    (named by absolute path in the shim: they must stay while the server runs)."""
    from forge_tiny_sdxl import TINY_SD2_UNET_MATCH

    from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

    tokenizer_dir = Path(root).resolve() / "tiny-sd2-tokenizer"
    write_clip_tokenizer(tokenizer_dir)
    text_config = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "hidden_size": width, "intermediate_size": 4 * width, "projection_dim": width,
        "num_hidden_layers": layers, "num_attention_heads": heads, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "max_position_embeddings": MAX_LENGTH, "vocab_size": VOCAB_SIZE,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
    }  # fmt: skip
    script = _SD2_SHIM_TEMPLATE.format(tokenizer_dir=str(tokenizer_dir), text_config=text_config, vae=TINY_VAE_PARAMS,
                                       cls=SD2_CLASS_NAME, match=TINY_SD2_UNET_MATCH, width=width)  # fmt: skip
    return {SD2_SHIM_SCRIPT: script}
