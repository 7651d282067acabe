"""Benchmark: how well and how fast embeddings and hypernetworks learn inside a real webui — the in-tree
trainer against sdtrain (its defaults and its recommended preset), on the SD1 toy world.

Everything goes through the webui as a user would drive it: two servers of the same webui on the toy
world's checkpoint (tests/webui/conftest.py's machinery) — one keeps the host's own /sdapi training
routes (sdtrain's route takeover off, the torch-compat shim the in-tree trainer needs on current
torch), the other lets sdtrain serve them. Every arm gets the same request body (the host's fields:
pictures, template, learning rate, batch, steps), creates its file through the same route and saves it
every few steps. Then a third server — the webui *without* sdtrain — loads every saved file and draws
it with its own txt2img (Euler a, 20 steps, CFG 2, the same seeds for every arm), and the toy world's
reader checks the pictures:

- TI: the concept (search: a large green triangle; `--concept report`: a large red circle, which the
  preset search never saw) from 8 pictures, template "[name], [filewords]"; match = share of 32
  pictures of the prompt "<name>" that show all its fixed attributes; attribute errors per attribute.
- HN: "everything purple" from 64 pictures; match = share of 32 captions naming no colour (one picture
  each) drawn purple with `<hypernet:name:1>`.

`--family sdxl`: the SDXL toy world (CLIP-L + CLIP-G; A1111 loads it from its yaml with sgm, Forge from
the state dict with its shapes registered by tests/webui/forge_toyworld.py). No webui has an in-tree SDXL
embedding trainer (A1111 v1.10.1's trains SD1/SD2 only; Forge deleted its trainer), so the arms are
sdtrain's: both text encoders (`sdtrain`), `train_encoders` clip_l only and clip_g only; the request is the
SDXL toy-world test's (rate 0.05, batch 4). Run it once per host (Forge: `--arms sdtrain`, with
SDTRAIN_SGM_DIR naming a generative-models checkout for assembling the world); each host's files are
drawn by that webui without sdtrain (both load SDXL embeddings natively), and the held-out loss uses the
SDXL conditioning of a 64-pixel picture. Figures: docs/figures/quality-sdxl-<host>.json, every host's in
one plot, docs/quality-sdxl.png.

Also per saved file: the held-out loss (fixed noise and timesteps, 8 pictures never trained on, through
sdtrain's standalone host on the same checkpoint), and per run the wall and webui-process CPU seconds of
the training request. Arms alternate order from seed to seed. The in-tree trainer takes no seed: its
runs differ by the webui's RNG state; sdtrain's get seed = 0, 1, 2, ...

  eval "$(bash tools/webui.sh a1111)"
  python bench/quality.py                                  # TI and HN, 3 seeds, every arm
  python bench/quality.py --kinds ti --concept report --seeds 3 --steps 200
  python bench/quality.py --plot-only docs/figures/quality-a1111.json   # redraw the plot
  python bench/quality.py --family sdxl --steps 100 --every 25 --measure 0,25,50,100     # A1111, 3 arms
  # Forge (after eval "$(bash tools/webui.sh forge)"), SDTRAIN_SGM_DIR=<a1111>/repositories/generative-models:
  python bench/quality.py --family sdxl --arms sdtrain --steps 100 --every 25 --measure 0,25,50,100

Writes docs/figures/quality-<host>.json and its plot (concept match against steps and against seconds;
README's: docs/quality-a1111.png, docs/quality-a1111-hn.png; SDXL: docs/quality-sdxl.png).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "webui"))

CONCEPTS = {
    "search": {"shape": "triangle", "color": "green", "size": "large"},  # bench/quality_search.py's
    # squares learn slowest in this world (a small pink or a medium cyan square: under 25 % after 100
    # steps at the host's rate, batch 1, measured); a large red circle goes from 0 to ~95 % in 50-75
    "report": {"shape": "circle", "color": "red", "size": "large"},
}
#: sdtrain's own options of each arm, on top of the shared request body (the host's fields)
ARMS: dict[str, dict[str, dict]] = {
    "ti": {"in-tree": {}, "sdtrain": {}, "sdtrain-preset": {"preset": "recommended"}},
    "hn": {"in-tree": {}, "sdtrain": {}},
}
#: the SDXL toy world's arms (`--family sdxl`): sdtrain only — no webui has an in-tree SDXL trainer (A1111
#: v1.10.1's trains SD1/SD2 embeddings only; Forge deleted its trainer) —, both text encoders or one
SDXL_ARMS: dict[str, dict[str, dict]] = {
    "ti": {"sdtrain": {}, "sdtrain-preset": {"preset": "recommended"}, "sdtrain-clip_l": {"train_encoders": "clip_l"},
           "sdtrain-clip_g": {"train_encoders": "clip_g"}},
}
#: per family: its arms, and the request's rate and batch unless given (SD1: the webui's defaults; SDXL:
#: the toy-world test's request, where the standalone SDXL figures come from — at batch 1 and 0.005 an
#: SDXL step learns far less and the picture budget of this machine holds fewer steps)
FAMILIES = {"sd1": {"arms": ARMS, "lr_ti": "0.005", "batch": 1},
            "sdxl": {"arms": SDXL_ARMS, "lr_ti": "0.05", "batch": 4}}
PICTURE_SEED = 900


def request_body(kind: str, name: str, data: Path, log: Path, steps: int, every: int, batch: int, lr: str) -> dict:
    body = {"data_root": str(data), "log_directory": str(log), "steps": steps, "batch_size": batch,
            "learn_rate": lr, "gradient_step": 1, "training_width": 64, "training_height": 64, "varsize": False,
            "clip_grad_mode": "disabled", "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0,
            "latent_sampling_method": "once", "use_weight": False, "create_image_every": 0,
            "preview_from_txt2img": False, "preview_prompt": "", "preview_negative_prompt": "", "preview_steps": 4,
            "preview_sampler_name": "Euler", "preview_cfg_scale": 7.0, "preview_seed": -1, "preview_width": 64,
            "preview_height": 64, "id_task": "task(quality)"}
    if kind == "ti":
        body.update({"embedding_name": name, "template_filename": "toyworld.txt", "save_embedding_every": every,
                     "save_image_with_stored_embedding": False})
    else:
        body.update({"hypernetwork_name": name, "template_filename": "toyworld_hn.txt",
                     "save_hypernetwork_every": every})
    return body


def _create(server, kind: str, name: str, vectors: int) -> Path:
    if kind == "ti":
        status, out = server.post("/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": vectors,
                                                                 "init_text": "thing", "overwrite_old": False},
                                  timeout=1800)  # the first request loads the model (Forge: lazily)
        path = server.embeddings / f"{name}.pt"
    else:
        status, out = server.post("/sdapi/v1/create/hypernetwork", {
            "name": name, "enable_sizes": ["768"], "overwrite_old": False, "layer_structure": [1, 2, 1],
            "activation_func": "linear", "weight_init": "Normal", "add_layer_norm": False, "use_dropout": False},
            timeout=1800)
        path = server.hypernetworks / f"{name}.pt"
    assert status == 200 and path.is_file(), (status, out)
    return path


def snapshots(log: Path, name: str) -> dict[int, Path]:
    """step -> the file a run saved every N steps under its log directory (both trainers' layout:
    <log>/<date>/<name>/embeddings|hypernetworks/<name>-<step>.pt)."""
    out = {}
    for f in log.rglob(f"{name}-*.pt"):
        tail = f.stem[len(name) + 1:]
        if tail.isdigit():
            out[int(tail)] = f
    return out


def train_run(server, kind: str, arm: str, seed: int, args, data: Path, stock: bool) -> dict:
    from host_timing import cpu_seconds

    name = f"qb{kind}{arm.replace('-', '')}{seed}"
    start_file = _create(server, kind, name, args.vectors)
    start_copy = server.dir / "quality-start" / f"{name}.pt"
    start_copy.parent.mkdir(exist_ok=True)
    shutil.copy2(start_file, start_copy)
    log = server.dir / "quality-log" / name
    body = request_body(kind, name, data, log, args.steps, args.every, args.batch, args.lr[kind])
    if not stock:
        body.update({"seed": seed, **args.arms_of[kind][arm]})
    route = "/sdapi/v1/train/embedding" if kind == "ti" else "/sdapi/v1/train/hypernetwork"
    cpu = cpu_seconds(server.proc.pid)
    t0 = time.perf_counter()
    status, out = server.post(route, body, timeout=3600)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(server.proc.pid) - cpu
    assert status == 200 and "error: None" in str(out.get("info")), (arm, status, out)
    files = {0: start_copy, **snapshots(log, name)}
    print(f"[quality] {kind} {arm} seed {seed}: {args.steps} steps in {wall:.1f} s wall, {cpu:.1f} s CPU; "
          f"saved steps {sorted(files)}", flush=True)
    return {"kind": kind, "arm": arm, "seed": seed, "name": name, "wall": wall, "cpu": cpu, "files": files}


def _pictures(server, prompt: str, seed: int, n: int) -> list:
    from PIL import Image

    from lib_sdtrain.toyworld.sample import CFG

    status, res = server.post("/sdapi/v1/txt2img", {
        "prompt": prompt, "negative_prompt": "", "steps": 20, "cfg_scale": CFG, "width": 64, "height": 64,
        "sampler_name": "Euler a", "seed": seed, "batch_size": n}, timeout=1800)
    assert status == 200, res
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in res["images"][:n]]


def measure_ti(server, name: str, want: dict, n: int) -> dict:
    from lib_sdtrain.toyworld.reader import read

    got = [read(im).attributes() for im in _pictures(server, name, PICTURE_SEED, n)]
    return {"match": sum(all(g[a] == v for a, v in want.items()) for g in got) / n,
            "errors": {a: sum(g[a] != v for g in got) / n for a, v in want.items()}}


def measure_hn(server, name: str, n: int) -> dict:
    from lib_sdtrain.toyworld import concept

    pictures = [im for i, (p, _) in enumerate(concept.style_prompts(n, seed=7))
                for im in _pictures(server, f"{p} <hypernet:{name}:1>", 300 + i, 1)]
    return {"match": concept.matches(pictures, {"color": concept.STYLE_COLOR})}


class HeldOut:
    """The held-out loss of a saved file: plain MSE at fixed timesteps and noise over pictures never trained
    on, through sdtrain's standalone host on the toy checkpoint (the same for every arm)."""

    def __init__(self, ckpt_files: dict, kind: str, want: dict, work: Path):
        import random

        import torch

        from lib_sdtrain.core.port import ImageSize
        from lib_sdtrain.hosts.standalone.host import StandaloneHost
        from lib_sdtrain.toyworld import concept
        from lib_sdtrain.toyworld.vae import to_tensor
        from lib_sdtrain.toyworld.world import draw, random_scene

        self.host = StandaloneHost.load_checkpoint(ckpt_files["ckpt"], ckpt_files["yaml"], ckpt_files["clip"])
        self.kind = kind
        # SDXL: the size conditioning of a 64-pixel picture made at its own size, as the trainers give it
        self.sizes = {"sizes": [ImageSize.plain(64, 64)] * 8} if self.host.family == "sdxl" else {}
        rng = random.Random(12345)  # never the training sets' seeds
        if kind == "ti":
            scenes = [random_scene(rng, **want, background=("light", "dark")[i % 2]) for i in range(8)]
            self.prompts = [f"{{name}}, {s.background} background" for s in scenes]
        else:
            scenes = [random_scene(rng, color=concept.STYLE_COLOR) for _ in range(8)]
            self.prompts = [s.caption((True, False, True, True)) for s in scenes]
        with torch.no_grad():
            self.x0 = self.host.encode_images(to_tensor([draw(s) for s in scenes])).mean
        self.schedule = self.host.noise_schedule()
        g = torch.Generator().manual_seed(4242)
        self.t = torch.linspace(50, self.schedule.num_timesteps - 50, len(scenes)).round().long()
        self.noise = torch.randn(self.x0.shape, generator=g)

    def __call__(self, path: Path) -> float:
        import torch

        from lib_sdtrain.core.training.loop import diffusion_loss

        with torch.no_grad():
            if self.kind == "ti":
                from lib_sdtrain.core.formats.embedding_io import load_embedding

                with self.host.use_embedding("qbheldout", load_embedding(path).vectors):
                    cond = self.host.encode_text([p.format(name="qbheldout") for p in self.prompts], **self.sizes)
                    return float(diffusion_loss(self.host, self.schedule, self.x0, cond, t=self.t, noise=self.noise))
            from lib_sdtrain.core.hypernetwork.network import load_hypernetwork

            with self.host.use_hypernetwork([load_hypernetwork(path).set_multiplier(1.0)]):
                cond = self.host.encode_text(self.prompts, **self.sizes)
                return float(diffusion_loss(self.host, self.schedule, self.x0, cond, t=self.t, noise=self.noise))


def summarise(runs: list[dict], kind: str, arms: dict) -> dict:
    """Per arm: per saved step the mean, min and max over seeds of match (and held-out loss, attribute
    errors), and the seconds per step; then, for the sdtrain arms, the step and seconds at which their
    mean match first reaches the in-tree trainer's mean match at its last step."""
    out: dict = {}
    for arm in arms[kind]:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        steps = sorted(set.intersection(*(set(r["points"]) for r in mine)))
        per: dict = {}
        for s in steps:
            vals = [r["points"][s]["match"] for r in mine]
            loss = [r["points"][s]["heldout"] for r in mine]
            row = {"match": round(statistics.mean(vals), 4), "match_min": min(vals), "match_max": max(vals),
                   "heldout": round(statistics.mean(loss), 5), "heldout_min": round(min(loss), 5),
                   "heldout_max": round(max(loss), 5)}
            if kind == "ti":
                row["errors"] = {a: round(statistics.mean(r["points"][s]["errors"][a] for r in mine), 4)
                                 for a in mine[0]["points"][s]["errors"]}
            per[str(s)] = row
        total = max(steps)
        wall = [r["wall"] for r in mine]
        cpu = [r["cpu"] for r in mine]
        out[arm] = {"seeds": len(mine), "steps": per, "wall_s": round(statistics.median(wall), 2),
                    "wall_s_range": [round(min(wall), 2), round(max(wall), 2)],
                    "cpu_s": round(statistics.median(cpu), 2), "s_per_step_wall": round(statistics.median(wall) / total, 5),
                    "s_per_step_cpu": round(statistics.median(cpu) / total, 5)}
    base = out.get("in-tree")
    if base:
        last = str(max(int(s) for s in base["steps"]))
        target = base["steps"][last]["match"]
        for a in out.values():
            reached = [int(s) for s, row in a["steps"].items() if row["match"] >= target]
            first = min(reached) if reached else None
            known = first is not None
            a["reach_stock_final"] = {
                "target": target, "step": first,
                "wall_s": round(first * a["s_per_step_wall"], 2) if known else None,
                "ratio_to_stock_wall": round(first * a["s_per_step_wall"] / base["wall_s"], 3) if known else None,
                "ratio_to_stock_cpu": round(first * a["s_per_step_cpu"] / base["cpu_s"], 3) if known else None}
    return out


def plot(results: list[dict], path: Path) -> None:
    """Concept match against steps and against wall seconds, per arm (of each result: one per host, the
    arms named with their host when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib_sdtrain.toyworld import concept

    kinds = [k for k in ("ti", "hn") if any(k in r["kinds"] for r in results)]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(10, 3.6 * len(kinds)), squeeze=False)
    # one line style per host, so that equal curves of two hosts both show
    arms = [(f"{r['host'].split()[0]} {arm}" if len(results) > 1 else arm, kind, a, ("-", "--", ":")[i % 3])
            for i, r in enumerate(results) for kind in kinds
            for arm, a in r["kinds"].get(kind, {}).get("arms", {}).items()]
    for row, kind in zip(axes, kinds):
        for arm, _, a, style in (x for x in arms if x[1] == kind):
            steps = sorted(int(s) for s in a["steps"])
            mean = [a["steps"][str(s)]["match"] for s in steps]
            lo = [a["steps"][str(s)]["match_min"] for s in steps]
            hi = [a["steps"][str(s)]["match_max"] for s in steps]
            for ax, xs in ((row[0], steps), (row[1], [s * a["s_per_step_wall"] for s in steps])):
                ax.plot(xs, mean, marker="o" if style == "-" else "s", linestyle=style, label=f"{arm} ({a['seeds']} seeds)")
                ax.fill_between(xs, lo, hi, alpha=0.15)
        label = "TI: concept match" if kind == "ti" else "HN: pictures in the style"
        row[0].set(xlabel="step", ylabel=label, ylim=(-0.02, 1.02))
        row[1].set(xlabel="wall seconds (training request)", ylabel=label, ylim=(-0.02, 1.02))
        row[0].legend(loc="lower right", fontsize=8)
        # each kind's own target: the embedding's concept, the hypernetwork's style
        row[0].set_title(f"TI: {results[0]['concept_text']}" if kind == "ti"
                         else f"HN: everything {concept.STYLE_COLOR}", fontsize=9)
    hosts = ", ".join(r["host"] for r in results)
    world = "SDXL" if results[0].get("family") == "sdxl" else "SD1"
    fig.suptitle(f"{hosts}, {world} toy world; mean and range over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"sdtrain-picture": json.dumps({"bench": "bench/quality.py",
                                                                       "picture": path.name})})
    plt.close(fig)


def toy_world(conftest, root: Path, family: str, assets: dict) -> tuple[dict, dict]:
    """The family's toy-world checkpoint ({"ckpt", "yaml", "clip"}) and the servers' assets on it, with what
    the host needs to load it (tests/webui/test_toyworld.py's way): SDXL in A1111 takes sgm from the webui's
    repositories and CLIP-G's toy architecture from a test-only extension; Forge builds its models from the
    state dict, so a test-only extension registers the world's shapes with its detector
    (tests/webui/forge_toyworld.py; sgm for assembling from SDTRAIN_SGM_DIR)."""
    from lib_sdtrain.toyworld import models

    webui_dir = None
    if family == "sdxl" and (Path(conftest.WEBUI_DIR) / "repositories" / "generative-models").is_dir():
        webui_dir = conftest.WEBUI_DIR
    ckpt = models.assemble(family, root / "models-toyworld", webui_dir=webui_dir)
    shims = dict(assets["shims"])
    if conftest.HOST.name == "forge":
        from forge_toyworld import toyworld_shim_for_forge

        shims = {"sdtrain-test-toyworld": toyworld_shim_for_forge(family, ckpt, root)}
    elif family == "sdxl":
        configs = Path(ckpt["clip"]).parent / "open_clip_configs"
        shims["sdtrain-test-open-clip-arch"] = {
            "scripts/register_arch.py": conftest.OPEN_CLIP_ARCH_SCRIPT,
            **{f"open_clip_configs/{f.name}": f.read_text() for f in configs.glob("*.json")}}
    return ckpt, {**assets, "ckpt": ckpt["ckpt"], "shims": shims}


def train_all(conftest, assets: dict, tmpl: tuple, root: Path, kinds: list[str], only: set, want: dict,
              args) -> list[dict]:
    """Every arm of every kind over the seeds, alternating the order; the runs also go to root/runs.json."""
    from lib_sdtrain.toyworld import concept

    data = {"ti": concept.write_concept_set(root / "ti-data", want, n=8, seed=0),
            "hn": concept.write_style_set(root / "hn-data", n=64, seed=0)}
    runs: list[dict] = []
    servers: dict = {}
    try:
        for kind in kinds:
            arms = [a for a in args.arms_of[kind] if not only or a in only]
            for seed in range(args.seeds):
                for arm in arms if seed % 2 == 0 else arms[::-1]:
                    stock = arm == "in-tree"
                    if stock not in servers:  # started when an arm first needs it (SDXL has no in-tree arm)
                        servers[stock] = (
                            conftest.WebUI(assets, "stock", settings={**args.settings,
                                                                     "sdtrain_serve_host_training_routes": False},
                                           compat=True, extra_args=("--disable-safe-unpickle", *tmpl)) if stock
                            else conftest.WebUI(assets, "sdtrain", settings=args.settings, extra_args=tmpl))
                    runs.append(train_run(servers[stock], kind, arm, seed, args, data[kind], stock))
                    save_runs(root / "runs.json", runs)
    finally:
        for server in servers.values():
            server.stop()
    return runs


def save_runs(path: Path, runs: list[dict]) -> None:
    path.write_text(json.dumps([{**r, "files": {str(k): str(v) for k, v in r["files"].items()}} for r in runs],
                               indent=1))


def load_runs(folder: Path) -> list[dict]:
    runs = json.loads((folder / "runs.json").read_text())
    return [{**r, "files": {int(k): Path(v) for k, v in r["files"].items()}} for r in runs]


def file_label(kind: str, run: dict, step: int) -> str:
    """The name the judging webui knows a saved file by: an embedding's own name (the webuis take the name a
    file holds over its file name: the trainers write "<name>-<step>"), a hypernetwork's file name."""
    if kind == "ti":  # an SDXL .pt holds no name (the webuis' SDXL loaders take only clip_l + clip_g)
        import torch

        name = torch.load(run["files"][step], map_location="cpu", weights_only=True).get("name")
        return str(name) if name else Path(run["files"][step]).stem
    return f"{run['name']}s{step:05d}"


def tensors_digest(kind: str, path: Path) -> str:
    """SHA-256 of an embedding's vectors, not of its name or step (the start files of every arm and seed
    hold the same vectors); of a hypernetwork's whole file (it holds its name: each is drawn)."""
    import hashlib

    import torch

    from lib_sdtrain.core.formats.embedding_io import load_embedding

    if kind != "ti":
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    tensors = load_embedding(path).vectors
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def judge_all(conftest, assets: dict, tmpl: tuple, ckpt: dict, runs: list[dict], kinds: list[str], want: dict,
              args, root: Path) -> None:
    """A webui without sdtrain loads every saved file and draws it; the reader checks the pictures. It
    runs with --disable-safe-unpickle: on this torch the in-tree trainer's own files fail the webui's
    pickle check (torch.save writes zip entries its allow-list predates), sdtrain's pass it."""
    measure = {int(x) for x in args.measure.split(",") if x.strip()}
    unsafe = ("--disable-safe-unpickle",) if any(r["arm"] == "in-tree" for r in runs) else ()
    judge = conftest.WebUI(assets, "judge", sdtrain=False, settings=args.settings, extra_args=(*unsafe, *tmpl))
    try:
        seen: set[str] = set()
        for r in runs:
            r["labels"] = {}
            for step, f in r["files"].items():
                if measure and step not in measure:
                    continue
                label = file_label(r["kind"], r, step)
                assert label not in seen, f"two saved files are both called {label}"
                seen.add(label)
                shutil.copy2(f, (judge.embeddings if r["kind"] == "ti" else judge.hypernetworks) / f"{label}.pt")
                r["labels"][step] = label
        judge.stop()
        judge.start()  # reads both folders at start-up
        loaded = judge.log_text()
        assert "Unable to load" not in loaded and "Error verifying" not in loaded, loaded[-3000:]
        if "ti" in kinds:  # every embedding known to the judge (one it skipped would draw as plain words);
            # A1111 reads the folder at the first generation, or when told to
            status, out = judge.post("/sdapi/v1/refresh-embeddings", timeout=1800)
            assert status == 200, out
            status, listed = judge.get("/sdapi/v1/embeddings")
            missing = {lb for r in runs if r["kind"] == "ti" for lb in r["labels"].values()} - set(listed.get("loaded", {}))
            assert status == 200 and not missing, (status, sorted(missing)[:5], listed.get("skipped"))
        heldout = {k: HeldOut(ckpt, k, want, root) for k in kinds}
        drawn: dict = {}  # identical trained tensors draw identical pictures: each is drawn once
        for r in runs:
            r["points"] = {}
            for step, label in sorted(r["labels"].items()):
                key = (r["kind"], tensors_digest(r["kind"], r["files"][step]))
                if key not in drawn:
                    point = (measure_ti(judge, label, want, args.n) if r["kind"] == "ti"
                             else measure_hn(judge, label, args.n))
                    point["heldout"] = heldout[r["kind"]](r["files"][step])
                    drawn[key] = point
                r["points"][step] = drawn[key]
            print(f"[quality] {r['kind']} {r['arm']} seed {r['seed']}: match "
                  + " ".join(f"{s}:{p['match']:.2f}" for s, p in sorted(r["points"].items())), flush=True)
    finally:
        judge.stop()


#: README's plots (docs/), by host and kind; others go beside their JSON
PLOTS = {("a1111", "ti"): "quality-a1111.png", ("a1111", "hn"): "quality-a1111-hn.png"}
#: the SDXL world's plot: every host's docs/figures/quality-sdxl-<host>.json in one
SDXL_PLOT = "quality-sdxl.png"


def plot_sdxl(folder: Path) -> Path:
    """Draw every host's quality-sdxl-<host>.json in `folder` into one plot: README's (docs/) when the
    folder is docs/figures, else beside them."""
    folder = Path(folder).resolve()
    results = [json.loads(f.read_text()) for f in sorted(folder.glob("quality-sdxl-*.json"))]
    path = ROOT / "docs" / SDXL_PLOT if folder == ROOT / "docs" / "figures" else folder / SDXL_PLOT
    plot(results, path)
    return path


def plot_path(host: str, kinds: list[str], out_path: Path) -> Path:
    """README's plot (docs/) when the figures are README's (docs/figures), else beside the JSON."""
    name = PLOTS.get((host, kinds[0])) if len(kinds) == 1 else None
    readme = Path(out_path).resolve().parent == ROOT / "docs" / "figures"
    return ROOT / "docs" / name if name and readme else Path(out_path).with_suffix(".png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=tuple(FAMILIES), default="sd1",
                   help="toy world: sd1 (in-tree trainer vs sdtrain) or sdxl (sdtrain, both encoders or one)")
    p.add_argument("--kinds", default="", help="ti,hn (SD1's default; SDXL: ti)")
    p.add_argument("--arms", default="", help="comma-separated subset of the arms (default: all of each kind)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25, help="save (and measure) every N steps")
    p.add_argument("--measure", default="", help="the saved steps to draw (comma-separated; default: every one)")
    p.add_argument("--batch", type=int, default=0, help="batch size (SD1: the host's default, 1; SDXL: 4)")
    p.add_argument("--vectors", type=int, default=2)
    p.add_argument("--lr-ti", default="", help="embedding learning rate (SD1: the host's default, 0.005; SDXL: 0.05)")
    p.add_argument("--lr-hn", default="0.0005")
    p.add_argument("--concept", choices=tuple(CONCEPTS), default="report")
    p.add_argument("--n", type=int, default=32, help="pictures per saved file")
    p.add_argument("--out", default="", help="JSON path (default docs/figures/quality-<host>.json; SDXL: "
                   "quality-sdxl-<host>.json)")
    p.add_argument("--plot-only", default="", help="redraw the plot of this JSON and exit (SDXL: its hosts' JSONs)")
    p.add_argument("--keep", action="store_true", help="keep the folders (the trained files and runs.json)")
    p.add_argument("--judge", default="", help="draw the files of an earlier --keep folder instead of training")
    args = p.parse_args(argv)
    if args.plot_only:
        result = json.loads(Path(args.plot_only).read_text())
        if result.get("family") == "sdxl":
            plot_sdxl(Path(args.plot_only).parent)
            return 0
        kinds = list(result["kinds"])
        host = "a1111" if result["host"].startswith("AUTOMATIC1111") else result["host"]
        plot([result], plot_path(host, kinds, Path(args.plot_only)))
        return 0
    family = FAMILIES[args.family]
    args.arms_of = family["arms"]
    args.batch = args.batch or family["batch"]
    args.lr = {"ti": args.lr_ti or family["lr_ti"], "hn": args.lr_hn}
    # live previews would load SDXL's approximation model from the network (they change no picture)
    args.settings = {"live_previews_enable": False} if args.family == "sdxl" else {}
    if not os.environ.get("SDTRAIN_WEBUI_DIR"):
        print("SDTRAIN_WEBUI_DIR is not set: eval \"$(bash tools/webui.sh a1111)\" first", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    import conftest

    from lib_sdtrain.toyworld import concept

    kinds = [k.strip() for k in (args.kinds or ",".join(args.arms_of)).split(",") if k.strip()]
    unknown = [k for k in kinds if k not in args.arms_of]
    if unknown:
        print(f"no {unknown} arms in the {args.family} world", file=sys.stderr)
        return 2
    only = {a.strip() for a in args.arms.split(",") if a.strip()}
    want = CONCEPTS[args.concept]
    stem = f"quality-{conftest.HOST.name}" if args.family == "sd1" else f"quality-sdxl-{conftest.HOST.name}"
    out_path = Path(args.out or ROOT / "docs" / "figures" / f"{stem}.json")
    root = Path(tempfile.mkdtemp(prefix="sdtrain-quality-"))
    started = time.time()
    ckpt, assets = toy_world(conftest, root, args.family, conftest.build_webui_assets(root))
    templates = concept.write_template(root / "templates").parent
    concept.write_template(templates, "toyworld_hn.txt", concept.HN_TEMPLATE)
    tmpl = ("--textual-inversion-templates-dir", str(templates))
    print(f"[quality] {conftest.HOST.title}, {args.family} toy world, concept {want}, folders in {root}", flush=True)
    if args.judge:  # the runs of an earlier call (its --keep folder)
        runs = load_runs(Path(args.judge))
        kinds = sorted({r["kind"] for r in runs}, key=("ti", "hn").index)
    else:
        runs = train_all(conftest, assets, tmpl, root, kinds, only, want, args)
    judge_all(conftest, assets, tmpl, ckpt, runs, kinds, want, args, root)
    result = {"host": conftest.HOST.title, "family": args.family, "concept": want,
              "concept_text": f"{want['size']} {want['color']} {want['shape']}",
              "settings": {"steps": args.steps, "every": args.every, "batch": args.batch, "vectors": args.vectors,
                           "lr": args.lr, "n": args.n, "seeds": args.seeds, "size": 64,
                           "sampling": "Euler a, 20 steps, CFG 2", "arms": {k: args.arms_of[k] for k in kinds},
                           "judge": f"{conftest.HOST.title} without sdtrain"},
              "load_average_end": os.getloadavg(), "seconds": round(time.time() - started),
              "kinds": {k: {"arms": summarise([r for r in runs if r["kind"] == k], k, args.arms_of),
                            "runs": [{"arm": r["arm"], "seed": r["seed"], "wall": round(r["wall"], 2),
                                      "cpu": round(r["cpu"], 2),
                                      "match": {str(s): p["match"] for s, p in sorted(r["points"].items())}}
                                     for r in runs if r["kind"] == k]}
                        for k in kinds}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.family == "sdxl":  # every host's figures in one plot
        plot_sdxl(out_path.parent)
    else:
        plot([result], plot_path(conftest.HOST.name, kinds, out_path))
    if args.keep:
        print(f"[quality] kept {root} (runs.json: --judge {root})")
    else:
        shutil.rmtree(root, ignore_errors=True)
    for k in kinds:
        print(f"\n== {k}: {result['host']} ==")
        for arm, a in result["kinds"][k]["arms"].items():
            curve = " ".join(f"{s}:{row['match']:.2f}" for s, row in sorted(a["steps"].items(), key=lambda x: int(x[0])))
            reach = a.get("reach_stock_final", {})
            print(f"{arm:<16} {a['s_per_step_wall']:.4f} s/step wall  match {curve}  reach {reach}")
    print(f"[quality] wrote {out_path} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
