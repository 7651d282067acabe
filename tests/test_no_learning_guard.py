"""The no-learning guard (core.training.watchdog): runs that cannot learn are warned about early, in the
job's status, the log and the job record; healthy runs stay quiet.

The component on synthetic inputs first, then sabotaged and healthy runs of the SD1 toy world through the
job service (short runs: the movement check is at step 20)."""

from __future__ import annotations

import logging

import pytest
import torch

from lib_sdtrain.core.jobs.service import DONE, JobService
from lib_sdtrain.core.options.config import CreateEmbeddingConfig
from lib_sdtrain.core.options.lr_schedule import make_schedule
from lib_sdtrain.core.training import watchdog
from lib_sdtrain.core.training.watchdog import LearningWatch, Subject, schedule_warnings
from lib_sdtrain.toyworld import concept, models

SUBJECT = Subject("embedding", "the embedding's vectors", "Embedding Learning rate", "check the template.")


# -- the component ------------------------------------------------------------------------------------
def _rates(text, steps=100, kind="dsl", **kw):
    return make_schedule(kind, text, steps, **kw).value


def test_a_rate_of_zero_is_warned_about_before_the_run():
    (w,) = schedule_warnings(SUBJECT, 0, 100, _rates("0"), "0")
    assert w.code == "zero_rate" and "for the whole run" in w.text and "Embedding Learning rate" in w.text
    (w,) = schedule_warnings(SUBJECT, 0, 100, _rates("0.005:60, 0"), "0.005:60, 0")
    assert w.code == "zero_later" and "from step 60 on" in w.text
    (w,) = schedule_warnings(SUBJECT, 0, 100, _rates("0.005"), "0.005", _rates("0"), "0")
    assert "gradient clip value is 0" in w.text and "Gradient Clipping" in w.text
    # a resumed run looks from its own step on
    assert schedule_warnings(SUBJECT, 70, 100, _rates("0.005:60, 0"), "")[0].code == "zero_rate"


def test_healthy_schedules_are_not_warned_about():
    assert schedule_warnings(SUBJECT, 0, 100, _rates("0.005"), "0.005") == []
    assert schedule_warnings(SUBJECT, 0, 100, _rates("1e-8:10, 0.005"), "") == []  # zero nowhere
    # a cosine schedule down to 0 is 0 at its last step at most, and a warm-up starts near 0
    cosine = _rates(0.005, kind="cosine", warmup_steps=10)
    assert schedule_warnings(SUBJECT, 0, 100, cosine, "0.005") == []
    # the last few steps at 0 are under ZERO_SHARE of the run
    assert schedule_warnings(SUBJECT, 0, 100, _rates("0.005:98, 0"), "") == []


def test_a_norm_limit_too_small_to_learn_is_warned_about():
    w = watchdog.norm_limit_warning(SUBJECT, 0.02, 0)
    assert w.code == "norm_limit" and "0.02" in w.text and "Set the norm limit to 1-2" in w.text
    assert watchdog.norm_limit_warning(SUBJECT, 0.0, 0) is None  # off
    assert watchdog.norm_limit_warning(SUBJECT, watchdog.MIN_NORM_LIMIT, 0) is None
    assert watchdog.norm_limit_warning(SUBJECT, 1.5, 0) is None


def _param(value=1.0, n=8):
    return torch.full((n,), value, requires_grad=True)


def _feed(watch, p, steps, *, grad=1.0, move=0.0, clipped_away=False, lr=0.005):
    """Optimizer steps as the loop makes them: gradient, the watch's looks around clipping, the update."""
    found = []
    for step in range(watch.start + 1, watch.start + steps + 1):
        p.grad = None if grad is None else torch.full_like(p, grad)
        found.append(watch.around_clip(step, (lambda: p.grad.zero_()) if clipped_away else None))
        with torch.no_grad():
            p.add_(move)
        found.append(watch.after_step(step, lr))
    return [w for w in found if w is not None]


def test_no_gradient_is_found_in_the_first_steps():
    p = _param()
    watch = LearningWatch(SUBJECT, [p], 0, 100)
    (w,) = _feed(watch, p, 25, grad=None, move=0.0)
    assert (w.code, w.step) == ("no_gradient", watchdog.GRADIENT_STEPS)
    assert "received no gradient" in w.text and "check the template" in w.text
    p = _param()
    (w,) = _feed(LearningWatch(SUBJECT, [p], 0, 100), p, 25, grad=0.0)  # zeros, not None: the same
    assert w.code == "no_gradient"


def test_a_clip_value_of_zero_is_found_at_step_one():
    p = _param()
    (w,) = _feed(LearningWatch(SUBJECT, [p], 0, 100), p, 25, clipped_away=True)
    assert (w.code, w.step) == ("clipped", 1) and "clip value is 0" in w.text


def test_tensors_that_do_not_move_are_found_at_the_check_step():
    p = _param()
    (w,) = _feed(LearningWatch(SUBJECT, [p], 0, 100), p, 30, move=1e-7, lr=1e-9)
    assert (w.code, w.step) == ("not_moving", watchdog.CHECK_AFTER)
    assert "have not moved after 20 steps" in w.text and "1e-09" in w.text and "Embedding Learning rate" in w.text
    p = _param()
    (w,) = _feed(LearningWatch(SUBJECT, [p], 0, 100), p, 30, lr=0.0)
    assert "the learning rate is 0" in w.text
    # after a warm-up, and counted from a resumed run's step
    p = _param()
    (w,) = _feed(LearningWatch(SUBJECT, [p], 40, 200, warmup=50), p, 100, lr=0.0)
    assert w.step == 40 + 50 + watchdog.CHECK_AFTER


def test_a_healthy_run_is_quiet_and_a_short_one_is_not_judged():
    p = _param()
    assert _feed(LearningWatch(SUBJECT, [p], 0, 100), p, 30, move=1e-3) == []  # 0.1 % in 20 steps
    p = _param()
    assert _feed(LearningWatch(SUBJECT, [p], 0, 10), p, 10, move=0.0) == []  # shorter than the check
    p = _param()
    assert _feed(LearningWatch(SUBJECT, [p], 0, 100, quiet=True), p, 30, grad=None) == []


def test_the_job_record_keeps_warnings_across_a_restart(tmp_path):
    store = str(tmp_path / "jobs.json")

    def runner(host, cfg, control):
        control.emit("warning", text="the embedding's vectors have not moved", code="not_moving", step=20)

    svc = JobService(lambda: None, {"create_embedding": (CreateEmbeddingConfig, runner)}, store=store)
    job = svc.run("create_embedding", {"name": "x"}, timeout=10)
    svc.shutdown()
    want = [{"step": 20, "code": "not_moving", "text": "the embedding's vectors have not moved"}]
    assert job.to_dict()["warnings"] == want and job.to_dict(history=False)["warnings"] == want
    assert job.message.startswith("Warning: ")
    again = JobService(lambda: None, {"create_embedding": (CreateEmbeddingConfig, runner)}, store=store)
    assert again.get(job.id).to_dict()["warnings"] == want


def test_the_tab_and_the_command_line_show_a_warning():
    import io

    from lib_sdtrain.cli.progress import ProgressPrinter
    from lib_sdtrain.core.jobs.service import Event, Job
    from lib_sdtrain.ui.train_tabs import job_view

    job = Job(id="j1", kind="train_embedding", config=CreateEmbeddingConfig(name="x"))
    job.control.emit("step", step=1, total=30, loss=0.1, lr=0.0, text="loss 0.1, lr 0, step 1/30")
    job.control.emit("warning", text="the embedding's vectors have <not> moved", code="not_moving", step=20)
    shown = "<span class='sdtrain-warning'>Warning: the embedding&#x27;s vectors have &lt;not&gt; moved</span>"
    for last in ("", "Training finished at 30 steps.\nWarning: the embedding's vectors have <not> moved"):
        if last:  # the final message repeats the warning
            job.control.emit("log", text=last)
        status = job_view(job)["status"]
        assert status.count(shown) == 1 and status.count("moved") == 1, status
    assert "Training finished at 30 steps." in status
    out = io.StringIO()
    ProgressPrinter(out, bar=False).event(Event("warning", {"text": "the vectors have not moved"}))
    assert "WARNING: the vectors have not moved" in out.getvalue()


# -- toy-world runs ----------------------------------------------------------------------------------------
STEPS = watchdog.CHECK_AFTER + 1


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    files = models.assemble("sd1", tmp_path_factory.mktemp("toy_sd1"))
    torch.manual_seed(0)
    host = StandaloneHost.load_checkpoint(files["ckpt"], files["yaml"], files["clip"])
    return host, concept.write_concept_set(tmp_path_factory.mktemp("concept"), n=8, seed=0)


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    return concept.write_style_set(tmp_path_factory.mktemp("style"), n=8, seed=0)


def _train(toy, tmp_path, **options):
    host, data = toy
    _, job = concept.train_embedding(host, tmp_path, data, steps=STEPS, batch_size=2, **options)
    assert job.state == DONE
    return job


def _warned(job, code):
    """The one warning `job` got, with `code`, as the job record, the status text and the final message
    give it."""
    d = job.to_dict()
    assert [w["code"] for w in d["warnings"]] == [code], d["warnings"]
    text = d["warnings"][0]["text"]
    assert f"Warning: {text}" in d["message"]  # the final message ("Training finished ...") keeps it
    if code not in ("zero_rate", "norm_limit"):  # found during the run: the progress after it says so
        assert "not learning? see the warning" in job.last_event("step").data["text"]
    return text


def test_toy_healthy_embedding_runs_are_quiet(toy, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lib_sdtrain"):
        for lr in ("0.005", "0.05"):
            job = _train(toy, tmp_path / lr, learn_rate=lr)
            assert job.to_dict()["warnings"] == [] and "Warning" not in job.message, lr
            assert "not learning" not in job.last_event("step").data["text"]
    assert not [r for r in caplog.records if "sdtrain" in r.getMessage()]


def test_toy_a_rate_of_zero_is_warned_about_before_the_first_step(toy, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lib_sdtrain"):
        job = _train(toy, tmp_path, learn_rate="0")
    text = _warned(job, "zero_rate")
    assert "learning rate is 0 for the whole run" in text and "Embedding Learning rate" in text
    first_step = next(e.seq for e in job.events if e.kind == "step")
    assert next(e.seq for e in job.events if e.kind == "warning") < first_step
    assert any(text in r.getMessage() for r in caplog.records)  # the Python log


def test_toy_a_rate_too_small_is_found_at_step_20(toy, tmp_path):
    text = _warned(_train(toy, tmp_path, learn_rate="1e-9"), "not_moving")
    assert "have not moved after 20 steps" in text and "too small" in text


def test_toy_a_template_that_hides_the_name_is_found_in_the_first_steps(toy, tmp_path):
    # "[name]s" passes the config's check for [name] but reads as another word: the vectors are never
    # in a prompt and get no gradient
    concept.write_template(tmp_path / "templates", "plural.txt", "[name]s, [filewords]\n")
    job = _train(toy, tmp_path, learn_rate="0.005", template_filename="plural.txt")
    text = _warned(job, "no_gradient")
    assert "received no gradient in the first 5 steps" in text and "plural.txt" in text and "[name]" in text
    assert job.to_dict()["warnings"][0]["step"] == watchdog.GRADIENT_STEPS


def test_toy_a_norm_limit_too_small_is_warned_about_before_the_run(toy, tmp_path):
    text = _warned(_train(toy, tmp_path, norm_limit=0.02), "norm_limit")
    assert "the norm limit 0.02 holds the embedding's vectors" in text


def test_toy_a_clip_value_of_zero_is_warned_about_before_the_run(toy, tmp_path):
    job = _train(toy, tmp_path, clip_grad_mode="norm", clip_grad_value="0")
    text = _warned(job, "zero_rate")  # the schedule says it before the run, and the run is quiet then
    assert "gradient clip value is 0" in text


def test_toy_hypernetwork_at_the_host_default_rate_is_quiet_and_at_1e_9_warned(toy, style, tmp_path):
    host, _ = toy
    # 1e-5 (the host's default) moves the weights by 0.29 % in 20 steps, 29 times the threshold (measured)
    _, job = concept.train_hypernetwork(host, tmp_path / "a", style, steps=STEPS, batch_size=2, learn_rate="0.00001")
    assert job.to_dict()["warnings"] == []
    _, job = concept.train_hypernetwork(host, tmp_path / "b", style, steps=STEPS, batch_size=2, learn_rate="1e-9")
    text = _warned(job, "not_moving")
    assert text.startswith("the hypernetwork's weights have not moved") and "Hypernetwork Learning rate" in text
