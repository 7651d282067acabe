"""Core: textual-inversion jobs — create an embedding, train it (the host's train_embedding, rebuilt)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.formats.embedding import Embedding
from lib_sdtrain.core.formats.embedding_io import (
    load_embedding,
    load_optim,
    save_embedding_image,
    save_embedding_pt,
    save_embedding_safetensors,
    save_optim,
)
from lib_sdtrain.core.formats.fsutil import resolve_inside, safe_name
from lib_sdtrain.core.jobs.service import JobControl
from lib_sdtrain.core.options.config import CreateEmbeddingConfig, TrainEmbeddingConfig
from lib_sdtrain.core.options.encoder_rates import (
    encoder_rate_fields,
    encoder_schedules,
    not_for_this_embedding,
)
from lib_sdtrain.core.options.lr_schedule import Schedule
from lib_sdtrain.core.options.optimizers import saved_optimizer_name
from lib_sdtrain.core.port import ModelInfo, TrainingHost
from lib_sdtrain.core.training.embedding_norm import limit_norms, norm_summary
from lib_sdtrain.core.training.loop import LoopState
from lib_sdtrain.core.training.optimizer_state import regrouped, restore_optimizer
from lib_sdtrain.core.training.run import TrainingKind, TrainingRun, TrainResult, report_text, run_training
from lib_sdtrain.core.training.watchdog import NoLearning, Subject, norm_limit_warning

log = logging.getLogger(__name__)

EMBEDDING_EXTS = (".pt", ".safetensors", ".bin", ".png", ".webp")
LOSS_CSV = "textual_inversion_loss.csv"


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


def _metadata(cfg: TrainEmbeddingConfig, info: ModelInfo, prediction: str, step: int) -> dict[str, str]:
    """How the file was trained, for readers like the webui's Lora code that classify files by
    metadata (SAI model-spec names; SD2 768-v predicts velocity, SD2 512 noise)."""
    arch = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base",
            "sd2": "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"}[info.family]
    return {
        "sdtrain.version": "1",
        "sdtrain.step": str(step),
        "sdtrain.prediction": prediction,
        "sdtrain.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "modelspec.architecture": f"{arch}/textual-inversion",
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
class EmbeddingTraining(TrainingKind):
    """The textual-inversion part of a run (the host's train_embedding): live vectors spliced into
    prompts by the host, AdamW (or the optimizer chosen), files in the chosen format, image embeddings
    after previews."""

    noun = "embedding"
    job_label = "train-embedding"
    progress_label = "Training textual inversion"
    log_subdir = "embeddings"
    loss_csv = LOSS_CSV
    require_name_in_template = True

    def __init__(self, host: TrainingHost, cfg: TrainEmbeddingConfig):
        self.cfg = cfg
        self.name = cfg.embedding_name
        self.info = host.describe()
        self.prediction = host.noise_schedule().prediction
        src = cfg.embedding_file or find_embedding_file(cfg.embeddings_dir, self.name)
        if not src:
            raise SdtrainError(f"no embedding named {self.name!r} in {cfg.embeddings_dir}; create it first")
        self.source = src
        self.emb = load_embedding(src)
        check_fits(self.emb, self.info, src)
        self.initial_step = self.emb.step or 0
        if self.emb.step is None and cfg.save_optimizer_state:
            # an SDXL .pt holds nothing but its two tensors: its step lives in the .optim sidecar
            saved = load_optim(src, self.emb.checksum())
            if saved is not None and isinstance(saved.get("step"), int):
                self.initial_step = saved["step"]
        trained = set(self.emb.vectors) if cfg.train_encoders == "both" else {cfg.train_encoders}
        if not trained <= set(self.emb.vectors):
            raise SdtrainError(
                f"train_encoders={cfg.train_encoders!r}: {src} has vector sets {sorted(self.emb.vectors)} "
                "(choosing an encoder is for SDXL embeddings)"
            )
        self.trained_keys = sorted(trained)
        not_for_this_embedding(cfg, list(self.emb.vectors), src)
        #: one optimizer parameter group per trained encoder when an encoder has a rate of its own
        self.grouped = bool(encoder_rate_fields(cfg))
        #: the typical token-embedding norm per trained encoder and the bound norm_limit puts on vectors
        self.typical_norms: dict[str, float] = {}
        self.norm_bounds: dict[str, float] = {}
        if cfg.norm_limit > 0:
            norms = host.token_embedding_norms()
            self.typical_norms = {k: float(norms[k]) for k in self.trained_keys}
            self.norm_bounds = {k: cfg.norm_limit * n for k, n in self.typical_norms.items()}
        # the final file: the source itself when it is in the chosen format, else <dir>/<name>.<fmt>
        if src.lower().endswith("." + cfg.save_format):
            self.out_file = src
        else:
            self.out_file = str(resolve_inside(cfg.embeddings_dir, f"{self.name}.{cfg.save_format}"))
        self.file_ext = cfg.save_format
        self.save_every = cfg.save_embedding_every
        self.vectors: dict[str, torch.Tensor] = {}
        self.last_intermediate: Embedding | None = None
        self.optimizer_choice = cfg.optimizer_choice()

    def settings(self) -> dict[str, Any]:
        return {
            "embedding_name": self.cfg.embedding_name,
            "save_embedding_every": self.cfg.save_embedding_every,
            "save_image_with_stored_embedding": self.cfg.save_image_with_stored_embedding,
            "num_vectors_per_token": self.emb.n_vectors,
            "train_encoders": self.cfg.train_encoders,
        }

    def subject(self) -> Subject:
        return Subject("embedding", "the embedding's vectors", "Embedding Learning rate", (
            f"its name {self.name!r} never reached the model in a prompt. Check the prompt template "
            f"({self.cfg.template_filename}): [name] must stand apart from the words around it, as in "
            "'a photo of [name], [filewords]' ('[name]s' or 'my[name]' reads as another word)."))

    def no_learning(self, start: int) -> list[NoLearning]:
        warning = norm_limit_warning(self.subject(), self.cfg.norm_limit, start)
        return [warning] if warning else []

    def setup(self, device: torch.device, lr: float) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        self.vectors = {
            k: v.detach().to(device, torch.float32).clone().requires_grad_(k in self.trained_keys)
            for k, v in self.emb.vectors.items()
        }
        params = [self.vectors[k] for k in self.trained_keys]
        groups: list[Any] = [{"params": [p]} for p in params] if self.grouped else params
        return params, self.optimizer_choice.build(groups, lr)  # the host: AdamW(lr, weight_decay=0.0)

    def group_rates(self, main: Schedule, run_start: int, gradient_step: int) -> Callable[[int], list[float]] | None:
        """Per trained encoder (the groups' order), its own schedule, else the Embedding Learning rate's."""
        if not self.grouped:
            return None
        own = encoder_schedules(self.cfg, run_start, gradient_step)
        schedules = [own.get(k, main) for k in self.trained_keys]
        return lambda step: [s.value(step) for s in schedules]

    def notes(self, info: ModelInfo) -> list[str]:
        if not self.norm_bounds:
            return []
        text = ", ".join(f"{k} {self.typical_norms[k]:.4g} (limit {b:.4g})" for k, b in self.norm_bounds.items())
        return [f"typical token-embedding norm: {text}"]

    def after_update(self, step: int) -> None:
        if self.norm_bounds:
            limit_norms(self.vectors, self.norm_bounds)

    def summary(self, step: int) -> list[str]:
        return [norm_summary(self.vectors, self.trained_keys, self.typical_norms, step)] if self.vectors else []

    def resume(self, optimizer: torch.optim.Optimizer) -> str | None:
        if not self.cfg.save_optimizer_state:
            return None
        saved = load_optim(self.source, self.emb.checksum())
        if saved is None:
            return None
        name, held = self.optimizer_choice.name, saved_optimizer_name(saved)  # the host's files: AdamW
        if held != name:
            return (f"ignored {self.source}.optim: it holds {held} state and this run uses {name}; "
                    f"starting {name} afresh")
        state = regrouped(saved["optimizer_state_dict"], optimizer)  # per-encoder rates turned on or off
        why = restore_optimizer(optimizer, state, keep=self.optimizer_choice.kwargs())
        if why is not None:
            return f"ignored {self.source}.optim: {why}"
        return f"resumed optimizer state from {self.source}.optim"

    def active(self, host: TrainingHost):
        return host.use_embedding(self.name, self.vectors)

    def snapshot(self, step: int, name: str) -> Embedding:
        return Embedding(
            name=name,
            vectors={k: v.detach().float().cpu().clone() for k, v in self.vectors.items()},
            step=step,
            sd_checkpoint=self.info.checkpoint_hash or None,
            sd_checkpoint_name=self.info.checkpoint_name or None,
        )

    def save(self, optimizer: torch.optim.Optimizer, step: int, path: str, stored_name: str) -> None:
        emb = self.snapshot(step, stored_name)
        save_embedding_file(emb, path, _metadata(self.cfg, self.info, self.prediction, step))
        if self.cfg.save_optimizer_state:
            # the host loads `optimizer_state_dict` into its AdamW: another optimizer's state is kept apart
            choice = self.optimizer_choice
            save_optim(path, optimizer.state_dict(), emb.checksum(), optimizer_name=choice.name, step=step,
                       settings=choice.settings(optimizer),
                       host_loadable=choice.name == "AdamW" and len(optimizer.param_groups) == 1)

    def after_intermediate(self, step: int, stored_name: str) -> None:
        self.last_intermediate = self.snapshot(step, stored_name)

    def after_preview(self, run: TrainingRun, image: Image.Image, state: LoopState) -> None:
        last, self.last_intermediate = self.last_intermediate, None  # embedded once, like the host
        if not (self.cfg.save_image_with_stored_embedding and last is not None and run.log_dir):
            return
        embed_dir = os.path.join(run.log_dir, "image_embeddings")
        os.makedirs(embed_dir, exist_ok=True)
        path = os.path.join(embed_dir, f"{self.name}-{state.step}.png")
        save_embedding_image(
            last,
            path,
            image,
            title=f"<{last.name}>",
            footer_left=self.info.checkpoint_name,
            footer_mid=f"[{self.info.checkpoint_hash}]",
            footer_right=f"{last.n_vectors}v {state.step}s",
        )
        run.wrote(path, "image_embedding")


def train_embedding(
    host: TrainingHost, cfg: TrainEmbeddingConfig, control: JobControl | None = None
) -> TrainResult:
    return run_training(host, cfg, control, EmbeddingTraining(host, cfg))


__all__ = [
    "EmbeddingTraining",
    "TrainResult",
    "create_embedding",
    "find_embedding_file",
    "report_text",
    "train_embedding",
]
