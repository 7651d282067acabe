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
