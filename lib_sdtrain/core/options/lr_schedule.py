"""Core: learning-rate and clip-value schedules (A1111's "RATE:STEP, ..." language, cosine, warmup).

Every schedule answers three questions about an optimizer step number `n` (0-based, the host's
`embedding.step` / `hypernetwork.step` before the step is taken):

* `value(n)`: the rate (or clip value) that step `n` uses;
* `finished(n)`: whether training stops before taking step `n`;
* `end_step`: the first `n` for which `finished(n)` is true.

The values are pure functions of `n`, so resuming is just asking for later step numbers.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Literal, Protocol, runtime_checkable

from lib_sdtrain.core.errors import ConfigError

ScheduleKind = Literal["dsl", "cosine", "constant_with_warmup"]
SCHEDULE_KINDS: tuple[str, ...] = ("dsl", "cosine", "constant_with_warmup")

SYNTAX_HELP = (
    'write a single number such as "0.005", or comma-separated RATE:STEP entries such as '
    '"0.005:100, 1e-3:1000, 1e-5" (0.005 until step 100, then 1e-3 until step 1000, then 1e-5 '
    "until the last step; STEP is a whole number, -1 means the last step)"
)


@runtime_checkable
class Schedule(Protocol):
    end_step: int

    def value(self, step: int) -> float: ...

    def finished(self, step: int) -> bool: ...


def _number(text: str, field: str, entry: str) -> float:
    value = float(text)  # ValueError is reported by the caller with the whole entry
    if not math.isfinite(value):
        raise ConfigError(field, f"{entry.strip()!r} is not a finite number; {SYNTAX_HELP}")
    return value


def parse_schedule(
    text: str, max_steps: int, cur_step: int = 0, field: str = "learn_rate"
) -> list[tuple[float, int]]:
    """Parse the host's schedule language into `(rate, end_step)` pairs.

    Same reading as `LearnScheduleIterator` (modules/textual_inversion/learn_schedule.py):
    entries whose STEP <= `cur_step` are dropped (resume), STEP is clipped to `max_steps`, and
    parsing stops at a bare RATE, at STEP == -1 or at the first STEP > `max_steps`; whatever
    follows the stop is never read (not even checked). A dropped entry's RATE is not checked
    either, as in the host. Deviation: nan/inf rates are refused.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(text)
    if not isinstance(text, str):
        raise ConfigError(field, f"expected text, got {type(text).__name__}; {SYNTAX_HELP}")
    rates: list[tuple[float, int]] = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        parts = entry.split(":")
        try:
            if len(parts) != 2:
                # A bare RATE (or "a:b:c", whose first part the host reads as the rate) runs to the end.
                rates.append((_number(parts[0], field, entry), max_steps))
                break
            step = int(parts[1])  # the host uses int(): "100.0" or "1e3" are errors
            if step > cur_step:
                rates.append((_number(parts[0], field, entry), min(step, max_steps)))
                if step > max_steps:
                    break
            elif step == -1:
                rates.append((_number(parts[0], field, entry), max_steps))
                break
            # else: the entry ended at or before the step we resume from; dropped.
        except ValueError as e:
            raise ConfigError(field, f"cannot read {entry.strip()!r}: {SYNTAX_HELP}") from e
    if not rates:
        if text.strip():
            raise ConfigError(
                field,
                f"no entry of {text.strip()!r} is left to train: each one ends at or before step "
                f"{cur_step}, where training resumes; {SYNTAX_HELP}",
            )
        raise ConfigError(field, f"the schedule is empty; {SYNTAX_HELP}")
    return rates


class StepSchedule:
    """Piecewise-constant schedule with the exact stepping of the host's `LearnRateScheduler`.

    The host calls `scheduler.apply(optimizer, embedding.step)` before every micro-batch, i.e.
    `gradient_step` times per optimizer step, and each call moves on by **at most one** entry
    once `step >= end_step` (learn_schedule.py `step()`). Training stops at the call that finds
    no entry left (textual_inversion.py / hypernetwork.py `if scheduler.finished: break`).
    For ordinary schedules (end steps increasing) this means: entry k is used for steps
    [end of entry k-1, end of entry k), and training ends at the last entry's end step, even
    when that is before `max_steps`. For end steps that repeat or go down (possible after
    clipping to max_steps, e.g. "1e-3:100, 1e-4:200" with 100 steps), each such entry still
    lasts until the next call, so how long depends on `gradient_step` and `end_step` can exceed
    `max_steps`; this class reproduces that too (pass the host's effective gradient_step).
    """

    def __init__(self, entries: list[tuple[float, int]], cur_step: int = 0, gradient_step: int = 1):
        if not entries:
            raise ValueError("StepSchedule needs at least one entry")
        if gradient_step < 1:
            raise ValueError("gradient_step must be >= 1")
        self.entries = list(entries)
        self.cur_step = cur_step
        k = gradient_step
        # Call positions (step, call number within the step, 1..k) at which each entry became the
        # current one; the first is current before any call (call 0).
        starts: list[tuple[int, int]] = [(cur_step, 0)]
        for _, end in self.entries:
            step, call = starts[-1]
            nxt = (step, call + 1) if call < k else (step + 1, 1)
            starts.append(nxt if nxt[0] >= end else (end, 1))
        self._starts = starts[:-1]
        self._finish = starts[-1]
        self._calls = k
        self.end_step: int = self._finish[0]

    @classmethod
    def parse(
        cls, text: str, max_steps: int, cur_step: int = 0, field: str = "learn_rate", gradient_step: int = 1
    ) -> StepSchedule:
        return cls(parse_schedule(text, max_steps, cur_step, field), cur_step, gradient_step)

    def _index(self, step: int) -> int:
        # The value used by step n is the one current after the last call made at step n.
        return max(0, bisect_right(self._starts, (step, self._calls)) - 1)

    def value(self, step: int) -> float:
        return self.entries[self._index(step)][0]

    def finished(self, step: int) -> bool:
        return step >= self.end_step

    @property
    def segments(self) -> list[tuple[int, int, float]]:
        """`(first_step, stop_step, rate)` for each entry that is used for at least one step."""
        out = []
        stops = [s for s, _ in self._starts[1:]] + [self.end_step]
        for (start, _), stop, (rate, _) in zip(self._starts, stops, self.entries):
            if stop > start:
                out.append((start, stop, rate))
        return out


def _single_rate(text_or_lr: str | float, kind: str, field: str) -> float:
    if isinstance(text_or_lr, (int, float)) and not isinstance(text_or_lr, bool):
        lr = float(text_or_lr)
    else:
        text = str(text_or_lr).strip()
        if ":" in text or "," in text:
            raise ConfigError(
                field,
                f"the {kind} schedule takes one learning rate such as 0.005, not {text!r}; "
                "use the 'dsl' schedule for RATE:STEP lists",
            )
        try:
            lr = float(text)
        except ValueError:
            raise ConfigError(
                field, f"{text!r} is not a number; expected a learning rate such as 0.005"
            ) from None
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(field, f"the learning rate must be a positive number, got {lr}")
    return lr


class _WarmupSchedule:
    def __init__(self, lr: float, max_steps: int, warmup_steps: int = 0):
        self.lr = lr
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.end_step: int = max_steps

    def _warmup(self, step: int) -> float | None:
        """Linear warmup from 0: step 0 uses 0, step `warmup_steps` reaches the full rate."""
        if step < self.warmup_steps:
            return self.lr * max(step, 0) / self.warmup_steps
        return None

    def finished(self, step: int) -> bool:
        return step >= self.end_step


class ConstantWithWarmupSchedule(_WarmupSchedule):
    """`lr * step / warmup_steps` during warmup, then `lr`."""

    def value(self, step: int) -> float:
        w = self._warmup(step)
        return self.lr if w is None else w


class CosineSchedule(_WarmupSchedule):
    """Optional linear warmup, then half a cosine from `lr` (at `warmup_steps`) to `min_lr` (at `max_steps`)."""

    def __init__(self, lr: float, max_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
        super().__init__(lr, max_steps, warmup_steps)
        self.min_lr = min_lr

    def value(self, step: int) -> float:
        w = self._warmup(step)
        if w is not None:
            return w
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(
    kind: ScheduleKind,
    text_or_lr: str | float,
    max_steps: int,
    cur_step: int = 0,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    field: str = "learn_rate",
    gradient_step: int = 1,
) -> StepSchedule | CosineSchedule | ConstantWithWarmupSchedule:
    """Build a schedule. "dsl" is the host's language (also used for clip_grad_value);
    `warmup_steps`/`min_lr` only apply to "cosine" and "constant_with_warmup" (ignored by "dsl"),
    `gradient_step` and `cur_step` only matter to "dsl" (the others are pure functions of the step)."""
    if kind == "dsl":
        return StepSchedule.parse(str(text_or_lr), max_steps, cur_step, field, gradient_step)
    if kind not in SCHEDULE_KINDS:
        raise ConfigError(
            "lr_schedule", f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}"
        )
    lr = _single_rate(text_or_lr, kind, field)
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError("warmup_steps", f"must be a whole number >= 0, got {warmup_steps!r}")
    if kind == "constant_with_warmup":
        return ConstantWithWarmupSchedule(lr, max_steps, warmup_steps)
    if not math.isfinite(min_lr) or min_lr < 0:
        raise ConfigError("min_lr", f"must be a number >= 0, got {min_lr!r}")
    return CosineSchedule(lr, max_steps, warmup_steps, min_lr)
