"""The three rings, checked by reading imports (lint-imports checks the same in CI)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lib_sdtrain"
HOST_STACKS = {"modules", "ldm", "sgm", "launch"}
CORE_FORBIDDEN = HOST_STACKS | {"gradio", "fastapi", "transformers", "diffusers", "open_clip", "starlette",
                                "pydantic"}
RINGS = ("hosts", "ui", "api", "cli")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def offenders(folder: Path, forbidden) -> list[str]:
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for name in imports(path):
            if forbidden(name):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_core_is_host_free():
    assert offenders(PKG / "core", lambda n: n.split(".")[0] in CORE_FORBIDDEN
                     or any(n.startswith(f"lib_sdtrain.{r}") for r in RINGS)) == []


def test_only_hosts_touch_the_webui():
    for ring in ("core", "ui", "api", "cli"):
        assert offenders(PKG / ring, lambda n: n.split(".")[0] in HOST_STACKS) == []


def test_rings_do_not_import_each_other():
    for ring in RINGS:
        others = [r for r in RINGS if r != ring]
        assert offenders(PKG / ring, lambda n, o=others: any(n.startswith(f"lib_sdtrain.{r}") for r in o)) == []


def test_scripts_holds_one_entry_file():
    assert sorted(p.name for p in (ROOT / "scripts").iterdir() if p.suffix == ".py") == ["sdtrain.py"]
    assert not (ROOT / "scripts" / "__init__.py").exists()
