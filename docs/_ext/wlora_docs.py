"""Sphinx helpers of the wlora_trl docs: what is rendered from the code instead of copied into a page.

- `wlora-cli-help` (directive): the `--help` text of `wlora-trl` or one of its subcommands, from the CLI's own
  parser, so the CLI page cannot drift from the command.
- `WeightLoraConfig`'s signature: the fields WeightLoRA adds, not all of `peft.LoraConfig`'s.
- `wlora-citation` (directive): `wlora_trl.CITATION`, the BibTeX entry the package writes into model cards.
- Markdown in docstrings: the package writes its docstrings for GitHub and IDEs (fenced ```python blocks,
  `[text](url)` links); autodoc reads reStructuredText. The two are translated before napoleon parses the Google
  sections, so a docstring keeps one form and the site still shows highlighted code and real links.
"""

from __future__ import annotations

import argparse
import os
import re

from docutils import nodes
from docutils.parsers.rst import Directive, directives

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w+-]*)\s*$")
LINK = re.compile(r"\[(?P<text>[^\]\[]+)\]\((?P<url>https?://[^)\s]+)\)")
HELP_WIDTH = "88"  # argparse wraps to $COLUMNS; a fixed width keeps the page the same on every machine


def markdown_docstring_to_rst(lines: list[str]) -> list[str]:
    """Fenced code blocks become `.. code-block::` directives and Markdown links become reST links, in place of
    the docstring's own lines (indentation kept, so napoleon still sees its sections)."""
    out: list[str] = []
    fence_indent: str | None = None
    for line in lines:
        match = FENCE.match(line)
        if fence_indent is None and match:
            fence_indent = match["indent"]
            out += [f"{fence_indent}.. code-block:: {match['language'] or 'text'}", ""]
            continue
        if fence_indent is not None:
            if match and match["indent"] == fence_indent and not match["language"]:
                fence_indent = None
                out.append("")
                continue
            body = line[len(fence_indent) :] if line.startswith(fence_indent) else line.lstrip()
            out.append(f"{fence_indent}    {body}" if body.strip() else "")
            continue
        out.append(LINK.sub(lambda m: f"`{m['text']} <{m['url']}>`__", line))
    if fence_indent is not None:
        raise ValueError("a docstring opens a ``` code fence and never closes it:\n" + "\n".join(lines))
    return out


def _process_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = markdown_docstring_to_rst(lines)


def config_signature() -> str:
    """`WeightLoraConfig`'s signature as WeightLoRA adds to `LoraConfig`: its own fields and their defaults, from the
    dataclass (autodoc would print all of PEFT's forty-odd fields first)."""
    import dataclasses

    from peft import LoraConfig

    from wlora_trl import WeightLoraConfig

    inherited = {f.name for f in dataclasses.fields(LoraConfig)}
    own = [f for f in dataclasses.fields(WeightLoraConfig) if f.name not in inherited]
    return "(" + ", ".join(["*", *(f"{f.name}={f.default!r}" for f in own), "**lora_config_fields"]) + ")"


def _process_signature(app, what, name, obj, options, signature, return_annotation):
    if what == "class" and name == "wlora_trl.WeightLoraConfig":
        return config_signature(), None
    return None


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise ValueError(f"wlora-trl has no subcommand {name!r}")


def cli_help(command: str = "") -> str:
    """`wlora-trl [command] --help`, as the installed command prints it."""
    from wlora_trl.cli.main import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        parser = build_parser()
        return (_subparser(parser, command) if command else parser).format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


class CliHelp(Directive):
    """``{wlora-cli-help} eval``: the help of `wlora-trl eval` (no argument: of `wlora-trl` itself)."""

    optional_arguments = 1
    has_content = False
    option_spec = {"command": directives.unchanged}

    def run(self):
        command = self.arguments[0] if self.arguments else ""
        text = cli_help(command)
        block = nodes.literal_block(text, text, language="text")
        return [block]


class Citation(Directive):
    """``{wlora-citation}``: `wlora_trl.CITATION`, the paper's BibTeX entry, as the package holds it."""

    has_content = False

    def run(self):
        from wlora_trl import CITATION

        return [nodes.literal_block(CITATION, CITATION, language="bibtex")]


def setup(app):
    # Before napoleon (priority 500), which must see reST, not Markdown fences.
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)
    app.connect("autodoc-process-signature", _process_signature)
    app.add_directive("wlora-cli-help", CliHelp)
    app.add_directive("wlora-citation", Citation)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
