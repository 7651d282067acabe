"""Core: per-text-encoder learning rates of SDXL embeddings, and the embedding-norm limit (issue 13).

An SDXL embedding holds one vector set per text encoder (clip_l: 768 wide, clip_g: 1280 wide); both are
trained with the Embedding Learning rate unless `learn_rate_clip_l` / `learn_rate_clip_g` give one of
their own: a rate or a schedule in the learning-rate language, read with the same schedule type, warm-up
and final rate (`lr_scheduler`, `lr_warmup_steps`, `lr_min`). Training still ends where `learn_rate`'s
schedule ends; an encoder's schedule that ends earlier keeps its last rate.
"""

from __future__ import annotations

from typing import Any

from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.options.lr_schedule import Schedule, make_schedule

#: (the embedding's vector key, the config field of its own learning rate)
ENCODER_RATE_FIELDS: tuple[tuple[str, str], ...] = (("clip_l", "learn_rate_clip_l"), ("clip_g", "learn_rate_clip_g"))


def encoder_rate_fields(cfg: Any) -> dict[str, str]:
    """The vector keys that have a learning rate of their own → the field that sets it."""
    return {key: name for key, name in ENCODER_RATE_FIELDS if str(getattr(cfg, name, "") or "").strip()}


def encoder_schedules(cfg: Any, cur_step: int = 0, gradient_step: int = 1) -> dict[str, Schedule]:
    """Each encoder's own schedule (only those set), from `cur_step` as `cfg.lr_schedule` reads its own."""
    return {
        key: make_schedule(cfg.lr_scheduler, getattr(cfg, name).strip(), cfg.steps, cur_step,
                           warmup_steps=cfg.lr_warmup_steps, min_lr=cfg.lr_min, field=name,
                           gradient_step=gradient_step)
        for key, name in encoder_rate_fields(cfg).items()
    }


def check_encoder_options(cfg: Any) -> None:
    """The checks of a train_embedding config (each error names its field); whether the embedding is an
    SDXL one is known only once it is read (EmbeddingTraining says so, still before any model work)."""
    encoder_schedules(cfg)
    trained = {"clip_l", "clip_g"} if cfg.train_encoders == "both" else {cfg.train_encoders}
    for key, name in encoder_rate_fields(cfg).items():
        if key not in trained:
            raise ConfigError(name, f"{key} is not trained (train_encoders={cfg.train_encoders!r}); leave it empty")
    if not cfg.norm_limit >= 0:
        raise ConfigError("norm_limit", f"must be 0 (off) or positive, got {cfg.norm_limit}")


def not_for_this_embedding(cfg: Any, vector_keys: list[str], source: str) -> None:
    """ConfigError naming the first per-encoder rate set when the embedding is not an SDXL one."""
    fields = encoder_rate_fields(cfg)
    if fields and set(vector_keys) != {key for key, _ in ENCODER_RATE_FIELDS}:
        name = next(iter(fields.values()))
        raise ConfigError(name, f"per-encoder learning rates are for SDXL embeddings (clip_l, clip_g); "
                                f"{source} has the vector set {sorted(vector_keys)}: leave it empty")
