"""Toy world: its AutoencoderKL (ldm's own class, f=8, 4 latent channels) and how it is trained.

The world's pictures are mostly flat background with one small object, so a plain pixel loss lets a
small autoencoder get the background right and the object's colour wrong (every hue turns brown).
The training loss therefore weighs the object's pixels more (the mask is known: the world draws
it), and uses L1 (sharp flat colours) plus a very small KL term, as SD's VAE was trained.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lib_sdtrain.toyworld.world import BACKGROUNDS, draw, random_scene

#: The VAE's ddconfig (ldm.modules.diffusionmodules.model.Encoder/Decoder); the yaml beside each
#: checkpoint repeats it.
VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    # 64 channels everywhere, so every GroupNorm(32) group holds two channels (with one channel a
    # group, the final norm removes each channel's per-picture mean: the background's and the
    # object's absolute colour, the two things this world is about); one ResnetBlock a level
    # (num_res_blocks 0: the Decoder's own extra block) keeps the 64x64 level affordable on a CPU
    "ch": 64,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 0,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SIDE = 64


def build_vae(seed: int = 0) -> torch.nn.Module:
    from lib_sdtrain.hosts.standalone import silence_legacy_warnings

    silence_legacy_warnings()
    import contextlib
    import io

    from ldm.models.autoencoder import AutoencoderKL

    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(seed)
        vae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    return vae


def to_tensor(images: list) -> torch.Tensor:
    """PIL pictures -> [n, 3, H, W] in [-1, 1], as the webuis feed the VAE."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1.0


def object_mask(x: torch.Tensor, backgrounds: list[str]) -> torch.Tensor:
    """[n, 1, H, W]: 1 where the picture differs from its (known) background colour."""
    bg = torch.tensor([BACKGROUNDS[b] for b in backgrounds], dtype=torch.float32) / 127.5 - 1.0
    d = (x - bg[:, :, None, None]).abs().sum(1, keepdim=True)
    return (d > 0.1).float()


def batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [random_scene(rng) for _ in range(n)]
    x = to_tensor([draw(s, SIDE) for s in scenes])
    return x, object_mask(x, [s.background for s in scenes])


def vae_loss(vae: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, kl_weight: float = 1e-6,
             object_weight: float = 4.0) -> tuple[torch.Tensor, dict[str, float]]:
    post = vae.encode(x)
    y = vae.decode(post.sample())
    w = 1.0 + object_weight * mask
    rec = ((y - x).abs() * w).sum() / (w.sum() * 3)
    kl = post.kl().mean()
    return rec + kl_weight * kl, {"rec": float(rec.detach()), "kl": float(kl.detach())}


def train_vae(vae: torch.nn.Module, *, steps: int, seed: int, batch_size: int = 12, lr: float = 2e-3,
              stop_at: int = 0, log: Callable[[str], None] = print, every: int = 100,
              on_step: Callable[[int], None] | None = None) -> torch.nn.Module:
    """Adam with a one-cycle rate planned over `steps`, stopped after `stop_at` steps (0: all)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.03)
    t0 = time.time()
    last = stop_at or steps
    for step in range(1, last + 1):
        x, mask = batch(rng, batch_size)
        loss, parts = vae_loss(vae, x, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == last:
            log(f"vae step {step}/{last} rec {parts['rec']:.4f} kl {parts['kl']:.1f} {time.time() - t0:.0f}s")
        if on_step is not None:
            on_step(step)
    return vae.eval()


def train_decoder(vae: torch.nn.Module, *, steps: int, seed: int, batch_size: int = 12, lr: float = 1e-3,
                  log: Callable[[str], None] = print, every: int = 100) -> torch.nn.Module:
    """Sharpen the decoder with the encoder frozen (the latent space, which the UNets learn, stays as it
    is): the same loss on posterior samples, the rate decaying to 0 over `steps`."""
    rng = random.Random(seed + 1)
    torch.manual_seed(seed + 1)
    for name, p in vae.named_parameters():
        p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    vae.train()
    vae.encoder.eval()
    t0 = time.time()
    for step in range(1, steps + 1):
        x, mask = batch(rng, batch_size)
        with torch.no_grad():
            post = vae.encode(x)
        y = vae.decode(post.sample())
        w = 1.0 + 4.0 * mask
        rec = ((y - x).abs() * w).sum() / (w.sum() * 3)
        opt.zero_grad()
        rec.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            log(f"decoder step {step}/{steps} rec {float(rec):.4f} {time.time() - t0:.0f}s")
    for p in vae.parameters():
        p.requires_grad_(True)
    return vae.eval()


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, images: list) -> list:
    from PIL import Image

    x = to_tensor(images)
    y = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    a = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(im) for im in a]
