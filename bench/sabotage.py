"""Break the trainer in ways a real bug would, and show the toy-world learning check catches each.

    python bench/sabotage.py [--steps 150] [--only NAME ...]

Each sabotage wraps the training host in a proxy that is wrong in one way during training only (the
pictures are then drawn by the intact host, as a user's webui would draw them):

- `v-target`: the loss uses the v-prediction target on an ε model (a wrong noise target);
- `timestep-half`: the UNet is told t/2 (a timestep off by a scale);
- `clip-penultimate`: the conditioning comes from CLIP's penultimate layer, not the last (the wrong layer);
- `latent-unscaled`: the VAE's latents miss the model's scale factor.

For each it trains the embedding of tests/test_toyworld.py::test_ti_learns_a_concept_no_word_names with
the same seeds and prints the concept match (the test demands >= 0.8) next to the intact trainer's.
The losses of a sabotaged run still fall, and the existing suite (which compares sdtrain with a
reference that shares its assumptions) passes with every one of them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Proxy:
    """Everything from the wrapped host, but what a subclass overrides."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class VTarget(Proxy):
    def noise_schedule(self):
        import dataclasses

        return dataclasses.replace(self._inner.noise_schedule(), prediction="v")


class TimestepHalf(Proxy):
    def predict(self, x_t, t, cond):
        return self._inner.predict(x_t, t // 2, cond)


class ClipPenultimate(Proxy):
    def encode_text(self, prompts, sizes=None):
        cond_stage = self._inner.model.cond_stage_model
        saved = cond_stage.layer, getattr(cond_stage, "layer_idx", None)
        cond_stage.layer, cond_stage.layer_idx = "hidden", -2
        try:
            return self._inner.encode_text(prompts, sizes) if sizes else self._inner.encode_text(prompts)
        finally:
            cond_stage.layer, cond_stage.layer_idx = saved


class LatentUnscaled(Proxy):
    def encode_images(self, pixels):
        import dataclasses

        dist = self._inner.encode_images(pixels)
        k = 1.0 / float(self._inner.model.scale_factor)
        return dataclasses.replace(dist, mean=dist.mean * k, std=dist.std * k)


class SizeZeroed(Proxy):
    """SDXL: the size conditioning (original size, crop, target size: the last 3 x 512 of the 2816-wide
    vector) left at zero."""

    def encode_text(self, prompts, sizes=None):
        cond = self._inner.encode_text(prompts, sizes)
        vector = cond["vector"].clone()
        vector[:, -1536:] = 0
        return {**cond, "vector": vector}


SDXL_SABOTAGES = {"size-zeroed": SizeZeroed}
SABOTAGES = {"v-target": VTarget, "timestep-half": TimestepHalf, "clip-penultimate": ClipPenultimate,
             "latent-unscaled": LatentUnscaled}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--family", default="sd1", choices=["sd1", "sdxl"])
    p.add_argument("--webui", default=None, help="a webui folder (SDXL's sgm comes from it)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from lib_sdtrain.hosts.standalone.host import StandaloneHost
    from lib_sdtrain.toyworld import concept, models

    tmp = Path(tempfile.mkdtemp(prefix="sdtrain-sabotage-"))
    files = models.assemble(args.family, tmp / "model", webui_dir=args.webui)
    host = StandaloneHost.load_checkpoint(files["ckpt"], files["yaml"], files["clip"], webui_dir=args.webui)
    sabotages = dict(SABOTAGES)
    if args.family == "sdxl":
        sabotages.pop("clip-penultimate")  # SDXL's conditioner is not one FrozenCLIPEmbedder
        sabotages.update(SDXL_SABOTAGES)
    data = concept.write_concept_set(tmp / "data", n=8, seed=0)
    want = dict(concept.CONCEPT)
    rows = []
    for name, cls in [("intact", None), *sabotages.items()]:
        if args.only and name not in args.only and name != "intact":
            continue
        t0 = time.time()
        trainer_host = host if cls is None else cls(host)
        emb, _ = concept.train_embedding(trainer_host, tmp / name, data, steps=args.steps)
        with host.use_embedding("toy-concept", emb.vectors):
            match = concept.matches(concept.concept_pictures(host, "toy-concept", n=32), want)
        rows.append((name, match, time.time() - t0))
        verdict = "caught" if (cls is not None and match < 0.8) else ("missed" if cls is not None else "")
        print(f"{name:18s} concept match {match:5.0%}  ({time.time() - t0:.0f}s) {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
