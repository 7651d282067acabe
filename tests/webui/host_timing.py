"""Per-step time of a training step inside a real webui: the in-tree trainer against sdtrain.

Shared by bench/host_step.py (the benchmark) and tests/webui/test_step_time.py (its short form, CI's
guard). Both trainers get the same request body through the host's own route
(`/sdapi/v1/train/embedding` or `/sdapi/v1/train/hypernetwork`): on a server that keeps the host's
routes (`stock_webui`: sdtrain's route takeover off, the torch-compat shim) it reaches the in-tree
trainer, on the default server sdtrain. A file is created fresh before every timed request (not
timed), and each request is timed twice, over `short` and `long` steps: the difference divided by
`long - short` is the cost of one step with everything that runs once per request (dataset, latents,
settings file, final save, the HTTP round trip) cancelled out.

The machines this runs on are shared and noisy, so the trainers alternate (A B A B ...) and only
ratios measured in the same round count: `ratio = sdtrain / in-tree` per round, then their median
and spread. Absolute seconds are printed for orientation only.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

#: the request body both trainers get (the host's fields, its UI defaults where it has one): no previews
#: and no intermediate saves, so the steps are what is timed (a save or a preview every N steps would
#: be timed alike in both, and dominate at these sizes). The save cadence is set past the run's end
#: rather than 0: the in-tree trainer only creates its log folder for a cadence, and fails writing its
#: settings file without one.
NEVER = 100_000
_COMMON = {"learn_rate": "0.005", "batch_size": 1, "gradient_step": 1, "varsize": False, "clip_grad_mode": "disabled",
           "clip_grad_value": "0.1", "shuffle_tags": False,
           "tag_drop_out": 0, "latent_sampling_method": "once", "use_weight": False, "create_image_every": 0,
           "preview_from_txt2img": False, "preview_prompt": "", "preview_negative_prompt": "", "preview_steps": 4,
           "preview_sampler_name": "Euler", "preview_cfg_scale": 7.0, "preview_seed": -1, "preview_width": 64,
           "preview_height": 64}

_counter = itertools.count()


@dataclass(frozen=True)
class Variant:
    """One option set. `attention`: the host's cross-attention optimization during training (in-tree:
    the *Use cross attention optimizations while training* setting; sdtrain: `attention_optimization`).
    `checkpointing`: sdtrain's `gradient_checkpointing` (the in-tree trainer always checkpoints the
    UNet's blocks: modules/sd_hijack_checkpoint.add() around its loop). None: each trainer's default."""

    kind: str  # "ti" | "hn"
    attention: bool | None = None
    checkpointing: bool | None = None

    @property
    def label(self) -> str:
        parts = [self.kind.upper()]
        if self.attention is not None:
            parts.append(f"attn {'on' if self.attention else 'off'}")
        if self.checkpointing is not None:
            parts.append(f"ckpt {'on' if self.checkpointing else 'off'}")
        if len(parts) == 1:
            parts.append("defaults")
        return ", ".join(parts)


@dataclass
class Comparison:
    """Per-step seconds of both trainers, one value per round: wall clock and the webui process's CPU
    time. CPU time barely moves when other work shares the cores (wall time does: on a loaded machine a
    round's wall ratio can be off by 2x); wall time also counts what CPU time cannot see (a step that
    waits: sleeps, locks, polling). The table gives both."""

    variant: Variant
    short: int
    long: int
    stock: list[float] = field(default_factory=list)  # wall seconds per step
    sdtrain: list[float] = field(default_factory=list)
    stock_cpu: list[float] = field(default_factory=list)  # CPU seconds per step
    sdtrain_cpu: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [s / i for s, i in zip(self.sdtrain, self.stock)]

    @property
    def cpu_ratios(self) -> list[float]:
        return [s / i for s, i in zip(self.sdtrain_cpu, self.stock_cpu)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.cpu_ratios)

    def spread(self, cpu: bool = False) -> tuple[float, float]:
        r = self.cpu_ratios if cpu else self.ratios
        return min(r), max(r)

    def row(self) -> str:
        lo, hi = self.spread()
        clo, chi = self.spread(cpu=True)
        return (f"{self.variant.label:<26} wall: in-tree {statistics.median(self.stock):.4f}  sdtrain "
                f"{statistics.median(self.sdtrain):.4f} s/step  ratio {self.ratio:.2f} ({lo:.2f}–{hi:.2f})  |  "
                f"CPU: in-tree {statistics.median(self.stock_cpu):.4f}  sdtrain {statistics.median(self.sdtrain_cpu):.4f}"
                f"  ratio {self.cpu_ratio:.2f} ({clo:.2f}–{chi:.2f})  n={len(self.ratios)}")


def _body(variant: Variant, name: str, data: Path, log_dir: Path, steps: int, *, stock: bool, size: int = 64) -> dict:
    body = {**_COMMON, "data_root": str(data), "log_directory": str(log_dir), "steps": steps,
            "training_width": size, "training_height": size}
    if variant.kind == "ti":
        body.update({"id_task": "task(bench)", "embedding_name": name, "save_embedding_every": NEVER,
                     "template_filename": "subject_filewords.txt", "save_image_with_stored_embedding": False})
    else:
        body.update({"id_task": "task(bench)", "hypernetwork_name": name, "learn_rate": "0.00001",
                     "save_hypernetwork_every": NEVER, "template_filename": "hypernetwork.txt"})
    if not stock:
        if variant.attention is not None:
            body["attention_optimization"] = variant.attention
        if variant.checkpointing is not None:
            body["gradient_checkpointing"] = variant.checkpointing
    return body


def _create(server, variant: Variant, name: str) -> None:
    if variant.kind == "ti":
        status, out = server.post("/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": 1,
                                                                 "overwrite_old": False, "init_text": "*"})
    else:
        status, out = server.post("/sdapi/v1/create/hypernetwork", {
            "name": name, "enable_sizes": ["768"], "overwrite_old": False,
            "layer_structure": [1, 2, 1], "activation_func": "linear", "weight_init": "Normal",
            "add_layer_norm": False, "use_dropout": False})
    assert status == 200, out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, all its threads together (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _train_seconds(server, variant: Variant, data: Path, steps: int, *, stock: bool, size: int = 64
                   ) -> tuple[float, float]:
    """Create a fresh file, then time one blocking training request of `steps` steps from step 0:
    (wall seconds, CPU seconds of the webui's process)."""
    name = f"bench{next(_counter)}{variant.kind}"
    _create(server, variant, name)
    route = "/sdapi/v1/train/embedding" if variant.kind == "ti" else "/sdapi/v1/train/hypernetwork"
    body = _body(variant, name, data, server.dir / "bench_log", steps, stock=stock, size=size)
    cpu = cpu_seconds(server.proc.pid)
    start = time.perf_counter()
    status, out = server.post(route, body, timeout=1800)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(server.proc.pid) - cpu
    assert status == 200 and "error: None" in str(out.get("info")), (status, out)
    return seconds, cpu


def set_stock_attention(stock_server, on: bool) -> None:
    status, out = stock_server.post("/sdapi/v1/options", {"training_xattention_optimizations": bool(on)})
    assert status == 200, out


def per_step(server, variant: Variant, data: Path, short: int, long: int, *, stock: bool, size: int = 64
             ) -> tuple[float, float]:
    """(wall, CPU) seconds per step: (a `long`-step request - a `short`-step one) / (long - short)."""
    a = _train_seconds(server, variant, data, short, stock=stock, size=size)
    b = _train_seconds(server, variant, data, long, stock=stock, size=size)
    return (b[0] - a[0]) / (long - short), (b[1] - a[1]) / (long - short)


def compare(stock_server, sdtrain_server, variant: Variant, data: Path, *, rounds: int = 5, short: int = 10,
            long: int = 80, warmup: bool = True, echo=None, size: int = 64) -> Comparison:
    """Alternate the two trainers for `rounds` rounds (A B, A B, ...; B A in every other round so that
    neither always runs first) and gather their per-step seconds."""
    if variant.attention is not None:  # None: as the server was started (A1111: off; reForge needs it on)
        set_stock_attention(stock_server, variant.attention)
    result = Comparison(variant, short, long)
    if warmup:  # first requests pay for imports, allocator growth, lazily built host state
        _train_seconds(stock_server, variant, data, 2, stock=True, size=size)
        _train_seconds(sdtrain_server, variant, data, 2, stock=False, size=size)
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for stock in order:
            server = stock_server if stock else sdtrain_server
            wall, cpu = per_step(server, variant, data, short, long, stock=stock, size=size)
            (result.stock if stock else result.sdtrain).append(wall)
            (result.stock_cpu if stock else result.sdtrain_cpu).append(cpu)
        if echo is not None:
            echo(f"  round {r + 1}: wall in-tree {result.stock[-1]:.4f} sdtrain {result.sdtrain[-1]:.4f} "
                 f"ratio {result.ratios[-1]:.2f} | CPU in-tree {result.stock_cpu[-1]:.4f} sdtrain "
                 f"{result.sdtrain_cpu[-1]:.4f} ratio {result.cpu_ratios[-1]:.2f} | load {os.getloadavg()[0]:.1f}")
    return result
