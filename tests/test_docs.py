"""The documentation is part of what is tested: README.md, CHANGELOG.md and docs/*.md name only links, anchors,
pictures and files that exist; docs/options.md is what tools/options_doc.py writes from the configs; each
message troubleshooting.md quotes is one sdtrain raises; each picture was taken by the test it names; the
README stays short; the license and the version are where they are said to be. (The curl examples of
docs/api.md run in the real webuis: tests/webui/test_contract.py.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from lib_sdtrain import version

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: code spans that name a file of this repository, e.g. `tools/options_doc.py` or `tests/webui/x.py::test_y`
REPO_PATH = re.compile(r"^(?:tools|bench|tests|lib_sdtrain|docs|scripts|\.ci)/[\w./-]*?[\w/]$")


def _without_code(text: str) -> str:
    """The page without fenced code blocks and inline code spans (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"(`+).+?\1", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def problems(page: Path) -> list[str]:
    """Every link, anchor, picture or repository file `page` names that does not exist."""
    text = page.read_text(encoding="utf-8")
    found = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(text)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: — not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            found.append(f"{page.name}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            found.append(f"{page.name}: {target}: no heading #{anchor} in {dest.name}")
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)):
        path = span.split("::")[0]
        if REPO_PATH.match(path) and not (ROOT / path).exists():
            found.append(f"{page.name}: `{span}`: no such file in the repository")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_anchors_pictures_and_files_exist(page):
    assert problems(page) == []


def test_a_broken_link_anchor_or_path_is_found(tmp_path):
    """The check itself: a missing file, a missing anchor, a missing picture and a missing repository path
    are each reported, and the same page with them fixed is clean."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## Here\n\n[ok](other.md#a-section) [ok](#here) [ok](other.md) "
                    "[web](https://example.com/x)\n\n```\n[in code](nowhere.md)\n```\n")
    assert problems(page) == []
    page.write_text("# Page\n\n[a](gone.md) [b](other.md#no-section) [c](#nowhere) ![d](missing.png) "
                    "`tools/no_such_tool.sh`\n")
    assert len(problems(page)) == 5, problems(page)


def test_github_anchors():
    assert slug("Your first embedding") == "your-first-embedding"
    assert slug("More than one GPU (torchrun)") == "more-than-one-gpu-torchrun"
    assert slug("`the loss became VALUE at step N; training stopped`") == (
        "the-loss-became-value-at-step-n-training-stopped")


def _options_doc():
    spec = importlib.util.spec_from_file_location("options_doc", ROOT / "tools" / "options_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_md_is_generated_from_the_configs():
    """Every field of every job config is in docs/options.md with its current default and a note on when to
    change it; after a change to a field, `python tools/options_doc.py` rewrites the page."""
    doc = _options_doc()
    assert doc.missing_notes() == [], "add a note for these fields to WHEN in tools/options_doc.py"
    assert (ROOT / "docs" / "options.md").read_text(encoding="utf-8") == doc.render(), (
        "docs/options.md is out of date: run python tools/options_doc.py")


def test_options_md_lists_every_field_with_its_default():
    """Independently of the generator: each field's row carries the config's default."""
    import dataclasses

    from lib_sdtrain.core.tasks.registry import job_config_types

    text = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `(\w+)` \| (.*?) \|", line)
        if m:
            rows.setdefault(m.group(1), []).append(m.group(2))
    for cls in job_config_types().values():
        for f in dataclasses.fields(cls):
            assert f.name in rows, f.name
            if f.name in cls.HOST_FOLDERS or f.name == "templates_dir":
                continue
            shown = json.dumps(json.loads(json.dumps(f.default)), ensure_ascii=False)
            if isinstance(f.default, str):
                shown = f'"{f.default}"'
            assert any(f"`{shown}`" in cell for cell in rows[f.name]), (f.name, shown, rows[f.name])


def _source_text() -> str:
    """lib_sdtrain's source with adjacent string literals joined ("a " "b" -> "a b"), as Python joins them."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "lib_sdtrain").rglob("*.py"))
    return re.sub(r"[\"']\s*\n\s*[rfb]*[\"']", "", text)


def test_troubleshooting_quotes_messages_sdtrain_raises():
    """Each heading of troubleshooting.md that quotes a message (in code) is a message in lib_sdtrain's
    source; words in CAPITALS (PATH, N, …) stand for the parts that vary."""
    source = _source_text()
    headings = re.findall(r"^### (`+)(.+?)\1$", (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8"),
                          flags=re.M)
    assert len(headings) >= 25
    missing = []
    for _, message in headings:
        pieces = [p.strip() for p in re.split(r"\b[A-Z]{1,}\b(?![a-z])|'NAME'|\.\.\.|…", message)]
        pieces = [p for p in pieces if len(p) >= 4]
        assert pieces, message
        missing += [f"{message!r}: {p!r}" for p in pieces if p not in source]
    assert missing == []


def test_troubleshooting_check_catches_a_message_sdtrain_does_not_raise():
    assert "the loss became" in _source_text() and "the loss went sideways" not in _source_text()


def test_pictures_are_the_browser_tests_screenshots():
    """Every picture the pages show lies in docs/ and carries the record tools/screenshots.sh writes: the
    test that took it, which takes a screenshot of that name (or the benchmark that drew it, which still
    writes that file); a picture edited by hand or from elsewhere has none."""
    from PIL import Image

    shown = set()
    for page in PAGES:
        shown |= {(page.parent / t).resolve() for t in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", _without_code(
            page.read_text(encoding="utf-8")))}
    assert shown, "no pictures found"
    for picture in sorted(shown):
        assert picture.parent == ROOT / "docs", picture
        record = Image.open(picture).text.get("sdtrain-picture")
        assert record, f"{picture.name} has no record of the test that took it: bash tools/screenshots.sh"
        record = json.loads(record)
        if "bench" in record:  # a benchmark's picture (bench/toyworld.py): it must still make it
            code = (ROOT / record["bench"]).read_text(encoding="utf-8")
            assert any(picture.name in code.replace("{family}", f) for f in ("sd1", "sdxl")), record
            continue
        test_file, _, test_name = record["test"].partition("::")
        code = (ROOT / test_file).read_text(encoding="utf-8")
        body = code.split(f"def {test_name}(")[1].split("\ndef ")[0]
        assert f'shot(pg, "{record["shot"]}")' in body, record


def test_readme_is_short_and_keeps_its_sections():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for heading in ("Supported webuis and models", "Install", "Your first embedding", "Results", "Hypernetworks",
                    "License"):
        assert slug(heading) in anchors(ROOT / "README.md"), heading
    results = text.split("## Results")[1].split("\n## ")[0]
    assert "docs/verification.md#toy-worlds" in results and ".png)" in results  # the figures, their picture


def test_license_and_version():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.lstrip().startswith("GNU AFFERO GENERAL PUBLIC LICENSE") and "Version 3" in license_text[:200]
    assert "AGPL-3.0" in (ROOT / "README.md").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(rf'^version = "{re.escape(version())}"$', pyproject, flags=re.M)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version())
    # the version is written once: no other file of the package spells it out
    assert [p for p in (ROOT / "lib_sdtrain").rglob("*.py") if f'"{version()}"' in p.read_text(encoding="utf-8")] == []
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and f"## [{version()}]" in changelog
