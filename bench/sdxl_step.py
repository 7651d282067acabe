"""Benchmark: SDXL textual inversion — step time and peak memory per option set, at real SDXL shapes.

The model is sd_xl_base.yaml's (from the webui's repositories/generative-models, or SDTRAIN_SGM_DIR)
with random weights: UNet 2.6 B, CLIP-L + CLIP-G 0.8 B, VAE 84 M parameters. Option sets:

  fp32         float32 weights
  fp16         fp16 weights, autocast (what a webui on a GPU holds)
  fp16+ckpt    + gradient checkpointing through the UNet blocks
  fp16+ckpt+vae-off   + the VAE moved off the GPU (latents are cached before training)
  unfrozen     fp16+ckpt with every weight requiring grad, as the in-tree trainer leaves the model

With `--device cuda` each set is measured: median seconds per step (text encoders with the embedding
spliced in, UNet forward, backward into the vectors, optimizer step) and the peak of
torch.cuda.max_memory_allocated. On the CPU the full model cannot run in reasonable time, so it is
*estimated*: the model is built on PyTorch's meta device (shapes, no memory, no arithmetic), one
forward runs there under a saved-tensors hook that adds up every tensor autograd keeps for the
backward pass (deduplicated by tensor), per UNet block; then

  peak ≈ weights on the device + activations kept for backward
  with checkpointing: kept = the tensors outside the checkpointed units (every residual and
                             transformer block, as the hosts checkpoint them) + each unit's inputs
                             + the largest single unit's activations (recomputed in backward)

Not counted: the CUDA context (~0.3-0.5 GB), allocator fragmentation, kernel workspaces, autocast's
float32 copies of norm/softmax outputs (the meta pass is pure fp16); treat the estimate as a lower
bound. `--size tiny` runs the measured path on the tiny SDXL anywhere (the CI smoke test of this file).

  python bench/sdxl_step.py --webui /path/to/stable-diffusion-webui            # CPU: estimate
  python bench/sdxl_step.py --webui /path/to/stable-diffusion-webui --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTION_SETS = {  # name: (dtype, gradient checkpointing, VAE off the device, weights unfrozen)
    "fp32": ("float32", False, False, False),
    "fp16": ("float16", False, False, False),
    "fp16+ckpt": ("float16", True, False, False),
    "fp16+ckpt+vae-off": ("float16", True, True, False),
    "unfrozen": ("float16", True, False, True),
}
GB = 2**30


def sdxl_config(size: str, sgm_dir: Path | None, clip_dir: Path):
    from omegaconf import OmegaConf

    from lib_sdtrain.hosts.standalone.tiny_sdxl import tiny_sdxl_config

    if size == "tiny":
        return tiny_sdxl_config(str(clip_dir))
    cfg = OmegaConf.load(sgm_dir / "configs" / "inference" / "sd_xl_base.yaml")
    params = cfg.model.params
    params.network_config.params.use_checkpoint = False  # sgm's own cannot run through frozen weights
    params.network_config.params.spatial_transformer_attn_type = "softmax"  # torch SDPA, no xformers
    params.first_stage_config.params.ddconfig.attn_type = "vanilla"
    for emb in params.conditioner_config.params.emb_models:
        if str(emb.target).endswith(".FrozenCLIPEmbedder"):
            emb.params.version = str(clip_dir)
        if str(emb.target).endswith(".FrozenOpenCLIPEmbedder2"):
            emb.params.version = None  # no pretrained download
    return cfg


def write_clip_l(directory: Path, size: str) -> Path:
    """CLIP-L's tokenizer and config (ViT-L/14 text: 768 wide, 12 layers; tiny: 2), no weights."""
    from transformers import CLIPTextConfig

    from lib_sdtrain.hosts.standalone.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

    out = write_clip_tokenizer(directory)
    CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, projection_dim=768,
                   num_hidden_layers=12 if size == "full" else 2, num_attention_heads=12,
                   max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=49407).save_pretrained(out)
    return out


def build(cfg, device: str, text_device: str | None = None):
    """The DiffusionEngine with random weights on `device` (meta: shapes only, and the text encoders
    on `text_device`: transformers' CLIP cannot run on the meta device), eval mode."""
    import torch

    from lib_sdtrain.hosts.standalone.loader import clip_text_model_from_config, skip_weight_init
    from lib_sdtrain.hosts.standalone.tiny_sdxl import instantiate_sgm

    with skip_weight_init(), clip_text_model_from_config({}, module="sgm.modules.encoders.modules"):
        model = instantiate_sgm(cfg)
    model.eval()
    text_device = text_device or device
    for part, where in ((model.model, device), (model.conditioner, text_device), (model.first_stage_model, device)):
        part.to(where)  # the denoiser's schedule stays on the CPU, readable
    for emb in model.conditioner.embedders:
        if hasattr(emb, "device"):
            emb.device = text_device
    with torch.no_grad():  # random values, finite: timing and memory do not depend on them
        gens: dict = {}
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                continue
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(0))
            if p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)  # norm scales
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def cast(model, dtype, device: str):
    """Half weights; on the CPU norm layers stay float32 (its group_norm takes no mixed dtypes)."""
    import torch

    if device == "cpu":
        for m in model.modules():
            if not isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(dtype)
        return model
    return model.to(dtype)


def part_bytes(model) -> dict[str, int]:
    parts = {"unet": model.model, "text encoders": model.conditioner, "vae": model.first_stage_model}
    return {k: sum(p.numel() * p.element_size() for p in v.parameters()) for k, v in parts.items()}


# -- measured (any device; the numbers that count come from CUDA) --------------------------------------
def measure(args, sgm_dir) -> list[tuple[str, float, float]]:
    import torch

    from lib_sdtrain.core.port import ImageSize, SessionOptions
    from lib_sdtrain.core.training.loop import autocast_context, diffusion_loss
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip_l(Path(tmp) / "clip", args.size)
        if args.size == "tiny":
            from lib_sdtrain.hosts.standalone.tiny_sdxl import register_clip_g_arch

            register_clip_g_arch(Path(tmp) / "oc")
        cfg = sdxl_config(args.size, sgm_dir, clip)
        for name in args.sets:
            dtype_name, ckpt, vae_off, unfrozen = OPTION_SETS[name]
            dtype = getattr(torch, dtype_name)
            model = cast(build(cfg, args.device), dtype, args.device)
            host = StandaloneHost(model)
            device = host.device
            side = args.resolution // 8
            g = torch.Generator().manual_seed(0)
            latents = torch.randn(args.batch, 4, side, side, generator=g).to(device)
            vectors = {k: torch.randn(2, w, generator=g).mul(0.01).to(device).requires_grad_()
                       for k, w in (("clip_l", 768), ("clip_g", 1280))}
            opt = torch.optim.AdamW(list(vectors.values()), lr=1e-3, weight_decay=0.0)
            prompts = ["a photo of benchtoken, red circle"] * args.batch
            sizes = [ImageSize.plain(args.resolution, args.resolution)] * args.batch
            half = dtype if dtype != torch.float32 else None
            times = []
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            options = SessionOptions(gradient_checkpointing=ckpt, unload_vae=vae_off)
            with host.gpu_session("bench", options), host.use_embedding("benchtoken", vectors):
                if unfrozen:
                    for p in model.parameters():
                        p.requires_grad_(True)
                for i in range(args.warmup + args.steps):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with autocast_context(device, half):
                        loss = diffusion_loss(host, host.noise_schedule(), latents, host.encode_text(prompts, sizes),
                                              generator=g)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if unfrozen:
                        for p in model.parameters():
                            p.grad = None
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")
            rows.append((name, statistics.median(times), peak))
            del model, host, opt, vectors
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# -- estimated (meta device) ---------------------------------------------------------------------------
def _efficient_attention():
    """scaled_dot_product_attention as the GPU kernels (flash / memory-efficient) keep it for backward:
    q, k, v, the output and the log-sum-exp rows, never the [tokens x tokens] matrix. The meta device
    would take the math path, which keeps that matrix and overstates memory several times."""
    import torch

    class EfficientSDPA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: the estimate makes no backward pass
            raise NotImplementedError

    def sdpa(q, k, v, *args, **kwargs):
        return EfficientSDPA.apply(q, k, v)

    return sdpa


class _Kept:
    """Bytes autograd keeps for backward, per checkpointed unit ("outside" between units), each tensor
    once; and the inputs of the units (what checkpointing keeps instead), each tensor once."""

    def __init__(self, ignore: set[int]):
        self.seen = set(ignore)
        self.current = "outside"
        self.kept: dict[str, int] = {}
        self.inputs: dict[int, int] = {}

    def pack(self, t):
        base = t if t._base is None else t._base
        if id(base) not in self.seen:
            self.seen.add(id(base))
            self.kept[self.current] = self.kept.get(self.current, 0) + base.numel() * base.element_size()
        return t

    def enter(self, i: int):
        import torch

        def pre(_m, args_, kwargs_):
            self.current = f"unit{i}"
            for a in (*args_, *kwargs_.values()):
                if isinstance(a, torch.Tensor):
                    self.inputs[id(a)] = a.numel() * a.element_size()
        return pre

    def leave(self, _m, _a, _o):
        self.current = "outside"


def estimate(args, sgm_dir) -> list[tuple[str, float, float, float]]:
    from unittest import mock

    import torch

    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = sdxl_config(args.size, sgm_dir, write_clip_l(Path(tmp) / "clip", args.size))
        model = build(cfg, "meta", text_device="cpu")
    from lib_sdtrain.hosts.standalone.host import CHECKPOINT_UNITS

    host = StandaloneHost(model)
    unet = model.model.diffusion_model
    blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINT_UNITS]  # as the host checkpoints
    for name in args.sets:
        dtype_name, ckpt, vae_off, unfrozen = OPTION_SETS[name]
        dtype = getattr(torch, dtype_name)
        for part in (model.model, model.first_stage_model):
            part.to(dtype)
        weights = part_bytes(model)
        weights["text encoders"] = weights["text encoders"] * torch.finfo(dtype).bits // 32  # kept fp32 here
        on_device = weights["unet"] + weights["text encoders"] + (0 if vae_off else weights["vae"])
        acc = _Kept({id(p) for p in model.parameters()})  # weights autograd keeps are counted as weights
        kept, inputs = acc.kept, acc.inputs
        handles = [h for i, b in enumerate(blocks)
                   for h in (b.register_forward_pre_hook(acc.enter(i), with_kwargs=True),
                             b.register_forward_hook(acc.leave))]
        side = args.resolution // 8
        vectors = {k: torch.zeros(2, w, dtype=torch.float32, requires_grad=True)
                   for k, w in (("clip_l", 768), ("clip_g", 1280))}
        try:
            with host.use_embedding("benchtoken", vectors), torch.autograd.graph.saved_tensors_hooks(acc.pack, lambda t: t), \
                    mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _efficient_attention()):
                if unfrozen:
                    for p in model.parameters():
                        p.requires_grad_(True)
                # the text encoders run for real on the CPU (float32; their activations are counted as
                # such); their output enters the meta UNet as a tensor that requires grad, as in TI
                cond = host.encode_text(["a photo of benchtoken"] * args.batch)
                cond = {k: v.detach().to("meta", dtype).requires_grad_() for k, v in cond.items()}
                x = torch.zeros(args.batch, 4, side, side, device="meta", dtype=dtype)
                model.model(x, torch.zeros(args.batch, dtype=torch.long, device="meta"), cond)
        finally:
            for h in handles:
                h.remove()
            for p in model.parameters():
                p.requires_grad_(False)
        block_kept = [v for k, v in kept.items() if k != "outside"]
        if ckpt:
            activations = kept.get("outside", 0) + sum(inputs.values()) + max(block_kept, default=0)
            print(f"  {name}: kept outside the units {kept.get('outside', 0) / GB:.2f} GB, unit inputs "
                  f"{sum(inputs.values()) / GB:.2f} GB, largest unit {max(block_kept, default=0) / GB:.2f} GB "
                  f"({len(block_kept)} units)", file=sys.stderr)
        else:
            activations = sum(kept.values())
        grads = sum(p.numel() * p.element_size() for p in model.parameters()) if unfrozen else 0  # every weight's grad
        rows.append((name, on_device / GB, (activations + grads) / GB, (on_device + activations + grads) / GB))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--webui", help="webui folder whose repositories/generative-models holds sgm")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sets", nargs="+", default=list(OPTION_SETS), choices=list(OPTION_SETS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.resolution = args.resolution or (1024 if args.size == "full" else 64)
    import torch

    from lib_sdtrain.hosts.standalone.sgm_source import ensure_sgm, sgm_dir_of

    torch.set_num_threads(args.threads)
    found = ensure_sgm(args.webui)
    sgm_dir = found or (sgm_dir_of(args.webui) if args.webui else None)
    if args.size == "full" and sgm_dir is None:
        sys.exit("--size full needs sd_xl_base.yaml: pass --webui DIR (or set SDTRAIN_SGM_DIR)")
    head = f"SDXL TI step, {args.size} size, batch {args.batch}, {args.resolution}x{args.resolution}, {args.device}"
    if args.device == "cpu" and args.size == "full":
        print(f"{head}: ESTIMATE (meta device; see this file's docstring for the method)")
        print(f"{'option set':<20} {'weights GB':>10} {'kept GB':>8} {'peak GB ≥':>10}")
        rows_e = estimate(args, sgm_dir)
        for name, w, a, total in rows_e:
            print(f"{name:<20} {w:10.2f} {a:8.2f} {total:10.2f}")
        for name, _w, _a, total in rows_e:
            print(f"ROW sdxl-{args.size}-estimate ti {name} nan {total:.2f} nan nan")
        return
    rows = measure(args, sgm_dir)
    base = {n: s for n, s, _ in rows}
    floor = base.get("fp16+ckpt+vae-off") or rows[0][1]
    print(f"{head}: MEASURED, median of {args.steps} steps")
    print(f"{'option set':<20} {'s/step':>8} {'x best':>7} {'peak GB':>8}")
    for name, s, peak in rows:
        print(f"{name:<20} {s:8.3f} {s / floor:7.2f} {peak:8.2f}")
    unfrozen = base.get("unfrozen", float("nan"))
    for name, s, peak in rows:
        print(f"ROW sdxl-{args.size} ti {name} {s:.4f} {peak:.2f} {s / floor:.2f} {s / unfrozen:.2f}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
