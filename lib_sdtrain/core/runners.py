"""Core: every job kind the core provides, for `JobService` (the CLI, the API and the UI use this)."""

from __future__ import annotations

from typing import Any

from lib_sdtrain.core.config import (
    ConfigBase,
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.hypernetwork_training import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.jobs import JobControl
from lib_sdtrain.core.port import SessionOptions, TrainingHost
from lib_sdtrain.core.preprocess import PreprocessConfig, PreprocessResult, run_preprocess
from lib_sdtrain.core.textual_inversion import create_embedding, train_embedding


class _SessionControl:
    """A job control that also reports to the host's progress bar and obeys its Interrupt."""

    def __init__(self, control: JobControl | None, session):
        self.control, self.session = control, session

    def emit(self, kind: str, **data: Any) -> None:
        if kind == "progress":
            self.session.report(int(data["done"]), int(data["total"]), f"preprocessed {data['done']}/{data['total']}")
        if self.control is not None:
            self.control.emit(kind, **data)

    @property
    def stop_requested(self) -> bool:
        if self.session.interrupted() and self.control is not None:
            self.control.stop()
        return self.session.interrupted() or (self.control is not None and self.control.stop_requested)


def preprocess(host: TrainingHost, cfg: PreprocessConfig, control: JobControl | None = None) -> PreprocessResult:
    """Dataset preparation as a job: the host's lock and progress bar, its captioners if asked for."""
    cfg.validate()  # the destination may have filled while the job waited in the queue
    with host.gpu_session("preprocess", SessionOptions()) as session:
        found = host.captioners()
        return run_preprocess(cfg, _SessionControl(control, session), captioner=found.get("blip"),
                              deepbooru=found.get("deepbooru"))


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
