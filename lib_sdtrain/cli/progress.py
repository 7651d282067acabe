"""CLI: a job's progress on the terminal — one redrawn line on a TTY, plain lines otherwise.

On a terminal the bar (step/total, loss, lr, it/s, ETA) is redrawn in place with a carriage return;
messages (files written, validation losses, logs) are printed above it, and the bar ends with a
newline. Anywhere else (a pipe, a file, CI logs) each report is a line of its own, at most one step
line a second. `--progress bar|lines` or SDTRAIN_PROGRESS=bar|lines overrides the TTY test.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, TextIO

from lib_sdtrain.core.jobs.service import Event, Job
from lib_sdtrain.core.training.loop import duration

#: environment variable that forces the form: "bar", "lines" (anything else: decide by the TTY)
PROGRESS_ENV = "SDTRAIN_PROGRESS"
MODES = ("auto", "bar", "lines")
#: the bar's width in characters (fewer on a narrow terminal)
BAR_CELLS = 24


def use_bar(mode: str | None, stream: Any) -> bool:
    """Whether to draw the bar: the flag, else SDTRAIN_PROGRESS, else whether `stream` is a TTY."""
    chosen = (mode or "auto").lower()
    if chosen == "auto":
        chosen = os.environ.get(PROGRESS_ENV, "auto").strip().lower()
    if chosen in ("bar", "lines"):
        return chosen == "bar"
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def bar_line(step: int, total: int, *, loss: float | None, lr: float | None, rate: float | None,
             width: int) -> str:
    """`[#####-----] 12/100 loss 0.12345 lr 0.005 3.21 it/s ETA 0:27`, cut to `width` - 1 characters
    (a line that wraps cannot be redrawn with a carriage return)."""
    parts = [f"{step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.5f}")
    if lr is not None:
        parts.append(f"lr {lr:.3g}")
    if rate:
        parts += [f"{rate:.2f} it/s", f"ETA {duration((total - step) / rate)}"]
    else:
        parts += ["-- it/s", "ETA --:--"]
    tail = "  ".join(parts)
    cells = min(BAR_CELLS, width - len(tail) - 4)
    if cells < 5:  # a narrow terminal: the numbers alone
        return tail[: max(1, width - 1)]
    filled = int(cells * min(1.0, step / total)) if total > 0 else 0
    return f"[{'#' * filled}{'-' * (cells - filled)}] {tail}"


class ProgressPrinter:
    """Turns a job's events into terminal output (`bar` True: the redrawn bar, else plain lines)."""

    def __init__(self, stream: TextIO | None = None, *, bar: bool, every: float = 1.0, redraw: float = 0.1,
                 width: int | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.bar = bar
        self.every = every  # seconds between two plain step lines
        self.redraw = redraw  # seconds between two redraws of the bar
        self.width = width
        self._shown = ""  # the bar as it is on screen now ("" when none is)
        self._last = float("-inf")  # event time of the last step line / redraw
        self._origin: tuple[int, float] | None = None  # (step, time) of the first step seen
        self._latest: tuple[Any, ...] | None = None  # the last step report, drawn or not

    # -- output -------------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _columns(self) -> int:
        return self.width or shutil.get_terminal_size((80, 24)).columns

    def _draw(self, text: str) -> None:
        self._write("\r" + text + " " * max(0, len(self._shown) - len(text)))
        self._shown = text

    def _clear(self) -> None:
        if self._shown:
            self._write("\r" + " " * len(self._shown) + "\r")
            self._shown = ""

    def message(self, text: str) -> None:
        """A line of its own (above the bar, which is drawn again under it)."""
        shown = self._shown
        self._clear()
        self._write("".join(f"  {line}\n" for line in text.splitlines() or [""]))
        if shown:
            self._draw(shown)

    # -- events -------------------------------------------------------------------------------------
    def _rate(self, step: int, at: float) -> float | None:
        if self._origin is None:
            self._origin = (step, at)
            return None
        done, spent = step - self._origin[0], at - self._origin[1]
        return done / spent if done > 0 and spent > 0 else None

    def _progress(self, step: int, total: int, loss: float | None, lr: float | None, text: str, at: float) -> None:
        rate = self._rate(step, at)
        self._latest = (step, total, loss, lr, rate, text)
        if at - self._last < (self.redraw if self.bar else self.every) and step != total:
            return
        self._last = at
        self._show_latest()

    def _show_latest(self) -> None:
        if self._latest is None:
            return
        step, total, loss, lr, rate, text = self._latest
        if self.bar:
            self._draw(bar_line(step, total, loss=loss, lr=lr, rate=rate, width=self._columns()))
        else:
            self._write(f"  {text}\n")
        self._latest = None

    def event(self, e: Event) -> None:
        d = e.data
        if e.kind == "step":
            self._progress(int(d["step"]), int(d.get("total", 0)), d.get("loss"), d.get("lr"),
                           str(d.get("text", "")), e.time)
        elif e.kind == "progress":  # work counted in items (preprocess)
            done, total = int(d["done"]), int(d["total"])
            self._progress(done, total, None, None, f"processed {done}/{total}", e.time)
        elif e.kind in ("file", "preview"):
            self.message(f"wrote {d['path']}")
        elif e.kind == "validation":
            best = f" (best: step {d['best_step']})" if d.get("best_step") is not None else ""
            self.message(f"validation loss at step {d['step']}: {d['loss']:.5f}{best}")
        elif e.kind == "log":
            self.message(str(d["text"]))
        elif e.kind == "warning":
            self.message(f"WARNING: {d['text']}")

    def close(self) -> None:
        """The last report if it was held back, and the newline that ends the bar."""
        if self.bar and self._latest is not None:
            self._show_latest()
        if self._shown:
            self._write("\n")
            self._shown = ""

    def follow(self, job: Job, poll: float = 0.2) -> None:
        """Print `job`'s events until it has finished."""
        seen = 0
        try:
            while True:
                finished = job.wait(poll)
                for e in job.events_since(seen):  # after `finished` this drains what is left
                    seen = e.seq
                    self.event(e)
                if finished:
                    return
        finally:
            self.close()


def printer_for(mode: str | None, stream: TextIO | None = None) -> ProgressPrinter:
    stream = stream if stream is not None else sys.stdout
    return ProgressPrinter(stream, bar=use_bar(mode, stream))


__all__ = ["MODES", "PROGRESS_ENV", "ProgressPrinter", "bar_line", "printer_for", "use_bar"]
