"""Core: every job kind the core provides, for `JobService` (the CLI, the API and the UI use this)."""

from __future__ import annotations

from typing import Any

from lib_sdtrain.core.config import (
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.hypernetwork_training import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.textual_inversion import create_embedding, train_embedding


def job_runners() -> dict[str, tuple[type, Any]]:
    """kind → (config class, runner(host, config, control)): textual inversion and hypernetworks."""
    return {
        CreateEmbeddingConfig.kind: (CreateEmbeddingConfig, create_embedding),
        TrainEmbeddingConfig.kind: (TrainEmbeddingConfig, train_embedding),
        CreateHypernetworkConfig.kind: (CreateHypernetworkConfig, create_hypernetwork),
        TrainHypernetworkConfig.kind: (TrainHypernetworkConfig, train_hypernetwork),
    }
