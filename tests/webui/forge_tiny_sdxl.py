"""A tiny random SDXL base that lllyasviel's Forge loads as its own `StableDiffusionXL` engine, with no
change to any Forge file: a checkpoint in the original sgm key layout plus a test-only extension.
The tiny SD1 of the A1111 tests gets the same treatment (`write_tiny_sd1_for_forge`, at the end).

Why Forge needs help, and where it can take it (Forge dfdcbab6; huggingface_guess as vendored in
repositories/huggingface_guess/huggingface_guess/, "hg/" below):

* Forge does not build a model from a yaml. `backend/loader.py:449-483` (`split_state_dict`) reads
  the UNet shapes from the state dict (`hg/detection.py:38-274`, `detect_unet_config`) and takes the
  first class of `hg/model_list.py:716` `models` whose `unet_config` items all equal the detected
  ones (`hg/detection.py:277-283`, `BASE.matches` at `hg/model_list.py:43-52`). `model_list.SDXL`
  (`hg/model_list.py:259-269`) asks for `model_channels` 320 and `transformer_depth`
  [0, 0, 2, 2, 10, 10]: only a full-size SDXL matches, and an unmatched UNet ends in
  "Failed to recognize model type!" (`backend/loader.py:500-502`).
* `models` is a plain module-level list that nothing copies, and the engine is chosen by
  `isinstance(guess, M.matched_guesses)` (`backend/loader.py:571-573`; `StableDiffusionXL.
  matched_guesses = [model_list.SDXL]`, `backend/diffusion_engine/sdxl.py:20`). So a *subclass* of
  `model_list.SDXL` with the tiny UNet's `unet_config`, put first in `models` by an extension script
  (Forge imports those at start-up; the model loads later, on the first generation), is detected as
  that subclass and built as `StableDiffusionXL`, with every SDXL method of the guess inherited:
  `clip_target` = {clip_l: text_encoder, clip_g: text_encoder_2} (`hg/model_list.py:323-324`),
  `process_clip_state_dict` (`hg/model_list.py:292-302`: `conditioner.embedders.0.transformer.
  text_model` -> `clip_l.transformer.text_model`, `conditioner.embedders.1.model.` -> `clip_g.` then
  open_clip -> transformers via `hg/utils.py:87-97`, which converts the resblocks that exist
  (`hg/utils.py:45-84`, up to 32) and transposes `text_projection`), `model_type` (EPS,
  `hg/model_list.py:275-290`) and `latent_format` SDXL.
* The component configs come from a diffusers-style folder: `os.path.join(backend/huggingface,
  guess.huggingface_repo)` (`backend/loader.py:515-518`), and `os.path.join` with an absolute second
  part returns it, so `huggingface_repo` may be an absolute path to a folder written here. Read from
  it: `model_index.json` (`DiffusionPipeline.load_config`, loader.py:518-528), `scheduler/`
  (loader.py:42-44), `tokenizer/`, `tokenizer_2/` (loader.py:45-49), `vae/config.json` for
  `IntegratedAutoencoderKL` (loader.py:50-61; ldm key layout, so the sgm `first_stage_model.*` keys
  load as they are), `text_encoder/` and `text_encoder_2/config.json` as `CLIPTextConfig` for
  `IntegratedCLIP(CLIPTextModel, add_text_projection=True)` (loader.py:62-80; the projection is a
  square Linear of `hidden_size`, `backend/nn/clip.py:10-12`, so CLIP-G's `embed_dim` must be 1280).
  The UNet is *not* built from `unet/config.json` but from the guess's `unet_config` plus its
  `unet_extra_config` (loader.py:112-128; `BASE.__init__`, hg/model_list.py:63-68), so no `unet/`
  folder is written and the subclass sets `num_head_channels` 32 as the tiny UNet has (SDXL's 64
  would give other attention heads than the sgm model the checkpoint came from).
* Every component loads with `strict=False` and only *prints* "<name> Missing: [...]" /
  "<name> Unexpected: [...]" (`backend/state_dict.py:4-18`): a test should assert the server log has
  no such line, or a wrong layout passes silently with random weights.

The checkpoint is a state dict of the real sgm `DiffusionEngine` built by
`lib_sdtrain.hosts.standalone.tiny_sdxl.build_tiny_sdxl` (sd_xl_base.yaml at toy sizes: CLIP-L 768
wide and CLIP-G 1280 wide, two layers each; UNet 32 channels with `context_dim` 2048 and
`adm_in_channels` 2816; VAE 32 channels, four levels), saved as a real SDXL file holds it
(`conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*`,
`model.diffusion_model.*`, `first_stage_model.*`), so Forge's own conversion runs on it. It needs
`sgm` importable (the `sgm_dir` fixture, or SDTRAIN_SGM_DIR): the Forge checkout has no
repositories/generative-models. No yaml goes next to the checkpoint: Forge reads one only for the
prediction type (loader.py:530-567), and eps is the default.

Two things a test must do itself: turn live previews off (`live_previews_enable`: Forge otherwise
downloads vaeapprox-sdxl.pt on the first generation, modules/processing.py:916-917), and ask the
server which engine it built (a probe route: Forge's log names no engine class; on success it prints
"StateDict Keys: {'unet': 328, 'vae': 176, 'text_encoder': 37, 'text_encoder_2': 38, 'ignore': 0}"
and "K-Model Created", without the shim "ERROR:root:no match {...}" and the txt2img error
"Failed to recognize model type!").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

#: the tiny UNet as `detect_unet_config` reads it back (channel_mult [1, 2, 2], one res block per
#: level, attention at the second and third level): the keys `TinySDXL.matches` compares
TINY_UNET_MATCH = {
    "model_channels": 32,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 1, 1],
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "use_temporal_attention": False,
}
SHIM_SCRIPT = "scripts/register_tiny_sdxl.py"
CLASS_NAME = "SdtrainTinySDXL"

_SHIM_TEMPLATE = '''"""Test-only (sdtrain tests/webui/forge_tiny_sdxl.py): make huggingface_guess take the tiny SDXL
as an SDXL, its component configs read from the folder in `huggingface_repo`. Forge imports this at
start-up, before it loads any model; the insertion is idempotent (scripts may be imported again)."""
from huggingface_guess import model_list


class {cls}(model_list.SDXL):
    huggingface_repo = {repo!r}
    unet_config = {match!r}
    unet_extra_config = {{"num_heads": -1, "num_head_channels": 32}}


if not any(getattr(m, "__name__", None) == {cls!r} for m in model_list.models):
    model_list.models.insert(0, {cls})
    print("[sdtrain-test] registered {cls} with huggingface_guess")
'''


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _write_repo(repo: Path, clip_dir: Path) -> None:
    """The diffusers-style folder `backend/loader.py` reads the component configs from."""
    from lib_sdtrain.hosts.standalone.tiny_sdxl import CLIP_G_WIDTH
    from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

    _write_json(repo / "model_index.json", {
        "_class_name": "StableDiffusionXLPipeline",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })  # fmt: skip
    # sgm's DiscreteDenoiser over LegacyDDPMDiscretization: the same scaled-linear betas
    _write_json(repo / "scheduler" / "scheduler_config.json", {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "interpolation_type": "linear",
        "timestep_spacing": "leading", "steps_offset": 1, "trained_betas": None, "use_karras_sigmas": False,
    })  # fmt: skip
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(repo / name)
    # SDXL's second tokenizer pads with "!" (id 0), as open_clip's tokenizer pads with 0 (Forge's bundled
    # backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0/tokenizer_2/special_tokens_map.json);
    # with the end token instead, every position after the prompt gets other CLIP-G hidden states
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = repo / "tokenizer_2" / file
        _write_json(path, {**json.loads(path.read_text()), "pad_token": "!"})
    # CLIP-L: the very config the checkpoint's CLIPTextModel was built from (write_clip_dir)
    (repo / "text_encoder").mkdir(parents=True, exist_ok=True)
    shutil.copy2(clip_dir / "config.json", repo / "text_encoder" / "config.json")
    # CLIP-G: register_clip_g_arch's open_clip text tower as transformers names it (open_clip's
    # default GELU, mlp_ratio 4, LayerNorm eps 1e-5; embed_dim = width, so the projection is square)
    _write_json(repo / "text_encoder_2" / "config.json", {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
        "hidden_size": CLIP_G_WIDTH, "intermediate_size": 4 * CLIP_G_WIDTH, "projection_dim": CLIP_G_WIDTH,
        "num_hidden_layers": 2, "num_attention_heads": 20, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "max_position_embeddings": MAX_LENGTH, "vocab_size": VOCAB_SIZE,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    })  # fmt: skip
    # tiny_sdxl_config's first stage: ch 32, ch_mult [1, 1, 1, 1], one res block, 4 latent channels
    _write_json(repo / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 32,
        "act_fn": "silu", "sample_size": 64, "scaling_factor": 0.13025, "force_upcast": True,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    })  # fmt: skip


def write_tiny_sdxl_for_forge(root: Path, seed: int = 0) -> dict:
    """Write `root/tiny-sdxl-forge.safetensors` (sgm key layout, fp32) and its config folder
    `root/tiny-sdxl-forge-repo/`; return {"ckpt": Path, "repo": Path, "shim": {relative_path: text}},
    the shim to be installed as extensions/<name>/<relative_path> of the Forge server (it names the
    config folder by its absolute path). Needs `sgm` importable; leaves the global RNG untouched."""
    from lib_sdtrain.hosts.standalone.tiny import save_tiny_checkpoint
    from lib_sdtrain.hosts.standalone.tiny_sdxl import build_tiny_sdxl

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    build = root / "build-tiny-sdxl-forge"
    model = build_tiny_sdxl(build, seed=seed)
    ckpt = save_tiny_checkpoint(model, root / "tiny-sdxl-forge.safetensors")
    del model
    repo = root / "tiny-sdxl-forge-repo"
    _write_repo(repo, build / "clip")
    shutil.rmtree(build)
    script = _SHIM_TEMPLATE.format(repo=str(repo), cls=CLASS_NAME, match=TINY_UNET_MATCH)
    return {"ckpt": ckpt, "repo": repo, "shim": {SHIM_SCRIPT: script}}


# --- SD1.5 -------------------------------------------------------------------------------------------
#
# The same mechanism for the tiny SD1 the A1111 tests load (tests/webui/conftest.py `webui_assets`:
# `build_tiny_sd1(text_width=768, text_layers=2, text_heads=12, unet_channels=32)`), taken by Forge as
# its `StableDiffusion` engine (`backend/diffusion_engine/sd15.py`, `matched_guesses = [model_list.SD15]`).
# `model_list.SD15` (hg/model_list.py:99-142) asks for `model_channels` 320; the subclass asks for the
# tiny shapes and inherits `process_clip_state_dict` (`cond_stage_model.` -> `clip_l.`), `clip_target`
# {clip_l: text_encoder}, EPS and `latent_format` SD15 (scale 0.18215). Heads: ldm's UNet is built with
# `num_heads` 2 and `legacy: False` (lib_sdtrain/hosts/standalone/tiny.py `tiny_config`), so every
# attention has 2 heads of `ch // 2`; Forge's UNet does the same with `num_heads` 2,
# `num_head_channels` -1 (backend/nn/unet.py:563-567) — SD15's 8 heads would load (head count is no
# weight shape) but compute another function. The repo folder mirrors backend/huggingface/runwayml/
# stable-diffusion-v1-5 (PNDMScheduler, CLIPTokenizer, CLIPTextModel, AutoencoderKL; the safety
# checker and feature extractor are skipped by loader.py:38-39, so they are not listed).

#: the tiny SD1 UNet as `detect_unet_config` reads it back (channel_mult [1, 2], one res block per
#: level, a conv-projected transformer at both levels): the keys `TinySD1.matches` compares. No
#: `in_channels`, as SD15 has none: a tiny inpainting SD1 (9 input channels) is taken too.
TINY_SD1_UNET_MATCH = {
    "model_channels": 32,
    "use_linear_in_transformer": False,
    "transformer_depth": [1, 1],
    "context_dim": 768,
    "adm_in_channels": None,
    "use_temporal_attention": False,
}
SD1_SHIM_SCRIPT = "scripts/register_tiny_sd1.py"
SD1_CLASS_NAME = "SdtrainTinySD1"

_SD1_SHIM_TEMPLATE = '''"""Test-only (sdtrain tests/webui/forge_tiny_sdxl.py): make huggingface_guess take the tiny SD1
as an SD1.5, its component configs read from the folder in `huggingface_repo`. Forge imports this at
start-up, before it loads any model; the insertion is idempotent (scripts may be imported again)."""
from huggingface_guess import model_list


class {cls}(model_list.SD15):
    huggingface_repo = {repo!r}
    unet_config = {match!r}
    unet_extra_config = {{"num_heads": 2, "num_head_channels": -1}}


if not any(getattr(m, "__name__", None) == {cls!r} for m in model_list.models):
    model_list.models.insert(0, {cls})
    print("[sdtrain-test] registered {cls} with huggingface_guess")
'''

#: config.json entries that name where a CLIP config came from, not what it builds
_CLIP_PROVENANCE = ("_name_or_path", "transformers_version", "torch_dtype")


def _clip_arch(path: Path) -> dict:
    config = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if k not in _CLIP_PROVENANCE}


def save_checked_tiny_sd1(path: Path, clip_dir: Path, seed: int, inpainting: bool = False) -> Path:
    """The tiny SD1 of the A1111 tests (768-wide 2-layer 12-head CLIP, 32-channel UNet) saved to `path`,
    after checking that `clip_dir`'s config is the one its CLIP was built from (a ValueError if not).
    The build folder is removed either way. Needs ldm importable."""
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1, save_tiny_checkpoint

    build = path.parent / f"build-{path.stem}"
    try:
        model = build_tiny_sd1(build, text_width=768, text_layers=2, text_heads=12, unet_channels=32, seed=seed,
                               inpainting=inpainting)
        if _clip_arch(Path(clip_dir) / "config.json") != _clip_arch(build / "clip" / "config.json"):
            raise ValueError(f"{Path(clip_dir) / 'config.json'} is not the text config of the tiny SD1's CLIP")
        return save_tiny_checkpoint(model, path)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _write_sd1_repo(repo: Path, clip_dir: Path) -> None:
    """The diffusers-style folder `backend/loader.py` reads the SD1 component configs from."""
    _write_json(repo / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })  # fmt: skip
    # runwayml's scheduler: ldm's linear_start/linear_end 0.00085/0.012 over 1000 steps, scaled-linear
    # (tiny_config); loader.py sets prediction_type from the guess (EPS) or a yaml beside the ckpt
    _write_json(repo / "scheduler" / "scheduler_config.json", {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None, "clip_sample": False, "prediction_type": "epsilon",
    })  # fmt: skip
    # the tokenizer and text config the checkpoint's CLIPTextModel was built with, as they are
    (repo / "tokenizer").mkdir(parents=True, exist_ok=True)
    for f in clip_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "config.json":
            shutil.copy2(f, repo / "tokenizer" / f.name)
    (repo / "text_encoder").mkdir(parents=True, exist_ok=True)
    shutil.copy2(clip_dir / "config.json", repo / "text_encoder" / "config.json")
    # tiny_config's first stage: ch 32, ch_mult [1, 1, 1, 1], one res block, 4 latent channels, and
    # its scale_factor (IntegratedAutoencoderKL.process_in/out use `scaling_factor`, backend/nn/vae.py)
    _write_json(repo / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 32,
        "act_fn": "silu", "sample_size": 64, "scaling_factor": 0.18215,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    })  # fmt: skip


def write_tiny_sd1_for_forge(root: Path, clip_dir: Path, seed: int = 0) -> dict:
    """Write `root/tiny-sd1-forge.safetensors` (ldm key layout, fp32: the tiny SD1 of `webui_assets`,
    768-wide 2-layer 12-head CLIP, 32-channel UNet) and its config folder `root/tiny-sd1-forge-repo/`;
    return {"ckpt": Path, "repo": Path, "shim": {relative_path: text}}, the shim to be installed as
    extensions/<name>/<relative_path> of the Forge server (it names the config folder by its absolute
    path; script and class names differ from the SDXL shim's, so both can be installed together).

    `clip_dir` holds the CLIP tokenizer files and text `config.json` the tiny CLIP is built from (the
    offline hub snapshot `webui_assets` writes): they become the folder's tokenizer/ and
    text_encoder/config.json; a ValueError if that config is not the one `build_tiny_sd1` builds.
    Needs ldm importable (as `build_tiny_sd1` does); leaves the global RNG untouched."""

    root = Path(root).resolve()
    clip_dir = Path(clip_dir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = save_checked_tiny_sd1(root / "tiny-sd1-forge.safetensors", clip_dir, seed)
    repo = root / "tiny-sd1-forge-repo"
    _write_sd1_repo(repo, clip_dir)
    script = _SD1_SHIM_TEMPLATE.format(repo=str(repo), cls=SD1_CLASS_NAME, match=TINY_SD1_UNET_MATCH)
    return {"ckpt": ckpt, "repo": repo, "shim": {SD1_SHIM_SCRIPT: script}}


# --- SD2 (v-prediction, OpenCLIP text tower) ---------------------------------------------------------
#
# The tiny SD2 of the A1111 tests (tests/webui/conftest.py `sd2_assets`: `build_tiny_sd2(text_width=64,
# text_layers=2, text_heads=2, unet_channels=32, seed=1, prediction="v")`: ldm's FrozenOpenCLIPEmbedder
# with layer "penultimate" over a toy open_clip architecture), taken by Forge as its `StableDiffusion2`
# engine (`backend/diffusion_engine/sd20.py`, `matched_guesses = [model_list.SD20]`). Three choices:
#
# * Penultimate layer. Forge's SD2 engine asks its `ClassicTextProcessingEngine` for the *last* hidden
#   state (`clip_skip` 1, `minimal_clip_skip` 1, sd20.py:39-50; classic_engine.py `encode_with_transformers`
#   takes `hidden_states[-clip_skip]` then `final_layer_norm`): the penultimate choice lives in the config,
#   whose text encoder has one layer fewer than the checkpoint (stabilityai/stable-diffusion-2-1: 23 of 24).
#   So `text_encoder/config.json` has `text_layers - 1` layers, and the subclass's `process_clip_state_dict`
#   moves the last resblock's converted keys out of `clip_h.` (they land in StateDict Keys' 'ignore'
#   instead of a "CLIPTextModel Unexpected: [...]" line). ldm: `FrozenOpenCLIPEmbedder.encode_with_
#   transformer` runs resblocks 0..layers-2, then `ln_final` — the same function.
# * v-prediction. `SD20.model_type` (hg/model_list.py:168-174) says V_PREDICTION only when the std of
#   `output_blocks.11.1.transformer_blocks.0.norm1.bias` exceeds 0.09: the tiny UNet has no such block,
#   so it would say EPS, and loader.py:533-567 overwrites the scheduler's `prediction_type` with the
#   guess's unless a yaml beside the checkpoint says `parameterization: "v"`. The subclass's
#   `model_type` returns V_PREDICTION, so no yaml is needed (one with "v", as `sd2_assets` writes, agrees).
# * Tokenizer. open_clip pads with 0 ("!"); `process_tokens` (classic_engine.py:300-303) writes
#   `pad_token_id` after the first end token when it differs from the end token, so the tokenizer's
#   pad_token is "!" (as Forge's bundled stable-diffusion-2-1 special_tokens_map.json has it).
#
# The UNet is ldm's with `num_heads` 2, `legacy: False` and conv `proj_in` (tiny_config), so the subclass
# asks for `use_linear_in_transformer` False and builds 2 heads; `attn_precision` stays SD20's float32.
# On success Forge prints "StateDict Keys: {'unet': 286, 'vae': 176, 'text_encoder': 22, 'ignore': 16}"
# (the 16 are the moved last layer) and no Missing/Unexpected line.

#: the tiny SD2 UNet as `detect_unet_config` reads it back: `TinySD1`'s shapes with a 64-wide context
TINY_SD2_UNET_MATCH = {
    "model_channels": 32,
    "use_linear_in_transformer": False,
    "transformer_depth": [1, 1],
    "context_dim": 64,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "in_channels": 4,
}
SD2_TEXT_LAYERS = 2
SD2_SHIM_SCRIPT = "scripts/register_tiny_sd2.py"
SD2_CLASS_NAME = "SdtrainTinySD2"

_SD2_SHIM_TEMPLATE = '''"""Test-only (sdtrain tests/webui/forge_tiny_sdxl.py): make huggingface_guess take the tiny SD2
(v-prediction) as an SD2, its component configs read from the folder in `huggingface_repo`. Forge imports
this at start-up, before it loads any model; the insertion is idempotent (scripts may be imported again)."""
import torch
from huggingface_guess import model_list

#: the text encoder stops one layer short (penultimate, as SD2's 23-of-24-layer config): the last
#: resblock's converted keys move out of "clip_h." so they load nowhere and print no "Unexpected"
_LAST_LAYER = "clip_h.transformer.text_model.encoder.layers.{last}."


class {cls}(model_list.SD20):
    huggingface_repo = {repo!r}
    unet_config = {match!r}
    unet_extra_config = {{"num_heads": 2, "num_head_channels": -1, "attn_precision": torch.float32}}

    def model_type(self, state_dict, prefix=""):
        return model_list.ModelType.V_PREDICTION

    def process_clip_state_dict(self, state_dict):
        state_dict = super().process_clip_state_dict(state_dict)
        return {{("unused." + k if k.startswith(_LAST_LAYER) else k): v for k, v in state_dict.items()}}


if not any(getattr(m, "__name__", None) == {cls!r} for m in model_list.models):
    model_list.models.insert(0, {cls})
    print("[sdtrain-test] registered {cls} with huggingface_guess")
'''


def _write_sd2_repo(repo: Path, width: int, layers: int, heads: int) -> None:
    """The diffusers-style folder `backend/loader.py` reads the SD2 component configs from (the layout
    of backend/huggingface/stabilityai/stable-diffusion-2-1, feature extractor left out)."""
    from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

    _write_json(repo / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })  # fmt: skip
    # tiny_config's schedule (scaled-linear 0.00085..0.012 over 1000 steps), v-prediction like SD 2.x 768
    _write_json(repo / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None, "clip_sample": False, "prediction_type": "v_prediction",
    })  # fmt: skip
    write_clip_tokenizer(repo / "tokenizer")
    for file in ("tokenizer_config.json", "special_tokens_map.json"):  # open_clip pads with 0 = "!"
        path = repo / "tokenizer" / file
        _write_json(path, {**json.loads(path.read_text()), "pad_token": "!"})
    # sd2_cond_stage's open_clip text tower as transformers names it (GELU, mlp_ratio 4, LayerNorm eps
    # 1e-5, embed_dim = width so text_projection is square), one layer short: the penultimate output
    _write_json(repo / "text_encoder" / "config.json", {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "hidden_size": width, "intermediate_size": 4 * width, "projection_dim": width,
        "num_hidden_layers": layers - 1, "num_attention_heads": heads, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "max_position_embeddings": MAX_LENGTH, "vocab_size": VOCAB_SIZE,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
    })  # fmt: skip
    # tiny_config's first stage, as for SD1 (SD20's latent_format is SD15's, scale 0.18215)
    _write_json(repo / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 32,
        "act_fn": "silu", "sample_size": 64, "scaling_factor": 0.18215,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    })  # fmt: skip


def write_tiny_sd2_for_forge(root: Path, seed: int = 1) -> dict:
    """Write `root/tiny-sd2-forge.safetensors` (ldm key layout, fp32: the tiny v-prediction SD2 of
    `sd2_assets`, a 64-wide 2-layer 2-head OpenCLIP text tower read at its penultimate layer, 32-channel
    UNet) and its config folder `root/tiny-sd2-forge-repo/`; return {"ckpt": Path, "repo": Path,
    "shim": {relative_path: text}}, the shim to be installed as extensions/<name>/<relative_path> of the
    Forge server (own script and class names: it coexists with the SD1/SDXL/inpainting shims).

    Forge needs no yaml and no open_clip for it (the tower loads as a transformers CLIPTextModel).
    Needs ldm and open_clip importable (as `build_tiny_sd2` does; that registers the toy architecture
    with open_clip, process-global); leaves the global RNG untouched."""
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd2, save_tiny_checkpoint

    width, heads = 64, 2
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    build = root / "build-tiny-sd2-forge"
    model = build_tiny_sd2(
        build, text_width=width, text_layers=SD2_TEXT_LAYERS, text_heads=heads, unet_channels=32, seed=seed,
        prediction="v",
    )  # fmt: skip
    ckpt = save_tiny_checkpoint(model, root / "tiny-sd2-forge.safetensors")
    del model
    shutil.rmtree(build)
    repo = root / "tiny-sd2-forge-repo"
    _write_sd2_repo(repo, width, SD2_TEXT_LAYERS, heads)
    script = _SD2_SHIM_TEMPLATE.format(
        repo=str(repo), cls=SD2_CLASS_NAME, match=TINY_SD2_UNET_MATCH, last=SD2_TEXT_LAYERS - 1
    )
    return {"ckpt": ckpt, "repo": repo, "shim": {SD2_SHIM_SCRIPT: script}}


# --- SD1 inpainting ----------------------------------------------------------------------------------
#
# The tiny SD1 inpainting model of `inpainting_assets` (`build_tiny_sd1(..., seed=2, inpainting=True)`:
# LatentInpaintDiffusion, hybrid conditioning, 9 UNet input channels). huggingface_guess has no inpainting
# class: `detect_unet_config` reads `in_channels` 9 from `input_blocks.0.0.weight` (hg/detection.py:168,
# 250), `BASE.__init__` keeps it in the guess's `unet_config`, and `BASE.inpaint_model()` (in_channels > 4,
# hg/model_list.py:60-61) becomes the engine's `is_inpaint` (backend/diffusion_engine/base.py:28), which
# makes processing.py build the 5-channel mask + masked-image latent that `KModel.apply_model` concatenates
# (backend/modules/k_model.py:28-29). So it is an SD15 guess like the tiny SD1; this subclass only adds
# `in_channels` 9 to the match so it takes the inpainting model and nothing else (`SdtrainTinySD1` has no
# `in_channels` and takes it too if it stands first: same repo, heads and engine, so the same model).
# Forge prints "StateDict Keys: {'unet': 286, 'vae': 176, 'text_encoder': 37, 'ignore': 0}".

TINY_INPAINT_UNET_MATCH = {**TINY_SD1_UNET_MATCH, "in_channels": 9}
INPAINT_SHIM_SCRIPT = "scripts/register_tiny_sd1_inpainting.py"
INPAINT_CLASS_NAME = "SdtrainTinySD1Inpainting"


def write_tiny_inpainting_for_forge(root: Path, clip_dir: Path, seed: int = 2) -> dict:
    """Write `root/tiny-sd1-inpainting-forge.safetensors` (ldm key layout, fp32: the tiny SD1 inpainting
    model of `inpainting_assets`, 9 UNet input channels, 768-wide 2-layer 12-head CLIP) and its config
    folder `root/tiny-sd1-inpainting-forge-repo/`; return {"ckpt": Path, "repo": Path, "shim":
    {relative_path: text}} (own script and class names). `clip_dir` as for `write_tiny_sd1_for_forge`
    (a ValueError if its config is not the tiny CLIP's). Needs ldm importable; leaves the global RNG
    untouched."""

    root = Path(root).resolve()
    clip_dir = Path(clip_dir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = save_checked_tiny_sd1(root / "tiny-sd1-inpainting-forge.safetensors", clip_dir, seed, inpainting=True)
    repo = root / "tiny-sd1-inpainting-forge-repo"
    _write_sd1_repo(repo, clip_dir)
    script = _SD1_SHIM_TEMPLATE.format(repo=str(repo), cls=INPAINT_CLASS_NAME, match=TINY_INPAINT_UNET_MATCH)
    script = script.replace("the tiny SD1\nas an SD1.5", "the tiny SD1\ninpainting model as an SD1.5")
    return {"ckpt": ckpt, "repo": repo, "shim": {INPAINT_SHIM_SCRIPT: script}}
