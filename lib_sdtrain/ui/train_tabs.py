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
import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from lib_sdtrain import version
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
from lib_sdtrain.core.training.plot import smooth

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
    #: more of sdtrain's options, grouped in accordions of their own inside it
    sections: tuple[tuple[str, tuple[str, ...]], ...] = ()


#: sdtrain's training options beyond the host's (each off by default: the host's behaviour)
OPTION_SECTIONS = (
    ("Optimizer settings", ("weight_decay", "momentum", "betas")),
    ("Loss", ("loss_type", "huber_c", "min_snr_gamma", "noise_offset", "timestep_min", "timestep_max")),
    ("Captions", ("keep_tokens", "caption_dropout_rate", "folder_repeats")),
    ("EMA", ("ema_decay", "ema_start_step", "ema_for_output", "ema_for_previews")),
    ("Aspect-ratio buckets", ("bucketing", "bucket_step", "bucket_max_aspect", "bucket_upscale")),
    ("Validation and early stop", ("validation_every", "validation_images", "validation_split", "validation_dir",
                                   "early_stop_patience", "early_stop_min_delta", "final_file")),
)
RESUME_SECTION = ("Resume", ("resume_interrupted", "resume_point_minutes"))
EMBEDDING = TabKind(
    "embedding", CreateEmbeddingConfig, TrainEmbeddingConfig, "embedding_name",
    ("name", "init_text", "num_vectors_per_token", "overwrite_old", "save_format"),
    ("embedding_name", "learn_rate", "clip_grad_mode", "clip_grad_value", "batch_size", "gradient_step",
     "data_root", "log_directory", "template_filename", "training_width", "training_height", "varsize", "steps",
     "create_image_every", "save_embedding_every", "use_weight", "save_image_with_stored_embedding",
     "preview_from_txt2img", "shuffle_tags", "tag_drop_out", "latent_sampling_method"),
    ("save_format", "optimizer_name", "save_optimizer_state", "lr_scheduler", "lr_warmup_steps", "lr_min", "seed", "flip_p", "crop",
     "gradient_checkpointing", "attention_optimization",
     "mixed_precision", "nan_guard"),
    (("SDXL", ("train_encoders", "learn_rate_clip_l", "learn_rate_clip_g")), ("Vector norm", ("norm_limit",)),
     *OPTION_SECTIONS, RESUME_SECTION),
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
     "gradient_checkpointing", "attention_optimization",
     "mixed_precision", "nan_guard"),
    (*OPTION_SECTIONS, RESUME_SECTION),
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
    #: which embeddings fit the loaded model and which the webui skipped (made for another model)
    embedding_note: Callable[[], str] = lambda: ""
    #: which optional optimizers can be chosen here (their packages), and how to get the others
    optimizer_note: Callable[[], str] = lambda: _optimizer_note()
    #: how to get TensorBoard logging where the host's setting asks for it and the package is missing
    tensorboard_note: Callable[[], str] = lambda: ""
    #: which captioners the host can run, e.g. "BLIP: not available (no model file in models/BLIP)"
    captioner_note: Callable[[], str] = lambda: ""
    txt2img_preview_params: list[Any] = field(default_factory=list)
    poll_seconds: float = 1.0
    #: how often an open Jobs tab reloads the list
    jobs_refresh_seconds: float = 3.0
    #: where a form may make a job write (None: anywhere): the webui confines it when others can reach it
    write_policy: Callable[[], WritePolicy | None] = lambda: None
    #: what this webui cannot do for sdtrain, and why (the host probe's notes); "" when everything works
    host_note: Callable[[], str] = lambda: ""


def _optimizer_note() -> str:
    from lib_sdtrain.core.options.optimizers import available_optimizers

    missing = {name: why for name, why in available_optimizers().items() if why}
    if not missing:
        return ""
    return ("<span class='sdtrain-note'>Optimizers not available here: "
            + "; ".join(html.escape(f"{name} ({why})") for name, why in missing.items()) + "</span>")


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
_GRADIO_MAJOR = int(gr.__version__.split(".")[0])
_STREAMING: dict[str, Any] = {"concurrency_limit": None} if _GRADIO_MAJOR >= 4 else {}
_GALLERY: dict[str, Any] = {"columns": 4, "height": "auto"} if _GRADIO_MAJOR >= 4 else {}


def _has_custom_values() -> bool:
    import inspect

    return "allow_custom_value" in inspect.signature(gr.Dropdown.__init__).parameters


def _specs(cls) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in cls.describe()}


# -- what a watched job looks like ---------------------------------------------------------------------
#: What every job view fills, in this order: the outputs of Train, Interrupt, Resume, Show and Open.
#: `names` is the trained kind's list (refreshed when a job ends, so a new file is there at once).
OUTPUTS = ("status", "error", "loss", "lr", "previews", "files", "job_id", "names")
#: points drawn per chart: a 100000-step run keeps the browser fast (every point is in the CSV)
CHART_POINTS = 1500


def _thin(rows: list, limit: int = CHART_POINTS) -> list:
    if len(rows) <= limit:
        return rows
    stride = -(-len(rows) // limit)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


def _thin_index(n: int, limit: int = CHART_POINTS) -> list[int]:
    """The indices `_thin` keeps of `n` rows (so only those rows are built)."""
    if n <= limit:
        return list(range(n))
    stride = -(-n // limit)
    return list(range(0, n, stride)) + ([n - 1] if (n - 1) % stride else [])


def loss_frame(loss: list, validation: list, best: list | None = None, smoothed: list | None = None):
    """Long-form table for the loss chart: loss, its smoothed curve and validation loss against step,
    and the best validation step (one point) when the run tracks it. Only the drawn points are built
    into rows. `smoothed`: the smoothed losses when the caller keeps them (`_Smoothed`)."""
    import pandas as pd

    if smoothed is None:
        smoothed = smooth([float(row[1]) for row in loss])
    keep = _thin_index(len(loss))
    rows = [(int(loss[i][0]), float(loss[i][1]), "loss") for i in keep]
    rows += [(int(loss[i][0]), smoothed[i], "smoothed loss") for i in keep]
    rows += _thin([(int(s), float(v), "validation loss") for s, v in validation])
    if best:  # a vertical mark at the best step, from the chart's lowest value up to its loss
        low = min([float(best[1])] + [r[1] for r in rows if math.isfinite(r[1])])
        rows += [(int(best[0]), low, "best validation"), (int(best[0]), float(best[1]), "best validation")]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def lr_frame(loss: list):
    import pandas as pd

    rows = [(int(loss[i][0]), float(loss[i][2])) for i in _thin_index(len(loss))]
    return pd.DataFrame(rows, columns=["step", "learning rate"])


class _Smoothed:
    """A job's smoothed loss curve, extended by the losses added since the last view (`smooth` over the
    whole history on every poll grew with the run: a 10k-step run watched in a tab slowed its steps)."""

    def __init__(self, weight: float = 0.9):
        self.weight, self.avg, self.values = weight, 0.0, []

    def extend(self, loss: list) -> list[float]:
        w = self.weight
        for i in range(len(self.values), len(loss)):
            self.avg = w * self.avg + (1 - w) * float(loss[i][1])
            self.values.append(self.avg / (1 - w ** (i + 1)))
        return self.values


#: the last view built per job, with the job's event number it was built at, and its smoothed curve: every
#: open tab polls its job each second (and the Jobs tab the one it opened), so a view is built once per
#: change whatever the number of viewers, and a build costs what changed plus the points drawn
_VIEWS: dict[str, tuple[int, dict[str, Any], _Smoothed]] = {}
_VIEWS_LOCK = threading.Lock()


def job_view(job: Job | None) -> dict[str, Any]:
    """What the output column shows for one job: status line, charts' tables, previews, files, error.
    Built again only when the job has reported something since the last build."""
    if job is None:
        return {"status": "No sdtrain job yet.", "error": "", "loss": None, "lr": None, "previews": [], "files": ""}
    seq = job.last_seq
    with _VIEWS_LOCK:
        cached = _VIEWS.get(job.id)
        if cached is not None and cached[0] == seq:
            return cached[1]
        smoothed = cached[2] if cached is not None else _Smoothed()
        view = _build_view(job, smoothed)
        if len(_VIEWS) > 16:  # only the jobs being watched are worth keeping
            _VIEWS.clear()
        _VIEWS[job.id] = (seq, view, smoothed)
    return view


def _build_view(job: Job, smoothed: _Smoothed) -> dict[str, Any]:
    d = job.to_dict(history=False)
    loss_history, validation_history = job.history()
    last_step = job.last_event("step")
    text = last_step.data.get("text", "") if last_step is not None else ""
    status = f"<b>{html.escape(job.kind.replace('_', ' '))}</b> <span class='sdtrain-state'>{html.escape(d['state'])}</span>"
    name = d["config"].get("embedding_name") or d["config"].get("hypernetwork_name") or d["config"].get("name")
    if name:
        status += f" — {html.escape(str(name))}"
    if text and d["state"] in FINISHED_STATES:  # no time left to estimate
        text = re.sub(r",?\s*ETA\b.*$", "", text)
    if text:  # "loss …, lr …, step n/N, it/s, ETA"
        status += f"<br><span class='sdtrain-progress'>{html.escape(text)}</span>"
    elif d["total_steps"]:
        status += f"<br>step {d['step']}/{d['total_steps']}"
    warned = [w["text"] for w in d["warnings"]]  # e.g. the run does not learn (core.training.watchdog)
    message = job.message
    for text in warned:  # shown once, marked, below
        message = message.replace(f"Warning: {text}", "").strip()
    if message:
        status += f"<br>{html.escape(message)}"
    for text in warned:
        status += f"<br><span class='sdtrain-warning'>Warning: {html.escape(text)}</span>"
    loss = lr = None
    if loss_history:
        best = list(job.best) if job.best is not None else None
        loss = loss_frame(loss_history, validation_history, best, smoothed.extend(loss_history))
        lr = lr_frame(loss_history)
    gallery = list(d["previews"])
    if job.kind == "preprocess":  # a few of the prepared images
        gallery = [f for f in d["files"] if f.lower().endswith(".png")][:12]
    return {"status": f"<div class='sdtrain-status'>{status}</div>",
            "error": f"<div class='error'>{html.escape(d['error'])}</div>" if d["error"] else "",
            "loss": loss, "lr": lr, "previews": gallery, "files": "\n".join(d["files"])}


def _row(view: dict[str, Any], job_id: str = "", names: Any = None) -> tuple:
    view = {**view, "job_id": job_id, "names": names if names is not None else gr.update()}
    return tuple(view[k] for k in OUTPUTS)


def watch(service: JobService, job: Job | None, poll: float = 1.0, names: Callable[[], Any] | None = None
          ) -> Iterator[tuple]:
    """Yield the job's view (OUTPUTS order) until it finishes: a generator event, gradio streams each
    yield. At the end `names()` gives the refreshed list for the kind's dropdown."""
    if job is None:
        yield _row(job_view(None))
        return
    shown = -1
    while True:
        finished = job.wait(poll)
        done = finished or job.state in FINISHED_STATES
        seq = job.last_seq
        if seq == shown and not done:  # nothing new: the page keeps what it shows
            continue
        shown = seq
        yield _row(job_view(job), job.id, names() if done and names is not None else None)
        if done:
            return


def _failed(e: Exception) -> tuple:
    return _row({**job_view(None), "status": "", "error": _error(e)})


def _error(e: Exception) -> str:
    return f"<div class='error'>{html.escape(str(e))}</div>"


def _output_column(ctx: UiContext, prefix: str, *, charts: bool = True, gallery_label: str = "Previews") -> dict:
    """The live output: status, error, loss and learning-rate charts (values on hover), previews, files."""
    out: dict[str, Any] = {}
    out["status"] = gr.HTML(elem_id=f"{prefix}_status")
    out["error"] = gr.HTML(elem_id=f"{prefix}_error")
    if charts:
        hover = {"tooltip": ["step", "value", "series"], "overlay_point": True} if _GRADIO_MAJOR < 4 else {}
        out["loss"] = gr.LinePlot(x="step", y="value", color="series", title="Loss", label="Loss", height=220,
                                  elem_id=f"{prefix}_loss_chart", **hover)
        hover = {"tooltip": ["step", "learning rate"], "overlay_point": True} if _GRADIO_MAJOR < 4 else {}
        out["lr"] = gr.LinePlot(x="step", y="learning rate", title="Learning rate", label="Learning rate",
                                height=140, elem_id=f"{prefix}_lr_chart", **hover)
    else:  # keeps the outputs uniform
        out["loss"], out["lr"] = gr.State(None), gr.State(None)
    out["previews"] = gr.Gallery(label=gallery_label, elem_id=f"{prefix}_previews", **_GALLERY)
    out["files"] = gr.Textbox(label="Files written", lines=3, interactive=False, elem_id=f"{prefix}_files")
    out["job_id"] = gr.Textbox(visible=False, elem_id=f"{prefix}_job_id")
    footer(prefix)
    return out


# -- the tabs -----------------------------------------------------------------------------------------
def build_all_tabs(ctx: UiContext) -> None:
    """Every sub-tab: Textual inversion, Hypernetwork, Preprocess images, Jobs. A host difference must
    not take the whole UI down: a list the host cannot give is empty (and said so in the tab), and a
    sub-tab that fails to build is replaced by one that shows the error, while the others work."""
    problems: list[str] = []
    safe = dataclasses.replace(
        ctx,
        embedding_names=_guarded(ctx.embedding_names, [], problems),
        refresh_embeddings=_guarded(ctx.refresh_embeddings, [], problems),
        hypernetwork_names=_guarded(ctx.hypernetwork_names, [], problems),
        refresh_hypernetworks=_guarded(ctx.refresh_hypernetworks, [], problems),
        template_names=_guarded(ctx.template_names, [], problems),
        embedding_note=_guarded(ctx.embedding_note, "", problems),
        model_note=_guarded_note(ctx.model_note, problems),
        captioner_note=_guarded(ctx.captioner_note, "", problems),
        tensorboard_note=_guarded(ctx.tensorboard_note, "", problems),
        optimizer_note=_guarded(ctx.optimizer_note, "", problems),
        host_note=_guarded(ctx.host_note, "", problems),
    )
    note = safe.host_note()
    if note:  # a feature this host lacks: said once, above the sub-tabs
        gr.HTML(value=note, elem_id="sdtrain_host_note")
    for listing in (safe.embedding_names, safe.hypernetwork_names, safe.template_names):
        listing()  # ask once up front, so the notes built below already say what is missing
    for title, build in (("Textual inversion", build_embedding_tab), ("Hypernetwork", build_hypernetwork_tab),
                         ("Preprocess images", build_preprocess_tab), ("Jobs", build_jobs_tab)):
        try:
            build(safe)
        except Exception as e:  # shown in its place; the other tabs still build
            log.exception("sdtrain: the %s tab failed to build", title)
            with gr.Tab(label=f"{title} (sdtrain)", elem_id=f"sdtrain_{title.split()[0].lower()}_failed"):
                gr.HTML(value=_error(e))


def footer(prefix: str):
    """The last line of each sdtrain sub-tab: its version (pyproject.toml's) and license."""
    return gr.HTML(value=f'<div class="sdtrain-note">sdtrain {html.escape(version())} · AGPL-3.0</div>',
                   elem_id=f"{prefix}_footer", elem_classes=["sdtrain-footer"])


def build_embedding_tab(ctx: UiContext) -> None:
    """"Textual inversion (sdtrain)": create (a compact section) and train an embedding in one place."""
    _kind_tab(ctx, EMBEDDING, "Textual inversion", ctx.embedding_names, ctx.refresh_embeddings, ctx.embedding_note)


def build_hypernetwork_tab(ctx: UiContext) -> None:
    """"Hypernetwork (sdtrain)": the same for a hypernetwork."""
    _kind_tab(ctx, HYPERNETWORK, "Hypernetwork", ctx.hypernetwork_names, ctx.refresh_hypernetworks, lambda: "")


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


def _kind_tab(ctx: UiContext, tk: TabKind, title: str, list_names, refresh_names, list_note) -> None:
    """Options on the left (a Create section, then the training form, the host's fields first);
    actions and the live output on the right, beside the form, where they stay in view."""
    create_specs, train_specs = _specs(tk.create), _specs(tk.train)
    cprefix, prefix = f"sdtrain_create_{tk.noun}", f"sdtrain_train_{tk.noun}"
    tab = f"sdtrain_{tk.noun}"
    widgets: dict[str, Any] = {}
    with gr.Tab(label=f"{title} (sdtrain)", id=tab, elem_id=tab):
        gr.HTML(value=ctx.model_note, elem_id=f"{prefix}_model_note")  # the family and what a file holds
        with gr.Row(equal_height=False, elem_classes=["sdtrain-columns"]):
            with gr.Column(scale=3, elem_id=f"{tab}_form"):
                with gr.Accordion(f"Create {tk.noun}", open=not list_names(), elem_id=f"{cprefix}_section"):
                    create_inputs = [_widget(create_specs[n], f"{cprefix}_{n}") for n in tk.create_fields]
                    create = gr.Button(value=f"Create {tk.noun}", variant="primary", elem_id=f"{cprefix}_button")
                    created = gr.Textbox(show_label=False, elem_id=f"{cprefix}_output", interactive=False)
                    create_error = gr.HTML(elem_id=f"{cprefix}_error")
                with gr.Row():
                    widgets[tk.name_field] = _widget(train_specs[tk.name_field], f"{prefix}_{tk.name_field}",
                                                     choices=list_names())
                    refresh = gr.Button(value="\U0001f504", elem_id=f"{prefix}_refresh", elem_classes=["tool"])
                note = gr.HTML(value=list_note, elem_id=f"{prefix}_list_note")
                preset_note = None
                if "preset" in train_specs:  # embeddings: the measured presets (core.options.presets)
                    widgets["preset"] = _widget(train_specs["preset"], f"{prefix}_preset")
                    preset_note = gr.HTML(value="", elem_id=f"{prefix}_preset_note")
                for n in tk.main[1:]:
                    choices = ctx.template_names() if n == "template_filename" else None
                    widgets[n] = _widget(train_specs[n], f"{prefix}_{n}", choices=choices)
                with gr.Accordion("sdtrain options", open=False, elem_id=f"{prefix}_extra"):
                    for n in tk.extra:
                        widgets[n] = _widget(train_specs[n], f"{prefix}_{n}")
                    gr.HTML(value=ctx.optimizer_note, elem_id=f"{prefix}_optimizer_note")
                    for section, names in tk.sections:
                        with gr.Accordion(section, open=False):
                            for n in names:
                                widgets[n] = _widget(train_specs[n], f"{prefix}_{n}")
                    gr.HTML(value=ctx.tensorboard_note, elem_id=f"{prefix}_tensorboard_note")
            with gr.Column(scale=2, elem_id=f"{tab}_output", elem_classes=["sdtrain-output"]):
                with gr.Row():
                    train = gr.Button(value=f"Train {tk.noun.capitalize()}", variant="primary",
                                      elem_id=f"{prefix}_button")
                    stop = gr.Button(value="Interrupt", elem_id=f"{prefix}_stop")
                with gr.Row():
                    resume = gr.Button(value="Resume last run", size="sm", elem_id=f"{prefix}_resume")
                    show = gr.Button(value="Show latest job", size="sm", elem_id=f"{prefix}_watch")
                out = _output_column(ctx, prefix)
    names = widgets[tk.name_field]
    out["names"] = names

    def refreshed(value: Any = None) -> Any:
        return gr.update(choices=refresh_names(), **({"value": value} if value else {}))

    refresh.click(lambda: (refreshed(), list_note()), outputs=[names, note])

    def create_one(*values):
        kind = tk.create.kind
        data = tk.create.merge_defaults(ctx.defaults(kind), dict(zip(tk.create_fields, values)))
        try:
            job = ctx.service.run(kind, data)
        except SdtrainError as e:
            return "", _error(e), gr.update(), list_note()
        if job.error:
            return "", _error(Exception(job.error)), gr.update(), list_note()
        # the new file is listed and selected for training at once
        return f"Created: {job.result}", "", refreshed(job.config.name), list_note()

    create.click(create_one, inputs=create_inputs, outputs=[created, create_error, names, note])
    if preset_note is not None:
        _wire_preset(tk.train.kind, widgets, preset_note)
    _wire_job(ctx, tk.train.kind, widgets, list(ctx.txt2img_preview_params), out, start=train, stop=stop,
              show=show, resume=resume, names=refreshed)


def preset_view(kind: str, name: str, shown: list[str]) -> tuple[str, dict[str, Any]]:
    """(the note beside the preset choice, field -> value the form takes) for preset `name`; every field of
    the preset is one the form shows (`shown`)."""
    from lib_sdtrain.core.options.presets import PRESETS, preset_fields

    fields = preset_fields(kind, name)
    if not fields:
        return "", {}
    sets = ", ".join(f"{k} = {v}" for k, v in fields.items())
    note = f"<span class='sdtrain-note'>{html.escape(PRESETS[name].summary)} It sets: {html.escape(sets)}.</span>"
    return note, {k: v for k, v in fields.items() if k in shown}


def _wire_preset(kind: str, widgets: dict[str, Any], note) -> None:
    """Picking a preset sets the form's fields to its values (what runs is what the form shows)."""
    from lib_sdtrain.core.options.presets import PRESETS

    names = sorted({k for p in PRESETS.values() for k in p.fields.get(kind, {}) if k in widgets})
    targets = [widgets[n] for n in names]

    def picked(name: str):
        text, values = preset_view(kind, name or "none", names)
        return (text, *[gr.update(value=values[n]) if n in values else gr.update() for n in names])

    widgets["preset"].change(picked, inputs=[widgets["preset"]], outputs=[note, *targets])


PREPROCESS_SECTIONS = (
    (None, ("process_src", "process_dst", "process_width", "process_height", "preprocess_txt_action",
            "process_keep_original_size", "process_flip", "process_split", "process_focal_crop", "process_multicrop",
            "process_caption", "process_caption_deepbooru", "overwrite", "validation_split")),
    ("Split oversized images", ("process_split_threshold", "process_overlap_ratio")),
    ("Auto focal point crop", ("process_focal_crop_face_weight", "process_focal_crop_entropy_weight",
                               "process_focal_crop_edges_weight", "process_focal_crop_debug")),
    ("Auto-sized crop", ("process_multicrop_mindim", "process_multicrop_maxdim", "process_multicrop_minarea",
                         "process_multicrop_maxarea", "process_multicrop_objective", "process_multicrop_threshold")),
)


def build_preprocess_tab(ctx: UiContext) -> None:
    """"Preprocess images (sdtrain)": photos in a folder → a training set in another folder."""
    from lib_sdtrain.core.preprocess.operations import PreprocessConfig

    specs, prefix = _specs(PreprocessConfig), "sdtrain_preprocess"
    widgets: dict[str, Any] = {}
    with gr.Tab(label="Preprocess images (sdtrain)", id=prefix, elem_id=prefix):
        gr.HTML(value=ctx.captioner_note, elem_id=f"{prefix}_captioners")
        with gr.Row(equal_height=False, elem_classes=["sdtrain-columns"]):
            with gr.Column(scale=3, elem_id=f"{prefix}_form"):
                for title, names in PREPROCESS_SECTIONS:
                    with gr.Accordion(title, open=False) if title else gr.Group():
                        for n in names:
                            widgets[n] = _widget(specs[n], f"{prefix}_{n}")
            with gr.Column(scale=2, elem_id=f"{prefix}_output", elem_classes=["sdtrain-output"]):
                with gr.Row():
                    run = gr.Button(value="Preprocess", variant="primary", elem_id=f"{prefix}_button")
                    stop = gr.Button(value="Interrupt", elem_id=f"{prefix}_stop")
                out = _output_column(ctx, prefix, charts=False, gallery_label="Output")
    out["names"] = gr.State(None)
    _wire_job(ctx, PreprocessConfig.kind, widgets, [], out, start=run, stop=stop)


# -- Jobs: every job, whoever started it -----------------------------------------------------------------
JOB_COLUMNS = ["id", "kind", "name", "state", "step", "loss", "created"]


def jobs_table(service: JobService) -> list[list[Any]]:
    """Newest first: one row a job, from the tab, the API or another browser."""
    import time as _time

    rows = []
    for job in reversed(service.list()):
        d = job.to_dict(history=False)
        cfg = d["config"]
        name = cfg.get("embedding_name") or cfg.get("hypernetwork_name") or cfg.get("name") or cfg.get("process_dst", "")
        step = f"{d['step']}/{d['total_steps']}" if d["total_steps"] else str(d["step"] or "")
        loss = f"{d['last_loss']:.5f}" if isinstance(d["last_loss"], float) else ""
        rows.append([d["id"], d["kind"].replace("_", " "), str(name), d["state"], step, loss,
                     _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(d["created"]))])
    return rows or [["", "", "", "", "", "", ""]]


def build_jobs_tab(ctx: UiContext) -> None:
    """"Jobs (sdtrain)": the list (refreshed every few seconds), and for the picked job: open it (its
    status, charts, previews and files, live while it runs), stop a running one or cancel a queued
    one, resume a stopped, failed or interrupted one."""
    prefix = "sdtrain_jobs"
    service = ctx.service

    def choices() -> list[str]:
        return [row[0] for row in jobs_table(service) if row[0]]

    with gr.Tab(label="Jobs (sdtrain)", id=prefix, elem_id=prefix), gr.Row(equal_height=False,
                                                                             elem_classes=["sdtrain-columns"]):
            with gr.Column(scale=3, elem_id=f"{prefix}_form"):
                table = gr.Dataframe(value=lambda: jobs_table(service), headers=JOB_COLUMNS, interactive=False,
                                     every=ctx.jobs_refresh_seconds, elem_id=f"{prefix}_table", wrap=True)
                with gr.Row():
                    pick = _widget({"label": "Job", "default": None, "type": "str", "name": "job"},
                                   f"{prefix}_pick", choices=choices())
                    refresh = gr.Button(value="\U0001f504", elem_id=f"{prefix}_refresh", elem_classes=["tool"])
                with gr.Row():
                    show = gr.Button(value="Open", variant="primary", elem_id=f"{prefix}_open")
                    stop = gr.Button(value="Stop / cancel", elem_id=f"{prefix}_stop")
                    resume = gr.Button(value="Resume", elem_id=f"{prefix}_resume")
                message = gr.HTML(elem_id=f"{prefix}_message")
            with gr.Column(scale=2, elem_id=f"{prefix}_output", elem_classes=["sdtrain-output"]):
                out = _output_column(ctx, prefix)
    out["names"] = gr.State(None)
    outputs = [out[k] for k in OUTPUTS]

    refresh.click(lambda: (jobs_table(service), gr.update(choices=choices())), outputs=[table, pick])

    def picked(evt: gr.SelectData, rows):  # a click on a row picks its job
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return gr.update(value=_cell(rows, row, 0), choices=choices())
        except (IndexError, KeyError, TypeError):
            return gr.update()

    table.select(picked, inputs=[table], outputs=[pick])

    def open_job(job_id: str):
        yield from watch(service, service.get(job_id or ""), ctx.poll_seconds)

    def stop_job(job_id: str):
        job = service.get(job_id or "")
        if job is None:
            return _error(SdtrainError("Pick a job first.")), jobs_table(service)
        if job.state in FINISHED_STATES:
            return _error(SdtrainError(f"Job {job.id} has already finished ({job.state}).")), jobs_table(service)
        service.stop(job.id)
        return f"Asked job {html.escape(job.id)} to stop.", jobs_table(service)

    def resume_job(job_id: str):
        try:
            job = service.resume(job_id or "")
        except SdtrainError as e:
            yield _failed(e)
            return
        yield from watch(service, job, ctx.poll_seconds)

    show.click(open_job, inputs=[pick], outputs=outputs, show_progress=False, **_STREAMING)
    resume.click(resume_job, inputs=[pick], outputs=outputs, show_progress=False, **_STREAMING)
    stop.click(stop_job, inputs=[pick], outputs=[message, table], **_STREAMING)


def _cell(rows: Any, row: int, col: int) -> Any:
    """A cell of the Dataframe's value: a pandas frame (gradio 4), a {"data": ...} dict or a list (3)."""
    if hasattr(rows, "iloc"):
        return rows.iloc[row, col]
    if isinstance(rows, dict):
        rows = rows["data"]
    return rows[row][col]


def _wire_job(ctx: UiContext, kind: str, widgets: dict[str, Any], preview_inputs: list[Any], out: dict[str, Any], *,
              start, stop, show=None, resume=None, names: Callable[[], Any] | None = None) -> None:
    """Start (a generator streaming the job's view), Interrupt, re-attach to the latest job of a kind, and
    resume the latest stopped, failed or interrupted one (a webui restart cut it short) with its settings."""
    fields = list(widgets)
    outputs = [out[k] for k in OUTPUTS]

    def begin(*values):
        form = dict(zip(fields, values[: len(fields)]))
        if form.get("preview_from_txt2img") and preview_inputs:
            form.update(zip(PREVIEW_FIELDS, values[len(fields):]))
        cls = job_config_types()[kind]
        data = cls.merge_defaults(ctx.defaults(kind), {k: v for k, v in form.items() if v is not None})
        try:
            policy = ctx.write_policy()
            if policy is not None:
                data = policy.confine(cls, data)
            job = ctx.service.submit(kind, data)
        except SdtrainError as e:
            yield _failed(e)
            return
        yield from watch(ctx.service, job, ctx.poll_seconds, names)

    def latest():
        jobs = [j for j in ctx.service.list() if j.kind == kind]
        running = [j for j in jobs if j.state not in FINISHED_STATES]
        yield from watch(ctx.service, (running or jobs or [None])[-1], ctx.poll_seconds, names)

    def resume_latest():
        jobs = [j for j in ctx.service.list() if j.kind == kind]
        if jobs and jobs[-1].state in RESUMABLE_STATES:
            try:
                job = ctx.service.resume(jobs[-1].id)
            except SdtrainError as e:
                yield _failed(e)
                return
            yield from watch(ctx.service, job, ctx.poll_seconds, names)
            return
        why = f"the last {kind.replace('_', ' ')} job is {jobs[-1].state}" if jobs else "there is no job to resume"
        yield _failed(SdtrainError(f"Nothing to resume: {why}."))

    def stop_job(current: str):
        jobs = [j for j in ctx.service.list() if j.kind == kind and j.state not in FINISHED_STATES]
        target = ctx.service.get(current) if current else None
        for j in [target] if target is not None else jobs:
            ctx.service.stop(j.id)

    start.click(begin, inputs=[widgets[n] for n in fields] + preview_inputs, outputs=outputs, show_progress=False,
                **_STREAMING)
    if show is not None:
        show.click(latest, outputs=outputs, show_progress=False, **_STREAMING)
    if resume is not None:
        resume.click(resume_latest, outputs=outputs, show_progress=False, **_STREAMING)
    stop.click(stop_job, inputs=[out["job_id"]], outputs=[], **_STREAMING)
