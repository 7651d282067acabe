"""The toy worlds' figures, standalone: does each world draw what its captions say, and does sdtrain
learn concepts in it (README's "Results" table and pictures come from here and from the webui tests).

    python bench/toyworld.py [--families sd1 sdxl] [--out docs/figures] [--webui WEBUI_DIR]
                             [--hn-seeds 0,1,2] [--only hn]

For each family: the share of 64 pictures of random full captions whose shape and colour (and each
attribute) are the caption's; an embedding trained on 8 pictures of a large green triangle (150 steps,
the defaults of tests/test_toyworld.py) and the share of 32 pictures of its prompt that show it before
and after, and with ", light background" / ", dark background" added; for SDXL also one encoder at a
time (`train_encoders` clip_l / clip_g); a hypernetwork trained to draw everything purple and the share
of purple pictures of 32 captions that name no colour, at multiplier 1 and 0, for each training seed of
`--hn-seeds` (README's figures: 0,1,2; `--only hn` reruns that part alone). Writes
`<out>/toyworld-standalone.json`, and the picture grids into `--pictures` (docs/).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def save_picture(image, path: Path) -> None:
    """A picture for the docs, with the record tests/test_docs.py checks (which benchmark drew it)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sdtrain-picture", json.dumps({"bench": "bench/toyworld.py", "picture": path.name}))
    image.save(path, pnginfo=info)


def ti_figures(host, tmp: Path, data: Path, label: str, **options) -> tuple[dict, list]:
    from lib_sdtrain.toyworld import concept

    want = dict(concept.CONCEPT)
    t0 = time.time()
    emb, _ = concept.train_embedding(host, tmp / label, data, steps=150, **options)
    seconds = time.time() - t0
    out: dict = {"train_seconds": round(seconds, 1)}
    with host.use_embedding("toy-concept", host.initial_vectors("thing", 2)):
        before_pics = concept.concept_pictures(host, "toy-concept", n=32)
    with host.use_embedding("toy-concept", emb.vectors):
        after_pics = concept.concept_pictures(host, "toy-concept", n=32)
        out["edit_light"] = concept.matches(concept.concept_pictures(host, "toy-concept, light background", n=32),
                                            {**want, "background": "light"})
        out["edit_dark"] = concept.matches(concept.concept_pictures(host, "toy-concept, dark background", n=32),
                                           {**want, "background": "dark"})
    out["before"] = concept.matches(before_pics, want)
    out["after"] = concept.matches(after_pics, want)
    return out, [before_pics[:16], after_pics[:16]]


def hn_figures(host, tmp: Path, family: str, seeds: list[int]) -> dict:
    """The hypernetwork "everything purple" trained with each training seed (the file created from seed 0),
    at the world's rate (concept.HN_RATE): the mean over seeds, and each seed's figures."""
    from lib_sdtrain.toyworld import concept
    from lib_sdtrain.toyworld.reader import read

    data = concept.write_style_set(tmp / "style", n=64, seed=0)
    sizes = (concept.HN_SIZES[family],) if family == "sdxl" else ()  # SD1: the create job's default sizes
    purple = {"color": concept.STYLE_COLOR}
    runs = []
    for seed in seeds:
        hn, _ = concept.train_hypernetwork(host, tmp / f"hn-{seed}", data, steps=200, family=family, sizes=sizes,
                                           seed=seed)
        prompts, plain, styled, off = concept.style_pictures(host, hn)
        runs.append({"seed": seed, "purple_plain": concept.matches(plain, purple),
                     "purple_styled": concept.matches(styled, purple),
                     "shape_kept": sum(read(im).shape == s.shape for im, (_, s) in zip(styled, prompts)) / 32,
                     "multiplier_0_identical": all(a.tobytes() == b.tobytes() for a, b in zip(off, plain))})
        print(family, "hn seed", json.dumps(runs[-1]), flush=True)
    return {"purple_plain": runs[0]["purple_plain"],
            "purple_styled": sum(r["purple_styled"] for r in runs) / len(runs),
            "shape_kept": sum(r["shape_kept"] for r in runs) / len(runs),
            "multiplier_0_identical": all(r["multiplier_0_identical"] for r in runs),
            "rate": concept.HN_RATE[family], "runs": runs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sdxl"])
    p.add_argument("--out", default="docs/figures", help="the figures (JSON)")
    p.add_argument("--pictures", default="docs", help="the picture grids")
    p.add_argument("--webui", default=None, help="a webui folder (SDXL's sgm comes from it)")
    p.add_argument("--hn-seeds", default="0", help="the hypernetwork's training seeds (README's: 0,1,2)")
    p.add_argument("--only", choices=["all", "hn"], default="all",
                   help="hn: the hypernetwork's figures only (the others in the JSON stay)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from lib_sdtrain.hosts.standalone.host import StandaloneHost
    from lib_sdtrain.toyworld import concept, models
    from lib_sdtrain.toyworld.demo import _labelled
    from lib_sdtrain.toyworld.sample import grid, world_fidelity

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = Path(args.pictures)
    pictures.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    path = out_dir / "toyworld-standalone.json"
    if path.is_file():
        results = json.loads(path.read_text())
    for family in args.families:
        tmp = Path(tempfile.mkdtemp(prefix=f"sdtrain-toyworld-{family}-"))
        files = models.assemble(family, tmp / "model", webui_dir=args.webui)
        host = StandaloneHost.load_checkpoint(files["ckpt"], files["yaml"], files["clip"], webui_dir=args.webui)
        r: dict = {}
        seeds = [int(x) for x in args.hn_seeds.split(",")]
        if args.only == "hn":  # the family's other figures stay as the last whole run wrote them
            results[family] = {**results.get(family, {}), "hn": hn_figures(host, tmp, family, seeds)}
            path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            continue
        t0 = time.time()
        fid, images, _ = world_fidelity(host, n=64, seed=3)
        r["fidelity"] = {"shape_and_color": fid.match, "all_four": fid.all_four, "per_attribute": fid.per_attribute,
                         "n": fid.n, "seconds": round(time.time() - t0, 1)}
        save_picture(grid(images[:32]), pictures / f"toyworld-{family}-captions.png")
        print(family, "fidelity", json.dumps(r["fidelity"]), flush=True)
        data = concept.write_concept_set(tmp / "data", n=8, seed=0)
        r["ti"], rows = ti_figures(host, tmp, data, "ti")
        print(family, "ti", json.dumps(r["ti"]), flush=True)
        from PIL import Image

        training = [Image.open(q).convert("RGB") for q in sorted(data.glob("*.png"))]
        save_picture(_labelled([("training pictures", training), ("'toy-concept' before training", rows[0]),
                                ("after 150 steps", rows[1])]), pictures / f"toyworld-{family}-ti.png")
        if family == "sdxl":
            for enc in ("clip_l", "clip_g"):
                r[f"ti_{enc}_only"], _ = ti_figures(host, tmp, data, f"ti-{enc}", train_encoders=enc)
                print(family, enc, json.dumps(r[f"ti_{enc}_only"]), flush=True)
        r["hn"] = hn_figures(host, tmp, family, seeds)
        print(family, "hn", json.dumps(r["hn"]), flush=True)
        results[family] = r
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
