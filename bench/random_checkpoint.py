"""A randomly initialised SD1.5 or SDXL checkpoint at its real shapes, written fast and in little memory.

For benchmarks on machines that have no real checkpoint and cannot download one (the lent GPU machines):
the webui loads the file as any checkpoint of its family. The shapes come from the webui's own model code
and configs, never from a table: ldm's UNet and VAE with configs/v1-inference.yaml (SD1.5), sgm's with
generative-models' configs/inference/sd_xl_base.yaml (SDXL), the 12-layer 768-wide CLIP-L text model
(transformers) and, for SDXL, open_clip's ViT-bigG-14 text tower. Each model is built on the meta device
(no memory), then every tensor is drawn and written one at a time into a safetensors file (fp16): the
peak memory is the largest tensor (~130 MB), and on a GPU the drawing is free (SDXL: 6.9 GB in seconds,
then the disk's speed). The values are scaled so that activations stay O(1) in fp16 (weights
N(0, 1/fan_in), norms' scales near 1, biases small): a training step computes what it would on a real
model, at the same cost; the pictures are noise.

  python bench/random_checkpoint.py sdxl OUT.safetensors --webui WEBUI [--clip-dir DIR] [--device cuda]
  python bench/random_checkpoint.py sd15 OUT.safetensors --webui WEBUI --dry-run   # shapes and size only

`--clip-dir` also gets CLIP-L's config.json (the webui builds its text encoder from it, offline).
`--check` reads a written file's header back and compares it with the model code's shapes (no weights
loaded): the rehearsal of an SDXL file on a machine that cannot hold it in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
          "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
          "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def _webui_paths(webui: Path) -> None:
    for repo in ("stable-diffusion-stability-ai", "generative-models"):
        path = webui / "repositories" / repo
        if path.is_dir() and str(path) not in sys.path:
            sys.path.append(str(path))


def _on_meta(make) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        module = make()
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def _clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**CLIP_L))


def skeleton(family: str, webui: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the checkpoint: key -> (shape, dtype), in the original (ldm / sgm) key layout."""
    from omegaconf import OmegaConf

    _webui_paths(webui)
    out: dict = {}
    if family == "sd15":
        from ldm.util import instantiate_from_config

        cfg = OmegaConf.load(webui / "configs" / "v1-inference.yaml").model.params
        cfg.unet_config.params.use_checkpoint = False
        parts = (("model.diffusion_model.", lambda: instantiate_from_config(cfg.unet_config)),
                 ("first_stage_model.", lambda: instantiate_from_config(cfg.first_stage_config)),
                 ("cond_stage_model.transformer.", _clip_l))
    else:
        import open_clip
        from sgm.util import instantiate_from_config

        cfg = OmegaConf.load(webui / "repositories" / "generative-models" / "configs" / "inference" /
                             "sd_xl_base.yaml").model.params
        cfg.network_config.params.use_checkpoint = False
        arch = cfg.conditioner_config.params.emb_models[1].params.arch

        def text_tower():
            model = open_clip.model.CLIP(**open_clip.get_model_config(arch))
            del model.visual
            return model

        parts = (("model.diffusion_model.", lambda: instantiate_from_config(cfg.network_config)),
                 ("first_stage_model.", lambda: instantiate_from_config(cfg.first_stage_config)),
                 ("conditioner.embedders.0.transformer.", _clip_l),
                 ("conditioner.embedders.1.model.", text_tower))
    for prefix, make in parts:
        out.update({prefix + k: v for k, v in _on_meta(make).items() if "position_ids" not in k})
    return out


def _schedule() -> dict[str, torch.Tensor]:
    """LatentDiffusion's registered noise schedule (linear 0.00085 .. 0.012, 1000 steps), as SD1 files hold it."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0)
    return {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])}


def _scale(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's values: weights N(0, 1/fan_in); norms' scales ~1; other vectors small."""
    name = key.rsplit(".", 1)[-1]
    if len(shape) >= 2:
        return 0.0, 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    if name == "weight" and any(n in key for n in ("norm", "ln_")):
        return 1.0, 0.1
    if key.endswith("logit_scale"):
        return math.log(1 / 0.07), 0.0
    return 0.0, 0.02


_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def write(path: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], *, device: str = "cpu",
          seed: int = 0, extra: dict[str, torch.Tensor] | None = None) -> int:
    """Stream a safetensors file: the header, then each tensor drawn on `device` and written at once.
    Floating tensors are written as fp16 (the webui's own format on a GPU). Atomic: a temporary file,
    renamed at the end. Returns the bytes written."""
    extra = extra or {}
    plan = []
    offset = 0
    for key in sorted(tensors):
        shape, dtype = tensors[key]
        dtype = torch.float16 if dtype.is_floating_point else dtype
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        plan.append((key, shape, dtype, offset, offset + nbytes))
        offset += nbytes
    for key, value in extra.items():
        value = value.contiguous()
        nbytes = value.numel() * value.element_size()
        plan.append((key, tuple(value.shape), value.dtype, offset, offset + nbytes))
        offset += nbytes
    header = {k: {"dtype": _DTYPES[d], "shape": list(s), "data_offsets": [a, b]} for k, s, d, a, b in plan}
    header["__metadata__"] = {"format": "pt", "sdtrain": "random weights at real shapes (bench/random_checkpoint.py)"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator(device=device).manual_seed(seed)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype, _a, _b in plan:
            if key in extra:
                value = extra[key].contiguous()
            elif dtype.is_floating_point:
                mean, std = _scale(key, shape)
                value = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std).add_(mean)
                value = value.to(dtype)
            else:
                value = torch.zeros(shape, dtype=dtype)
            f.write(value.cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return 8 + len(blob) + offset


def check(path: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """Differences between a written file's header and the model code's tensors (empty: they agree)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    problems = [f"missing {k}" for k in tensors if k not in header]
    problems += [f"{k}: {header[k]['shape']} != {list(s)}" for k, (s, _) in tensors.items()
                 if k in header and header[k]["shape"] != list(s)]
    return problems


def write_clip_files(clip_dir: Path) -> None:
    """CLIP-L's text config (and the generated tokenizer files, if absent) for the offline HF cache."""
    from transformers import CLIPTextConfig

    clip_dir.mkdir(parents=True, exist_ok=True)
    CLIPTextConfig(**CLIP_L).save_pretrained(clip_dir)
    if not (clip_dir / "vocab.json").exists():
        sys.path.insert(0, str(ROOT))
        from lib_sdtrain.hosts.standalone.tokenizer import write_clip_tokenizer

        write_clip_tokenizer(clip_dir)


def make(family: str, out: Path, webui: Path, *, device: str = "cpu", clip_dir: Path | None = None,
         dry_run: bool = False, seed: int = 0) -> dict:
    started = time.time()
    tensors = skeleton(family, webui)
    extra = _schedule() if family == "sd15" else {}
    size = sum(math.prod(s) * (2 if d.is_floating_point else torch.empty((), dtype=d).element_size())
               for s, d in tensors.values())
    info = {"family": family, "tensors": len(tensors), "params": sum(math.prod(s) for s, _ in tensors.values()),
            "gib": size / 2**30}
    if clip_dir is not None:
        write_clip_files(clip_dir)
    if not dry_run:
        write(out, tensors, device=device, seed=seed, extra=extra)
        info["written"] = str(out)
    info["seconds"] = round(time.time() - started, 1)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=("sd15", "sdxl"))
    p.add_argument("out", type=Path)
    p.add_argument("--webui", type=Path, default=Path(os.environ.get("SDTRAIN_WEBUI_DIR", ".")),
                   help="the webui whose model code and configs give the shapes (its repositories/ hold ldm, sgm)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where values are drawn")
    p.add_argument("--clip-dir", type=Path, help="also write CLIP-L's config.json (and tokenizer) here")
    p.add_argument("--dry-run", action="store_true", help="build the shapes, print the size, write nothing")
    p.add_argument("--check", action="store_true", help="compare an existing OUT's header with the shapes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.check:
        problems = check(args.out, skeleton(args.family, args.webui))
        print(f"[random_checkpoint] {args.out}: " + ("matches the model code" if not problems else
                                                     f"{len(problems)} differences: {problems[:5]}"))
        return 1 if problems else 0
    info = make(args.family, args.out, args.webui, device=args.device, clip_dir=args.clip_dir,
                dry_run=args.dry_run, seed=args.seed)
    print(f"[random_checkpoint] {info['family']}: {info['tensors']} tensors, {info['params'] / 1e9:.2f} B values, "
          f"{info['gib']:.2f} GiB fp16" + (f" -> {info['written']}" if "written" in info else " (dry run)") +
          f" in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
