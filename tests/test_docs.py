"""The README and docs/ (issue 19): a short README, every relative link resolving, every key documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app import config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "bench" / "results" / "HISTORY.md"]

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code, where `](` is not a link."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        found = re.match(r"^#{1,6} (.+)$", line)
        if not found:
            continue
        slug = re.sub(r"[^\w\- ]", "", found.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_under_15_kib() -> None:
    assert len(README.read_bytes()) < 15 * 1024


def test_readme_has_the_sections_the_issue_asks_for() -> None:
    headings = re.findall(r"^## (.+)$", README.read_text(), re.M)
    for name in ("Status", "Quick start", "Services", "Limits and failure behaviour", "Where to read next"):
        assert name in headings, name


def test_readme_quick_start_is_what_ci_runs() -> None:
    text = README.read_text()
    quick = text[text.index("## Quick start") :]
    assert "make run" in quick
    assert "make test" in quick
    assert re.search(r"^test: .*pytest", (ROOT / "Makefile").read_text(), re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_links_every_docs_page() -> None:
    text = README.read_text()
    for page in DOCS:
        assert f"](docs/{page.name})" in text, f"README does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        missing = not dest.exists()
        if missing or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_every_key_and_variable_is_in_the_configuration_table() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    row = re.compile(r"^\| `([a-z0-9_.]+)` \| `(FLEETMATE_[A-Z0-9_]+)` ", re.M)
    rows = {m.group(1): m.group(2) for m in row.finditer(text)}
    for variable, key in config.env_keys().items():
        assert rows.get(key) == variable, f"{key} ({variable}) has no row in docs/configuration.md"
