"""Core: preprocessing as a job — the host's lock and progress bar, its captioners when present."""

from __future__ import annotations

from typing import Any

from lib_sdtrain.core.jobs.service import JobControl
from lib_sdtrain.core.port import SessionOptions, TrainingHost
from lib_sdtrain.core.preprocess.operations import PreprocessConfig, PreprocessResult, run_preprocess


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
