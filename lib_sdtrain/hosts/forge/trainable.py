"""Host(Forge): make Forge's inference-mode model usable for backprop without copying it, reversibly.

Forge builds and loads every weight under `torch.inference_mode()` (backend/loader.py, forge_loader;
backend/operations.py), so each Parameter is an *inference tensor*: outside inference mode autograd
can neither save it for backward ("Inference tensors cannot be saved for backward") nor, once a
host `Module.to()` has converted it outside inference mode, read its version counter ("Inference
tensors do not track version counter"). Cloning the model would double its memory. Instead each
such tensor is swapped for a normal tensor that *aliases the same storage* (`Tensor.set_`): zero
bytes copied, the same values, and a version counter autograd can use. Leaving the context puts the
host's own tensor objects back wherever the alias still points at their storage (a host move in
between leaves the host's newer tensor in place), with their `requires_grad` as they were.

Forge's `BasicTransformerBlock` also adds its attention outputs into the residual stream in place
(`x += n` after `n = norm1(x)` / `norm2(x)`, backend/nn/unet.py), which overwrites the LayerNorm
input autograd saved. While inside, a forward pre-hook hands `norm1`/`norm2` a clone when grad is on
(one activation copy per block; the host's own inference-mode forwards are untouched).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _unusable(t: torch.Tensor) -> bool:
    """Whether autograd cannot use `t` as it is: an inference tensor, or one converted from one."""
    if t.is_inference():
        return True
    try:
        t._version  # noqa: B018 — raises for the version-less TensorImpl an inference tensor leaves behind
    except RuntimeError:
        return True
    return False


def _alias(t: torch.Tensor) -> torch.Tensor:
    n = torch.empty(0, dtype=t.dtype, device=t.device)
    n.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return n


class Aliases:
    """The swaps made so far: (module, kind, name, host tensor, alias), to undo them in reverse."""

    def __init__(self) -> None:
        self.swaps: list[tuple[torch.nn.Module, str, str, torch.Tensor, torch.Tensor]] = []
        self._by_id: dict[int, torch.Tensor] = {}

    def make_usable(self, modules: Iterable[torch.nn.Module]) -> int:
        """Swap every unusable parameter and buffer of `modules` (and their children) for a frozen
        storage alias; returns how many were swapped now. Cheap when there is nothing to do (a scan
        of the tensors), so it runs before every step: a host load or LoRA refresh in between
        (previews) installs new inference tensors."""
        count = 0
        seen: set[int] = set()
        for root in modules:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for kind in ("_parameters", "_buffers"):
                    table = getattr(module, kind)
                    for name, t in list(table.items()):
                        if t is None or not _unusable(t):
                            continue
                        if type(t) not in (torch.Tensor, torch.nn.Parameter):
                            from lib_sdtrain.core.errors import SdtrainError

                            raise SdtrainError(f"cannot train through {type(module).__name__}.{name}: its weight is a "
                                               f"{type(t).__name__} (a quantised model?); load an fp16/bf16/fp32 checkpoint")
                        new = self._by_id.get(id(t))  # one weight shared by two modules gets one alias
                        if new is None:
                            data = _alias(t)
                            if kind == "_parameters":
                                new = torch.nn.Parameter(data, requires_grad=False)
                                new.__dict__.update(t.__dict__)  # attributes the host hangs on weights
                            else:
                                new = data
                            self._by_id[id(t)] = new
                        table[name] = new
                        self.swaps.append((module, kind, name, t, new))
                        count += 1
        return count

    def restore(self) -> None:
        """Put the host's tensors back where our alias is still in place and still shares their storage."""
        for module, kind, name, original, alias in reversed(self.swaps):
            table = getattr(module, kind)
            current = table.get(name)
            if current is alias and alias.data_ptr() == original.data_ptr():
                table[name] = original
        self.swaps.clear()
        self._by_id.clear()


@contextlib.contextmanager
def usable_for_autograd(*modules: torch.nn.Module) -> Iterator[Aliases]:
    aliases = Aliases()
    try:
        aliases.make_usable(modules)
        yield aliases
    finally:
        aliases.restore()


def _clone_when_training(_module: torch.nn.Module, args: tuple):
    if args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled() and args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


@contextlib.contextmanager
def out_of_place_residuals(unet: torch.nn.Module, block_class: type) -> Iterator[int]:
    """Pre-hooks on `norm1`/`norm2` of every `block_class` in `unet`; yields how many blocks."""
    handles = []
    try:
        for module in unet.modules():
            if isinstance(module, block_class):
                for norm in ("norm1", "norm2"):
                    child = getattr(module, norm, None)
                    if isinstance(child, torch.nn.Module):
                        handles.append(child.register_forward_pre_hook(_clone_when_training))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def transformer_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's transformer blocks, by what they hold (self-attention `attn1` after a `norm1`), in
    whichever model code the webui runs (ldm, sgm, ldm_patched, Forge's backend)."""
    return [m for m in unet.modules() if isinstance(getattr(m, "attn1", None), torch.nn.Module)
            and isinstance(getattr(m, "norm1", None), torch.nn.Module)]


def residual_in_place(block: torch.nn.Module) -> bool | None:
    """Whether `block` adds into its residual stream in place, in a way autograd refuses: one forward and
    backward on a small random input (4 tokens, 2 context tokens; the block's weights are not touched and
    get no gradient). None when the block could not be run this way (an unknown signature): no verdict."""
    norm = block.norm1
    width = int(getattr(norm, "normalized_shape", (0,))[0])
    weight = next((p for p in block.parameters() if p.is_floating_point()), None)
    if not width or weight is None:
        return None
    # the probe's own generator: the global RNG stream (a seeded training run's) is not moved
    rng = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=rng).to(device=weight.device, dtype=weight.dtype)

    kw = {}
    to_k = getattr(getattr(block, "attn2", None), "to_k", None)
    if isinstance(getattr(to_k, "in_features", None), int):
        kw["context"] = rand(1, 2, to_k.in_features)
    flags = [(p, p.requires_grad) for p in block.parameters()]
    leaf = rand(1, 4, width).requires_grad_(True)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            x = leaf * 1.0  # not a leaf, as a block's input in a UNet is (a leaf refuses any in-place op)
            out = block(x, **kw)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
        return False
    except RuntimeError as e:
        if "inplace operation" in str(e):
            return True
        return None
    except TypeError:
        return None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
