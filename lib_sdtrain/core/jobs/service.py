"""Core: the job service — one worker, a FIFO of validated jobs, events, stop.

Every surface (webui tab, HTTP API, CLI) submits and watches jobs through one `JobService`. A job's
config is validated in `submit`, in the caller's thread, so a bad field is refused before the job
exists and before any model work.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import queue
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_sdtrain.core.errors import ConfigError, SdtrainError
from lib_sdtrain.core.options.config import ConfigBase
from lib_sdtrain.core.port import TrainingHost

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, STOPPED, FAILED = "queued", "running", "done", "stopped", "failed"
#: a job the process ended while it was queued or running (a crash, a kill, a webui restart): listed
#: after the restart; resuming it submits it again, and a training continues from its resume point
INTERRUPTED = "interrupted"
FINISHED_STATES = (DONE, STOPPED, FAILED, INTERRUPTED)
#: jobs that can be submitted again as they were
RESUMABLE_STATES = (STOPPED, FAILED, INTERRUPTED)


@dataclass
class Event:
    """Something a job reports. kind: state | step | loss | validation | file | preview | log | warning | error."""

    kind: str
    data: dict[str, Any]
    time: float = field(default_factory=time.time)
    seq: int = 0


class JobControl:
    """What a running job reads (stop requests) and writes (events)."""

    def __init__(self, job: Job):
        self._job = job
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def emit(self, kind: str, **data: Any) -> None:
        self._job._record(Event(kind, data))


@dataclass
class Job:
    id: str
    kind: str
    config: ConfigBase
    state: str = QUEUED
    step: int = 0
    total_steps: int = 0
    loss: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, lr)
    validation: list[tuple[int, float]] = field(default_factory=list)
    best: tuple[int, float] | None = None  # the best validation (step, loss) so far, when the run tracks it
    files: list[str] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)
    #: what the run found that did not stop it (core.training.watchdog: the run does not learn): step, code, text
    warnings: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    message: str = ""
    result: Any = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    events: list[Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _seq: Any = field(default_factory=lambda: itertools.count(1), repr=False)
    _on_change: Callable[[str], None] | None = field(default=None, repr=False)
    control: JobControl = field(init=False, repr=False)

    MAX_EVENTS = 2000

    def __post_init__(self) -> None:
        self.control = JobControl(self)

    def _record(self, event: Event) -> None:
        with self._lock:
            event.seq = next(self._seq)
            d = event.data
            if event.kind == "step":
                self.step = int(d["step"])
                self.total_steps = int(d.get("total", self.total_steps))
                self.loss.append((self.step, float(d["loss"]), float(d["lr"])))
            elif event.kind == "progress":  # work counted in items, not optimizer steps (preprocess)
                self.step = int(d["done"])
                self.total_steps = int(d["total"])
            elif event.kind == "validation":
                self.validation.append((int(d["step"]), float(d["loss"])))
                if d.get("best_step") is not None:
                    self.best = (int(d["best_step"]), float(d["best_loss"]))
            elif event.kind == "file":
                self.files.append(str(d["path"]))
            elif event.kind == "preview":
                self.previews.append(str(d["path"]))
            elif event.kind == "log":
                self.message = str(d.get("text", ""))
            elif event.kind == "warning":
                self.warnings.append({"step": d.get("step"), "code": d.get("code"), "text": str(d.get("text", ""))})
                self.message = f"Warning: {d.get('text', '')}"
            self.events.append(event)
            if (
                len(self.events) > self.MAX_EVENTS
            ):  # keep memory bounded on long runs; history lives in loss/files
                del self.events[: len(self.events) - self.MAX_EVENTS]
        if self._on_change is not None and event.kind in ("state", "error", "file", "step", "warning"):
            self._on_change(event.kind)  # the job list on disk follows state changes, saves and progress

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def events_since(self, seq: int) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.seq > seq]

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event: a view of the job built at this number is current."""
        with self._lock:
            return self.events[-1].seq if self.events else 0

    def last_event(self, kind: str) -> Event | None:
        """The newest event of `kind` still kept (the newest first, so this is quick while a run goes on)."""
        with self._lock:
            for e in reversed(self.events):
                if e.kind == kind:
                    return e
        return None

    def history(self) -> tuple[list[tuple[int, float, float]], list[tuple[int, float]]]:
        """Shallow copies of the loss (step, loss, lr) and validation (step, loss) histories (quick: the
        rows themselves are shared, and never change)."""
        with self._lock:
            return list(self.loss), list(self.validation)

    def to_dict(self, *, history: bool = True) -> dict[str, Any]:
        """The job as the API and the job list on disk give it. The training thread records a step under
        the same lock, so the lock is held only to take references (the lists are copied shallowly, their
        tuples never change); the history's rows are built after it is released (a long run's history
        takes a while to build, and a step should not wait for a status request)."""
        with self._lock:
            loss, validation = (list(self.loss), list(self.validation)) if history else ((), ())
            out: dict[str, Any] = {
                "id": self.id,
                "kind": self.kind,
                "state": self.state,
                "step": self.step,
                "total_steps": self.total_steps,
                "last_loss": self.loss[-1][1] if self.loss else None,
                "last_lr": self.loss[-1][2] if self.loss else None,
                "files": list(self.files),
                "previews": list(self.previews),
                "warnings": [dict(w) for w in self.warnings],
                "error": self.error,
                "message": self.message,
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
                "config": self.config,
            }
            if history:
                out["validation_best"] = list(self.best) if self.best is not None else None
        out["config"] = out["config"].to_dict()
        if history:
            out["loss_history"] = [list(x) for x in loss]
            out["validation_history"] = [list(x) for x in validation]
        return out


#: A runner does one kind of job: (host, config, control) -> result. It raises on failure and
#: returns normally when stopped (after saving), having checked `control.stop_requested`.
Runner = Callable[[TrainingHost, Any, JobControl], Any]


class JobService:
    """Submit/list/get/stop jobs; one worker thread runs them in order on one host."""

    #: jobs kept in the list on disk (the newest)
    STORE_LIMIT = 200

    def __init__(self, host: Callable[[], TrainingHost], runners: dict[str, tuple[type[ConfigBase], Runner]],
                 store: str | None = None):
        """`store`: a JSON file the job list is kept in, so it survives the process (the webui's)."""
        self._host = host
        self._runners = dict(runners)
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._store = store
        if store:
            self._load()

    # -- surface API -------------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        return sorted(self._runners)

    def validate(self, kind: str, config: dict[str, Any] | ConfigBase) -> ConfigBase:
        if kind not in self._runners:
            raise ConfigError("kind", f"unknown job kind {kind!r}; one of {', '.join(self.kinds())}")
        cls, _ = self._runners[kind]
        if isinstance(config, ConfigBase):
            config.validate()
            return config
        return cls.from_dict(config)

    def submit(self, kind: str, config: dict[str, Any] | ConfigBase) -> Job:
        cfg = self.validate(kind, config)
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, config=cfg, _on_change=self._save)
        with self._lock:
            if self._closed:
                raise SdtrainError("the job service is shut down")
            self._jobs[job.id] = job
            self._ensure_worker()
        job._record(Event("state", {"state": QUEUED}))
        self._queue.put(job)
        return job

    def run(self, kind: str, config: dict[str, Any] | ConfigBase, timeout: float | None = None) -> Job:
        """Submit and wait: the blocking form the host's /sdapi routes and the CLI use."""
        job = self.submit(kind, config)
        job.wait(timeout)
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def stop(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None:
            return None
        job.control.stop()
        with job._lock:
            queued = job.state == QUEUED
        if queued:  # never started: it ends here, the worker will skip it
            self._finish(job, STOPPED)
        return job

    def resume(self, job_id: str) -> Job:
        """Submit a stopped, failed or interrupted job again with its settings: a training continues
        from its resume point (or from its file). SdtrainError when it cannot be resumed."""
        job = self.get(job_id)
        if job is None:
            raise SdtrainError(f"no job {job_id}")
        if job.state not in RESUMABLE_STATES:
            raise SdtrainError(f"job {job_id} is {job.state}; only a stopped, failed or interrupted job is resumed")
        return self.submit(job.kind, job.config)

    # -- the list on disk -------------------------------------------------------------------------
    #: seconds between two writes of the list for step progress alone
    STORE_EVERY = 30.0

    def _save(self, why: str = "state") -> None:
        if not self._store:
            return
        now = time.monotonic()
        if why == "step" and now - getattr(self, "_saved_at", 0.0) < self.STORE_EVERY:
            return
        self._saved_at = now
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.created)[-self.STORE_LIMIT:]
        data = json.dumps([j.to_dict(history=True) for j in jobs], default=str)
        with self._store_lock:  # atomically: a kill mid-write leaves the previous list
            folder = os.path.dirname(os.path.abspath(self._store))
            try:
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".jobs.", suffix=".tmp", dir=folder)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data)
                os.replace(tmp, self._store)
            except OSError as e:
                log.warning("sdtrain: could not keep the job list in %s: %s", self._store, e)

    def _load(self) -> None:
        try:
            with open(self._store, encoding="utf-8") as f:  # type: ignore[arg-type]
                saved = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("sdtrain: the job list in %s is unreadable (%s); starting an empty one", self._store, e)
            return
        for d in saved if isinstance(saved, list) else []:
            try:
                cls, _ = self._runners[d["kind"]]
                known = {f.name for f in dataclasses.fields(cls)}
                config = cls(**{k: v for k, v in d["config"].items() if k in known})  # as it ran, unchecked
                state = d["state"] if d["state"] in (DONE, STOPPED, FAILED, INTERRUPTED) else INTERRUPTED
                job = Job(id=str(d["id"]), kind=d["kind"], config=config, state=state, step=int(d["step"]),
                          total_steps=int(d.get("total_steps") or 0), files=list(d.get("files") or []),
                          previews=list(d.get("previews") or []), error=d.get("error"),
                          warnings=[dict(w) for w in d.get("warnings") or [] if isinstance(w, dict)],
                          message=str(d.get("message") or ""), created=float(d["created"]),
                          started=d.get("started"), finished=d.get("finished") or time.time(),
                          loss=[tuple(x) for x in d.get("loss_history") or []],
                          validation=[tuple(x) for x in d.get("validation_history") or []],
                          best=tuple(d["validation_best"]) if d.get("validation_best") else None,
                          _on_change=self._save)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("sdtrain: skipped a job of the saved list (%s)", e)
                continue
            if state == INTERRUPTED and d["state"] != INTERRUPTED:
                job.error = (f"the process ended while this job was {d['state']} (at step {job.step}); "
                             "resume it to continue where it was")
            job._done.set()
            self._jobs[job.id] = job

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop every job and the worker (webui reload / process exit)."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
            worker = self._worker
        for job in jobs:
            self.stop(job.id)
        self._queue.put(None)
        if worker is not None:
            worker.join(timeout)

    # -- worker -----------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="sdtrain-worker", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.state != QUEUED:
                continue
            self._run_one(job)

    def _run_one(self, job: Job) -> None:
        _, runner = self._runners[job.kind]
        with job._lock:
            job.state = RUNNING
            job.started = time.time()
        job._record(Event("state", {"state": RUNNING}))
        try:
            job.result = runner(self._host(), job.config, job.control)
        except SdtrainError as e:
            log.error("sdtrain job %s failed: %s", job.id, e)
            self._finish(job, FAILED, str(e))
        except Exception as e:  # the job fails; the worker and the host live on
            log.error("sdtrain job %s failed:\n%s", job.id, traceback.format_exc())
            self._finish(job, FAILED, f"{type(e).__name__}: {e}")
        else:
            if job.result is not None and str(job.result):
                job._record(Event("log", {"text": str(job.result)}))  # e.g. "Training finished at 30 steps..."
            self._finish(job, STOPPED if job.control.stop_requested else DONE)

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        with job._lock:
            if job.state in FINISHED_STATES:
                return
            job.state = state
            job.error = error
            job.finished = time.time()
        job._record(Event("error" if error else "state", {"state": state, "error": error}))
        job._done.set()
