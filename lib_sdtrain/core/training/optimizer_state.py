"""Core: putting a saved optimizer state back, only when it fits the tensors being trained.

torch's `Optimizer.load_state_dict` checks the number of parameter groups and parameters, not the
shapes of the state it restores: a `.optim` saved for other tensors (a file replaced by another of the
same checksum, a hand-edited or hostile file) loads silently and fails at the first step, or worse,
trains with moments of another shape broadcast in. Here every state tensor must be finite and shaped
like its parameter (or be a scalar, like Adam's step), else the state is not used and the caller
says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> str | None:
    """Load `saved` into `optimizer`; None when it was used, else why not (the optimizer is then
    left as it was)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = saved.get("state", {})
    if not isinstance(state, Mapping):
        return "its state is not a mapping"
    for index, entry in state.items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            return f"it has state for parameter {index!r}, and this run trains {len(params)}"
        if not isinstance(entry, Mapping):
            return f"the state of parameter {index} is not a mapping"
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue
            if tuple(value.shape) != tuple(params[index].shape):
                return (f"its {key!r} for parameter {index} has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(params[index].shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                return f"its {key!r} for parameter {index} holds NaN or infinite values"
    before = optimizer.state_dict()
    try:
        optimizer.load_state_dict(dict(saved))
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        optimizer.load_state_dict(before)
        return str(e)
    return None
