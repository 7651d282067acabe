"""UI: sdtrain's sub-tabs in the webui's Train tab (gradio), a thin surface over the job service.

Every widget maps to a config field by name, with the label and default the config declares (the
host's own labels and defaults for in-tree options). The tab never touches the model: it submits
jobs and watches their events. Host facts (folders, lists, the txt2img preview fields) come in
through `UiContext`, filled by the composition root.
"""

from __future__ import annotations

import dataclasses
import html
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.jobs.service import FINISHED_STATES, RESUMABLE_STATES, Job, JobService
from lib_sdtrain.core.options.config import (
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.options.places import WritePolicy
from lib_sdtrain.core.tasks.registry import job_config_types
from lib_sdtrain.core.training.plot import draw_loss_curve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TabKind:
    """One trainable kind's tabs: which config, which fields where (host order), which names."""

    noun: str  # "embedding" / "hypernetwork"
    create: type
    train: type
    name_field: str
    create_fields: tuple[str, ...]
    main: tuple[str, ...]  # in-tree options, in the host's order (modules/ui.py, Train tab)
    extra: tuple[str, ...]  # sdtrain's own options, in an accordion


EMBEDDING = TabKind(
    "embedding", CreateEmbeddingConfig, TrainEmbeddingConfig, "embedding_name",
    ("name", "init_text", "num_vectors_per_token", "overwrite_old", "save_format"),
    ("embedding_name", "learn_rate", "clip_grad_mode", "clip_grad_value", "batch_size", "gradient_step",
     "data_root", "log_directory", "template_filename", "training_width", "training_height", "varsize", "steps",
     "create_image_every", "save_embedding_every", "use_weight", "save_image_with_stored_embedding",
     "preview_from_txt2img", "shuffle_tags", "tag_drop_out", "latent_sampling_method"),
    ("save_format", "save_optimizer_state", "lr_scheduler", "lr_warmup_steps", "lr_min", "seed", "flip_p", "crop",
     "validation_every", "validation_images", "gradient_checkpointing", "attention_optimization",
     "mixed_precision", "nan_guard"),
)
HYPERNETWORK = TabKind(
    "hypernetwork", CreateHypernetworkConfig, TrainHypernetworkConfig, "hypernetwork_name",
    ("name", "enable_sizes", "layer_structure", "activation_func", "weight_init", "add_layer_norm", "use_dropout",
     "dropout_structure", "overwrite_old", "seed"),
    ("hypernetwork_name", "learn_rate", "clip_grad_mode", "clip_grad_value", "batch_size", "gradient_step",
     "data_root", "log_directory", "template_filename", "training_width", "training_height", "varsize", "steps",
     "create_image_every", "save_hypernetwork_every", "use_weight", "preview_from_txt2img", "shuffle_tags",
     "tag_drop_out", "latent_sampling_method"),
    ("optimizer_name", "save_optimizer_state", "lr_scheduler", "lr_warmup_steps", "lr_min", "seed", "flip_p", "crop",
     "validation_every", "validation_images", "gradient_checkpointing", "attention_optimization",
     "mixed_precision", "nan_guard"),
)
#: The txt2img components the host hands to train-tab callbacks, in its order (UiTrainTabParams).
PREVIEW_FIELDS = ("preview_prompt", "preview_negative_prompt", "preview_steps", "preview_sampler_name",
                  "preview_cfg_scale", "preview_seed", "preview_width", "preview_height")


@dataclass
class UiContext:
    service: JobService
    defaults: Callable[[str], dict[str, Any]] = lambda kind: {}
    embedding_names: Callable[[], list[str]] = list
    refresh_embeddings: Callable[[], list[str]] = list
    hypernetwork_names: Callable[[], list[str]] = list
    refresh_hypernetworks: Callable[[], list[str]] = list
    template_names: Callable[[], list[str]] = list
    model_note: Callable[[], str] = lambda: ""
    #: which captioners the host can run, e.g. "BLIP: not available (no model file in models/BLIP)"
    captioner_note: Callable[[], str] = lambda: ""
    txt2img_preview_params: list[Any] = field(default_factory=list)
    poll_seconds: float = 1.0
    #: where a form may make a job write (None: anywhere): the webui confines it when others can reach it
    write_policy: Callable[[], WritePolicy | None] = lambda: None


def _widget(spec: dict[str, Any], eid: str, choices: list[str] | None = None):
    label, default, kind = spec["label"], spec["default"], spec["type"]
    if choices is not None:  # host lists (embeddings, templates): a typed name is accepted too
        extra = {"allow_custom_value": True} if _has_custom_values() else {}
        return gr.Dropdown(label=label, value=default if default in choices else None, choices=choices,
                           elem_id=eid, **extra)
    if kind == "tuple" and spec.get("options"):
        options = [str(o) for o in spec["options"]]
        return gr.CheckboxGroup(label=label, value=[str(v) for v in default], choices=options, elem_id=eid)
    if spec.get("choices"):
        if spec["name"] == "latent_sampling_method":
            return gr.Radio(label=label, value=default, choices=list(spec["choices"]), elem_id=eid)
        return gr.Dropdown(label=label, value=default, choices=list(spec["choices"]), elem_id=eid)
    if kind == "bool":
        return gr.Checkbox(label=label, value=default, elem_id=eid)
    if kind in ("int", "float") and "minimum" in spec and "maximum" in spec:
        step = spec.get("step", 1 if kind == "int" else 0.1)
        return gr.Slider(label=label, value=default, minimum=spec["minimum"], maximum=spec["maximum"], step=step,
                         elem_id=eid)
    if kind in ("int", "float"):
        return gr.Number(label=label, value=default, precision=0 if kind == "int" else None, elem_id=eid)
    return gr.Textbox(label=label, value=default, elem_id=eid)


#: Event options for handlers that stream a job's progress for as long as it runs. gradio 4 lets one
#: run of each event at a time by default, so a second browser (or a Stop while streaming) would wait
#: for the whole job; gradio 3 has no per-event limit (its queue's worker count applies).
_STREAMING: dict[str, Any] = {"concurrency_limit": None} if int(gr.__version__.split(".")[0]) >= 4 else {}


def _has_custom_values() -> bool:
    import inspect

    return "allow_custom_value" in inspect.signature(gr.Dropdown.__init__).parameters


def _specs(cls) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in cls.describe()}


# -- what a watched job looks like ---------------------------------------------------------------------
def job_view(job: Job | None) -> tuple[str, Any, list[str], str, str]:
    """(status html, loss chart, preview paths, files text, error html) for one job."""
    if job is None:
        return "", None, [], "", ""
    d = job.to_dict()
    state = d["state"]
    last = job.events_since(0)
    text = next((e.data.get("text", "") for e in reversed(last) if e.kind == "step"), "")
    status = f"<b>{html.escape(job.kind)}</b> {html.escape(state)}"
    if text:  # "loss …, lr …, step n/N, it/s, ETA"
        status += f" — {html.escape(text)}"
    elif d["total_steps"]:
        status += f" — {d['step']}/{d['total_steps']}"
    if job.message:
        status += f"<br>{html.escape(job.message)}"
    chart = None
    if d["loss_history"]:
        steps = [s for s, _, _ in d["loss_history"]]
        losses = [v for _, v, _ in d["loss_history"]]
        chart = draw_loss_curve(steps, losses, validation=[tuple(v) for v in d["validation_history"]],
                                title=f"{d['config'].get('embedding_name') or d['config'].get('hypernetwork_name', '')} loss")
    error = f"<div class='error'>{html.escape(d['error'])}</div>" if d["error"] else ""
    gallery = list(d["previews"])
    if job.kind == "preprocess":  # a few of the prepared images
        gallery = [f for f in d["files"] if f.lower().endswith(".png")][:12]
    return status, chart, gallery, "\n".join(d["files"]), error


def watch(service: JobService, job: Job | None, poll: float = 1.0) -> Iterator[tuple]:
    """Yield the job's view until it finishes (a generator event: gradio streams each yield)."""
    if job is None:
        yield ("No sdtrain job yet.", None, [], "", "", "")
        return
    while True:
        finished = job.wait(poll)
        yield (*job_view(job), job.id)
        if finished or job.state in FINISHED_STATES:
            return


def _error(e: Exception) -> str:
    return f"<div class='error'>{html.escape(str(e))}</div>"


# -- the tabs -----------------------------------------------------------------------------------------
def build_embedding_tabs(ctx: UiContext) -> None:
    """Add "Create embedding (sdtrain)" and "Train embedding (sdtrain)" tabs to the enclosing gr.Tabs."""
    _create_tab(ctx, EMBEDDING)
    _train_tab(ctx, EMBEDDING, ctx.embedding_names, ctx.refresh_embeddings)


def build_hypernetwork_tabs(ctx: UiContext) -> None:
    """Add "Create hypernetwork (sdtrain)" and "Train hypernetwork (sdtrain)" tabs."""
    _create_tab(ctx, HYPERNETWORK)
    _train_tab(ctx, HYPERNETWORK, ctx.hypernetwork_names, ctx.refresh_hypernetworks)


def build_all_tabs(ctx: UiContext) -> None:
    """Every sub-tab. A host difference must not take the whole UI down: a list the host cannot give
    is empty (and said so in the tab), and a sub-tab that fails to build is replaced by one that shows
    the error, while the others work."""
    problems: list[str] = []
    safe = dataclasses.replace(
        ctx,
        embedding_names=_guarded(ctx.embedding_names, [], problems),
        refresh_embeddings=_guarded(ctx.refresh_embeddings, [], problems),
        hypernetwork_names=_guarded(ctx.hypernetwork_names, [], problems),
        refresh_hypernetworks=_guarded(ctx.refresh_hypernetworks, [], problems),
        template_names=_guarded(ctx.template_names, [], problems),
        model_note=_guarded_note(ctx.model_note, problems),
        captioner_note=_guarded(ctx.captioner_note, "", problems),
    )
    for listing in (safe.embedding_names, safe.hypernetwork_names, safe.template_names):
        listing()  # ask once up front, so the notes built below already say what is missing
    for title, build in (("Embedding", build_embedding_tabs), ("Hypernetwork", build_hypernetwork_tabs),
                         ("Preprocess images", build_preprocess_tab)):
        try:
            build(safe)
        except Exception as e:  # shown in its place; the other tabs still build
            log.exception("sdtrain: the %s tabs failed to build", title)
            with gr.Tab(label=f"{title} (sdtrain)", elem_id=f"sdtrain_{title.split()[0].lower()}_failed"):
                gr.HTML(value=_error(e))


def _guarded(fn: Callable[..., Any], default: Any, problems: list[str]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # a host without this list (e.g. no embedding database)
            log.warning("sdtrain: %s failed: %s", getattr(fn, "__name__", fn), e)
            text = f"{getattr(fn, '__name__', 'host')}: {type(e).__name__}: {e}"
            if text not in problems:
                problems.append(text)
            return default

    return call


def _guarded_note(fn: Callable[[], str], problems: list[str]) -> Callable[[], str]:
    """The model note, followed by what the host could not give (so an empty list is explained)."""
    inner = _guarded(fn, "", problems)

    def note() -> str:
        text = inner()
        if problems:
            text += "".join(f"<br>Not available from this webui — {html.escape(p)}" for p in problems)
        return text

    return note


PREPROCESS_SECTIONS = (
    (None, ("process_src", "process_dst", "process_width", "process_height", "preprocess_txt_action",
            "process_keep_original_size", "process_flip", "process_split", "process_focal_crop", "process_multicrop",
            "process_caption", "process_caption_deepbooru", "overwrite")),
    ("Split oversized images", ("process_split_threshold", "process_overlap_ratio")),
    ("Auto focal point crop", ("process_focal_crop_face_weight", "process_focal_crop_entropy_weight",
                               "process_focal_crop_edges_weight", "process_focal_crop_debug")),
    ("Auto-sized crop", ("process_multicrop_mindim", "process_multicrop_maxdim", "process_multicrop_minarea",
                         "process_multicrop_maxarea", "process_multicrop_objective", "process_multicrop_threshold")),
)


def build_preprocess_tab(ctx: UiContext) -> None:
    """"Preprocess images (sdtrain)": photos in a folder → a training set in another folder."""
    from lib_sdtrain.core.preprocess.operations import PreprocessConfig

    specs, kind, prefix = _specs(PreprocessConfig), PreprocessConfig.kind, "sdtrain_preprocess"
    widgets: dict[str, Any] = {}
    with gr.Tab(label="Preprocess images (sdtrain)", id=prefix, elem_id=prefix):
        gr.HTML(value=ctx.captioner_note, elem_id=f"{prefix}_captioners")
        for title, names in PREPROCESS_SECTIONS:
            block = gr.Accordion(title, open=False) if title else gr.Group()
            with block:
                for n in names:
                    widgets[n] = _widget(specs[n], f"{prefix}_{n}")
        with gr.Row():
            run = gr.Button(value="Preprocess", variant="primary", elem_id=f"{prefix}_button")
            stop = gr.Button(value="Interrupt", elem_id=f"{prefix}_stop")
        status = gr.HTML(elem_id=f"{prefix}_status")
        error = gr.HTML(elem_id=f"{prefix}_error")
        gallery = gr.Gallery(label="Output", elem_id=f"{prefix}_gallery")
        files = gr.Textbox(label="Files written", lines=4, interactive=False, elem_id=f"{prefix}_files")
        job_id = gr.Textbox(visible=False, elem_id=f"{prefix}_job_id")
        chart = gr.State(None)  # no loss curve here; keeps the watched-job outputs uniform
    _wire_job(ctx, kind, widgets, [], run, stop, None, [status, chart, gallery, files, error, job_id], job_id)


def _create_tab(ctx: UiContext, tk: TabKind) -> None:
    specs = _specs(tk.create)
    kind, prefix = tk.create.kind, f"sdtrain_create_{tk.noun}"
    with gr.Tab(label=f"Create {tk.noun} (sdtrain)", id=prefix, elem_id=prefix):
        gr.HTML(value=ctx.model_note, elem_id=f"{prefix}_model_note")  # the family and what a file holds
        inputs = [_widget(specs[n], f"{prefix}_{n}") for n in tk.create_fields]
        button = gr.Button(value=f"Create {tk.noun}", variant="primary", elem_id=f"{prefix}_button")
        out = gr.Textbox(show_label=False, elem_id=f"{prefix}_output", interactive=False)
        err = gr.HTML(elem_id=f"{prefix}_error")

    def create(*values):
        data = tk.create.merge_defaults(ctx.defaults(kind), dict(zip(tk.create_fields, values)))
        try:
            job = ctx.service.run(kind, data)
        except SdtrainError as e:
            return "", _error(e)
        if job.error:
            return "", _error(Exception(job.error))
        return f"Created: {job.result}", ""

    button.click(create, inputs=inputs, outputs=[out, err])


def _train_tab(ctx: UiContext, tk: TabKind, list_names, refresh_names) -> None:
    specs = _specs(tk.train)
    kind, prefix = tk.train.kind, f"sdtrain_train_{tk.noun}"
    widgets: dict[str, Any] = {}
    with gr.Tab(label=f"Train {tk.noun} (sdtrain)", id=prefix, elem_id=prefix):
        gr.HTML(value=ctx.model_note, elem_id=f"{prefix}_model_note")
        with gr.Row():
            widgets[tk.name_field] = _widget(specs[tk.name_field], f"{prefix}_{tk.name_field}", choices=list_names())
            refresh = gr.Button(value="\U0001f504", elem_id=f"{prefix}_refresh", elem_classes=["tool"])
            refresh.click(lambda: gr.update(choices=refresh_names()), outputs=[widgets[tk.name_field]])
        for n in tk.main[1:]:
            choices = ctx.template_names() if n == "template_filename" else None
            widgets[n] = _widget(specs[n], f"{prefix}_{n}", choices=choices)
        with gr.Accordion("sdtrain options", open=False, elem_id=f"{prefix}_extra"):
            for n in tk.extra:
                widgets[n] = _widget(specs[n], f"{prefix}_{n}")
        with gr.Row():
            train = gr.Button(value=f"Train {tk.noun.capitalize()}", variant="primary", elem_id=f"{prefix}_button")
            stop = gr.Button(value="Stop", elem_id=f"{prefix}_stop")
            show = gr.Button(value="Show latest job", elem_id=f"{prefix}_watch")
            resume = gr.Button(value="Resume last run", elem_id=f"{prefix}_resume")
        status = gr.HTML(elem_id=f"{prefix}_status")
        error = gr.HTML(elem_id=f"{prefix}_error")
        chart = gr.Image(label="Loss", type="pil", interactive=False, elem_id=f"{prefix}_loss_chart")
        gallery = gr.Gallery(label="Previews", elem_id=f"{prefix}_previews")
        files = gr.Textbox(label="Files written", lines=4, interactive=False, elem_id=f"{prefix}_files")
        job_id = gr.Textbox(visible=False, elem_id=f"{prefix}_job_id")

    _wire_job(ctx, kind, widgets, list(ctx.txt2img_preview_params), train, stop, show,
              [status, chart, gallery, files, error, job_id], job_id, resume_button=resume)


def _wire_job(ctx: UiContext, kind: str, widgets: dict[str, Any], preview_inputs: list[Any], start_button,
              stop_button, show_button, outputs: list[Any], job_id, resume_button=None) -> None:
    """Start (a generator streaming the job's view), Stop, re-attach to the latest job of a kind, and
    resume the latest stopped, failed or interrupted one (a webui restart cut it short) with its settings."""
    names = list(widgets)

    def start(*values):
        form = dict(zip(names, values[: len(names)]))
        if form.get("preview_from_txt2img") and preview_inputs:
            form.update(zip(PREVIEW_FIELDS, values[len(names):]))
        cls = job_config_types()[kind]
        data = cls.merge_defaults(ctx.defaults(kind), {k: v for k, v in form.items() if v is not None})
        try:
            policy = ctx.write_policy()
            if policy is not None:
                data = policy.confine(cls, data)
            job = ctx.service.submit(kind, data)
        except SdtrainError as e:
            yield ("", None, [], "", _error(e), "")
            return
        yield from watch(ctx.service, job, ctx.poll_seconds)

    def latest():
        jobs = [j for j in ctx.service.list() if j.kind == kind]
        running = [j for j in jobs if j.state not in FINISHED_STATES]
        yield from watch(ctx.service, (running or jobs or [None])[-1], ctx.poll_seconds)

    def resume_latest():
        jobs = [j for j in ctx.service.list() if j.kind == kind]
        if jobs and jobs[-1].state in RESUMABLE_STATES:
            try:
                job = ctx.service.resume(jobs[-1].id)
            except SdtrainError as e:
                yield ("", None, [], "", _error(e), "")
                return
            yield from watch(ctx.service, job, ctx.poll_seconds)
            return
        why = f"the last {kind.replace('_', ' ')} job is {jobs[-1].state}" if jobs else "there is no job to resume"
        yield ("", None, [], "", _error(SdtrainError(f"Nothing to resume: {why}.")), "")

    def stop_job(current: str):
        jobs = [j for j in ctx.service.list() if j.kind == kind and j.state not in FINISHED_STATES]
        target = ctx.service.get(current) if current else None
        for j in [target] if target is not None else jobs:
            ctx.service.stop(j.id)

    start_button.click(start, inputs=[widgets[n] for n in names] + preview_inputs, outputs=outputs,
                       show_progress=False, **_STREAMING)
    if show_button is not None:
        show_button.click(latest, outputs=outputs, show_progress=False, **_STREAMING)
    if resume_button is not None:
        resume_button.click(resume_latest, outputs=outputs, show_progress=False, **_STREAMING)
    stop_button.click(stop_job, inputs=[job_id], outputs=[], **_STREAMING)
