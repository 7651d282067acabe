"""Composition root for the command line: wires the CLI surface to the standalone host."""

from __future__ import annotations

import sys

from lib_sdtrain.cli import HostFactories, main


def _checkpoint(ckpt: str, yaml: str | None, clip_dir: str | None, webui: str | None = None, device=None):
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    return StandaloneHost.load_checkpoint(ckpt, yaml, clip_dir, webui_dir=webui, device=device or "cpu")


def _tiny(workdir: str):
    from lib_sdtrain.hosts.standalone.host import StandaloneHost
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1

    return StandaloneHost(build_tiny_sd1(workdir))


def _demo(args):
    from lib_sdtrain.toyworld.demo import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], HostFactories(checkpoint=_checkpoint, tiny=_tiny, demo=_demo)))
