"""Host(A1111): gradient checkpointing for the UNet blocks (ldm for SD1/SD2, sgm for SDXL, ldm_patched
in reForge), reversible.

The host's own `sd_hijack_checkpoint` uses reentrant `torch.utils.checkpoint`, under which a
block's output requires grad only if one of its *inputs* does. With the model weights frozen
(as sdtrain freezes them) a hypernetwork applied inside a block would then get no gradient, so we
use the non-reentrant variant, which tracks parameters used inside the block too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from lib_sdtrain.core.errors import SdtrainError


def _wrap(forward, clone_input: bool = False):
    def on_a_copy(self, x, *args, **kwargs):
        # a block that adds into its own input (Forge's BasicTransformerBlock: `x += n`) would overwrite
        # the input checkpoint saved for the recomputation: the block gets a copy, inside the checkpoint
        return forward(self, x.clone() if isinstance(x, torch.Tensor) else x, *args, **kwargs)

    def checkpointed(self, *args, **kwargs):
        return checkpoint(on_a_copy if clone_input else forward, self, *args, use_reentrant=False, **kwargs)

    checkpointed.__sdtrain_original__ = forward
    return checkpointed


#: The UNet block classes of the model code each webui runs: ldm (SD1/SD2), sgm (SDXL), ldm_patched (reForge)
PACKAGES = ("ldm", "sgm", "ldm_patched.ldm")
UNITS = (("modules.attention", "BasicTransformerBlock"), ("modules.diffusionmodules.openaimodel", "ResBlock"),
         ("modules.diffusionmodules.openaimodel", "AttentionBlock"))


def _block_classes() -> list[type]:
    import importlib

    found = []
    for package in PACKAGES:
        for module, name in UNITS:
            try:
                cls = getattr(importlib.import_module(f"{package}.{module}"), name, None)
            except ImportError:
                continue
            if cls is not None and "forward" in cls.__dict__:
                found.append(cls)
    return found


@contextlib.contextmanager
def enabled(on: bool, unet: torch.nn.Module | None = None, classes: list[type] | None = None,
            clone_input: bool = False) -> Iterator[None]:
    """Run every residual and transformer block under non-reentrant checkpointing while inside. With
    `unet`, refuse loudly when none of its blocks is of a known class (a silent no-op would only show
    as an out-of-memory error on the GPU). `classes` replaces the ldm/sgm/ldm_patched block classes
    (another host's model code); `clone_input` for blocks that modify their input in place."""
    if not on:
        yield
        return
    targets = list(classes) if classes is not None else _block_classes()
    if unet is not None and not any(isinstance(m, tuple(targets)) for m in unet.modules()):
        kinds = sorted({type(m).__module__ + "." + type(m).__name__ for m in unet.children()})
        raise SdtrainError(f"gradient checkpointing: this webui's UNet blocks are of no known class ({', '.join(kinds)})")
    saved = [(cls, cls.__dict__["forward"]) for cls in targets]
    try:
        for cls, forward in saved:
            if not hasattr(forward, "__sdtrain_original__"):
                cls.forward = _wrap(forward, clone_input)
        yield
    finally:
        for cls, forward in saved:
            cls.forward = forward


#: the block attributes that turn on the model code's own checkpointing: ldm's and sgm's ResBlock and
#: AttentionBlock (`use_checkpoint`) and BasicTransformerBlock (`checkpoint`), read at every forward
OWN_FLAGS = ("use_checkpoint", "checkpoint")


@contextlib.contextmanager
def own_checkpointing_off(unet: torch.nn.Module) -> Iterator[int]:
    """Turn off, while inside, the checkpointing the UNet was built with (yields how many blocks had it).

    ldm's `checkpoint(func, inputs, params, flag)` (ldm/modules/diffusionmodules/util.py) is a reentrant
    autograd Function whose backward differentiates the block's weights; with the weights frozen, as sdtrain
    trains, backward fails ("One of the differentiated Tensors does not require grad"). A1111 builds the UNet
    with it off since v1.10 (modules/sd_models.py, repair_config), but v1-inference.yaml asks for it
    (`use_checkpoint: True`) and A1111 v1.9 and older build what the yaml says. Reentrant checkpointing of
    other model code would silently drop a hypernetwork's gradient instead (see the module docstring).
    The flags are restored on the way out; sdtrain's own checkpointing (`enabled`) replaces them when asked."""
    saved = [(m, name) for m in unet.modules() for name in OWN_FLAGS if getattr(m, name, None) is True]
    try:
        for m, name in saved:
            setattr(m, name, False)
        yield len({id(m) for m, _ in saved})
    finally:
        for m, name in saved:
            setattr(m, name, True)
