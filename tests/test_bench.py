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
