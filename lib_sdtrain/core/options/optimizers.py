"""Core: the optimizers a training run may use, and their settings.

torch's AdamW (the host's), Adam, SGD and Adagrad are always there. Lion (lion-pytorch), Prodigy
(prodigyopt) and 8-bit AdamW (bitsandbytes) are used when their package is installed in the webui's
environment: sdtrain never installs them and imports them only when one is asked for.

The host builds its hypernetwork optimizer from `torch.optim` by class name with the learning rate
only (AdamW: weight decay 0.01) and its textual-inversion one as `AdamW(lr, weight_decay=0.0)`; the
weight-decay defaults of the training configs keep those.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lib_sdtrain.core.errors import ConfigError

#: the field every optimizer error names
FIELD = "optimizer_name"


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    module: str  # where the class is imported from
    attr: str  # the class's name there
    takes: tuple[str, ...]  # the settings it is built with, besides the learning rate
    package: str = ""  # the pip package of an optional optimizer ("": torch's own)
    #: state tensors that must have their parameter's shape; None: every state tensor that is not a
    #: scalar (torch's optimizers). Others keep some state flattened or blockwise.
    param_state: tuple[str, ...] | None = None


_SPECS = (
    OptimizerSpec("AdamW", "torch.optim", "AdamW", ("weight_decay", "betas")),
    OptimizerSpec("Adam", "torch.optim", "Adam", ("weight_decay", "betas")),
    OptimizerSpec("SGD", "torch.optim", "SGD", ("weight_decay", "momentum")),
    OptimizerSpec("Adagrad", "torch.optim", "Adagrad", ("weight_decay",)),
    OptimizerSpec("Lion", "lion_pytorch", "Lion", ("weight_decay", "betas"), "lion-pytorch"),
    # p0 and s are flat (every slice_p-th entry of the parameter)
    OptimizerSpec("Prodigy", "prodigyopt", "Prodigy", ("weight_decay", "betas"), "prodigyopt",
                  ("exp_avg", "exp_avg_sq")),
    # 8-bit moments with blockwise absmax and quantization maps beside them
    OptimizerSpec("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", ("weight_decay", "betas"), "bitsandbytes",
                  ("state1", "state2")),
)
SPECS: dict[str, OptimizerSpec] = {s.name: s for s in _SPECS}
#: the names a training config accepts, in the order the UI lists them
OPTIMIZERS: tuple[str, ...] = tuple(SPECS)


def _spec(name: str) -> OptimizerSpec:
    spec = SPECS.get(name)
    if spec is None:
        raise ConfigError(FIELD, f"{name!r} is not one of {', '.join(OPTIMIZERS)}")
    return spec


def host_builds(name: str) -> bool:
    """Whether the host's hypernetwork trainer builds `name` (its `optimizer_dict`: torch.optim's
    classes by name) and so can take its state."""
    spec = SPECS.get(name)
    return spec.module == "torch.optim" if spec else isinstance(getattr(torch.optim, name, None), type)


def missing_package_message(spec: OptimizerSpec) -> str:
    return (f"{spec.name} needs the {spec.package} package, which sdtrain does not install: run "
            f"`pip install {spec.package}` with the webui's Python (its venv), then restart the webui")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of optimizer `name`, imported now for an optional one. ConfigError (naming
    `optimizer_name`) for an unknown name or a package that is missing or fails to load."""
    spec = _spec(name)
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        top = spec.module.split(".")[0]
        if getattr(e, "name", None) in (None, top, spec.module):
            raise ConfigError(FIELD, missing_package_message(spec)) from None
        raise ConfigError(FIELD, f"{spec.package} is installed but cannot be imported: {e}") from None
    except Exception as e:  # e.g. bitsandbytes without the libraries it needs
        raise ConfigError(FIELD, f"{spec.package} is installed but cannot be imported: {e}") from None
    cls = getattr(module, spec.attr, None)
    if not isinstance(cls, type):
        raise ConfigError(FIELD, f"this {spec.package} has no {spec.attr}: `pip install -U {spec.package}`")
    return cls


def available_optimizers() -> dict[str, str | None]:
    """Every optimizer name → None when it can be used here, else why not (which package to
    install). Imports the optional packages that are installed."""
    out: dict[str, str | None] = {}
    for name in OPTIMIZERS:
        try:
            optimizer_class(name)
            out[name] = None
        except ConfigError as e:
            out[name] = e.message
    return out


def parse_betas(text: str, field: str = "betas") -> tuple[float, float] | None:
    """"0.9, 0.999" → (0.9, 0.999); empty → None (the optimizer's own)."""
    if not text.strip():
        return None
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(field, f"expected two numbers like 0.9, 0.999, got {text!r}") from None
    if len(values) != 2:
        raise ConfigError(field, f"expected two numbers like 0.9, 0.999, got {text!r}")
    if not all(0.0 <= b < 1.0 for b in values):
        raise ConfigError(field, f"each beta must be in [0, 1), got {text!r}")
    return values[0], values[1]


@dataclass(frozen=True)
class OptimizerChoice:
    """What a training config says about its optimizer."""

    name: str = "AdamW"
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only
    betas: tuple[float, float] | None = None  # None: the optimizer's default

    @property
    def spec(self) -> OptimizerSpec:
        return _spec(self.name)

    def kwargs(self) -> dict[str, Any]:
        """The settings the optimizer is built with (besides the learning rate)."""
        takes = self.spec.takes
        out: dict[str, Any] = {}
        if "weight_decay" in takes:
            out["weight_decay"] = self.weight_decay
        if "momentum" in takes:
            out["momentum"] = self.momentum
        if "betas" in takes and self.betas is not None:
            out["betas"] = self.betas
        return out

    def build(self, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        return optimizer_class(self.name)(list(params), lr=lr, **self.kwargs())

    def settings(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The values in use for the settings this optimizer takes (its defaults included), for the
        `.optim` file."""
        group = optimizer.param_groups[0]
        out: dict[str, Any] = {}
        for key in self.spec.takes:
            if key in group:
                value = group[key]
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


def saved_optimizer_name(saved: Mapping[str, Any], default: str = "AdamW") -> str:
    """The optimizer a `.optim` dict was written by (the host's files name none: AdamW)."""
    name = saved.get("optimizer_name")
    return name if isinstance(name, str) and name else default


def param_state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...] | None:
    """`param_state` of the optimizer's kind (looked up among the modules already imported)."""
    for spec in _SPECS:
        if spec.param_state is None:
            continue
        cls = getattr(sys.modules.get(spec.module), spec.attr, None)
        if isinstance(cls, type) and isinstance(optimizer, cls):
            return spec.param_state
    return None
