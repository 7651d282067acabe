"""The toy worlds (lib_sdtrain/toyworld) in lllyasviel's Forge: their checkpoints, as `models.assemble`
writes them, made known to Forge's detector by the mechanism of forge_tiny_sdxl.py (a subclass of
huggingface_guess's SD15 / SDXL class, first in `model_list.models`, installed by a test-only extension;
its component configs in a diffusers-style folder named by `huggingface_repo`). No Forge file changes.

What differs from the tiny models (Forge dfdcbab6; "hg/" = repositories/huggingface_guess/huggingface_guess/):

* Detection. `detect_unet_config` (hg/detection.py) reads the toy UNets back as
  - SD1: model_channels 64, channel_mult [1, 2], transformer_depth [0, 1] (attention at the second
    level only), conv `proj_in`, context_dim 768;
  - SDXL: model_channels 64, channel_mult [1, 2], transformer_depth [0, 0]: the toy SDXL's only
    transformer is the middle block's, and the detector takes `context_dim` and
    `use_linear_in_transformer` from the first transformer of the *input* blocks, so it reports
    context_dim None and use_linear_in_transformer False. The subclass matches those detected values
    and corrects them in `unet_extra_config` (which `BASE.__init__` writes over the detected config,
    hg/model_list.py:63-68, the config the UNet is built from): context_dim 2048 and a linear
    `proj_in`, as the checkpoint's weights have them. Without it the middle block's cross-attention
    would be built 128 -> 128 and Forge would print "... Missing/Unexpected" (or fail on a shape).
* Heads: both toy UNets have `num_head_channels` 32 (lib_sdtrain/toyworld/models.py SD1_UNET,
  SDXL_UNET), so `num_heads` -1, `num_head_channels` 32.
* The VAE is the toy world's own (64 channels at four levels, no extra res block: ldm's
  `num_res_blocks` 0 is `layers_per_block` 0 for IntegratedAutoencoderKL, backend/nn/vae.py), with
  each family's latent scale (SD1 0.18215, SDXL 0.13025, as the toy checkpoints assume).
* The text encoders are the tiny ones (CLIP-L 768 wide, 2 layers, 12 heads; CLIP-G 1280 wide, 2 layers):
  the same configs as forge_tiny_sdxl.py writes, the CLIP-L one taken from the toy world's own folder.
"""

from __future__ import annotations

from pathlib import Path

from forge_tiny_sdxl import _write_json, _write_repo, _write_sd1_repo

#: what `detect_unet_config` reads from the toy UNets (checked against Forge's detector by running it on
#: the assembled files): the keys each subclass's `matches` compares
TOY_SD1_MATCH = {
    "model_channels": 64,
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "adm_in_channels": None,
    "in_channels": 4,
    "use_temporal_attention": False,
}
TOY_SDXL_MATCH = {
    "model_channels": 64,
    "channel_mult": [1, 2],
    "transformer_depth": [0, 0],
    "transformer_depth_middle": 1,
    "context_dim": None,
    "adm_in_channels": 2816,
    "in_channels": 4,
    "use_temporal_attention": False,
}
_EXTRA = {
    "sd1": {"num_heads": -1, "num_head_channels": 32},
    "sdxl": {"num_heads": -1, "num_head_channels": 32, "context_dim": 2048, "use_linear_in_transformer": True},
}
_BASE = {"sd1": "SD15", "sdxl": "SDXL"}
CLASS_NAME = {"sd1": "SdtrainToyWorldSD1", "sdxl": "SdtrainToyWorldSDXL"}

_SHIM_TEMPLATE = '''"""Test-only (sdtrain tests/webui/forge_toyworld.py): make huggingface_guess take the {family} toy
world as an {base}, its component configs read from the folder in `huggingface_repo`. Forge imports this at
start-up, before it loads any model; the insertion is idempotent (scripts may be imported again)."""
from huggingface_guess import model_list


class {cls}(model_list.{base}):
    huggingface_repo = {repo!r}
    unet_config = {match!r}
    unet_extra_config = {extra!r}


if not any(getattr(m, "__name__", None) == {cls!r} for m in model_list.models):
    model_list.models.insert(0, {cls})
    print("[sdtrain-test] registered {cls} with huggingface_guess")
'''


def _write_toy_vae(repo: Path, family: str) -> None:
    from lib_sdtrain.toyworld.models import SCALE_FACTOR
    from lib_sdtrain.toyworld.vae import VAE_DDCONFIG

    dd = VAE_DDCONFIG
    _write_json(repo / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "in_channels": dd["in_channels"], "out_channels": dd["out_ch"],
        "latent_channels": dd["z_channels"], "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"], "norm_num_groups": 32, "act_fn": "silu",
        "sample_size": dd["resolution"], "scaling_factor": SCALE_FACTOR[family], "force_upcast": True,
        "down_block_types": ["DownEncoderBlock2D"] * len(dd["ch_mult"]),
        "up_block_types": ["UpDecoderBlock2D"] * len(dd["ch_mult"]),
    })  # fmt: skip


def toyworld_shim_for_forge(family: str, files: dict, root: Path) -> dict:
    """For the toy world `family` assembled into `files` (`models.assemble`'s {"ckpt", "yaml", "clip"}):
    write its config folder `root/toyworld-<family>-forge-repo/` and return the test-only extension's
    files {relative path: text} that register it with Forge's detector."""
    root = Path(root).resolve()
    repo = root / f"toyworld-{family}-forge-repo"
    clip = Path(files["clip"])
    if family == "sd1":
        _write_sd1_repo(repo, clip)
    else:
        _write_repo(repo, clip)
    _write_toy_vae(repo, family)
    match = TOY_SD1_MATCH if family == "sd1" else TOY_SDXL_MATCH
    script = _SHIM_TEMPLATE.format(family=family.upper(), base=_BASE[family], cls=CLASS_NAME[family],
                                   repo=str(repo), match=match, extra=_EXTRA[family])
    return {f"scripts/register_toyworld_{family}.py": script}

