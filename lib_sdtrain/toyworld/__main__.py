"""python -m lib_sdtrain.toyworld: train the toy worlds, assemble their checkpoints, measure them.

    python -m lib_sdtrain.toyworld train vae  [--steps N]
    python -m lib_sdtrain.toyworld train sd1  [--steps N]
    python -m lib_sdtrain.toyworld train sdxl [--steps N] --webui WEBUI_DIR   (sgm comes with a webui)
    python -m lib_sdtrain.toyworld train sdxl --init-unet --steps N --lr R --webui W  (continue training)
    python -m lib_sdtrain.toyworld assemble sd1|sdxl DEST [--webui WEBUI_DIR]
    python -m lib_sdtrain.toyworld fidelity sd1|sdxl [--n 64] [--grid out.png] [--webui WEBUI_DIR]

Every command is seeded: the same command on the same torch gives the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lib_sdtrain.toyworld.sample import CFG


def _threads() -> None:
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def save_vae(m) -> Path:
    """The VAE with its latent space brought to unit spread (std of the posterior means over 256 fresh
    pictures), as weights/vae.safetensors."""
    import random

    import torch

    from lib_sdtrain.toyworld import train
    from lib_sdtrain.toyworld import vae as V
    from lib_sdtrain.toyworld.world import draw, random_scene

    rng = random.Random(99)
    x = V.to_tensor([draw(random_scene(rng)) for _ in range(256)])
    with torch.no_grad():
        std = float(m.quant_conv(m.encoder(x)).chunk(2, dim=1)[0].std())
    return train.save_unit_vae(m, std)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from lib_sdtrain.toyworld import models, train

    torch.manual_seed(args.seed)
    if args.what == "vae":
        from lib_sdtrain.toyworld import vae as V

        t0 = time.time()
        steps = args.steps or 3000
        m = V.build_vae(args.seed)
        if args.init:  # continue from a saved full-VAE phase (a state dict), skipping it
            m.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
        else:
            V.train_vae(m, steps=steps, stop_at=args.stop_at, seed=args.seed, lr=args.lr or 2e-3)
        if args.decoder_steps:
            V.train_decoder(m, steps=args.decoder_steps, seed=args.seed)
        out = save_vae(m)
        train.update_record(vae={"steps": steps, "stop_at": args.stop_at, "decoder_steps": args.decoder_steps,
                                 "seconds": round(time.time() - t0), "seed": args.seed})
        print(f"wrote {out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        def check(host, step):
            from lib_sdtrain.toyworld.sample import world_fidelity

            fid, _, _ = world_fidelity(host, n=32, seed=1)
            print(f"{args.what} step {step}: shape+colour {fid.match:.0%} {fid.per_attribute}", flush=True)

        host, stats = train.train_unet(args.what, steps=args.steps or 3000, seed=args.seed, lr=args.lr or 1e-3,
                                       workdir=tmp, webui_dir=args.webui, batch_size=args.batch,
                                       log=lambda m: print(m, flush=True), eval_fn=check, eval_every=500,
                                       init_unet=args.init_unet)
        out = train.save_unet(host, args.what)
        stats["seed"] = args.seed
        stats["lr"] = args.lr or 1e-3
        if args.init_unet:  # a continuation: keep what the stored weights came from
            from lib_sdtrain.toyworld import models

            before = json.loads(models.RECORD.read_text(encoding="utf-8")).get(args.what, {})
            stats["continued_from"] = before  # the whole chain of runs
        train.update_record(**{args.what: stats})
        print(f"wrote {out}: {json.dumps(stats)}")
        assembled = models.assemble(args.what, Path(tmp) / "ckpt", webui_dir=args.webui, check=False)
        train.update_record(assembled={args.what: models.sha256(assembled["ckpt"])})
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Assemble each family whose UNet is stored and record the checkpoint's SHA-256."""
    from lib_sdtrain.toyworld import models, train

    for family in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            files = models.assemble(family, tmp, webui_dir=args.webui, check=False)
            train.update_record(assembled={family: models.sha256(files["ckpt"])})
            print(f"{family}: {models.sha256(files['ckpt'])}")
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
    from lib_sdtrain.toyworld import models

    out = models.assemble(args.family, args.dest, webui_dir=args.webui)
    print(json.dumps({k: str(v) for k, v in out.items()}))
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    from lib_sdtrain.hosts.standalone.host import StandaloneHost
    from lib_sdtrain.toyworld import models, sample

    with tempfile.TemporaryDirectory() as tmp:
        files = models.assemble(args.family, tmp, webui_dir=args.webui)
        host = StandaloneHost.load_checkpoint(files["ckpt"], files["yaml"], files["clip"], webui_dir=args.webui)
        t0 = time.time()
        fid, images, _ = sample.world_fidelity(host, n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg)
        print(json.dumps({"family": args.family, "n": fid.n, "shape_and_color": fid.match,
                          "all_four": fid.all_four, "per_attribute": fid.per_attribute,
                          "confusions": fid.confusions, "seconds": round(time.time() - t0)}))
        if args.grid:
            sample.grid(images).save(args.grid)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib_sdtrain.toyworld", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the VAE or a family's UNet (writes weights/)")
    t.add_argument("what", choices=["vae", "sd1", "sdxl"])
    t.add_argument("--steps", type=int, default=0)
    t.add_argument("--lr", type=float, default=0.0)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--stop-at", type=int, default=0, help="vae: stop the full phase after N of --steps")
    t.add_argument("--decoder-steps", type=int, default=0, help="vae: then train the decoder alone N steps")
    t.add_argument("--init", default="", help="vae: a state dict that stands for the full phase")
    t.add_argument("--init-unet", action="store_true",
                   help="sd1/sdxl: continue from the stored UNet (weights/<family>-unet.safetensors)")
    t.add_argument("--webui", default=None, help="a webui folder (SDXL's sgm code comes from it)")
    a = sub.add_parser("assemble", help="write a family's full checkpoint and yaml into DEST")
    a.add_argument("family", choices=["sd1", "sdxl"])
    a.add_argument("dest")
    a.add_argument("--webui", default=None)
    r = sub.add_parser("record", help="assemble the families and record their checkpoints' SHA-256")
    r.add_argument("families", nargs="+", choices=["sd1", "sdxl"])
    r.add_argument("--webui", default=None)
    f = sub.add_parser("fidelity", help="how many generated pictures show what their caption says")
    f.add_argument("family", choices=["sd1", "sdxl"])
    f.add_argument("--n", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--steps", type=int, default=20)
    f.add_argument("--cfg", type=float, default=CFG)
    f.add_argument("--grid", default="")
    f.add_argument("--webui", default=None)
    args = p.parse_args(argv)
    _threads()
    return {"train": cmd_train, "assemble": cmd_assemble, "fidelity": cmd_fidelity,
            "record": cmd_record}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
