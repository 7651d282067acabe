"""Toy world: batched sampling through a training host's port (encode_text, predict, the VAE), and the
figures that say whether pictures show what their prompts ask for.

The sampler is Euler ancestral over the model's own DDPM schedule (the webuis' default "Euler a": the
k-diffusion form, σ = sqrt((1 − ᾱ)/ᾱ), integer timesteps spread evenly from 999 to 0), with
classifier-free guidance. The real webuis' figures come from their own txt2img (tests/webui).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from lib_sdtrain.toyworld.reader import read
from lib_sdtrain.toyworld.world import ATTRIBUTES, Scene, random_scene

#: The guidance the toy worlds are drawn with. Their small UNets overshoot shapes at the webuis'
#: usual 5-7 (circles grow lobes, triangles concave sides): shape and colour right in 42% of 64 SDXL
#: pictures at 5, 67% at 2.5, 81% at 1.75, 69% without guidance (1.0), measured when they were trained.
CFG = 2.0


@torch.no_grad()
def generate(host: Any, prompts: list[str], seeds: list[int], *, steps: int = 20, cfg: float = CFG,
             negative: str = "", side: int = 64, batch: int = 32) -> list[Image.Image]:
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        out += _generate(host, prompts[i : i + batch], seeds[i : i + batch], steps, cfg, negative, side)
    return out


def _cond(host: Any, prompts: list[str], side: int) -> Any:
    from lib_sdtrain.core.port import ImageSize

    sizes = [ImageSize.plain(side, side)] * len(prompts)
    return host.encode_text(prompts, sizes) if host.describe().family == "sdxl" else host.encode_text(prompts)


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def _generate(host: Any, prompts: list[str], seeds: list[int], steps: int, cfg: float, negative: str,
              side: int) -> list[Image.Image]:
    info = host.describe()
    f = info.latent_downscale
    n = len(prompts)
    alphas = host.noise_schedule().alphas_cumprod.double()
    ts = torch.linspace(len(alphas) - 1, 0, steps).round().long()
    sigmas = [math.sqrt((1 - float(alphas[t])) / float(alphas[t])) for t in ts] + [0.0]
    cond = _cat(_cond(host, [negative] * n, side), _cond(host, prompts, side))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn((4, side // f, side // f), generator=g) for g in gens]) * sigmas[0]
    for i, t in enumerate(ts.tolist()):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_in = x / math.sqrt(1 + s * s)
        eps_u, eps_c = host.predict(torch.cat([x_in, x_in]), torch.full((2 * n,), t), cond).chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        denoised = x - s * eps
        up = min(s_next, math.sqrt(max(0.0, s_next**2 * (s * s - s_next**2) / (s * s))))
        down = math.sqrt(max(0.0, s_next**2 - up**2))
        x = x + (x - denoised) / s * (down - s)
        if s_next > 0:
            x = x + torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]) * up
    vae = host.model.first_stage_model
    pixels = host.model.decode_first_stage(x.to(next(vae.parameters()).dtype)).float()
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


@dataclass
class Fidelity:
    n: int
    match: float  # share whose shape and colour are the prompt's
    per_attribute: dict[str, float]
    all_four: float
    confusions: list = field(default_factory=list)


def score(scenes: list[Scene], images: list[Image.Image], attributes: tuple[str, ...] = ATTRIBUTES) -> Fidelity:
    per: Counter = Counter()
    both = every = 0
    conf: Counter = Counter()
    for s, im in zip(scenes, images):
        r = read(im).attributes()
        want = s.attributes()
        hits = {a: r[a] == want[a] for a in ATTRIBUTES}
        per.update(a for a, ok in hits.items() if ok)
        both += hits["shape"] and hits["color"]
        every += all(hits[a] for a in attributes)
        conf.update((a, want[a], r[a]) for a, ok in hits.items() if not ok)
    n = len(scenes)
    return Fidelity(n, both / n, {a: per[a] / n for a in ATTRIBUTES}, every / n, conf.most_common(8))


def world_fidelity(host: Any, n: int = 64, seed: int = 0, **kw: Any) -> tuple[Fidelity, list[Image.Image], list[Scene]]:
    """Pictures of n random full captions; how many show what they say."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = generate(host, [s.caption() for s in scenes], [seed * 1000 + i for i in range(n)], **kw)
    return score(scenes, images), images, scenes


def grid(images: list[Image.Image], cols: int = 8, scale: int = 2, pad: int = 2) -> Image.Image:
    if not images:
        raise ValueError("no images for the grid")
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    out = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im.resize((w * scale, h * scale), Image.NEAREST), (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    return out
