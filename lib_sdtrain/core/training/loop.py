"""Core: the training loop shared by every trainable kind (embedding, hypernetwork).

The loop follows the host's in-tree trainer step for step (modules/textual_inversion/
textual_inversion.py, train_embedding): one optimizer step per `gradient_step` micro-batches,
learning rate and clip value looked up for the current step before it, drop-last for
accumulation, a loss CSV in the host's columns. What differs is said where it differs.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.port import ImageSize, NoiseSchedule, Session, TrainingHost
from lib_sdtrain.core.training.distributed import SINGLE, DataParallel
from lib_sdtrain.core.training.loss import (
    PLAIN,
    LossOptions,
    elementwise_loss,
    reduce_loss,
    sample_noise,
    sample_timesteps,
)

log = logging.getLogger(__name__)


# 1. the diffusion objective -----------------------------------------------------------------------
def diffusion_loss(
    host: TrainingHost,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cond: Any,
    *,
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    options: LossOptions | None = None,
) -> torch.Tensor:
    """ldm's `p_losses` with l2 loss (what `LatentDiffusion.forward` returns for SD1/SD2 configs):
    t ~ U[0, T), x_t = sqrt(ā)·x0 + sqrt(1-ā)·ε, MSE against ε (eps) or sqrt(ā)·ε - sqrt(1-ā)·x0 (v).
    `weight` (`[B, h, w]` or `[B, C, h, w]`) scales the per-element loss before the mean, like the
    host's `weighted_forward` (modules/sd_hijack.py). `options` (core.training.loss; None: the host's
    loss) change the loss type, weight samples by min-SNR-γ, offset the noise and narrow the timestep
    range; a given `t` or `noise` is used as it is."""
    opts = options or PLAIN
    b = x0.shape[0]
    if t is None:
        t = sample_timesteps(b, schedule, opts, generator)
    if noise is None:
        noise = sample_noise(x0.shape, opts, generator)
    noise = noise.to(x0.device, x0.dtype)
    a = schedule.alphas_cumprod.to(x0.device)[t.to(x0.device)].to(x0.dtype).view(b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = host.predict(x_t, t.to(x0.device), cond)
    target = noise if schedule.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    err = elementwise_loss(out.float(), target.float(), opts.loss_type, opts.huber_c)
    if weight is not None:
        w = weight.to(err.device, err.dtype)
        err = err * (w.unsqueeze(1) if w.dim() == 3 else w)
    return reduce_loss(err, t, schedule, opts)


# 2. the loop ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, h, w] on the host device
    prompts: list[str]
    weight: torch.Tensor | None = None
    sizes: list[ImageSize] | None = None  # SDXL's size conditioning, one per latent


@dataclass
class LoopState:
    step: int  # optimizer steps done (the file's `step`)
    total: int  # max steps
    steps_per_epoch: int
    last_loss: float = float("nan")
    last_lr: float = 0.0
    last_prompt: str = ""
    started: float = field(default_factory=time.time)
    start_step: int = 0
    stopped: bool = False
    #: the data order's random state when the current epoch began, and its micro-batches trained so far
    epoch_data_state: Any = None
    micro_in_epoch: int = 0
    #: a resumed run: micro-batches of its first epoch that the interrupted run already trained
    skip_micro: int = 0
    #: a resumed run: put `epoch_data_state` back before its first epoch (even when none was trained)
    resuming: bool = False
    scaler: Any = None  # the fp16 loss scaler, when there is one


@dataclass
class LoopHooks:
    """What the trainable kind supplies. `after_step` runs after every optimizer step (cadences)."""

    batches: Callable[[], Iterator[Batch]]  # one epoch of micro-batches
    encode: Callable[[list[str], list[ImageSize] | None], Any]  # prompts, sizes → conditioning (the host)
    lr_at: Callable[[int], float]
    finished: Callable[[int], bool]
    clip: Callable[[int], None] | None  # clip (and look at) the gradients of this step, or None
    after_step: Callable[[LoopState], None]
    should_stop: Callable[[], bool]
    #: the data order's random state, and putting it back (resume points); None: not kept
    data_state: Callable[[], Any] | None = None
    set_data_state: Callable[[Any], None] | None = None
    #: one learning rate per parameter group (their own schedules); None: every group takes `lr_at`'s
    group_lrs: Callable[[int], list[float]] | None = None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_loop(
    host: TrainingHost,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    state: LoopState,
    hooks: LoopHooks,
    *,
    gradient_step: int,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    autocast_dtype: torch.dtype | None = None,
    nan_guard: bool = True,
    scaler_state: dict[str, Any] | None = None,
    loss_options: LossOptions | None = None,
    parallel: DataParallel | None = None,
) -> LoopState:
    """Train until `state.total` steps, the schedule's end, or a stop request. A resumed run
    (`state.skip_micro`) first puts the data order back as its epoch began and passes over the
    micro-batches already trained (building them again draws the same random numbers).
    `parallel` (core.training.distributed): this process trains its share of each batch, and the
    gradients and the loss are averaged over the processes before each optimizer step."""
    dp = parallel or SINGLE
    info = host.describe()
    scaler = torch.amp.GradScaler(info.device.type) if autocast_dtype == torch.float16 else None
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    state.scaler = scaler
    micro_per_epoch = max(1, state.steps_per_epoch) * gradient_step
    accumulated = 0.0
    while state.step < state.total:
        skip, state.skip_micro = state.skip_micro, 0
        if state.resuming and hooks.set_data_state is not None and state.epoch_data_state is not None:
            hooks.set_data_state(state.epoch_data_state)
        elif hooks.data_state is not None:
            skip, state.epoch_data_state = 0, hooks.data_state()
        state.resuming = False
        state.micro_in_epoch = skip
        for j, batch in enumerate(hooks.batches()):
            if j >= micro_per_epoch:  # drop-last for accumulation, as the host does
                break
            if j < skip:  # trained before the run was interrupted
                continue
            if hooks.finished(state.step):
                return state
            if hooks.should_stop():
                state.stopped = True
                return state
            lr = hooks.lr_at(state.step)
            rates = hooks.group_lrs(state.step) if hooks.group_lrs else [lr] * len(optimizer.param_groups)
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate

            # forward: the conditioning goes through the host's text encoder so the live
            # vectors are spliced in and receive gradients
            drawn: dict[str, torch.Tensor] = {}
            if dp.active:  # the whole batch's draws, as one process makes them; then this process' rows
                drawn["t"], drawn["noise"], batch = _share(batch, dp, schedule, loss_options or PLAIN, generator)
            with autocast_context(info.device, autocast_dtype):
                cond = hooks.encode(batch.prompts, batch.sizes)
                loss = (
                    diffusion_loss(
                        host, schedule, batch.latents, cond, weight=batch.weight, generator=generator,
                        options=loss_options, **drawn,
                    )
                    / gradient_step
                )
            value = float(loss.detach())
            if loss.requires_grad:  # else no trained tensor took part (no prompt held the embedding)
                (scaler.scale(loss) if scaler else loss).backward()
            accumulated += value
            state.last_prompt = batch.prompts[0]
            if (j + 1) % gradient_step:
                continue

            # optimizer step
            if dp.active:
                dp.average_gradients(params)
                accumulated = dp.mean(accumulated)  # the same value everywhere: the guard agrees
            if nan_guard and not math.isfinite(accumulated):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(state.step + 1, accumulated)
            # the optimizer skips tensors without a gradient; with none at all there is nothing to step
            # (and the fp16 scaler would fail: it found no gradient to check for inf)
            stepping = any(p.grad is not None for p in params)
            if scaler and stepping:
                scaler.unscale_(optimizer)  # clip real gradients (the host clips scaled ones)
            if hooks.clip:
                hooks.clip(state.step)
            if stepping and scaler:
                scaler.step(optimizer)
                scaler.update()
            elif stepping:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.micro_in_epoch = j + 1
            state.last_loss, state.last_lr = accumulated, lr
            accumulated = 0.0
            hooks.after_step(state)
            if state.step >= state.total:
                return state
    return state


def _share(batch: Batch, dp: DataParallel, schedule: NoiseSchedule, options: LossOptions,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Batch]:
    """Timesteps then noise for the whole batch (the draws `diffusion_loss` makes for it in one
    process), and this process' rows of them and of the batch."""
    t = sample_timesteps(len(batch.prompts), schedule, options, generator)
    noise = sample_noise(batch.latents.shape, options, generator)
    mine = Batch(latents=dp.shard(batch.latents), prompts=dp.shard(batch.prompts),
                 weight=dp.shard(batch.weight), sizes=dp.shard(batch.sizes))
    return dp.shard(t), dp.shard(noise), mine


class NonFiniteLoss(SdtrainError):
    def __init__(self, step: int, value: float):
        super().__init__(
            f"the loss became {value} at step {step}; training stopped before applying it, so the "
            "trained weights are still the last finite ones. Lower the learning rate, or check the "
            "images (a fully transparent PNG with 'Use PNG alpha channel as loss weight' has no weight)."
        )
        self.step = step


# 3. outputs the host writes for a run ------------------------------------------------------------
def write_loss_row(log_dir: str, filename: str, step: int, epoch_len: int, loss: float, lr: float) -> str:
    """Append one row in the host's CSV layout: step, epoch, epoch_step, loss, learn_rate
    (modules/textual_inversion/textual_inversion.py, write_loss)."""
    path = os.path.join(log_dir, filename)
    new = not os.path.exists(path)
    os.makedirs(log_dir, exist_ok=True)
    epoch_len = max(1, epoch_len)
    with open(path, "a+", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["step", "epoch", "epoch_step", "loss", "learn_rate"])
        w.writerow([step, (step - 1) // epoch_len, (step - 1) % epoch_len, f"{loss:.7f}", lr])
    return path


def eta_text(state: LoopState) -> str:
    done = state.step - state.start_step
    elapsed = time.time() - state.started
    if done <= 0 or elapsed <= 0:
        return f"step {state.step}/{state.total}"
    rate = done / elapsed
    left = (state.total - state.step) / rate
    return f"step {state.step}/{state.total}, {rate:.2f} it/s, ETA {duration(left)}"


def duration(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def report(session: Session | None, state: LoopState, what: str) -> None:
    if session is not None:
        session.report(
            state.step,
            state.total,
            f"{what}: loss {state.last_loss:.5f}, lr {state.last_lr:.3g}, {eta_text(state)}",
        )
