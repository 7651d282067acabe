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

Also per saved file: the held-out loss (fixed noise and timesteps, 8 pictures never trained on, through
sdtrain's standalone host on the same checkpoint), and per run the wall and webui-process CPU seconds of
the training request. Arms alternate order from seed to seed. The in-tree trainer takes no seed: its
runs differ by the webui's RNG state; sdtrain's get seed = 0, 1, 2, ...

  eval "$(bash tools/webui.sh a1111)"
  python bench/quality.py                                  # TI and HN, 3 seeds, every arm
  python bench/quality.py --kinds ti --concept report --seeds 3 --steps 200
  python bench/quality.py --plot-only docs/figures/quality-a1111.json   # redraw the plot

Writes docs/figures/quality-<host>.json and its plot (concept match against steps and against seconds;
README's: docs/quality-a1111.png, docs/quality-a1111-hn.png).
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
                                                                 "init_text": "thing", "overwrite_old": False})
        path = server.embeddings / f"{name}.pt"
    else:
        status, out = server.post("/sdapi/v1/create/hypernetwork", {
            "name": name, "enable_sizes": ["768"], "overwrite_old": False, "layer_structure": [1, 2, 1],
            "activation_func": "linear", "weight_init": "Normal", "add_layer_norm": False, "use_dropout": False})
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
        body.update({"seed": seed, **ARMS[kind][arm]})
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

        from lib_sdtrain.hosts.standalone.host import StandaloneHost
        from lib_sdtrain.toyworld import concept
        from lib_sdtrain.toyworld.vae import to_tensor
        from lib_sdtrain.toyworld.world import draw, random_scene

        self.host = StandaloneHost.load_checkpoint(ckpt_files["ckpt"], ckpt_files["yaml"], ckpt_files["clip"])
        self.kind = kind
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
                    cond = self.host.encode_text([p.format(name="qbheldout") for p in self.prompts])
                    return float(diffusion_loss(self.host, self.schedule, self.x0, cond, t=self.t, noise=self.noise))
            from lib_sdtrain.core.hypernetwork.network import load_hypernetwork

            with self.host.use_hypernetwork([load_hypernetwork(path).set_multiplier(1.0)]):
                cond = self.host.encode_text(self.prompts)
                return float(diffusion_loss(self.host, self.schedule, self.x0, cond, t=self.t, noise=self.noise))


def summarise(runs: list[dict], kind: str) -> dict:
    """Per arm: per saved step the mean, min and max over seeds of match (and held-out loss, attribute
    errors), and the seconds per step; then, for the sdtrain arms, the step and seconds at which their
    mean match first reaches the in-tree trainer's mean match at its last step."""
    out: dict = {}
    for arm in ARMS[kind]:
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


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("ti", "hn") if k in result["kinds"]]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(10, 3.6 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        for arm, a in result["kinds"][kind]["arms"].items():
            steps = sorted(int(s) for s in a["steps"])
            mean = [a["steps"][str(s)]["match"] for s in steps]
            lo = [a["steps"][str(s)]["match_min"] for s in steps]
            hi = [a["steps"][str(s)]["match_max"] for s in steps]
            for ax, xs in ((row[0], steps), (row[1], [s * a["s_per_step_wall"] for s in steps])):
                ax.plot(xs, mean, marker="o", label=f"{arm} ({a['seeds']} seeds)")
                ax.fill_between(xs, lo, hi, alpha=0.15)
        label = "TI: concept match" if kind == "ti" else "HN: pictures in the style"
        row[0].set(xlabel="step", ylabel=label, ylim=(-0.02, 1.02))
        row[1].set(xlabel="wall seconds (training request)", ylabel=label, ylim=(-0.02, 1.02))
        row[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{result['host']}, SD1 toy world: {result['concept_text']}; mean and range over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"sdtrain-picture": json.dumps({"bench": "bench/quality.py",
                                                                       "picture": path.name})})
    plt.close(fig)


def train_all(conftest, assets: dict, tmpl: tuple, root: Path, kinds: list[str], only: set, want: dict,
              args) -> list[dict]:
    """Every arm of every kind over the seeds, alternating the order; the runs also go to root/runs.json."""
    from lib_sdtrain.toyworld import concept

    data = {"ti": concept.write_concept_set(root / "ti-data", want, n=8, seed=0),
            "hn": concept.write_style_set(root / "hn-data", n=64, seed=0)}
    runs: list[dict] = []
    servers = []
    try:
        stock = conftest.WebUI(assets, "stock", settings={"sdtrain_serve_host_training_routes": False}, compat=True,
                               extra_args=("--disable-safe-unpickle", *tmpl))
        servers.append(stock)
        sdtrain = conftest.WebUI(assets, "sdtrain", extra_args=tmpl)
        servers.append(sdtrain)
        for kind in kinds:
            arms = [a for a in ARMS[kind] if not only or a in only]
            for seed in range(args.seeds):
                for arm in arms if seed % 2 == 0 else arms[::-1]:
                    server = stock if arm == "in-tree" else sdtrain
                    runs.append(train_run(server, kind, arm, seed, args, data[kind], arm == "in-tree"))
                    save_runs(root / "runs.json", runs)
    finally:
        for s in servers:
            s.stop()
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
    if kind == "ti":
        import torch

        return str(torch.load(run["files"][step], map_location="cpu", weights_only=True).get("name"))
    return f"{run['name']}s{step:05d}"


def judge_all(conftest, assets: dict, tmpl: tuple, ckpt: dict, runs: list[dict], kinds: list[str], want: dict,
              args, root: Path) -> None:
    """A webui without sdtrain loads every saved file and draws it; the reader checks the pictures. It
    runs with --disable-safe-unpickle: on this torch the in-tree trainer's own files fail the webui's
    pickle check (torch.save writes zip entries its allow-list predates), sdtrain's pass it."""
    measure = {int(x) for x in args.measure.split(",") if x.strip()}
    judge = conftest.WebUI(assets, "judge", sdtrain=False, extra_args=("--disable-safe-unpickle", *tmpl))
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
        heldout = {k: HeldOut(ckpt, k, want, root) for k in kinds}
        for r in runs:
            r["points"] = {}
            for step, label in sorted(r["labels"].items()):
                point = measure_ti(judge, label, want, args.n) if r["kind"] == "ti" else measure_hn(judge, label, args.n)
                point["heldout"] = heldout[r["kind"]](r["files"][step])
                r["points"][step] = point
            print(f"[quality] {r['kind']} {r['arm']} seed {r['seed']}: match "
                  + " ".join(f"{s}:{p['match']:.2f}" for s, p in sorted(r["points"].items())), flush=True)
    finally:
        judge.stop()


#: README's plots (docs/), by host and kind; others go beside their JSON
PLOTS = {("a1111", "ti"): "quality-a1111.png", ("a1111", "hn"): "quality-a1111-hn.png"}


def plot_path(host: str, kinds: list[str], out_path: Path) -> Path:
    name = PLOTS.get((host, kinds[0])) if len(kinds) == 1 else None
    return ROOT / "docs" / name if name else out_path.with_suffix(".png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="ti,hn")
    p.add_argument("--arms", default="", help="comma-separated subset of the arms (default: all of each kind)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25, help="save (and measure) every N steps")
    p.add_argument("--measure", default="", help="the saved steps to draw (comma-separated; default: every one)")
    p.add_argument("--batch", type=int, default=1, help="batch size (the host's default)")
    p.add_argument("--vectors", type=int, default=2)
    p.add_argument("--lr-ti", default="0.005", help="embedding learning rate (the host's default)")
    p.add_argument("--lr-hn", default="0.0005")
    p.add_argument("--concept", choices=tuple(CONCEPTS), default="report")
    p.add_argument("--n", type=int, default=32, help="pictures per saved file")
    p.add_argument("--out", default="", help="JSON path (default docs/figures/quality-<host>.json)")
    p.add_argument("--plot-only", default="", help="redraw the plot of this JSON and exit")
    p.add_argument("--keep", action="store_true", help="keep the folders (the trained files and runs.json)")
    p.add_argument("--judge", default="", help="draw the files of an earlier --keep folder instead of training")
    args = p.parse_args(argv)
    if args.plot_only:
        result = json.loads(Path(args.plot_only).read_text())
        kinds = list(result["kinds"])
        host = "a1111" if result["host"].startswith("AUTOMATIC1111") else result["host"]
        plot(result, plot_path(host, kinds, Path(args.plot_only)))
        return 0
    args.lr = {"ti": args.lr_ti, "hn": args.lr_hn}
    if not os.environ.get("SDTRAIN_WEBUI_DIR"):
        print("SDTRAIN_WEBUI_DIR is not set: eval \"$(bash tools/webui.sh a1111)\" first", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    import conftest

    from lib_sdtrain.toyworld import concept, models

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    only = {a.strip() for a in args.arms.split(",") if a.strip()}
    want = CONCEPTS[args.concept]
    out_path = Path(args.out or ROOT / "docs" / "figures" / f"quality-{conftest.HOST.name}.json")
    root = Path(tempfile.mkdtemp(prefix="sdtrain-quality-"))
    started = time.time()
    assets = conftest.build_webui_assets(root)
    ckpt = models.assemble("sd1", root / "models-toyworld")
    templates = concept.write_template(root / "templates").parent
    concept.write_template(templates, "toyworld_hn.txt", concept.HN_TEMPLATE)
    assets = {**assets, "ckpt": ckpt["ckpt"]}
    tmpl = ("--textual-inversion-templates-dir", str(templates))
    print(f"[quality] {conftest.HOST.title}, concept {want}, folders in {root}", flush=True)
    if args.judge:  # the runs of an earlier call (its --keep folder)
        runs = load_runs(Path(args.judge))
        kinds = sorted({r["kind"] for r in runs}, key=("ti", "hn").index)
    else:
        runs = train_all(conftest, assets, tmpl, root, kinds, only, want, args)
    judge_all(conftest, assets, tmpl, ckpt, runs, kinds, want, args, root)
    result = {"host": conftest.HOST.title, "concept": want,
              "concept_text": f"{want['size']} {want['color']} {want['shape']}",
              "settings": {"steps": args.steps, "every": args.every, "batch": args.batch, "vectors": args.vectors,
                           "lr": args.lr, "n": args.n, "seeds": args.seeds, "size": 64,
                           "sampling": "Euler a, 20 steps, CFG 2"},
              "load_average_end": os.getloadavg(), "seconds": round(time.time() - started),
              "kinds": {k: {"arms": summarise([r for r in runs if r["kind"] == k], k),
                            "runs": [{"arm": r["arm"], "seed": r["seed"], "wall": round(r["wall"], 2),
                                      "cpu": round(r["cpu"], 2),
                                      "match": {str(s): p["match"] for s, p in sorted(r["points"].items())}}
                                     for r in runs if r["kind"] == k]}
                        for k in kinds}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    plot(result, plot_path(conftest.HOST.name, kinds, out_path))
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
