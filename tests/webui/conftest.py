"""Host-contract fixtures: a real webui, started with sdtrain installed, on the CPU.

The host is a parameter (`webui_hosts.py`: how to start it, which model it needs, which capabilities
it claims), chosen by SDTRAIN_WEBUI_HOST (default a1111). SDTRAIN_WEBUI_DIR names its checkout and
SDTRAIN_WEBUI_PYTHON the Python its dependencies are installed in (default: <checkout>/venv/bin/python);
`eval "$(bash tools/webui.sh a1111)"` builds one from ../shared/hosts and sets all three. Without a
checkout every test here is skipped with that reason (tools/test.sh prints it). Nothing is downloaded: the fixtures write a tiny random SD1 checkpoint
(768-wide CLIP, so the webui's SD1 code paths apply), its yaml, and the CLIP tokenizer/config in
the Hugging Face cache layout, into a temporary data dir (--data-dir), and copy this working tree
into its extensions/ folder, as "Install from URL" would.

Two more model families get their own tiny checkpoints and servers (tests/webui/test_a1111_families.py):
an SD2 (OpenCLIP text encoder, v-prediction) and an SD1 inpainting model (9-channel UNet, hybrid
conditioning). Each loads through the webui's own `<ckpt>.yaml` lookup, with no change to the webui.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from objective_shim import OBJECTIVE_SCRIPT
from webui_hosts import selected

HOST = selected()
REPO = Path(__file__).resolve().parents[2]
WEBUI_DIR = os.environ.get("SDTRAIN_WEBUI_DIR", "")
CLIP_REV = "0000000000000000000000000000000000tiny01"

#: A test-only shim, installed as a second extension of the *stock* server only: torch >= 2.2
#: dropped `Sampler.__init__(data_source)`, which the webui's own trainer still passes
#: (modules/textual_inversion/dataset.py), so the stock trainer cannot run at all on a current
#: torch without it. It changes nothing else.
TORCH_COMPAT_SCRIPT = '''
import torch.utils.data as data
_init = data.Sampler.__init__
if getattr(_init, "__sdtrain_test_compat__", False) is False:
    def __init__(self, data_source=None):
        _init(self)
    __init__.__sdtrain_test_compat__ = True
    data.Sampler.__init__ = __init__
'''


#: A test-only shim, installed as a second extension of the SD2 server only. The webui builds
#: `FrozenOpenCLIPEmbedder(arch=..., version=...)` from the checkpoint's yaml, and open_clip knows only
#: registered architectures; a real SD2 names "ViT-H-14", which open_clip ships. The tiny SD2's toy
#: architecture (written by `sd2_cond_stage`) must be registered in the webui process before the
#: model loads: extension scripts are imported before the webui's model-loading thread starts
#: (modules/initialize.py). `version: null` in the yaml means no pretrained weights are fetched, and
#: the webui creates the model with open_clip's weight loading disabled anyway
#: (modules/sd_disable_initialization.py); the weights come from the checkpoint.
OPEN_CLIP_ARCH_SCRIPT = '''
from pathlib import Path

import open_clip

open_clip.add_model_config(Path(__file__).resolve().parents[1] / "open_clip_configs")
'''


#: A test-only extension installed in every server: GET /sdtrain-test/model-digest hashes every tensor of
#: the loaded model — bytes, dtype, shape, requires_grad and whether it is an inference tensor — so a test
#: can prove a training run left the host's model exactly as it was. A1111/reForge: the LatentDiffusion /
#: DiffusionEngine module; Forge: the parts of its engine (forge_objects_original: UNet, CLIP, VAE). Read
#: under inference mode, where Forge's inference tensors may be viewed.
MODEL_DIGEST_SCRIPT = '''
import hashlib

import torch
from modules import script_callbacks, shared


def _roots():
    m = shared.sd_model
    parts = getattr(m, "forge_objects_original", None)
    if parts is not None:
        return {"unet": parts.unet.model, "clip": parts.clip.cond_stage_model, "vae": parts.vae.first_stage_model}
    return {"model": m}


def digest():
    out = {}
    with torch.inference_mode():
        for root_name, root in _roots().items():
            h = hashlib.sha256()
            flags = []
            for kind, items in (("p", root.named_parameters(remove_duplicate=False)),
                                ("b", root.named_buffers(remove_duplicate=False))):
                for name, t in items:
                    flags.append(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}:{t.requires_grad}:{t.is_inference()}")
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            out[root_name] = {"bytes": h.hexdigest(), "tensors": len(flags),
                              "flags": hashlib.sha256("\\n".join(flags).encode()).hexdigest()}
    return out


def on_app_started(_demo, app):
    app.add_api_route("/sdtrain-test/model-digest", digest, methods=["GET"])


script_callbacks.on_app_started(on_app_started)
'''


def _python() -> str:
    return os.environ.get("SDTRAIN_WEBUI_PYTHON") or str(Path(WEBUI_DIR) / "venv" / "bin" / "python")


def _skip_reason() -> str | None:
    if not WEBUI_DIR:
        return "SDTRAIN_WEBUI_DIR is not set (path to an AUTOMATIC1111 webui checkout)"
    if not (Path(WEBUI_DIR) / "launch.py").is_file():
        return f"SDTRAIN_WEBUI_DIR={WEBUI_DIR} has no launch.py"
    if not Path(_python()).is_file():
        return f"no webui Python at {_python()} (set SDTRAIN_WEBUI_PYTHON)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    for item in items:
        if "tests/webui" not in str(item.fspath).replace(os.sep, "/"):
            continue
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
            continue
        needs = {"sd1"}  # every contract test trains on the host's SD1 model unless it says otherwise
        for mark in item.iter_markers("needs"):
            needs.update(mark.args)
        why = [HOST.verdict(capability) for capability in sorted(needs)]  # raises on an undeclared one
        if any(why):
            item.add_marker(pytest.mark.skip(reason="; ".join(w for w in why if w)))
        elif item.originalname in HOST.full_run_only and os.environ.get("SDTRAIN_WEBUI_FULL") != "1":
            item.add_marker(pytest.mark.skip(reason=f"in {HOST.title} with SDTRAIN_WEBUI_FULL=1 only (passes there): "
                                                    f"shown in the default run by {HOST.full_run_only[item.originalname]}"))


def write_random_sd15(path: Path, clip_dir: Path, *, seed: int = 0) -> Path:
    """A randomly initialised SD1.5 at its real shapes, for hosts whose model detector accepts nothing
    smaller (reForge: see webui_hosts.REFORGE): ldm's UNetModel and AutoencoderKL with
    configs/v1-inference.yaml's values and a 12-layer, 768-wide CLIPTextModel, each with its own default
    initialisation, in the original ldm key layout (686 UNet, 248 VAE, 197 CLIP keys + the DDPM schedule
    buffers), fp16 safetensors (2.0 GiB). No yaml is written: the host picks v1-inference.yaml itself,
    as for a real SD1.5 file. `clip_dir` gets the text model's config and the generated tokenizer, for
    the offline Hugging Face cache. Two changes to the default init, both as for the tiny models
    (lib_sdtrain.hosts.standalone.tiny): ldm's zero-initialised convs get a random init (or a TI
    gradient is exactly 0), and the CLIP LayerNorms a random affine (or the conditioning is zero-mean
    and the emphasis rescale divides by ~0). Takes about 30 s and 6 GB of memory at its peak."""
    import contextlib
    import io

    import numpy as np
    import torch
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_sdtrain.hosts.standalone.tiny import unzero_init
    from lib_sdtrain.hosts.standalone.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(clip_dir)
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                 hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    text_config.save_pretrained(clip_dir)
    state: dict = {}
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(seed)
        parts = (
            ("model.diffusion_model.", lambda: UNetModel(
                image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)),
            ("first_stage_model.", lambda: AutoencoderKL(
                ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                          "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                          "dropout": 0.0},
                lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)),
            ("cond_stage_model.transformer.", lambda: CLIPTextModel(text_config)),
        )
        for prefix, make in parts:
            module = make()
            unzero_init(module)
            if prefix.startswith("cond_stage"):
                with torch.no_grad():
                    for m in module.modules():
                        if isinstance(m, torch.nn.LayerNorm):
                            m.weight.add_(0.2 * torch.randn_like(m.weight))
                            m.bias.add_(0.2 * torch.randn_like(m.bias))
            for k, v in module.state_dict().items():
                state[prefix + k] = v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
            del module
    # LatentDiffusion's registered schedule (linear, 0.00085 .. 0.012, 1000 steps), as a real file holds it
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    schedule = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }  # fmt: skip
    state.update({k: torch.tensor(v, dtype=torch.float32) for k, v in schedule.items()})
    save_file(state, str(path))
    return path


@pytest.fixture(scope="session")
def webui_assets(tmp_path_factory):
    return build_webui_assets(tmp_path_factory.mktemp("webui"))


def build_webui_assets(root: Path, *, full: bool | None = None) -> dict:
    """Checkpoint + yaml, offline CLIP files, a captioned dataset and a copy of the extension, in `root`
    (the `webui_assets` fixture; bench/host_step.py calls it directly).
    For a host whose detector needs SD1.5 at its real shapes (`sd1_model="full"`): `write_random_sd15`;
    for one whose detector learns the tiny shapes from a test-only extension ("registered": Forge,
    reForge, Forge Classic): the tiny SD1 and that extension (forge_tiny_sdxl.py, ldm_patched_tiny.py)."""
    from lib_sdtrain.core.data.samples import write_sample_dataset
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1, save_tiny_checkpoint, write_tiny_yaml

    build = root / "build"
    ckpt_dir = root / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    if (HOST.sd1_model == "full") if full is None else full:
        ckpt = write_random_sd15(ckpt_dir / "random-sd15.safetensors", build / "clip", seed=0)
    else:
        model = build_tiny_sd1(build, text_width=768, text_layers=2, text_heads=12, unet_channels=32, seed=0)
        ckpt = save_tiny_checkpoint(model, ckpt_dir / "tiny-sd1.safetensors")
        write_tiny_yaml(ckpt_dir / "tiny-sd1.yaml", text_width=768, unet_channels=32)  # CLIP by its hub name
    snap = root / "hf" / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / CLIP_REV
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(CLIP_REV)
    for f in (build / "clip").iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy2(f, snap / f.name)
    shutil.rmtree(build)
    shims = {}
    if HOST.sd1_model == "registered" and not full:  # the same tiny SD1, made known to the host's detector
        if HOST.model_stack == "ldm_patched":  # reForge, Forge Classic
            from ldm_patched_tiny import write_tiny_sd1 as write_registered
        else:
            from forge_tiny_sdxl import write_tiny_sd1_for_forge as write_registered

        ckpt.unlink()
        (ckpt_dir / "tiny-sd1.yaml").unlink()
        out = write_registered(ckpt_dir, snap, seed=0)
        ckpt, shims = out["ckpt"], {"sdtrain-test-tiny-sd1": out["shim"]}
    data = write_sample_dataset(root / "train", count=4, size=64, seed=5)
    ext = root / "sdtrain-copy"
    # the extension as "Install from URL" would get it: tracked files, no local environments or caches
    # (.venv-forge alone is 1.4 GB, and every server gets its own copy)
    shutil.copytree(REPO, ext, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".webuis", "webuis", "__pycache__", "*.pyc", "demo_out", ".pytest_cache", ".ruff_cache",
        ".hypothesis", ".import_linter_cache", "tests"))
    return {"root": root, "ckpt": ckpt, "hf": root / "hf", "clip_dir": snap, "data": data, "extension": ext,
            "shims": shims}


@pytest.fixture(scope="session")
def sd2_assets(webui_assets):
    """`webui_assets` with a tiny SD2 instead: FrozenOpenCLIPEmbedder (penultimate layer) over a toy
    OpenCLIP architecture 64 wide, v-prediction (`parameterization: "v"`, as v2-inference-v.yaml),
    and the test-only extension that registers the architecture with open_clip in the webui."""
    from lib_sdtrain.hosts.standalone.tiny import (
        build_tiny_sd2,
        save_tiny_checkpoint,
        sd2_cond_stage,
        write_tiny_yaml,
    )

    root = webui_assets["root"]
    build = root / "build-sd2"
    kw = {"text_width": 64, "text_layers": 2, "text_heads": 2}
    model = build_tiny_sd2(build, **kw, unet_channels=32, seed=1, prediction="v")
    cond = sd2_cond_stage(build, **kw)
    cond["params"].pop("device")  # as in v2-inference-v.yaml: the webui's hijack places the tokens
    ckpt_dir = root / "models-sd2"
    ckpt_dir.mkdir()
    ckpt = save_tiny_checkpoint(model, ckpt_dir / "tiny-sd2.safetensors")
    if HOST.name == "forge":  # the same model, its shapes registered with Forge's detector
        from forge_tiny_sdxl import write_tiny_sd2_for_forge

        ckpt.unlink()
        out = write_tiny_sd2_for_forge(ckpt_dir, seed=1)
        ckpt = out["ckpt"]
        # the yaml (v-prediction, as the shim tells Forge) is for the standalone reference
        write_tiny_yaml(ckpt.with_suffix(".yaml"), text_width=64, unet_channels=32, prediction="v", cond_stage=cond)
        shutil.rmtree(build)
        return {**webui_assets, "ckpt": ckpt, "text_width": 64, "shims": {"sdtrain-test-tiny-sd2": out["shim"]}}
    write_tiny_yaml(ckpt_dir / "tiny-sd2.yaml", text_width=64, unet_channels=32, prediction="v", cond_stage=cond)
    configs = build / "open_clip_configs"
    shim = {"scripts/register_arch.py": OPEN_CLIP_ARCH_SCRIPT,
            **{f"open_clip_configs/{f.name}": f.read_text() for f in configs.glob("*.json")}}
    shutil.rmtree(build)
    shims = {"sdtrain-test-open-clip-arch": shim}
    if HOST.model_stack == "ldm_patched":  # the same checkpoint and yaml, its shapes registered with the detector
        from ldm_patched_tiny import tiny_sd2_shim

        shims["sdtrain-test-tiny-sd2"] = tiny_sd2_shim(
            ckpt_dir, width=kw["text_width"], layers=kw["text_layers"], heads=kw["text_heads"])
    return {**webui_assets, "ckpt": ckpt, "text_width": 64, "shims": shims}


def _forge_sdxl_assets(webui_assets, request) -> dict:
    """Forge: the same tiny SDXL (sgm DiffusionEngine state dict, same seed), plus the configs and the
    test-only extension that register its shapes with Forge's detector (tests/webui/forge_tiny_sdxl.py).
    The yaml beside it is for the standalone reference only (Forge reads it for eps-vs-v alone)."""
    from forge_tiny_sdxl import write_tiny_sdxl_for_forge

    from lib_sdtrain.hosts.standalone.tiny_sdxl import write_tiny_sdxl_yaml

    request.getfixturevalue("sgm_dir")  # sgm, from the A1111 archive: Forge has no generative-models
    root = webui_assets["root"] / "forge-sdxl"
    root.mkdir()
    out = write_tiny_sdxl_for_forge(root, seed=3)
    write_tiny_sdxl_yaml(out["ckpt"].with_suffix(".yaml"), "openai/clip-vit-large-patch14")
    return {**webui_assets, "ckpt": out["ckpt"], "shims": {"sdtrain-test-tiny-sdxl": out["shim"]},
            "settings": {"live_previews_enable": False}}


@pytest.fixture(scope="session")
def sdxl_assets(webui_assets, request):
    """`webui_assets` with a tiny SDXL base instead, built from the webui's own `sgm` code
    (repositories/generative-models): CLIP-L by its hub name (the offline cache's 768-wide, 2-layer
    config; hidden layer 1 = the penultimate), a toy CLIP-G 1280 wide registered with open_clip by a
    test-only extension (as for SD2), sd_xl_base.yaml's parts at toy sizes. Live previews are off:
    their SDXL approximation model would be downloaded."""
    from lib_sdtrain.hosts.standalone.sgm_source import ensure_sgm
    from lib_sdtrain.hosts.standalone.tiny import save_tiny_checkpoint
    from lib_sdtrain.hosts.standalone.tiny_sdxl import build_tiny_sdxl, write_tiny_sdxl_yaml

    if HOST.name == "forge":  # Forge builds no model from a yaml: its detector learns the tiny shapes
        return _forge_sdxl_assets(webui_assets, request)
    ensure_sgm(WEBUI_DIR)
    root = webui_assets["root"]
    build = root / "build-sdxl"
    model = build_tiny_sdxl(build, seed=3)
    ckpt_dir = root / "models-sdxl"
    ckpt_dir.mkdir()
    ckpt = save_tiny_checkpoint(model, ckpt_dir / "tiny-sdxl.safetensors")
    write_tiny_sdxl_yaml(ckpt_dir / "tiny-sdxl.yaml", "openai/clip-vit-large-patch14")
    shim = {"scripts/register_arch.py": OPEN_CLIP_ARCH_SCRIPT,
            **{f"open_clip_configs/{f.name}": f.read_text() for f in (build / "open_clip_configs").glob("*.json")}}
    shutil.rmtree(build)
    shims = {"sdtrain-test-open-clip-arch": shim}
    if HOST.model_stack == "ldm_patched":  # the same checkpoint and yaml, its shapes registered with the detector
        from ldm_patched_tiny import tiny_sdxl_shim

        shims["sdtrain-test-tiny-sdxl"] = tiny_sdxl_shim(ckpt_dir, webui_assets["clip_dir"])
    return {**webui_assets, "ckpt": ckpt, "shims": shims, "settings": {"live_previews_enable": False}}


@pytest.fixture(scope="session")
def inpainting_assets(webui_assets):
    """`webui_assets` with a tiny SD1 inpainting model instead (LatentInpaintDiffusion, hybrid
    conditioning, 9 UNet input channels: configs/v1-inpainting-inference.yaml at toy sizes); its CLIP
    is the one in the offline cache (768 wide, 2 layers, 12 heads)."""
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1, save_tiny_checkpoint, write_tiny_yaml

    root = webui_assets["root"]
    build = root / "build-inpainting"
    model = build_tiny_sd1(build, text_width=768, text_layers=2, text_heads=12, unet_channels=32, seed=2,
                           inpainting=True)
    ckpt_dir = root / "models-inpainting"
    ckpt_dir.mkdir()
    ckpt = save_tiny_checkpoint(model, ckpt_dir / "tiny-sd1-inpainting.safetensors")
    shims = {}
    if HOST.name == "forge":  # the same model, its shapes registered with Forge's detector
        from forge_tiny_sdxl import write_tiny_inpainting_for_forge

        ckpt.unlink()
        out = write_tiny_inpainting_for_forge(ckpt_dir, webui_assets["clip_dir"], seed=2)
        ckpt, shims = out["ckpt"], {"sdtrain-test-tiny-inpainting": out["shim"]}
    write_tiny_yaml(ckpt.with_suffix(".yaml"), text_width=768, unet_channels=32, inpainting=True)
    shutil.rmtree(build)
    return {**webui_assets, "ckpt": ckpt, "text_width": 768, "shims": shims}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    def __init__(self, assets: dict, name: str, *, settings: dict | None = None, compat: bool = False,
                 extra_args: tuple[str, ...] = (), install: bool = True, sdtrain: bool = True,
                 launch_args: tuple[str, ...] | None = None, threads: int = 1):
        """`install` (or `sdtrain`) False: the webui without sdtrain, as a user has it before installing it
        from the Extensions tab (the test-only extensions still go in). `launch_args` replace the host's
        (a GPU run drops its CPU flags); `threads`: OMP_NUM_THREADS."""
        self.dir = assets["root"] / name
        ext_dir = self.dir / "extensions"
        ext_dir.mkdir(parents=True)
        if install and sdtrain:
            shutil.copytree(assets["extension"], ext_dir / "sdtrain")
        shims = {"sdtrain-test-model-digest": {"scripts/digest.py": MODEL_DIGEST_SCRIPT},
                 "sdtrain-test-objective": {"scripts/objective.py": OBJECTIVE_SCRIPT}, **assets.get("shims", {})}
        if compat:
            shims["sdtrain-test-torch-compat"] = {"scripts/compat.py": TORCH_COMPAT_SCRIPT}
        for shim, files in shims.items():  # test-only extensions: {name: {relative path: text}}
            for rel, text in files.items():
                (ext_dir / shim / rel).parent.mkdir(parents=True, exist_ok=True)
                (ext_dir / shim / rel).write_text(text)
        settings = {**HOST.settings, **(settings or {})}  # the host's own first, the server's win
        if settings:
            (self.dir / "config.json").write_text(json.dumps(settings))
        self.embeddings = self.dir / "embeddings"
        self.hypernetworks = self.dir / "hypernetworks"
        self.embeddings.mkdir()
        self.hypernetworks.mkdir()
        self.assets, self.extra_args = assets, extra_args
        self.launch_args = HOST.launch_args if launch_args is None else launch_args
        self.threads = threads
        self.log = self.dir / "webui.log"
        self.start()

    def start(self) -> None:
        """Start the webui on its folders (again, after `stop` or `end`: a restart keeps them all, the
        data directory included); returns once it serves. Each start appends to the same log."""
        assets, extra_args = self.assets, self.extra_args
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_from = len(self.log_text()) if self.log.exists() else 0
        env = {**os.environ, "HF_HOME": str(assets["hf"]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        cmd = [_python(), "launch.py", *self.launch_args, "--api", "--port", str(self.port), "--data-dir", str(self.dir),
               "--ckpt", str(assets["ckpt"]), "--embeddings-dir", str(self.embeddings),
               "--hypernetwork-dir", str(self.hypernetworks), *extra_args]
        self._out = open(self.log, "ab")  # noqa: SIM115 — lives as long as the server
        self.proc = subprocess.Popen(cmd, cwd=WEBUI_DIR, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        # a webui starts in 25-55 s on 2 idle cores; SDTRAIN_WEBUI_START_S allows more on a busy machine
        deadline = time.time() + float(os.environ.get("SDTRAIN_WEBUI_START_S", "240"))
        while HOST.ready_line not in self.log_text()[self._log_from:]:  # an earlier request can crash start-up
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"webui did not start:\n{self.log_text()[-4000:]}")
            time.sleep(0.5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def end(self, signum: int, timeout: float = 120) -> int:
        """Send `signum` to the webui's process group, as a terminal's Ctrl-C (SIGINT), a service
        manager (SIGTERM) or the OOM killer (SIGKILL) would; returns its exit status once it is gone."""
        os.killpg(self.proc.pid, signum)
        code = self.proc.wait(timeout)
        self._out.close()
        return code

    def stop(self) -> None:
        if self._out.closed:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()

    def request(self, method: str, path: str, body=None, timeout: float = 300):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body if body is not None else {}, **kw)

    def txt2img(self, prompt: str, seed: int = 7):
        """(PIL image, infotext) of a 64x64, 4-step Euler txt2img through the host's API."""
        import base64
        import io

        from PIL import Image

        status, out = self.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 4, "width": 64, "height": 64,
                                                      "sampler_name": "Euler", "seed": seed})
        assert status == 200, out
        image = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
        return image, json.loads(out["info"])["infotexts"][0]

    def interrupt_training(self, config: dict, after_step: int = 3) -> dict:
        """Start a long train_embedding job, wait for `after_step`, check the host's progress bar shows
        it, press the host's Interrupt; returns the finished job once it has stopped within one step."""
        _, out = self.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": config})
        deadline = time.time() + 120
        while self.get(f"/sdtrain/v1/jobs/{out['id']}")[1]["step"] < after_step and time.time() < deadline:
            time.sleep(0.1)
        _, progress = self.get("/sdapi/v1/progress")
        assert progress["state"]["job"].startswith("sdtrain"), progress
        assert progress["state"]["job_count"] == config["steps"], progress
        self.post("/sdapi/v1/interrupt")
        at_interrupt = self.get(f"/sdtrain/v1/jobs/{out['id']}")[1]["step"]
        job = self.wait_job(out["id"], timeout=60)
        assert job["state"] == "stopped" and at_interrupt <= job["step"] <= at_interrupt + 1, job
        return job

    def wait_job(self, job_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, job = self.get(f"/sdtrain/v1/jobs/{job_id}")
            if job["state"] in ("done", "failed", "stopped"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s")


@pytest.fixture(scope="module")
def webui(webui_assets):
    server = WebUI(webui_assets, "sdtrain")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sd2_webui(sd2_assets):
    server = WebUI(sd2_assets, "sd2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdxl_webui(sdxl_assets):
    server = WebUI(sdxl_assets, "sdxl", settings=sdxl_assets["settings"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def inpainting_webui(inpainting_assets):
    server = WebUI(inpainting_assets, "inpainting")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stock_webui(webui_assets):
    """sdtrain installed but the host keeps its own /sdapi training routes; the stock trainer runs.

    The stock trainer needs two things on a current torch: the Sampler shim above, and
    --disable-safe-unpickle, because torch 2.13 writes `.format_version` into every .pt and the
    host's check then refuses the files the host itself just saved. (sdtrain's own files pass the
    check: the `webui` server runs without the flag and lists them.)"""
    server = WebUI(webui_assets, "stock", settings={"sdtrain_serve_host_training_routes": False}, compat=True,
                   extra_args=("--disable-safe-unpickle",))
    yield server
    server.stop()
