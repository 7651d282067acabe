"""A training run outlives the webui's end: its process killed (SIGKILL: a power cut, the OOM killer) or
shut down (SIGTERM from a service manager, SIGINT from Ctrl-C), the webui started again on the same
folders lists the jobs it had, shows the cut one as interrupted (or stopped, when a signal let it save
first), and one request resumes it from its resume point; the run ends bit-identical to one that was
never interrupted. One server, started three times on the same data directory."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from conftest import WebUI
from webui_hosts import selected

from lib_sdtrain.core.formats.embedding_io import load_embedding

HOST = selected()
STEPS = 40
pytestmark = pytest.mark.webui


@pytest.fixture(scope="module")
def restarted(webui_assets):
    server = WebUI(webui_assets, "restart")
    yield server
    server.stop()


def body(name: str, data) -> dict:
    """A run with a resume point after every step (resume_point_minutes), so a kill can land anywhere."""
    return {"embedding_name": name, "data_root": str(data), "steps": STEPS, "training_width": 64,
            "training_height": 64, "learn_rate": "0.02", "batch_size": 2, "seed": 7, "flip_p": 0.5,
            "shuffle_tags": True, "template_filename": "subject_filewords.txt", "create_image_every": 0,
            "save_embedding_every": 0, "log_directory": "ti_log", "resume_point_minutes": 0.0001}


def run_until(server: WebUI, job_id: str, step: int) -> int:
    deadline = time.time() + 180
    while time.time() < deadline:
        job = server.get(f"/sdtrain/v1/jobs/{job_id}")[1]
        assert job["state"] in ("queued", "running"), job
        if job["step"] >= step:
            return job["step"]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach step {step}")


def create(server: WebUI, name: str) -> None:
    _, out = server.post("/sdtrain/v1/jobs", {"kind": "create_embedding",
                                              "config": {"name": name, "init_text": "shape", "num_vectors_per_token": 2}})
    job = server.wait_job(out["id"])
    assert job["state"] == "done", (job, server.log_text()[-3000:])


def test_a_run_cut_by_kill_and_by_shutdown_resumes_after_restarts_and_ends_bit_identical(restarted, webui_assets):
    server, data = restarted, webui_assets["data"]
    create(server, "whole")
    create(server, "cut")
    _, ref = server.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": body("whole", data)})
    ref = server.wait_job(ref["id"])
    assert ref["state"] == "done" and ref["step"] == STEPS, ref

    # 1. SIGKILL mid-run: nothing runs at the end, the resume point on disk is all there is
    _, cut = server.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": body("cut", data)})
    at = run_until(server, cut["id"], 5)
    assert server.end(signal.SIGKILL) == -signal.SIGKILL
    point = server.embeddings / "cut.pt.resume"
    assert point.exists()
    server.start()
    jobs = {j["id"]: j for j in server.get("/sdtrain/v1/jobs")[1]}
    assert jobs[ref["id"]]["state"] == "done" and jobs[ref["id"]]["step"] == STEPS  # finished jobs stay listed
    assert jobs[cut["id"]]["state"] == "interrupted", jobs[cut["id"]]
    assert "resume it" in jobs[cut["id"]]["error"]
    status, again = server.post(f"/sdtrain/v1/jobs/{cut['id']}/resume")
    assert status == 202, again

    # 2. Ctrl-C, then SIGTERM (a service manager's stop) mid-run: the job stops as Stop does (file saved,
    # resume point kept), then the webui's own handling of the signal ends the process
    codes = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        at = run_until(server, again["id"], at + 4)
        codes[signum.name] = server.end(signum)
        log = server.log_text()
        assert f"{signum.name}: stopping running jobs" in log, log[-3000:]
        assert point.exists()
        server.start()
        jobs = {j["id"]: j for j in server.get("/sdtrain/v1/jobs")[1]}
        stopped = jobs[again["id"]]
        assert stopped["state"] == "stopped" and at <= stopped["step"] < STEPS, stopped
        assert load_embedding(server.embeddings / "cut.pt").step == stopped["step"]  # saved before the exit
        status, again = server.post(f"/sdtrain/v1/jobs/{again['id']}/resume")
        assert status == 202, again
        at = stopped["step"]
    last = server.wait_job(again["id"])
    assert last["state"] == "done" and last["step"] == STEPS, last
    assert f"resumed from step {at}" in last["message"], last

    whole, cut_file = load_embedding(server.embeddings / "whole.pt"), load_embedding(server.embeddings / "cut.pt")
    assert cut_file.step == STEPS and torch.equal(cut_file.vectors["*"], whole.vectors["*"])  # bit-identical
    assert not point.exists()
    print(f"\nrestart ({HOST.name}): SIGKILL, then {codes} (exit codes), ended at {STEPS}, bit-identical")
