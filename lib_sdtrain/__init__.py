"""sdtrain: textual-inversion and hypernetwork training for AUTOMATIC1111-compatible webuis."""

from __future__ import annotations

import functools
import re
from pathlib import Path

#: the one place the version is written (the extension ships its source tree, pyproject.toml included)
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@functools.cache
def version() -> str:
    """sdtrain's version, as pyproject.toml's [project] table states it (read as text: the webuis run
    Python 3.10, which has no tomllib); "unknown" when that file is not beside the package."""
    try:
        text = PYPROJECT.read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = project and re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return found.group(1) if found else "unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
