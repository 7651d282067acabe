"""A training process killed (SIGKILL) at random moments, again and again over one run, and started again
each time with the same command, ends with exactly the tensors of a run that was never interrupted;
after every kill the files on disk load (none is torn). The resume points (core/training/resume.py) carry
the trained tensors, optimizer, step and every random state; the run uses all the random paths: shuffled
epochs, flips, tag shuffling, "random" latent sampling, gradient accumulation."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.formats.embedding_io import load_embedding, load_optim
from lib_sdtrain.core.formats.torchfile import load_torch_file
from lib_sdtrain.core.options.config import CreateEmbeddingConfig
from lib_sdtrain.core.tasks.textual_inversion import create_embedding
from lib_sdtrain.hosts.standalone.host import StandaloneHost

REPO = Path(__file__).resolve().parents[1]
STEPS = 60

DRIVER = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from lib_sdtrain.core.jobs.service import Job, JobControl
from lib_sdtrain.core.options.config import TrainEmbeddingConfig
from lib_sdtrain.core.tasks.textual_inversion import train_embedding
from lib_sdtrain.hosts.standalone.host import StandaloneHost
from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1

class Printer(JobControl):
    def emit(self, kind, **data):
        if kind in ("log", "step"):
            print(kind, json.dumps(data, default=str), flush=True)

cfg = TrainEmbeddingConfig.from_dict(json.loads(sys.argv[1]))
host = StandaloneHost(build_tiny_sd1(sys.argv[2], seed=0))
print("ready", flush=True)
result = train_embedding(host, cfg, Printer(Job(id="k", kind="train_embedding", config=cfg)))
print("result", result.step, flush=True)
"""


def run_driver(workdir: Path, cfg: dict, kill_after: float | None) -> tuple[int | None, str, float]:
    """Start the training process; with `kill_after`, SIGKILL it that many seconds after it is ready.
    Returns (exit code, or None when it was killed; its output; seconds from ready to its end)."""
    script = workdir / "driver.py"
    script.write_text(DRIVER.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg), str(workdir / "model")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready_seen = threading.Event()

    def read_all() -> None:  # one reader for the whole output: lines read ahead with "ready" are never lost
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                ready_seen.set()
        ready_seen.set()

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    ready_seen.wait(timeout=600)  # until the model is built
    ready = time.monotonic()
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=600)
    reader.join(timeout=60)
    out = "".join(lines)
    killed = proc.returncode == -signal.SIGKILL
    return (None if killed else proc.returncode), out, time.monotonic() - ready


@pytest.fixture
def setup(tmp_path, tiny_sd1):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=2)
    initial = tmp_path / "initial"
    create_embedding(StandaloneHost(tiny_sd1), CreateEmbeddingConfig.from_dict(
        {"name": "crash", "num_vectors_per_token": 2, "init_text": "shape", "embeddings_dir": str(initial)}))
    return data, initial


def job(folder: Path, data: Path) -> dict:
    return {"embedding_name": "crash", "embeddings_dir": str(folder / "emb"), "data_root": str(data),
            "log_directory": str(folder / "log"), "training_width": 64, "training_height": 64, "steps": STEPS,
            "learn_rate": "0.02", "batch_size": 2, "gradient_step": 2, "seed": 11, "flip_p": 0.5,
            "shuffle_tags": True, "latent_sampling_method": "random", "save_embedding_every": 0,
            "create_image_every": 0, "template_filename": "subject_filewords.txt",
            "resume_point_minutes": 0.0001}  # a resume point after every step


def test_killed_again_and_again_then_resumed_ends_bit_identical(setup, tmp_path):
    data, initial = setup
    reference = tmp_path / "reference"
    shutil.copytree(initial, reference / "emb")
    code, out, uninterrupted = run_driver(reference, job(reference, data), None)
    assert code == 0 and f"result {STEPS}" in out, out
    expected = load_embedding(reference / "emb" / "crash.pt")

    crashed = tmp_path / "crashed"
    shutil.copytree(initial, crashed / "emb")
    rng = random.Random(1234)
    kills = resumes = torn = 0
    main_file, point = crashed / "emb" / "crash.pt", crashed / "emb" / "crash.pt.resume"
    for _ in range(10):  # kills anywhere from set-up to the last steps, saves included
        code, out, _ = run_driver(crashed, job(crashed, data), rng.uniform(0.0, 0.15 * uninterrupted))
        resumes += "resumed from step" in out
        if code is not None:  # it finished before the kill
            break
        kills += 1
        for path, load in ((main_file, load_embedding), (point, load_torch_file)):
            if path.exists():
                try:
                    load(path)
                except Exception:
                    torn += 1
    code, out, _ = run_driver(crashed, job(crashed, data), None)  # and to the end
    resumes += "resumed from step" in out
    assert code == 0 and f"result {STEPS}" in out, out
    final = load_embedding(main_file)
    print(f"\ncrash-resume: {kills} kills, {resumes} resumes, torn files {torn}")
    assert kills >= 6 and resumes >= 3 and torn == 0
    assert final.step == STEPS and torch.equal(final.vectors["*"], expected.vectors["*"])  # bit-identical
    ref_state = load_optim(reference / "emb" / "crash.pt", expected.checksum())["optimizer_state_dict"]["state"]
    got_state = load_optim(main_file, final.checksum())["optimizer_state_dict"]["state"]
    assert all(torch.equal(ref_state[k][m], got_state[k][m]) for k in ref_state for m in ("exp_avg", "exp_avg_sq"))
    assert not point.exists()  # a finished run leaves no resume point
