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


class _AddsIntoItsInput(torch.nn.Module):
    """A block shaped like Forge's BasicTransformerBlock: it adds into the tensor it was given
    (`n = norm(x); x += f(n)`), which overwrites what checkpoint saved for the recomputation."""

    def __init__(self, width: int, in_place: bool = True):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.f = torch.nn.Linear(width, width)
        self.in_place = in_place

    def forward(self, x):
        n = self.f(self.norm(x))
        if self.in_place:
            x += n
            return x
        return x + n


def test_blocks_that_add_into_their_input_get_a_copy_under_checkpointing():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(_AddsIntoItsInput(8), _AddsIntoItsInput(8))
    reference = torch.nn.Sequential(_AddsIntoItsInput(8, in_place=False), _AddsIntoItsInput(8, in_place=False))
    reference.load_state_dict(blocks.state_dict())

    def grad(model, **enable):
        x0 = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with checkpointing.enabled(bool(enable), classes=[_AddsIntoItsInput], **enable):
            model(x0 * 1.0).pow(2).sum().backward()
        return x0.grad

    expected = grad(reference)
    with pytest.raises(RuntimeError, match="inplace"):  # the copy is what makes it work
        grad(blocks, clone_input=False)
    assert torch.allclose(grad(blocks, clone_input=True), expected, atol=1e-6)
    assert "forward" in _AddsIntoItsInput.__dict__ and not hasattr(_AddsIntoItsInput.forward, "__sdtrain_original__")


def test_the_unets_own_checkpointing_is_off_while_training(tiny_sd1):
    """A1111 before v1.10 builds the UNet as v1-inference.yaml says (`use_checkpoint: True`): ldm's own
    reentrant CheckpointFunction then differentiates the frozen weights, and backward fails. sdtrain turns
    those flags off while it trains and back on after; the gradient is the unflagged UNet's."""
    unet = tiny_sd1.model.diffusion_model
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    flagged = [(m, name) for m in unet.modules() for name in checkpointing.OWN_FLAGS if isinstance(getattr(m, name, None), bool)]
    before = [getattr(m, name) for m, name in flagged]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        plain = context_grad(unet)
        for m, name in flagged:  # as A1111 v1.9 builds it
            setattr(m, name, True)
        with pytest.raises(RuntimeError, match="does not require grad"):
            context_grad(unet)
        with checkpointing.own_checkpointing_off(unet) as blocks:
            assert blocks > 0 and not any(getattr(m, name) for m, name in flagged)
            assert torch.allclose(context_grad(unet), plain, atol=1e-6)
            with checkpointing.enabled(True, unet):  # sdtrain's own checkpointing in its place
                assert torch.allclose(context_grad(unet), plain, atol=1e-6)
        assert all(getattr(m, name) is True for m, name in flagged)
    finally:
        for (m, name), value in zip(flagged, before):
            setattr(m, name, value)
        for p, flag in flags:
            p.requires_grad_(flag)
