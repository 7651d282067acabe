"""The webui adapter's gradient checkpointing (hosts/a1111/checkpointing.py) on a real ldm UNet: the same
gradients with and without, the classes restored, and a loud refusal for a UNet of unknown blocks."""

from __future__ import annotations

import pytest
import torch

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.hosts.a1111 import checkpointing


def context_grad(unet, ctx_seed=0):
    g = torch.Generator().manual_seed(ctx_seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.context_dim if hasattr(unet, "context_dim") else 64, generator=g)
    context.requires_grad_(True)
    unet(x, torch.tensor([500]), context=context).pow(2).mean().backward()
    return context.grad


def test_same_gradients_and_restored(tiny_sd1):
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = tiny_sd1.model.diffusion_model
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    originals = (BasicTransformerBlock.forward, ResBlock.forward)
    try:
        plain = context_grad(unet)
        with checkpointing.enabled(True, unet):
            assert hasattr(BasicTransformerBlock.forward, "__sdtrain_original__")
            assert hasattr(ResBlock.forward, "__sdtrain_original__")
            checkpointed = context_grad(unet)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    assert (BasicTransformerBlock.forward, ResBlock.forward) == originals
    assert torch.allclose(plain, checkpointed, atol=1e-6) and plain.abs().sum() > 0


def test_unknown_blocks_are_refused_not_ignored():
    with pytest.raises(SdtrainError, match="no known class"), checkpointing.enabled(True, torch.nn.Sequential(
            torch.nn.Linear(2, 2))):
        pass
    with checkpointing.enabled(False, torch.nn.Sequential(torch.nn.Linear(2, 2))):
        pass  # off: nothing to check
