"""The README and docs/: every link between them leads to a file, and the README stays a front door."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def local_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_local_link_leads_to_a_file(page: Path) -> None:
    missing = [t for t in local_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to files that don't exist: {missing}"


def test_the_readme_is_a_front_door_with_a_map_of_the_docs() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert not re.search(r"\b[Ii]ssue[ -]?\d+|\bcommit `?[0-9a-f]{7}\b", readme), "no issue numbers or commits"
    linked = {Path(t.split("#")[0]).name for t in local_links(REPO / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.name not in linked]
    assert not unlinked, f"docs/ pages the README's map doesn't list: {unlinked}"
