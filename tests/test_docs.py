"""Every relative link and #anchor in README.md and docs/*.md resolves, by GitHub's rules."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or ')'.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text):
    """The lines outside fenced code blocks, inline code removed."""
    fenced = False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def github_slug(heading):
    """GitHub's anchor for a heading: its text, lower-cased, punctuation other than '-' and '_'
    dropped, each space a '-' (github-slugger's rule)."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(
        c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM"
    )
    return kept.replace(" ", "-")


def anchors(page):
    """The anchors of a page's headings, with GitHub's -1, -2 suffixes for repeats."""
    seen = {}
    found = set()
    for line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page):
    """(line number, target) of every link on a page, outside code."""
    fenced = False
    for number, line in enumerate(page.read_text().split("\n"), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def broken_links(page, root=ROOT):
    broken = []
    for number, target in links(page):
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no file {path})")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{where} (no heading with anchor #{anchor} in {path or 'this page'})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for _, target in links(ROOT / "README.md")
        if not SCHEME.match(target)
    }
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


@pytest.mark.parametrize(
    "heading, slug",
    [
        ("LLM-scale costs", "llm-scale-costs"),
        ("What the merge did with each tensor", "what-the-merge-did-with-each-tensor"),
        ("Which solver: the numbers", "which-solver-the-numbers"),
        ("`precision` and `out_dtype`", "precision-and-out_dtype"),
        ("Errors, edge cases and interrupted merges", "errors-edge-cases-and-interrupted-merges"),
        ("How long will my merge take?", "how-long-will-my-merge-take"),
        ("GPU (H200) / CPU", "gpu-h200--cpu"),
    ],
)
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_a_broken_link_and_a_broken_anchor_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here\n\n"
        "[ok](other.md#a-section) [ok](#here) [web](https://example.com/x#y)\n"
        "`[code](missing.md)`\n```\n[fenced](missing.md)\n```\n"
        "[gone](missing.md) [bad](other.md#no-such) ![img](#nowhere)\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "page.md:10: missing.md (no file missing.md)",
        "page.md:10: other.md#no-such (no heading with anchor #no-such in other.md)",
        "page.md:10: #nowhere (no heading with anchor #nowhere in this page)",
    ]
