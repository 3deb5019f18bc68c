"""The front door stays short and every link in the documentation leads somewhere."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def _prose(text: str) -> str:
    """The text a reader follows links in: fenced blocks and code spans hold code, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(page: pathlib.Path) -> set[str]:
    """The heading anchors GitHub gives a page: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links(page: pathlib.Path) -> list[str]:
    return [target for target in LINK.findall(_prose(page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_there_are_pages_and_links():
    # A link pattern that matched nothing would make the test below pass on any text.
    assert len(PAGES) >= 7, [page.name for page in PAGES]
    assert sum(len(_relative_links(page)) for page in PAGES) >= 20


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; the reference belongs in docs/"


def test_readme_opens_with_install_and_run_then_install_and_test():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)[:2]
    assert len(commands) == 2
    run, test = commands
    assert "pip install -e . " in run and run.strip().endswith("softpo train")
    assert 'pip install -e ".[test]"' in test and test.strip().endswith("python -m pytest tests/ -q")
