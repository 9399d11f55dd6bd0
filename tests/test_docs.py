"""The reference page generated from code is current; the README is a short page whose links resolve."""
import re
from pathlib import Path

from lowbit.tools.docs import passes_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_passes_page_is_current():
    """docs/passes.md is `lowbit passes --markdown`: regenerate it when a pass or recipe changes."""
    assert (ROOT / "docs" / "passes.md").read_text() == passes_markdown(), \
        "docs/passes.md is stale: run `lowbit passes --markdown > docs/passes.md`"


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = [m for m in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if not m.startswith("http")]
    assert links and all((ROOT / link).exists() for link in links), [x for x in links if not (ROOT / x).exists()]
    for page in (ROOT / "docs").rglob("*.md"):
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / link).exists(), (page, link)
