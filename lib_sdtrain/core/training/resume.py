"""Core: resume points — what a killed run needs to go on exactly as if it had not stopped.

A resume point sits beside the run's output file (`<file>.resume`) and holds, at an optimizer-step
boundary: the trained tensors, the optimizer (and loss-scaler) state, the step, the seed and the step
the run started from (the learning-rate language counts from there), and every random state that
decides a later step — the noise/timestep generator, torch's global generator (dropout), the data
order's Python generator, the latent-sampling generator and the sampler's group order as they were when the current epoch
began, with the number of micro-batches of that epoch already trained — and the trained tensors'
moving average when `ema_decay` is on, and the best validation step so far (its tensors and
optimizer state with final_file "best") when the validation loss is measured. It is written atomically
(temporary file, then rename: the previous point stays until the new one is complete) at every save
of the file, every `resume_point_minutes`, and when the run is stopped; it is removed when the run
ends normally. A later run of the same job (same settings, whatever `steps` says) continues from it;
one with other settings, or with `resume_interrupted` off, starts from the file as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from lib_sdtrain.core.errors import FormatError
from lib_sdtrain.core.formats.torchfile import load_torch_file, save_torch_file

VERSION = 1
#: settings that do not change what is trained: a resumed run may differ in them
NEUTRAL_FIELDS = frozenset({
    "steps", "resume_interrupted", "resume_point_minutes", "create_image_every", "preview_from_txt2img",
    "preview_prompt", "preview_negative_prompt", "preview_steps", "preview_sampler_name", "preview_cfg_scale",
    "preview_seed", "preview_width", "preview_height", "training_write_csv_every", "validation_every",
    "validation_images", "save_training_settings_to_txt", "log_directory", "save_embedding_every",
    "save_hypernetwork_every", "save_image_with_stored_embedding", "training_enable_tensorboard",
    "training_tensorboard_save_images", "training_tensorboard_flush_every",
    "ema_for_output", "ema_for_previews",  # what the EMA is used for, not how it is made
})
#: neutral fields that decide where a run stops and what its final file holds once early stopping or
#: the best step's file is chosen (core.training.best)
BEST_STEP_FIELDS = frozenset({"validation_every", "validation_images", "ema_for_previews"})


def _defaults(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def resume_path(out_file: str) -> str:
    return f"{out_file}.resume"


def fingerprint(cfg: Any) -> str:
    """What a resume point must have been made with: every training-relevant setting that is not at its
    default (so an sdtrain update that adds a setting, at a default that keeps the old behaviour, does
    not orphan the resume points written before it)."""
    defaults = _defaults(cfg)
    neutral = NEUTRAL_FIELDS
    if getattr(cfg, "early_stop_patience", 0) or getattr(cfg, "final_file", "last") != "last":
        neutral = NEUTRAL_FIELDS - BEST_STEP_FIELDS
    data = {k: v for k, v in cfg.to_dict().items()
            if k not in neutral and not (k in defaults and _same(v, defaults[k]))}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ResumePoint:
    step: int
    run_start_step: int
    seed: int
    fingerprint: str
    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    generator: torch.Tensor  # the loop's noise/timestep generator
    torch_rng: torch.Tensor  # torch's global generator (dropout)
    epoch_data_state: Any  # (python Random state, data generator state, sampler group order) when the epoch began
    micro_in_epoch: int  # micro-batches of that epoch already trained
    ema: list[torch.Tensor] | None = None  # the trained tensors' moving average (ema_decay), once begun
    validation: dict[str, Any] | None = None  # the best validation step so far (core.training.best)

    def to_data(self) -> dict[str, Any]:
        py_state, gen_state, groups = self.epoch_data_state
        version, internal, gauss = py_state
        return {
            "sdtrain_resume": VERSION, "step": self.step, "run_start_step": self.run_start_step, "seed": self.seed,
            "fingerprint": self.fingerprint, "params": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer, "scaler": self.scaler, "generator": self.generator,
            "torch_rng": self.torch_rng,
            "data_python_rng": [version, list(internal), gauss], "data_generator": gen_state,
            "data_groups": [list(g) for g in groups],
            "micro_in_epoch": self.micro_in_epoch,
            "ema": [t.detach().cpu().clone() for t in self.ema] if self.ema is not None else None,
            "validation": self.validation,
        }

    @classmethod
    def from_data(cls, data: Any, path: str) -> ResumePoint:
        if not isinstance(data, dict) or data.get("sdtrain_resume") != VERSION:
            raise FormatError(path, "not an sdtrain resume point of this version")
        try:
            version, internal, gauss = data["data_python_rng"]
            return cls(
                step=int(data["step"]), run_start_step=int(data["run_start_step"]), seed=int(data["seed"]),
                fingerprint=str(data["fingerprint"]), params=list(data["params"]), optimizer=data["optimizer"],
                scaler=data["scaler"], generator=data["generator"], torch_rng=data["torch_rng"],
                epoch_data_state=((version, tuple(internal), gauss), data["data_generator"],
                                  [list(g) for g in data["data_groups"]]),
                micro_in_epoch=int(data["micro_in_epoch"]),
                ema=list(data["ema"]) if data.get("ema") is not None else None,
                validation=dict(data["validation"]) if data.get("validation") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(path, f"an incomplete resume point ({e})") from None


def save_resume_point(out_file: str, point: ResumePoint) -> str:
    path = resume_path(out_file)
    save_torch_file(point.to_data(), path)
    return path


def load_resume_point(out_file: str) -> ResumePoint | None:
    path = resume_path(out_file)
    if not os.path.isfile(path):
        return None
    return ResumePoint.from_data(load_torch_file(path), path)


def remove_resume_point(out_file: str) -> None:
    try:
        os.remove(resume_path(out_file))
    except FileNotFoundError:
        pass
