"""Benchmark: one textual-inversion step — sdtrain's loop against the bare forward+backward floor.

Each phase runs in its own process (so peak memory is per phase) on the same model and batch:

  floor      text encoder with the embedding spliced in + UNet forward + backward into the vectors only
  sdtrain    sdtrain's whole training step (train_embedding: batches, schedule, optimizer, events, CSV)
  unfrozen   the floor with every model weight requiring grad, as the in-tree trainer leaves the model
             (it computes UNet/CLIP weight gradients it never uses)

and prints per-step medians, the ratios to the floor, and peak memory (CUDA: max allocated; CPU:
peak RSS of the process). Ratios are only comparable inside one run.

  python bench/ti_step.py                       # tiny config B (CLIP width 768), CPU, 1 thread
  python bench/ti_step.py --size C --batch 4 --device cuda
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
    model = build_tiny_sd1(workdir, seed=0, **SIZES[args.size]).to(args.device)
    return StandaloneHost(model)


def phase_manual(args, workdir: str, unfrozen: bool) -> dict:
    """The floor (and the unfrozen variant): nothing but forward and backward."""
    import torch

    from lib_sdtrain.core.port import SessionOptions
    from lib_sdtrain.core.training.loop import diffusion_loss

    host = _setup(args, workdir)
    info = host.describe()
    device = info.device
    g = torch.Generator().manual_seed(0)
    side = args.resolution // 8
    latents = torch.randn(args.batch, 4, side, side, generator=g).to(device)
    vectors = {"*": torch.randn(2, info.text_encoders[0].width, generator=g).mul(0.01).to(device).requires_grad_()}
    prompts = ["a photo of benchtoken, red circle"] * args.batch
    schedule = host.noise_schedule()
    times = []
    with host.gpu_session("bench", SessionOptions()), host.use_embedding("benchtoken", vectors):
        if unfrozen:
            for p in host.model.parameters():
                p.requires_grad_(True)
        for i in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = diffusion_loss(host, schedule, latents, host.encode_text(prompts), generator=g)
            loss.backward()
            vectors["*"].grad = None
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
    from lib_sdtrain.core.options.config import CreateEmbeddingConfig, TrainEmbeddingConfig
    from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding

    host = _setup(args, workdir)
    data = write_sample_dataset(Path(workdir) / "data", count=max(8, args.batch * 2), size=args.resolution)
    emb_dir = str(Path(workdir) / "embeddings")
    create_embedding(host, CreateEmbeddingConfig(name="benchtoken", num_vectors_per_token=2,
                                                 embeddings_dir=emb_dir))
    stamps: list[float] = []

    class Clock(JobControl):
        def emit(self, kind, **data):
            if kind == "step":
                if host.describe().device.type == "cuda":
                    import torch

                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

    control = Clock(Job(id="bench", kind="train_embedding", config=CreateEmbeddingConfig(name="x")))
    cfg = TrainEmbeddingConfig.from_dict({
        "embedding_name": "benchtoken", "embeddings_dir": emb_dir, "data_root": str(data),
        "log_directory": str(Path(workdir) / "log"), "steps": args.warmup + args.steps + 1,
        "batch_size": args.batch, "training_width": args.resolution, "training_height": args.resolution,
        "template_filename": "subject_filewords.txt", "save_embedding_every": 0, "create_image_every": 0,
        "training_write_csv_every": 1, "seed": 0,
    })
    train_embedding(host, cfg, control)
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
    floor = results["floor"]["step_s"]
    print(f"TI step, tiny config {args.size} {SIZES[args.size]}, batch {args.batch}, "
          f"{args.resolution}x{args.resolution}, {args.device}, {args.threads} thread(s), median of {args.steps}")
    print(f"{'phase':<10} {'ms/step':>9} {'x floor':>8} {'peak MB':>9}")
    for phase, r in results.items():
        print(f"{phase:<10} {r['step_s'] * 1000:9.1f} {r['step_s'] / floor:8.2f} {r['peak_mb']:9.0f}")


if __name__ == "__main__":
    main()
