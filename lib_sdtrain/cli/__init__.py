"""CLI: `python -m lib_sdtrain ...` — a thin surface over the job service.

One subcommand per job kind (create-embedding, train-embedding, create-hypernetwork,
train-hypernetwork, preprocess), its flags generated from the kind's config dataclass, and `run
job.json`, which takes the body of `POST /sdtrain/v1/jobs` as it is. Every job is validated before
any model is loaded; kinds that use no model (create-hypernetwork, preprocess) never load one.

The host is handed in by the composition root (`lib_sdtrain/__main__.py`), so this package never
imports a host: `HostFactories` says how to open a checkpoint and how to build the tiny demo model.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib_sdtrain.cli.progress import MODES, PROGRESS_ENV, printer_for
from lib_sdtrain.cli.webui_folder import WebuiFolder, resolve_checkpoint, yaml_beside
from lib_sdtrain.core.errors import ConfigError, SdtrainError
from lib_sdtrain.core.jobs.service import DONE, Job, JobService
from lib_sdtrain.core.jobs.signals import stop_jobs_on_signals
from lib_sdtrain.core.port import SessionOptions, TrainingHost
from lib_sdtrain.core.preprocess.operations import check_captioners
from lib_sdtrain.core.tasks.registry import (
    MODEL_FREE_KINDS,
    job_config_types,
    job_request,
    job_runners,
    json_object,
)
from lib_sdtrain.core.training import distributed

log = logging.getLogger("lib_sdtrain.cli")


@dataclass
class HostFactories:
    #: (checkpoint, yaml or None, clip dir or None, webui folder or None) → host over a real
    #: SD1/SD2/SDXL checkpoint (SDXL's model code and default yaml come from the webui folder), on
    #: `device=` (--device, else cuda when available; under torchrun cuda:LOCAL_RANK, or the CPU)
    checkpoint: Callable[[str, str | None, str | None, str | None], TrainingHost]
    #: work dir → host over a tiny randomly initialised SD1-architecture model (no download)
    tiny: Callable[[str], TrainingHost]
    #: the demo over a trained toy world (args → exit status); None: the tiny random model's demo
    demo: Callable[[argparse.Namespace], int] | None = None


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
                metavar="LIST" if f["type"] in ("tuple", "list") else f["type"].upper(),
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


#: job kind → subcommand
COMMANDS = {kind: kind.replace("_", "-") for kind in job_config_types()}
HELP = {
    "create_embedding": "create an embedding from an initialization text (the webui's Create embedding)",
    "train_embedding": "train an embedding (the webui's Train embedding)",
    "create_hypernetwork": "create a hypernetwork (the webui's Create hypernetwork; loads no model)",
    "train_hypernetwork": "train a hypernetwork (the webui's Train hypernetwork)",
    "preprocess": "prepare a folder of images for training (the webui's Preprocess images; loads no model)",
}

#: the kinds that train data-parallel under torchrun (the others refuse to run there)
PARALLEL_KINDS = ("train_embedding", "train_hypernetwork")
TORCHRUN_HELP = ("more than one GPU: started by torchrun (torchrun --nproc_per_node N -m lib_sdtrain "
                 "train-embedding ...) it trains data-parallel, NCCL on GPUs (one per process, cuda:LOCAL_RANK) "
                 "or gloo on the CPU: batch_size is the combined batch (a multiple of N), each process takes "
                 "its share of it, gradients are averaged, rank 0 writes the files and shows the progress")

WEBUI_HELP = ("an installed webui's folder: --ckpt may name a checkpoint in its models/Stable-diffusion "
              "(subfolders searched; the .yaml of the same name beside it is used), embeddings_dir and "
              "hypernetwork_dir default to its embeddings and models/hypernetworks; SDXL's model code "
              "(its repositories/generative-models) and default configs come from there")


def _add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=MODES, default=None,
                   help=f"bar: one line redrawn in place; lines: a line per report; auto (default): the bar "
                   f"when the output is a terminal ({PROGRESS_ENV}=bar|lines sets it too)")


def _add_model_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--ckpt", required=required,
                   help="Stable Diffusion 1.x/2.x/XL checkpoint (.safetensors or .ckpt): a path, or with "
                   "--webui its name (mymodel, mymodel.safetensors, sub/mymodel)"
                   + ("" if required else "; needed by the kinds that use a model"))
    p.add_argument("--yaml", help="model config, like the webui's configs/v1-inference.yaml (default: the "
                   ".yaml beside the checkpoint, else with --webui the webui's config for its family)")
    p.add_argument("--webui", help=WEBUI_HELP)
    p.add_argument("--device", help="where the model runs: cpu, cuda, cuda:1, mps (default: cuda when available, "
                   "else cpu; under torchrun each process takes cuda:LOCAL_RANK, or the CPU)")
    p.add_argument("--clip-dir", help="local folder with the CLIP tokenizer and text-model config (no download)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lib_sdtrain",
        description="sdtrain: train textual-inversion embeddings and hypernetworks compatible with "
        "AUTOMATIC1111's webui, and prepare their images, outside the webui.",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="learn a concept in the built-in SD1 toy world and draw it before and after (no download)"
    )
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--steps", type=int, default=0, help="training steps (default: 150; 60 with --random-model)")
    d.add_argument("--random-model", action="store_true",
                   help="the earlier demo: a tiny random model and sample images (shows the mechanics only)")
    d.add_argument("--seed", type=int, default=0)
    _add_progress_flag(d)

    for kind, cls in job_config_types().items():
        s = sub.add_parser(COMMANDS[kind], help=HELP.get(kind, (cls.__doc__ or kind).splitlines()[0]),
                           epilog=TORCHRUN_HELP if kind in PARALLEL_KINDS else None)
        if kind not in MODEL_FREE_KINDS:
            _add_model_flags(s, required=True)
        elif "hypernetwork_dir" in {f["name"] for f in cls.describe()}:
            s.add_argument("--webui", help="an installed webui's folder: hypernetwork_dir defaults to its "
                           "models/hypernetworks (no model is loaded for this kind)")
        s.add_argument("--config", help="JSON file with the job's fields; flags override it")
        _add_progress_flag(s)
        _add_config_flags(s, cls)

    r = sub.add_parser("run", help="run a job file: the body of POST /sdtrain/v1/jobs, "
                       '{"kind": ..., "config": {...}} (exit 0 done, 1 failed or stopped, 2 bad input)',
                       epilog=TORCHRUN_HELP + " (training jobs)")
    r.add_argument("job", help="the job's JSON file (- reads it from standard input)")
    _add_model_flags(r, required=False)
    _add_progress_flag(r)
    return p


class _SessionWithoutModel:
    def report(self, step: int, total: int, text: str) -> None:
        log.debug("%d/%d %s", step, total, text)

    def interrupted(self) -> bool:
        return False  # a stop reaches the job through its control


class NoModelHost:
    """The host of the kinds that use no model (MODEL_FREE_KINDS): one job at a time, no captioners
    (the command line has no BLIP or deepbooru)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def gpu_session(self, label: str, options: SessionOptions) -> Iterator[_SessionWithoutModel]:
        with self._lock:
            yield _SessionWithoutModel()

    def captioners(self) -> dict[str, Any]:
        return {}


def _run(service: JobService, kind: str, config: Any, progress: str | None = None, *,
         rank: int | None = None) -> Job:
    """Run the job to its end, its progress printed; `rank` (a data-parallel process but rank 0):
    nothing printed but a failure, marked with the rank."""
    job = service.submit(kind, config)  # validates: a bad field raises before any model work
    if rank is None:
        printer_for(progress).follow(job)
    job.wait()
    if job.state != DONE and (rank is None or job.error):
        mark = f"rank {rank}: " if rank is not None else ""
        print(f"{mark}{kind} {job.state}" + (f": {job.error}" if job.error else ""), file=sys.stderr)
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
        args.progress,
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
        args.progress,
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


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from a file (- : standard input); SdtrainError naming the file if unreadable."""
    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise SdtrainError(f"cannot read {path}: {e.strerror or e}") from None
    return json_object(raw)


def _host_for(kind: str, args: argparse.Namespace, hosts: HostFactories,
              webui: WebuiFolder | None, device: Any = None) -> Callable[[], Any]:
    """The job's host, the checkpoint found and loaded now (after the job was validated); none for the
    kinds that use no model."""
    if kind in MODEL_FREE_KINDS:
        if getattr(args, "ckpt", None):
            log.info("%s uses no model: %s is not loaded", kind, args.ckpt)
        no_model = NoModelHost()
        return lambda: no_model
    if not args.ckpt:
        raise SdtrainError(f"a {kind} job needs a model: give --ckpt (a checkpoint file, or its name with --webui)")
    ckpt = resolve_checkpoint(args.ckpt, webui)
    yaml = args.yaml or yaml_beside(ckpt)
    if webui is not None and distributed.current().is_writer:
        print(f"checkpoint: {ckpt}" + (f" (config {yaml})" if yaml else ""), flush=True)
    where = {"device": device} if device is not None else {}
    host = hosts.checkpoint(str(ckpt), str(yaml) if yaml else None, args.clip_dir, args.webui, **where)
    return lambda: host


def single_device(name: str | None) -> torch.device:
    """The device a one-process run loads the model on: `name` (--device), else cuda when available."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SdtrainError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdtrainError(f"--device {name}: this torch sees no CUDA device (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SdtrainError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SdtrainError(f"--device {name}: MPS is not available here")
    return device


def run_job(kind: str, data: dict[str, Any], args: argparse.Namespace, hosts: HostFactories) -> int:
    """Validate the job (the webui folder's places under it), then load what it needs and run it:
    0 done, 1 failed or stopped; a bad field raises ConfigError before any model is loaded.
    Under torchrun (more than one process) a training runs data-parallel (core/training/distributed.py)."""
    parallel = distributed.from_environment()
    if parallel is not None and kind not in PARALLEL_KINDS:
        raise SdtrainError(f"{COMMANDS[kind]} does not run under torchrun ({parallel.world} processes): only "
                           f"{' and '.join(COMMANDS[k] for k in PARALLEL_KINDS)} do; run it as one process")
    cls = job_config_types()[kind]
    webui = WebuiFolder(args.webui) if getattr(args, "webui", None) else None
    if webui is not None:
        data = cls.merge_defaults(webui.defaults(), data)  # as the API merges the webui's folders
    config = cls.from_dict(data)  # refuse bad input before loading a model
    if kind == "preprocess":
        try:
            check_captioners(config, None, None)
        except ConfigError as e:
            raise ConfigError(e.field, f"{e.message}: the command line has no captioner (caption in a "
                              "webui, or put <image>.txt files beside the images and set "
                              "preprocess_txt_action)") from None
    if parallel is None:
        device = None if kind in MODEL_FREE_KINDS else single_device(getattr(args, "device", None))
        return _run_service(kind, config, args, _host_for(kind, args, hosts, webui, device))
    if getattr(args, "device", None):
        raise SdtrainError(f"--device {args.device}: under torchrun each process takes cuda:LOCAL_RANK (or the "
                           "CPU); leave --device out")
    distributed.DataParallel(world=parallel.world).check_batch(config.batch_size)  # before any model work
    dp = distributed.start(parallel)
    try:
        with distributed.launched(dp):
            return _run_service(kind, config, args, _host_for(kind, args, hosts, webui, dp.device), dp)
    finally:
        distributed.stop()


def _run_service(kind: str, config: Any, args: argparse.Namespace, host: Callable[[], Any],
                 dp: distributed.DataParallel = distributed.SINGLE) -> int:
    service = JobService(host, job_runners())
    stop_jobs_on_signals(service)  # kill/Ctrl-C: the run saves and keeps a resume point first
    try:
        job = _run(service, kind, config, args.progress, rank=None if dp.is_writer else dp.rank)
    finally:
        service.shutdown()
    if job.state == DONE and job.result is not None and dp.is_writer:
        print(f"done: {job.result}")
    return 0 if job.state == DONE else 1


def main(argv: list[str] | None, hosts: HostFactories) -> int:
    """Exit status: 0 done, 1 the job failed or was stopped, 2 bad input (nothing was run)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="[sdtrain] %(message)s"
    )
    try:
        if args.command == "demo":
            if distributed.from_environment() is not None:
                raise SdtrainError("demo does not run under torchrun: run it as one process")
            if hosts.demo is not None and not args.random_model:
                args.steps = args.steps or 150
                return hosts.demo(args)
            args.steps = args.steps or 60
            return demo(args, hosts)
        if args.command == "run":
            kind, data = job_request(_read_json(args.job))  # what POST /sdtrain/v1/jobs checks
            return run_job(kind, data, args, hosts)
        kind = next(k for k, name in COMMANDS.items() if name == args.command)
        cls = job_config_types()[kind]
        base = {}
        if args.config:
            try:
                base = _read_json(args.config)
            except ConfigError as e:
                raise ConfigError("--config", f"{args.config}: {e.message}") from None
        return run_job(kind, _config_from_args(cls, args, base), args, hosts)
    except SdtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
