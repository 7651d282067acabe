"""The tiny random SD1 of the A1111 tests, loaded by Forge Classic (Haoming02 sd-webui-forge-classic
1f95d717) as its own SD1.5, with no change to any Forge Classic file: the checkpoint as the reForge tests
write it, plus a test-only extension (the shim).

Forge Classic loads models as reForge does (both come from the old Forge): `modules_forge/forge_loader.py`
`load_model_for_a1111` builds an A1111 shell from the yaml (UNet and VAE as FakeObjects, CLIP under
`no_clip()`), then `load_checkpoint_guess_config` (forge_loader.py:72-144) takes the model class from
`ldm_patched/modules/model_detection.py`'s match against `ldm_patched/modules/supported_models.py:249`
`models`, a plain module-level list read at each call. SD15 (supported_models.py:18-26) asks for
`model_channels` 320: the tiny UNet matches nothing, `model_config_from_unet` returns None and the load ends
in "'NoneType' object has no attribute 'set_manual_cast'" (forge_loader.py:95, before its own None check).
So, as for reForge (tests/webui/reforge_tiny.py, which explains each step): a subclass of SD15 with the
tiny `unet_config` put first; its `clip_target()` names a CLIP built from the tiny CLIP's `config.json` and
a tokenizer read from the same folder; and `forge_loader.VAE` (bound by `from ldm_patched.modules.sd import
VAE`, looked up at call time, forge_loader.py:118 `VAE(sd=vae_sd)`) rebound to a subclass that passes the
tiny VAE config for the weights the tiny class marked. What differs from reForge is only the constructors'
signatures in Classic's older ldm_patched: `SDClipModel(version, device, max_length, freeze, layer,
layer_idx, textmodel_json_config, dtype, ...)` (sd1_clip.py:82-96), `SD1ClipModel(device, dtype, clip_name,
clip_model, **kwargs)` (:596), `SDTokenizer(tokenizer_path, ..., embedding_directory, ...)` (:423),
`SD1Tokenizer(embedding_directory, clip_name, tokenizer)` (:577) and `VAE(sd, device, config, dtype,
no_init)` (sd.py:202).
"""

from __future__ import annotations

from pathlib import Path

from reforge_tiny import CLASS_NAME, TINY_SD1_UNET_MATCH, TINY_VAE_PARAMS

SHIM_SCRIPT = "scripts/register_tiny_sd1_classic.py"

_SHIM_TEMPLATE = '''"""Test-only (sdtrain tests/webui/classic_tiny.py): make Forge Classic's model detector take the tiny SD1
as an SD1.5, its CLIP built from the tiny CLIP's config and tokenizer and its VAE at the tiny sizes.
The webui imports this at start-up, before it loads any model; importing it again changes nothing."""
import os

from ldm_patched.modules import sd1_clip, supported_models, supported_models_base
from modules_forge import forge_loader

_CLIP_DIR = {clip_dir!r}
_VAE_PARAMS = {vae!r}


class SdtrainTinyClipL(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, **kwargs):
        super().__init__(device=device, dtype=dtype, textmodel_json_config=os.path.join(_CLIP_DIR, "config.json"))


class SdtrainTinyClip(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, **kwargs):
        super().__init__(device=device, dtype=dtype, clip_model=SdtrainTinyClipL)


class SdtrainTinyTokenizerL(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None):
        super().__init__(tokenizer_path=_CLIP_DIR, embedding_directory=embedding_directory)


class SdtrainTinyTokenizer(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None):
        super().__init__(embedding_directory=embedding_directory, tokenizer=SdtrainTinyTokenizerL)


class _VAEStateDict(dict):
    """the tiny model's VAE weights, carrying the config its VAE is built from"""


class {cls}(supported_models.SD15):
    unet_config = {match!r}
    unet_extra_config = {{"num_heads": 2, "num_head_channels": -1}}

    def process_vae_state_dict(self, state_dict):
        out = _VAEStateDict(super().process_vae_state_dict(state_dict))
        out.sdtrain_vae_config = {{"params": _VAE_PARAMS}}
        return out

    def clip_target(self):
        return supported_models_base.ClipTarget(SdtrainTinyTokenizer, SdtrainTinyClip)


if not getattr(forge_loader.VAE, "sdtrain_tiny_vae", False):
    class SdtrainTinyAwareVAE(forge_loader.VAE):
        """Forge Classic's VAE; given the weights {cls} marked, built with their config instead of SD's sizes"""

        sdtrain_tiny_vae = True

        def __init__(self, sd=None, device=None, config=None, dtype=None, no_init=False):
            if config is None:
                config = getattr(sd, "sdtrain_vae_config", None)
            super().__init__(sd=sd, device=device, config=config, dtype=dtype, no_init=no_init)

    forge_loader.VAE = SdtrainTinyAwareVAE

if not any(getattr(m, "__name__", None) == {cls!r} for m in supported_models.models):
    supported_models.models.insert(0, {cls})
    print("[sdtrain-test] registered {cls} with Forge Classic's model detector")
'''


def write_tiny_sd1_for_classic(root: Path, clip_dir: Path, seed: int = 0) -> dict:
    """Write `root/tiny-sd1-classic.safetensors` (the tiny SD1 of `webui_assets`, ldm key layout, fp32)
    and return {"ckpt": Path, "shim": {relative_path: text}}: the shim to install as
    extensions/<name>/<relative_path> of the Forge Classic server. `clip_dir` holds the tiny CLIP's
    tokenizer files and text `config.json` (named by absolute path in the shim: it must stay while the
    server runs); a ValueError if its config is not the tiny CLIP's. No yaml (see reforge_tiny.py)."""
    root = Path(root).resolve()
    clip_dir = Path(clip_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    from forge_tiny_sdxl import save_checked_tiny_sd1

    ckpt = save_checked_tiny_sd1(root / "tiny-sd1-classic.safetensors", clip_dir, seed)
    script = _SHIM_TEMPLATE.format(clip_dir=str(clip_dir), vae=TINY_VAE_PARAMS, cls=CLASS_NAME,
                                   match=TINY_SD1_UNET_MATCH)  # fmt: skip
    return {"ckpt": ckpt, "shim": {SHIM_SCRIPT: script}}
