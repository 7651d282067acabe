"""Core: an exponential moving average (EMA) of the trained tensors.

After every optimizer step from `start_step` on: ema = decay·ema + (1 − decay)·param. The average
begins as a copy of the tensors at `start_step` (or as the run begins, when it starts later than
that): so at step n ≥ s it is decay^(n−s)·θ_s + Σ_{k=s+1..n} (1 − decay)·decay^(n−k)·θ_k. Nothing
here draws a random number; the tensors go into the run's resume points, so a resumed run goes on
with the same average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

__all__ = ["Ema", "swapped_in"]


class Ema:
    def __init__(self, decay: float, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1 (exclusive), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.tensors: list[torch.Tensor] | None = None  # None until `start_step`

    @property
    def started(self) -> bool:
        return self.tensors is not None

    @torch.no_grad()
    def begin(self, params: Sequence[torch.Tensor], step: int) -> None:
        """The run's tensors at `step`, before its first optimizer step: the average starts here
        when its start step has been reached."""
        if self.tensors is None and step >= self.start_step:
            self.tensors = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], step: int) -> None:
        """After the optimizer step that made `step` steps done."""
        if step < self.start_step:
            return
        if self.tensors is None:
            self.tensors = [p.detach().clone() for p in params]
            return
        for ema, p in zip(self.tensors, params):
            ema.mul_(self.decay).add_(p.detach().to(ema.dtype), alpha=1.0 - self.decay)

    def state(self) -> list[torch.Tensor] | None:
        """For a resume point: copies on the CPU (None before the start step)."""
        return None if self.tensors is None else [t.detach().cpu().clone() for t in self.tensors]

    def fits(self, saved: Sequence[torch.Tensor] | None, params: Sequence[torch.Tensor]) -> bool:
        return saved is None or (
            len(saved) == len(params) and all(tuple(a.shape) == tuple(b.shape) for a, b in zip(saved, params))
        )

    def load(self, saved: Sequence[torch.Tensor] | None, params: Sequence[torch.Tensor]) -> None:
        """Put a resume point's average back (on the tensors' device and dtype)."""
        self.tensors = None if saved is None else [
            s.to(p.device, p.dtype).clone() for s, p in zip(saved, params)
        ]


@contextlib.contextmanager
def swapped_in(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor] | None) -> Iterator[None]:
    """`values` in the live tensors for the duration (a save, a preview), then their own values back,
    bit for bit. None: nothing changes."""
    if values is None:
        yield
        return
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
