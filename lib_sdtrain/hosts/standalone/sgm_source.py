"""Host(standalone): where SDXL's model code (Stability AI's `sgm`) comes from.

`sgm` is not on PyPI. Every webui that runs SDXL through it carries it in its
`repositories/generative-models` folder, so the standalone host takes it from a webui checkout the
user names (or `SDTRAIN_SGM_DIR`), the way the webui itself puts it on `sys.path`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from lib_sdtrain.core.errors import SdtrainError


def sgm_dir_of(webui_dir: str | os.PathLike[str]) -> Path:
    return Path(webui_dir) / "repositories" / "generative-models"


def ensure_sgm(webui_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Make `import sgm` work: already importable, or from `webui_dir`'s repositories, or from
    `SDTRAIN_SGM_DIR` (a generative-models checkout). Returns the folder added to `sys.path`."""
    candidates = [sgm_dir_of(webui_dir)] if webui_dir else []
    if os.environ.get("SDTRAIN_SGM_DIR"):
        candidates.append(Path(os.environ["SDTRAIN_SGM_DIR"]))
    for folder in candidates:
        if (folder / "sgm" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            importlib.invalidate_caches()
            return folder
    if importlib.util.find_spec("sgm") is not None:
        return None
    where = f" (looked in {', '.join(str(c) for c in candidates)})" if candidates else ""
    raise SdtrainError(
        "SDXL needs Stability AI's `sgm` code, which ships with the webui, not on PyPI: pass the webui "
        f"folder (--webui DIR), or set SDTRAIN_SGM_DIR to a generative-models checkout{where}."
    )
