"""SIGTERM or Ctrl-C during a run: the job stops as Stop does — the file saved at the step it reached,
a resume point kept — before the process ends; the same job started again finishes bit-identical to
a run that was never interrupted. (The process here is what the CLI runs: a job service with
core.jobs.signals installed.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_crash_resume import setup  # noqa: F401 — the fixture

from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.formats.torchfile import load_torch_file

REPO = Path(__file__).resolve().parents[1]
DRIVER = """
import json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from lib_sdtrain.core.jobs.service import JobService
from lib_sdtrain.core.jobs.signals import stop_jobs_on_signals
from lib_sdtrain.core.tasks.registry import job_runners
from lib_sdtrain.hosts.standalone.host import StandaloneHost
from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1

# Ctrl-C live, as in a terminal: a shell that starts this suite in the background hands its children
# SIGINT ignored, and sdtrain's handler then (rightly) leaves the process running
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
host = StandaloneHost(build_tiny_sd1(sys.argv[2], seed=0))
service = JobService(lambda: host, job_runners())
stop_jobs_on_signals(service)
job = service.submit("train_embedding", json.loads(sys.argv[1]))
last = -1
while not job.wait(0.02):
    if job.step != last:
        last = job.step
        print("step", last, flush=True)
print("state", job.state, job.step, flush=True)
"""


def job(folder: Path, data: Path) -> dict:
    return {"embedding_name": "crash", "embeddings_dir": str(folder / "emb"), "data_root": str(data),
            "log_directory": str(folder / "log"), "training_width": 64, "training_height": 64, "steps": 30,
            "learn_rate": "0.02", "batch_size": 2, "seed": 5, "flip_p": 0.5, "save_embedding_every": 0,
            "create_image_every": 0, "template_filename": "subject_filewords.txt"}


def drive(folder: Path, data: Path, signum: int | None, at_step: int = 8) -> tuple[int, str]:
    script = folder / "driver.py"
    script.write_text(DRIVER.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(job(folder, data)), str(folder / "model")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if signum is not None and line.startswith("step ") and int(line.split()[1]) >= at_step:
            proc.send_signal(signum)
            break
    lines.append(proc.stdout.read())  # the same buffered reader: lines it read ahead are kept
    proc.wait(timeout=300)
    return proc.returncode, "".join(lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_termination_signal_saves_the_run_and_it_resumes_bit_identical(setup, tmp_path, signum):  # noqa: F811
    data, initial = setup
    ref, run = tmp_path / "ref", tmp_path / "run"
    for folder in (ref, run):
        shutil.copytree(initial, folder / "emb")
    code, out = drive(ref, data, None)
    assert code == 0 and "state done 30" in out, out
    code, out = drive(run, data, signum)
    assert code != 0, out  # the signal still ends the process, after the save
    saved = load_embedding(run / "emb" / "crash.pt")
    point = load_torch_file(run / "emb" / "crash.pt.resume")
    assert 8 <= saved.step < 30 and point["step"] == saved.step, (saved.step, point["step"])
    code, out = drive(run, data, None)
    assert code == 0 and "state done 30" in out, out
    expected, got = load_embedding(ref / "emb" / "crash.pt"), load_embedding(run / "emb" / "crash.pt")
    assert torch.equal(expected.vectors["*"], got.vectors["*"])
