"""Benchmark: one textual-inversion (or hypernetwork) step — sdtrain's loop against the bare
forward+backward floor. `--family sdxl` runs bench/sdxl_step.py (real SDXL shapes) instead.

Each phase runs in its own process (so peak memory is per phase) on the same model and batch:

  floor      text encoder with the embedding spliced in + UNet forward + backward into the vectors only
  sdtrain    sdtrain's whole training step (train_embedding: batches, schedule, optimizer, events, CSV)
  unfrozen   the floor with every model weight requiring grad, as the in-tree trainer leaves the model
             (it computes UNet/CLIP weight gradients it never uses)

and prints per-step medians, the ratios to the floor, and peak memory (CUDA: max allocated; CPU:
peak RSS of the process). Ratios are only comparable inside one run.

  python bench/ti_step.py                       # tiny config B (CLIP width 768), CPU, 1 thread
  python bench/ti_step.py --size C --batch 4 --device cuda
  python bench/ti_step.py --kind hn --dtype float16 --device cuda   # hypernetwork step, fp16 weights
  python bench/ti_step.py --family sdxl --webui /path/to/webui     # SDXL: see bench/sdxl_step.py

Each run also prints machine-readable `ROW family kind phase s/step peak-GB x-floor x-unfrozen` lines,
which bench/gpu_check.sh gathers into one table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # ci-harness.md §4 configs
    "A": {"text_width": 64, "text_layers": 1, "text_heads": 2, "unet_channels": 32},
    "B": {"text_width": 768, "text_layers": 2, "text_heads": 12, "unet_channels": 32},
    "C": {"text_width": 768, "text_layers": 2, "text_heads": 12, "unet_channels": 64},
}


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _setup(args, workdir: str):
    import torch

    from lib_sdtrain.hosts.standalone.host import StandaloneHost
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1

    torch.set_num_threads(args.threads)
    model = build_tiny_sd1(workdir, seed=0, **SIZES[args.size])
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32:  # a webui on a GPU holds fp16 weights; the CPU keeps norms in float32
        for m in model.modules():
            if args.device.type == "cuda" or not isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(dtype)
    return StandaloneHost(model.to(args.device))


def _attention_widths(host) -> list[int]:
    """Every k/v input width of the UNet's attention layers: a module per width, as a user would enable."""
    unet = host.model.model.diffusion_model
    return sorted({m.in_features for name, m in unet.named_modules() if name.endswith("to_k")})


def _trained(args, host, g):
    """(live tensors, context manager that makes them take part, kind-specific reset) for --kind."""
    import torch

    if args.kind == "ti":
        info = host.describe()
        vectors = {"*": torch.randn(2, info.text_encoders[0].width, generator=g).mul(0.01).to(info.device)
                   .requires_grad_()}
        return list(vectors.values()), host.use_embedding("benchtoken", vectors)
    from lib_sdtrain.core.hypernetwork.network import Hypernetwork
    from lib_sdtrain.core.options.config import CreateHypernetworkConfig

    cfg = CreateHypernetworkConfig(name="bench")  # the host UI's defaults
    hn = Hypernetwork(name="bench", enable_sizes=_attention_widths(host), layer_structure=cfg.layer_structure_list(),
                      activation_func=cfg.activation_func, weight_init=cfg.weight_init, seed=0)
    hn.to(host.describe().device).set_multiplier(1.0).train(True)
    return hn.trainable_params(), host.use_hypernetwork([hn])


def phase_manual(args, workdir: str, unfrozen: bool) -> dict:
    """The floor (and the unfrozen variant): nothing but forward and backward."""
    import torch

    from lib_sdtrain.core.port import SessionOptions
    from lib_sdtrain.core.training.loop import autocast_context, diffusion_loss

    host = _setup(args, workdir)
    info = host.describe()
    device = info.device
    g = torch.Generator().manual_seed(0)
    side = args.resolution // 8
    latents = torch.randn(args.batch, 4, side, side, generator=g).to(device)
    params, active = _trained(args, host, g)
    prompts = ["a photo of benchtoken, red circle"] * args.batch
    schedule = host.noise_schedule()
    half = info.autocast_dtype
    times = []
    with host.gpu_session("bench", SessionOptions()), active:
        if unfrozen:
            for p in host.model.parameters():
                p.requires_grad_(True)
        for i in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast_context(device, half):
                if args.kind == "hn":
                    with torch.no_grad():
                        cond = host.encode_text(prompts)
                else:
                    cond = host.encode_text(prompts)
                loss = diffusion_loss(host, schedule, latents, cond, generator=g)
            loss.backward()
            for p in params:
                p.grad = None
            if unfrozen:
                for p in host.model.parameters():
                    p.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_mb": _peak_mb(device)}


def phase_sdtrain(args, workdir: str) -> dict:
    """sdtrain's own trainer, timed from its step events (latent caching excluded)."""
    from lib_sdtrain.core.data.samples import write_sample_dataset
    from lib_sdtrain.core.jobs.service import Job, JobControl
    from lib_sdtrain.core.options.config import (
        CreateEmbeddingConfig,
        CreateHypernetworkConfig,
        TrainEmbeddingConfig,
        TrainHypernetworkConfig,
    )
    from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
    from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding

    host = _setup(args, workdir)
    data = write_sample_dataset(Path(workdir) / "data", count=max(8, args.batch * 2), size=args.resolution)
    emb_dir = str(Path(workdir) / "embeddings")
    if args.kind == "ti":
        create_embedding(host, CreateEmbeddingConfig(name="benchtoken", num_vectors_per_token=2,
                                                     embeddings_dir=emb_dir))
    else:
        create_hypernetwork(host, CreateHypernetworkConfig(name="benchtoken", enable_sizes=tuple(_attention_widths(host)),
                                                           hypernetwork_dir=emb_dir))
    stamps: list[float] = []

    class Clock(JobControl):
        def emit(self, kind, **data):
            if kind == "step":
                if host.describe().device.type == "cuda":
                    import torch

                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

    control = Clock(Job(id="bench", kind="train_embedding", config=CreateEmbeddingConfig(name="x")))
    common = {
        "data_root": str(data), "log_directory": str(Path(workdir) / "log"), "steps": args.warmup + args.steps + 1,
        "batch_size": args.batch, "training_width": args.resolution, "training_height": args.resolution,
        "create_image_every": 0, "training_write_csv_every": 1, "seed": 0,
    }
    if args.kind == "ti":
        train_embedding(host, TrainEmbeddingConfig.from_dict({
            **common, "embedding_name": "benchtoken", "embeddings_dir": emb_dir,
            "template_filename": "subject_filewords.txt", "save_embedding_every": 0}), control)
    else:
        train_hypernetwork(host, TrainHypernetworkConfig.from_dict({
            **common, "hypernetwork_name": "benchtoken", "hypernetwork_dir": emb_dir,
            "template_filename": "style_filewords.txt", "save_hypernetwork_every": 0}), control)
    deltas = [b - a for a, b in itertools.pairwise(stamps)][args.warmup:]
    return {"step_s": statistics.median(deltas), "peak_mb": _peak_mb(host.describe().device)}


def run_phase(args) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        if args.phase == "sdtrain":
            out = phase_sdtrain(args, workdir)
        else:
            out = phase_manual(args, workdir, unfrozen=args.phase == "unfrozen")
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="B")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--phase", choices=("floor", "sdtrain", "unfrozen"))
    p.add_argument("--kind", choices=("ti", "hn"), default="ti", help="textual inversion or hypernetwork")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="model weights (half: trained under autocast, as a webui on a GPU)")
    p.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                   help="sdxl: real SDXL shapes, see bench/sdxl_step.py (its own options follow)")
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--family", default="sd1")
    known, rest = family.parse_known_args()
    if known.family == "sdxl":  # every other option is sdxl_step.py's
        import runpy

        sys.argv = [str(Path(__file__).with_name("sdxl_step.py")), *rest]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    args = p.parse_args()
    if args.phase:
        import torch

        args.device = torch.device(args.device)
        run_phase(args)
        return
    results = {}
    for phase in ("floor", "sdtrain", "unfrozen"):
        cmd = [sys.executable, __file__, "--phase", phase] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "phase"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
        results[phase] = json.loads(line[-1][7:])
    floor, unfrozen = results["floor"]["step_s"], results["unfrozen"]["step_s"]
    print(f"{args.kind.upper()} step, tiny config {args.size} {SIZES[args.size]}, {args.dtype}, batch {args.batch}, "
          f"{args.resolution}x{args.resolution}, {args.device}, {args.threads} thread(s), median of {args.steps}")
    print(f"{'phase':<10} {'ms/step':>9} {'x floor':>8} {'peak MB':>9}")
    for phase, r in results.items():
        print(f"{phase:<10} {r['step_s'] * 1000:9.1f} {r['step_s'] / floor:8.2f} {r['peak_mb']:9.0f}")
    for phase, r in results.items():
        print(f"ROW sd1-{args.size}-{args.dtype} {args.kind} {phase} {r['step_s']:.4f} {r['peak_mb'] / 1024:.2f} "
              f"{r['step_s'] / floor:.2f} {r['step_s'] / unfrozen:.2f}")


if __name__ == "__main__":
    main()
