"""Core: the no-learning watch — an early warning that a run trains without learning anything.

The host's trainer will run for hours on a setting that makes every step a no-op (a learning rate of
0, a template whose prompts never hold the embedding, a clip value of 0) and say nothing. This watch
looks at three things, each cheaply and only a few times a run:

1. before the run, the settings: a learning rate (or clip value) of exactly 0 for the whole run, or from
   some step to the end, is legal but trains nothing (`schedule_warnings`); an embedding's norm limit
   so small that its vectors are held too short to carry a concept (`norm_limit_warning`);
2. the first `GRADIENT_STEPS` optimizer steps: whether the trained tensors receive any gradient at all
   (none: the embedding never appears in a prompt, or clipping to 0 wiped it) — checked only until a
   gradient has been seen, so usually at step 1 alone;
3. one step, `CHECK_AFTER` optimizer steps after the warm-up: how far the trained tensors have moved
   from where the run began, relative to their size (‖θ−θ₀‖/‖θ₀‖). Adam-type optimizers move each
   weight by about the learning rate per step whatever the gradient's scale, so this measures the rate
   the run really trains at. The loss is no use this early: its spread from step to step is 60-80 % of
   its mean (the timestep drawn), and the mean of steps 11-20 over that of steps 1-10 was 1.00-1.10 in
   healthy toy runs and 1.12-1.17 in sabotaged ones (a hypernetwork: 1.09-1.10 against 1.12).

Measured on the SD1 toy world (AdamW, batch 4, seed 0), ‖θ−θ₀‖/‖θ₀‖ at step 20:

    embedding   lr 0.05  14 (1400 %)   lr 0.005  1.4   SGD lr 0.005  0.14   lr 1e-6  7.9e-4   lr 1e-8  7.9e-6
    hypernetwork lr 5e-4  0.10         lr 1e-5   2.9e-3 (the host's default)                    lr 1e-8  3.0e-6
    lr 0, clip value 0: exactly 0; a template with "[name]s": no gradient at all

`MIN_CHANGE` = 1e-4 lies 29× under the slowest healthy run (a hypernetwork at the host's default rate)
and 13× over the fastest sabotaged one (an embedding at 1e-8); at 1e-4 per 20 steps a run would need
20,000 steps or more to move its tensors by 10 %.

The warnings do not stop the run (a user may mean it, e.g. a rate of 0 to measure a baseline); the
caller shows them in the job's status, the log and the job record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: steps whose gradients are looked at until one is seen (several: a template whose lines do not all
#: hold [name] can draw a batch without it now and then; with half its lines so and batch size 1, five
#: such steps in a row happen once in 32 runs)
GRADIENT_STEPS = 5
#: optimizer steps after the warm-up at which the tensors' movement is measured
CHECK_AFTER = 20
#: below this relative change (‖θ−θ₀‖/‖θ₀‖) after CHECK_AFTER steps a run is not learning
MIN_CHANGE = 1e-4
#: a norm limit under this many typical token norms keeps the vectors too short to learn. The SD1 toy world's
#: concept after 150 steps at lr 0.05 (share of 32 pictures): limit 0.02 0 %, 0.05 22 %, 0.1-0.5 41-44 %,
#: 1 72 %, none 97 %
MIN_NORM_LIMIT = 0.05
#: a rate of 0 over at least this share of the run is worth a warning (a cosine schedule reaches 0 only
#: at its very end)
ZERO_SHARE = 0.05


@dataclass(frozen=True)
class NoLearning:
    """One warning. `code` names what was found: "zero_rate" (a rate or clip value of 0 for the whole run),
    "zero_later" (from some step on), "no_gradient", "clipped" (a clip value of 0), "not_moving"."""

    code: str
    step: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Subject:
    """What is trained, in the words of the warnings."""

    noun: str  # "embedding" / "hypernetwork"
    tensors: str  # "the embedding's vectors" / "the hypernetwork's weights"
    rate_field: str  # the UI's name of the learning-rate field
    #: why the tensors could receive no gradient and what to check (besides clipping)
    no_gradient_hint: str


def zero_from(value_at: Callable[[int], float], start: int, total: int) -> int | None:
    """The step from which a schedule stays at exactly 0 to the end of the run, when that stretch is at
    least `ZERO_SHARE` of it; else None."""
    steps = total - start
    if steps <= 0:
        return None
    stride = max(1, steps // 20000)  # a long run is sampled (a schedule changes at round steps)
    first: int | None = None  # where the current stretch of zeros began
    for step in range(start, total, stride):
        zero = value_at(step) == 0
        first = (first if first is not None else step) if zero else None
    return first if first is not None and total - first >= max(1, ZERO_SHARE * steps) else None


def schedule_warnings(subject: Subject, start: int, total: int, rate_at: Callable[[int], float], rate_text: str,
                      clip_at: Callable[[int], float] | None = None, clip_text: str = "") -> list[NoLearning]:
    """Before the run: a learning rate of 0, or a clip value of 0 (every gradient clipped away), for the
    whole run or from some step to its end. Legal values, so warnings."""
    out = []
    for value_at, field, text, what in ((rate_at, subject.rate_field, rate_text, "learning rate"),
                                        (clip_at, "Gradient Clipping", clip_text, "gradient clip value")):
        first = zero_from(value_at, start, total) if value_at is not None else None
        if first is None:
            continue
        if first == start:
            out.append(NoLearning("zero_rate", start, (
                f"the {what} is 0 for the whole run ({field}: {text!r}): {subject.tensors} will not change. "
                f"Set it above 0 in {field}.")))
        else:
            out.append(NoLearning("zero_later", start, (
                f"the {what} is 0 from step {first} on ({field}: {text!r}): steps {first}-{total} will not "
                f"change {subject.tensors}. End the schedule above 0, or set the max steps to {first}.")))
    return out


def norm_limit_warning(subject: Subject, norm_limit: float, start: int) -> NoLearning | None:
    """Before the run: a norm limit so small that the vectors, held that short, cannot carry the concept."""
    if not 0 < norm_limit < MIN_NORM_LIMIT:
        return None
    return NoLearning("norm_limit", start, (
        f"the norm limit {norm_limit:g} holds {subject.tensors} to {norm_limit:g} × a typical token's length: "
        f"too short to carry a concept (at 0.02 the toy world's concept was not learned at all). "
        "Set the norm limit to 1-2, or 0 to disable it."))


class LearningWatch:
    """Fed by the loop: `gradients` before each optimizer step (it returns at once after the first steps),
    `after_step` after it. Each returns a warning once, when it finds one."""

    def __init__(self, subject: Subject, params: Sequence[torch.Tensor], start: int, total: int, *,
                 warmup: int = 0, check_after: int = CHECK_AFTER, min_change: float = MIN_CHANGE,
                 quiet: bool = False):
        """`quiet`: a warning that says it all was given before the run (a rate of 0 throughout)."""
        self.subject = subject
        self.params = list(params)
        self.start = start
        self.check_step = start + warmup + check_after
        if self.check_step > total:
            self.check_step = -1  # too short a run to tell a small rate from none
        self.min_change = min_change
        self.gradient_until = start + GRADIENT_STEPS
        self.seen_gradient = False
        self.warnings: list[NoLearning] = []
        if quiet:
            self.check_step, self.gradient_until = -1, start
        # the starting point, off the device (read once, at the check step)
        self.initial = [p.detach().float().cpu().clone() for p in self.params] if self.check_step > 0 else []

    def _warn(self, code: str, step: int, text: str) -> NoLearning:
        w = NoLearning(code, step, text)
        self.warnings.append(w)
        return w

    def has_gradient(self) -> bool:
        """Whether any trained tensor has a gradient other than 0 (one device sync)."""
        return any(p.grad is not None and bool(p.grad.detach().ne(0).any()) for p in self.params)

    def wants_gradients(self, step: int) -> bool:
        """Whether `gradients` should be told about optimizer step `step` (1-based): only the first steps,
        until a gradient has been seen."""
        return not self.seen_gradient and not self.warnings and step <= self.gradient_until

    def around_clip(self, step: int, clip: Callable[[], None] | None) -> NoLearning | None:
        """Clip the gradients of optimizer step `step` (1-based) with `clip` (None: no clipping) and, in the
        first steps, look at them before and after."""
        if not self.wants_gradients(step):
            if clip is not None:
                clip()
            return None
        before = self.has_gradient()
        if clip is not None:
            clip()
        return self.gradients(step, before, self.has_gradient() if clip is not None else before)

    def gradients(self, step: int, before_clip: bool, after_clip: bool) -> NoLearning | None:
        """Whether optimizer step `step` had a gradient before and after clipping."""
        if after_clip:
            self.seen_gradient = True
            return None
        s = self.subject
        if before_clip:
            return self._warn("clipped", step, (
                f"gradient clipping leaves {s.tensors} no gradient at step {step}: the clip value is 0. "
                "Set Gradient Clipping's value above 0, or disable clipping."))
        if step < self.gradient_until:
            return None
        return self._warn("no_gradient", step, (
            f"{s.tensors} received no gradient in the first {step - self.start} steps: {s.no_gradient_hint}"))

    def after_step(self, step: int, lr: float) -> NoLearning | None:
        """After optimizer step `step`: at the check step, how far the tensors have moved."""
        if step != self.check_step or self.warnings:
            return None
        num = den = 0.0
        for p, p0 in zip(self.params, self.initial):
            now = p.detach().float().cpu()
            num += float((now - p0).pow(2).sum())
            den += float(p0.pow(2).sum())
        self.initial = []
        change = math.sqrt(num) / math.sqrt(den) if den > 0 else (math.inf if num > 0 else 0.0)
        if change >= self.min_change:
            return None
        s = self.subject
        done = step - self.start
        why = ("the learning rate is 0" if lr == 0 else
               f"the learning rate ({lr:.3g} now) is too small for this optimizer" if lr < 1e-6 else
               "the optimizer's steps do not reach them (a gradient scale or clipping this small, or an "
               "optimizer whose steps scale with the gradient, like SGD, at this rate)")
        return self._warn("not_moving", step, (
            f"{s.tensors} have not moved after {done} steps ({change * 100:.2g} % of their size): {why}. "
            f"Check {s.rate_field}, Gradient Clipping and the optimizer."))
