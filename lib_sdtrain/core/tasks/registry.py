"""Core: every job kind the core provides, for `JobService` (the CLI, the API and the UI use this)."""

from __future__ import annotations

import json
from typing import Any

from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.options.config import (
    ConfigBase,
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.preprocess.operations import PreprocessConfig
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.preprocess import preprocess
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding

#: Kinds whose runner uses no model: at most the host's lock, progress bar and captioners.
MODEL_FREE_KINDS = (CreateHypernetworkConfig.kind, PreprocessConfig.kind)


def job_config_types() -> dict[str, type[ConfigBase]]:
    """kind → config class, for the surfaces (forms, schemas, validation)."""
    return {kind: cls for kind, (cls, _) in job_runners().items()}


def job_runners() -> dict[str, tuple[type, Any]]:
    """kind → (config class, runner(host, config, control)): textual inversion, hypernetworks, preprocessing."""
    return {
        CreateEmbeddingConfig.kind: (CreateEmbeddingConfig, create_embedding),
        TrainEmbeddingConfig.kind: (TrainEmbeddingConfig, train_embedding),
        CreateHypernetworkConfig.kind: (CreateHypernetworkConfig, create_hypernetwork),
        TrainHypernetworkConfig.kind: (TrainHypernetworkConfig, train_hypernetwork),
        PreprocessConfig.kind: (PreprocessConfig, preprocess),
    }


#: Fields of the host's request bodies that sdtrain accepts and ignores.
HOST_ONLY_FIELDS = ("id_task",)


def json_object(raw: str | bytes) -> dict[str, Any]:
    """A request body's text → its JSON object (empty text: `{}`); ConfigError("body") otherwise."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ConfigError("body", f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("body", "must be a JSON object")
    return data


def job_request(body: Any) -> tuple[str, dict[str, Any]]:
    """A job as `POST /sdtrain/v1/jobs` (and `python -m lib_sdtrain run job.json`) takes it,
    `{"kind": ..., "config": {...}}` → (kind, config fields without the host-only ones). The config
    itself is checked by its class; this checks the envelope, ConfigError naming what is wrong."""
    if not isinstance(body, dict):
        raise ConfigError("body", "must be a JSON object")
    types = job_config_types()
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in types:
        raise ConfigError("kind", f"must be one of {', '.join(sorted(types))}")
    extra = set(body) - {"kind", "config"}
    if extra:
        raise ConfigError(sorted(extra)[0], "unknown field (a job is {\"kind\", \"config\"})")
    config = body.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError("config", "must be a JSON object")
    return kind, {k: v for k, v in config.items() if k not in HOST_ONLY_FIELDS}
