"""Core: the optimizers a job may name (the host's `optimizer_dict`: torch.optim by class name)."""

from __future__ import annotations

import inspect

import torch

from lib_sdtrain.core.errors import ConfigError


def _optimizer_table() -> dict[str, type[torch.optim.Optimizer]]:
    # The host's `optimizer_dict`: every class in torch.optim except the base class.
    return {n: c for n, c in inspect.getmembers(torch.optim, inspect.isclass) if n != "Optimizer"}


#: Optimizers a training run can use by name. The host would also take LBFGS (its step needs a
#: closure), SparseAdam (sparse gradients only) and, on newer torch, Muon (2-D parameters only, but
#: every Linear has a bias); all three fail on a hypernetwork, so they are left out.
OPTIMIZERS: tuple[str, ...] = tuple(
    n
    for n, c in _optimizer_table().items()
    if n not in ("LBFGS", "SparseAdam", "Muon") and issubclass(c, torch.optim.Optimizer)
)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name not in OPTIMIZERS:
        raise ConfigError(
            "optimizer_name", f"{name!r} is not a torch.optim optimizer ({', '.join(OPTIMIZERS)})"
        )
    return _optimizer_table()[name]
