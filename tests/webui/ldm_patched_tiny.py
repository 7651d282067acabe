"""The tiny random models of the A1111 tests (SD1, SD2, SDXL), loaded by the two ldm_patched webuis, reForge
(Panchovix/stable-diffusion-webui-reForge 3b56b268) and Forge Classic (Haoming02/sd-webui-forge-classic
1f95d717), each as its own SD1.5 / SD2 / SDXL model, with no change to any webui file: the checkpoint as the
A1111 tests write it, plus a test-only extension (the shim). One shim serves both webuis (they come from the
old Forge; what differs is only which options their constructors take, see `_PRELUDE`).

Why they need help, and where they can take it (reForge's file:line; Forge Classic's are alike):

* They build the model from the state dict, not from a yaml: `modules_forge/forge_loader.py:433`
  (`load_model_for_a1111`) calls `load_state_dict_guess_config` (forge_loader.py:234-311; Classic
  `load_checkpoint_guess_config`, :72-144), which reads the UNet shapes from the weights
  (`ldm_patched/modules/model_detection.py:37`, `detect_unet_config`) and takes the first class of
  `ldm_patched/modules/supported_models.py:1242` `models` whose `unet_config` items all equal the detected
  ones (model_detection.py:608-614; `BASE.matches`, supported_models_base.py:41-49). `SD15`
  (supported_models.py:30-37), `SD20` (:76-118) and `SDXL` (:189-265) ask for `model_channels` 320: the tiny
  UNets (32) match nothing, "no match {...}" is logged and the load ends in "Could not detect model type"
  (forge_loader.py:231; Classic: "'NoneType' object has no attribute 'set_manual_cast'", :95). `models` is a
  plain module-level list read at each call, so a subclass with the tiny `unet_config`, put first by an
  extension script (the webui imports those at start-up, before the model loads), is chosen instead, and
  inherits its family's `process_clip_state_dict` (the ldm/open_clip/sgm key renames), `latent_format` and
  `get_model`. Its `unet_extra_config` keeps the family's entries (reForge's SD20 sets `attn_precision`) and
  sets the tiny head layout: 2 heads of `ch // 2` for SD1/SD2 (`num_heads` 2, `legacy: False`), 32-channel
  heads for SDXL (SDXL's 64 would load, head count is no weight shape, but compute another function).
* The text encoders come from the model class too: `clip_target()` (forge_loader.py:282) names the tokenizer
  and text-model classes, and the stock ones build CLIP-L, OpenCLIP-H and CLIP-G at their real sizes from
  bundled json (`sd1_clip_config.json` 12 x 768, `sd2_clip_config.json` 24 x 1024, `clip_config_bigg.json`
  32 x 1280). The subclass returns text models built from the tiny encoders' configs, tokenizers read from
  the tiny CLIP's folder, with each family's layer choice (SD2 and SDXL: the penultimate hidden layer, no
  final norm for SDXL; CLIP-G and OpenCLIP pad with id 0) and its own embedding width and key.
* The VAE is the one thing no model class can shape: forge_loader.py:279 calls `VAE(sd=vae_sd)` with no
  config, and `VAE.__init__` builds SD's first stage at fixed sizes (ch 128, ch_mult [1, 2, 4, 4], two res
  blocks; `ldm_patched/modules/sd.py:395-406`), so the tiny VAE (ch 32, [1, 1, 1, 1], one res block; the
  same for the three families) ends in a size-mismatch RuntimeError in `load_state_dict`. `VAE` takes a
  `config` (`AutoencoderKL(**config["params"])`, sd.py:540-541) that nobody passes. So the shim rebinds the
  name `forge_loader.VAE` (a module attribute, looked up at call time) to a subclass that adds the tiny
  config when, and only when, the state dict is one a tiny model class's `process_vae_state_dict` marked;
  every other VAE is built exactly as before. (The alternative, a VAE prefix that yields no weights and a
  VAE swapped in after the load, would log "No VAE weights detected" and leave `first_stage_model` None
  while sd_vae.load_vae runs.)
* SD2: `SD20.model_type` guesses v-prediction from a norm bias the tiny UNet lacks (a KeyError in Classic):
  the subclass says V_PREDICTION, as the tiny SD2's yaml does.

reForge reports mismatches through `logging`: "unet missing:" / "unet unexpected:" (warning,
ldm_patched/modules/model_base.py:293-297), "clip missing:" (warning, forge_loader.py:292) and "Missing VAE
keys" (warning, sd.py:546); "clip unexpected", "Leftover VAE keys" and "left over keys:" are *debug*. With
the shim the only such line is reForge's own, printed for every SD1 file (the full-size random SD1.5 too):
"WARNING:root:clip missing: ['clip_l.text_projection', 'clip_l.logit_scale']" (SDClipModel's identity
projection and logit scale, which no SD1 file holds and SD1 never uses), and for SD2 "clip missing:
['clip_h.text_projection']". The shim prints "[sdtrain-test] registered <class> with the model detector".

The A1111-side shell comes from the yaml beside the checkpoint if any (`find_checkpoint_config`,
modules/sd_models_config.py:117-128, via forge_loader.py:395): its UNet and first stage become `FakeObject`s,
its text encoders are built under `no_clip()` and then given the webui's tokenizers and transformers
(forge_loader.py:396-404, 456-495). The shell holds no weights, so its shapes do not matter; what a yaml
changes is `parameterization` ("v" swaps the sampling, :510-511). SD1 goes without a yaml
(configs/v1-inference.yaml: the tiny model's schedule and `scale_factor`); SD2 and SDXL keep the A1111
tests' yaml, whose toy open_clip architectures the A1111 tests' open_clip shim registers.

Two things a test must do itself (as for the full-size SD1.5, webui_hosts.REFORGE.settings): turn live
previews off and, in reForge, turn "Use cross attention optimizations while training" on.
"""

from __future__ import annotations

import json
from pathlib import Path

# the tiny UNets as `detect_unet_config` reads them back are the same in ldm_patched and huggingface_guess
from forge_tiny_sdxl import TINY_SD1_UNET_MATCH, TINY_SD2_UNET_MATCH, TINY_UNET_MATCH

#: the tiny first stage (lib_sdtrain.hosts.standalone.tiny.tiny_config; tiny_sdxl's is the same), as
#: ldm_patched's AutoencoderKL takes it
TINY_VAE_PARAMS = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    },
}  # fmt: skip

#: what every shim starts with: the helpers and the VAE rebinding (idempotent: each family's shim has it)
_PRELUDE = '''import inspect
import json

import torch
from ldm_patched.modules import model_base, sd1_clip, sdxl_clip, supported_models, supported_models_base
from modules_forge import forge_loader

_VAE_PARAMS = json.loads(%(vae)r)


def _accepted(cls, options):
    """the `options` that `cls.__init__` takes: reForge's ldm_patched has some (return_projected_pooled,
    model_options, tokenizer_data, metadata) that Forge Classic's older copy lacks"""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def _text_model(config_path, **options):
    """an SDClipModel subclass built from the text config at `config_path` with `options`"""
    fixed = _accepted(sd1_clip.SDClipModel, {"textmodel_json_config": config_path, **options})

    class TinyTextModel(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, **kwargs):
            super().__init__(device=device, dtype=dtype, **{**kwargs, **fixed})

    return TinyTextModel


def _tokenizer(path, **options):
    """an SDTokenizer subclass reading the tokenizer files in `path`"""
    fixed = _accepted(sd1_clip.SDTokenizer, {"tokenizer_path": path, **options})

    class TinyTokenizer(sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, **kwargs):
            super().__init__(embedding_directory=embedding_directory, **{**kwargs, **fixed})

    return TinyTokenizer


def _one_encoder(name, model, tokenizer):
    """the ClipTarget of a one-encoder family: `model` and `tokenizer` under the key clip_<name>"""
    class TinyClip(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, **kwargs):
            super().__init__(device=device, dtype=dtype, clip_name=name, clip_model=model, **kwargs)

    class TinyTokenizers(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, **kwargs):
            super().__init__(embedding_directory=embedding_directory, clip_name=name, tokenizer=tokenizer, **kwargs)

    return supported_models_base.ClipTarget(TinyTokenizers, TinyClip)


class _VAEStateDict(dict):
    """the tiny model's VAE weights, carrying the config its VAE is built from"""


class _TinyVAE:
    """mixed into a tiny model class: marks its VAE weights with the tiny VAE config"""

    def process_vae_state_dict(self, state_dict):
        out = _VAEStateDict(super().process_vae_state_dict(state_dict))
        out.sdtrain_vae_config = {"params": _VAE_PARAMS}
        return out


if not getattr(forge_loader.VAE, "sdtrain_tiny_vae", False):
    class SdtrainTinyAwareVAE(forge_loader.VAE):
        """the webui's VAE; given the weights a tiny model class marked, built with their config instead of
        SD's sizes"""

        sdtrain_tiny_vae = True

        def __init__(self, sd=None, device=None, config=None, *args, **kwargs):
            if config is None:
                config = getattr(sd, "sdtrain_vae_config", None)
            super().__init__(sd, device, config, *args, **kwargs)

    forge_loader.VAE = SdtrainTinyAwareVAE


def _register(cls):
    if not any(getattr(m, "__name__", None) == cls.__name__ for m in supported_models.models):
        supported_models.models.insert(0, cls)
        print(f"[sdtrain-test] registered {cls.__name__} with the model detector")
'''

_SD1_BODY = '''
_CLIP_DIR = %(clip_dir)r
_L = _text_model(_CLIP_DIR + "/config.json", return_projected_pooled=False)


class SdtrainTinySD1(_TinyVAE, supported_models.SD15):
    unet_config = %(match)r
    unet_extra_config = {**supported_models.SD15.unet_extra_config, "num_heads": 2, "num_head_channels": -1}

    def clip_target(self, *args, **kwargs):
        return _one_encoder("l", _L, _tokenizer(_CLIP_DIR))


_register(SdtrainTinySD1)
'''

_SD2_BODY = '''
_H = _text_model(%(text_config)r, layer="hidden", layer_idx=0, return_projected_pooled=True,
                 special_tokens={"start": 49406, "end": 49407, "pad": 0})
_H_TOKENIZER = _tokenizer(%(tokenizer_dir)r, pad_with_end=False, embedding_size=%(width)d, embedding_key="clip_h")


class SdtrainTinySD2(_TinyVAE, supported_models.SD20):
    unet_config = %(match)r
    unet_extra_config = {**supported_models.SD20.unet_extra_config, "num_heads": 2, "num_head_channels": -1}

    def model_type(self, state_dict, prefix=""):
        return model_base.ModelType.V_PREDICTION

    def clip_target(self, *args, **kwargs):
        return _one_encoder("h", _H, _H_TOKENIZER)


_register(SdtrainTinySD2)
'''

_SDXL_BODY = '''
_CLIP_DIR = %(clip_dir)r
# the penultimate layer, as SDXL's encoders give it: -2 in 32 layers, 0 in these two (SDClipModel asserts
# abs(layer_idx) < layers, so -2 would be refused)
_L = _text_model(_CLIP_DIR + "/config.json", layer="hidden", layer_idx=0, layer_norm_hidden_state=False)
_G = _text_model(%(g_config)r, layer="hidden", layer_idx=0, layer_norm_hidden_state=False,
                 return_projected_pooled=True, special_tokens={"start": 49406, "end": 49407, "pad": 0})
_L_TOKENIZER = _tokenizer(_CLIP_DIR)
_G_TOKENIZER = _tokenizer(_CLIP_DIR, pad_with_end=False, embedding_size=1280, embedding_key="clip_g")


class SdtrainTinySDXLClip(sdxl_clip.SDXLClipModel):
    """the webui's two-encoder SDXL text model, its encoders built at the tiny sizes"""

    def __init__(self, device="cpu", dtype=None, **kwargs):
        torch.nn.Module.__init__(self)
        self.clip_l = _L(device=device, dtype=dtype, **kwargs)
        self.clip_g = _G(device=device, dtype=dtype, **kwargs)
        self.dtypes = {dtype} - {None}


class SdtrainTinySDXLTokenizer(sdxl_clip.SDXLTokenizer):
    def __init__(self, embedding_directory=None, **kwargs):
        self.clip_l = _L_TOKENIZER(embedding_directory=embedding_directory, **kwargs)
        self.clip_g = _G_TOKENIZER(embedding_directory=embedding_directory, **kwargs)


class SdtrainTinySDXL(_TinyVAE, supported_models.SDXL):
    unet_config = %(match)r
    unet_extra_config = {**supported_models.SDXL.unet_extra_config, "num_heads": -1, "num_head_channels": 32}

    def clip_target(self, *args, **kwargs):
        return supported_models_base.ClipTarget(SdtrainTinySDXLTokenizer, SdtrainTinySDXLClip)


_register(SdtrainTinySDXL)
'''


def _shim(family: str, body: str, **values) -> str:
    header = (f'"""Test-only (sdtrain tests/webui/ldm_patched_tiny.py): make the webui\'s model detector take the '
              f'tiny {family} at its own sizes.\nThe webui imports this at start-up, before it loads any model; '
              'importing it again changes nothing."""\n')
    return header + _PRELUDE % {"vae": json.dumps(TINY_VAE_PARAMS)} + body % values


def write_tiny_sd1(root: Path, clip_dir: Path, seed: int = 0) -> dict:
    """Write `root/tiny-sd1-registered.safetensors` (ldm key layout, fp32: the tiny SD1 of `webui_assets`,
    768-wide 2-layer 12-head CLIP, 32-channel UNet, 32-channel VAE) and return {"ckpt": Path,
    "shim": {relative_path: text}}, the shim to be installed as extensions/<name>/<relative_path> of the
    server. No yaml is written (see the module docstring).

    `clip_dir` holds the CLIP tokenizer files and text `config.json` the tiny CLIP is built from (the
    offline hub snapshot `webui_assets` writes); the shim names it by its absolute path, so it must stay
    where it is while the server runs. A ValueError if its config is not the one `build_tiny_sd1` builds.
    Needs ldm importable (as `build_tiny_sd1` does); leaves the global RNG untouched."""
    root = Path(root).resolve()
    clip_dir = Path(clip_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    from forge_tiny_sdxl import save_checked_tiny_sd1

    ckpt = save_checked_tiny_sd1(root / "tiny-sd1-registered.safetensors", clip_dir, seed)
    script = _shim("SD1", _SD1_BODY, clip_dir=str(clip_dir), match=TINY_SD1_UNET_MATCH)
    return {"ckpt": ckpt, "shim": {"scripts/register_tiny_sd1.py": script}}


def _write_text_config(path: Path, *, width: int, layers: int, heads: int) -> str:
    """An open_clip text tower as transformers' CLIPTextConfig names it (open_clip's GELU, mlp_ratio 4,
    LayerNorm eps 1e-5, a square text projection, pad id 0); returns the path as text."""
    from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE

    path.write_text(json.dumps({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "hidden_size": width, "intermediate_size": 4 * width, "projection_dim": width,
        "num_hidden_layers": layers, "num_attention_heads": heads, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "max_position_embeddings": MAX_LENGTH, "vocab_size": VOCAB_SIZE,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
    }), encoding="utf-8")  # fmt: skip
    return str(path)


def tiny_sd2_shim(root: Path, *, width: int, layers: int, heads: int) -> dict:
    """The test-only extension that registers the tiny SD2 (`sd2_assets`'s checkpoint and yaml, unchanged:
    ldm's FrozenOpenCLIPEmbedder, penultimate layer, over a toy open_clip tower; v-prediction) with the
    detector: {relative path: text}. Its tokenizer files and text config go to `root/tiny-sd2-text`
    (named by absolute path in the shim: they must stay while the server runs)."""
    from lib_sdtrain.hosts.standalone.tokenizer import write_clip_tokenizer

    text_dir = Path(root).resolve() / "tiny-sd2-text"
    write_clip_tokenizer(text_dir)
    config = _write_text_config(text_dir / "config.json", width=width, layers=layers, heads=heads)
    script = _shim("SD2", _SD2_BODY, text_config=config, tokenizer_dir=str(text_dir), width=width,
                   match=TINY_SD2_UNET_MATCH)
    return {"scripts/register_tiny_sd2.py": script}


def tiny_sdxl_shim(root: Path, clip_dir: Path) -> dict:
    """The test-only extension that registers the tiny SDXL (`sdxl_assets`'s checkpoint and yaml, unchanged:
    sgm's DiffusionEngine with CLIP-L 768 x 2 from `clip_dir` — the offline hub snapshot its yaml names —
    and a toy CLIP-G 1280 x 2, 20 heads) with the detector: {relative path: text}. CLIP-G's text config goes
    to `root/tiny-sdxl-clip-g.json`, named by absolute path in the shim, as `clip_dir` is."""
    from lib_sdtrain.hosts.standalone.tiny_sdxl import CLIP_G_WIDTH

    root = Path(root).resolve()
    g_config = _write_text_config(root / "tiny-sdxl-clip-g.json", width=CLIP_G_WIDTH, layers=2, heads=20)
    script = _shim("SDXL", _SDXL_BODY, clip_dir=str(Path(clip_dir).resolve()), g_config=g_config,
                   match=TINY_UNET_MATCH)
    return {"scripts/register_tiny_sdxl.py": script}
