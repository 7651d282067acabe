"""Toy world: training its models (a tool, run once per world; the results are committed in weights/).

    python -m lib_sdtrain.toyworld train vae            # the shared VAE
    python -m lib_sdtrain.toyworld train sd1            # SD1's UNet over it (the VAE must exist)
    python -m lib_sdtrain.toyworld train sdxl --webui W # SDXL's UNet (sgm from the webui W)

The UNet learns with SD's own objective through sdtrain's standalone host (the same text encoding,
VAE posterior and DDPM schedule a training run uses): ε-prediction at a uniform timestep, captions
that name a random subset of the scene's tags, the empty caption 10% of the time (so classifier-free
guidance works), Min-SNR-5 weighting, AdamW with warm-up and cosine decay, an EMA of the weights.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib_sdtrain.toyworld import models
from lib_sdtrain.toyworld.world import all_captions, draw, random_keep, random_scene

CAPTION_DROPOUT = 0.1


def _host(model: torch.nn.Module) -> Any:
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    return StandaloneHost(model, checkpoint_name="toyworld")


@torch.no_grad()
def caption_table(host: Any, family: str, side: int = 64) -> tuple[list[str], Any]:
    """Every caption of the world, encoded once (the text encoders are frozen)."""
    from lib_sdtrain.core.port import ImageSize

    caps = all_captions()
    conds = []
    for i in range(0, len(caps), 64):
        chunk = caps[i : i + 64]
        sizes = [ImageSize.plain(side, side)] * len(chunk)
        conds.append(host.encode_text(chunk, sizes if family == "sdxl" else None))
    if family == "sdxl":
        table: Any = {k: torch.cat([c[k] for c in conds]).float() for k in conds[0]}
    else:
        table = torch.cat(conds).float()
    return caps, table


@torch.no_grad()
def latent_pool(host: Any, n: int, seed: int, batch: int = 64) -> tuple[list, torch.Tensor, torch.Tensor]:
    """n scenes with the VAE posterior (mean, std; already scaled) of each picture."""
    from lib_sdtrain.toyworld.vae import to_tensor

    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    means, stds = [], []
    for i in range(0, n, batch):
        dist = host.encode_images(to_tensor([draw(s) for s in scenes[i : i + batch]]))
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return scenes, torch.cat(means), torch.cat(stds)


def _select(table: Any, idx: torch.Tensor) -> Any:
    if isinstance(table, dict):
        return {k: v[idx] for k, v in table.items()}
    return table[idx]


def train_unet(family: str, *, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 1e-3,
               pool: int = 6000, workdir: str | Path, webui_dir: str | Path | None = None,
               log: Callable[[str], None] = print, every: int = 100,
               eval_fn: Callable[[Any, int], None] | None = None, eval_every: int = 0,
               init_unet: bool = False) -> tuple[Any, dict]:
    """Train the family's UNet over the stored VAE; returns (host over the EMA model, stats).

    init_unet: continue from the stored weights/<family>-unet.safetensors (which is the EMA of the
    earlier run): both the trained UNet and its EMA start from it, and the EMA keeps its full decay
    from the first step (it already is an average, not a fresh copy to be warmed up).
    """
    from safetensors.torch import load_file

    model = models.build(family, workdir, webui_dir)
    vae = load_file(str(models.stored_file("vae.safetensors")))
    state = model.state_dict()
    models._scale_vae_into(state, vae, models.SCALE_FACTOR[family])
    model.load_state_dict(state)
    host = _host(model)
    t0 = time.time()
    caps, table = caption_table(host, family)
    index = {c: i for i, c in enumerate(caps)}
    scenes, means, stds = latent_pool(host, pool, seed)
    log(f"{family}: {len(caps)} captions and {pool} latents ready in {time.time() - t0:.0f}s "
        f"(latent std {means.std():.3f})")
    unet = model.model.diffusion_model
    if init_unet:
        stored = load_file(str(models.stored_file(f"{family}-unet.safetensors")))
        missing, unexpected = unet.load_state_dict({k: v.float() for k, v in stored.items()}, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{family}: the stored UNet does not fit the model ({missing[:3]}, {unexpected[:3]})")
        log(f"{family}: UNet and its EMA start from the stored weights")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in unet.parameters():
        p.requires_grad_(True)
    ema = copy.deepcopy(unet).eval()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item())
    )
    alphas = host.noise_schedule().alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    unet.train()
    t0, losses = time.time(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, pool, (batch_size,), generator=gen)
        chosen = []
        for i in idx.tolist():
            keep = random_keep(rng) if rng.random() >= CAPTION_DROPOUT else (False,) * 4
            chosen.append(index[scenes[i].caption(keep)])
        cond = _select(table, torch.tensor(chosen))
        x0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        t = torch.randint(0, len(alphas), (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = host.predict(x_t, t, cond)
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # Min-SNR-5 for ε-prediction
        loss = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = 0.999 if init_unet else min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pu in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pu, 1 - decay)
        losses.append(float(loss))
        if step % every == 0 or step == steps:
            recent = sum(losses[-every:]) / len(losses[-every:])
            log(f"{family} unet step {step}/{steps} loss {recent:.4f} {time.time() - t0:.0f}s")
        if eval_fn and eval_every and step % eval_every == 0 and step != steps:
            _with_weights(unet, ema, lambda s=step: eval_fn(host, s))
            unet.train()
    unet.load_state_dict(ema.state_dict())
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    stats = {"steps": steps, "batch_size": batch_size, "seconds": round(time.time() - t0),
             "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 4)}
    return host, stats


def _with_weights(unet: torch.nn.Module, ema: torch.nn.Module, fn: Callable[[], None]) -> None:
    saved = copy.deepcopy(unet.state_dict())
    unet.load_state_dict(ema.state_dict())
    unet.eval()
    try:
        with torch.no_grad():
            fn()
    finally:
        unet.load_state_dict(saved)


def save_unet(host: Any, family: str) -> Path:
    from safetensors.torch import save_file

    unet = host.model.model.diffusion_model
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    models.WEIGHTS.mkdir(parents=True, exist_ok=True)
    out = models.WEIGHTS / f"{family}-unet.safetensors"
    save_file(state, str(out))
    return out


def save_unit_vae(vae: torch.nn.Module, latent_std: float) -> Path:
    """The VAE with its posterior mean divided by `latent_std` (a unit latent space), fp16."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().clone() for k, v in vae.state_dict().items()}
    state["quant_conv.weight"][:4] /= latent_std
    state["quant_conv.bias"][:4] /= latent_std
    state["quant_conv.bias"][4:] -= 2 * torch.log(torch.tensor(latent_std))
    state["post_quant_conv.weight"] *= latent_std
    state = {k: v.to(torch.float16).contiguous() for k, v in state.items() if not k.startswith("loss")}
    models.WEIGHTS.mkdir(parents=True, exist_ok=True)
    out = models.WEIGHTS / "vae.safetensors"
    save_file(state, str(out))
    return out


def update_record(**sections: dict) -> None:
    record: dict = {}
    if models.RECORD.is_file():
        record = json.loads(models.RECORD.read_text(encoding="utf-8"))
    for name, values in sections.items():
        record.setdefault(name, {}).update(values)
    record["files"] = {p.name: models.sha256(p) for p in sorted(models.WEIGHTS.glob("*.safetensors"))}
    models.RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
