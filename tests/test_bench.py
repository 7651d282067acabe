"""The benchmarks' code paths run (tiny sizes, a step or two): bench/gpu_check.sh runs the same code on a
GPU, where a broken path would only show when a GPU is lent. The numbers themselves are not tested."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sd1_hypernetwork_step_in_bf16():
    out = run("bench/ti_step.py", "--size", "A", "--kind", "hn", "--dtype", "bfloat16", "--steps", "1",
              "--warmup", "0")
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("ROW ")]
    assert [r[3] for r in rows] == ["floor", "sdtrain", "unfrozen"] and all(float(r[4]) > 0 for r in rows)


def test_sdxl_measured_path_on_the_tiny_model(sgm_dir):
    out = run("bench/ti_step.py", "--family", "sdxl", "--size", "tiny", "--sets", "fp32", "unfrozen", "--steps",
              "1", "--warmup", "0", env={"SDTRAIN_SGM_DIR": sgm_dir})
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("ROW ")]
    assert [r[3] for r in rows] == ["fp32", "unfrozen"] and all(float(r[4]) > 0 for r in rows)


def test_quality_draws_equal_vectors_once_and_tells_changed_ones_apart(tmp_path):
    """bench/quality.py draws each set of trained vectors once (every arm's start file holds the same): the
    digest must ignore an embedding's name and step, and see a change in either SDXL vector set."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    from lib_sdtrain.core.formats.embedding import Embedding
    from lib_sdtrain.core.formats.embedding_io import save_embedding_pt

    g = torch.Generator().manual_seed(0)
    vectors = {"clip_l": torch.randn(2, 768, generator=g), "clip_g": torch.randn(2, 1280, generator=g)}
    paths = {}
    for name, vec in (("a", vectors), ("b-25", vectors),
                      ("c", {**vectors, "clip_g": vectors["clip_g"] + torch.eye(2, 1280)}),
                      ("d", {**vectors, "clip_l": vectors["clip_l"] * 1.001})):
        paths[name] = tmp_path / f"{name}.pt"
        save_embedding_pt(Embedding(name, {k: v.clone() for k, v in vec.items()}, step=7), paths[name])
    digest = {name: quality.tensors_digest("ti", path) for name, path in paths.items()}
    assert digest["a"] == digest["b-25"]
    assert len({digest["a"], digest["c"], digest["d"]}) == 3


def test_random_checkpoint_streams_a_file_safetensors_reads_back(tmp_path):
    """bench/random_checkpoint.py writes its own safetensors stream (the GPU machine's SD1.5 and SDXL files):
    what it writes must be what safetensors reads — keys, shapes, dtypes, offsets — with the scaled values."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "bench"))
    import random_checkpoint as rc

    tensors = {"model.diffusion_model.out.2.weight": ((4, 320, 3, 3), torch.float32),
               "model.diffusion_model.out.0.weight": ((320,), torch.float32),  # a GroupNorm scale: ~1
               "model.diffusion_model.out.2.bias": ((4,), torch.float32),
               "conditioner.embedders.1.model.ln_final.weight": ((1280,), torch.float32),
               "conditioner.embedders.1.model.logit_scale": ((), torch.float32),
               "first_stage_model.steps": ((3,), torch.int64)}
    extra = {"alphas_cumprod": torch.linspace(0.99, 0.01, 7, dtype=torch.float64)}
    path = tmp_path / "random.safetensors"
    assert rc.write(path, tensors, extra=extra) == path.stat().st_size
    back = load_file(str(path))
    assert {k: (tuple(v.shape), v.dtype) for k, v in back.items() if k in tensors} == {
        k: (s, torch.float16 if d.is_floating_point else d) for k, (s, d) in tensors.items()}
    assert torch.equal(back["alphas_cumprod"], extra["alphas_cumprod"])
    conv = back["model.diffusion_model.out.2.weight"].float()
    assert 0.5 < conv.std().item() * (320 * 9) ** 0.5 < 1.5  # N(0, 1/fan_in)
    assert abs(back["conditioner.embedders.1.model.ln_final.weight"].float().mean().item() - 1) < 0.05
    assert all(torch.isfinite(v.float()).all() for v in back.values())
    assert not list(tmp_path.glob("*.part"))
    assert rc.check(path, tensors) == []
    wrong = {**tensors, "model.diffusion_model.out.2.bias": ((8,), torch.float32)}
    assert rc.check(path, wrong) == ["model.diffusion_model.out.2.bias: [4] != [8]"]
