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
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) in (
        "TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(node)}
    for node in ast.walk(tree):  # function-level imports count too; `if TYPE_CHECKING:` ones name types only
        if id(node) in type_only:
            continue
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


#: core's parts, highest first; a part imports only parts below it (the same rule lint-imports checks).
CORE_LAYERS = (("tasks",), ("training",), ("data", "preprocess", "hypernetwork"), ("jobs", "formats"),
               ("options",), ("port", "errors"))


def test_core_parts_are_layered():
    rank = {part: i for i, layer in enumerate(CORE_LAYERS) for part in layer}
    on_disk = {p.stem if p.is_file() else p.name for p in (PKG / "core").iterdir()
               if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert on_disk == set(rank), "every part of core has a layer"
    bad = []
    for part in rank:
        path = PKG / "core" / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]:
            for name in imports(file):
                if name.startswith("lib_sdtrain.core."):
                    other = name.split(".")[2]
                    if other != part and rank[other] <= rank[part]:
                        bad.append(f"{file.relative_to(ROOT)} imports {name}")
    assert bad == []
