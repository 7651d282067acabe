"""Core: every job kind the core provides, for `JobService` (the CLI, the API and the UI use this)."""

from __future__ import annotations

from typing import Any

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
