"""The README stays a front page, and no link of the documentation points nowhere.

* README.md is under 10 KB and has a "Quick start" section with the two commands (``.ci/run`` runs
  ``make test``, so the README's command is the one CI runs);
* every relative link (and image) of README.md and docs/*.md names a file of the repository, and a
  ``#anchor`` into a Markdown file names one of its headings, as GitHub makes them;
* every page under docs/ is linked from the README.
"""

import re
from pathlib import Path
from typing import Iterator, List, Set, Tuple

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_LIMIT_BYTES = 10_000

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def pages() -> List[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def without_code(text: str) -> str:
    """The Markdown text with fenced blocks and inline code removed (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(path: Path) -> Iterator[Tuple[str, str]]:
    """``(target file part, anchor)`` of every relative link in ``path``."""
    for target in LINK.findall(without_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        yield file_part, anchor


def heading_anchors(path: Path) -> Set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors: Set[str] = set()
    seen: dict = {}
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a Markdown text ('' when there is none)."""
    match = re.search(rf"^##\s+{re.escape(title)}\s*$(.*?)(?=^##\s|\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def test_readme_is_a_front_page_under_10_kb():
    size = README.stat().st_size
    assert size < README_LIMIT_BYTES, (
        f"README.md is {size} bytes; keep it under {README_LIMIT_BYTES} (a front page) and move detail to docs/")


def test_readme_quick_start_has_the_two_commands():
    quick_start = section(README.read_text(encoding="utf-8"), "Quick start")
    assert quick_start, "README.md has no '## Quick start' section"
    commands = re.findall(r"^```(?:bash|sh)?\n(.*?)^```", quick_start, re.M | re.S)
    lines = [line.split("#")[0].strip() for block in commands for line in block.splitlines()]
    assert "make demo" in lines and "make test" in lines, "Quick start must show `make demo` and `make test`"
    assert "make test" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for page in pages():
        for file_part, anchor in links(page):
            target = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(REPO)} -> {file_part}{'#' + anchor if anchor else ''}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and target.suffix == ".md" and anchor.lower() not in heading_anchors(target):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / file_part).resolve() for file_part, _ in links(README) if file_part}
    orphans = [page.relative_to(REPO).as_posix() for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_link_check_sees_a_broken_link(tmp_path):
    """The checks above work: a missing file and a missing heading are both found."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Real heading\n", encoding="utf-8")
    page.write_text("[a](missing.md) [b](other.md#real-heading) [c](other.md#no-heading) "
                    "[d](https://example.org/x) `[e](inline.md)`\n", encoding="utf-8")
    found = list(links(page))
    assert found == [("missing.md", ""), ("other.md", "real-heading"), ("other.md", "no-heading")]
    assert "real-heading" in heading_anchors(tmp_path / "other.md")
    assert "no-heading" not in heading_anchors(tmp_path / "other.md")
