"""Benchmark: the per-step time of training inside a real webui — the in-tree trainer against sdtrain.

Starts two servers of the same webui with the host-contract machinery (tests/webui/conftest.py: the
tiny SD1 checkpoint, offline CLIP files, a captioned dataset, this tree installed as an extension):
one keeps the host's own /sdapi training routes (sdtrain's route takeover off, plus the torch-compat
shim and --disable-safe-unpickle the in-tree trainer needs on current torch: the stock-trainer
servers of tests/webui), the other lets sdtrain serve them. Both get the same request body through
the same route. Per step = (time of an N2-step request - time of an N1-step one) / (N2 - N1), each
request on a freshly created file (tests/webui/host_timing.py). The trainers alternate, A B, B A, ...,
for `--rounds` rounds; the ratio sdtrain / in-tree is taken per round (only numbers measured side by
side are compared), and the table gives its median and its range over the rounds.

  eval "$(bash tools/webui.sh a1111)"   # a webui (or SDTRAIN_WEBUI_DIR / SDTRAIN_WEBUI_PYTHON of your own)
  python bench/host_step.py                       # TI and HN, each trainer's defaults, 5 rounds
  python bench/host_step.py --matrix              # + attention optimization and checkpointing on/off
  python bench/host_step.py --kinds ti --rounds 7 --short 10 --long 80
  python bench/host_step.py --variant ti:attn-off:ckpt-on --variant hn:attn-on:ckpt-off   # single rows
  python bench/host_step.py --device cuda --model sd15 --size 512   # a GPU: SD1.5 shapes, fp16 (the host's default)
  python bench/host_step.py --device cuda --model sdxl --size 1024 --kinds ti   # SDXL (A1111's own trainer cannot:
                                                                  # sdtrain's per-step time alone)

Variants: `attn on|off` sets the host's *Use cross attention optimizations while training* for the
in-tree trainer and `attention_optimization` for sdtrain; `ckpt on|off` is sdtrain's
`gradient_checkpointing` (the in-tree trainer checkpoints the UNet's blocks always). Each line also
comes as `ROW kind variant wall-in-tree wall-sdtrain ratio lo hi cpu-in-tree cpu-sdtrain ratio lo hi` for
scripts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "webui"))
sys.path.insert(0, str(ROOT / "bench"))


def parse_variant(text: str):
    """`ti`, `hn:attn-on`, `ti:attn-off:ckpt-on` ... -> a Variant (one row of the matrix)."""
    from host_timing import Variant

    kind, *opts = text.split(":")
    values = {"attn": None, "ckpt": None}
    for opt in opts:
        name, _, state = opt.partition("-")
        if name not in values or state not in ("on", "off"):
            raise argparse.ArgumentTypeError(f"bad variant option {opt!r} (attn-on|attn-off|ckpt-on|ckpt-off)")
        values[name] = state == "on"
    if kind not in ("ti", "hn"):
        raise argparse.ArgumentTypeError(f"bad kind {kind!r} (ti|hn)")
    return Variant(kind, values["attn"], values["ckpt"])


def variants(kinds: list[str], matrix: bool):
    from host_timing import Variant

    out = []
    for kind in kinds:
        out.append(Variant(kind))
        if matrix:
            for attention in (True, False):
                for checkpointing in (False, True):
                    out.append(Variant(kind, attention, checkpointing))
    return out


def alone(server, variant, data: Path, args):
    """sdtrain's per-step seconds without a partner (the in-tree trainer's columns stay nan)."""
    from host_timing import Comparison, _train_seconds, per_step

    c = Comparison(variant, args.short, args.long)
    _train_seconds(server, variant, data, 2, stock=False, size=args.size)
    for r in range(args.rounds):
        wall, cpu = per_step(server, variant, data, args.short, args.long, stock=False, size=args.size)
        c.sdtrain.append(wall)
        c.sdtrain_cpu.append(cpu)
        c.stock.append(float("nan"))
        c.stock_cpu.append(float("nan"))
        print(f"  round {r + 1}: wall sdtrain {wall:.4f} | CPU sdtrain {cpu:.4f} | load {os.getloadavg()[0]:.1f}", flush=True)
    return c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="ti,hn", help="ti, hn or both (comma-separated)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--short", type=int, default=10, help="steps of the shorter request")
    p.add_argument("--long", type=int, default=80, help="steps of the longer request")
    p.add_argument("--matrix", action="store_true", help="also attention optimization and checkpointing on/off")
    p.add_argument("--variant", action="append", type=parse_variant, default=[],
                   help="only these rows, e.g. ti:attn-off:ckpt-on (repeatable; replaces --kinds/--matrix)")
    p.add_argument("--baseline", choices=("takeover-off", "bare"), default="takeover-off",
                   help="the in-tree trainer's webui: sdtrain installed with its route takeover off (default), or "
                   "no sdtrain at all")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the webuis start without their CPU flags (fp16 weights, the host's defaults)")
    p.add_argument("--model", choices=("tiny", "sd15", "sdxl"), default="tiny",
                   help="tiny: the host tests' tiny SD1; sd15, sdxl: random weights at the real shapes, fp16 "
                   "(2.0 / 6.5 GiB, written here by bench/random_checkpoint.py)")
    p.add_argument("--size", type=int, default=64, help="training width and height")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the webuis")
    p.add_argument("--keep", action="store_true", help="keep the servers' folders (their logs) afterwards")
    args = p.parse_args(argv)
    if not os.environ.get("SDTRAIN_WEBUI_DIR"):
        print("SDTRAIN_WEBUI_DIR is not set: eval \"$(bash tools/webui.sh a1111)\" first", file=sys.stderr)
        return 2
    import conftest
    from host_timing import compare

    root = Path(tempfile.mkdtemp(prefix="sdtrain-host-step-"))
    print(f"[host_step] {conftest.HOST.title} in {os.environ['SDTRAIN_WEBUI_DIR']} ({args.device}, {args.model} model, "
          f"{args.size}x{args.size}); folders in {root}", flush=True)
    started = time.time()
    assets = conftest.build_webui_assets(root, full=False)
    if args.model != "tiny":  # the real shapes instead of the tiny SD1 (and CLIP-L's real config for the host)
        import random_checkpoint

        for f in assets["ckpt"].parent.iterdir():
            f.unlink()
        assets["ckpt"] = assets["ckpt"].parent / f"random-{args.model}.safetensors"
        info = random_checkpoint.make(args.model, assets["ckpt"], Path(os.environ["SDTRAIN_WEBUI_DIR"]),
                                      device=args.device, clip_dir=assets["clip_dir"])
        print(f"[host_step] {args.model}: {info['gib']:.2f} GiB written in {info['seconds']} s", flush=True)
    launch = None
    if args.device == "cuda":  # the host's start flags less those that keep it on the CPU in full precision
        cpu_only = {"--use-cpu", "all", "--no-half", "--precision", "full", "--always-cpu", "--skip-torch-cuda-test"}
        launch = tuple(a for a in conftest.HOST.launch_args if a not in cpu_only)
    common = {"launch_args": launch, "threads": args.threads}
    servers = []
    try:
        if args.baseline == "bare":  # the webui as it is without sdtrain
            stock = conftest.WebUI(assets, "stock", compat=True, extra_args=("--disable-safe-unpickle",), sdtrain=False,
                                   **common)
        else:
            stock = conftest.WebUI(assets, "stock", settings={"sdtrain_serve_host_training_routes": False},
                                   compat=True, extra_args=("--disable-safe-unpickle",), **common)
        servers.append(stock)
        sdtrain = conftest.WebUI(assets, "sdtrain", **common)
        servers.append(sdtrain)
        print(f"[host_step] servers up in {time.time() - started:.0f} s; load {os.getloadavg()}", flush=True)
        results = []
        chosen = args.variant or variants([k.strip() for k in args.kinds.split(",") if k.strip()], args.matrix)
        for v in chosen:
            print(f"[host_step] {v.label}: {args.rounds} rounds of {args.short} and {args.long} steps", flush=True)
            try:
                c = compare(stock, sdtrain, v, assets["data"], rounds=args.rounds, short=args.short, long=args.long,
                            echo=lambda line: print(line, flush=True), size=args.size)
            except AssertionError as e:  # a trainer refused (A1111's own cannot train SDXL): sdtrain alone
                print(f"[host_step] {v.label}: a trainer failed ({str(e)[:300]}); sdtrain alone", flush=True)
                c = alone(sdtrain, v, assets["data"], args)
            results.append(c)
            print(c.row(), flush=True)
        print(f"\n== per-step seconds inside the webui (load average at the end: {os.getloadavg()}) ==")
        for c in results:
            print(c.row())
        for c in results:
            lo, hi = c.spread()
            clo, chi = c.spread(cpu=True)
            print(f"ROW {c.variant.kind} {c.variant.label.replace(' ', '_').replace(',', '')} "
                  f"{statistics.median(c.stock):.5f} {statistics.median(c.sdtrain):.5f} {c.ratio:.3f} {lo:.3f} {hi:.3f} "
                  f"{statistics.median(c.stock_cpu):.5f} {statistics.median(c.sdtrain_cpu):.5f} {c.cpu_ratio:.3f} "
                  f"{clo:.3f} {chi:.3f}")
        print(f"[host_step] done in {time.time() - started:.0f} s")
    finally:
        for s in servers:
            s.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
