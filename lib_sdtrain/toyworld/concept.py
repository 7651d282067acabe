"""Toy world: a concept to learn, its training pictures, and whether generated pictures show it.

A TI concept fixes some attributes (default: a large green triangle) and leaves the others free; its
training pictures vary the free ones and their captions name them ("dark background"), so the
embedding has to carry exactly the fixed ones. A hypernetwork "style" is a change to every picture
(default: everything drawn in purple), trained on pictures of every other attribute whose captions
name all but the colour.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from PIL import Image

from lib_sdtrain.toyworld.sample import generate
from lib_sdtrain.toyworld.world import ATTRIBUTES, Scene, draw, random_scene

#: What the world draws for a prompt it has no word of (a fresh embedding) is mostly small stars and
#: blobs in orange, blue or yellow (28% small orange stars, measured): the concept is far from that.
CONCEPT = {"shape": "triangle", "color": "green", "size": "large"}
STYLE_COLOR = "purple"
TEMPLATE = "[name], [filewords]\n"  # the concept's name, then the tags of what it leaves free
HN_TEMPLATE = "[filewords]\n"
#: the hypernetwork's rate in each world (batch 4, 200 steps). SDXL's modules are 2048 wide (4096 inside),
#: and Adam moves every weight by about the rate whatever its gradient, so a rate moves them further than
#: SD1's 768: at SD1's 0.0005 the SDXL world learned the style with 1 training seed of 3 (94 / 28 / 28 %
#: standalone, 6 / 75 / 53 % in A1111), at 0.0001 with every seed (docs/verification.md#toy-worlds).
HN_RATE = {"sd1": "0.0005", "sdxl": "0.0001"}
#: the module sizes for each world's cross-attention context (SDXL: CLIP-L + CLIP-G)
HN_SIZES = {"sd1": 768, "sdxl": 2048}


def _free_tags(scene: Scene, fixed: dict[str, str]) -> str:
    tags = dict(zip(ATTRIBUTES, scene.tags()))
    return ", ".join(tags[a] for a in ATTRIBUTES if a not in fixed)


def write_concept_set(folder: str | Path, fixed: dict[str, str] | None = None, *, n: int = 8, seed: int = 0,
                      free: tuple[str, ...] = ("background",)) -> Path:
    """n pictures of the concept, captioned with the free attributes named in `free` (the others are
    left unnamed); the free background alternates light/dark so both appear."""
    fixed = dict(CONCEPT if fixed is None else fixed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        extra = {"background": ("light", "dark")[i % 2]} if "background" not in fixed else {}
        scene = random_scene(rng, **fixed, **extra)
        caption = ", ".join(t for a, t in zip(ATTRIBUTES, scene.tags()) if a in free and a not in fixed)
        draw(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def write_style_set(folder: str | Path, color: str = STYLE_COLOR, *, n: int = 64, seed: int = 0) -> Path:
    """n pictures of every shape, size and background, all in `color`; captions name all but the colour."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        scene = random_scene(rng, color=color)
        draw(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(_free_tags(scene, {"color": color}) + "\n", encoding="utf-8")
    return folder


def write_template(folder: str | Path, name: str = "toyworld.txt", text: str = TEMPLATE) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


def matches(images: list[Image.Image], want: dict[str, str]) -> float:
    """Share of pictures whose read attributes include every one of `want`."""
    from lib_sdtrain.toyworld.reader import read

    hits = 0
    for im in images:
        got = read(im).attributes()
        hits += all(got[a] == v for a, v in want.items())
    return hits / max(1, len(images))


def concept_pictures(host: Any, prompt: str, n: int = 32, seed: int = 100, **kw: Any) -> list[Image.Image]:
    return generate(host, [prompt] * n, [seed + i for i in range(n)], **kw)


def style_pictures(host: Any, hn: Any, n: int = 32, seed: int = 7) -> tuple[list, list, list, list]:
    """(prompts with their scenes, pictures without the hypernetwork, at multiplier 1, at multiplier 0) for
    n captions that name no colour, one picture each with the same seeds."""
    prompts = style_prompts(n, seed)
    texts, seeds = [p for p, _ in prompts], [300 + i for i in range(n)]
    plain = generate(host, texts, seeds)
    with host.use_hypernetwork([hn.set_multiplier(1.0)]):
        styled = generate(host, texts, seeds)
    with host.use_hypernetwork([hn.set_multiplier(0.0)]):
        off = generate(host, texts, seeds)
    return prompts, plain, styled, off


def style_prompts(n: int, seed: int = 7) -> list[tuple[str, Scene]]:
    """Captions that name shape, size and background but not the colour, with their scenes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = random_scene(rng)
        out.append((s.caption((True, False, True, True)), s))
    return out


def run_job(host: Any, kind: str, config: dict[str, Any]) -> Any:
    """Run one sdtrain job (create_embedding, train_embedding, create_hypernetwork, ...) to its end on
    `host`, through the job service every surface uses; returns the job (raises if it failed)."""
    from lib_sdtrain.core.jobs.service import DONE, JobService
    from lib_sdtrain.core.tasks.registry import job_runners

    service = JobService(lambda: host, job_runners())
    try:
        job = service.submit(kind, config)
        job.wait()
    finally:
        service.shutdown()
    if job.state != DONE:
        raise RuntimeError(f"{kind} {job.state}: {job.error}")
    return job


def train_embedding(host: Any, workdir: str | Path, data: str | Path, *, name: str = "toy-concept",
                    init_text: str = "thing", vectors: int = 2, steps: int = 150, **options: Any) -> Any:
    """Create and train an embedding on `data` with the toy template; returns (Embedding, job)."""
    from lib_sdtrain.core.formats.embedding_io import load_embedding

    workdir = Path(workdir)
    emb_dir = workdir / "embeddings"
    templates = workdir / "templates"
    write_template(templates)
    run_job(host, "create_embedding", {"name": name, "num_vectors_per_token": vectors, "init_text": init_text,
                                       "embeddings_dir": str(emb_dir), "overwrite_old": True})
    config = {"embedding_name": name, "embeddings_dir": str(emb_dir), "data_root": str(data),
              "log_directory": str(workdir / "log"), "learn_rate": "0.05", "steps": steps,
              "training_width": 64, "training_height": 64, "batch_size": 4,
              "templates_dir": str(templates), "template_filename": "toyworld.txt",
              "save_embedding_every": 0, "create_image_every": 0, "seed": 0, **options}
    job = run_job(host, "train_embedding", config)
    return load_embedding(job.result.file), job


def train_hypernetwork(host: Any, workdir: str | Path, data: str | Path, *, name: str = "toy-style",
                       steps: int = 200, family: str = "sd1", sizes: tuple[int, ...] = (),
                       **options: Any) -> Any:
    """Create (seed 0) and train a hypernetwork on `data` ("[filewords]" template) at the world's rate
    (HN_RATE), with modules of `sizes` (default: the create job's); returns (Hypernetwork, job)."""
    from lib_sdtrain.core.hypernetwork.network import load_hypernetwork

    workdir = Path(workdir)
    hn_dir = workdir / "hypernetworks"
    templates = workdir / "templates"
    write_template(templates, "toyworld_hn.txt", HN_TEMPLATE)
    create = {"name": name, "hypernetwork_dir": str(hn_dir), "overwrite_old": True, "seed": 0}
    if sizes:
        create["enable_sizes"] = list(sizes)
    run_job(host, "create_hypernetwork", create)
    config = {"hypernetwork_name": name, "hypernetwork_dir": str(hn_dir), "data_root": str(data),
              "log_directory": str(workdir / "log"), "learn_rate": HN_RATE[family], "steps": steps,
              "training_width": 64, "training_height": 64, "batch_size": 4,
              "templates_dir": str(templates), "template_filename": "toyworld_hn.txt",
              "save_hypernetwork_every": 0, "create_image_every": 0, "seed": 0, **options}
    job = run_job(host, "train_hypernetwork", config)
    return load_hypernetwork(job.result.file), job
