"""CLI: what an installed webui's folder tells the command line — a checkpoint by name, the yaml beside
it, and the folders the webui keeps embeddings and hypernetworks in.

The places are A1111's defaults (v1.10.1 modules/paths_internal.py and cmd_args.py): checkpoints in
`<webui>/models/Stable-diffusion` (subfolders included, `.vae.*` files left out), embeddings in
`<webui>/embeddings`, hypernetworks in `<webui>/models/hypernetworks`; a checkpoint's own config is the
`.yaml` of the same name beside it (sd_models_config.find_checkpoint_config_near_filename). A webui
started with --data-dir, --models-dir, --ckpt-dir or --embeddings-dir keeps them elsewhere: give those
folders as paths then.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lib_sdtrain.core.errors import SdtrainError

CHECKPOINT_EXTS = (".ckpt", ".safetensors")
VAE_EXTS = (".vae.ckpt", ".vae.safetensors")
#: how many found files an error lists before "and N more"
LISTED = 20


def yaml_beside(ckpt: str | os.PathLike[str]) -> Path | None:
    """The checkpoint's own config, `<name>.yaml` beside `<name>.safetensors`, if there is one."""
    path = Path(os.path.splitext(str(ckpt))[0] + ".yaml")
    return path if path.is_file() else None


class WebuiFolder:
    """An installed webui's folder, read only."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SdtrainError(f"--webui {root}: no such folder")

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "models" / "Stable-diffusion"

    def defaults(self) -> dict[str, str]:
        """Job fields the webui's folder decides unless a flag or the job says otherwise."""
        return {"embeddings_dir": str(self.root / "embeddings"),
                "hypernetwork_dir": str(self.root / "models" / "hypernetworks")}

    def checkpoints(self) -> list[str]:
        """Every checkpoint the webui would list, as paths relative to its checkpoints folder ("/")."""
        base = self.checkpoints_dir
        found = []
        for folder, _dirs, files in os.walk(base, followlinks=True):
            for name in files:
                low = name.lower()
                if low.endswith(CHECKPOINT_EXTS) and not low.endswith(VAE_EXTS):
                    found.append(Path(folder, name).relative_to(base).as_posix())
        return sorted(found, key=str.lower)

    def find_checkpoint(self, name: str) -> Path:
        """The one checkpoint `name` stands for: its path relative to the checkpoints folder, with or
        without the extension, or its file name or stem alone (any subfolder); the webui's title form
        `name.safetensors [hash]` too. SdtrainError listing what there is when none or several match."""
        query = re.sub(r"\s*\[[0-9a-fA-F]{8,10}\]\s*$", "", name).replace("\\", "/").strip().strip("/")
        found = self.checkpoints()
        exact = [rel for rel in found if rel == query]
        if len(exact) == 1:
            return self.checkpoints_dir / exact[0]

        def names(rel: str) -> tuple[str, ...]:
            base = rel.rsplit("/", 1)[-1]
            return rel, os.path.splitext(rel)[0], base, os.path.splitext(base)[0]

        matches = [rel for rel in found if query in names(rel)]
        if len(matches) == 1:
            return self.checkpoints_dir / matches[0]
        where = self.checkpoints_dir
        if matches:
            raise SdtrainError(f"checkpoint {name!r} matches {len(matches)} files in {where}: {_listing(matches)}; "
                               "give its path relative to that folder, or a full path")
        if not where.is_dir():
            raise SdtrainError(f"no checkpoint {name!r}: {where} does not exist (is {self.root} a webui folder?)")
        if not found:
            raise SdtrainError(f"no checkpoint {name!r}: {where} holds no .safetensors or .ckpt files")
        raise SdtrainError(f"no checkpoint {name!r} in {where}; found: {_listing(found)}")


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED])
    return shown + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


def resolve_checkpoint(ckpt: str, webui: WebuiFolder | None) -> Path:
    """`--ckpt`: a file (as given, from the working folder) or, with `--webui`, a checkpoint's name."""
    path = Path(ckpt).expanduser()
    if path.is_file():
        return path
    if webui is None:
        raise SdtrainError(f"--ckpt {ckpt}: no such file (give its path, or --webui DIR to find it by name "
                           "in the webui's models/Stable-diffusion)")
    if path.is_absolute():
        raise SdtrainError(f"--ckpt {ckpt}: no such file")
    return webui.find_checkpoint(ckpt)
