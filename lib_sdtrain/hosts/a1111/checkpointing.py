"""Host(A1111): gradient checkpointing for the UNet blocks (ldm for SD1/SD2, sgm for SDXL), reversible.

The host's own `sd_hijack_checkpoint` uses reentrant `torch.utils.checkpoint`, under which a
block's output requires grad only if one of its *inputs* does. With the model weights frozen
(as sdtrain freezes them) a hypernetwork applied inside a block would then get no gradient, so we
use the non-reentrant variant, which tracks parameters used inside the block too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.utils.checkpoint import checkpoint


def _wrap(forward):
    def checkpointed(self, *args, **kwargs):
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)

    checkpointed.__sdtrain_original__ = forward
    return checkpointed


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    import importlib

    targets = []
    for package in ("ldm", "sgm"):  # SD1/SD2 blocks, and SDXL's (sgm), where the webui has it
        try:
            attention = importlib.import_module(f"{package}.modules.attention")
            openaimodel = importlib.import_module(f"{package}.modules.diffusionmodules.openaimodel")
        except ImportError:
            continue
        targets += [attention.BasicTransformerBlock, openaimodel.ResBlock, openaimodel.AttentionBlock]
    saved = [(cls, cls.__dict__["forward"]) for cls in targets if "forward" in cls.__dict__]
    try:
        for cls, forward in saved:
            if not hasattr(forward, "__sdtrain_original__"):
                cls.forward = _wrap(forward)
        yield
    finally:
        for cls, forward in saved:
            cls.forward = forward
