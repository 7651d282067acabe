"""Benchmark: which of sdtrain's embedding options learn a concept fastest — the search behind the
"recommended" preset (bench/quality.py then reports the preset on another concept, in the real webui).

Standalone (sdtrain's own trainer and the SD1 toy world, no webui): every option set trains the same
concept on the same 8 pictures and template, batch 1 (the host's default), with the same seeds, and saves its embedding every
`--every` steps; each saved embedding draws 32 pictures (the same seeds for every arm) that the toy
world's reader checks. Reported per option set: concept match at each saved step (mean and range over
the seeds) and training seconds (one thread). The search concept is the toy world's default
(a large green triangle).

  python bench/quality_search.py                       # every option set, 2 seeds, 100 steps, batch 1
  python bench/quality_search.py --sets default,lr0.02 --seeds 3 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: option sets searched (EMA is not among them: the intermediate saves this measures hold the trained
#: tensors, not the average): name -> sdtrain training fields (on top of the host's defaults: lr 0.005,
#: AdamW, constant rate, 2 vectors from "thing")
SETS: dict[str, dict] = {
    "default": {},
    "lr0.01": {"learn_rate": "0.01"},
    "lr0.02": {"learn_rate": "0.02"},
    "lr0.05": {"learn_rate": "0.05"},
    "lr0.02-cosine": {"learn_rate": "0.02", "lr_scheduler": "cosine", "lr_warmup_steps": 5},
    "minsnr5": {"min_snr_gamma": 5.0},
    "lr0.01-minsnr5": {"learn_rate": "0.01", "min_snr_gamma": 5.0},
    "lr0.02-norm1.5": {"learn_rate": "0.02", "norm_limit": 1.5},
    "random-latents": {"latent_sampling_method": "random"},
    "1vec": {"vectors": 1},
    "4vec": {"vectors": 4},
}


def run_set(host, tmp: Path, data: Path, label: str, options: dict, seed: int, steps: int, every: int,
            n: int, batch: int) -> dict:
    from quality import snapshots

    from lib_sdtrain.core.formats.embedding_io import load_embedding
    from lib_sdtrain.toyworld import concept

    want = dict(concept.CONCEPT)
    options = dict(options)
    vectors = int(options.pop("vectors", 2))
    work = tmp / f"{label}-{seed}"
    t0 = time.time()
    concept.train_embedding(host, work, data, steps=steps, vectors=vectors, seed=seed,
                            **{"learn_rate": "0.005", "batch_size": batch, "save_embedding_every": every, **options})
    seconds = time.time() - t0
    curve = {}
    for step, f in sorted(snapshots(work / "log", "toy-concept").items()):
        with host.use_embedding("toy-concept", load_embedding(f).vectors):
            curve[step] = concept.matches(concept.concept_pictures(host, "toy-concept", n=n, seed=900), want)
    return {"seconds": round(seconds, 1), "match": curve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS), help="option sets (comma-separated): " + ", ".join(SETS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="batch size (the host's default: 1)")
    p.add_argument("--n", type=int, default=32, help="pictures per saved embedding")
    p.add_argument("--out", default="docs/figures/quality-search.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from lib_sdtrain.hosts.standalone.host import StandaloneHost
    from lib_sdtrain.toyworld import concept, models

    tmp = Path(tempfile.mkdtemp(prefix="sdtrain-quality-search-"))
    files = models.assemble("sd1", tmp / "model")
    host = StandaloneHost.load_checkpoint(files["ckpt"], files["yaml"], files["clip"])
    data = concept.write_concept_set(tmp / "data", n=8, seed=0)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for label in [s.strip() for s in args.sets.split(",") if s.strip()]:
        runs = [run_set(host, tmp, data, label, SETS[label], seed, args.steps, args.every, args.n,
                        args.batch)
                for seed in range(args.seeds)]
        steps = sorted(runs[0]["match"])
        summary = {str(s): {"mean": round(statistics.mean(r["match"][s] for r in runs), 3),
                            "min": min(r["match"][s] for r in runs), "max": max(r["match"][s] for r in runs)}
                   for s in steps}
        results[label] = {"options": SETS[label], "seeds": args.seeds, "steps": args.steps, "batch": args.batch,
                          "seconds": round(statistics.mean(r["seconds"] for r in runs), 1), "match": summary}
        print(label, json.dumps(results[label]), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
