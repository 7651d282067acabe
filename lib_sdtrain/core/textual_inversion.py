"""Core: textual-inversion jobs — create an embedding, train it (the host's train_embedding, rebuilt)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib_sdtrain.core.config import CreateEmbeddingConfig, TrainEmbeddingConfig
from lib_sdtrain.core.embedding import Embedding
from lib_sdtrain.core.embedding_io import (
    load_embedding,
    load_optim,
    save_embedding_image,
    save_embedding_pt,
    save_embedding_safetensors,
    save_optim,
)
from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.fsutil import atomic_write, resolve_inside, safe_name
from lib_sdtrain.core.jobs import JobControl
from lib_sdtrain.core.loop import (
    LoopHooks,
    LoopState,
    NonFiniteLoss,
    report,
    run_loop,
    write_loss_row,
)
from lib_sdtrain.core.lr_schedule import make_schedule
from lib_sdtrain.core.plot import save_loss_curve
from lib_sdtrain.core.port import ModelInfo, PreviewRequest, SessionOptions, TrainingHost
from lib_sdtrain.core.training_data import TrainingData, prepare_training_data, validation_loss

log = logging.getLogger(__name__)

EMBEDDING_EXTS = (".pt", ".safetensors", ".bin", ".png", ".webp")
LOSS_CSV = "textual_inversion_loss.csv"


@dataclass
class TrainResult:
    embedding_file: str
    step: int
    stopped: bool = False
    log_dir: str | None = None
    loss_csv: str | None = None
    loss_curve: str | None = None
    files: list[str] = field(default_factory=list)
    message: str = ""

    def __str__(self) -> str:
        return self.message or f"embedding saved to {self.embedding_file} at step {self.step}"


# -- files --------------------------------------------------------------------------------------------
def save_embedding_file(emb: Embedding, path: str, metadata: dict[str, str] | None = None) -> str:
    if path.lower().endswith(".safetensors"):
        save_embedding_safetensors(emb, path, metadata)
    else:
        save_embedding_pt(emb, path)
    return path


def find_embedding_file(embeddings_dir: str, name: str) -> str | None:
    """The file the host would list under `name`: a file stem equal to the name, anywhere below
    the embeddings folder (the host walks it recursively); `.pt` first."""
    found: dict[str, str] = {}
    for root, _dirs, files in sorted(os.walk(embeddings_dir, followlinks=True)):
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if stem == name and ext.lower() in EMBEDDING_EXTS and not f.lower().endswith(".preview.png"):
                found.setdefault(ext.lower(), os.path.join(root, f))
    return next((found[e] for e in EMBEDDING_EXTS if e in found), None)


def check_fits(emb: Embedding, info: ModelInfo, path: str) -> None:
    """An embedding trains only on a model whose text encoders have its widths."""
    want = {te.key: te.width for te in info.text_encoders}
    have = {k: int(v.shape[-1]) for k, v in emb.vectors.items()}
    if have != want:
        raise SdtrainError(
            f"{path}: embedding vectors {have} do not fit this {info.family} model's text encoders {want}"
        )


def _metadata(cfg: TrainEmbeddingConfig, info: ModelInfo, step: int) -> dict[str, str]:
    return {
        "sdtrain.version": "1",
        "sdtrain.step": str(step),
        "sdtrain.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "modelspec.architecture": {
            "sd1": "stable-diffusion-v1/textual-inversion",
            "sd2": "stable-diffusion-v2-768-v/textual-inversion",
            "sdxl": "stable-diffusion-xl-v1-base/textual-inversion",
        }[info.family],
    }


# -- create ---------------------------------------------------------------------------------------------
def create_embedding(
    host: TrainingHost, cfg: CreateEmbeddingConfig, control: JobControl | None = None
) -> str:
    """The host's create_embedding: init text's token vectors spread over n rows, step 0."""
    name = safe_name(cfg.name)
    os.makedirs(cfg.embeddings_dir, exist_ok=True)
    path = str(resolve_inside(cfg.embeddings_dir, f"{name}.{cfg.save_format}"))
    if os.path.exists(path) and not cfg.overwrite_old:
        raise SdtrainError(f"file {path} already exists (tick 'Overwrite Old Embedding' to replace it)")
    vectors = host.initial_vectors(cfg.init_text, cfg.num_vectors_per_token)
    emb = Embedding(name=name, vectors={k: v.detach().float().cpu() for k, v in vectors.items()}, step=0)
    save_embedding_file(emb, path)
    if control is not None:
        control.emit("file", path=path, what="embedding")
    return path


# -- train ------------------------------------------------------------------------------------------------
class _Run:
    """One training run's state and outputs (the body of the host's train_embedding)."""

    def __init__(self, host: TrainingHost, cfg: TrainEmbeddingConfig, control: JobControl | None):
        self.host, self.cfg, self.control = host, cfg, control
        self.name = cfg.embedding_name
        self.info = host.describe()
        self.files: list[str] = []
        src = cfg.embedding_file or find_embedding_file(cfg.embeddings_dir, self.name)
        if not src:
            raise SdtrainError(f"no embedding named {self.name!r} in {cfg.embeddings_dir}; create it first")
        self.src = src
        self.emb = load_embedding(src)
        check_fits(self.emb, self.info, src)
        self.initial_step = self.emb.step or 0
        # the final file: the source itself when it is in the chosen format, else <dir>/<name>.<fmt>
        if src.lower().endswith("." + cfg.save_format):
            self.out_file = src
        else:
            self.out_file = str(resolve_inside(cfg.embeddings_dir, f"{self.name}.{cfg.save_format}"))
        day = datetime.datetime.now().strftime("%Y-%m-%d")
        self.log_dir = os.path.join(cfg.log_directory, day, self.name) if cfg.log_directory else None

    def emit(self, kind: str, **data: Any) -> None:
        if self.control is not None:
            self.control.emit(kind, **data)

    def wrote(self, path: str, what: str) -> str:
        self.files.append(path)
        self.emit("file", path=path, what=what)
        return path

    def snapshot(self, vectors: dict[str, torch.Tensor], step: int, name: str) -> Embedding:
        return Embedding(
            name=name,
            vectors={k: v.detach().float().cpu().clone() for k, v in vectors.items()},
            step=step,
            sd_checkpoint=self.info.checkpoint_hash or None,
            sd_checkpoint_name=self.info.checkpoint_name or None,
        )

    def save(self, vectors, optimizer, step: int, path: str, name: str, what: str) -> str:
        emb = self.snapshot(vectors, step, name)
        save_embedding_file(emb, path, _metadata(self.cfg, self.info, step))
        if self.cfg.save_optimizer_state:
            save_optim(path, optimizer.state_dict(), emb.checksum())
        return self.wrote(path, what)

    def settings_file(self, data: TrainingData) -> None:
        if not (self.cfg.save_training_settings_to_txt and self.log_dir):
            return
        os.makedirs(self.log_dir, exist_ok=True)
        cfg = self.cfg
        # the host's key set (modules/textual_inversion/saving_settings.py) plus the full sdtrain config
        params: dict[str, Any] = {
            "datetime": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            **{
                k: getattr(cfg, k)
                for k in (
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
                    "embedding_name",
                    "save_embedding_every",
                    "save_image_with_stored_embedding",
                )
            },
            "initial_step": self.initial_step,
            "model_hash": self.info.checkpoint_hash,
            "model_name": self.info.checkpoint_name,
            "num_of_dataset_images": len(data),
            "num_vectors_per_token": self.emb.n_vectors,
            "template_file": cfg.template_path(),
        }
        if cfg.preview_from_txt2img:
            params.update(
                {
                    k: getattr(cfg, k)
                    for k in (
                        "preview_cfg_scale",
                        "preview_height",
                        "preview_negative_prompt",
                        "preview_prompt",
                        "preview_sampler_name",
                        "preview_seed",
                        "preview_steps",
                        "preview_width",
                    )
                }
            )
        params["sdtrain_config"] = cfg.to_dict()
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        path = os.path.join(self.log_dir, f"settings-{stamp}.json")
        text = json.dumps(params, indent=4)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self.wrote(path, "settings")

    def preview(self, state: LoopState, last_intermediate: Embedding | None) -> None:
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
        image = self.host.render_preview(req)
        if image is None or not self.log_dir:
            return
        images_dir = os.path.join(self.log_dir, "images")
        os.makedirs(images_dir, exist_ok=True)
        path = os.path.join(images_dir, f"{self.name}-{state.step}.png")
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        state.last_preview = path
        self.files.append(path)
        self.emit("preview", path=path, step=state.step, prompt=req.prompt)
        if cfg.save_image_with_stored_embedding and last_intermediate is not None:
            embed_dir = os.path.join(self.log_dir, "image_embeddings")
            os.makedirs(embed_dir, exist_ok=True)
            epath = os.path.join(embed_dir, f"{self.name}-{state.step}.png")
            save_embedding_image(
                last_intermediate,
                epath,
                image,
                title=f"<{last_intermediate.name}>",
                footer_left=self.info.checkpoint_name,
                footer_mid=f"[{self.info.checkpoint_hash}]",
                footer_right=f"{last_intermediate.n_vectors}v {state.step}s",
            )
            self.wrote(epath, "image_embedding")


def train_embedding(
    host: TrainingHost, cfg: TrainEmbeddingConfig, control: JobControl | None = None
) -> TrainResult:
    run = _Run(host, cfg, control)
    if run.initial_step >= cfg.steps:
        return TrainResult(
            run.src,
            run.initial_step,
            message=(
                f"{run.name} is already trained to step {run.initial_step} (max steps {cfg.steps}); nothing to do"
            ),
        )
    seed = cfg.seed if cfg.seed >= 0 else random.randrange(2**31)
    # images are read and checked before the model is touched
    data = prepare_training_data(cfg, placeholder=run.name, seed=seed, validation_count=cfg.validation_images)
    # the host advances its schedule once per micro-batch, so the accumulation count matters
    lr_sched = make_schedule(
        cfg.lr_scheduler,
        cfg.learn_rate,
        cfg.steps,
        run.initial_step,
        warmup_steps=cfg.lr_warmup_steps,
        min_lr=cfg.lr_min,
        field="learn_rate",
        gradient_step=data.gradient_step,
    )
    clip_sched = None
    if cfg.clip_grad_mode != "disabled":
        clip_sched = make_schedule(
            "dsl",
            cfg.clip_grad_value,
            cfg.steps,
            run.initial_step,
            field="clip_grad_value",
            gradient_step=data.gradient_step,
        )
    for path, reason in data.skipped:
        run.emit("log", text=f"skipped {path}: {reason}")
    run.settings_file(data)

    generator = torch.Generator().manual_seed(seed)
    options = SessionOptions(
        gradient_checkpointing=cfg.gradient_checkpointing, attention_optimization=cfg.attention_optimization
    )
    autocast_dtype = {
        "auto": run.info.autocast_dtype,
        "no": None,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
    }[cfg.mixed_precision]
    with host.gpu_session("train-embedding", options) as session:
        data.encode(host)
        schedule = host.noise_schedule()
        device = run.info.device
        vectors = {
            k: v.detach().to(device, torch.float32).clone().requires_grad_(True)
            for k, v in run.emb.vectors.items()
        }
        params = list(vectors.values())
        optimizer = torch.optim.AdamW(params, lr=lr_sched.value(run.initial_step), weight_decay=0.0)
        if cfg.save_optimizer_state:
            saved = load_optim(run.src, run.emb.checksum())
            if saved is not None:
                try:
                    optimizer.load_state_dict(saved["optimizer_state_dict"])
                    run.emit("log", text=f"resumed optimizer state from {run.src}.optim")
                except (ValueError, KeyError) as e:
                    run.emit("log", text=f"ignored {run.src}.optim: {e}")

        state = LoopState(
            step=run.initial_step,
            start_step=run.initial_step,
            total=cfg.steps,
            steps_per_epoch=data.steps_per_epoch,
        )
        last_intermediate: list[Embedding | None] = [None]
        csv_path = os.path.join(run.log_dir, LOSS_CSV) if run.log_dir else None
        curve_path = os.path.join(run.log_dir, "loss.png") if run.log_dir else None
        history: list[tuple[int, float]] = []
        val_history: list[tuple[int, float]] = []

        def validate(step: int) -> None:
            loss = validation_loss(host, schedule, data, seed, autocast_dtype)
            val_history.append((step, loss))
            run.emit("validation", step=step, loss=loss)

        def after_step(st: LoopState) -> None:
            history.append((st.step, st.last_loss))
            text = report_text(st)
            run.emit("step", step=st.step, total=st.total, loss=st.last_loss, lr=st.last_lr, text=text)
            report(session, st, "Training textual inversion")
            if cfg.training_write_csv_every and st.step % cfg.training_write_csv_every == 0 and csv_path:
                write_loss_row(run.log_dir, LOSS_CSV, st.step, st.steps_per_epoch, st.last_loss, st.last_lr)
            if cfg.save_embedding_every and st.step % cfg.save_embedding_every == 0 and run.log_dir:
                path = os.path.join(run.log_dir, "embeddings", f"{run.name}-{st.step}.{cfg.save_format}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                st.last_save = run.save(
                    vectors, optimizer, st.step, path, f"{run.name}-{st.step}", "intermediate"
                )
                last_intermediate[0] = run.snapshot(vectors, st.step, f"{run.name}-{st.step}")
                if curve_path:
                    save_loss_curve(
                        curve_path,
                        [s for s, _ in history],
                        [v for _, v in history],
                        validation=val_history,
                        title=f"{run.name} loss",
                    )
            if cfg.validation_every and st.step % cfg.validation_every == 0:
                validate(st.step)
            if cfg.create_image_every and st.step % cfg.create_image_every == 0:
                run.preview(st, last_intermediate[0])
                last_intermediate[0] = None  # embedded once, like the host

        def clip(step: int) -> None:
            value = clip_sched.value(step)
            if cfg.clip_grad_mode == "value":
                torch.nn.utils.clip_grad_value_(params, value)
            else:
                torch.nn.utils.clip_grad_norm_(params, value)

        hooks = LoopHooks(
            batches=lambda: data.batches(device),
            encode=host.encode_text,
            lr_at=lr_sched.value,
            finished=lr_sched.finished,
            clip=clip if clip_sched else None,
            after_step=after_step,
            should_stop=lambda: (control is not None and control.stop_requested) or session.interrupted(),
        )
        error: NonFiniteLoss | None = None
        with host.use_embedding(run.name, vectors):
            if cfg.validation_every:
                validate(state.step)
            try:
                run_loop(
                    host,
                    optimizer,
                    params,
                    state,
                    hooks,
                    gradient_step=data.gradient_step,
                    schedule=schedule,
                    generator=generator,
                    autocast_dtype=autocast_dtype,
                    nan_guard=cfg.nan_guard,
                )
            except NonFiniteLoss as e:
                error = e  # the vectors are still the last finite ones: save them, then fail
        # the final file, also after Stop/Interrupt (the host saves inside its try, likewise)
        os.makedirs(os.path.dirname(os.path.abspath(run.out_file)), exist_ok=True)
        run.save(vectors, optimizer, state.step, run.out_file, run.name, "embedding")
    result = TrainResult(
        run.out_file, state.step, stopped=state.stopped, log_dir=run.log_dir, files=run.files
    )
    if csv_path and os.path.exists(csv_path):
        result.loss_csv = csv_path
    if curve_path and history:
        result.loss_curve = save_loss_curve(
            curve_path,
            [s for s, _ in history],
            [v for _, v in history],
            validation=val_history,
            title=f"{run.name} loss",
        )
    verb = "interrupted" if state.stopped else "finished"
    result.message = f"Training {verb} at {state.step} steps.\nEmbedding saved to {run.out_file}"
    if error is not None:
        raise SdtrainError(f"{error} The embedding at step {state.step} was saved to {run.out_file}.")
    return result


def report_text(state: LoopState) -> str:
    from lib_sdtrain.core.loop import eta_text

    return f"loss {state.last_loss:.5f}, lr {state.last_lr:.3g}, {eta_text(state)}"


def job_runners() -> dict[str, tuple[type, Any]]:
    """The job kinds this module provides, for `JobService`."""
    return {
        CreateEmbeddingConfig.kind: (CreateEmbeddingConfig, create_embedding),
        TrainEmbeddingConfig.kind: (TrainEmbeddingConfig, train_embedding),
    }


__all__ = [
    "TrainResult",
    "create_embedding",
    "find_embedding_file",
    "job_runners",
    "train_embedding",
]
