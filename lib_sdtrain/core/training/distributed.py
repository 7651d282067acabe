"""Core: data-parallel training over torch.distributed (one process per GPU, started by `torchrun`).

Every process runs the same run with the same seed, so all of them build the same global batch
(`batch_size` rows); each trains its own `batch_size / world` consecutive rows of it, with the
timesteps and noise the single process would draw for those rows. Its loss is the mean over its
rows; averaging the trained tensors' gradients over the processes gives the gradient of the mean
over the whole batch, so every process takes the same optimizer step, and the run ends with the
tensors one process would get training the combined batch (up to float rounding). Only rank 0
writes files. With one process (`SINGLE`, the webui and a plain CLI run) every method does nothing
and the training is exactly what it was.

The CLI starts the process group (`start`, from torchrun's environment) and makes it the current one
for the run (`launched`); `run_training` asks `current()`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from lib_sdtrain.core.errors import ConfigError

__all__ = ["SINGLE", "DataParallel", "TorchrunEnv", "current", "from_environment", "launched", "start", "stop"]

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    world: int = 1
    rank: int = 0
    #: where this process' model and collective tensors live: cuda:LOCAL_RANK (NCCL) or the CPU (gloo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    # -- the batch ---------------------------------------------------------------------------------
    def check_batch(self, batch_size: int) -> None:
        """ConfigError naming batch_size unless it splits evenly over the processes."""
        if self.active and batch_size % self.world:
            raise ConfigError("batch_size", f"is the combined batch of all {self.world} processes and must be "
                              f"a multiple of {self.world}, got {batch_size}")

    def shard(self, rows: T) -> T:
        """This process' consecutive share of `rows` (a tensor's first dimension, or a list); None stays None."""
        if not self.active or rows is None:
            return rows
        n = len(rows)  # type: ignore[arg-type]
        per = n // self.world
        return rows[self.rank * per:(self.rank + 1) * per]  # type: ignore[index]

    # -- collectives -------------------------------------------------------------------------------
    def _bound(self) -> contextlib.AbstractContextManager[Any]:
        # the job runs in a worker thread, whose current CUDA device is not the one set in the main thread
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace each trained tensor's gradient by its mean over the processes (one flattened
        all-reduce). A tensor no process has a gradient for keeps none (the optimizer then skips it,
        as one process would); one that some processes lack a gradient for counts zeros there."""
        if not self.active:
            return
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params]
        present = [1.0 if p.grad is not None else 0.0 for p in params]
        with self._bound():
            flat = torch.cat([x.to(self.device, torch.float32) for x in pieces]
                             + [torch.tensor(present, device=self.device)])
            torch.distributed.all_reduce(flat)
        offset = 0
        count = flat[-len(params):].tolist() if params else []
        for p, n in zip(params, count):
            size = p.numel()
            if n > 0:
                mean = (flat[offset:offset + size] / self.world).view_as(p)
                p.grad = mean.to(p.device, p.grad.dtype if p.grad is not None else p.dtype)
            offset += size

    def _gathered(self, value: float) -> list[float]:
        """`value` of every process, in rank order (the same list everywhere)."""
        with self._bound():
            mine = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
            every = [torch.empty_like(mine) for _ in range(self.world)]
            torch.distributed.all_gather(every, mine)
        return [float(x) for x in every]

    def sum(self, value: float) -> float:
        """The sum over the processes, added in rank order: bit-identical in every process."""
        if not self.active:
            return value
        total = 0.0
        for v in self._gathered(value):
            total += v
        return total

    def mean(self, value: float) -> float:
        """The mean over the processes (bit-identical in every process: decisions on it agree)."""
        return self.sum(value) / self.world if self.active else value

    def any(self, flag: bool) -> bool:
        """True in every process when it is True in any (a stop request reaches them all at the same
        micro-batch; otherwise the others would wait forever for the one that stopped)."""
        if not self.active:
            return flag
        with self._bound():
            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def same_int(self, value: int) -> int:
        """Rank 0's `value` in every process (a seed drawn at random)."""
        if not self.active:
            return value
        with self._bound():
            t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
            torch.distributed.broadcast(t, src=0)
        return int(t.item())

    def decorrelate_rng(self) -> None:
        """Give every rank but 0 its own global torch random stream (hypernetwork dropout draws from
        it): derived from the current state, which is the same in every process (a fresh process, or
        the resume point's), and the rank. Rank 0 keeps its stream untouched."""
        if not self.active or self.rank == 0:
            return
        g = torch.Generator()
        g.set_state(torch.get_rng_state())
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)) + self.rank)


#: one process: nothing is split, averaged or exchanged
SINGLE = DataParallel()

_current: DataParallel = SINGLE


def current() -> DataParallel:
    """The data-parallel group of the run in progress (`SINGLE` unless the CLI started one)."""
    return _current


@contextlib.contextmanager
def launched(dp: DataParallel) -> Iterator[DataParallel]:
    """Make `dp` the current group while the block runs."""
    global _current
    before, _current = _current, dp
    try:
        yield dp
    finally:
        _current = before


# -- starting the group ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchrunEnv:
    world: int
    rank: int
    local_rank: int


def from_environment(environ: dict[str, str] | None = None) -> TorchrunEnv | None:
    """torchrun's WORLD_SIZE, RANK and LOCAL_RANK, when it started more than one process; else None."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1:
        return None
    rank = int(env.get("RANK", "0"))
    return TorchrunEnv(world=world, rank=rank, local_rank=int(env.get("LOCAL_RANK", str(rank))))


def start(env: TorchrunEnv) -> DataParallel:
    """Join the process group torchrun set up: NCCL with the model on cuda:LOCAL_RANK when CUDA is
    available, else gloo on the CPU."""
    dist = torch.distributed
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", rank=env.rank, world_size=env.world, device_id=device)
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=env.rank, world_size=env.world)
    return DataParallel(world=env.world, rank=env.rank, device=device)


def stop() -> None:
    """Leave the process group (at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
