"""Core: one training run of any trainable kind — the scaffolding the host's train_embedding and
train_hypernetwork share, written once.

`run_training` does what both host trainers do around the loop: read the data before touching
the model, build the schedules, write the settings file, take the GPU session, resume the
optimizer, run `run_loop` with the cadences (loss CSV, intermediate saves, validation, previews),
save the final file also after Stop/Interrupt or a non-finite loss, and report a `TrainResult`.
What differs per kind (what is trained, how it is made active, how a file is written, the names
of the log subfolder and CSV) comes from a `TrainingKind`: `textual_inversion.EmbeddingTraining`,
`hypernetwork_training.HypernetworkTraining`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.formats.fsutil import atomic_write, remove_stale_temporaries
from lib_sdtrain.core.jobs.service import JobControl
from lib_sdtrain.core.options.lr_schedule import Schedule
from lib_sdtrain.core.port import ImageSize, ModelInfo, PreviewRequest, SessionOptions, TrainingHost
from lib_sdtrain.core.training import distributed
from lib_sdtrain.core.training.batches import TrainingData, prepare_training_data, validation_loss
from lib_sdtrain.core.training.best import (
    best_in,
    final_note,
    make_tracker,
    trim_validation_csv,
    validation_note,
    write_validation_row,
)
from lib_sdtrain.core.training.ema import Ema, swapped_in
from lib_sdtrain.core.training.loop import (
    LoopHooks,
    LoopState,
    NonFiniteLoss,
    eta_text,
    report,
    run_loop,
    write_loss_row,
)
from lib_sdtrain.core.training.loss import LossOptions
from lib_sdtrain.core.training.optimizer_state import restore_optimizer
from lib_sdtrain.core.training.plot import save_loss_curve
from lib_sdtrain.core.training.resume import (
    ResumePoint,
    fingerprint,
    load_resume_point,
    remove_resume_point,
    resume_path,
    save_resume_point,
)
from lib_sdtrain.core.training.tensorboard import TensorBoardLog, tensorboard_log
from lib_sdtrain.core.training.watchdog import LearningWatch, NoLearning, Subject, schedule_warnings

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainingKind", "TrainingRun", "report_text", "run_training"]

#: Config fields every run writes to its settings file (the host's saving_settings.saved_params_shared
#: that come from the request), in the host's order.
_SHARED_SETTINGS = (
    "batch_size",
    "clip_grad_mode",
    "clip_grad_value",
    "create_image_every",
    "data_root",
    "gradient_step",
    "latent_sampling_method",
    "learn_rate",
    "log_directory",
    "steps",
    "training_height",
    "training_width",
)
_PREVIEW_SETTINGS = (
    "preview_cfg_scale",
    "preview_height",
    "preview_negative_prompt",
    "preview_prompt",
    "preview_sampler_name",
    "preview_seed",
    "preview_steps",
    "preview_width",
)


@dataclass
class TrainResult:
    file: str  # the trained file (the final save)
    step: int
    stopped: bool = False
    log_dir: str | None = None
    loss_csv: str | None = None
    loss_curve: str | None = None
    files: list[str] = field(default_factory=list)
    message: str = ""
    kind: str = "embedding"  # what `file` is: "embedding" or "hypernetwork"
    saved_step: int | None = None  # the step of the tensors in `file` (final_file "best": the best step)

    @property
    def embedding_file(self) -> str:
        """`file`, under the name textual-inversion callers know it by."""
        return self.file

    @property
    def hypernetwork_file(self) -> str:
        return self.file

    def __str__(self) -> str:
        return self.message or f"{self.kind} saved to {self.file} at step {self.step}"


class TrainingKind:
    """What one trainable kind contributes to a run. Subclasses set the names and implement
    `setup`, `active` and `save`; the other hooks default to nothing."""

    noun = ""  # "embedding" / "hypernetwork": messages and file events
    job_label = ""  # the host's shared.state.job: "train-embedding" / "train-hypernetwork"
    progress_label = ""  # "Training textual inversion" / "Training hypernetwork"
    log_subdir = ""  # intermediate saves: <log>/<date>/<name>/<log_subdir>/
    loss_csv = ""  # the host's CSV name
    require_name_in_template = True  # TI only learns from prompts with [name]

    #: set by the subclass' constructor
    name: str
    source: str  # the file the run starts from
    out_file: str  # the final file
    initial_step: int
    file_ext: str  # extension of intermediate saves
    save_every: int  # cadence of intermediate saves (0: never)

    def settings(self) -> dict[str, Any]:
        """Kind-specific entries of the settings file."""
        return {}

    def subject(self) -> Subject:
        """What is trained, in the words of the no-learning warnings (core.training.watchdog)."""
        return Subject(self.noun, f"the {self.noun}'s tensors", "Learning rate",
                       f"the {self.noun} takes no part in the model's forward pass.")

    def notes(self, info: ModelInfo) -> list[str]:
        """Warnings to log before training starts."""
        return []

    def no_learning(self, start: int) -> list[NoLearning]:
        """Settings of this kind that keep a run from learning (warned about before it starts)."""
        return []

    def setup(self, device: torch.device, lr: float) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        """The live trainable tensors (on `device`) and their optimizer."""
        raise NotImplementedError

    def resume(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Load the saved optimizer state that belongs to `source`; a line for the log, or None."""
        return None

    def group_rates(self, main: Schedule, run_start: int, gradient_step: int) -> Callable[[int], list[float]] | None:
        """step → one learning rate per optimizer parameter group, when the groups have rates of their
        own; None: every group takes `main`'s rate."""
        return None

    def after_update(self, step: int) -> None:
        """Right after each optimizer step (before the EMA and the saves see the tensors)."""

    def summary(self, step: int) -> list[str]:
        """Lines for the log after the final save."""
        return []

    def encoder(self, host: TrainingHost) -> Callable[[list[str], list[ImageSize] | None], Any]:
        """(prompts, sizes) → conditioning for the loop."""
        return host.encode_text

    def active(self, host: TrainingHost) -> AbstractContextManager[Any]:
        """Make the trained thing take part in the host's forward passes."""
        raise NotImplementedError

    def evaluating(self) -> AbstractContextManager[Any]:
        """The state for previews and the validation loss (e.g. dropout off)."""
        return contextlib.nullcontext()

    def intermediate(self, step: int) -> tuple[str, str]:
        """(file stem, name stored inside) of the intermediate save at `step`."""
        return f"{self.name}-{step}", f"{self.name}-{step}"

    def save(self, optimizer: torch.optim.Optimizer, step: int, path: str, stored_name: str) -> None:
        """Write the file (and its optimizer sidecar when configured)."""
        raise NotImplementedError

    def after_intermediate(self, step: int, stored_name: str) -> None:
        pass

    def after_preview(self, run: TrainingRun, image: Image.Image, state: LoopState) -> None:
        pass

    def finish(self) -> None:
        """After the final save (also after a failure inside the loop)."""


class TrainingRun:
    """One run's outputs: log folder, events, settings file, previews."""

    def __init__(self, host: TrainingHost, cfg: Any, control: JobControl | None, kind: TrainingKind):
        self.host, self.cfg, self.control, self.kind = host, cfg, control, kind
        self.name = kind.name
        self.info = host.describe()
        self.files: list[str] = []
        self.warnings: list[NoLearning] = []
        self.resumed_from: int | None = None  # the step an interrupted run's resume point was at
        self.tensorboard = TensorBoardLog()  # the run's TensorBoard events (nothing unless the setting is on)
        day = datetime.datetime.now().strftime("%Y-%m-%d")
        self.log_dir = os.path.join(cfg.log_directory, day, self.name) if cfg.log_directory else None

    def emit(self, kind: str, **data: Any) -> None:
        if self.control is not None:
            self.control.emit(kind, **data)

    def say(self, text: str) -> None:
        """A line for the run's log (the job's status shows it)."""
        self.emit("log", text=text)

    def warn(self, warning: NoLearning | None) -> None:
        """A warning that does not stop the run: the log, and the job's record and status."""
        if warning is None:
            return
        self.warnings.append(warning)
        log.warning("sdtrain: %s: %s", self.name, warning.text)
        self.emit("warning", text=warning.text, code=warning.code, step=warning.step)

    def wrote(self, path: str, what: str) -> str:
        self.files.append(path)
        self.emit("file", path=path, what=what)
        return path

    def save(
        self, optimizer: torch.optim.Optimizer, step: int, path: str, stored_name: str, what: str
    ) -> str:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.kind.save(optimizer, step, path, stored_name)
        except OSError as e:  # disk full, read-only folder, a locked file: the writes are atomic
            reason = e.strerror or str(e)
            raise SdtrainError(f"could not save the {what} at step {step} to {path}: {reason}; the file "
                               "there (if any) is unchanged") from e
        return self.wrote(path, what)

    def settings_file(self, data: TrainingData) -> None:
        if not (self.cfg.save_training_settings_to_txt and self.log_dir):
            return
        os.makedirs(self.log_dir, exist_ok=True)
        cfg = self.cfg
        # the host's key set (modules/textual_inversion/saving_settings.py) plus the full sdtrain config
        params: dict[str, Any] = {
            "datetime": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            **{k: getattr(cfg, k) for k in _SHARED_SETTINGS},
            **self.kind.settings(),
            "initial_step": self.kind.initial_step,
            "model_hash": self.info.checkpoint_hash,
            "model_name": self.info.checkpoint_name,
            "num_of_dataset_images": len(data),
            "template_file": cfg.template_path(),
        }
        if cfg.preview_from_txt2img:
            params.update({k: getattr(cfg, k) for k in _PREVIEW_SETTINGS})
        params["sdtrain_config"] = cfg.to_dict()
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        path = os.path.join(self.log_dir, f"settings-{stamp}.json")
        text = json.dumps(params, indent=4)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self.wrote(path, "settings")

    def preview(self, state: LoopState) -> None:
        cfg = self.cfg
        if cfg.preview_from_txt2img:
            req = PreviewRequest(
                prompt=cfg.preview_prompt,
                negative_prompt=cfg.preview_negative_prompt,
                steps=cfg.preview_steps,
                sampler_name=cfg.preview_sampler_name,
                cfg_scale=cfg.preview_cfg_scale,
                seed=cfg.preview_seed,
                width=cfg.preview_width,
                height=cfg.preview_height,
                extra={"from_txt2img": True},
            )
        else:  # the host previews the last training prompt at the training size, 20 steps
            req = PreviewRequest(
                prompt=state.last_prompt,
                steps=cfg.preview_steps,
                width=cfg.training_width,
                height=cfg.training_height,
                seed=cfg.preview_seed,
            )
        with self.kind.evaluating():
            image = self.host.render_preview(req)
        if image is None or not self.log_dir:
            return
        images_dir = os.path.join(self.log_dir, "images")
        os.makedirs(images_dir, exist_ok=True)
        path = os.path.join(images_dir, f"{self.name}-{state.step}.png")
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        self.files.append(path)
        self.emit("preview", path=path, step=state.step, prompt=req.prompt)
        self.tensorboard.image(image, state.step, state.steps_per_epoch)
        self.kind.after_preview(self, image, state)


def report_text(state: LoopState) -> str:
    return f"loss {state.last_loss:.5f}, lr {state.last_lr:.3g}, {eta_text(state)}"


def data_order_state(data: TrainingData) -> tuple[Any, torch.Tensor, list[list[int]]]:
    """What decides the data of the coming epochs: the Python generator (epoch shuffles, templates,
    tags, flips), the latent-sampling generator, and the order the sampler's groups were left in
    (it shuffles them in place, as the host's sampler does, so each epoch starts from the last one's)."""
    ds = data.dataset
    return ds.rng.getstate(), ds.generator.get_state(), [list(g) for g in ds.sampler.groups]


def set_data_order_state(data: TrainingData, state: tuple[Any, torch.Tensor, list[list[int]]]) -> None:
    ds = data.dataset
    py_state, gen_state, groups = state
    ds.rng.setstate(py_state)
    ds.generator.set_state(gen_state)
    for live, saved in zip(ds.sampler.groups, groups):
        live[:] = saved


def _resume_point(cfg: Any, kind: TrainingKind, writer: bool = True) -> tuple[ResumePoint | None, str]:
    """The resume point this run continues from, if any, and a line for the log."""
    if not getattr(cfg, "resume_interrupted", False):
        if writer:
            remove_resume_point(kind.out_file)
        return None, ""
    try:
        point = load_resume_point(kind.out_file)
    except SdtrainError as e:
        return None, f"ignored a resume point: {e}"
    if point is None:
        return None, ""
    if point.fingerprint != fingerprint(cfg):
        return None, (f"ignored {resume_path(kind.out_file)}: it was made with other training settings "
                      "(start over from the file, or run with the interrupted run's settings)")
    return point, ""


def _apply_resume_point(point: ResumePoint, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                        generator: torch.Generator, state: LoopState, ema: Ema | None = None) -> str | None:
    """Put the interrupted run's state back; None when done, else why it does not fit (nothing changed)."""
    if len(point.params) != len(params) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(point.params, params)):
        return "its tensors do not have the shapes of the ones this run trains"
    if ema is not None and not ema.fits(point.ema, params):
        return "its moving average (EMA) does not have the shapes of the tensors this run trains"
    why = restore_optimizer(optimizer, point.optimizer)
    if why:
        return why
    with torch.no_grad():
        for live, saved in zip(params, point.params):
            live.copy_(saved.to(live.device, live.dtype))
    generator.set_state(point.generator)
    torch.set_rng_state(point.torch_rng)
    state.step = point.step
    state.epoch_data_state = point.epoch_data_state
    state.skip_micro = point.micro_in_epoch
    state.resuming = True
    if ema is not None:
        ema.load(point.ema, params)
    return None


def _announce(run: TrainingRun, data: TrainingData, start: int, lr_sched: Schedule, clip_sched: Schedule | None
              ) -> None:
    """Before the model is touched: what the data check found, the kind's notes, schedules that train
    nothing, and the settings file."""
    cfg, kind = run.cfg, run.kind
    for path, reason in data.skipped:
        run.emit("log", text=f"skipped {path}: {reason}")
    for note in data.notes + kind.notes(run.info) + validation_note(cfg, data):
        run.emit("log", text=note)
    for warning in schedule_warnings(kind.subject(), start, cfg.steps, lr_sched.value, cfg.learn_rate,
                                     clip_sched.value if clip_sched else None, cfg.clip_grad_value
                                     ) + kind.no_learning(start):
        run.warn(warning)
    run.settings_file(data)


def _result(run: TrainingRun, state: LoopState, saved_step: int, tracker: Any, curve: str | None) -> TrainResult:
    """What the run reports: its files, and a message with how it ended and any warning."""
    kind, noun = run.kind, run.kind.noun
    result = TrainResult(kind.out_file, state.step, stopped=state.stopped, log_dir=run.log_dir, files=run.files,
                         kind=noun, saved_step=saved_step, loss_curve=curve)
    csv_path = os.path.join(run.log_dir, kind.loss_csv) if run.log_dir else None
    if csv_path and os.path.exists(csv_path):
        result.loss_csv = csv_path
    verb = "interrupted" if state.stopped else "finished"
    resumed = f" (resumed from step {run.resumed_from})" if run.resumed_from is not None else ""
    result.message = f"Training {verb} at {state.step} steps{resumed}.\n{noun.capitalize()} saved to {kind.out_file}"
    result.message += final_note(run.cfg, tracker, state.step, saved_step, state.stopped)
    result.message += "".join(f"\nWarning: {w}" for w in run.warnings)
    return result


@dataclass
class _Plan:
    """Phase 1's outcome: what is settled before the model is touched."""

    point: ResumePoint | None  # the interrupted run this one continues, if any
    seed: int
    run_start: int  # the step the rate language counts from
    data: TrainingData
    lr_sched: Schedule
    group_lrs: Callable[[int], list[float]] | None
    clip_sched: Schedule | None


def _plan(run: TrainingRun, dp: Any) -> _Plan | TrainResult:
    """Phase 1, without the model: stale temporaries, the resume point, the seed, the data read and
    checked, the schedules, the warnings and the settings file. A TrainResult: nothing to train."""
    cfg, kind = run.cfg, run.kind
    for stale in remove_stale_temporaries(kind.out_file) if dp.is_writer else ():
        run.emit("log", text=f"removed {stale}, left by a save that was cut short")
    point, why = _resume_point(cfg, kind, dp.is_writer)
    if why:
        run.emit("log", text=why)
    if point is None and kind.initial_step >= cfg.steps:
        return TrainResult(kind.source, kind.initial_step, kind=kind.noun, message=(
            f"{run.name} is already trained to step {kind.initial_step} (max steps {cfg.steps}); nothing to do"))
    seed = dp.same_int(point.seed if point else cfg.seed if cfg.seed >= 0 else random.randrange(2**31))
    run_start = point.run_start_step if point else kind.initial_step
    data = prepare_training_data(cfg, placeholder=run.name, seed=seed, validation_count=cfg.validation_images,
                                 require_name=kind.require_name_in_template, family=run.info.family)
    dp.check_batch(data.dataset.batch_size)
    lr_sched = cfg.lr_schedule(run_start, data.gradient_step)
    plan = _Plan(point, seed, run_start, data, lr_sched, kind.group_rates(lr_sched, run_start, data.gradient_step),
                 cfg.clip_schedule(run_start, data.gradient_step))
    _announce(run, data, point.step if point else kind.initial_step, lr_sched, plan.clip_sched)
    return plan


class _Training:
    """Phases 2-4, inside the GPU session: the trained tensors with their optimizer, EMA and validation
    tracker (phase 2, `__init__`); the loop with what each step runs after it — loss CSV, intermediate
    saves, validation, previews, resume points (phase 3, `train`); the final save (phase 4, `finish`)."""

    def __init__(self, run: TrainingRun, plan: _Plan, dp: Any, session: Any) -> None:
        cfg, kind, host = run.cfg, run.kind, run.host
        self.run, self.plan, self.dp, self.session, self.cfg, self.kind = run, plan, dp, session, cfg, kind
        self.generator = torch.Generator().manual_seed(plan.seed)
        self.autocast_dtype = {"auto": run.info.autocast_dtype, "no": None, "fp16": torch.float16,
                               "bf16": torch.bfloat16}[cfg.mixed_precision]
        self.schedule = host.noise_schedule()
        self.loss_options = LossOptions.from_config(cfg, self.schedule)  # the validation loss stays the plain one
        self.params, self.optimizer = kind.setup(run.info.device, plan.lr_sched.value(kind.initial_step))
        self.state = LoopState(step=kind.initial_step, start_step=kind.initial_step, total=cfg.steps,
                               steps_per_epoch=plan.data.steps_per_epoch)
        self.ema = Ema(cfg.ema_decay, cfg.ema_start_step) if cfg.ema_decay > 0 else None
        self.tracker = make_tracker(cfg)  # the best validation step (None: no validation)
        self._resume()
        dp.decorrelate_rng()  # dropout: each process its own draws
        self.watch = LearningWatch(kind.subject(), self.params, self.state.step, cfg.steps,
                                   warmup=cfg.lr_warmup_steps if cfg.lr_scheduler != "dsl" else 0,
                                   quiet=any(w.code == "zero_rate" for w in run.warnings))  # said it all
        self.fingerprint = fingerprint(cfg)
        self.last_point = time.monotonic()
        self.curve_path = os.path.join(run.log_dir, "loss.png") if run.log_dir else None
        self.history: list[tuple[int, float]] = []
        self.val_history: list[tuple[int, float]] = []

    def _resume(self) -> None:
        """The interrupted run's state when its resume point fits, else the file's optimizer state."""
        run, point = self.run, self.plan.point
        if point is not None:
            why = _apply_resume_point(point, self.params, self.optimizer, self.generator, self.state, self.ema)
            if why:
                run.emit("log", text=f"ignored {resume_path(self.kind.out_file)}: {why}; starting from the file")
                self.plan.point = None
            else:
                run.emit("log", text=f"resumed from step {point.step} (where the interrupted run was)")
                run.resumed_from = point.step
                if self.tracker is not None and point.validation is not None:
                    self.tracker.load(point.validation)  # its evaluations count on, none is made again
                    if run.log_dir:
                        trim_validation_csv(run.log_dir, point.step)
                return
        resumed = self.kind.resume(self.optimizer)
        if resumed:
            run.emit("log", text=resumed)
        if self.ema is not None:
            self.ema.begin(self.params, self.state.step)

    # -- what runs around the steps ------------------------------------------------------------
    def keep_resume_point(self, st: LoopState) -> None:
        if not self.dp.is_writer:
            return
        ema, tracker = self.ema, self.tracker
        save_resume_point(self.kind.out_file, ResumePoint(
            step=st.step, run_start_step=self.plan.run_start, seed=self.plan.seed, fingerprint=self.fingerprint,
            params=self.params, optimizer=self.optimizer.state_dict(),
            scaler=st.scaler.state_dict() if st.scaler else None, generator=self.generator.get_state(),
            torch_rng=torch.get_rng_state(), epoch_data_state=st.epoch_data_state, micro_in_epoch=st.micro_in_epoch,
            ema=ema.state() if ema is not None else None,
            validation=tracker.state() if tracker is not None else None))
        self.last_point = time.monotonic()

    def ema_in(self, use: bool) -> AbstractContextManager[Any]:
        """The EMA tensors in the live ones for a save, preview or validation, when `use` and begun."""
        return swapped_in(self.params, self.ema.tensors if use and self.ema is not None else None)

    def curve(self) -> str | None:
        if not (self.curve_path and self.history):
            return None
        tracker = self.tracker
        return save_loss_curve(
            self.curve_path, [s for s, _ in self.history], [v for _, v in self.history],
            validation=self.val_history,
            best=(tracker.best_step, tracker.best_loss) if tracker and tracker.best_step is not None else None,
            title=f"{self.run.name} loss")

    def validate(self, step: int) -> None:
        run, tracker = self.run, self.tracker
        with self.kind.evaluating(), self.ema_in(self.cfg.ema_for_previews):
            loss = validation_loss(run.host, self.schedule, self.plan.data, self.plan.seed, self.autocast_dtype,
                                   parallel=self.dp)
            if tracker is not None:
                tracker.observe(step, loss, self.params, self.optimizer)  # the tensors evaluated
        self.val_history.append((step, loss))
        if tracker is None:
            run.emit("validation", step=step, loss=loss)
            return
        run.emit("validation", step=step, loss=loss, best_step=tracker.best_step, best_loss=tracker.best_loss)
        if run.log_dir:
            write_validation_row(run.log_dir, step, loss, tracker)

    def after_step(self, st: LoopState) -> None:
        run, kind, cfg = self.run, self.kind, self.cfg
        kind.after_update(st.step)
        if self.ema is not None:
            self.ema.update(self.params, st.step)
        saved = False
        self.history.append((st.step, st.last_loss))
        run.warn(self.watch.after_step(st.step, st.last_lr))
        text = report_text(st) + (" — not learning? see the warning" if run.warnings else "")
        run.emit("step", step=st.step, total=st.total, loss=st.last_loss, lr=st.last_lr, text=text)
        report(self.session, st, kind.progress_label + (" (not learning? see the warning)" if run.warnings else ""))
        run.tensorboard.step(st.step, st.steps_per_epoch, st.last_loss, st.last_lr)
        if cfg.training_write_csv_every and st.step % cfg.training_write_csv_every == 0 and run.log_dir:
            write_loss_row(run.log_dir, kind.loss_csv, st.step, st.steps_per_epoch, st.last_loss, st.last_lr)
        if kind.save_every and st.step % kind.save_every == 0 and run.log_dir:
            stem, stored = kind.intermediate(st.step)
            path = os.path.join(run.log_dir, kind.log_subdir, f"{stem}.{kind.file_ext}")
            run.save(self.optimizer, st.step, path, stored, "intermediate")
            kind.after_intermediate(st.step, stored)
            self.curve()
            saved = True
        if cfg.validation_every and st.step % cfg.validation_every == 0:
            self.validate(st.step)
        if cfg.create_image_every and st.step % cfg.create_image_every == 0 and self.dp.is_writer:
            with self.ema_in(cfg.ema_for_previews):
                run.preview(st)
        # last: the random states after everything this step drew (previews draw too)
        minutes = cfg.resume_point_minutes
        if saved or (minutes and time.monotonic() - self.last_point >= minutes * 60):
            self.keep_resume_point(st)

    def clip(self, step: int) -> None:
        """Clip this step's gradients (when the run clips); the watch looks at the first steps' gradients."""
        clip_sched, cfg = self.plan.clip_sched, self.cfg

        def clip_gradients() -> None:
            assert clip_sched is not None
            value = clip_sched.value(step)
            if cfg.clip_grad_mode == "value":
                torch.nn.utils.clip_grad_value_(self.params, value)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, value)

        self.run.warn(self.watch.around_clip(step + 1, clip_gradients if clip_sched else None))

    def should_stop(self) -> bool:
        control = self.run.control
        if self.session.interrupted() and control is not None:
            control.stop()  # the host's Interrupt button ends the job as Stop does
        return self.dp.any(self.session.interrupted() or (control is not None and control.stop_requested))

    def hooks(self) -> LoopHooks:
        data, lr_sched, tracker = self.plan.data, self.plan.lr_sched, self.tracker
        device = self.run.info.device
        return LoopHooks(
            batches=lambda: data.batches(device),
            encode=self.kind.encoder(self.run.host),
            lr_at=lr_sched.value,
            group_lrs=self.plan.group_lrs,
            finished=lambda step: lr_sched.finished(step) or (tracker is not None and tracker.should_stop),
            clip=self.clip,
            after_step=self.after_step,
            should_stop=self.should_stop,
            data_state=lambda: data_order_state(data),
            set_data_state=lambda st: set_data_order_state(data, st),
        )

    # -- phases 3 and 4 ------------------------------------------------------------------------
    def train(self) -> NonFiniteLoss | None:
        """The loop (after the first validation); a non-finite loss ends it and is handed back, so
        that the last finite tensors are saved before the run fails."""
        if self.cfg.validation_every and not (self.tracker is not None and self.tracker.evaluations):
            self.validate(self.state.step)  # (a resumed run's tracker has made this evaluation)
        try:
            run_loop(self.run.host, self.optimizer, self.params, self.state, self.hooks(),
                     gradient_step=self.plan.data.gradient_step, schedule=self.schedule, generator=self.generator,
                     autocast_dtype=self.autocast_dtype, nan_guard=self.cfg.nan_guard,
                     scaler_state=self.plan.point.scaler if self.plan.point else None,
                     loss_options=self.loss_options, parallel=self.dp)
        except NonFiniteLoss as e:
            return e
        return None

    def finish(self, error: NonFiniteLoss | None) -> int:
        """The loss CSV's last row, the final file (also after Stop/Interrupt or a non-finite loss, as the
        host saves after its try), the resume point kept or removed; the step of the saved tensors."""
        run, kind, cfg, state, tracker = self.run, self.kind, self.cfg, self.state, self.tracker
        # the CSV always ends with the last step (the host writes only every N-th step, so a
        # 30-step run with its default N=500 leaves no CSV at all)
        every = cfg.training_write_csv_every
        if every and run.log_dir and self.history and self.history[-1][0] % every:
            write_loss_row(run.log_dir, kind.loss_csv, state.step, state.steps_per_epoch, state.last_loss,
                           state.last_lr)
        if cfg.ema_for_output and self.ema is not None and not self.ema.started:
            run.say(f"the EMA starts at step {cfg.ema_start_step}: the {kind.noun} saved holds the trained tensors")
        saved_step = state.step
        if tracker is not None and tracker.tensors is not None and tracker.best_step is not None:
            saved_step = tracker.best_step  # what best_in puts in the file (other ranks write nothing)
        if self.dp.is_writer:
            with self.ema_in(cfg.ema_for_output), best_in(self.params, self.optimizer, tracker):
                run.save(self.optimizer, saved_step, kind.out_file, run.name, kind.noun)
        for line in kind.summary(state.step):
            run.say(line)
        if state.stopped and error is None:
            self.keep_resume_point(state)  # the same job again goes on exactly from here
        elif error is None and self.dp.is_writer:
            remove_resume_point(kind.out_file)  # finished: the file is the result
        return saved_step


def run_training(host: TrainingHost, cfg: Any, control: JobControl | None, kind: TrainingKind) -> TrainResult:
    """Train `kind` as `cfg` says (see the module docstring), in four phases: plan (no model), set up,
    train, finish. Raises SdtrainError after saving when the loss stops being finite; returns normally
    when stopped."""
    run = TrainingRun(host, cfg, control, kind)
    dp = distributed.current()  # data-parallel processes (torchrun): only rank 0 writes files
    if not dp.is_writer:
        run.log_dir = None  # no settings file, CSV, intermediate saves, previews, loss curve, TensorBoard
    plan = _plan(run, dp)
    if isinstance(plan, TrainResult):
        return plan
    options = SessionOptions(gradient_checkpointing=cfg.gradient_checkpointing,
                             attention_optimization=cfg.attention_optimization)
    with (
        tensorboard_log(cfg, run.log_dir, run.say) as run.tensorboard,  # closed also on stop or failure
        host.gpu_session(kind.job_label, options) as session,
    ):
        plan.data.encode(host)
        training = _Training(run, plan, dp, session)
        try:
            with kind.active(host):
                error = training.train()
                saved_step = training.finish(error)
        finally:
            kind.finish()
    if error is not None:
        raise SdtrainError(f"{error} The {kind.noun} at step {saved_step} was saved to {kind.out_file}.")
    return _result(run, training.state, saved_step, training.tracker, training.curve())
