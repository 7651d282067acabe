"""Test helper: a job control that keeps the events a run emits and can stop it after a step."""

from __future__ import annotations

from lib_sdtrain.core.jobs.service import Job, JobControl
from lib_sdtrain.core.options.config import CreateEmbeddingConfig


class Recorder(JobControl):
    def __init__(self, stop_at: int | None = None):
        super().__init__(Job(id="t", kind="test", config=CreateEmbeddingConfig(name="x")))
        self.stop_at = stop_at
        self.events: list[tuple[str, dict]] = []

    def emit(self, kind, **data):
        self.events.append((kind, data))
        if kind == "step" and self.stop_at is not None and data["step"] >= self.stop_at:
            self.stop()

    def of(self, kind):
        return [d for k, d in self.events if k == kind]
