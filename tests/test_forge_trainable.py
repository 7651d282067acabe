"""The Forge adapter's inference-tensor handling (hosts/forge/trainable.py), on plain torch modules
built the way Forge builds its model: under `torch.inference_mode()`. Forge itself is covered by the
host-contract suite (tests/webui, SDTRAIN_WEBUI_HOST=forge)."""

from __future__ import annotations

import pytest
import torch

from lib_sdtrain.hosts.forge.trainable import Aliases, out_of_place_residuals, usable_for_autograd


def forge_style_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.inference_mode():  # as backend/loader.py loads every component
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
        model.register_buffer("scale", torch.full((3,), 2.0))
    return model


def input_grad(model: torch.nn.Module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 12).reshape(2, 6).requires_grad_(True)
    (model(x) * model.scale).pow(2).sum().backward()
    return x.grad


def test_inference_weights_block_backprop_until_aliased_without_a_copy():
    model = forge_style_model()
    assert all(p.is_inference() and p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"[Ii]nference tensors"):
        input_grad(model)
    originals = {n: id(p) for n, p in model.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    with usable_for_autograd(model) as aliases:
        assert len(aliases.swaps) == 7  # 6 parameters + 1 buffer
        for name, p in model.named_parameters():
            assert not p.is_inference() and not p.requires_grad
            assert p.data_ptr() == pointers[name] and id(p) != originals[name]  # same storage, 0 bytes copied
        grad = input_grad(model)
    # the same gradient as a model that was never in inference mode
    plain = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
    plain.load_state_dict({k: v.clone() for k, v in model.state_dict().items() if k != "scale"})
    plain.register_buffer("scale", torch.full((3,), 2.0))
    plain.requires_grad_(False)
    assert torch.equal(grad, input_grad(plain))
    # the host's own tensor objects are back, flags included
    assert {n: id(p) for n, p in model.named_parameters()} == originals
    assert all(p.is_inference() and p.requires_grad for p in model.parameters())
    assert model.scale.is_inference()


def test_one_weight_shared_by_two_modules_gets_one_alias():
    model = forge_style_model()
    with torch.inference_mode():
        wrapper = torch.nn.Module()
        wrapper.weight = model[0].weight  # Forge's TI wrapper re-registers the embedding's weight
    aliases = Aliases()
    aliases.make_usable([model, wrapper])
    assert wrapper.weight is model[0].weight
    assert aliases.make_usable([model, wrapper]) == 0  # nothing left to swap: the per-step check is a scan
    aliases.restore()
    assert wrapper.weight.is_inference() and wrapper.weight is model[0].weight


def test_a_host_move_meanwhile_keeps_the_hosts_newer_tensor():
    model = forge_style_model()
    aliases = Aliases()
    aliases.make_usable([model])
    with torch.inference_mode():  # a host load/LoRA refresh installs new inference tensors
        model[0].weight = torch.nn.Parameter(torch.zeros(6, 6))
    newer = model[0].weight
    assert aliases.make_usable([model]) == 1  # the next step's check swaps the new one too
    aliases.restore()
    assert model[0].weight is newer


def test_in_place_residual_adds_get_a_copy_of_the_norm_input():
    class Block(torch.nn.Module):  # Forge's BasicTransformerBlock: `n = norm1(x); x += attn(n)`
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)
            self.f = torch.nn.Linear(4, 4)

        in_place = True

        def forward(self, x):
            if not self.in_place:
                x = x + self.f(self.norm1(x))
                return x + self.f(self.norm2(x))
            x += self.f(self.norm1(x))
            x += self.f(self.norm2(x))
            return x

    torch.manual_seed(0)
    unet = torch.nn.Sequential(Block(), Block())
    unet.requires_grad_(False)
    context = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        unet(context * 1.0).sum().backward()
    with out_of_place_residuals(unet, Block) as hooked:
        assert hooked == 4
        unet(context * 1.0).pow(2).sum().backward()
    hooked_grad = context.grad.clone()
    context.grad = None
    for block in unet:
        block.in_place = False  # the out-of-place reference
    unet(context * 1.0).pow(2).sum().backward()
    assert torch.equal(hooked_grad, context.grad)
    assert all(not m._forward_pre_hooks for m in unet.modules())
