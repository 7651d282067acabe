"""The demo (`bash tools/demo.sh`, README's first command): learn a concept in the SD1 toy world.

The world's model draws what its caption says, but no word of it names "a large green triangle". The demo
creates an embedding from a neutral word, trains it on 8 pictures of that triangle (on light and dark
backgrounds, captioned only with the background), and draws 16 pictures from the prompt "toy-concept"
before and after, with the same seeds. `before_after.png` shows the training pictures, then the
pictures before training, then after; the printed figures are the share of pictures that show the
concept (shape, colour and size read back by the toy world's reader).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image, ImageDraw

from lib_sdtrain.toyworld.sample import CFG

NAME = "toy-concept"


def _labelled(rows: list[tuple[str, list[Image.Image]]], scale: int = 2) -> Image.Image:
    from lib_sdtrain.toyworld.sample import grid

    grids = [(label, grid(images, cols=16, scale=scale)) for label, images in rows]
    label_h = 14
    width = max(g.width for _, g in grids)
    out = Image.new("RGB", (width, sum(g.height + label_h for _, g in grids)), (255, 255, 255))
    y = 0
    d = ImageDraw.Draw(out)
    for label, g in grids:
        d.text((4, y + 1), label, fill=(0, 0, 0))
        out.paste(g, (0, y + label_h))
        y += g.height + label_h
    return out


def run(args: argparse.Namespace) -> int:
    from lib_sdtrain.hosts.standalone.host import StandaloneHost
    from lib_sdtrain.toyworld import concept, models

    out = Path(args.out).resolve()
    t0 = time.time()
    files = models.assemble("sd1", out / "model")
    host = StandaloneHost.load_checkpoint(files["ckpt"], files["yaml"], files["clip"])
    print(f"sdtrain demo: the SD1 toy world ({files['ckpt'].name}, a trained model of the architecture; "
          f"assembled and loaded in {time.time() - t0:.0f}s)")
    data = concept.write_concept_set(out / "data", n=8, seed=args.seed)
    print(f"  8 pictures of a large green triangle (light and dark backgrounds) in {data}")
    want = dict(concept.CONCEPT)
    emb_dir = out / "embeddings"
    concept.write_template(out / "templates")
    concept.run_job(host, "create_embedding", {"name": NAME, "num_vectors_per_token": 2, "init_text": "thing",
                                               "embeddings_dir": str(emb_dir), "overwrite_old": True})
    from lib_sdtrain.core.formats.embedding_io import load_embedding

    initial = load_embedding(next(emb_dir.glob(f"{NAME}.*")))
    with host.use_embedding(NAME, initial.vectors):
        before = concept.concept_pictures(host, NAME, n=16, seed=1000 + args.seed)
    print(f"  before training: {concept.matches(before, want):.0%} of 16 pictures of '{NAME}' show it")
    t1 = time.time()
    from lib_sdtrain.cli.progress import printer_for
    from lib_sdtrain.core.jobs.service import DONE, JobService
    from lib_sdtrain.core.tasks.registry import job_runners

    service = JobService(lambda: host, job_runners())
    job = service.submit("train_embedding", {
        "embedding_name": NAME, "embeddings_dir": str(emb_dir), "data_root": str(data),
        "log_directory": str(out / "textual_inversion"), "learn_rate": "0.05", "steps": args.steps,
        "training_width": 64, "training_height": 64, "batch_size": 4,
        "templates_dir": str(out / "templates"), "template_filename": "toyworld.txt",
        "save_embedding_every": 50, "create_image_every": 50, "training_write_csv_every": 1,
        "preview_prompt": NAME, "preview_width": 64, "preview_height": 64, "preview_steps": 20,
        "preview_cfg_scale": CFG, "validation_every": 25, "seed": args.seed,
    })  # fmt: skip
    printer_for(args.progress).follow(job)
    job.wait()
    service.shutdown()
    if job.state != DONE:
        print(f"training {job.state}: {job.error}")
        return 1
    r = job.result
    trained = load_embedding(r.file)
    with host.use_embedding(NAME, trained.vectors):
        after = concept.concept_pictures(host, NAME, n=16, seed=1000 + args.seed)
    print(f"  trained {args.steps} steps in {time.time() - t1:.0f}s")
    print(f"  after training:  {concept.matches(after, want):.0%} of 16 pictures of '{NAME}' show it")
    training = [Image.open(p).convert("RGB") for p in sorted(data.glob("*.png"))]
    picture = _labelled([("training pictures", training), (f"'{NAME}' before training", before),
                         (f"'{NAME}' after {args.steps} steps", after)])
    grid_path = out / "before_after.png"
    picture.save(grid_path)
    print("\nsdtrain demo finished:")
    print(f"  before/after grid:        {grid_path}")
    print(f"  embedding (A1111 format): {r.embedding_file}")
    print(f"  loss CSV:                 {r.loss_csv}")
    print(f"  loss curve:               {r.loss_curve}")
    print(f"  previews:                 {', '.join(job.previews) or '(none)'}")
    if job.validation:
        print(f"  validation loss:          {job.validation[0][1]:.5f} -> {job.validation[-1][1]:.5f}")
    print(f"  total time:               {time.time() - t0:.0f}s")
    return 0
