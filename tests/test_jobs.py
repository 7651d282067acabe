"""The job service: validation before work, one worker in order, stop, failures, events."""

from __future__ import annotations

import threading
import time

import pytest

from lib_sdtrain.core.errors import ConfigError, SdtrainError
from lib_sdtrain.core.jobs.service import DONE, FAILED, QUEUED, RUNNING, STOPPED, JobService
from lib_sdtrain.core.options.config import CreateEmbeddingConfig


def make_service(runner, host=None):
    calls = []

    def host_factory():
        calls.append(1)
        return host

    return JobService(host_factory, {"create_embedding": (CreateEmbeddingConfig, runner)}), calls


def test_bad_field_is_refused_before_a_job_or_the_host_exists():
    ran = []
    svc, host_calls = make_service(lambda h, c, ctl: ran.append(c))
    with pytest.raises(ConfigError) as e:
        svc.submit("create_embedding", {"name": "x", "num_vectors_per_token": 0})
    assert e.value.field == "num_vectors_per_token"
    with pytest.raises(ConfigError) as e:
        svc.submit("create_embedding", {"name": "x", "bogus": 1})
    assert e.value.field == "bogus"
    with pytest.raises(ConfigError) as e:
        svc.submit("nope", {})
    assert e.value.field == "kind"
    assert svc.list() == [] and ran == [] and host_calls == []


def test_jobs_run_one_at_a_time_in_order():
    active, order, overlap = [], [], []
    lock = threading.Lock()

    def runner(host, cfg, control):
        with lock:
            active.append(cfg.name)
            if len(active) > 1:
                overlap.append(tuple(active))
        time.sleep(0.05)
        control.emit("step", step=1, total=1, loss=0.5, lr=0.1)
        with lock:
            active.remove(cfg.name)
            order.append(cfg.name)
        return cfg.name

    svc, _ = make_service(runner)
    jobs = [svc.submit("create_embedding", {"name": f"e{i}"}) for i in range(4)]
    for j in jobs:
        assert j.wait(10)
    assert order == ["e0", "e1", "e2", "e3"] and overlap == []
    assert [j.state for j in jobs] == [DONE] * 4
    assert jobs[0].result == "e0" and jobs[0].loss == [(1, 0.5, 0.1)]
    assert [e.data["state"] for e in jobs[0].events if e.kind == "state"] == [QUEUED, RUNNING, DONE]
    svc.shutdown()


def test_stop_running_and_queued_jobs():
    started = threading.Event()

    def runner(host, cfg, control):
        started.set()
        for step in range(1, 1000):
            if control.stop_requested:
                return step
            control.emit("step", step=step, total=1000, loss=1.0, lr=0.1)
            time.sleep(0.005)
        return 1000

    svc, _ = make_service(runner)
    first = svc.submit("create_embedding", {"name": "a"})
    second = svc.submit("create_embedding", {"name": "b"})
    assert started.wait(5)
    svc.stop(second.id)
    assert second.state == STOPPED  # never ran
    svc.stop(first.id)
    assert first.wait(5)
    assert first.state == STOPPED and first.result < 1000
    assert second.result is None and second.started is None
    assert svc.stop("missing") is None
    svc.shutdown()


def test_failures_are_reported_and_the_worker_survives():
    def runner(host, cfg, control):
        if cfg.name == "bad":
            raise SdtrainError("the dataset folder is empty")
        if cfg.name == "crash":
            raise RuntimeError("boom")
        return "ok"

    svc, _ = make_service(runner)
    bad = svc.run("create_embedding", {"name": "bad"}, timeout=5)
    crash = svc.run("create_embedding", {"name": "crash"}, timeout=5)
    good = svc.run("create_embedding", {"name": "good"}, timeout=5)
    assert (bad.state, bad.error) == (FAILED, "the dataset folder is empty")
    assert crash.state == FAILED and "RuntimeError: boom" in crash.error
    assert good.state == DONE and good.result == "ok"
    d = crash.to_dict()
    assert d["state"] == "failed" and d["config"]["name"] == "crash" and "loss_history" in d
    svc.shutdown()
    with pytest.raises(SdtrainError):
        svc.submit("create_embedding", {"name": "late"})


def test_the_job_list_survives_the_process_and_interrupted_jobs_resume(tmp_path):
    """With a store, finished jobs are listed again by the next process's service; a job that was
    running when the process ended shows as interrupted (with the step it was at) and is resumed by
    submitting it again with its settings; a finished or unknown job cannot be resumed."""
    from lib_sdtrain.core.jobs.service import INTERRUPTED

    store = str(tmp_path / "sdtrain" / "jobs.json")
    release = threading.Event()

    def runner(host, cfg, control):
        control.emit("step", step=3, total=10, loss=1.0, lr=0.1)
        release.wait(10)
        return f"made {cfg.name}"

    first = JobService(lambda: None, {"create_embedding": (CreateEmbeddingConfig, runner)}, store=store)
    first.STORE_EVERY = 0.0
    done = first.submit("create_embedding", {"name": "finished"})
    release.set()
    done.wait(10)
    release.clear()
    cut = first.submit("create_embedding", {"name": "cut", "num_vectors_per_token": 3})
    deadline = time.time() + 10
    while cut.step != 3 and time.time() < deadline:
        time.sleep(0.01)
    # the process "dies" here: a new service reads the list the first one kept
    second = JobService(lambda: None, {"create_embedding": (CreateEmbeddingConfig, runner)}, store=store)
    listed = {j.id: j for j in second.list()}
    assert listed[done.id].state == DONE and listed[done.id].config.name == "finished"
    assert listed[cut.id].state == INTERRUPTED and listed[cut.id].step == 3
    assert "resume it to continue" in listed[cut.id].error
    release.set()
    again = second.resume(cut.id)
    assert again.id != cut.id and again.config.name == "cut" and again.config.num_vectors_per_token == 3
    assert again.wait(10) and again.state == DONE
    with pytest.raises(SdtrainError, match="only a stopped, failed or interrupted job"):
        second.resume(done.id)
    with pytest.raises(SdtrainError, match="no job"):
        second.resume("nope")
    first.shutdown()
    second.shutdown()
