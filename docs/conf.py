"""Sphinx configuration of the wlora_trl documentation (Markdown pages through MyST, the furo theme).

Build (what CI runs, warnings are errors, nothing is fetched):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the checkout's wlora_trl, also when it is not installed
sys.path.insert(0, str(DOCS / "_ext"))

import wlora_trl  # noqa: E402

project = "wlora_trl"
author = "wlora_trl contributors"
copyright = "2026, wlora_trl contributors"
release = version = wlora_trl.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "wlora_docs",  # docs/_ext/wlora_docs.py: the config-field table, the CLI's help, Markdown in docstrings
]

root_doc = "index"
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# `name` in a docstring is code, as in the Markdown pages and on GitHub.
default_role = "code"

# MyST: anchors for `page.md#section` links, `:::` fences for admonitions.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Google-style docstrings (`Args:`, `Raises:`, `Example:`), as the package writes them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_class_signature = "mixed"

html_theme = "furo"
html_title = f"wlora_trl {release}"
html_static_path = ["_static"]
html_css_files = ["wlora.css"]
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": True}
