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


def regrouped(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> Mapping[str, Any]:
    """`saved` with its parameter groups laid out as `optimizer`'s when only the grouping differs (one
    group for all tensors, or one per tensor: an SDXL embedding with per-encoder learning rates): the
    same parameters in the same order, each group taking the settings of the saved first group. The
    per-parameter state is kept as it is. Anything else is returned unchanged (restore_optimizer says
    why it does not fit)."""
    groups = saved.get("param_groups")
    ours = optimizer.param_groups
    if not isinstance(groups, list) or not groups or len(groups) == len(ours):
        return saved
    if not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        return saved
    order = [i for g in groups for i in g["params"]]
    count = sum(len(g["params"]) for g in ours)
    if order != sorted(order) or len(order) != count:
        return saved
    template = {k: v for k, v in groups[0].items() if k != "params"}
    laid_out, index = [], 0
    for group in ours:
        laid_out.append({**template, "params": order[index:index + len(group["params"])]})
        index += len(group["params"])
    return {**saved, "param_groups": laid_out}
