"""The documentation stands alone: its relative links resolve inside the repository, and nothing points outside it.

A clone elsewhere has the repository and nothing beside it, so a link or a reference to a file outside it is broken
there even when it resolves on the machine where it was written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "benchmarks" / "RESULTS.md", *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
DOCS_PAGE = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)\b")
# what the sources and documents are written in; data (records, images) and installed packages are left out
TEXT_SUFFIXES = {".py", ".md", ".toml", ".cfg", ".ini", ".sh", ".yml", ".yaml", ".ui", ".txt", ".cmake"}
TEXT_NAMES = {"Makefile", "CMakeLists.txt", "run"}
SKIP_DIRS = {".git", ".venv", "demo-output", "__pycache__", ".pytest_cache", ".ruff_cache", "results"}


def _text_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder) / f for f in files if Path(f).suffix in TEXT_SUFFIXES or f in TEXT_NAMES]
    return found


def _prose(page: Path, text: str | None = None) -> str:
    """The page without its fenced code blocks, where brackets and parentheses are code, not links."""
    return FENCE.sub("", page.read_text(encoding="utf-8") if text is None else text)


def _anchors(page: Path) -> set[str]:
    """The fragment ids GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _broken_links(page: Path, text: str | None = None) -> list[str]:
    """What is wrong with each relative link of ``page`` (or of ``text`` as if it were at ``page``)."""
    broken = []
    for target in LINK.findall(_prose(page, text)):
        if SCHEME.match(target):
            continue  # a web address: not checked here (no network in the tests)
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target}: no heading '#{fragment}' in {resolved.relative_to(REPO)}")
    return broken


def test_the_pages_are_found_and_the_readme_links_into_docs():
    names = {str(p.relative_to(REPO)) for p in PAGES}
    assert {"README.md", "benchmarks/RESULTS.md", "docs/METHODS.md", "docs/USAGE.md"} <= names
    targets = set(LINK.findall(_prose(REPO / "README.md")))
    assert {
        "docs/USAGE.md",
        "docs/METHODS.md",
        "docs/ARCHITECTURE.md",
        "docs/EXTENDING.md",
        "docs/REPRODUCIBILITY.md",
        "benchmarks/RESULTS.md",
    } <= targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_a_file_in_the_repository(page):
    assert _broken_links(page) == []


def test_the_link_check_sees_a_missing_file_a_missing_heading_and_a_way_out():
    usage = REPO / "docs" / "USAGE.md"
    assert {"using-activelearning3d", "default-data", "the-slicer-panel"} <= _anchors(usage)
    text = (
        "[a](USAGE.md#default-data) [b](NOPE.md) [c](USAGE.md#no-such-part) [d](../../x/y.md) ![e](../LICENSE)\n"
        "```\n[f](inside-code.md)\n```\n[g](https://example.org/x.md)\n"
    )
    assert _broken_links(REPO / "docs" / "a-page-here.md", text) == [
        "NOPE.md: no such file",
        "USAGE.md#no-such-part: no heading '#no-such-part' in docs/USAGE.md",
        "../../x/y.md: outside the repository",
    ]


def test_nothing_points_to_documents_outside_the_repository():
    outside = "shared/" + "docs"  # spelled in two so that this file does not find itself
    hits = [str(p.relative_to(REPO)) for p in _text_files() if outside in p.read_text(encoding="utf-8", errors="ignore")]
    assert hits == []


def test_every_docs_page_the_sources_name_exists():
    missing = sorted(
        {
            f"{p.relative_to(REPO)}: docs/{name}"
            for p in _text_files()
            for name in DOCS_PAGE.findall(p.read_text(encoding="utf-8", errors="ignore"))
            if not (REPO / "docs" / name).is_file()
        }
    )
    assert missing == []
