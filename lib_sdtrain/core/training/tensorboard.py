"""Core: a run's TensorBoard events, as the host's trainer writes them (Settings → Training →
*Enable tensorboard logging*, *Save generated images within tensorboard*, *How often … to flush*).

The host (modules/textual_inversion/textual_inversion.py, tensorboard_setup/_add/_add_image) writes
into `<the run's log folder>/tensorboard` with torch's SummaryWriter:

* per step, `Loss/train` and `Learn rate/train` against the file's step, and the same values as
  `Loss/train/epoch-<epoch>` and `Learn rate/train/epoch-<epoch>` against the step within the
  epoch (counted from 1);
* each preview image as `Validation at epoch <epoch>` against the file's step.

The tag names are the host's, so dashboards made for its runs show sdtrain's. What differs: the
host's embedding trainer only ever writes the images (its scalar call is in the hypernetwork
trainer alone), sdtrain writes the scalars for both kinds; `Loss/train` is the step's loss (the one
in the loss CSV and the job's history) where the host's hypernetwork trainer writes a running mean
of the last three dataset lengths of steps (TensorBoard's own smoothing slider does that); and the
epoch is counted in optimizer steps (`step // steps per epoch`, as the host's embedding trainer
and its status line), not in images as the host's hypernetwork trainer does for these tags.

`tensorboard` is an optional package: it is imported here only, inside functions. When the
setting is on and it is missing, the run goes on without it and says so once in its log.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["MISSING_TEXT", "TensorBoardLog", "tensorboard_log", "tensorboard_status"]

#: What to do when the setting is on and the package is not there (the run's log and the UI show it).
MISSING_TEXT = (
    "TensorBoard logging is on in Settings but the tensorboard package is not installed: run "
    "`pip install tensorboard` in the webui's Python (its venv), then restart the webui. "
    "Training goes on without TensorBoard logs."
)


def _summary_writer() -> tuple[Any, str]:
    """torch's SummaryWriter class and "", or None and why it cannot be used."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # not installed (or older than torch accepts)
        log.debug("torch.utils.tensorboard does not import: %s", e)
        return None, MISSING_TEXT
    except Exception as e:  # installed but broken, e.g. a protobuf it does not work with
        return None, (
            f"TensorBoard logging is on in Settings but the tensorboard package does not load "
            f"({type(e).__name__}: {e}): reinstall it in the webui's Python (its venv), e.g. "
            "`pip install -U tensorboard`, then restart the webui. Training goes on without TensorBoard logs."
        )
    return SummaryWriter, ""


def tensorboard_status() -> str:
    """Empty when TensorBoard logs can be written, else what to do about it (for the UI)."""
    return _summary_writer()[1]


def epoch_of(step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step within it counted from 1) of the optimizer step `step`, as the host's tags."""
    per = max(1, steps_per_epoch)
    return step // per, step % per + 1


class TensorBoardLog:
    """One run's writer; a log without a writer does nothing (the setting off, or no package)."""

    def __init__(self, writer: Any = None, *, save_images: bool = False,
                 say: Callable[[str], None] | None = None):
        self.writer = writer
        self.save_images = save_images
        self.say = say

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def _failed(self, e: Exception) -> None:
        """A write that fails (disk full, …) ends the TensorBoard log, never the training run."""
        writer, self.writer = self.writer, None
        text = f"TensorBoard logging stopped: {type(e).__name__}: {e}"
        log.warning(text)
        if self.say is not None:
            self.say(text)
        with contextlib.suppress(Exception):
            writer.close()

    def step(self, step: int, steps_per_epoch: int, loss: float, lr: float) -> None:
        if self.writer is None:
            return
        epoch, epoch_step = epoch_of(step, steps_per_epoch)
        try:
            for name, value in (("Loss/train", loss), ("Learn rate/train", lr)):
                self.writer.add_scalar(name, value, step)
                self.writer.add_scalar(f"{name}/epoch-{epoch}", value, epoch_step)
        except Exception as e:
            self._failed(e)

    def image(self, image: Image.Image, step: int, steps_per_epoch: int) -> None:
        if self.writer is None or not self.save_images:
            return
        epoch, _ = epoch_of(step, steps_per_epoch)
        pixels = np.asarray(image if image.mode in ("RGB", "RGBA") else image.convert("RGB"))
        try:
            self.writer.add_image(f"Validation at epoch {epoch}", pixels, step, dataformats="HWC")
        except Exception as e:
            self._failed(e)

    def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as e:
            log.warning("closing the TensorBoard log failed: %s", e)


@contextlib.contextmanager
def tensorboard_log(cfg: Any, log_dir: str | None, say: Callable[[str], None]) -> Iterator[TensorBoardLog]:
    """The run's TensorBoard log as `cfg` says (`training_enable_tensorboard`, `…_save_images`,
    `…_flush_every`), in `<log_dir>/tensorboard`; closed (its events flushed) on the way out, also
    after a stop or a failure. `say` gets a line for the run's log when the log cannot be written."""
    if not (getattr(cfg, "training_enable_tensorboard", False) and log_dir):
        yield TensorBoardLog()
        return
    writer_class, why = _summary_writer()
    writer = None
    if writer_class is None:
        log.warning(why)
        say(why)
    else:
        path = os.path.join(log_dir, "tensorboard")
        try:
            os.makedirs(path, exist_ok=True)
            writer = writer_class(log_dir=path, flush_secs=cfg.training_tensorboard_flush_every)
        except Exception as e:
            text = f"TensorBoard logging is off for this run: could not open {path}: {e}"
            log.warning(text)
            say(text)
    tb = TensorBoardLog(writer, save_images=cfg.training_tensorboard_save_images, say=say)
    try:
        yield tb
    finally:
        tb.close()
