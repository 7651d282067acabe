"""Core: apply hypernetworks to a model that does not apply them itself (generic attach by hooks).

The host runs `apply_hypernetworks(loaded, context)` inside every attention forward, right before
`to_k`/`to_v`: the K input goes through each hypernetwork's K module for the context's width, the V
input through the V modules, one hypernetwork after another (modules/hypernetworks/hypernetwork.py,
apply_single_hypernetwork). Here the same happens in forward pre-hooks on the `to_k`/`to_v` layers
of every ldm-style attention module (found by duck typing: a module with `to_k` and `to_v`
children), which covers self-attention (context = x, widths 320/640/1280 in SD) and cross-attention
(context = text, 768/1024). Leaving the context removes every hook; the model is as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch

from lib_sdtrain.core.hypernetwork.network import Hypernetwork

__all__ = ["apply_hypernetworks", "attach_hypernetworks", "attention_modules"]

K, V = 0, 1


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules with `to_k` and `to_v` children (ldm's CrossAttention and its look-alikes)."""
    out = []
    for m in model.modules():
        children = dict(m.named_children())
        if isinstance(children.get("to_k"), torch.nn.Module) and isinstance(
            children.get("to_v"), torch.nn.Module
        ):
            out.append(m)
    return out


def apply_hypernetworks(
    hypernetworks: Sequence[Hypernetwork], context: torch.Tensor, which: int
) -> torch.Tensor:
    """`context` through the K (`which`=0) or V (1) module of each hypernetwork having one for its
    width, in order. Computed in the modules' dtype and on their device, and cast back, like the
    host's cond casts."""
    out = context
    for hn in hypernetworks:
        pair = hn.layers.get(out.shape[-1])
        if pair is None:
            continue
        module = pair[which]
        param = next(module.parameters(), None)
        x = out.to(param.device, param.dtype) if param is not None else out
        out = module(x).to(context.device, context.dtype)
    return out


def _pre_hook(
    hypernetworks: tuple[Hypernetwork, ...], which: int, _module: torch.nn.Module, args: tuple
) -> Any:
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    return (apply_hypernetworks(hypernetworks, args[0], which), *args[1:])


@contextlib.contextmanager
def attach_hypernetworks(model: torch.nn.Module, hypernetworks: Sequence[Hypernetwork]) -> Iterator[int]:
    """Apply `hypernetworks` (in order) to every attention module of `model` while inside; yields
    the number of attention modules hooked. The hypernetworks' modules must sit on the model's
    device; their train/eval mode and multiplier are read at every call."""
    hns = tuple(hypernetworks)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        if hns:
            for attn in attention_modules(model):
                handles.append(attn.to_k.register_forward_pre_hook(partial(_pre_hook, hns, K)))
                handles.append(attn.to_v.register_forward_pre_hook(partial(_pre_hook, hns, V)))
        yield len(handles) // 2
    finally:
        for h in handles:
            h.remove()
