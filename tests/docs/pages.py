"""The documentation's pages as the tests read them: the README, the Markdown pages under docs/source/, and the
fenced `python` examples marked `<!-- example: NAME -->` on them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = DOCS / "source"
README = REPO / "README.md"

_EXAMPLE = re.compile(r"^<!-- example: (?P<name>[\w-]+) -->\n```python\n(?P<code>.*?)^```$", re.M | re.S)
_PYTHON_FENCE = re.compile(r"^```python$", re.M)


def page(name: str) -> str:
    """The Markdown source of `docs/source/<name>.md`, or of the README for "README"."""
    return (README if name == "README" else PAGES / f"{name}.md").read_text()


def prose(text: str) -> str:
    """The text with every run of whitespace (line breaks of wrapped paragraphs included) as one space, so a
    sentence is found wherever the page wraps it."""
    return " ".join(text.split())


def examples(name: str) -> dict[str, str]:
    """The marked `python` examples of a page, by name, in page order."""
    text = page(name)
    found = {m["name"]: m["code"] for m in _EXAMPLE.finditer(text)}
    fences = len(_PYTHON_FENCE.findall(text))
    if fences != len(found):
        raise AssertionError(
            f"docs/source/{name}.md has {fences} ```python blocks but {len(found)} marked examples: put "
            "`<!-- example: NAME -->` on the line before each one, and give it a runner in tests/docs/test_page_examples.py"
        )
    return found
