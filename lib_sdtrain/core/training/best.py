"""Core: the best validation step, early stopping, and the final file made from the best step.

Every validation loss (see `batches.validation_loss`) goes through `BestTracker.observe`: a loss
below the best so far by more than `min_delta` is the new best (the first finite one always is);
any other counts one evaluation without improvement, and with `patience` > 0 the run stops after
that many in a row. The evaluation as the run begins is the first one (so the best can be the
file the run started from). With `keep` (final_file "best") the tracker also keeps, on the CPU, the
tensors that were evaluated and the optimizer state at that step: the final file is then what an
intermediate save at the best step would have written (its step, its tensors, its .optim).

The whole state goes into the run's resume points (`state()` / `load()`), so a resumed run counts
and chooses exactly as one that was never interrupted. `validation_loss.csv` in the log folder
holds one row per evaluation: step, loss, best_step, best_loss.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lib_sdtrain.core.training.ema import swapped_in

__all__ = ["VALIDATION_CSV", "BestTracker", "best_in", "trim_validation_csv", "write_validation_row"]

VALIDATION_CSV = "validation_loss.csv"


def _cpu(obj: Any) -> Any:
    """A copy of a state dict with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu(v) for v in obj)
    return obj


@dataclass
class BestTracker:
    patience: int = 0  # 0: never stop early
    min_delta: float = 0.0
    keep: bool = False  # keep the best step's tensors and optimizer state (final_file "best")
    best_step: int | None = None
    best_loss: float = math.inf
    since_best: int = 0  # evaluations since the best one
    last_step: int | None = None  # the step of the last evaluation
    evaluations: int = 0
    tensors: list[torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None

    def observe(self, step: int, loss: float, params: Sequence[torch.Tensor] = (),
                optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Count one evaluation at `step` (the live `params` are the tensors evaluated); True when it
        is the new best."""
        self.evaluations += 1
        self.last_step = step
        improved = math.isfinite(loss) and loss < self.best_loss - self.min_delta
        if improved:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
            if self.keep:
                self.tensors = [p.detach().to("cpu", copy=True) for p in params]
                self.optimizer = _cpu(optimizer.state_dict()) if optimizer is not None else None
        else:
            self.since_best += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_loss": self.best_loss, "since_best": self.since_best,
                "last_step": self.last_step, "evaluations": self.evaluations, "tensors": self.tensors,
                "optimizer": self.optimizer}

    def load(self, data: dict[str, Any]) -> None:
        self.best_step = None if data.get("best_step") is None else int(data["best_step"])
        self.best_loss = float(data.get("best_loss", math.inf))
        self.since_best = int(data.get("since_best", 0))
        self.last_step = None if data.get("last_step") is None else int(data["last_step"])
        self.evaluations = int(data.get("evaluations", 0))
        self.tensors = list(data["tensors"]) if data.get("tensors") is not None else None
        self.optimizer = data.get("optimizer")


def make_tracker(cfg: Any) -> BestTracker | None:
    """The run's tracker: None when the validation loss is not measured."""
    if not cfg.validation_every:
        return None
    return BestTracker(patience=cfg.early_stop_patience, min_delta=cfg.early_stop_min_delta,
                       keep=cfg.final_file == "best")


def validation_note(cfg: Any, data: Any) -> list[str]:
    """Log lines on the validation set, before training starts."""
    if not cfg.validation_every:
        return []
    paths = data.validation_paths
    if data.holdout is not None:
        where = f"from {cfg.validation_dir}" if cfg.validation_dir else f"{cfg.validation_split:g} of the dataset"
        names = ", ".join(os.path.basename(p) for p in paths[:8]) + (", ..." if len(paths) > 8 else "")
        return [f"validation: {len(paths)} held-out images ({where}: {names}), never trained on; "
                f"{len(data)} training images"]
    if cfg.early_stop_patience or cfg.final_file == "best":
        return [f"validation: the first {len(paths)} training images (nothing held out): the best step is "
                "judged on images it trains on; validation_split or validation_dir holds images out"]
    return []


def final_note(cfg: Any, tracker: BestTracker | None, step: int, saved_step: int, stopped: bool) -> str:
    """What the final message adds: why the run ended early, which step the file holds."""
    if tracker is None:
        return ""
    out = ""
    if tracker.should_stop and not stopped and step < cfg.steps:
        out += (f"\nEarly stop at step {step}: no better validation loss in {tracker.since_best} evaluations "
                f"(patience {tracker.patience}).")
    if tracker.best_step is not None:
        out += f"\nBest validation loss {tracker.best_loss:.5f} at step {tracker.best_step}."
    if cfg.final_file == "best":
        if tracker.best_step is None:
            out += f"\nNo finite validation loss: the file holds the last step ({saved_step})."
        else:
            out += f"\nThe file holds the best step ({saved_step})."
    return out


@contextlib.contextmanager
def best_in(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
            tracker: BestTracker | None) -> Iterator[int | None]:
    """The best step's tensors and optimizer state in the live ones for the duration (the final
    save), then the live ones back, bit for bit; yields the best step, or None (nothing kept: nothing
    changes)."""
    if tracker is None or tracker.tensors is None or tracker.best_step is None:
        yield None
        return
    live = optimizer.state_dict()  # references: loading another state replaces, never changes them
    with swapped_in(params, tracker.tensors):
        if tracker.optimizer is not None:
            optimizer.load_state_dict(tracker.optimizer)
        try:
            yield tracker.best_step
        finally:
            if tracker.optimizer is not None:
                optimizer.load_state_dict(live)


def write_validation_row(log_dir: str, step: int, loss: float, tracker: BestTracker) -> str:
    path = os.path.join(log_dir, VALIDATION_CSV)
    new = not os.path.exists(path)
    os.makedirs(log_dir, exist_ok=True)
    with open(path, "a+", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["step", "loss", "best_step", "best_loss"])
        best = "" if tracker.best_step is None else tracker.best_step
        w.writerow([step, f"{loss:.7f}", best, f"{tracker.best_loss:.7f}" if best != "" else ""])
    return path


def trim_validation_csv(log_dir: str, step: int) -> None:
    """Drop the rows after `step` (a resumed run: the interrupted one may have gone past its point)."""
    path = os.path.join(log_dir, VALIDATION_CSV)
    if not os.path.isfile(path):
        return
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) != len(rows):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(kept)
