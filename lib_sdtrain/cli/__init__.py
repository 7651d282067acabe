"""CLI: `python -m lib_sdtrain ...` — a thin surface over the job service.

The host is handed in by the composition root (`lib_sdtrain/__main__.py`), so this package never
imports a host: `HostFactories` says how to open a checkpoint and how to build the tiny demo model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.jobs.service import DONE, Job, JobService
from lib_sdtrain.core.jobs.signals import stop_jobs_on_signals
from lib_sdtrain.core.options.config import CreateEmbeddingConfig, TrainEmbeddingConfig
from lib_sdtrain.core.port import TrainingHost
from lib_sdtrain.core.tasks.registry import job_runners

log = logging.getLogger("lib_sdtrain.cli")


@dataclass
class HostFactories:
    #: (checkpoint, yaml or None, clip dir or None, webui folder or None) → host over a real
    #: SD1/SD2/SDXL checkpoint (SDXL's model code and default yaml come from the webui folder)
    checkpoint: Callable[[str, str | None, str | None, str | None], TrainingHost]
    #: work dir → host over a tiny randomly initialised SD1-architecture model (no download)
    tiny: Callable[[str], TrainingHost]


def _add_config_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    g = p.add_argument_group(f"{cls.kind} options (A1111 names; defaults as the webui)")
    for f in cls.describe():
        if f["name"] in skip:
            continue
        flag = "--" + f["name"].replace("_", "-")
        help_text = (
            f.get("label", "")
            + (f" — {f['help']}" if f.get("help") else "")
            + f" (default: {f['default']!r})"
        )
        if f["type"] == "bool":
            g.add_argument(
                flag, dest=f["name"], action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            g.add_argument(
                flag,
                dest=f["name"],
                default=None,
                metavar=f["type"].upper(),
                help=help_text,
                choices=f.get("choices"),
            )


def _config_from_args(cls, args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    data = dict(base or {})
    for f in cls.describe():
        value = getattr(args, f["name"], None)
        if value is not None:
            data[f["name"]] = value
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lib_sdtrain",
        description="sdtrain: train textual-inversion embeddings "
        "compatible with AUTOMATIC1111's webui, outside the webui.",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="train an embedding on a tiny built-in model and sample images (no download)"
    )
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--seed", type=int, default=0)

    for name, cls in (("create-embedding", CreateEmbeddingConfig), ("train-embedding", TrainEmbeddingConfig)):
        s = sub.add_parser(name, help=f"{cls.__doc__.splitlines()[0]}")
        s.add_argument(
            "--ckpt", required=True, help="Stable Diffusion 1.x/2.x/XL checkpoint (.safetensors or .ckpt)"
        )
        s.add_argument("--yaml", help="model config, like the webui's configs/v1-inference.yaml (default: "
                       "the webui's config for the checkpoint's family, with --webui)")
        s.add_argument("--webui", help="an installed webui's folder: SDXL's model code (its repositories/"
                       "generative-models) and default configs come from there")
        s.add_argument(
            "--clip-dir", help="local folder with the CLIP tokenizer and text-model config (no download)"
        )
        s.add_argument("--config", help="JSON file with the job's fields; flags override it")
        _add_config_flags(s, cls)
    return p


def _print_progress(job: Job, every: float = 1.0) -> None:
    seen, last = 0, 0.0
    while True:
        finished = job.wait(0.2)
        for e in job.events_since(seen):  # after `finished` this drains what is left
            seen = e.seq
            if e.kind == "step" and (time.time() - last >= every or e.data["step"] == e.data["total"]):
                last = time.time()
                print(f"  {e.data.get('text', '')}", flush=True)
            elif e.kind in ("file", "preview"):
                print(f"  wrote {e.data['path']}", flush=True)
            elif e.kind == "validation":
                print(f"  validation loss at step {e.data['step']}: {e.data['loss']:.5f}", flush=True)
            elif e.kind == "log":
                print(f"  {e.data['text']}", flush=True)
        if finished:
            return


def _run(service: JobService, kind: str, config: dict[str, Any]) -> Job:
    job = service.submit(kind, config)  # validates: a bad field raises before any model work
    _print_progress(job)
    job.wait()
    if job.state != DONE:
        print(f"{kind} {job.state}" + (f": {job.error}" if job.error else ""), file=sys.stderr)
    return job


def demo(args: argparse.Namespace, hosts: HostFactories) -> int:
    from lib_sdtrain.core.data.samples import write_sample_dataset

    out = Path(args.out).resolve()
    data = write_sample_dataset(out / "data", count=8, size=64, seed=args.seed)
    print(f"sdtrain demo: tiny SD1-architecture model (random weights), sample images in {data}")
    t0 = time.time()
    host = hosts.tiny(str(out / "model"))
    print(f"  model built in {time.time() - t0:.1f}s")
    service = JobService(lambda: host, job_runners())
    emb_dir = out / "embeddings"
    name = "sdtrain-demo"
    created = _run(
        service,
        "create_embedding",
        {
            "name": name,
            "num_vectors_per_token": 2,
            "init_text": "shape",
            "embeddings_dir": str(emb_dir),
            "overwrite_old": True,
        },
    )
    if created.state != DONE:
        return 1
    job = _run(
        service,
        "train_embedding",
        {
            "embedding_name": name,
            "embeddings_dir": str(emb_dir),
            "data_root": str(data),
            "log_directory": str(out / "textual_inversion"),
            "learn_rate": "0.05:40, 0.02",
            "steps": args.steps,
            "training_width": 64,
            "training_height": 64,
            "batch_size": 2,
            "template_filename": "subject_filewords.txt",
            "save_embedding_every": 20,
            "create_image_every": 20,
            "training_write_csv_every": 1,
            "preview_width": 64,
            "preview_height": 64,
            "preview_steps": 10,
            "validation_every": 10,
            "seed": args.seed,
        },
    )
    service.shutdown()
    if job.state != DONE:
        return 1
    r = job.result
    print("\nsdtrain demo finished:")
    print(f"  embedding (A1111 format): {r.embedding_file}")
    print(f"  loss CSV:                 {r.loss_csv}")
    print(f"  loss curve:               {r.loss_curve}")
    print(f"  previews:                 {', '.join(job.previews) or '(none)'}")
    if job.validation:
        first, last = job.validation[0][1], job.validation[-1][1]
        print(f"  validation loss:          {first:.5f} -> {last:.5f}")
    return 0


def main(argv: list[str] | None, hosts: HostFactories) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="[sdtrain] %(message)s"
    )
    try:
        if args.command == "demo":
            return demo(args, hosts)
        cls = CreateEmbeddingConfig if args.command == "create-embedding" else TrainEmbeddingConfig
        base = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
        config = cls.from_dict(_config_from_args(cls, args, base))  # refuse bad input before loading a model
        host = hosts.checkpoint(args.ckpt, args.yaml, args.clip_dir, args.webui)
        service = JobService(lambda: host, job_runners())
        stop_jobs_on_signals(service)  # kill/Ctrl-C: the run saves and keeps a resume point first
        job = _run(service, cls.kind, config)
        service.shutdown()
        if job.state == DONE and job.result is not None:
            print(f"done: {job.result}")
        return 0 if job.state == DONE else 1
    except SdtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
