"""The Train sub-tabs (gradio 3.41 as in A1111/reForge, and 4.40 as in Forge): structure, ids, and the
handlers over a real job."""

from __future__ import annotations

import time

import gradio as gr
import pytest

from lib_sdtrain import version
from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.jobs.service import JobService
from lib_sdtrain.core.tasks.registry import job_runners
from lib_sdtrain.hosts.standalone.host import StandaloneHost
from lib_sdtrain.ui.train_tabs import OUTPUTS, UiContext, build_all_tabs


@pytest.fixture
def ui(tiny_sd1, tmp_path):
    service = JobService(lambda: StandaloneHost(tiny_sd1), job_runners())
    emb_dir = str(tmp_path / "embeddings")
    ctx = UiContext(
        service=service,
        defaults=lambda kind: {"hypernetwork_dir": str(tmp_path / "hn")} if "hypernetwork" in kind else {
            "embeddings_dir": emb_dir},
        embedding_names=lambda: ["uiemb"],
        template_names=lambda: ["hypernetwork.txt", "subject_filewords.txt", "style_filewords.txt"],
        poll_seconds=0.05,
    )
    with gr.Blocks() as demo, gr.Tabs():
        build_all_tabs(ctx)
    yield demo, service, tmp_path
    service.shutdown()


def handler(demo, elem_id):
    """(function, input components) of the event on `elem_id`: gradio 3 keeps dependencies as dicts
    beside `fns`, gradio 4 keeps BlockFunction objects holding their own inputs and targets."""
    comp = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    if hasattr(demo, "dependencies"):  # gradio 3
        for dep, fn in zip(demo.dependencies, demo.fns):
            if comp._id in dep["targets"]:
                return fn.fn, [demo.blocks[i] for i in dep["inputs"]]
    else:  # gradio 4: fns maps ids to BlockFunction; targets are (block id, event name)
        for fn in demo.fns.values():
            if any(target[0] == comp._id for target in fn.targets):
                return fn.fn, list(fn.inputs)
    raise AssertionError(f"no handler on {elem_id}")


def view(update: tuple) -> dict:
    """A job view yielded by a handler, by output name (train_tabs.OUTPUTS)."""
    assert len(update) == len(OUTPUTS)
    return dict(zip(OUTPUTS, update))


def test_ids_are_prefixed_and_host_labels_kept(ui):
    demo, _, _ = ui
    ids = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)]
    assert ids and all(i.startswith("sdtrain_") for i in ids)
    labels = {b.elem_id: getattr(b, "label", None) for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert labels["sdtrain_train_embedding_learn_rate"] == "Embedding Learning rate"
    assert labels["sdtrain_train_embedding_latent_sampling_method"] == "Choose latent sampling method"
    assert labels["sdtrain_create_embedding_num_vectors_per_token"] == "Number of vectors per token"
    values = {b.elem_id: getattr(b, "value", None) for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert values["sdtrain_train_embedding_learn_rate"] == "0.005" and values["sdtrain_train_embedding_steps"] == 100000
    assert values["sdtrain_train_embedding_template_filename"] == "style_filewords.txt"
    for tab in ("train_embedding", "train_hypernetwork", "preprocess", "jobs"):  # each tab's footer: the version
        assert f"sdtrain {version()} · AGPL-3.0" in values[f"sdtrain_{tab}_footer"], tab


def test_create_then_train_through_the_handlers(ui):
    demo, service, tmp = ui
    create, inputs = handler(demo, "sdtrain_create_embedding_button")
    values = {c.elem_id: c.value for c in inputs}
    values["sdtrain_create_embedding_name"] = "uiemb"
    out, err, names, _note = create(*[values[c.elem_id] for c in inputs])
    assert err == "" and out.startswith("Created: ") and out.endswith("uiemb.pt")
    assert names["value"] == "uiemb"  # the new embedding is selected for training

    data = write_sample_dataset(tmp / "data", count=4, size=64)
    train, inputs = handler(demo, "sdtrain_train_embedding_button")
    values = {c.elem_id: c.value for c in inputs}
    values.update({"sdtrain_train_embedding_embedding_name": "uiemb", "sdtrain_train_embedding_data_root": str(data),
                   "sdtrain_train_embedding_steps": 5.0, "sdtrain_train_embedding_training_width": 64, "sdtrain_train_embedding_training_height": 64,
                   "sdtrain_train_embedding_template_filename": "subject_filewords.txt", "sdtrain_train_embedding_create_image_every": 5.0,
                   "sdtrain_train_embedding_save_embedding_every": 0.0, "sdtrain_train_embedding_log_directory": str(tmp / "log")})
    updates = [view(u) for u in train(*[values[c.elem_id] for c in inputs])]
    last = updates[-1]
    assert last["error"] == "" and "done" in last["status"] and "step 5/5" in last["status"]
    # the charts' tables: loss, its smoothed curve (one point a step) and the learning rate
    loss = last["loss"]
    assert sorted(set(loss["series"])) == ["loss", "smoothed loss"] and list(loss[loss.series == "loss"].step) == [1, 2, 3, 4, 5]
    assert list(last["lr"]["learning rate"]) == [0.005] * 5
    assert len(last["previews"]) == 1 and last["previews"][0].endswith("uiemb-5.png")
    assert load_embedding(next(f for f in last["files"].splitlines() if f.endswith("uiemb.pt"))).step == 5
    assert service.get(last["job_id"]).state == "done"
    assert all(u["names"] == gr.update() for u in updates[:-1]) and "choices" in last["names"]  # list refreshed at the end


def test_bad_input_shows_in_the_tab(ui):
    demo, _, _ = ui
    train, inputs = handler(demo, "sdtrain_train_embedding_button")
    values = {c.elem_id: c.value for c in inputs}
    values["sdtrain_train_embedding_embedding_name"] = "uiemb"  # no dataset directory given
    (update,) = [view(u) for u in train(*[values[c.elem_id] for c in inputs])]
    assert "data_root" in update["error"] and "Dataset directory" in update["error"]
    assert [update[k] for k in ("status", "loss", "previews", "files", "job_id")] == ["", None, [], "", ""]


def test_hypernetwork_tabs_create_and_train(ui):
    demo, service, tmp = ui
    create, inputs = handler(demo, "sdtrain_create_hypernetwork_button")
    values = {c.elem_id: c.value for c in inputs}
    assert values["sdtrain_create_hypernetwork_enable_sizes"] == ["768", "320", "640", "1280"]  # the host's
    values.update({"sdtrain_create_hypernetwork_name": "uihn", "sdtrain_create_hypernetwork_enable_sizes": ["64"]})
    out, err, names, _note = create(*[values[c.elem_id] for c in inputs])
    assert err == "" and out.endswith("uihn.pt") and names["value"] == "uihn"
    data = write_sample_dataset(tmp / "hdata", count=4, size=64)
    train, inputs = handler(demo, "sdtrain_train_hypernetwork_button")
    values = {c.elem_id: c.value for c in inputs}
    assert values["sdtrain_train_hypernetwork_learn_rate"] == "0.00001"
    assert values["sdtrain_train_hypernetwork_template_filename"] == "hypernetwork.txt"
    values.update({"sdtrain_train_hypernetwork_hypernetwork_name": "uihn", "sdtrain_train_hypernetwork_data_root": str(data),
                   "sdtrain_train_hypernetwork_steps": 3, "sdtrain_train_hypernetwork_training_width": 64,
                   "sdtrain_train_hypernetwork_training_height": 64, "sdtrain_train_hypernetwork_create_image_every": 0,
                   "sdtrain_train_hypernetwork_save_hypernetwork_every": 0,
                   "sdtrain_train_hypernetwork_log_directory": str(tmp / "hlog")})
    last = view(list(train(*[values[c.elem_id] for c in inputs]))[-1])
    assert last["error"] == "" and "done" in last["status"] and service.get(last["job_id"]).result.step == 3


def test_preprocess_tab_prepares_a_folder(ui):
    from PIL import Image

    demo, service, tmp = ui
    src = tmp / "photos"
    src.mkdir()
    for i, size in enumerate([(96, 64), (64, 96), (64, 64)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(src / f"{i}.png")
    run, inputs = handler(demo, "sdtrain_preprocess_button")
    values = {c.elem_id: c.value for c in inputs}
    values.update({"sdtrain_preprocess_process_src": str(src), "sdtrain_preprocess_process_dst": str(tmp / "set"),
                   "sdtrain_preprocess_process_width": 64, "sdtrain_preprocess_process_height": 64})
    last = view(list(run(*[values[c.elem_id] for c in inputs]))[-1])
    assert last["error"] == "" and "done" in last["status"] and len(last["previews"]) == 3
    assert all(Image.open(f).size == (64, 64) for f in last["previews"])
    assert service.get(last["job_id"]).kind == "preprocess" and last["files"].count(".png") == 3


def test_streaming_handlers_do_not_block_each_other(ui):
    """gradio 4 runs one call of each event at a time unless told otherwise: a second browser's Train,
    Show latest job or Stop would wait for the whole job."""
    demo, _, _ = ui
    if hasattr(demo, "dependencies"):
        pytest.skip("gradio 3 has no per-event concurrency limit (the A1111 / reForge stack)")
    for suffix in ("train_embedding_button", "train_embedding_stop"):
        comp = next(b for b in demo.blocks.values() if getattr(b, "elem_id", "") == f"sdtrain_{suffix}")
        fns = [fn for fn in demo.fns.values() if any(t[0] == comp._id for t in fn.targets)]
        assert fns and all(fn.concurrency_limit is None for fn in fns), suffix


def test_a_host_difference_does_not_take_the_tabs_down(tiny_sd1, tmp_path):
    """Forge has no embedding database: the list is empty and the tab says why; a sub-tab whose build
    fails shows its error in its place; the other sub-tabs are all there."""
    from lib_sdtrain.ui import train_tabs

    service = JobService(lambda: StandaloneHost(tiny_sd1), job_runners())

    def no_db():
        raise AttributeError("'StableDiffusionModelHijack' object has no attribute 'embedding_db'")

    ctx = UiContext(service=service, embedding_names=no_db, refresh_embeddings=no_db,
                    template_names=lambda: ["subject_filewords.txt"], model_note=lambda: "SD1 model")
    real = train_tabs.build_preprocess_tab

    def broken(_ctx):
        raise RuntimeError("preprocess cannot build here")

    train_tabs.build_preprocess_tab = broken
    try:
        with gr.Blocks() as demo, gr.Tabs():
            build_all_tabs(ctx)
    finally:
        train_tabs.build_preprocess_tab = real
        service.shutdown()
    ids = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert "sdtrain_train_embedding_button" in ids and "sdtrain_train_hypernetwork_button" in ids
    assert ids["sdtrain_train_embedding_embedding_name"].choices in ([], None) or not ids[
        "sdtrain_train_embedding_embedding_name"].choices
    assert "sdtrain_preprocess_failed" in ids
    errors = [b.value for b in demo.blocks.values() if isinstance(b, gr.HTML) and "preprocess cannot build" in str(b.value)]
    assert errors
    note = ids["sdtrain_train_embedding_model_note"].value
    note = note() if callable(note) else note
    assert "SD1 model" in note and "embedding_db" in note


def test_resume_last_run_button(ui):
    """"Resume last run" submits the latest stopped, failed or interrupted job of its kind again with its
    settings (a training continues from its resume point); with nothing to resume it says so."""
    demo, service, tmp = ui
    resume, inputs = handler(demo, "sdtrain_train_embedding_resume")
    assert inputs == []
    (update,) = [view(u) for u in resume()]
    assert "there is no job to resume" in update["error"]
    data = write_sample_dataset(tmp / "data", count=4, size=64)
    service.run("create_embedding", {"name": "again", "embeddings_dir": str(tmp / "embeddings")})
    job = service.submit("train_embedding", {
        "embedding_name": "again", "embeddings_dir": str(tmp / "embeddings"), "data_root": str(data), "steps": 20,
        "training_width": 64, "training_height": 64, "template_filename": "subject_filewords.txt",
        "create_image_every": 0, "save_embedding_every": 0, "log_directory": str(tmp / "log")})
    service.stop(job.id)
    job.wait(60)
    assert job.state == "stopped" and job.step < 20
    last = view(list(resume())[-1])
    assert last["error"] == "" and "done" in last["status"] and "step 20/20" in last["status"] and last["job_id"] != job.id
    assert service.get(last["job_id"]).config.embedding_name == "again"
    (update,) = [view(u) for u in resume()]
    assert "is done" in update["error"]


def test_jobs_tab_lists_every_job_opens_stops_and_cancels(ui):
    """Jobs started anywhere (here: straight through the service, as the API does) are listed newest
    first; Open streams a job's view; Stop ends a running job and cancels a queued one; a finished job
    says so."""
    demo, service, tmp = ui
    data = write_sample_dataset(tmp / "jdata", count=4, size=64)
    service.run("create_embedding", {"name": "jobsui", "embeddings_dir": str(tmp / "embeddings")})
    train = {"embedding_name": "jobsui", "embeddings_dir": str(tmp / "embeddings"), "data_root": str(data),
             "training_width": 64, "training_height": 64, "template_filename": "subject_filewords.txt",
             "create_image_every": 0, "save_embedding_every": 0, "log_directory": str(tmp / "log")}
    running = service.submit("train_embedding", {**train, "steps": 100000})
    queued = service.submit("train_embedding", {**train, "steps": 3})
    refresh, _ = handler(demo, "sdtrain_jobs_refresh")
    table, picks = refresh()
    assert [row[0] for row in table[:3]] == [queued.id, running.id, service.list()[0].id]  # newest first
    assert table[0][1:4] == ["train embedding", "jobsui", "queued"] and picks["choices"][0] == queued.id

    stop, _ = handler(demo, "sdtrain_jobs_stop")
    message, _ = stop(queued.id)
    assert f"Asked job {queued.id} to stop" in message and queued.state == "stopped"  # cancelled, never ran
    deadline = time.time() + 60
    while running.step < 1 and time.time() < deadline:
        time.sleep(0.02)
    stop(running.id)
    assert running.wait(60) and running.state == "stopped" and queued.step == 0
    message, _ = stop(running.id)
    assert "has already finished (stopped)" in message
    message, _ = stop("")
    assert "Pick a job first" in message

    open_job, _ = handler(demo, "sdtrain_jobs_open")
    last = view(list(open_job(running.id))[-1])
    assert "stopped" in last["status"] and last["job_id"] == running.id and len(last["loss"]) > 0
    resume, _ = handler(demo, "sdtrain_jobs_resume")
    (update,) = [view(u) for u in resume("nope")]
    assert "no job nope" in update["error"]


def test_dropdowns_say_which_embeddings_fit(tiny_sd1, tmp_path):
    """The embedding list is filled when the tab is built and on every refresh, with the host's note of
    which files fit the loaded model."""
    service = JobService(lambda: StandaloneHost(tiny_sd1), job_runners())
    names = ["a"]
    ctx = UiContext(service=service, embedding_names=lambda: list(names), refresh_embeddings=lambda: list(names),
                    embedding_note=lambda: f"{len(names)} fit; skipped: wide (1024 wide)")
    with gr.Blocks() as demo, gr.Tabs():
        build_all_tabs(ctx)
    service.shutdown()
    ids = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert [c[0] if isinstance(c, tuple) else c for c in ids["sdtrain_train_embedding_embedding_name"].choices] == ["a"]
    names.append("b")
    refresh, _ = handler(demo, "sdtrain_train_embedding_refresh")
    choices, note = refresh()
    assert choices["choices"] == ["a", "b"] and note == "2 fit; skipped: wide (1024 wide)"


#: config fields the training form does not show: the txt2img fields previews read (with "Read parameters
#: from txt2img"), the webui's own Settings → Training values and folders (filled from the webui), and
#: API-only file overrides
NOT_IN_THE_FORM = {
    "preview_prompt", "preview_negative_prompt", "preview_steps", "preview_sampler_name", "preview_cfg_scale",
    "preview_seed", "preview_width", "preview_height", "templates_dir", "save_training_settings_to_txt",
    "training_write_csv_every", "dataset_filename_word_regex", "dataset_filename_join_string",
    "training_image_repeats_per_epoch", "training_enable_tensorboard", "training_tensorboard_save_images",
    "training_tensorboard_flush_every", "embeddings_dir", "embedding_file", "hypernetwork_dir", "hypernetwork_file",
}


def test_every_training_option_is_in_the_form(ui):
    """Each option of the training configs (loss, optimizer, captions, EMA, resume, SDXL encoders...) has its
    widget, with the config's label and its default (the host's behaviour)."""
    from lib_sdtrain.core.tasks.registry import job_config_types

    demo, _, _ = ui
    blocks = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for kind in ("train_embedding", "train_hypernetwork"):
        for spec in job_config_types()[kind].describe():
            if spec["name"] in NOT_IN_THE_FORM:
                continue
            widget = blocks.get(f"sdtrain_{kind}_{spec['name']}")
            assert widget is not None, f"{kind}: no widget for {spec['name']}"
            assert widget.label == spec["label"], spec["name"]
    for name, default in (("loss_type", "mse"), ("min_snr_gamma", 0.0), ("noise_offset", 0.0), ("ema_decay", 0.0),
                          ("optimizer_name", "AdamW"), ("weight_decay", 0.0), ("caption_dropout_rate", 0.0)):
        assert blocks[f"sdtrain_train_embedding_{name}"].value == default, name
    assert blocks["sdtrain_train_hypernetwork_weight_decay"].value == 0.01
