"""Core: putting a saved optimizer state back, only when it fits the tensors being trained.

torch's `Optimizer.load_state_dict` checks the number of parameter groups and parameters, not the
shapes of the state it restores: a `.optim` saved for other tensors (a file replaced by another of the
same checksum, a hand-edited or hostile file) loads silently and fails at the first step, or worse,
trains with moments of another shape broadcast in. Here every state tensor must be finite and shaped
like its parameter (or be a scalar, like Adam's step), else the state is not used and the caller
says why. (Prodigy and 8-bit AdamW keep some state flattened or blockwise: only their moments are
held to the parameter's shape.)

`load_state_dict` also puts back the saved hyperparameters of each group; the settings the run was
configured with (`keep`: weight decay, momentum, betas) are set again afterwards, so a changed
setting applies to a continued run. State kept in the groups (Prodigy's step-size estimate) stays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lib_sdtrain.core.options.optimizers import param_state_keys


def restore_optimizer(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], keep: Iterable[str] = ()
) -> str | None:
    """Load `saved` into `optimizer`; None when it was used, else why not (the optimizer is then
    left as it was). The group settings named in `keep` keep their current values."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shaped = param_state_keys(optimizer)
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
            if (shaped is None or key in shaped) and tuple(value.shape) != tuple(params[index].shape):
                return (f"its {key!r} for parameter {index} has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(params[index].shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                return f"its {key!r} for parameter {index} holds NaN or infinite values"
    before = optimizer.state_dict()
    configured = [{k: g[k] for k in keep if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(dict(saved))
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        optimizer.load_state_dict(before)
        return str(e)
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    return None
