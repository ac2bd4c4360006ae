"""Every reference into docs/ resolves, and nothing cites documents outside the repository.

Comments point at design pages as `docs/<page>.md#<anchor>`; markdown files link them
relatively. Each such reference must name an existing page and, with an anchor, a heading of
that page (GitHub-style slug). Citations of the behaviour spec that the project was built from
("docs/lifecycle.md#claims") are not followable from the repository, so none may remain.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SUFFIXES = {".py", ".lua", ".proto", ".md", ".toml", ".yaml", ".yml"}
REF = re.compile(r"(?:\.\./)*docs/([a-z0-9_-]+\.md)(?:#([a-z0-9_-]+))?")
MD_LINK = re.compile(r"\]\((?!https?://)([^)#\s]*\.md)?(?:#([^)\s]+))?\)")
SPEC_CITATION = re.compile(r"\bspec \d{2}\b|§\s?\d", re.IGNORECASE)


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    return [
        ROOT / p
        for p in out
        if Path(p).suffix in SUFFIXES
        and not p.startswith("generated/")
        and (ROOT / p).is_file()
        and p != "tests/test_docs.py"
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def _refs(path: Path) -> list[tuple[Path, str | None]]:
    text = path.read_text(errors="replace")
    refs: list[tuple[Path, str | None]] = []
    for m in REF.finditer(text):
        refs.append((DOCS / m.group(1), m.group(2)))
    if path.suffix == ".md":
        for m in MD_LINK.finditer(text):
            target, anchor = m.group(1), m.group(2)
            page = (path.parent / target).resolve() if target else path
            if page.suffix == ".md" and DOCS in page.parents:
                refs.append((page, anchor))
    return refs


def test_the_design_pages_exist() -> None:
    pages = {p.name for p in DOCS.glob("*.md")}
    assert {"architecture.md", "lifecycle.md", "suspension.md", "streams.md"} <= pages


@pytest.mark.parametrize("path", _tracked(), ids=lambda p: str(p.relative_to(ROOT)))
def test_references_into_docs_resolve(path: Path) -> None:
    bad = []
    for page, anchor in _refs(path):
        if not page.is_file():
            bad.append(f"{page.relative_to(ROOT)} (no such page)")
        elif anchor and anchor not in anchors(page):
            bad.append(f"{page.relative_to(ROOT)}#{anchor} (no such heading)")
    assert not bad, f"{path.relative_to(ROOT)}: unresolved references: {sorted(set(bad))}"


@pytest.mark.parametrize("path", _tracked(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_citations_outside_the_repository(path: Path) -> None:
    hits = [
        f"{n}: {line.strip()[:80]}"
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if SPEC_CITATION.search(line)
    ]
    assert not hits, f"{path.relative_to(ROOT)} cites the spec: {hits[:5]}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("# see docs/lifecycle.md#no-such-heading and spec 10 §2.2\n")
    page, anchor = _refs(bad)[0]
    assert anchor == "no-such-heading" and anchor not in anchors(page)
    assert SPEC_CITATION.search(bad.read_text())
