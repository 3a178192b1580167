"""The docs hold together: every relative link and anchor in README.md and docs/ resolves, code
fences are balanced with each closing fence alone on its line, and README.md links every docs/ page.

No Markdown parser is installed in .venv (markdown-it-py is not there), so this reads the few
CommonMark constructs it checks itself: fenced code blocks, ATX headings, inline and reference
links, code spans. Anchors follow GitHub's slug rules (github-slugger): the heading's text,
lower-cased, punctuation other than `-` and `_` dropped, each space a `-`, repeats suffixed -1, -2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")
INLINE_LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass
class Page:
    """What one Markdown file offers (anchors) and asks for (links), and its fence mistakes."""

    path: Path
    anchors: set[str] = field(default_factory=set)
    links: list[tuple[int, str]] = field(default_factory=list)
    fence_errors: list[str] = field(default_factory=list)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: rendered text, lower case, no punctuation."""
    text = INLINE_LINK.sub(r"\1", heading).replace("`", "")
    kept = "".join(c for c in text.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def parse(text: str, path: Path = Path("<text>")) -> Page:
    """Headings and links outside code blocks; a fence that stays open or is closed with text
    after it (CommonMark then keeps the block open and swallows what follows) is an error."""
    page = Page(path)
    seen: dict[str, int] = {}
    opener: tuple[str, int, int] | None = None  # fence character, length, line
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if opener is not None:
            char, length, _ = opener
            if fence and fence.group(1)[0] == char and len(fence.group(1)) >= length:
                if fence.group(2).strip():
                    page.fence_errors.append(
                        f"{path.name}:{number}: closing fence followed by text: {line.strip()!r}"
                    )
                else:
                    opener = None
            continue
        if fence and not (fence.group(1)[0] == "`" and "`" in fence.group(2)):
            opener = (fence.group(1)[0], len(fence.group(1)), number)
            continue
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2) or "")
            count = seen.get(base, 0)
            seen[base] = count + 1
            page.anchors.add(base if count == 0 else f"{base}-{count}")
            continue
        bare = CODE_SPAN.sub("", line)
        page.links += [(number, m.group(2)) for m in INLINE_LINK.finditer(bare)]
        reference = REFERENCE_DEF.match(bare)
        if reference:
            page.links.append((number, reference.group(1)))
    if opener is not None:
        page.fence_errors.append(f"{path.name}:{opener[2]}: code fence never closed")
    return page


def load(path: Path) -> Page:
    return parse(path.read_text(encoding="utf-8"), path)


def broken_links(page: Page) -> list[str]:
    """Each relative link whose file, or whose anchor in a Markdown file, does not exist."""
    problems = []
    for number, target in page.links:
        if not target or SCHEME.match(target):
            continue  # external: not ours to check offline
        file_part, _, anchor = target.partition("#")
        resolved = (page.path.parent / file_part).resolve()
        where = f"{page.path.name}:{number}: {target}"
        if file_part and not resolved.exists():
            problems.append(f"{where}: no such file")
        elif anchor and (not file_part or resolved.suffix == ".md"):
            anchors = load(resolved).anchors if file_part else page.anchors
            if anchor not in anchors:
                problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_code_fences_are_balanced_and_closing_fences_stand_alone(path: Path) -> None:
    assert load(path).fence_errors == []


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    assert broken_links(load(path)) == []


def test_readme_links_every_docs_page() -> None:
    readme = load(REPO / "README.md")
    linked = {(REPO / target.partition("#")[0]).resolve() for _, target in readme.links}
    unlinked = [page_id(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert DOCS.is_dir() and PAGES[1:], "docs/ holds no Markdown page"
    assert unlinked == []


def test_fence_closed_with_text_after_it_is_reported() -> None:
    text = "```python\nprint(1)\n``` Ctrl-C stops it.\n\n## Architecture\n\n```\npicture\n```\n"
    page = parse(text)
    assert page.fence_errors == [
        "<text>:3: closing fence followed by text: '``` Ctrl-C stops it.'",
        "<text>:9: code fence never closed",
    ]
    assert page.anchors == set()  # the heading was swallowed, as GitHub renders it


def test_headings_in_code_blocks_and_links_in_code_spans_are_ignored() -> None:
    page = parse("````md\n# not a heading\n```\n````\n# Real\nsee `[x](nowhere.md)` [y](a.md)\n")
    assert page.fence_errors == []
    assert page.anchors == {"real"}
    assert page.links == [(6, "a.md")]


def test_anchor_slugs_follow_github() -> None:
    page = parse(
        "# Model cache (hf:// sources)\n## `sem plan`: a *dry* run\n"
        "## Faults: a crashed or hung engine costs the client nothing\n# Notes\n# Notes\n"
    )
    assert page.anchors == {
        "model-cache-hf-sources",
        "sem-plan-a-dry-run",
        "faults-a-crashed-or-hung-engine-costs-the-client-nothing",
        "notes",
        "notes-1",
    }


def test_missing_file_and_missing_anchor_are_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Present\n")
    text = "[a](other.md#present) [b](other.md#absent) [c](gone.md) [d](#here) [e](#nope)\n# Here\n"
    page = parse(text, tmp_path / "page.md")
    assert broken_links(page) == [
        "page.md:1: other.md#absent: no heading with anchor #absent",
        "page.md:1: gone.md: no such file",
        "page.md:1: #nope: no heading with anchor #nope",
    ]
