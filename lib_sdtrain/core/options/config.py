"""Core: job configurations as validated dataclasses (a bad value names its field before any model work).

Field names follow the host's request fields (A1111 `/sdapi/v1/train/embedding`), so a request body
maps onto a config one to one; sdtrain's own options sit beside them. Defaults are the host UI's
defaults (modules/ui.py, Train tab) and Training settings (modules/shared_options.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.options.encoder_rates import check_encoder_options
from lib_sdtrain.core.options.holdout import FINAL_FILES, check_validation_options
from lib_sdtrain.core.options.hypernetwork_spec import (
    HN_ACTIVATIONS,
    HN_MODULE_SIZES,
    HN_WEIGHT_INITS,
    check_layer_structure,
    parse_float_list,
)
from lib_sdtrain.core.options.lr_schedule import Schedule, make_schedule
from lib_sdtrain.core.options.optimizers import OPTIMIZERS, OptimizerChoice, optimizer_class, parse_betas
from lib_sdtrain.core.options.presets import PRESET_NAMES, apply_preset

#: Our own copy of the host's six prompt templates (same names and placeholders).
DEFAULT_TEMPLATES_DIR = str(Path(__file__).resolve().parents[3] / "textual_inversion_templates")

CONFIG_VERSION = 1
#: the loss types (core.training.loss computes them), by their kohya names
LOSS_TYPES = ("mse", "l1", "huber", "smooth_l1")


def _opt(default: Any, label: str, help: str = "", choices: tuple | None = None, **extra: Any):
    """A dataclass field carrying UI metadata, so each option is described once."""
    meta = {"label": label, "help": help, **extra}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Convert a JSON/UI value to the field's declared type, or raise ConfigError naming the field."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # gradio Number gives floats
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise ConfigError(name, f"expected a number, got {value!r}") from None
        else:
            raise ConfigError(name, f"expected a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(name, f"must be finite, got {value!r}")
        return out
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a learning rate sent as a JSON number
        raise ConfigError(name, f"expected text, got {value!r}")
    return value


class ConfigBase:
    """Mixin: `from_dict` (unknown keys refused, values coerced), `to_dict`, `validate`."""

    kind: ClassVar[str] = ""
    #: fields naming the host's own folders: set by the webui, never by a request (core.options.places)
    HOST_FOLDERS: ClassVar[tuple[str, ...]] = ()
    #: fields naming folders the job writes into: confined to the webui's folders for requests
    WRITE_FOLDERS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, ignore: tuple[str, ...] = ()) -> Any:
        data = dict(data or {})
        version = data.pop("config_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(
                "config_version", f"unsupported version {version!r} (this sdtrain reads {CONFIG_VERSION})"
            )
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if "preset" in known:  # a preset fills what the request leaves out (core.options.presets)
            data = apply_preset(cls.kind, data)
        kwargs = {}
        for key, value in data.items():
            if key in ignore:
                continue
            if key not in known:
                raise ConfigError(key, f"unknown field for {cls.kind or cls.__name__}")
            if value is None and known[key].default is not None:
                continue  # JSON null → the default, as the host UI would fill it
            kwargs[key] = _coerce(key, value, hints[key])
        obj = cls(**kwargs)
        obj.validate()
        return obj

    @classmethod
    def merge_defaults(cls, defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """`data` over the host's `defaults`, keeping only defaults this config has a field for
        (a host hands the same folder settings to every job kind)."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return {**{k: v for k, v in defaults.items() if k in known}, **data}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        out["config_version"] = CONFIG_VERSION
        return out

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f.name, f"must be one of {', '.join(map(str, choices))}; got {getattr(self, f.name)!r}"
                )

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Fields with defaults, types and labels: for forms, CLI flags and API schemas."""
        hints = typing.get_type_hints(cls)
        return [
            {
                "name": f.name,
                "type": hints[f.name].__name__,
                "default": f.default,
                **dict(f.metadata),
            }
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        ]


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(name, message)


def _check_name(name: str, value: str) -> None:
    _require(bool(value and value.strip()), name, "is empty")
    _require(
        not any(c in value for c in "/\\\0") and value.strip() not in (".", ".."),
        name,
        f"{value!r} is not a plain name (no folders)",
    )


@dataclass
class CreateEmbeddingConfig(ConfigBase):
    """A1111 `create_embedding(name, num_vectors_per_token, overwrite_old, init_text)`."""

    kind: ClassVar[str] = "create_embedding"
    HOST_FOLDERS: ClassVar[tuple[str, ...]] = ("embeddings_dir",)

    name: str = _opt("", "Name")
    num_vectors_per_token: int = _opt(1, "Number of vectors per token", minimum=1, maximum=75)
    overwrite_old: bool = _opt(False, "Overwrite Old Embedding")
    init_text: str = _opt("*", "Initialization text")
    embeddings_dir: str = _opt("embeddings", "Embeddings folder")
    save_format: str = _opt("pt", "File format", choices=("pt", "safetensors"))

    def validate(self) -> None:
        super().validate()
        _check_name("name", self.name)
        _require(1 <= self.num_vectors_per_token <= 75, "num_vectors_per_token", "must be between 1 and 75")
        _require(bool(self.embeddings_dir), "embeddings_dir", "is empty")


@dataclass
class TrainingConfig(ConfigBase):
    """What every training run shares (TI and hypernetwork): the host's request fields, the Training
    settings its trainer reads from opts, and sdtrain's own options. Subclasses add the trained
    thing's name, folder, file format and save cadence, and may change a default."""

    #: the subclass's "save a copy every N steps" field (the host names it after the kind)
    save_every_field: ClassVar[str] = ""
    WRITE_FOLDERS: ClassVar[tuple[str, ...]] = ("log_directory",)

    # --- the host's request fields (modules/api/api.py → textual_inversion.train_embedding /
    # hypernetwork.train_hypernetwork); learn_rate and template_filename defaults differ by kind
    learn_rate: str = _opt("0.005", "Learning rate", help="A rate, or a schedule: 0.005:100, 1e-3:1000, 1e-5")
    batch_size: int = _opt(1, "Batch size", minimum=1)
    gradient_step: int = _opt(1, "Gradient accumulation steps", minimum=1)
    data_root: str = _opt("", "Dataset directory")
    log_directory: str = _opt("textual_inversion", "Log directory")
    training_width: int = _opt(512, "Width", minimum=64, maximum=2048, step=8)
    training_height: int = _opt(512, "Height", minimum=64, maximum=2048, step=8)
    varsize: bool = _opt(False, "Do not resize images")
    steps: int = _opt(100000, "Max steps", minimum=1)
    clip_grad_mode: str = _opt("disabled", "Gradient Clipping", choices=("disabled", "value", "norm"))
    clip_grad_value: str = _opt(
        "0.1", "Gradient clip value", help="A value or a schedule, like the learning rate"
    )
    shuffle_tags: bool = _opt(False, "Shuffle tags by ',' when creating prompts.")
    tag_drop_out: float = _opt(0.0, "Drop out tags when creating prompts.", minimum=0.0, maximum=1.0)
    latent_sampling_method: str = _opt(
        "once", "Choose latent sampling method", choices=("once", "deterministic", "random")
    )
    use_weight: bool = _opt(False, "Use PNG alpha channel as loss weight")
    create_image_every: int = _opt(
        500, "Save an image to log directory every N steps, 0 to disable", minimum=0
    )
    template_filename: str = _opt("style_filewords.txt", "Prompt template")
    preview_from_txt2img: bool = _opt(
        False, "Read parameters (prompt, etc...) from txt2img tab when making previews"
    )
    preview_prompt: str = _opt("", "Preview prompt")
    preview_negative_prompt: str = _opt("", "Preview negative prompt")
    preview_steps: int = _opt(20, "Preview sampling steps", minimum=1)
    preview_sampler_name: str = _opt("Euler a", "Preview sampler")
    preview_cfg_scale: float = _opt(7.0, "Preview CFG scale")
    preview_seed: int = _opt(-1, "Preview seed")
    preview_width: int = _opt(512, "Preview width", minimum=64, step=8)
    preview_height: int = _opt(512, "Preview height", minimum=64, step=8)

    # --- host settings the in-tree trainer reads from opts (modules/shared_options.py, Training section)
    templates_dir: str = _opt(DEFAULT_TEMPLATES_DIR, "Prompt templates folder")
    save_optimizer_state: bool = _opt(
        True,
        "Save optimizer state (.optim) to resume training",
        help="The host keeps this off by default; sdtrain keeps it on.",
    )
    save_training_settings_to_txt: bool = _opt(True, "Save training settings to a file when training starts")
    training_write_csv_every: int = _opt(500, "Save the loss CSV every N steps, 0 to disable", minimum=0)
    dataset_filename_word_regex: str = _opt("", "Filename word regex")
    dataset_filename_join_string: str = _opt(" ", "Filename join string")
    training_image_repeats_per_epoch: int = _opt(
        1, "Repeats per image per epoch (epoch display only)", minimum=1
    )
    training_enable_tensorboard: bool = _opt(
        False, "Enable tensorboard logging",
        help="Loss and learning rate per step (the host's tags) in <log directory>/tensorboard; needs the "
        "tensorboard package",
    )
    training_tensorboard_save_images: bool = _opt(
        False, "Save generated images within tensorboard", help="The previews, when tensorboard logging is on"
    )
    training_tensorboard_flush_every: int = _opt(
        120, "How often, in seconds, to flush the pending tensorboard events and summaries to disk", minimum=0
    )

    # --- sdtrain's own options
    lr_scheduler: str = _opt(
        "dsl", "Learning-rate schedule", choices=("dsl", "cosine", "constant_with_warmup")
    )
    lr_warmup_steps: int = _opt(0, "Warm-up steps (cosine, constant_with_warmup)", minimum=0)
    lr_min: float = _opt(0.0, "Final learning rate (cosine)", minimum=0.0)
    # optimizer (core.options.optimizers); name and settings go into the .optim file
    optimizer_name: str = _opt(
        "AdamW", "Optimizer", choices=OPTIMIZERS,
        help="AdamW (the host's), Adam, SGD, Adagrad; Lion, Prodigy (use learning rate 1) and AdamW8bit when "
        "their package (lion-pytorch, prodigyopt, bitsandbytes) is installed in the webui's venv",
    )
    weight_decay: float = _opt(
        0.0, "Weight decay", minimum=0.0, help="The host's: 0 for embeddings, AdamW's 0.01 for hypernetworks"
    )
    momentum: float = _opt(0.9, "Momentum (SGD)", minimum=0.0, help="Below 1; 0: plain SGD")
    betas: str = _opt(
        "", "Betas (Adam, AdamW, Lion, Prodigy, AdamW8bit)",
        help="Two numbers like 0.9, 0.999; empty: the optimizer's own (Lion 0.9, 0.99; others 0.9, 0.999)",
    )
    flip_p: float = _opt(0.0, "Random horizontal flip probability", minimum=0.0, maximum=1.0)
    crop: str = _opt("resize", "Fit images by", choices=("resize", "center", "random"))
    seed: int = _opt(-1, "Seed (-1: random)")
    # loss options (core.training.loss has the formulas); each off by default: the host's loss
    loss_type: str = _opt(
        "mse", "Loss", choices=LOSS_TYPES,
        help="mse: d²; l1: |d|; huber: 2c·(√(d²+c²) - c) (pseudo-Huber, kohya's); smooth_l1: 2·(√(d²+c²) - c); "
        "d = prediction - target, c = Huber c",
    )
    huber_c: float = _opt(0.1, "Huber c (huber, smooth_l1)", help="Where the loss turns from squared to linear",
                          minimum=0.0)
    min_snr_gamma: float = _opt(
        0.0, "Min-SNR-γ weighting, 0 to disable", minimum=0.0,
        help="Each sample's loss times min(SNR, γ)/SNR (noise prediction) or min(SNR, γ)/(SNR+1) (v-prediction); "
        "5 is typical",
    )
    noise_offset: float = _opt(
        0.0, "Noise offset, 0 to disable", minimum=0.0, maximum=1.0, step=0.01,
        help="Adds offset × one random value per image and latent channel to the noise; 0.05-0.1 is typical",
    )
    timestep_min: int = _opt(0, "Timestep range start", minimum=0, maximum=1000)
    timestep_max: int = _opt(1000, "Timestep range end (excluded)", minimum=1, maximum=1000,
                             help="Timesteps are drawn uniformly from [start, end); 1000: up to the model's last")
    validation_every: int = _opt(
        0, "Measure fixed-noise validation loss every N steps, 0 to disable", minimum=0
    )
    validation_images: int = _opt(4, "Images used for the validation loss", minimum=1,
                                  help="the first N training images, when no images are held out")
    # held-out validation and early stopping (core.training.best); all off by default
    validation_split: float = _opt(
        0.0, "Hold out this fraction of the images for the validation loss (0: none)", minimum=0.0, maximum=0.9,
        step=0.05, help="chosen from the file names (the same every run, whatever the seed); they are never "
        "trained on, and all of them make the validation loss",
    )
    validation_dir: str = _opt(
        "", "Validation images folder (instead of a split)",
        help="images (with their .txt captions) never trained on; all of them make the validation loss",
    )
    early_stop_patience: int = _opt(
        0, "Stop after N validations without a better validation loss (0: never)", minimum=0
    )
    early_stop_min_delta: float = _opt(
        0.0, "Smallest decrease of the validation loss that counts as better", minimum=0.0
    )
    final_file: str = _opt(
        "last", "The final file holds", choices=FINAL_FILES,
        help="last: the last step's tensors; best: the step with the lowest validation loss (its tensors, "
        "step and optimizer state, as an intermediate save at that step)",
    )
    gradient_checkpointing: bool = _opt(False, "Gradient checkpointing (less memory, slower)")
    attention_optimization: bool = _opt(True, "Use the host's cross-attention optimization while training")
    mixed_precision: str = _opt("auto", "Mixed precision", choices=("auto", "no", "fp16", "bf16"))
    nan_guard: bool = _opt(True, "Stop when the loss is not finite (keeps the last good save)")
    resume_interrupted: bool = _opt(
        True, "Continue a run that was cut short (crash, kill, Stop) from its last resume point",
        help="the same job again continues exactly where that run was; off: start over from the file")
    resume_point_minutes: float = _opt(
        10.0, "Also keep a resume point every N minutes (0: only when the file is saved)", minimum=0.0)
    # --- captions (kohya's keep_tokens, caption dropout, N_name folder repeats) and EMA; all off by default
    keep_tokens: int = _opt(
        0, "Keep the first N tags in place when shuffling or dropping tags", minimum=0,
        help="kohya's keep_tokens: the first N comma-separated tags of a caption are never shuffled or dropped",
    )
    caption_dropout_rate: float = _opt(
        0.0, "Caption dropout: chance of an empty [filewords] (the bare template)", minimum=0.0, maximum=1.0,
        help="drawn per prompt; 0: never",
    )
    folder_repeats: bool = _opt(
        False, "Repeat the images of N_name subfolders N times per epoch (kohya's folders)",
        help="also reads the subfolders of the dataset directory (one level): 10_concept/ counts 10 times, a "
        "folder without the N_ prefix once, 0_ folders not at all; off: only the directory's own files, as the host",
    )
    ema_decay: float = _opt(
        0.0, "EMA decay of the trained tensors (0: off, e.g. 0.999)", minimum=0.0, maximum=1.0,
        help="after each optimizer step: ema = decay * ema + (1 - decay) * tensors",
    )
    ema_start_step: int = _opt(
        0, "Start the EMA at step", minimum=0, help="a copy of the tensors at that step (or when the run begins)"
    )
    ema_for_output: bool = _opt(
        False, "Save the EMA tensors as the final file", help="intermediate saves keep the trained tensors"
    )
    ema_for_previews: bool = _opt(False, "Use the EMA tensors for previews and the validation loss")
    # --- aspect-ratio buckets (core.data.buckets); off by default: every image fitted to width×height
    bucketing: bool = _opt(
        False, "Aspect-ratio buckets: train each image near its own shape",
        help="each image is fitted (by 'Fit images by') to the size of the width×height area whose aspect ratio "
        "is closest to its own; images of one size batch together. resize: stretched to it, nothing cropped",
    )
    bucket_step: int = _opt(
        0, "Bucket step in px (0: auto, 64 SD1/SD2, 32 SDXL)", minimum=0, step=8,
        help="bucket sides are multiples of it; SD1/SD2 need multiples of 64, SDXL of 32",
    )
    bucket_max_aspect: float = _opt(4.0, "Most elongated bucket (long side / short side)", minimum=1.0)
    bucket_upscale: bool = _opt(
        False, "Enlarge images smaller than their bucket",
        help="off: such an image trains at the largest bucket-step size inside it, so no image is enlarged",
    )

    def validate(self) -> None:
        super().validate()
        _validate_training(self, self.save_every_field)
        self.optimizer_choice()
        _validate_captions_ema(self)
        _validate_buckets(self)
        check_validation_options(self)

    def template_path(self) -> str:
        return find_template(self.templates_dir, self.template_filename)

    def lr_schedule(self, cur_step: int = 0, gradient_step: int = 1) -> Schedule:
        """The learning-rate schedule from `cur_step` (a resume). The host advances its schedule
        once per micro-batch, so the accumulation count is part of it."""
        return make_schedule(self.lr_scheduler, self.learn_rate, self.steps, cur_step,
                             warmup_steps=self.lr_warmup_steps, min_lr=self.lr_min, field="learn_rate",
                             gradient_step=gradient_step)

    def clip_schedule(self, cur_step: int = 0, gradient_step: int = 1) -> Schedule | None:
        """The clip-value schedule (the learning-rate DSL, as the host), or None without clipping."""
        if self.clip_grad_mode == "disabled":
            return None
        return make_schedule("dsl", self.clip_grad_value, self.steps, cur_step, field="clip_grad_value",
                             gradient_step=gradient_step)

    def optimizer_choice(self) -> OptimizerChoice:
        """The optimizer and its settings, checked (each error names its field; an optional optimizer
        whose package is missing says which to install)."""
        _require(self.weight_decay >= 0, "weight_decay", f"must be 0 or more, got {self.weight_decay}")
        _require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        choice = OptimizerChoice(self.optimizer_name, self.weight_decay, self.momentum, parse_betas(self.betas))
        optimizer_class(self.optimizer_name)
        return choice


@dataclass
class TrainEmbeddingConfig(TrainingConfig):
    """Everything a textual-inversion run needs. Names and defaults as A1111 v1.10.1."""

    kind: ClassVar[str] = "train_embedding"
    HOST_FOLDERS: ClassVar[tuple[str, ...]] = ("embeddings_dir", "templates_dir")
    save_every_field: ClassVar[str] = "save_embedding_every"

    embedding_name: str = _opt("", "Embedding")
    preset: str = _opt(
        "none", "Preset", choices=PRESET_NAMES,
        help="Options chosen by measurement (README, Results: learned the toy-world concept fastest), filled in where the request sets none; "
        "none: the webui's own behaviour",
    )
    learn_rate: str = _opt(
        "0.005", "Embedding Learning rate", help="A rate, or a schedule: 0.005:100, 1e-3:1000, 1e-5"
    )
    save_embedding_every: int = _opt(
        500, "Save a copy of embedding to log directory every N steps, 0 to disable", minimum=0
    )
    save_image_with_stored_embedding: bool = _opt(True, "Save images with embedding in PNG chunks")
    embeddings_dir: str = _opt("embeddings", "Embeddings folder")
    embedding_file: str = _opt(
        "", "Embedding file", help="Train this file instead of looking the name up in the embeddings folder"
    )
    save_format: str = _opt("pt", "File format of saved embeddings", choices=("pt", "safetensors"))
    train_encoders: str = _opt(
        "both", "Text encoders to train (SDXL)", choices=("both", "clip_l", "clip_g"),
        help="SDXL embeddings hold one vector set per text encoder; the other set is kept as it is",
    )
    # per-encoder learning rates and the norm limit (core.options.encoder_rates); off by default
    learn_rate_clip_l: str = _opt(
        "", "CLIP-L learning rate (SDXL; empty: the Embedding Learning rate)",
        help="A rate or a schedule like the Embedding Learning rate, read with the same schedule type, "
        "warm-up and final rate",
    )
    learn_rate_clip_g: str = _opt(
        "", "CLIP-G learning rate (SDXL; empty: the Embedding Learning rate)",
        help="A rate or a schedule like the Embedding Learning rate, read with the same schedule type, "
        "warm-up and final rate",
    )
    norm_limit: float = _opt(
        0.0, "Limit each vector's norm to N × the typical token-embedding norm, 0 to disable", minimum=0.0,
        help="After each optimizer step a vector longer than N times the median norm of its text encoder's "
        "token embeddings is scaled back to that length (against overcooked embeddings); 1-2 is typical",
    )

    def validate(self) -> None:
        _check_name("embedding_name", self.embedding_name)
        super().validate()
        with open(self.template_path(), encoding="utf-8") as fh:
            text = fh.read()
        _require(
            "[name]" in text,
            "template_filename",
            f"{self.template_filename} has no [name]: the embedding would never appear in a prompt and learn nothing",
        )
        check_encoder_options(self)
        if self.embedding_file:
            _require(
                os.path.isfile(self.embedding_file), "embedding_file", f"no such file: {self.embedding_file}"
            )


def _as_text_list(value: Any) -> Any:
    """A JSON list for a comma-separated text field becomes that text ([1, 2, 1] → "1, 2, 1")."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value


def _as_sizes(value: Any) -> Any:
    """Module sizes from JSON (ints), the UI (strings) or the CLI ("768, 320") → a tuple of ints."""
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            try:
                if isinstance(v, (bool, float)):
                    raise ValueError
                out.append(int(v))
            except (TypeError, ValueError):
                raise ConfigError("enable_sizes", f"expected whole numbers, got {value!r}") from None
        return tuple(out)
    return value


@dataclass
class CreateHypernetworkConfig(ConfigBase):
    """A1111 `/sdapi/v1/create/hypernetwork`: create_hypernetwork(name, enable_sizes, overwrite_old,
    layer_structure, activation_func, weight_init, add_layer_norm, use_dropout, dropout_structure)."""

    kind: ClassVar[str] = "create_hypernetwork"
    HOST_FOLDERS: ClassVar[tuple[str, ...]] = ("hypernetwork_dir",)

    name: str = _opt("", "Name")
    enable_sizes: tuple[int, ...] = _opt(
        (768, 320, 640, 1280),
        "Modules",
        help="Context widths to train: 768 (SD1 text) or 1024 (SD2 text), 320/640/1280 (self-attention)",
        options=HN_MODULE_SIZES,
    )
    overwrite_old: bool = _opt(False, "Overwrite Old Hypernetwork")
    layer_structure: str = _opt(
        "1, 2, 1", "Enter hypernetwork layer structure", help="1st and last digit must be 1. ex:'1, 2, 1'"
    )
    activation_func: str = _opt(
        "linear",
        "Select activation function of hypernetwork. Recommended : Swish / Linear(none)",
        choices=HN_ACTIVATIONS,
    )
    weight_init: str = _opt(
        "Normal",
        "Select Layer weights initialization. Recommended: Kaiming for relu-like, Xavier for sigmoid-like, "
        "Normal otherwise",
        choices=HN_WEIGHT_INITS,
    )
    add_layer_norm: bool = _opt(False, "Add layer normalization")
    use_dropout: bool = _opt(False, "Use dropout")
    dropout_structure: str = _opt(
        "0, 0, 0",
        "Enter hypernetwork Dropout structure (or empty). Recommended : 0~0.35 incrementing sequence: "
        "0, 0.05, 0.15",
        help="One probability per layer-structure entry, each in [0, 1); used only with 'Use dropout'",
    )
    hypernetwork_dir: str = _opt("models/hypernetworks", "Hypernetworks folder")
    seed: int = _opt(-1, "Seed for the initial weights (-1: random)")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, ignore: tuple[str, ...] = ()) -> Any:
        data = dict(data or {})
        if data.get("enable_sizes") is not None:
            data["enable_sizes"] = _as_sizes(data["enable_sizes"])
        for key in ("layer_structure", "dropout_structure"):
            if data.get(key) is not None:
                data[key] = _as_text_list(data[key])
        return super().from_dict(data, ignore=ignore)

    def validate(self) -> None:
        super().validate()
        _check_name("name", self.name)
        sizes = _as_sizes(self.enable_sizes)
        _require(
            isinstance(sizes, tuple) and len(sizes) > 0, "enable_sizes", "select at least one module size"
        )
        _require(all(s > 0 for s in sizes), "enable_sizes", f"sizes must be positive, got {list(sizes)}")
        structure = self.layer_structure_list()
        check_layer_structure(structure)
        for size in sizes:
            _require(
                all(int(size * x) >= 1 for x in structure),
                "layer_structure",
                f"{self.layer_structure} gives a layer of width 0 for module size {size}",
            )
        if self.use_dropout and self.dropout_structure.strip():
            dropout = parse_float_list(self.dropout_structure, "dropout_structure")
            _require(
                len(dropout) == len(structure),
                "dropout_structure",
                f"needs one value per layer-structure entry ({len(structure)}), got {len(dropout)}",
            )
            _require(
                all(0 <= p < 1 for p in dropout),
                "dropout_structure",
                f"dropout probabilities must be in [0, 1), got {dropout}",
            )
        _require(bool(self.hypernetwork_dir), "hypernetwork_dir", "is empty")

    def layer_structure_list(self) -> list[float]:
        return parse_float_list(self.layer_structure, "layer_structure")

    def dropout_structure_list(self) -> list[float]:
        """As the host: the parsed text when dropout is on and the text is not empty, else zeros."""
        if self.use_dropout and self.dropout_structure.strip():
            return parse_float_list(self.dropout_structure, "dropout_structure")
        return [0] * len(self.layer_structure_list())


@dataclass
class TrainHypernetworkConfig(TrainingConfig):
    """Everything a hypernetwork run needs: the host's train_hypernetwork fields and defaults (A1111
    v1.10.1), the Training settings it reads, and sdtrain's own options."""

    kind: ClassVar[str] = "train_hypernetwork"
    HOST_FOLDERS: ClassVar[tuple[str, ...]] = ("hypernetwork_dir", "templates_dir")
    save_every_field: ClassVar[str] = "save_hypernetwork_every"

    hypernetwork_name: str = _opt("", "Hypernetwork")
    learn_rate: str = _opt(
        "0.00001", "Hypernetwork Learning rate", help="A rate, or a schedule: 1e-5:100, 1e-6:1000"
    )
    save_hypernetwork_every: int = _opt(
        500, "Save a copy of hypernetwork to log directory every N steps, 0 to disable", minimum=0
    )
    template_filename: str = _opt(
        "hypernetwork.txt", "Prompt template", help="Hypernetwork templates need no [name]"
    )
    hypernetwork_dir: str = _opt("models/hypernetworks", "Hypernetworks folder")
    hypernetwork_file: str = _opt(
        "",
        "Hypernetwork file",
        help="Train this file instead of looking the name up in the hypernetworks folder",
    )
    weight_decay: float = _opt(
        0.01, "Weight decay", minimum=0.0, help="The host's: AdamW's default, 0.01 (it builds the optimizer "
        "with the learning rate only)"
    )
    attention_optimization: bool = _opt(
        False,
        "Use the host's cross-attention optimization while training",
        help="The host always turns it off for hypernetwork training",
    )

    def validate(self) -> None:
        _check_name("hypernetwork_name", self.hypernetwork_name)
        super().validate()
        if self.hypernetwork_file:
            _require(
                os.path.isfile(self.hypernetwork_file),
                "hypernetwork_file",
                f"no such file: {self.hypernetwork_file}",
            )


def _validate_training(cfg: Any, save_every_field: str) -> None:
    """The checks every training config shares (TI and hypernetwork: the host's validate_train_inputs
    and more), each naming its field."""
    cfg.lr_schedule()
    for name in ("batch_size", "gradient_step", "steps"):
        _require(getattr(cfg, name) > 0, name, "must be a positive integer")
    for name in ("create_image_every", save_every_field, "training_write_csv_every", "validation_every"):
        _require(getattr(cfg, name) >= 0, name, "must be 0 (off) or a positive integer")
    cfg.clip_schedule()
    _require(0.0 <= cfg.tag_drop_out <= 1.0, "tag_drop_out", "must be between 0 and 1")
    _require(0.0 <= cfg.flip_p <= 1.0, "flip_p", "must be between 0 and 1")
    _require(cfg.huber_c > 0, "huber_c", f"must be positive, got {cfg.huber_c}")
    _require(cfg.min_snr_gamma >= 0, "min_snr_gamma", f"must be 0 (off) or positive, got {cfg.min_snr_gamma}")
    _require(0.0 <= cfg.noise_offset <= 1.0, "noise_offset", f"must be between 0 and 1, got {cfg.noise_offset}")
    _require(cfg.timestep_min >= 0, "timestep_min", f"must be 0 or more, got {cfg.timestep_min}")
    _require(cfg.timestep_max <= 1000, "timestep_max", f"must be at most 1000, got {cfg.timestep_max}")
    _require(
        cfg.timestep_min < cfg.timestep_max,
        "timestep_max",
        f"must be above the range start timestep_min ({cfg.timestep_min}), got {cfg.timestep_max}",
    )
    for name in ("training_width", "training_height", "preview_width", "preview_height"):
        value = getattr(cfg, name)
        _require(
            value >= 64 and value % 8 == 0, name, f"must be a multiple of 8 and at least 64, got {value}"
        )
    _require(cfg.preview_steps >= 1, "preview_steps", "must be at least 1")
    _require(bool(cfg.data_root), "data_root", "Dataset directory is empty")
    _require(os.path.isdir(cfg.data_root), "data_root", f"Dataset directory doesn't exist: {cfg.data_root}")
    _require(bool(os.listdir(cfg.data_root)), "data_root", f"Dataset directory is empty: {cfg.data_root}")
    _require(
        cfg.training_tensorboard_flush_every >= 0,
        "training_tensorboard_flush_every",
        f"must be 0 (at once) or a positive number of seconds, got {cfg.training_tensorboard_flush_every}",
    )
    if getattr(cfg, save_every_field) or cfg.create_image_every or cfg.training_write_csv_every:
        _require(
            bool(cfg.log_directory),
            "log_directory",
            "is empty but saves, images or the loss CSV need it",
        )
    if cfg.training_enable_tensorboard:
        _require(bool(cfg.log_directory), "log_directory", "is empty but tensorboard logging needs it")
    template = cfg.template_path()
    _require(os.path.isfile(template), "template_filename", f"prompt template not found: {template}")


def _validate_captions_ema(cfg: Any) -> None:
    _require(cfg.keep_tokens >= 0, "keep_tokens", "must be 0 (off) or a positive integer")
    _require(0.0 <= cfg.caption_dropout_rate <= 1.0, "caption_dropout_rate", "must be between 0 and 1")
    _require(0.0 <= cfg.ema_decay < 1.0, "ema_decay", "must be 0 (off) or between 0 and 1 (1 would never move)")
    _require(cfg.ema_start_step >= 0, "ema_start_step", "must be 0 or a positive integer")


def _validate_buckets(cfg: Any) -> None:
    """What can be checked without the model (the step it needs is checked when the run knows it)."""
    if cfg.bucketing:
        _require(not cfg.varsize, "bucketing", "cannot be used with varsize (Do not resize images): choose one")
    _require(cfg.bucket_step >= 0 and cfg.bucket_step % 8 == 0, "bucket_step",
             f"must be 0 (auto) or a positive multiple of 8, got {cfg.bucket_step}")
    _require(cfg.bucket_max_aspect >= 1, "bucket_max_aspect", f"must be 1 or more, got {cfg.bucket_max_aspect}")


def find_template(templates_dir: str, filename: str) -> str:
    """The host keys templates by bare file name anywhere under its templates folder
    (modules/textual_inversion/textual_inversion.py, list_textual_inversion_templates)."""
    _require(bool(filename), "template_filename", "Prompt template file not selected")
    _require(
        os.path.basename(filename) == filename and filename not in (".", ".."),
        "template_filename",
        f"{filename!r} must be a file name inside the templates folder, not a path",
    )
    for root, _dirs, files in sorted(os.walk(templates_dir, followlinks=True)):
        if filename in files:
            return os.path.join(root, filename)
    return os.path.join(templates_dir, filename)
