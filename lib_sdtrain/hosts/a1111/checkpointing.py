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
